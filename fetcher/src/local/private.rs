//! Files and directories that only their owner may read (DESIGN.md
//! invariant 7): the cache holds the decrypted disk, the run directory the
//! daemon's sockets and state. Modes are set explicitly after creation, so
//! they are 0700 / 0600 whatever the umask, and an older, wider mode of a
//! directory or file of isr's own is narrowed when it is opened again.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of private directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of private files.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents with mode 0700, and makes `dir`
/// itself 0700 if it existed with a wider mode.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    narrow(dir, DIR_MODE)
}

/// Opens `path` for reading and writing, creating it with mode 0600 (an
/// existing file of wider mode is narrowed to 0600).
pub fn open_rw(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    narrow_file(&f)?;
    Ok(f)
}

/// Creates (or truncates) `path` with mode 0600 and writes `bytes`.
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> io::Result<()> {
    use std::io::Write;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    narrow_file(&f)?;
    f.write_all(bytes.as_ref())
}

/// Opens `path` for appending, creating it with mode 0600.
pub fn append(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)?;
    narrow_file(&f)?;
    Ok(f)
}

/// Sets `path` to `mode` if it grants anything `mode` does not.
pub fn narrow(path: &Path, mode: u32) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o777 & !mode != 0 {
        std::fs::set_permissions(path, Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn narrow_file(f: &File) -> io::Result<()> {
    if f.metadata()?.permissions().mode() & 0o077 != 0 {
        f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_whatever_the_mode_before() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        create_dir_all(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        create_dir_all(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        let f = d.join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        open_rw(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        let g = d.join("g");
        write(&g, b"y").unwrap();
        assert_eq!(mode(&g), 0o600);
        append(&d.join("h")).unwrap();
        assert_eq!(mode(&d.join("h")), 0o600);
    }
}
