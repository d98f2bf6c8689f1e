//! Sync: upload dirty chunks while the device keeps serving, without
//! publishing a version, so that the next publish (suspend, checkin) only
//! uploads what changed since.
//!
//! The cache remembers which generation of each dirty chunk the store holds
//! already, in `<cache>/synced`:
//!
//! ```text
//! "ISRy" u32 format | u64 base version | u64 count | count × (u64 chunk, u64 map entry, u8 kind, [u8; 32] key)
//! ```
//!
//! A record counts only while the chunk's map entry (state and generation)
//! is the one recorded: every write bumps the generation, so a chunk written
//! again after its sync simply uploads again. Records belong to one base
//! version; a publish clears them. Losing the file costs uploads, never
//! data: it is a hint, written atomically (temporary file, fsync, rename)
//! after each sync and at intervals during a long one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use format::{ChunkEntry, ChunkKey};
use futures::{StreamExt, stream};

use crate::engine::{Engine, Shared};
use crate::local::cache::{Cache, DIRTY};
use crate::transfer::DEFAULT_CONCURRENCY;
use crate::{Error, Progress};

const MAGIC: &[u8; 4] = b"ISRy";
const FORMAT: u32 = 1;
const RECORD_LEN: usize = 8 + 8 + 1 + 32;
/// The record's file in the cache directory.
pub(in crate::engine) const SYNCED: &str = "synced";
/// How often a long sync saves what it has done so far.
const CHECKPOINT: Duration = Duration::from_secs(2);

/// Which generations of dirty chunks the store already holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SyncRecord {
    /// The base version the records belong to.
    pub(crate) base_version: u64,
    /// Chunk → (its map entry when it was uploaded, its table entry).
    pub(crate) chunks: HashMap<u64, (u64, ChunkEntry)>,
}

impl SyncRecord {
    pub(crate) fn path(cache_dir: &Path) -> PathBuf {
        cache_dir.join(SYNCED)
    }

    /// Loads the record of `base_version` (an empty one if the file is
    /// missing, damaged or of another base: it is only a hint).
    pub(crate) fn load(cache_dir: &Path, base_version: u64) -> SyncRecord {
        let empty = SyncRecord {
            base_version,
            chunks: HashMap::new(),
        };
        let Ok(bytes) = std::fs::read(Self::path(cache_dir)) else {
            return empty;
        };
        match Self::decode(&bytes) {
            Some(r) if r.base_version == base_version => r,
            _ => empty,
        }
    }

