//! Where a file holds data: SEEK_DATA / SEEK_HOLE, so importing a sparse
//! image reads only its allocated extents.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// The byte ranges of `file` (of `size` bytes) that may hold data, in order.
/// Where the file system cannot tell, the whole file is one range.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<Range<u64>>> {
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(file, pos, libc::SEEK_DATA) {
            Ok(s) => s,
            // ENXIO: no data at or after `pos`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            // No support (or a device): treat everything as data.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                let whole = std::iter::once(0..size).filter(|r| !r.is_empty());
                return Ok(whole.collect());
            }
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = seek(file, start, libc::SEEK_HOLE)?.min(size);
        extents.push(start..end);
        pos = end;
    }
    Ok(extents)
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // SAFETY: lseek on a file descriptor that `file` keeps open for the
    // duration of the call; it touches no memory of ours.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_data_between_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = File::create(&path).unwrap();
        let mib = 1u64 << 20;
        f.set_len(64 * mib).unwrap();
        f.write_all_at(&[1u8; 4096], 8 * mib).unwrap();
        f.write_all_at(&[2u8; 4096], 40 * mib).unwrap();
        let extents = data_extents(&f, 64 * mib).unwrap();
        let covered: u64 = extents.iter().map(|r| r.end - r.start).sum();
        for off in [8 * mib, 40 * mib] {
            assert!(
                extents.iter().any(|r| r.contains(&off)),
                "{off} in {extents:?}"
            );
        }
        // tmpfs and ext4 report holes; a file system that cannot reports one
        // extent, which is still correct.
        assert!(covered == 64 * mib || covered < 4 * mib, "{extents:?}");
        assert!(
            data_extents(&File::create(dir.path().join("e")).unwrap(), 0)
                .unwrap()
                .is_empty()
        );
    }
}
