//! How a cache image's data is read and written: `O_DIRECT` or through the
//! page cache. The mode is what a cache records; the direct I/O itself is
//! [`super::CacheFile::enable_direct`]'s.

/// How a cache image's data is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheIo {
    /// `O_DIRECT`: the data bypasses the host's page cache (the guest
    /// caches its own disk; QEMU's `cache=none` does the same). Where the
    /// file system cannot (tmpfs), the cache works buffered and says so.
    Direct,
    /// Through the host's page cache.
    Buffered,
}

impl CacheIo {
    /// The mode of a cache that was never asked for one: direct, measured
    /// as fast or faster on the device path on Linux 6.12 and steadier on
    /// 7.3 (`scripts/bench-ublk`; figures in the README), and free of a
    /// second copy of the disk in the host's page cache.
    pub const DEFAULT: CacheIo = CacheIo::Direct;

    pub fn name(self) -> &'static str {
        match self {
            CacheIo::Direct => "direct",
            CacheIo::Buffered => "buffered",
        }
    }

    /// `direct` or `buffered`.
    pub fn parse(s: &str) -> Result<CacheIo, String> {
        match s {
            "direct" => Ok(CacheIo::Direct),
            "buffered" => Ok(CacheIo::Buffered),
            _ => Err(format!("{s:?} is no cache I/O mode (direct or buffered)")),
        }
    }

    pub(super) fn code(mode: Option<CacheIo>) -> u32 {
        match mode {
            None => 0,
            Some(CacheIo::Direct) => 1,
            Some(CacheIo::Buffered) => 2,
        }
    }

    pub(super) fn from_code(code: u32) -> Option<CacheIo> {
        match code {
            1 => Some(CacheIo::Direct),
            2 => Some(CacheIo::Buffered),
            _ => None,
        }
    }
}
