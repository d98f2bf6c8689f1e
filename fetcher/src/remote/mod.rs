//! The remote layer: where parcels live. A store (any object_store back
//! end, with retries, bandwidth limits, conditional create, a version
//! history and the chunks' freshness), leases (one host at a time), and
//! the parcel (its versions, manifests and HEAD).

pub mod lease;
pub mod parcel;
pub mod store;

pub use lease::{Lease, LeaseInfo, Liveness, Task};
pub use parcel::{Parcel, Published};
pub use store::{
    ChunkStored, DEFAULT_CHUNK_REFRESH, PutOutcome, Store, StoreOptions, StoredObject, parse_rate,
    validate_parcel_name,
};
