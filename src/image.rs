//! Images on import: only a regular file or a block device can hold a disk;
//! raw is read directly; qcow2, vmdk and vhdx are checked with `qemu-img
//! check`, then converted to a sparse raw file with `qemu-img convert`, when
//! installed.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// An image ready to import: the original when raw, else a converted copy
/// that is deleted when this is dropped.
pub struct RawImage {
    path: PathBuf,
    size: u64,
    _temp: Option<tempfile::TempDir>,
}

impl RawImage {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the raw disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Checks that `path` can hold a disk (a non-empty regular file or block
/// device), detects its format, checks a qcow2/vmdk/vhdx image's
/// consistency with `qemu-img check`, and converts it to raw if needed.
pub fn open_raw(path: &Path) -> anyhow::Result<RawImage> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer; the type check
    // below refuses it.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?;
    let size = fetcher::local::disk_file::image_size(&file)
        .with_context(|| format!("cannot import {}", path.display()))?;
    let mut magic = [0u8; 32];
    let n = file
        .read(&mut magic)
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let Some(format) = detect(&magic[..n]) else {
        return Ok(RawImage {
            path: path.to_owned(),
            size,
            _temp: None,
        });
    };
    check(path, format)?;
    let temp = tempfile::Builder::new()
        .prefix("isr-import-")
        .tempdir()
        .context("cannot create a temporary directory for the conversion")?;
    let raw = temp.path().join("image.raw");
    let output = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output();
    match output {
        Ok(out) if out.status.success() => {
            let size = std::fs::metadata(&raw)
                .with_context(|| format!("cannot read the conversion {}", raw.display()))?
                .len();
            if size == 0 {
                bail!(
                    "cannot import {}: the {format} image's disk is empty (0 bytes)",
                    path.display()
                );
            }
            Ok(RawImage {
                path: raw,
                size,
                _temp: Some(temp),
            })
        }
        Ok(out) => bail!(
            "qemu-img could not convert {} ({format}): {}{}",
            path.display(),
            out.status,
            said(&out)
        ),
        Err(e) => Err(no_qemu_img(e, path, format)),
    }
}

/// Runs `qemu-img check`: an image with corruptions (or one it cannot even
/// check) is refused with what qemu-img said, because `qemu-img convert`
/// turns what it cannot read into zeros and succeeds. Leaked clusters
/// (status 3) waste space but lose no data; formats without a check
/// (status 63) pass.
fn check(path: &Path, format: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", format])
        .arg(path)
        .output()
        .map_err(|e| no_qemu_img(e, path, format))?;
    match out.status.code() {
        Some(0 | 3 | 63) => Ok(()),
        _ => bail!(
            "{} is a damaged {format} image; qemu-img check failed ({}){}",
            path.display(),
            out.status,
            said(&out)
        ),
    }
}

/// What a qemu-img run printed, as `: line; line`: its first lines on
/// stdout (check's summary), then on stderr (the first errors).
fn said(out: &std::process::Output) -> String {
    let first = |bytes: &[u8], n: usize| -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .take(n)
            .map(str::to_owned)
            .collect()
    };
    let mut lines = first(&out.stdout, 2);
    lines.extend(first(&out.stderr, 2));
    if lines.is_empty() {
        String::new()
    } else {
        format!(": {}", lines.join("; "))
    }
}

fn no_qemu_img(e: std::io::Error, path: &Path, format: &str) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "{} is a {format} image; converting it needs qemu-img (apt install qemu-utils), or import a raw image",
            path.display()
        )
    } else {
        anyhow::anyhow!("cannot run qemu-img: {e}")
    }
}

fn detect(magic: &[u8]) -> Option<&'static str> {
    if magic.starts_with(b"QFI\xfb") {
        Some("qcow2")
    } else if magic.starts_with(b"KDMV") || magic.starts_with(b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if magic.starts_with(b"vhdxfile") {
        Some("vhdx")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn detects_formats() {
        assert_eq!(super::detect(b"QFI\xfb\0\0\0\x03"), Some("qcow2"));
        assert_eq!(super::detect(b"KDMV...."), Some("vmdk"));
        assert_eq!(super::detect(&[0u8; 32]), None);
        assert_eq!(super::detect(b""), None);
    }
}
