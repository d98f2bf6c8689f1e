//! Crash tests of the chunk engine (no ublk): a child process killed with
//! SIGKILL at random moments loses no flushed write and leaves HEAD
//! complete; a crash of the process alone re-reads nothing, a host crash
//! re-hashes what holds data; a clean close leaves a clean cache; a failed
//! sync of the cache image fails every later flush.
//!
//! The children are tests of this same binary, run with an environment
//! variable that tells them to act.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{CHUNK, Rng, file_store, read_all, spawn_ready_child};
use fetcher::{Engine, EngineOptions, Parcel, Store, no_progress};
use format::{ChunkEntry, Secret};

fn secret() -> Secret {
    Secret::new(&[0x33; 32])
}

fn make_parcel(store: Store, mib: u64, seed: u64) -> (Parcel, Vec<u8>) {
    common::import_parcel(store, mib, seed, secret())
}

fn options(root: &Path) -> EngineOptions {
    common::engine_options(root, "test-host")
}

fn memory_store() -> Store {
    Store::from_object_store(
        Arc::new(object_store::memory::InMemory::new()),
        "memory://test",
        true,
    )
}

/// In a crash child: the engine on `dir`'s parcel and cache.
fn child_engine(dir: &Path) -> Engine {
    let parcel = Parcel::new(file_store(dir), "vm", secret()).unwrap();
    Engine::open(parcel, options(&dir.join("cache"))).unwrap()
}

const BLOCK: u64 = 4096;

fn block_content(round: u64, block: u64) -> Vec<u8> {
    let mut rng = Rng((round << 32) ^ block ^ 0x9e37_79b9);
    rng.bytes(BLOCK as usize)
}

/// The child of `crash_sigkill_rounds`: writes blocks (each at most once
/// per round), flushes and journals what each flush covered, publishes now
/// and then, until it is killed.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os("ISR_CRASH_CHILD") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let round: u64 = std::env::var("ISR_CRASH_ROUND").unwrap().parse().unwrap();
    let engine = child_engine(&dir);
    let blocks = engine.geometry().disk_size() / BLOCK;
    let mut order: Vec<u64> = (0..blocks).collect();
    let mut rng = Rng(round * 31 + 7);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let journal_path = dir.join("journal");
    let mut journal = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&journal_path)
        .unwrap();
    let phase = |p: &str| std::fs::write(dir.join("phase"), p).unwrap();
    println!("ready");
    let mut pending = Vec::new();
    for (i, &b) in order.iter().enumerate() {
        phase("write");
        engine.write(b * BLOCK, &block_content(round, b)).unwrap();
        pending.push(b);
        if i % 16 == 15 {
            phase("flush");
            engine.flush().unwrap();
            use std::io::Write;
            let line: String = pending.iter().map(|b| format!("{b}\n")).collect();
            journal.write_all(line.as_bytes()).unwrap();
            journal.sync_all().unwrap();
            pending.clear();
        }
        if i % 200 == 199 {
            phase("publish");
            engine.publish(None, round as i64).unwrap();
        }
    }
    phase("done");
    // Wait to be killed.
    std::thread::sleep(Duration::from_secs(60));
}

