use super::*;
use proptest::prelude::*;

fn secret() -> Secret {
    Secret::new(&[0x42; 32])
}

fn text(len: usize) -> Vec<u8> {
    b"the quick brown fox jumps over the lazy dog; "
        .iter()
        .cycle()
        .take(len)
        .copied()
        .collect()
}

use crate::noise;

fn round_trip(plain: &[u8]) -> EncodedChunk {
    let enc = ChunkEncoder::new(secret(), 1).encode(plain).unwrap();
    let dec = ChunkDecoder::new(secret())
        .decode(&enc.key, &enc.object, plain.len())
        .unwrap();
    assert_eq!(dec, plain);
    assert_eq!(enc.id, enc.key.id());
    enc
}

#[test]
fn compressible_chunks_are_compressed_and_noise_is_stored_raw() {
    let t = round_trip(&text(256 * 1024));
    assert_eq!(t.object[5], CODEC_ZSTD);
    assert!(t.object.len() < 4096);
    let n = round_trip(&noise(256 * 1024, 9));
    assert_eq!(n.object[5], CODEC_RAW);
    assert_eq!(n.object.len(), 256 * 1024 + OVERHEAD);
    round_trip(&[]);
    round_trip(&[7]);
}

#[test]
fn equal_chunks_encode_identically_and_the_name_hides_the_content() {
    let a = round_trip(&text(100_000));
    let b = round_trip(&text(100_000));
    assert_eq!(a.object, b.object);
    assert_eq!(a.id, b.id);
    let other = ChunkEncoder::new(Secret::new(&[1; 32]), 1)
        .encode(&text(100_000))
        .unwrap();
    assert_ne!(a.id, other.id, "names depend on the secret");
    let plain_hash = blake3::hash(&text(100_000));
    assert_ne!(&a.id.0, plain_hash.as_bytes());
}

#[test]
fn every_single_bit_flip_is_rejected() {
    for plain in [text(3000), noise(700, 3)] {
        let enc = ChunkEncoder::new(secret(), 1).encode(&plain).unwrap();
        let mut dec = ChunkDecoder::new(secret());
        let mut object = enc.object.clone();
        for bit in 0..object.len() * 8 {
            object[bit / 8] ^= 1 << (bit % 8);
            let r = dec.decode(&enc.key, &object, plain.len());
            assert!(r.is_err(), "bit {bit} flipped was accepted");
            object[bit / 8] ^= 1 << (bit % 8);
        }
        assert!(dec.decode(&enc.key, &object, plain.len()).is_ok());
    }
}

#[test]
fn truncated_and_extended_objects_are_rejected() {
    let plain = text(5000);
    let enc = ChunkEncoder::new(secret(), 1).encode(&plain).unwrap();
    let mut dec = ChunkDecoder::new(secret());
    for len in 0..enc.object.len() {
        assert!(
            dec.decode(&enc.key, &enc.object[..len], plain.len())
                .is_err()
        );
    }
    let mut longer = enc.object.clone();
    longer.push(0);
    assert!(dec.decode(&enc.key, &longer, plain.len()).is_err());
    assert!(matches!(
        dec.decode(&enc.key, &enc.object[..10], plain.len()),
        Err(Error::Truncated { .. })
    ));
}

#[test]
fn wrong_key_wrong_length_and_oversize_are_named() {
    let plain = text(5000);
    let enc = ChunkEncoder::new(secret(), 1).encode(&plain).unwrap();
    let mut dec = ChunkDecoder::new(secret());
    let other = secret().chunk_key(b"other");
    assert_eq!(
        dec.decode(&other, &enc.object, plain.len()),
        Err(Error::AuthFailed { what: WHAT })
    );
    assert!(matches!(
        dec.decode(&enc.key, &enc.object, 4999),
        Err(Error::Malformed { .. })
    ));
    // A decoder under another secret authenticates the object (the key is in
    // the manifest) but sees the content does not match the key.
    let mut foreign = ChunkDecoder::new(Secret::new(&[9; 32]));
    assert_eq!(
        foreign.decode(&enc.key, &enc.object, plain.len()),
        Err(Error::KeyMismatch)
    );
    let mut huge = enc.object.clone();
    huge[8..12].copy_from_slice(&(MAX_CHUNK_SIZE + 1).to_le_bytes());
    assert!(matches!(
        dec.decode(&enc.key, &huge, plain.len()),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        ChunkEncoder::new(secret(), 1).encode(&vec![1u8; MAX_CHUNK_SIZE as usize + 1]),
        Err(Error::TooLarge { .. })
    ));
}

proptest! {
    #[test]
    fn any_chunk_round_trips(
        len in 0usize..(300 * 1024),
        compressible in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let plain = if compressible { text(len) } else { noise(len, seed) };
        round_trip(&plain);
    }

    /// The decoder's fuzz target: arbitrary bytes never panic and never decode.
    #[test]
    fn arbitrary_objects_never_panic(object in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let key = secret().chunk_key(b"k");
        let mut dec = ChunkDecoder::new(secret());
        prop_assert!(dec.decode(&key, &object, object.len()).is_err());
    }

    /// Mutations of a valid object (bytes overwritten, cut or appended) are
    /// all rejected without panicking.
    #[test]
    fn mutated_objects_are_rejected(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let plain = text(2000);
        let enc = ChunkEncoder::new(secret(), 1).encode(&plain).unwrap();
        let mut object = enc.object.clone();
        for (i, b) in &edits {
            let i = i.index(object.len());
            object[i] = *b;
        }
        if let Some(c) = cut {
            object.truncate(c.index(object.len()));
        }
        let r = ChunkDecoder::new(secret()).decode(&enc.key, &object, plain.len());
        prop_assert_eq!(r.is_ok(), object == enc.object);
    }
}
