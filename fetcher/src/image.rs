//! Which image of a version a chunk belongs to: the vocabulary the store
//! layer's errors, the transfers and the operations share.

use format::{ChunkEntry, Geometry, Layout, Manifest};

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
