use super::*;
use proptest::prelude::*;

fn secret() -> Secret {
    Secret::new(&[0x24; 32])
}

fn key(n: u64) -> ChunkKey {
    secret().chunk_key(&n.to_le_bytes())
}

fn sample() -> Manifest {
    let g = Geometry::new(10 * 65536 + 4096, 65536).unwrap();
    let mut m = Manifest::empty(g);
    m.chunks[0] = ChunkEntry::Data(key(0));
    m.chunks[1] = ChunkEntry::Data(key(1));
    m.chunks[5] = ChunkEntry::Data(key(0));
    m.chunks[10] = ChunkEntry::Data(key(10));
    m.parent = Some(3);
    m.created_unix = 1_795_000_000;
    m.host = "host-a".into();
    m.access_trace = vec![5, 0, 10, 1];
    m
}

#[test]
fn round_trip_binds_parcel_and_version() {
    let m = sample();
    let obj = m.encode(&secret(), "vm1", 4).unwrap();
    assert_eq!(Manifest::decode(&obj, &secret(), "vm1", 4).unwrap(), m);
    assert_eq!(
        Manifest::decode(&obj, &secret(), "vm1", 5),
        Err(Error::AuthFailed { what: WHAT })
    );
    assert_eq!(
        Manifest::decode(&obj, &secret(), "vm2", 4),
        Err(Error::AuthFailed { what: WHAT })
    );
}

#[test]
fn wrong_key_is_told_apart_from_corruption() {
    let obj = sample().encode(&secret(), "vm1", 4).unwrap();
    assert_eq!(
        Manifest::decode(&obj, &Secret::new(&[1; 32]), "vm1", 4),
        Err(Error::WrongKey { what: WHAT })
    );
    let mut bad = obj.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(
        Manifest::decode(&bad, &secret(), "vm1", 4),
        Err(Error::AuthFailed { what: WHAT })
    );
}

#[test]
fn sparse_disks_have_tiny_manifests() {
    let g = Geometry::new(64 << 30, 256 * 1024).unwrap();
    let mut m = Manifest::empty(g);
    let empty = m.encode(&secret(), "big", 1).unwrap();
    assert!(empty.len() < 100, "{} bytes", empty.len());
    // 100 scattered data chunks: ~32 bytes each plus run headers.
    for i in 0..100 {
        m.chunks[i * 2000] = ChunkEntry::Data(key(i as u64));
    }
    let scattered = m.encode(&secret(), "big", 1).unwrap();
    assert!(
        scattered.len() < 100 * 32 + 600,
        "{} bytes",
        scattered.len()
    );
    assert_eq!(
        Manifest::decode(&scattered, &secret(), "big", 1).unwrap(),
        m
    );
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let mut obj = sample().encode(&secret(), "vm1", 4).unwrap();
    for bit in 0..obj.len() * 8 {
        obj[bit / 8] ^= 1 << (bit % 8);
        assert!(
            Manifest::decode(&obj, &secret(), "vm1", 4).is_err(),
            "bit {bit} flipped was accepted"
        );
        obj[bit / 8] ^= 1 << (bit % 8);
    }
    assert!(Manifest::decode(&obj, &secret(), "vm1", 4).is_ok());
}

#[test]
fn truncated_extended_and_oversized_objects_are_rejected() {
    let obj = sample().encode(&secret(), "vm1", 4).unwrap();
    for len in 0..obj.len() {
        assert!(Manifest::decode(&obj[..len], &secret(), "vm1", 4).is_err());
    }
    let mut longer = obj.clone();
    longer.push(0);
    assert!(Manifest::decode(&longer, &secret(), "vm1", 4).is_err());
    let huge = vec![0u8; MAX_MANIFEST_BYTES as usize + 1];
    assert!(matches!(
        Manifest::decode(&huge, &secret(), "vm1", 4),
        Err(Error::TooLarge { .. })
    ));
    let mut newer = obj.clone();
    newer[4] = 2;
    assert!(matches!(
        Manifest::decode(&newer, &secret(), "vm1", 4),
        Err(Error::UnsupportedVersion { found: 2, .. })
    ));
}

#[test]
fn encode_refuses_inconsistent_manifests() {
    let mut m = sample();
    m.chunks.pop();
    assert!(m.encode(&secret(), "vm1", 1).is_err());
    let mut m = sample();
    m.access_trace.push(11);
    assert!(m.encode(&secret(), "vm1", 1).is_err());
    let mut m = sample();
    m.host = "h".repeat(256);
    assert!(m.encode(&secret(), "vm1", 1).is_err());
    let mut m = sample();
    m.memory_size = 1;
    assert!(m.encode(&secret(), "vm1", 1).is_err());
}

