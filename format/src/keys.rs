//! The user's secret and the keys derived from it.
//!
//! Every key is derived with BLAKE3's `derive_key` under its own context
//! string, so no two uses ever share key material:
//! * the **chunk secret** keys a BLAKE3 hash of a chunk's plaintext, giving
//!   the chunk's convergent [`ChunkKey`]: equal plaintexts under one secret
//!   get equal keys (dedup), and without the secret nobody can compute a key
//!   from a guessed plaintext;
//! * a chunk's object name, its [`ChunkId`], derives from its key alone, so
//!   the store learns nothing about the plaintext but its length;
//! * the **manifest key** encrypts manifests;
//! * the **fingerprint** is stored in clear in each manifest so that a wrong
//!   key is told apart from a corrupt manifest;
//! * the **gear table** of the content-defined chunker ([`crate::cdc`]), so
//!   where a memory image is cut reveals nothing without the key.

use std::fmt;

use crate::hex;

const CTX_CHUNK: &str = "isr 2026-11 chunk convergent key v1";
const CTX_CHUNK_ID: &str = "isr 2026-11 chunk object name v1";
const CTX_MANIFEST: &str = "isr 2026-11 manifest encryption key v1";
const CTX_FINGERPRINT: &str = "isr 2026-11 key fingerprint v1";
const CTX_CDC_GEAR: &str = "isr 2026-12 content-defined chunking gear table v1";

/// Length of a key file's secret.
pub const SECRET_LEN: usize = 32;

/// The user's 32-byte secret (the content of the key file).
#[derive(Clone)]
pub struct Secret {
    chunk: [u8; 32],
    manifest: [u8; 32],
    fingerprint: [u8; 16],
    cdc: [u8; 32],
}

impl Secret {
    /// Derives every per-use key from the raw secret.
    pub fn new(raw: &[u8; SECRET_LEN]) -> Self {
        let fp = blake3::derive_key(CTX_FINGERPRINT, raw);
        Secret {
            chunk: blake3::derive_key(CTX_CHUNK, raw),
            manifest: blake3::derive_key(CTX_MANIFEST, raw),
            fingerprint: fp[..16].try_into().expect("16 of 32 bytes"),
            cdc: blake3::derive_key(CTX_CDC_GEAR, raw),
        }
    }

    /// Parses a key file: 32 raw bytes, or 64 hex digits (surrounding white
    /// space ignored).
    pub fn from_key_file_bytes(bytes: &[u8]) -> Option<Self> {
        if let Ok(raw) = <&[u8; SECRET_LEN]>::try_from(bytes) {
            return Some(Self::new(raw));
        }
        let text = std::str::from_utf8(bytes).ok()?.trim();
        hex::decode::<SECRET_LEN>(text).map(|raw| Self::new(&raw))
    }

    /// The convergent key of a chunk's plaintext.
    pub fn chunk_key(&self, plaintext: &[u8]) -> ChunkKey {
        ChunkKey(*blake3::keyed_hash(&self.chunk, plaintext).as_bytes())
    }

    /// The content-defined chunker's gear table: 256 pseudo-random words,
    /// BLAKE3's output stream under a key of its own.
    pub(crate) fn cdc_gear(&self) -> [u64; 256] {
        let mut bytes = [0u8; 256 * 8];
        blake3::Hasher::new_keyed(&self.cdc)
            .finalize_xof()
            .fill(&mut bytes);
        std::array::from_fn(|i| {
            u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        })
    }

    pub(crate) fn manifest_key(&self) -> &[u8; 32] {
        &self.manifest
    }

    pub(crate) fn fingerprint(&self) -> &[u8; 16] {
        &self.fingerprint
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material; the fingerprint is public anyway.
        write!(f, "Secret(fingerprint {})", hex::encode(&self.fingerprint))
    }
}

/// The key that encrypts one chunk; kept only inside encrypted manifests.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub [u8; 32]);

impl ChunkKey {
    /// The name of the chunk's object in the store.
    pub fn id(&self) -> ChunkId {
        ChunkId(blake3::derive_key(CTX_CHUNK_ID, &self.0))
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is secret; show the public name it maps to.
        write!(f, "ChunkKey(of {})", self.id())
    }
}

/// A chunk's public, content-addressed name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Parses the 64 hex digits that [`Display`](fmt::Display) prints.
    pub fn parse(s: &str) -> Option<Self> {
        hex::decode::<32>(s).map(ChunkId)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_convergent_per_secret_and_differ_across_secrets() {
        let a = Secret::new(&[1; 32]);
        let b = Secret::new(&[2; 32]);
        assert_eq!(a.chunk_key(b"hello"), a.chunk_key(b"hello"));
        assert_ne!(a.chunk_key(b"hello"), a.chunk_key(b"hellp"));
        assert_ne!(a.chunk_key(b"hello"), b.chunk_key(b"hello"));
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.manifest_key(), &a.chunk);
    }

    #[test]
    fn key_file_accepts_raw_and_hex() {
        let raw = [0xabu8; 32];
        let from_raw = Secret::from_key_file_bytes(&raw).unwrap();
        let text = format!("{}\n", hex::encode(&raw));
        let from_hex = Secret::from_key_file_bytes(text.as_bytes()).unwrap();
        assert_eq!(from_raw.fingerprint(), from_hex.fingerprint());
        assert!(Secret::from_key_file_bytes(b"short").is_none());
        assert!(Secret::from_key_file_bytes(&[0u8; 33]).is_none());
    }

    #[test]
    fn chunk_id_round_trips_through_hex() {
        let id = Secret::new(&[7; 32]).chunk_key(b"x").id();
        assert_eq!(ChunkId::parse(&id.to_string()), Some(id));
        assert_eq!(ChunkId::parse("zz"), None);
    }
}
