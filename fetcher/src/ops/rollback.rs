//! Rollback: an older version's content published again as the next one.
//!
//! Version HEAD+1 gets version N's disk table, memory image and settings
//! (and its access trace, the prefetch order that goes with that content);
//! its parent is HEAD, its host and time are the rollback's, and it names
//! no writer cache. Nothing is uploaded, but every chunk it names is made
//! young first ([`Store::has_chunk`], else fetched and put again): an old
//! version's chunks may be ones only removed versions still shared, which
//! `isr gc` would otherwise be free to delete before the new version
//! commits. The caller holds the parcel's lease.

use format::{ChunkEntry, ChunkId};
use futures::{StreamExt, TryStreamExt, stream};

use crate::Image;
use crate::transfer::DEFAULT_CONCURRENCY;
use crate::{ChunkFault, Error, Parcel};

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackSummary {
    /// The version whose content was published again.
    pub from: u64,
    /// HEAD before the rollback.
    pub head: u64,
    /// The version published; `None` when `from` is HEAD (nothing to do).
    pub version: Option<u64>,
    /// Distinct stored chunks the new version names.
    pub chunks: u64,
    /// Of those, chunks rewritten because they were old.
    pub refreshed_chunks: u64,
}

/// Publishes version `to`'s content as the next version of `parcel`. If
/// `to` is HEAD, nothing is published (the summary says so). A version
/// that does not exist, or that gc removed, is refused naming it.
pub async fn rollback(
    parcel: &Parcel,
    to: u64,
    host: &str,
    created_unix: i64,
) -> Result<RollbackSummary, Error> {
    let (from, mut manifest) = parcel.resolve(Some(to)).await?;
    let head = parcel.require_head().await?;
    let mut summary = RollbackSummary {
        from,
        head,
        version: None,
        chunks: 0,
        refreshed_chunks: 0,
    };
    if from == head {
        return Ok(summary);
    }
    let mut ids: Vec<(ChunkId, Image, u64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for image in Image::ALL {
        for (index, e) in image.table(&manifest).iter().enumerate() {
            if let ChunkEntry::Data(k) = e
                && seen.insert(k.id())
            {
                ids.push((k.id(), image, index as u64));
            }
        }
    }
    summary.chunks = ids.len() as u64;
    let refreshed: Vec<bool> = stream::iter(ids)
        .map(|(id, image, index)| keep_young(parcel, id, image, index, from))
        .buffer_unordered(DEFAULT_CONCURRENCY)
        .try_collect()
        .await?;
    summary.refreshed_chunks = refreshed.iter().filter(|&&r| r).count() as u64;

    manifest.parent = Some(head);
    manifest.host = host.to_owned();
    manifest.created_unix = created_unix;
    manifest.writer = None;
    let published = parcel.publish(&manifest, head + 1).await?;
    summary.version = Some(published.version);
    Ok(summary)
}

/// Makes chunk `id` young: true if it had to be fetched and put again.
async fn keep_young(
    parcel: &Parcel,
    id: ChunkId,
    image: Image,
    index: u64,
    version: u64,
) -> Result<bool, Error> {
    let store = parcel.store();
    if store.has_chunk(&id).await? {
        return Ok(false);
    }
    let object = store.get_chunk(&id).await.map_err(|e| Error::BadChunk {
        id,
        image,
        index,
        parcel: parcel.name().to_owned(),
        version,
        fault: match e {
            Error::NotFound { .. } => ChunkFault::Missing,
            e => ChunkFault::Store(Box::new(e)),
        },
    })?;
    store.put_chunk(&id, object).await?;
    Ok(true)
}
