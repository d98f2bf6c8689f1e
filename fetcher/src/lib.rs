//! isr's data plane below the block device: store back ends, parcels
//! (versions, manifests, HEAD), and moving chunks between a store and local
//! files.
//!
//! ```text
//!   ops::{import, export, verify,   whole-image transfers, parallel;
//!        rollback, gc, list_parcels} versions and garbage collection
//!           │
//!        Parcel                     versions of one VM: HEAD, manifests, chunks
//!           │
//!        Store                      one trait object (object_store), any back end:
//!           │                       file://, s3://, http(s):// (read-only), memory://
//!   object_store back ends          retries with backoff, conditional create
//! ```

pub mod cache;
pub mod disk_file;
pub mod engine;
mod error;
mod group_sync;
pub mod lease;
pub mod meter;
pub mod notify;
pub mod ops;
mod parcel;
pub mod private;
pub mod sparse;
mod store;
pub mod time;

pub use engine::{
    Engine, EngineOptions, EngineStats, OpenReport, PublishSummary, SavedVm, SyncSummary,
};
pub use error::{ChunkFault, Error, ErrorClass};
pub use lease::{Lease, LeaseInfo, Liveness, Task};
pub use notify::Notifier;
pub use parcel::{Parcel, Published};
pub use store::{
    ChunkStored, DEFAULT_CHUNK_REFRESH, PutOutcome, Store, StoreOptions, StoredObject, parse_rate,
    validate_parcel_name,
};

/// A progress sink: called with the number of bytes just processed.
pub type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// A progress sink that ignores everything.
pub fn no_progress() -> Progress {
    std::sync::Arc::new(|_| {})
}
