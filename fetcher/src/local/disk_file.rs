//! Local disk files: which kinds of file may hold a disk (a regular file or
//! a block device), what to call the others in an error, and how big a disk
//! is (`BLKGETSIZE64` for a device, whose metadata says 0).

use std::fs::{File, FileType};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

/// The kind of a file, in words for an error message.
pub fn kind_name(t: FileType) -> &'static str {
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_fifo() {
        "FIFO (named pipe)"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// `_IOR(0x12, 114, u64)`: the size of a block device in bytes (linux/fs.h).
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: u32 = 0x8008_1272;
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: u32 = 0x4008_1272;

/// The size in bytes of the block device open as `file`.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at `size`, alive and writable for the whole call; `file` keeps the
    // descriptor open.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKGETSIZE64 as libc::Ioctl,
            &mut size as *mut u64,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

/// The size of the disk image open as `file`: a non-empty regular file or
/// block device. Anything else (a character device such as /dev/zero, a
/// FIFO, a directory) or an empty image is refused with `InvalidInput`.
pub fn image_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    let t = meta.file_type();
    let size = if t.is_file() {
        meta.len()
    } else if t.is_block_device() {
        block_device_size(file)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a {}, not a regular file or block device", kind_name(t)),
        ));
    };
    if size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty (0 bytes): there is no disk in it",
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_regular_files_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = File::create(&path).unwrap();
        assert_eq!(
            image_size(&f).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        f.set_len(3 << 20).unwrap();
        assert_eq!(image_size(&f).unwrap(), 3 << 20);
        let err = image_size(&File::open(dir.path()).unwrap()).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
    }
}