/// 24 rounds: a child process writes, flushes and publishes; it is killed
/// with SIGKILL at a random moment; the cache is reopened and checked: no
/// flushed write lost, every other written block old or new, and HEAD
/// always a complete version.
#[test]
fn crash_sigkill_rounds_lose_no_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, mut model) = make_parcel(file_store(dir.path()), 4, 77);
    let rounds = 24u64;
    let mut phases: HashMap<String, usize> = HashMap::new();
    let mut rng = Rng(4242);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for round in 1..=rounds {
        let _ = std::fs::remove_file(dir.path().join("journal"));
        let (mut child, _, _) = spawn_ready_child(
            "crash_child",
            dir.path(),
            &[
                ("ISR_CRASH_CHILD", dir.path().display().to_string()),
                ("ISR_CRASH_ROUND", round.to_string()),
            ],
        );
        // Let it run a random while.
        std::thread::sleep(Duration::from_millis(5 + rng.below(150)));
        child.kill().unwrap();
        child.wait().unwrap();
        let phase = std::fs::read_to_string(dir.path().join("phase")).unwrap_or_default();
        *phases.entry(phase).or_default() += 1;

        let flushed: std::collections::HashSet<u64> =
            std::fs::read_to_string(dir.path().join("journal"))
                .unwrap_or_default()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
        let engine = Engine::open(parcel.clone(), options(&dir.path().join("cache"))).unwrap();
        assert!(
            engine.open_report().recovered,
            "round {round}: unclean stop not seen"
        );
        let got = read_all(&engine);
        for b in 0..(model.len() as u64 / BLOCK) {
            let at = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
            let new = block_content(round, b);
            if flushed.contains(&b) {
                assert_eq!(
                    got[at.clone()],
                    new[..],
                    "round {round}: flushed block {b} lost"
                );
            } else {
                assert!(
                    got[at.clone()] == model[at.clone()] || got[at.clone()] == new[..],
                    "round {round}: block {b} is neither old nor new"
                );
            }
        }
        model = got;
        // HEAD is always complete: every chunk it names is in the store.
        let (v, m) = rt.block_on(parcel.resolve(None)).unwrap();
        let report = rt
            .block_on(fetcher::ops::verify(&parcel, v, &m, no_progress()))
            .unwrap();
        assert!(report.bad.is_empty(), "round {round}: HEAD {v} incomplete");
        engine.close().unwrap();
    }
    // Finally everything publishes, and a fresh cache reads the model.
    let engine = Engine::open(parcel.clone(), options(&dir.path().join("cache"))).unwrap();
    engine.publish(None, 0).unwrap();
    engine.close().unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let engine = Engine::open(parcel, options(fresh.path())).unwrap();
    assert_eq!(read_all(&engine), model);
    eprintln!("crash rounds: {rounds}; killed while: {phases:?}");
}

/// The child of `crash_recovery_reverifies_present_chunks`: reads one
/// chunk into the cache, says so, and waits to be killed.
#[test]
fn crash_child_reads_a_chunk() {
    let Some(dir) = std::env::var_os("ISR_CRASH_READ_CHILD") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let engine = child_engine(&dir);
    let c: u64 = std::env::var("ISR_CRASH_CHUNK").unwrap().parse().unwrap();
    let mut buf = vec![0u8; CHUNK as usize];
    engine.read(c * CHUNK, &mut buf).unwrap();
    println!("ready {}", engine.cache_dir().display());
    std::thread::sleep(Duration::from_secs(60));
}

/// After a host crash, a chunk marked present whose image bytes no longer
/// match the manifest (a write whose dirty mark never became durable) is
/// found and kept as dirty, so the next publish uploads it; only chunks
/// holding data are hashed.
#[test]
fn crash_recovery_reverifies_present_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, _) = make_parcel(file_store(dir.path()), 8, 21);
    let m = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(parcel.manifest(1))
        .unwrap();
    let c = m
        .chunks
        .iter()
        .position(|e| *e != ChunkEntry::Zero)
        .unwrap() as u64;
    // The child runs in an "earlier boot": reopening here is after a host
    // crash, when data may be on disk without its dirty mark.
    let (mut child, _, cache) = spawn_ready_child(
        "crash_child_reads_a_chunk",
        dir.path(),
        &[
            ("ISR_CRASH_READ_CHILD", dir.path().display().to_string()),
            ("ISR_CRASH_CHUNK", c.to_string()),
            ("ISR_BOOT_ID", "an-earlier-boot".into()),
        ],
    );
    let cache = PathBuf::from(cache);
    child.kill().unwrap();
    child.wait().unwrap();
    // Bytes of the present chunk change behind the map's back.
    use std::os::unix::fs::FileExt;
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(cache.join("image"))
        .unwrap();
    image.write_all_at(b"unflushed", c * CHUNK + 10).unwrap();
    let reopened = Engine::open(parcel, options(&dir.path().join("cache"))).unwrap();
    let report = reopened.open_report();
    assert!(report.recovered);
    assert_eq!(report.recovered_dirty, 1);
    // Only the one chunk that holds data was read, not the whole disk.
    assert_eq!(report.scanned_chunks, 1, "{report:?}");
    assert_eq!(reopened.stats().dirty_chunks, 1);
    let mut buf = [0u8; 9];
    reopened.read(c * CHUNK + 10, &mut buf).unwrap();
    assert_eq!(&buf, b"unflushed");
}

