//! The chunk codec: plaintext → zstd (kept raw when that saves nothing) →
//! AES-256-GCM under the chunk's convergent key → one store object.
//!
//! Object layout (version 1), all integers little-endian:
//!
//! ```text
//!  0   4  magic "ISRc"
//!  4   1  format version (1)
//!  5   1  codec: 0 = raw, 1 = zstd
//!  6   2  reserved, zero
//!  8   4  plaintext length
//! 12  12  nonce = first 12 bytes of keyed_hash(key, body)
//! 24   n  AES-256-GCM ciphertext of the body (raw or zstd frame)
//! 24+n 16 GCM tag; the 24 header bytes are its associated data
//! ```
//!
//! The nonce is derived from the body rather than fixed, so even if another
//! zstd build compressed the same plaintext differently, one key would never
//! encrypt two different bodies under one nonce. The encoding is
//! deterministic, so equal chunks give byte-identical objects.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};

use crate::{ChunkId, ChunkKey, Error, MAX_CHUNK_SIZE, Secret};

const MAGIC: &[u8; 4] = b"ISRc";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes an encoded chunk adds to its body.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
const WHAT: &str = "chunk object";

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// One encoded chunk, ready to upload.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    /// The key that decrypts it (goes into the manifest).
    pub key: ChunkKey,
    /// The object name (derived from the key).
    pub id: ChunkId,
    /// The object's bytes.
    pub object: Vec<u8>,
}

/// Encodes chunks; keeps a zstd context to reuse across calls (one per thread).
pub struct ChunkEncoder {
    secret: Secret,
    zstd: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for ChunkEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkEncoder").finish_non_exhaustive()
    }
}

impl ChunkEncoder {
    /// An encoder compressing at zstd `level` (1 is fast and usually enough).
    pub fn new(secret: Secret, level: i32) -> Self {
        let zstd = zstd::bulk::Compressor::new(level).expect("zstd level within range");
        ChunkEncoder { secret, zstd }
    }

    /// Encodes one chunk. Fails only for a chunk larger than [`MAX_CHUNK_SIZE`].
    pub fn encode(&mut self, plaintext: &[u8]) -> Result<EncodedChunk, Error> {
        if plaintext.len() > MAX_CHUNK_SIZE as usize {
            return Err(Error::TooLarge {
                what: "chunk",
                size: plaintext.len() as u64,
                limit: MAX_CHUNK_SIZE as u64,
            });
        }
        let key = self.secret.chunk_key(plaintext);
        // Compress straight after the header; keep it only if it is smaller.
        let bound = zstd::zstd_safe::compress_bound(plaintext.len());
        let mut object = vec![0u8; HEADER_LEN + bound.max(plaintext.len()) + TAG_LEN];
        let codec = match self
            .zstd
            .compress_to_buffer(plaintext, &mut object[HEADER_LEN..])
        {
            Ok(n) if n < plaintext.len() => {
                object.truncate(HEADER_LEN + n);
                CODEC_ZSTD
            }
            _ => {
                object.truncate(HEADER_LEN + plaintext.len());
                object[HEADER_LEN..].copy_from_slice(plaintext);
                CODEC_RAW
            }
        };
        let (header, body) = object.split_at_mut(HEADER_LEN);
        let nonce: [u8; 12] = blake3::keyed_hash(&key.0, body).as_bytes()[..12]
            .try_into()
            .expect("12 of 32 bytes");
        header[0..4].copy_from_slice(MAGIC);
        header[4] = VERSION;
        header[5] = codec;
        header[8..12].copy_from_slice(&(plaintext.len() as u32).to_le_bytes());
        header[12..24].copy_from_slice(&nonce);
        let tag = cipher(&key)
            .encrypt_inout_detached(&Nonce::from(nonce), header, body.into())
            .expect("AES-GCM encrypts any chunk-sized message");
        object.extend_from_slice(&tag);
        Ok(EncodedChunk {
            id: key.id(),
            key,
            object,
        })
    }
}

/// Decodes chunk objects; keeps a zstd context to reuse across calls.
pub struct ChunkDecoder {
    secret: Secret,
    zstd: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for ChunkDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkDecoder").finish_non_exhaustive()
    }
}

