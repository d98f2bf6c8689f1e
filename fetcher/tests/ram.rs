//! The guest's RAM as an image of its own (`EngineOptions::ram`): served
//! lazily by an engine of its own beside the disk's, its changes published
//! in the disk's version as the version's RAM image, and only those.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{CHUNK, Rng, file_store, import_parcel};
use fetcher::{Engine, EngineOptions, Error, Parcel, SavedVm};
use format::{ChunkEntry, SaveFormat, Secret, VmSettings};

/// 32 chunks of RAM.
const RAM: u64 = 32 * CHUNK;

fn secret() -> Secret {
    Secret::new(&[0x7a; 32])
}

fn ram_options(root: &Path, host: &str) -> EngineOptions {
    EngineOptions {
        ram: Some(RAM),
        ..common::engine_options(root, host)
    }
}

fn settings() -> VmSettings {
    VmSettings {
        memory_mib: 2,
        cpus: 1,
        save_format: SaveFormat::SharedRam,
        args: vec![],
    }
}

/// A suspend: the disk's changes, the RAM's and the device state in one
/// version.
fn suspend(disk: &Engine, ram: &Arc<Engine>, state: &Path) -> fetcher::PublishSummary {
    disk.publish_with(
        None,
        7,
        &SavedVm {
            memory: Some(state.to_owned()),
            vm: Some(settings()),
            ram: Some(ram.clone()),
        },
    )
    .unwrap()
}

/// A parcel of a 1 MiB disk (seed `seed`) in a store of its own, and a
/// device state file to suspend with.
fn parcel_with_state(seed: u64) -> (tempfile::TempDir, Parcel, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, _) = import_parcel(file_store(dir.path()), 1, seed, secret());
    let state = dir.path().join("device-state");
    std::fs::write(&state, b"QEVM device state, no RAM").unwrap();
    (dir, parcel, state)
}

fn read(e: &Engine, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    e.read(at, &mut buf).unwrap();
    buf
}

fn open_pair(parcel: &Parcel, root: &Path, host: &str) -> (Engine, Arc<Engine>) {
    let disk = Engine::open(parcel.clone(), common::engine_options(root, host)).unwrap();
    let ram = Arc::new(Engine::open(parcel.clone(), ram_options(root, host)).unwrap());
    (disk, ram)
}

