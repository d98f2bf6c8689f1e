//! The chunk pipeline that whole-image operations and the engine share:
//! encoding and uploading with dedup and freshness ([`upload`]), the
//! concurrency of transfers, their rates ([`meter`]).

pub mod meter;
pub mod upload;

use std::collections::HashMap;

use format::{ChunkEntry, ChunkKey};

/// Requests in flight to the store during a transfer: enough to hide the
/// latency of a distant store without flooding a near one.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// A chunk table's distinct stored chunks, each with the indices that hold
/// it, in order: a transfer moves every distinct chunk once.
pub(crate) fn distinct_chunks(table: &[ChunkEntry]) -> Vec<(ChunkKey, Vec<u64>)> {
    let mut order = Vec::new();
    let mut at: HashMap<ChunkKey, usize> = HashMap::new();
    for (index, entry) in table.iter().enumerate() {
        if let ChunkEntry::Data(key) = entry {
            let slot = *at.entry(*key).or_insert_with(|| {
                order.push((*key, Vec::new()));
                order.len() - 1
            });
            order[slot].1.push(index as u64);
        }
    }
    order
}
