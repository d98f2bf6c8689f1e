//! `isr discard`: drops this host's unpublished state of a parcel. Every
//! dirty chunk of the cache goes back to the base version (it is marked
//! absent, then its place in the image is made a hole: it is fetched again
//! on use), the record of dirty chunks already uploaded by `isr sync`
//! (`synced`) is deleted, and the store lease the cache still holds (its
//! nonce in `lease`: kept by an offline suspend) is released.
//!
//! A cache a host crash left (open, from another boot) is dropped whole:
//! a chunk written before the crash may have lost its dirty mark (the
//! engine's recovery finds such chunks by hashing them against the
//! manifest, which needs the parcel's key), so every chunk it holds
//! counts as changed and goes back to the base version.
//!
//! The cache is locked from [`Discard::open`] until the value is dropped,
//! so a confirmation asked in between is about what is discarded; a
//! resumed parcel holds the lock, and is refused ([`Error::CacheBusy`]).
//! The order is safe against a crash: the absent marks are durable before
//! any hole is punched, and an absent chunk's bytes are never read.

use std::path::{Path, PathBuf};

use crate::engine::upload::sync::SYNCED;
use crate::local::cache::{self, Cache, DIRTY};
use crate::{Error, Lease, Store};

/// The file holding the nonce of the store lease the cache holds.
const LEASE: &str = "lease";

/// A locked cache, about to lose its local changes.
#[derive(Debug)]
pub struct Discard {
    cache: Cache,
    dirty: Vec<u64>,
    dirty_bytes: u64,
    host_crashed: bool,
}

/// What [`Discard::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscardReport {
    /// The version the cache is based on (what the chunks went back to).
    pub base_version: u64,
    /// Dirty chunks dropped.
    pub dirty_chunks: u64,
    /// Their bytes.
    pub dirty_bytes: u64,
    /// The `synced` record was there and is deleted.
    pub synced_removed: bool,
}

impl Discard {
    /// Locks the cache of parcel `parcel` of the store at `store_url` under
    /// `cache_root`. Fails if there is none, or while it is in use.
    pub fn open(store_url: &str, parcel: &str, cache_root: &Path) -> Result<Discard, Error> {
        crate::validate_parcel_name(parcel)?;
        let dir = cache::cache_dir(cache_root, store_url, parcel);
        if !Cache::exists(&dir) {
            return Err(Error::Invalid(format!(
                "parcel {parcel} has no cache on this host (looked in {})",
                dir.display()
            )));
        }
        let cache = Cache::open(Cache::lock(&dir)?, &dir)?;
        let h = cache.header();
        let g = format::Geometry::new(h.disk_size, h.chunk_size)
            .map_err(|e| Error::Invalid(format!("cache {}: {e}", dir.display())))?;
        // Left open by another boot: which chunks changed is not known.
        let host_crashed = h.open && h.boot_id != cache::current_boot_id();
        let dirty: Vec<u64> = (0..cache.len() as u64)
            .filter(|&c| match cache::state_of(cache.entry(c)) {
                // Written whole when a session stopped: unpublished too.
                DIRTY | cache::WRITING => true,
                cache::PRESENT => host_crashed,
                _ => false,
            })
            .collect();
        let dirty_bytes = dirty.iter().map(|&c| g.chunk_len(c) as u64).sum();
        Ok(Discard {
            cache,
            dirty,
            dirty_bytes,
            host_crashed,
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        self.cache.dir()
    }

    /// The version the cache is based on.
    pub fn base_version(&self) -> u64 {
        self.cache.header().base_version
    }

    /// The cache was left open by a host crash: every chunk it holds is
    /// discarded (see the module's documentation).
    pub fn host_crashed(&self) -> bool {
        self.host_crashed
    }

    /// Chunks to discard (dirty ones; every cached one after a host
    /// crash), and their bytes.
    pub fn dirty(&self) -> (u64, u64) {
        (self.dirty.len() as u64, self.dirty_bytes)
    }

    /// Whether the cache records chunks uploaded by `isr sync`.
    pub fn has_synced_record(&self) -> bool {
        self.dir().join(SYNCED).exists()
    }

    /// The nonce of the store lease the cache holds, if any.
    pub fn lease_nonce(&self) -> Option<String> {
        lease_nonce(self.dir())
    }

    /// Drops every dirty chunk and the `synced` record. The lease is left
    /// to [`release_cache_lease`] (it needs the store).
    pub fn apply(&self) -> Result<DiscardReport, Error> {
        let h = self.cache.header();
        self.cache.drop_chunks(&self.dirty)?;
        let synced_removed = self.cache.remove_file(SYNCED)?;
        Ok(DiscardReport {
            base_version: h.base_version,
            dirty_chunks: self.dirty.len() as u64,
            dirty_bytes: self.dirty_bytes,
            synced_removed,
        })
    }
}

fn lease_nonce(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(LEASE)).ok()?;
    let nonce = text.trim();
    (!nonce.is_empty()).then(|| nonce.to_owned())
}

/// What became of the lease a cache held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLease {
    /// The cache held none.
    None,
    /// It was released in the store.
    Released,
    /// It was no longer held by this cache (released already, or taken
    /// over): nothing to release.
    NotHeld,
}

/// Releases the store lease whose nonce the cache in `dir` keeps, then
/// forgets the nonce. If the store cannot be reached the nonce file stays
/// (the error says so), so that a later call can release it.
pub async fn release_cache_lease(
    store: &Store,
    parcel: &str,
    dir: &Path,
) -> Result<CacheLease, Error> {
    let Some(nonce) = lease_nonce(dir) else {
        return Ok(CacheLease::None);
    };
    let released = Lease::release_nonce(store, parcel, &nonce).await?;
    let path: PathBuf = dir.join(LEASE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove", &path, e)),
    }
    Ok(if released {
        CacheLease::Released
    } else {
        CacheLease::NotHeld
    })
}
