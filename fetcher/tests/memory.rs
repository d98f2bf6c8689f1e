//! A VM's memory image in a version: chunked, encrypted and deduplicated
//! like the disk (against the disk and the previous image), fetched back
//! bit-exact, verified, and never carried over to a version whose disk
//! changed without one.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use common::{CHUNK, Rng, file_store, import_parcel};

use fetcher::ops::{ExportOptions, Image, export_image, upload_memory, verify};
use fetcher::{Engine, Error, SavedVm, no_progress};
use format::{ChunkEntry, SaveFormat, Secret, VmSettings};

fn secret() -> Secret {
    Secret::new(&[0x5a; 32])
}

fn settings(args: &[&str]) -> VmSettings {
    VmSettings {
        memory_mib: 128,
        cpus: 1,
        save_format: SaveFormat::Stream,
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn memory_image_round_trips_deduplicated_against_disk_and_previous_image() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, disk) = import_parcel(file_store(dir.path()), 4, 7, secret());
    let cache = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        parcel.clone(),
        common::engine_options(cache.path(), "memory"),
    )
    .unwrap();

    // 2 MiB of "RAM": 8 chunks equal to disk chunks (a page cache holds the
    // disk's data), 8 zero chunks, 16 chunks of its own.
    let mut rng = Rng(3);
    let disk_chunks: Vec<usize> = (0..disk.len() / CHUNK as usize)
        .filter(|&c| !format::is_zero(&disk[c * CHUNK as usize..][..CHUNK as usize]))
        .take(8)
        .collect();
    assert_eq!(disk_chunks.len(), 8, "the test image has data chunks");
    let mut ram = Vec::new();
    for &c in &disk_chunks {
        ram.extend_from_slice(&disk[c * CHUNK as usize..][..CHUNK as usize]);
    }
    ram.resize(ram.len() + 8 * CHUNK as usize, 0);
    ram.extend(rng.bytes(16 * CHUNK as usize));
    let mem1 = dir.path().join("mem1");
    std::fs::write(&mem1, &ram).unwrap();

    let vm = settings(&["-machine", "pc"]);
    let saved = SavedVm {
        memory: Some(mem1.clone()),
        vm: Some(vm.clone()),
        ram: None,
    };
    // Nothing dirty on the disk: the memory image alone makes a version.
    let s = engine.publish_with(None, 10, &saved).unwrap();
    assert_eq!((s.version, s.dirty_chunks), (2, 0));
    let m = s.memory.expect("a memory image was published");
    assert_eq!(m.size, ram.len() as u64);
    assert_eq!(
        (m.zero_chunks, m.dedup_chunks, m.uploaded_chunks),
        (8, 8, 16),
        "disk chunks and zeros cost nothing"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let m2 = rt.block_on(parcel.manifest(2)).unwrap();
    assert_eq!(m2.memory_size, ram.len() as u64);
    assert_eq!(m2.vm.as_ref(), Some(&vm));
    assert_eq!(m2.chunks, rt.block_on(parcel.manifest(1)).unwrap().chunks);
    let out = dir.path().join("out");
    let got = rt
        .block_on(export_image(
            &parcel,
            2,
            &m2,
            Image::Memory,
            &out,
            &ExportOptions::default(),
            no_progress(),
        ))
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), ram, "bit-exact");
    assert_eq!(got.fetched_chunks, 24);

    // The next save of the same VM: one chunk changed; only it uploads.
    let mut ram2 = ram.clone();
    ram2[20 * CHUNK as usize + 5] ^= 0xff;
    let mem2 = dir.path().join("mem2");
    std::fs::write(&mem2, &ram2).unwrap();
    let s = engine
        .publish_with(
            None,
            11,
            &SavedVm {
                memory: Some(mem2),
                vm: Some(vm.clone()),
                ram: None,
            },
        )
        .unwrap();
    let m = s.memory.unwrap();
    assert_eq!((s.version, m.uploaded_chunks, m.dedup_chunks), (3, 1, 23));

    // The disk changes and no memory image comes with it: the version has
    // none (the old one would not match the disk); the settings carry over.
    engine.write(0, &[0xee; 4096]).unwrap();
    let s = engine.publish(None, 12).unwrap();
    assert_eq!((s.version, s.memory), (4, None));
    let m4 = rt.block_on(parcel.manifest(4)).unwrap();
    assert_eq!((m4.memory_size, m4.memory_chunks.len()), (0, 0));
    assert_eq!(m4.vm.as_ref(), Some(&vm));
    engine.close().unwrap();

    // verify covers the memory image: a lost memory chunk is named as one.
    let m3 = rt.block_on(parcel.manifest(3)).unwrap();
    let ChunkEntry::Data(key) = m3.memory_chunks[30] else {
        panic!("chunk 30 of the image holds data")
    };
    let id = key.id().to_string();
    let object = dir.path().join("store/chunks").join(&id[..2]).join(&id);
    std::fs::remove_file(&object).unwrap();
    let report = rt.block_on(verify(&parcel, 3, &m3, no_progress())).unwrap();
    assert_eq!(report.bad.len(), 1);
    let msg = report.bad[0].to_string();
    assert!(msg.contains("memory image chunk 30"), "{msg}");
}

#[test]
fn a_memory_image_must_be_a_non_empty_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, _) = import_parcel(file_store(dir.path()), 1, 1, secret());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    for bad in [empty.as_path(), dir.path(), "/dev/null".as_ref()] {
        let err = rt
            .block_on(upload_memory(
                &parcel,
                bad,
                CHUNK as u32,
                &mut Default::default(),
                no_progress(),
            ))
            .unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{bad:?}: {err}");
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );
    }
}
