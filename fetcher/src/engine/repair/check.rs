//! `isr check` (OpenISR's `checkp`): verifies a local cache against the
//! manifest it is based on, without the store: the map's sanity, the
//! image's size, and every chunk the map says is present, re-hashed in
//! parallel. Damaged chunks become absent, so they are fetched again; after
//! an unclean stop a chunk that differs may hold writes whose dirty mark was
//! lost, so it becomes dirty instead (it is the guest's data: never dropped).

use std::path::Path;

use crate::engine::repair::reconcile::present_mismatches;
use crate::local::cache::{self, Cache, DIRTY, PRESENT};
use crate::{Error, Parcel, Progress};

/// What a check found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The version the cache is based on.
    pub base_version: u64,
    /// Chunks of the disk.
    pub chunks: u64,
    /// Chunks the map said were present, and how many of them were hashed
    /// (the others are holes, checked without reading).
    pub present: u64,
    /// Present chunks whose bytes were read and hashed.
    pub hashed: u64,
    /// Dirty chunks (local changes: nothing to check them against).
    pub dirty: u64,
    /// Present chunks that did not match, made absent (refetched on use).
    pub damaged: Vec<u64>,
    /// Present chunks that did not match after an unclean stop, made dirty.
    pub suspect: Vec<u64>,
    /// Map entries with an impossible state, made absent.
    pub bad_entries: u64,
    /// Chunks cut off a truncated image, made absent.
    pub truncated: Vec<u64>,
    /// Dirty chunks cut off a truncated image: unpublished data lost.
    pub lost_dirty: Vec<u64>,
    /// The previous session did not stop cleanly.
    pub unclean: bool,
}

impl CheckReport {
    /// Whether the cache was found as it should be.
    pub fn clean(&self) -> bool {
        self.damaged.is_empty()
            && self.suspect.is_empty()
            && self.bad_entries == 0
            && self.truncated.is_empty()
            && self.lost_dirty.is_empty()
    }
}

/// Checks (and repairs) the cache of `parcel` under `cache_root`. Refuses
/// while another process (a resumed device) has the cache open.
pub fn check(parcel: &Parcel, cache_root: &Path, progress: Progress) -> Result<CheckReport, Error> {
    let dir = cache::cache_dir(cache_root, parcel.store().url(), parcel.name());
    if !Cache::exists(&dir) {
        return Err(Error::Invalid(format!(
            "parcel {} has no cache on this host (looked in {})",
            parcel.name(),
            dir.display()
        )));
    }
    let cache = Cache::open(Cache::lock(&dir)?, &dir)?;
    // Every chunk is read: as the cache reads (past the page cache, when
    // direct).
    crate::engine::reconcile::use_io(&cache, None, &mut Default::default());
    let repaired = cache.repair()?;
    let header = cache.header();
    let path = cache.manifest_path(header.base_version);
    let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
    let base = parcel.decode_manifest(&bytes, header.base_version, path.display().to_string())?;
    if base.disk_size != header.disk_size || base.chunk_size != header.chunk_size {
        return Err(Error::Invalid(format!(
            "cache {} does not match its manifest (disk {} vs {} bytes, chunks {} vs {}); remove it",
            dir.display(),
            header.disk_size,
            base.disk_size,
            header.chunk_size,
            base.chunk_size
        )));
    }
    if header.open {
        cache.resolve_writing(header.boot_id == cache::current_boot_id())?;
    }
    let present = cache.chunks_in(PRESENT);
    let found = present_mismatches(parcel, &cache, &base, &present, &*progress)?;
    let mut report = CheckReport {
        base_version: header.base_version,
        chunks: cache.len() as u64,
        present: present.len() as u64,
        hashed: found.hashed,
        dirty: cache.chunks_in(DIRTY).len() as u64,
        bad_entries: repaired.bad_entries,
        truncated: repaired.truncated,
        lost_dirty: repaired.lost_dirty,
        unclean: header.open,
        ..Default::default()
    };
    for c in found.mismatched {
        if header.open {
            cache.set(c, DIRTY)?;
            report.suspect.push(c);
        } else {
            report.damaged.push(c);
        }
    }
    cache.drop_chunks(&report.damaged)?;
    cache.sync_state()?;
    Ok(report)
}
