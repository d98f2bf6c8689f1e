//! Whole-image operations on a parcel: import an image as a new version,
//! export a version to a file, verify that a version is intact.

mod export;
mod import;

pub use export::{ExportOptions, ExportSummary, VerifyReport, export, export_with, verify};
pub use import::{ImportOptions, ImportSummary, import};

use std::collections::HashMap;

use format::{ChunkEntry, ChunkKey, Manifest};

/// Requests in flight to the store during a transfer: enough to hide the
/// latency of a distant store without flooding a near one.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// The manifest's distinct stored chunks, each with the disk chunks that hold
/// it, in disk order: a transfer moves every distinct chunk once.
pub(crate) fn distinct_chunks(manifest: &Manifest) -> Vec<(ChunkKey, Vec<u64>)> {
    let mut order = Vec::new();
    let mut at: HashMap<ChunkKey, usize> = HashMap::new();
    for (index, entry) in manifest.chunks.iter().enumerate() {
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
