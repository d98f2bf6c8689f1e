//! How an engine runs: the options of [`Engine::open`](super::Engine::open),
//! and what they say about the cache it serves.

use std::path::PathBuf;
use std::time::Duration;

use format::Manifest;

use crate::local::cache::{self, CacheIo};
use crate::{Error, Parcel};

/// How an engine runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Root of all caches (see [`cache::default_cache_root`]).
    pub cache_root: PathBuf,
    /// How long a read of a missing chunk waits for the store.
    pub miss_timeout: Duration,
    /// Start background prefetch at open.
    pub prefetch: bool,
    /// Most prefetches in flight (the window adapts below it).
    pub max_fetches: usize,
    /// Host name recorded in published manifests.
    pub host: String,
    /// Bring the cache up to date with the store's HEAD at open (false:
    /// take the cache as it is, offline; it must exist).
    pub reconcile: bool,
    /// The cache is being re-attached to a live device whose daemon died
    /// (`isr recover`): the guest holds the device's content in its page
    /// cache, so the cache may move on only to a version of its own
    /// publish; another writer's version is refused (see `reconcile.rs`).
    pub reattach: bool,
    /// This boot of the host (default: [`cache::current_boot_id`]); the
    /// explorer plays host crashes with it.
    pub boot_id: Option<[u8; 16]>,
    /// Serve the guest's RAM of this many bytes instead of the disk: each
    /// version's RAM image ([`Manifest::ram_view`]; zeros where a version
    /// has none of that size), in a cache of its own
    /// ([`cache::ram_cache_dir`]). Such an engine publishes only with the
    /// disk's ([`SavedVm::ram`](crate::SavedVm::ram)). Opened for a new run
    /// (not `reattach`), it drops the chunks a previous run left dirty:
    /// they belonged to a VM that is gone.
    pub ram: Option<u64>,
    /// How the cache image's data is read and written: `O_DIRECT` or
    /// through the page cache (`None`: as the cache last recorded, else
    /// [`CacheIo::DEFAULT`]). The choice is recorded in the cache.
    pub cache_io: Option<CacheIo>,
}

impl EngineOptions {
    /// What this engine serves of `m`: the disk, or the RAM.
    pub(crate) fn view(&self, m: Manifest) -> Result<Manifest, Error> {
        match self.ram {
            None => Ok(m),
            Some(size) => m
                .ram_view(size)
                .map_err(|e| Error::Invalid(format!("RAM image: {e}"))),
        }
    }

    /// The cache directory of `parcel`'s image this engine serves.
    pub(crate) fn cache_dir(&self, parcel: &Parcel) -> PathBuf {
        let dir = match self.ram {
            None => cache::cache_dir,
            Some(_) => cache::ram_cache_dir,
        };
        dir(&self.cache_root, parcel.store().url(), parcel.name())
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_root: cache::default_cache_root(),
            miss_timeout: Duration::from_secs(600),
            prefetch: true,
            max_fetches: 64,
            host: String::new(),
            reconcile: true,
            reattach: false,
            boot_id: None,
            ram: None,
            cache_io: None,
        }
    }
}
