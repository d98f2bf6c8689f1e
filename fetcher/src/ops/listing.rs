//! `isr ls`: every parcel of a store, with its versions, lease, and (with
//! the key) what its HEAD holds. What needs no key (the versions, the
//! lease) is read from the store's listing and lease objects; the HEAD
//! manifest is decoded only with a key.

use std::collections::BTreeMap;

use format::Secret;

use crate::remote::lease::{Lease, LeaseInfo};
use crate::remote::store::StoredObject;
use crate::{Error, Parcel, Store};

/// What HEAD's manifest says (read with the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadInfo {
    /// Size of the disk in bytes.
    pub disk_size: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// Size of the memory image (0: none).
    pub memory_size: u64,
    /// When HEAD was published (Unix seconds).
    pub created_unix: i64,
    /// The host that published it.
    pub host: String,
}

/// One parcel of a store.
#[derive(Debug)]
pub struct ParcelListing {
    /// Its name.
    pub name: String,
    /// The versions whose manifests exist, ascending (empty: none, e.g. a
    /// parcel whose first import is under way).
    pub versions: Vec<u64>,
    /// Who holds its lease; `None`: free.
    pub lease: Option<LeaseInfo>,
    /// HEAD's manifest: `None` without a key (or without versions), else
    /// what it says or why it could not be read.
    pub head: Option<Result<HeadInfo, Error>>,
}

impl ParcelListing {
    /// The newest version.
    pub fn head_version(&self) -> Option<u64> {
        self.versions.last().copied()
    }
}

/// Lists every parcel of `store` (sorted by name): those with a version,
/// or whose first import holds the lease now. With `secret`, HEAD's
/// manifest of each is decoded (one that cannot be is listed with its
/// error). A store that cannot list (an http mirror) fails with
/// [`Error::NoListing`].
pub async fn list_parcels(
    store: &Store,
    secret: Option<&Secret>,
) -> Result<Vec<ParcelListing>, Error> {
    let objects = store.list("parcels").await?;
    let mut out = Vec::new();
    for (name, versions) in versions_by_parcel(&objects) {
        let lease = Lease::holder_of(store, &name).await?;
        // No version and nobody holding it: not a parcel, only the lease
        // objects of a command that failed before it published (older isr
        // left them; they stay, as a lease's history must).
        if versions.is_empty() && lease.is_none() {
            continue;
        }
        let head = match (secret, versions.last()) {
            (Some(secret), Some(&v)) => Some(head_info(store, &name, secret, v).await),
            _ => None,
        };
        out.push(ParcelListing {
            name,
            versions,
            lease,
            head,
        });
    }
    Ok(out)
}

async fn head_info(
    store: &Store,
    name: &str,
    secret: &Secret,
    version: u64,
) -> Result<HeadInfo, Error> {
    let parcel = Parcel::new(store.clone(), name, secret.clone())?;
    let m = parcel.manifest(version).await?;
    Ok(HeadInfo {
        disk_size: m.disk_size,
        chunk_size: m.chunk_size,
        memory_size: m.memory_size,
        created_unix: m.created_unix,
        host: m.host,
    })
}

/// Every parcel named by a listing of `parcels/`, with its versions,
/// ascending (a parcel with leases but no version yet has none).
pub(crate) fn versions_by_parcel(objects: &[StoredObject]) -> BTreeMap<String, Vec<u64>> {
    let mut by: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for o in objects {
        let Some(rest) = o.path.strip_prefix("parcels/") else {
            continue;
        };
        let Some((name, _)) = rest.split_once('/') else {
            continue;
        };
        let versions = by.entry(name.to_owned()).or_default();
        if let Some(v) = crate::remote::store::version_of(&o.path, name) {
            versions.push(v);
        }
    }
    for v in by.values_mut() {
        v.sort_unstable();
    }
    by
}