    fn decode(b: &[u8]) -> Option<SyncRecord> {
        if b.len() < 24 || &b[0..4] != MAGIC {
            return None;
        }
        if u32::from_le_bytes(b[4..8].try_into().ok()?) != FORMAT {
            return None;
        }
        let base_version = u64::from_le_bytes(b[8..16].try_into().ok()?);
        let count = u64::from_le_bytes(b[16..24].try_into().ok()?) as usize;
        let body = &b[24..];
        if body.len() != count.checked_mul(RECORD_LEN)? {
            return None;
        }
        let mut chunks = HashMap::with_capacity(count);
        for r in body.chunks_exact(RECORD_LEN) {
            let c = u64::from_le_bytes(r[0..8].try_into().ok()?);
            let entry = u64::from_le_bytes(r[8..16].try_into().ok()?);
            let table = match r[16] {
                0 => ChunkEntry::Zero,
                1 => ChunkEntry::Data(ChunkKey(r[17..49].try_into().ok()?)),
                _ => return None,
            };
            chunks.insert(c, (entry, table));
        }
        Some(SyncRecord {
            base_version,
            chunks,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + self.chunks.len() * RECORD_LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT.to_le_bytes());
        b.extend_from_slice(&self.base_version.to_le_bytes());
        b.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        let mut sorted: Vec<_> = self.chunks.iter().collect();
        sorted.sort_by_key(|(c, _)| **c);
        for (c, (entry, table)) in sorted {
            b.extend_from_slice(&c.to_le_bytes());
            b.extend_from_slice(&entry.to_le_bytes());
            match table {
                ChunkEntry::Zero => b.extend_from_slice(&[0; 33]),
                ChunkEntry::Data(k) => {
                    b.push(1);
                    b.extend_from_slice(&k.0);
                }
            }
        }
        b
    }

    /// Writes the record atomically; an empty one removes the file. The
    /// map is made durable first: a record must never name a map entry
    /// that a host crash can take back (the chunk's generation would then
    /// come round again for other data, and the record would vouch for it).
    pub(crate) fn save(&self, cache: &Cache) -> Result<(), Error> {
        if self.chunks.is_empty() {
            return cache.remove_file(SYNCED).map(|_| ());
        }
        cache.sync_state()?;
        cache.point("sync: map durable, record next");
        cache.replace_file(SYNCED, &self.encode())
    }

    /// The table entry recorded for chunk `c`, if the store holds the
    /// generation the map has now (`entry`).
    pub(crate) fn current(&self, c: u64, entry: u64) -> Option<ChunkEntry> {
        match self.chunks.get(&c) {
            Some(&(e, table)) if e == entry => Some(table),
            _ => None,
        }
    }
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncSummary {
    /// Dirty chunks when it started.
    pub dirty_chunks: u64,
    /// Of those, chunks an earlier sync had uploaded already (unchanged since).
    pub already_synced: u64,
    /// Chunks this sync recorded as held by the store (uploaded, found
    /// there already, or all zero).
    pub synced_chunks: u64,
    /// Chunk objects uploaded.
    pub uploaded_chunks: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// It stopped early because it was asked to (the device became busy).
    pub interrupted: bool,
    /// Wall time.
    pub seconds: f64,
}

impl Engine {
    /// Uploads every dirty chunk the store does not hold in its current
    /// generation, while the device keeps serving, and records them (see the
    /// module docs); publishes nothing. `progress` counts plaintext bytes of
    /// the chunks to do; `stop` is checked before each chunk (trickle stops
    /// when the device gets busy). On a failure (the store went away), what
    /// was uploaded so far stays recorded, and the error is returned.
    pub fn sync(&self, progress: Progress, stop: &AtomicBool) -> Result<SyncSummary, Error> {
        let shared = self.shared.clone();
        let started = Instant::now();
        let mut summary = self.block_on(sync(shared, progress, stop))??;
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }

    /// Dirty chunks whose current generation the store holds already.
    pub fn synced_chunks(&self) -> u64 {
        let s = &self.shared;
        let record = s.synced.lock().expect("synced lock");
        record
            .chunks
            .iter()
            .filter(|&(&c, &(e, _))| s.cache.entry(c) == e)
            .count() as u64
    }

    /// Dirty chunks (and their plaintext bytes) that a publish would still
    /// have to upload.
    pub fn unsynced(&self) -> (u64, u64) {
        let s = &self.shared;
        let record = s.synced.lock().expect("synced lock");
        let mut n = (0, 0);
        for c in s.cache.chunks_in(DIRTY) {
            if record.current(c, s.cache.entry(c)).is_none() {
                n.0 += 1;
                n.1 += s.geometry.chunk_len(c) as u64;
            }
        }
        n
    }
}

async fn sync(
    shared: Arc<Shared>,
    progress: Progress,
    stop: &AtomicBool,
) -> Result<SyncSummary, Error> {
    // One upload pass at a time: a publish and a sync must not interleave
    // their records.
    let _pass = shared.upload_pass.lock().await;
    let base_version = shared.base_version();
    let dirty = shared.cache.chunks_in(DIRTY);
    let mut summary = SyncSummary {
        dirty_chunks: dirty.len() as u64,
        ..Default::default()
    };
    let todo: Vec<u64> = {
        let record = shared.synced.lock().expect("synced lock");
        dirty
            .into_iter()
            .filter(|&c| record.current(c, shared.cache.entry(c)).is_none())
            .collect()
    };
    summary.already_synced = summary.dirty_chunks - todo.len() as u64;
    shared.start_pass(&todo);
    let mut uploads = stream::iter(todo)
        .take_while(|_| std::future::ready(!stop.load(Ordering::Relaxed)))
        .map(|c| crate::engine::upload::publish::upload_chunk(shared.clone(), c))
        .buffer_unordered(DEFAULT_CONCURRENCY);
    let mut failure = None;
    let mut saved_at = Instant::now();
    while let Some(done) = uploads.next().await {
        match done {
            Ok(u) => {
                shared.pass_did(u.chunk);
                progress(shared.geometry.chunk_len(u.chunk) as u64);
                summary.synced_chunks += 1;
                if let Some(size) = u.sent {
                    summary.uploaded_chunks += 1;
                    summary.bytes_uploaded += size;
                }
                let mut record = shared.synced.lock().expect("synced lock");
                if record.base_version == base_version
                    && let Some(entry) = u.map_entry
                {
                    record.chunks.insert(u.chunk, (entry, u.table_entry));
                }
                if saved_at.elapsed() >= CHECKPOINT {
                    // A checkpoint failing costs only uploads later.
                    let _ = record.save(&shared.cache);
                    saved_at = Instant::now();
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(uploads);
    summary.interrupted = stop.load(Ordering::Relaxed);
    // Entries that no longer match anything are dropped as the record is
    // saved: a chunk published or written again since.
    let record = {
        let mut record = shared.synced.lock().expect("synced lock");
        record
            .chunks
            .retain(|&c, &mut (e, _)| shared.cache.entry(c) == e);
        record.clone()
    };
    let saved = record.save(&shared.cache);
    match failure {
        Some(e) => Err(e),
        None => saved.map(|()| summary),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("c");
        let header = crate::local::cache::tests::header_of(4);
        let cache =
            Cache::create(Cache::lock(&d).unwrap(), &d, header, b"m", &[false; 10]).unwrap();
        let mut r = SyncRecord {
            base_version: 4,
            chunks: HashMap::new(),
        };
        r.chunks.insert(7, (9, ChunkEntry::Data(ChunkKey([3; 32]))));
        r.chunks.insert(2, (5, ChunkEntry::Zero));
        r.save(&cache).unwrap();
        assert_eq!(SyncRecord::load(&d, 4), r);
        assert_eq!(r.current(7, 9), Some(ChunkEntry::Data(ChunkKey([3; 32]))));
        assert_eq!(r.current(7, 13), None, "written again since");
        assert!(SyncRecord::load(&d, 5).chunks.is_empty(), "other base");
        let path = SyncRecord::path(&d);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&path, &bytes).unwrap();
        assert!(SyncRecord::load(&d, 4).chunks.is_empty());
        SyncRecord {
            base_version: 4,
            chunks: HashMap::new(),
        }
        .save(&cache)
        .unwrap();
        assert!(!path.exists(), "an empty record removes the file");
    }
}
