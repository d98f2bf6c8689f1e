//! What leaves the cache for the store: sync (dirty chunks uploaded while
//! the device serves), the delta publish that commits the next version, and
//! fork (the cache published as a new parcel).

pub(in crate::engine) mod fork;
pub(in crate::engine) mod publish;
pub(in crate::engine) mod sync;
