//! isr's data plane below the block device, in layers (each folder one;
//! every import points down):
//!
//! ```text
//!   ops/        import, export, verify, rollback, gc, listing: whole images
//!      │        and versions
//!   engine/     what the block device needs: demand fetch, prefetch,
//!      │        readahead, dirty tracking, sync, publish, reconcile, check,
//!      │        hoard, discard, fork
//!   transfer/   the chunk pipeline both use: encode and upload with dedup
//!      │        and freshness, concurrency, rates
//!   remote/     where parcels live: the store (object_store back ends,
//!      │        retries, limits, conditional create, history, freshness),
//!      │        leases, the parcel (versions, manifests, HEAD)
//!   local/      this host's files: the cache (image, chunk map, states),
//!      │        private files, group sync, sparse files, disk files
//!   error, image, host, time, aligned: the vocabulary every layer shares
//! ```

// The layers, from the bottom: every `use crate::…` points down this list.
pub mod aligned;
mod error;
pub mod host;
pub mod image;
pub mod time;

pub mod local;
pub mod remote;

pub mod transfer;

pub mod engine;

pub mod ops;

pub use engine::{
    Engine, EngineOptions, EngineStats, OpenReport, PublishSummary, SavedVm, SyncSummary,
};
pub use error::{ChunkFault, Error, ErrorClass};
pub use image::Image;
pub use local::cache::CacheIo;
pub use local::notify::Notifier;
pub use remote::{
    ChunkStored, DEFAULT_CHUNK_REFRESH, Lease, LeaseInfo, Liveness, Parcel, Published, PutOutcome,
    Store, StoreOptions, StoredObject, Task, parse_rate, validate_parcel_name,
};

/// A progress sink: called with the number of bytes just processed.
pub type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// A progress sink that ignores everything.
pub fn no_progress() -> Progress {
    std::sync::Arc::new(|_| {})
}
