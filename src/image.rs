//! Image formats on import: raw is read directly; qcow2, vmdk and vhdx are
//! first converted to a sparse raw file with `qemu-img`, when installed.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// An image ready to import: the original when raw, else a converted copy
/// that is deleted when this is dropped.
pub struct RawImage {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl RawImage {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Detects the format of `path` and converts it to raw if needed.
pub fn open_raw(path: &Path) -> anyhow::Result<RawImage> {
    let mut magic = [0u8; 32];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let Some(format) = detect(&magic[..n]) else {
        return Ok(RawImage {
            path: path.to_owned(),
            _temp: None,
        });
    };
    let temp = tempfile::Builder::new()
        .prefix("isr-import-")
        .tempdir()
        .context("cannot create a temporary directory for the conversion")?;
    let raw = temp.path().join("image.raw");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .status();
    match status {
        Ok(s) if s.success() => Ok(RawImage {
            path: raw,
            _temp: Some(temp),
        }),
        Ok(s) => bail!(
            "qemu-img could not convert {} ({format}): {s}",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} is a {format} image; converting it needs qemu-img (apt install qemu-utils), or import a raw image",
            path.display()
        ),
        Err(e) => bail!("cannot run qemu-img: {e}"),
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