/// The child of `crash_of_the_process_alone_rehashes_nothing`: writes into
/// a chunk without flushing, says so, and waits to be killed.
#[test]
fn crash_child_writes_unflushed() {
    let Some(dir) = std::env::var_os("ISR_CRASH_WRITE_CHILD") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let engine = child_engine(&dir);
    let mut buf = vec![0u8; CHUNK as usize];
    for c in 0..4 {
        engine.read(c * CHUNK, &mut buf).unwrap();
    }
    engine.write(2 * CHUNK + 100, b"not flushed").unwrap();
    println!("ready");
    std::thread::sleep(Duration::from_secs(60));
}

/// A crash of the process alone (same boot): the page cache kept every
/// write and the dirty mark made before it, so reopening re-reads nothing,
/// and the unflushed write is there and dirty.
#[test]
fn crash_of_the_process_alone_rehashes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, _) = make_parcel(file_store(dir.path()), 8, 23);
    let (mut child, _, _) = spawn_ready_child(
        "crash_child_writes_unflushed",
        dir.path(),
        &[("ISR_CRASH_WRITE_CHILD", dir.path().display().to_string())],
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let reopened = Engine::open(parcel, options(&dir.path().join("cache"))).unwrap();
    let report = reopened.open_report().clone();
    assert!(report.recovered, "{report:?}");
    assert_eq!(report.scanned_chunks, 0, "{report:?}");
    assert_eq!(reopened.stats().dirty_chunks, 1);
    let mut buf = [0u8; 11];
    reopened.read(2 * CHUNK + 100, &mut buf).unwrap();
    assert_eq!(&buf, b"not flushed");
    reopened.close().unwrap();
}

/// `close` through a shared engine (the daemon's control thread holds a
/// clone) marks the cache clean: the next open is not a recovery.
#[test]
fn close_of_a_shared_engine_leaves_a_clean_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, _) = make_parcel(file_store(dir.path()), 4, 24);
    let engine =
        Arc::new(Engine::open(parcel.clone(), options(&dir.path().join("cache"))).unwrap());
    let held = engine.clone();
    let mut buf = vec![0u8; CHUNK as usize];
    engine.read(0, &mut buf).unwrap();
    engine.write(10, b"x").unwrap();
    engine.close().unwrap();
    assert!(held.read(CHUNK * 3, &mut buf).is_err() || held.is_cached(3));
    drop((engine, held));
    let reopened = Engine::open(parcel, options(&dir.path().join("cache"))).unwrap();
    let report = reopened.open_report();
    assert!(!report.recovered, "{report:?}");
    assert_eq!(reopened.stats().dirty_chunks, 1);
}

/// A prefetch fill's fdatasync takes the writeback error; the guest's next
/// FLUSH must not then return success for data that was lost: every flush
/// after a failed sync fails, naming the first failure.
#[test]
fn flush_fails_forever_after_a_fill_swallowed_a_writeback_error() {
    let fs = support::FailingFs::new();
    let store = memory_store();
    // 24 MiB of mixed data (more than half of it not zero) cannot fit.
    let (parcel, _) = make_parcel(store, 24, 99);
    let mut opts = options(&fs.path());
    opts.prefetch = true;
    // A writeback error is the page cache's: buffered (direct I/O reports
    // the failure at the fill's write itself).
    opts.cache_io = Some(fetcher::CacheIo::Buffered);
    let engine = Engine::open(parcel, opts).unwrap();
    // Prefetch fills the cache until a fill's sync fails.
    let err = engine
        .hoard(no_progress())
        .expect_err("the cache fit in a device with 4 MiB of room");
    eprintln!("hoard failed as it must: {err}");
    for round in 0..3 {
        let e = engine
            .flush()
            .expect_err("a flush after a failed sync must fail");
        assert!(
            e.to_string().contains("an earlier sync"),
            "round {round}: {e}"
        );
    }
    // Writes are still accepted, but never claimed durable.
    let _ = engine.write(0, b"after");
    assert!(engine.flush().is_err());
    drop(engine);
}
