//! isr's on-store formats, as pure code: no I/O, no async, no `unsafe`.
//!
//! ```text
//!   Secret (32 bytes, the user's key file)
//!     │ derive_key
//!     ├──► chunk secret ──keyed_hash(plaintext)──► ChunkKey ──derive──► ChunkId (object name)
//!     ├──► manifest key (AES-256-GCM, random nonce)
//!     └──► key fingerprint (tells "wrong key" from "corrupt manifest")
//!
//!   disk image ──Geometry──► chunks ──chunk::ChunkEncoder──► chunk objects (store)
//!                                    └─ keys ──────────────► Manifest (one per version)
//! ```
//!
//! * [`chunk`]: the chunk codec (zstd, then AES-256-GCM under a convergent key).
//! * [`manifest`]: one encrypted, authenticated object per parcel version.
//! * [`keys`]: the user's secret and everything derived from it.
//! * [`geometry`]: which chunks, and which bytes of them, an I/O touches.
//! * [`cdc`]: content-defined chunking of memory images, and the layout of
//!   an image whose chunks differ in length.
#![forbid(unsafe_code)]

pub mod cdc;
pub mod chunk;
mod error;
pub mod geometry;
mod hex;
pub mod keys;
pub mod manifest;
mod wire;

pub use cdc::{Chunker, Layout};
pub use error::Error;
pub use geometry::Geometry;
pub use keys::{ChunkId, ChunkKey, Secret};
pub use manifest::{ChunkEntry, Manifest, RamImage, SaveFormat, VmSettings};

/// Smallest chunk size a parcel may use.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size a parcel may use; also the cap on any decoded chunk.
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Chunk size of a new parcel unless the user chooses another.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Most chunks one disk (or memory image) may have: bounds what a manifest
/// decoder allocates (2^24 chunks is 4 TiB at 256 KiB chunks, 64 TiB at 4 MiB).
pub const MAX_CHUNKS: u64 = 1 << 24;

/// Whether every byte of `buf` is zero (all-zero chunks are never stored).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let wide_zero = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16-byte chunk")) == 0);
    wide_zero && words.remainder().iter().all(|&b| b == 0)
}

/// `len` deterministic pseudo-random bytes (xorshift64) for seed `seed`:
/// incompressible data for the tests and benchmarks of every crate (never
/// for keys or nonces).
#[doc(hidden)]
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_sees_every_byte() {
        for len in [0usize, 1, 15, 16, 17, 4096, 4099] {
            let mut buf = vec![0u8; len];
            assert!(is_zero(&buf));
            for i in 0..len {
                buf[i] = 1;
                assert!(!is_zero(&buf), "len {len} byte {i}");
                buf[i] = 0;
            }
        }
    }
}