#[test]
fn optional_extensions_are_skipped_and_required_ones_refused() {
    let m = sample();
    let mut body = m.encode_body();
    assert_eq!(body.pop(), Some(0), "version 1 writes no extensions");
    let with_ext = |tag: u8| {
        let mut b = body.clone();
        b.extend_from_slice(&[1, tag, 3, 0xaa, 0xbb, 0xcc]);
        b
    };
    assert_eq!(decode_body(&with_ext(6)).unwrap(), m);
    assert!(matches!(
        decode_body(&with_ext(2)),
        Err(Error::Malformed { .. })
    ));
    let mut w = m.clone();
    w.writer = Some([7; 16]);
    let obj = w.encode(&secret(), "vm1", 4).unwrap();
    assert_eq!(Manifest::decode(&obj, &secret(), "vm1", 4).unwrap(), w);
    assert_eq!(
        decode_body(&with_ext(3)),
        Err(Error::UnsupportedFeature {
            what: WHAT,
            feature: 3
        })
    );
}

/// A version-1 manifest as written when the format was defined: every later
/// isr must keep reading it (the compatibility policy).
#[test]
fn reads_the_version_1_golden_object() {
    if std::env::var_os("ISR_WRITE_GOLDEN").is_some() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/manifest/manifest-v1.golden"
        );
        std::fs::write(path, sample().encode(&secret(), "vm1", 4).unwrap()).unwrap();
    }
    let golden = include_bytes!("manifest-v1.golden");
    let m = Manifest::decode(golden, &secret(), "vm1", 4).unwrap();
    assert_eq!(m, sample());
}

fn arb_entries(max: usize) -> impl Strategy<Value = Vec<ChunkEntry>> {
    proptest::collection::vec(
        prop_oneof![
            3 => Just(ChunkEntry::Zero),
            1 => (0u64..50).prop_map(|n| ChunkEntry::Data(key(n))),
        ],
        0..max,
    )
}

proptest! {
    #[test]
    fn any_manifest_round_trips(
        chunks in arb_entries(300),
        tail in 0u64..65536,
        memory in arb_entries(20),
        memory_cut in proptest::option::of(proptest::collection::vec(1u32..=65536, 20)),
        trace in proptest::collection::vec(any::<prop::sample::Index>(), 0..50),
        parent in proptest::option::of(1u64..1000),
        created in any::<i64>(),
        host in "[a-z0-9.-]{0,40}",
        version in 1u64..1_000_000,
        writer in proptest::option::of(any::<[u8; 16]>()),
        vm in proptest::option::of((any::<u32>(), any::<u32>(), 0u8..3,
            proptest::collection::vec(".{0,20}", 0..8))),
        ram in proptest::option::of((arb_entries(40), proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
            proptest::option::of(any::<[u8; 16]>()))),
    ) {
        let cs = 65536u64;
        let disk_size = match chunks.len() as u64 {
            0 => 0,
            n => (n - 1) * cs + tail.max(1),
        };
        let access_trace = if chunks.is_empty() {
            vec![]
        } else {
            // First touches: each chunk at most once.
            let mut seen = std::collections::HashSet::new();
            trace
                .iter()
                .map(|i| i.index(chunks.len()) as u64)
                .filter(|c| seen.insert(*c))
                .collect()
        };
        let m = Manifest {
            disk_size,
            chunk_size: cs as u32,
            chunks,
            memory_size: match &memory_cut {
                Some(l) => l[..memory.len()].iter().map(|&l| l as u64).sum(),
                None => memory.len() as u64 * cs,
            },
            memory_lengths: memory_cut.map_or(Vec::new(), |l| l[..memory.len()].to_vec()),
            memory_chunks: memory,
            parent,
            created_unix: created,
            host,
            access_trace,
            writer,
            vm: vm.map(|(memory_mib, cpus, format, args)| VmSettings {
                memory_mib,
                cpus,
                save_format: match format {
                    0 => SaveFormat::Stream,
                    1 => SaveFormat::MappedRam,
                    _ => SaveFormat::SharedRam,
                },
                args,
            }),
            ram: ram.map(|(chunks, trace, writer)| {
                let mut seen = std::collections::HashSet::new();
                let access_trace = if chunks.is_empty() {
                    vec![]
                } else {
                    trace
                        .iter()
                        .map(|i| i.index(chunks.len()) as u64)
                        .filter(|c| seen.insert(*c))
                        .collect()
                };
                RamImage { size: chunks.len() as u64 * cs, chunks, access_trace, writer }
            }),
        };
        let obj = m.encode(&secret(), "p", version).unwrap();
        prop_assert_eq!(Manifest::decode(&obj, &secret(), "p", version).unwrap(), m);
    }

    /// The fuzz target of the body decoder (what runs after authentication):
    /// arbitrary bytes never panic.
    #[test]
    fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_body(&body);
    }

    /// Mutated valid bodies never panic, and whatever decodes re-encodes to
    /// a valid manifest.
    #[test]
    fn mutated_bodies_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut body = sample().encode_body();
        for (i, b) in &edits {
            let i = i.index(body.len());
            body[i] = *b;
        }
        if let Some(c) = cut {
            body.truncate(c.index(body.len()));
        }
        if let Ok(m) = decode_body(&body) {
            prop_assert!(m.encode(&secret(), "p", 1).is_ok());
        }
    }

    /// Arbitrary whole objects with a valid header never panic.
    #[test]
    fn arbitrary_objects_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let mut obj = sample().encode(&secret(), "vm1", 4).unwrap();
        obj.truncate(HEADER_LEN);
        obj.extend_from_slice(&tail);
        prop_assert!(Manifest::decode(&obj, &secret(), "vm1", 4).is_err());
    }
}

