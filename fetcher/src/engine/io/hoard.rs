//! Filling a cache for offline use: re-hash what it holds against the
//! manifest (dropping damaged chunks), then fetch everything else.

use std::time::Duration;

use format::ChunkEntry;

use crate::Error;
use crate::engine::{Engine, EngineStats, repair::reconcile};
use crate::local::cache::{self, PRESENT};

impl Engine {
    /// Re-hashes every chunk the cache holds as present against the base
    /// manifest (in parallel; holes are not read); those that do not match
    /// are damaged: dropped, to be fetched again. `hoard` runs this first,
    /// so that a cache prepared for offline use is one that can be trusted.
    /// Returns (chunks hashed, chunks dropped). Must not run while a device
    /// writes (hoard has none).
    pub fn verify_cached(&self, progress: crate::Progress) -> Result<(u64, Vec<u64>), Error> {
        let s = &self.shared;
        let base = s.base();
        let present = s.cache.chunks_in(PRESENT);
        let found = reconcile::present_mismatches(
            &s.parcel,
            &s.cache,
            &base.manifest,
            &present,
            &*progress,
        )?;
        for &c in &found.mismatched {
            // Under the stripe lock: no fetch fills the chunk between its
            // durable absent mark and the hole.
            let _g = s.stripe(c);
            if cache::state_of(s.cache.entry(c)) == PRESENT {
                s.cache.point("verify_cached: dropping");
                s.cache.drop_chunks(&[c])?;
            }
        }
        // The prefetch may have passed these chunks while they looked
        // present: ask for them now.
        for &c in &found.mismatched {
            let _ = s.demand(c, None);
        }
        Ok((found.hashed, found.mismatched))
    }

    /// Fetches every chunk not yet cached (prefetch on, waiting until done).
    /// Returns the first permanent failure, if a chunk cannot be fetched.
    pub fn hoard(&self, progress: crate::Progress) -> Result<EngineStats, Error> {
        let s = &self.shared;
        self.set_prefetch(true);
        // A hoard wants everything now: no slow start (on a 1 Gbit/s link
        // 40 ms away the ramp from 4 cost a tenth of the throughput).
        let _ = s.demand_tx.send(crate::engine::io::fetch::OPEN_WINDOW);
        let mut reported = 0u64;
        let (lock, cv) = &s.progress;
        let mut seen = lock.lock().expect("progress lock");
        loop {
            let cached_bytes: u64 = (0..s.geometry.chunk_count())
                .filter(|&c| self.is_cached(c))
                .map(|c| s.geometry.chunk_len(c) as u64)
                .sum();
            progress(cached_bytes.saturating_sub(reported));
            reported = reported.max(cached_bytes);
            let failed = s.failed.lock().expect("failed lock");
            let base = s.base();
            let waiting = (0..s.geometry.chunk_count())
                .filter(|&c| !self.is_cached(c))
                .filter(|&c| match base.entry(c) {
                    ChunkEntry::Data(k) => !failed.contains_key(&k),
                    ChunkEntry::Zero => true,
                })
                .count();
            if waiting == 0 {
                if let Some(e) = failed.values().next() {
                    return Err(Error::Shared(e.clone()));
                }
                return Ok(self.stats());
            }
            drop(failed);
            seen = cv
                .wait_timeout(seen, Duration::from_millis(500))
                .expect("progress lock")
                .0;
        }
    }
}
