//! Whole-image operations on a parcel: import an image as a new version,
//! export a version to a file, verify that a version is intact; and the
//! operations on versions: list a store's parcels, roll a parcel back,
//! collect garbage.

mod export;
pub mod gc;
mod import;
mod listing;
mod rollback;

pub use export::{
    ExportOptions, ExportSummary, VerifyReport, export, export_image, export_with, verify,
};
pub use gc::{GcOptions, GcPhase, GcProgress, GcReport, ParcelGc, gc};
pub use import::{ImageUpload, ImportOptions, ImportSummary, check_import, import, upload_memory};
pub use listing::{HeadInfo, ParcelListing, list_parcels};
pub use rollback::{RollbackSummary, rollback};

use std::collections::HashMap;

use format::{ChunkEntry, ChunkKey, Geometry, Layout, Manifest};

/// Which image of a version: the disk, the VM's memory image, or its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// The disk.
    Disk,
    /// The VM's saved memory and device state (the device state alone when
    /// the version has a RAM image).
    Memory,
    /// The VM's RAM as an image of its own ([`Manifest::ram`]).
    Ram,
}

impl Image {
    /// Every image a version may have.
    pub const ALL: [Image; 3] = [Image::Disk, Image::Memory, Image::Ram];

    /// The image's chunk table in `manifest` (empty if it has none).
    pub fn table(self, manifest: &Manifest) -> &[ChunkEntry] {
        match self {
            Image::Disk => &manifest.chunks,
            Image::Memory => &manifest.memory_chunks,
            Image::Ram => manifest.ram.as_ref().map_or(&[], |r| &r.chunks),
        }
    }

    /// Where the image's chunks lie in `manifest` (size 0: none).
    pub fn layout(self, manifest: &Manifest) -> Layout {
        match self {
            Image::Disk => Layout::Fixed(manifest.geometry()),
            Image::Memory => manifest.memory_layout(),
            Image::Ram => Layout::Fixed(
                Geometry::new(
                    manifest.ram.as_ref().map_or(0, |r| r.size),
                    manifest.chunk_size,
                )
                .expect("validated when built or decoded"),
            ),
        }
    }

    /// Every chunk entry of every image of `manifest`: what the version
    /// needs the store to keep.
    pub fn all_entries(manifest: &Manifest) -> impl Iterator<Item = &ChunkEntry> {
        Image::ALL.into_iter().flat_map(|i| i.table(manifest))
    }
}

impl std::fmt::Display for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Image::Disk => "disk",
            Image::Memory => "memory image",
            Image::Ram => "RAM image",
        })
    }
}

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