#[test]
fn ram_travels_lazily_and_a_suspend_sends_only_what_changed() {
    let (_store, parcel, state) = parcel_with_state(5);
    let mut rng = Rng(11);

    // Host A boots the VM: its RAM starts as zeros (the version has none);
    // the guest fills 20 of its 32 chunks.
    let a = tempfile::tempdir().unwrap();
    let (disk_a, ram_a) = open_pair(&parcel, a.path(), "host-a");
    assert_eq!(ram_a.geometry().disk_size(), RAM);
    assert!(read(&ram_a, 0, RAM as usize).iter().all(|&b| b == 0));
    let written = rng.bytes(20 * CHUNK as usize);
    ram_a.write(0, &written).unwrap();
    disk_a.write(0, &rng.bytes(4096)).unwrap();
    // The RAM's engine publishes only with the disk's.
    assert!(matches!(ram_a.publish(None, 1), Err(Error::Invalid(_))));
    let s = suspend(&disk_a, &ram_a, &state);
    assert_eq!(s.version, 2);
    assert_eq!((s.ram_dirty_chunks, s.ram_uploaded_chunks), (20, 20));
    assert_eq!(ram_a.base_version(), 2);
    assert_eq!(
        ram_a.stats().dirty_chunks,
        0,
        "the RAM's cache adopted version 2"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt.block_on(parcel.manifest(2)).unwrap();
    let image = m.ram.as_ref().expect("version 2 has a RAM image");
    assert_eq!(image.size, RAM);
    assert_eq!(
        image
            .chunks
            .iter()
            .filter(|e| **e != ChunkEntry::Zero)
            .count(),
        20
    );
    assert!(
        image.writer.is_some(),
        "the RAM cache is named as its writer"
    );
    assert!(m.memory_size > 0, "the device state is the memory image");
    drop((disk_a, ram_a));

    // Host B resumes it: a RAM read fetches only the chunk it touches.
    let b = tempfile::tempdir().unwrap();
    let (disk_b, ram_b) = open_pair(&parcel, b.path(), "host-b");
    assert_eq!(ram_b.stats().fetched_chunks, 0);
    assert_eq!(
        read(&ram_b, 3 * CHUNK + 100, 4000),
        written[3 * CHUNK as usize + 100..][..4000]
    );
    assert_eq!(ram_b.stats().fetched_chunks, 1, "one chunk fetched, lazily");
    assert!(
        read(&ram_b, 25 * CHUNK, CHUNK as usize)
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(read(&ram_b, 0, 20 * CHUNK as usize), written);

    // The VM changes two chunks of its RAM: the next suspend sends those.
    ram_b.write(5 * CHUNK, &rng.bytes(CHUNK as usize)).unwrap();
    ram_b.write(30 * CHUNK + 8, &rng.bytes(64)).unwrap();
    let s = suspend(&disk_b, &ram_b, &state);
    assert_eq!(s.version, 3);
    assert_eq!((s.ram_dirty_chunks, s.ram_uploaded_chunks), (2, 2));
    let after = read(&ram_b, 0, RAM as usize);
    drop((disk_b, ram_b));

    // Back on host A (its cache warm at version 2): version 3's RAM.
    let (_disk_a, ram_a) = open_pair(&parcel, a.path(), "host-a");
    assert_eq!(read(&ram_a, 0, RAM as usize), after);
    assert_eq!(
        ram_a.stats().fetched_chunks,
        2,
        "only the chunks version 3 changed are fetched again"
    );
}

#[test]
fn a_new_run_drops_the_ram_a_previous_run_left_unpublished_and_a_reattach_keeps_it() {
    let (_store, parcel, state) = parcel_with_state(6);
    let root = tempfile::tempdir().unwrap();
    let published = vec![0x11; CHUNK as usize];
    {
        let (disk, ram) = open_pair(&parcel, root.path(), "h");
        ram.write(0, &published).unwrap();
        suspend(&disk, &ram, &state);
    }
    let unpublished = vec![0x22; CHUNK as usize];
    {
        // The VM writes its RAM, then dies with it (no suspend).
        let ram = Engine::open(parcel.clone(), ram_options(root.path(), "h")).unwrap();
        ram.write(0, &unpublished).unwrap();
        ram.flush().unwrap();
        ram.close().unwrap();
    }
    // Its daemon died but the VM lives: `isr recover` keeps the RAM.
    let mut reattach = ram_options(root.path(), "h");
    reattach.reattach = true;
    let ram = Engine::open(parcel.clone(), reattach).unwrap();
    assert_eq!(read(&ram, 0, CHUNK as usize), unpublished);
    ram.close().unwrap();
    drop(ram);
    // A new run restores the last suspend: the dead VM's RAM is dropped.
    let ram = Engine::open(parcel.clone(), ram_options(root.path(), "h")).unwrap();
    assert_eq!(ram.stats().dirty_chunks, 0);
    assert_eq!(read(&ram, 0, CHUNK as usize), published);
}

#[test]
fn a_disk_publish_without_the_ram_leaves_the_version_without_one() {
    let (_store, parcel, state) = parcel_with_state(8);
    let root = tempfile::tempdir().unwrap();
    let (disk, ram) = open_pair(&parcel, root.path(), "h");
    ram.write(0, &vec![0x33; CHUNK as usize]).unwrap();
    suspend(&disk, &ram, &state);
    disk.write(0, &[1; 4096]).unwrap();
    let v = disk.publish(None, 8).unwrap().version;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt.block_on(parcel.manifest(v)).unwrap();
    assert!(
        m.ram.is_none() && m.memory_size == 0,
        "the disk moved on alone"
    );
    // A RAM engine opened on it serves zeros (a cold boot's RAM).
    drop(ram);
    let fresh = tempfile::tempdir().unwrap();
    let ram = Engine::open(parcel.clone(), ram_options(fresh.path(), "h2")).unwrap();
    assert!(read(&ram, 0, CHUNK as usize).iter().all(|&b| b == 0));
}

#[test]
fn a_hoard_of_the_ram_makes_it_work_offline() {
    let (_store, parcel, state) = parcel_with_state(9);
    let a = tempfile::tempdir().unwrap();
    let written = Rng(4).bytes(6 * CHUNK as usize);
    {
        let (disk, ram) = open_pair(&parcel, a.path(), "a");
        ram.write(8 * CHUNK, &written).unwrap();
        suspend(&disk, &ram, &state);
    }
    let b = tempfile::tempdir().unwrap();
    {
        let ram = Engine::open(parcel.clone(), ram_options(b.path(), "b")).unwrap();
        let stats = ram.hoard(fetcher::no_progress()).unwrap();
        assert_eq!(stats.cached_chunks, stats.chunks);
        ram.close().unwrap();
    }
    // Offline (no reconcile with the store): the RAM is all there.
    let mut offline = ram_options(b.path(), "b");
    offline.reconcile = false;
    let ram = Engine::open(parcel, offline).unwrap();
    assert_eq!(read(&ram, 8 * CHUNK, written.len()), written);
    assert_eq!(ram.stats().fetched_chunks, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_keeps_the_ram_chunks_of_the_versions_it_keeps() {
    let store_dir = tempfile::tempdir().unwrap();
    // Chunks older than half a second are rewritten when reused: a grace
    // of a second is then safe.
    let store =
        file_store(store_dir.path()).with_chunk_refresh(std::time::Duration::from_millis(500));
    let (parcel, _) = tokio::task::block_in_place(|| import_parcel(store, 1, 10, secret()));
    let state = store_dir.path().join("device-state");
    std::fs::write(&state, b"state").unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut rng = Rng(12);
    let (first, second) = (rng.bytes(4 * CHUNK as usize), rng.bytes(CHUNK as usize));
    tokio::task::block_in_place(|| {
        let (disk, ram) = open_pair(&parcel, root.path(), "h");
        ram.write(0, &first).unwrap();
        suspend(&disk, &ram, &state); // version 2
        ram.write(CHUNK, &second).unwrap();
        suspend(&disk, &ram, &state); // version 3: shares 3 RAM chunks with 2
    });
    // Older than the grace (plus the second gc adds for whole-second stores).
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    let options = fetcher::ops::GcOptions {
        grace: std::time::Duration::from_secs(1),
        ..fetcher::ops::GcOptions::new(1)
    };
    let quiet: fetcher::ops::GcProgress = Arc::new(|_, _, _| {});
    fetcher::ops::gc(parcel.store(), &secret(), &options, quiet)
        .await
        .unwrap();
    let mut want = first.clone();
    want[CHUNK as usize..2 * CHUNK as usize].copy_from_slice(&second);
    let fresh = tempfile::tempdir().unwrap();
    tokio::task::block_in_place(|| {
        let ram = Engine::open(parcel.clone(), ram_options(fresh.path(), "b")).unwrap();
        assert_eq!(ram.base_version(), 3);
        assert_eq!(
            read(&ram, 0, want.len()),
            want,
            "gc removed RAM chunks version 3 needs"
        );
    });
}
