//! `isr fork`: a cache's work published as a new parcel. The way to keep
//! the changes of a session whose lease was stolen (it was fenced: its
//! suspend could not publish), or of any cache in conflict with its parcel.

use std::path::PathBuf;

use crate::engine::{Engine, EngineOptions, PublishSummary};
use crate::local::cache;
use crate::{Error, Parcel};

/// Publishes the cache of `parcel` (its base version plus its local
/// changes, taken as they are, offline) as version 1 of the new parcel `to`
/// in the same store, and moves the cache to `to`, so that resuming `to`
/// on this host is warm. Returns the publish and the cache's new place.
///
/// The chunks the new parcel shares with the base version are made young
/// in the store first: the base of a fenced cache is often old, and
/// `isr gc` may have removed its chunks with its versions. A chunk gone
/// from the store is written again from this cache; one that is in
/// neither fails the fork, naming it, and nothing is published.
pub fn fork(
    parcel: &Parcel,
    to: &Parcel,
    options: EngineOptions,
    created_unix: i64,
) -> Result<(PublishSummary, PathBuf), Error> {
    if to.name() == parcel.name() {
        return Err(Error::Invalid(format!(
            "fork parcel {} to a new name (--to), not to itself",
            parcel.name()
        )));
    }
    let to_dir = cache::cache_dir(&options.cache_root, to.store().url(), to.name());
    if to_dir.exists() {
        return Err(Error::Conflict(format!(
            "a cache of parcel {} exists already on this host ({}); remove it first",
            to.name(),
            to_dir.display()
        )));
    }
    let options = EngineOptions {
        reconcile: false,
        prefetch: false,
        ..options
    };
    let engine = Engine::open(parcel.clone(), options)?;
    let from_dir = engine.cache_dir();
    let summary = engine.publish_fork(to, created_unix)?;
    engine.close()?;
    drop(engine);
    // The old parcel's lease nonce does not belong to the new parcel.
    let _ = std::fs::remove_file(from_dir.join("lease"));
    std::fs::rename(&from_dir, &to_dir).map_err(|e| Error::io("rename", &from_dir, e))?;
    Ok((summary, to_dir))
}