impl ChunkDecoder {
    /// A decoder for chunks written under `secret`.
    pub fn new(secret: Secret) -> Self {
        let zstd = zstd::bulk::Decompressor::new().expect("zstd decompression context");
        ChunkDecoder { secret, zstd }
    }

    /// Authenticates, decrypts and decompresses `object`, then checks that the
    /// plaintext hashes back to `key` and is exactly `expected_len` bytes.
    pub fn decode(
        &mut self,
        key: &ChunkKey,
        object: &[u8],
        expected_len: usize,
    ) -> Result<Vec<u8>, Error> {
        let mut out = vec![0u8; expected_len.min(MAX_CHUNK_SIZE as usize)];
        self.decode_into(key, object, &mut out)?;
        Ok(out)
    }

    /// Like [`decode`](Self::decode), into `out`, whose length is the expected
    /// plaintext length.
    pub fn decode_into(
        &mut self,
        key: &ChunkKey,
        object: &[u8],
        out: &mut [u8],
    ) -> Result<(), Error> {
        let header = parse_header(object)?;
        if header.plain_len != out.len() {
            return Err(Error::malformed(
                WHAT,
                format!(
                    "holds {} bytes where the manifest expects {}",
                    header.plain_len,
                    out.len()
                ),
            ));
        }
        let (aad, rest) = object.split_at(HEADER_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut body = ciphertext.to_vec();
        cipher(key)
            .decrypt_inout_detached(
                &Nonce::from(header.nonce),
                aad,
                body.as_mut_slice().into(),
                &Tag::try_from(tag).expect("16-byte tag"),
            )
            .map_err(|_| Error::AuthFailed { what: WHAT })?;
        match header.codec {
            CODEC_RAW => out.copy_from_slice(&body),
            _ => {
                let n = self
                    .zstd
                    .decompress_to_buffer(&body, out)
                    .map_err(|e| Error::malformed(WHAT, format!("zstd: {e}")))?;
                if n != out.len() {
                    return Err(Error::malformed(
                        WHAT,
                        format!("decompressed to {n} bytes, header says {}", out.len()),
                    ));
                }
            }
        }
        if self.secret.chunk_key(out) != *key {
            return Err(Error::KeyMismatch);
        }
        Ok(())
    }
}

struct Header {
    codec: u8,
    plain_len: usize,
    nonce: [u8; 12],
}

fn parse_header(object: &[u8]) -> Result<Header, Error> {
    if object.len() < OVERHEAD {
        return Err(Error::Truncated {
            what: WHAT,
            need: OVERHEAD as u64,
            have: object.len() as u64,
        });
    }
    if &object[0..4] != MAGIC {
        return Err(Error::BadMagic { what: WHAT });
    }
    if object[4] != VERSION {
        return Err(Error::UnsupportedVersion {
            what: WHAT,
            found: object[4] as u32,
            supported: VERSION as u32,
        });
    }
    let codec = object[5];
    if codec > CODEC_ZSTD || object[6..8] != [0, 0] {
        return Err(Error::malformed(WHAT, format!("unknown codec {codec}")));
    }
    let plain_len = u32::from_le_bytes(object[8..12].try_into().expect("4 bytes"));
    if plain_len > MAX_CHUNK_SIZE {
        return Err(Error::TooLarge {
            what: "chunk plaintext",
            size: plain_len as u64,
            limit: MAX_CHUNK_SIZE as u64,
        });
    }
    let body_len = object.len() - OVERHEAD;
    let plain_len = plain_len as usize;
    // Raw bodies are exactly the plaintext; zstd is used only when smaller.
    let consistent = match codec {
        CODEC_RAW => body_len == plain_len,
        _ => body_len < plain_len,
    };
    if !consistent {
        return Err(Error::malformed(
            WHAT,
            format!("body of {body_len} bytes for {plain_len} bytes of plaintext"),
        ));
    }
    Ok(Header {
        codec,
        plain_len,
        nonce: object[12..24].try_into().expect("12 bytes"),
    })
}

fn cipher(key: &ChunkKey) -> Aes256Gcm {
    Aes256Gcm::new(&Key::<Aes256Gcm>::from(key.0))
}

#[cfg(test)]
mod tests;
