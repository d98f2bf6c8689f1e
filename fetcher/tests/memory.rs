//! A VM's memory image in a version: cut by content, encrypted and
//! deduplicated (against the previous image), fetched back
//! bit-exact, verified, and never carried over to a version whose disk
//! changed without one.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use common::{CHUNK, Rng, file_store, import_parcel};

use fetcher::Image;
use fetcher::ops::{ExportOptions, export_image, verify};
use fetcher::transfer::upload::upload_memory;
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
fn memory_image_round_trips_cut_by_content_and_deduplicated_against_the_previous_image() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, _) = import_parcel(file_store(dir.path()), 4, 7, secret());
    let cache = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        parcel.clone(),
        common::engine_options(cache.path(), "memory"),
    )
    .unwrap();

    // 2 MiB of "RAM": 8 chunks of zeros between 24 chunks of data.
    let mut rng = Rng(3);
    let mut ram = rng.bytes(8 * CHUNK as usize);
    ram.resize(ram.len() + 8 * CHUNK as usize, 0);
    ram.extend(rng.bytes(16 * CHUNK as usize));
    let mem1 = dir.path().join("mem1");
    std::fs::write(&mem1, &ram).unwrap();

    let vm = settings(&["-machine", "pc"]);
    let save = |version: u64, ram: &[u8], name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, ram).unwrap();
        let saved = SavedVm {
            memory: Some(path),
            vm: Some(vm.clone()),
            ram: None,
        };
        engine.publish_with(None, version as i64, &saved).unwrap()
    };
    // Nothing dirty on the disk: the memory image alone makes a version.
    let s = save(10, &ram, "mem1");
    assert_eq!((s.version, s.dirty_chunks), (2, 0));
    let m = s.memory.expect("a memory image was published");
    assert_eq!(m.size, ram.len() as u64);
    let cut = m.lengths.len() as u64;
    assert!(
        cut > 32,
        "cut by content: {cut} chunks of a quarter chunk on average"
    );
    assert!(m.zero_chunks >= 6, "zeros cost nothing: {m:?}");
    assert_eq!(m.uploaded_chunks + m.dedup_chunks + m.zero_chunks, cut);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let m2 = rt.block_on(parcel.manifest(2)).unwrap();
    assert_eq!(m2.memory_size, ram.len() as u64);
    assert_eq!(m2.memory_lengths, m.lengths);
    assert_eq!(m2.vm.as_ref(), Some(&vm));
    assert_eq!(m2.chunks, rt.block_on(parcel.manifest(1)).unwrap().chunks);
    let export = |version: u64| {
        let manifest = rt.block_on(parcel.manifest(version)).unwrap();
        let out = dir.path().join(format!("out{version}"));
        let got = rt
            .block_on(export_image(
                &parcel,
                version,
                &manifest,
                Image::Memory,
                &out,
                &ExportOptions::default(),
                no_progress(),
            ))
            .unwrap();
        (std::fs::read(&out).unwrap(), got)
    };
    let (back, got) = export(2);
    assert_eq!(back, ram, "bit-exact");
    assert_eq!(got.fetched_chunks, cut - m.zero_chunks - m.dedup_chunks);

    // The next save of the same VM: one byte changed, and 100 bytes more
    // early in the stream (a page turned non-zero) shift every later
    // offset. Chunks cut by content repeat past the edits; only a few
    // around each edit upload.
    let mut ram2 = ram.clone();
    ram2[20 * CHUNK as usize + 5] ^= 0xff;
    ram2.splice(3 * CHUNK as usize..3 * CHUNK as usize, rng.bytes(100));
    let s = save(11, &ram2, "mem2");
    let m = s.memory.unwrap();
    assert_eq!(s.version, 3);
    assert!(
        m.uploaded_chunks <= 8,
        "two edits upload a few chunks: {m:?}"
    );
    assert!(
        m.dedup_chunks + 8 + m.zero_chunks >= m.lengths.len() as u64,
        "{m:?}"
    );
    assert_eq!(export(3).0, ram2, "bit-exact");

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
    let last = m3.memory_chunks.len() - 1;
    let ChunkEntry::Data(key) = m3.memory_chunks[last] else {
        panic!("the last chunk of the image holds data")
    };
    let id = key.id().to_string();
    let object = dir.path().join("store/chunks").join(&id[..2]).join(&id);
    std::fs::remove_file(&object).unwrap();
    let report = rt.block_on(verify(&parcel, 3, &m3, no_progress())).unwrap();
    assert_eq!(report.bad.len(), 1);
    let msg = report.bad[0].to_string();
    assert!(msg.contains(&format!("memory image chunk {last}")), "{msg}");
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