#[test]
fn vm_settings_round_trip_and_are_bounded() {
    let mut m = sample();
    m.vm = Some(VmSettings {
        memory_mib: 128,
        cpus: 2,
        save_format: SaveFormat::Stream,
        args: vec![
            "-machine".into(),
            "pc".into(),
            "-cpu".into(),
            "qemu64".into(),
        ],
    });
    let obj = m.encode(&secret(), "p", 3).unwrap();
    assert_eq!(Manifest::decode(&obj, &secret(), "p", 3).unwrap(), m);

    let mut long = m.clone();
    long.vm.as_mut().unwrap().args = vec!["x".repeat(MAX_VM_ARG_LEN + 1)];
    assert!(matches!(
        long.encode(&secret(), "p", 3),
        Err(Error::TooLarge {
            what: "VM argument",
            ..
        })
    ));
    let mut many = m;
    many.vm.as_mut().unwrap().args = vec![String::new(); MAX_VM_ARGS + 1];
    assert!(matches!(
        many.encode(&secret(), "p", 3),
        Err(Error::TooLarge {
            what: "VM argument list",
            ..
        })
    ));
}

#[test]
fn a_ram_image_round_trips_and_an_older_reader_refuses_it() {
    let mut m = sample();
    let g = Geometry::new(4 * 65536, 65536).unwrap();
    let mut chunks = vec![ChunkEntry::Zero; 4];
    chunks[2] = ChunkEntry::Data(key(7));
    m.ram = Some(RamImage {
        size: g.disk_size(),
        chunks,
        access_trace: vec![2, 0],
        writer: Some([9; 16]),
    });
    let obj = m.encode(&secret(), "vm1", 4).unwrap();
    let back = Manifest::decode(&obj, &secret(), "vm1", 4).unwrap();
    assert_eq!(back, m);
    // The RAM's view: its table, trace and writer in the disk's place.
    let view = back.ram_view(g.disk_size()).unwrap();
    assert_eq!(view.geometry(), g);
    assert_eq!(view.chunks[2], ChunkEntry::Data(key(7)));
    assert_eq!(view.access_trace, vec![2, 0]);
    assert_eq!(view.writer, Some([9; 16]));
    assert!(view.ram.is_none() && view.memory_size == 0);
    // Another size (the VM's memory changed): RAM of zeros.
    let other = back.ram_view(2 * 65536).unwrap();
    assert!(other.chunks.iter().all(|e| *e == ChunkEntry::Zero) && other.chunks.len() == 2);
    assert_eq!(other.writer, None);
    // The extension's tag is odd: a reader that does not know it refuses.
    assert_eq!(EXT_RAM & 1, 1);
    // A table that does not cover the RAM is refused at encode.
    m.ram.as_mut().unwrap().chunks.pop();
    assert!(m.encode(&secret(), "vm1", 4).is_err());
}

#[test]
fn a_memory_image_cut_by_content_round_trips_and_an_older_reader_refuses_it() {
    let mut m = sample();
    m.memory_lengths = vec![65536, 1, 30_000];
    m.memory_chunks = vec![
        ChunkEntry::Data(key(7)),
        ChunkEntry::Zero,
        ChunkEntry::Data(key(7)),
    ];
    m.memory_size = 65536 + 1 + 30_000;
    let obj = m.encode(&secret(), "vm1", 4).unwrap();
    let back = Manifest::decode(&obj, &secret(), "vm1", 4).unwrap();
    assert_eq!(back, m);
    let layout = back.memory_layout();
    assert_eq!(
        (layout.chunk_offset(2), layout.chunk_len(2)),
        (65537, 30_000)
    );
    // the extension is odd: a reader without it must refuse, not misplace
    let body = m.encode_body();
    // the last extension: tag 7, a one-byte length, the value to the end
    let ext = (0..body.len() - 1)
        .find(|&i| body[i] == 7 && body[i + 1] as usize == body.len() - i - 2)
        .expect("extension 7 at the end");
    let mut unknown = body.clone();
    unknown[ext] = 9;
    assert!(matches!(
        decode_body(&unknown),
        Err(Error::UnsupportedFeature { feature: 9, .. })
    ));
    // lengths that do not match the table, or a chunk longer than a chunk
    for lengths in [
        vec![65536, 1],
        vec![65537, 1, 30_000],
        vec![65536, 0, 30_000],
    ] {
        let mut bad = m.clone();
        bad.memory_lengths = lengths;
        assert!(
            bad.encode(&secret(), "vm1", 4).is_err(),
            "{:?}",
            bad.memory_lengths
        );
    }
}
