//! Host tests of `Engine::sync` against a real S3 server (s3s-fs): a sync
//! while the disk keeps changing makes the next publish upload only the
//! tail; the record survives a reopen; a sync cut off by the store going
//! away keeps what it uploaded and loses nothing; the bandwidth cap holds.
//!
//! `cargo test -p fetcher --test sync -- --nocapture` prints the figures.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{CHUNK, Rng, engine_options, import_parcel, read_all, s3_store};
use fetcher::{Engine, Parcel, no_progress};
use format::Secret;

fn secret() -> Secret {
    Secret::from_key_file_bytes(&[11u8; 32]).unwrap()
}

/// Writes `n` chunks of fresh noise starting at chunk `first` through the
/// engine and into `expect`.
fn write_chunks(engine: &Engine, expect: &mut [u8], first: u64, n: u64, rng: &mut Rng) {
    for c in first..first + n {
        let data = rng.bytes(CHUNK as usize);
        engine.write(c * CHUNK, &data).unwrap();
        expect[(c * CHUNK) as usize..][..CHUNK as usize].copy_from_slice(&data);
    }
    engine.flush().unwrap();
}

/// Opens `parcel`'s HEAD in a fresh cache and checks it reads as `expect`.
fn fresh_read_equals(parcel: Parcel, expect: &[u8]) {
    let root = tempfile::tempdir().unwrap();
    let engine = Engine::open(parcel, engine_options(root.path(), "reader")).unwrap();
    assert!(read_all(&engine) == expect, "the published disk differs");
}

fn never() -> AtomicBool {
    AtomicBool::new(false)
}

/// The scenario on the engine: write, sync, write more, publish:
/// the publish uploads only what changed after the sync (the tail, and a
/// chunk written again), against the same writes published without a sync.
#[test]
fn sync_then_publish_uploads_only_the_tail() {
    let mut figures = Vec::new();
    for with_sync in [false, true] {
        // A server each: nothing of one run dedups against the other.
        let server = support::S3Server::start();
        let store = s3_store(&server, Duration::from_secs(20));
        let (parcel, mut expect) = import_parcel(store, 8, 3, secret());
        let root = tempfile::tempdir().unwrap();
        let engine = Engine::open(parcel.clone(), engine_options(root.path(), "a")).unwrap();
        let mut rng = Rng(99);
        write_chunks(&engine, &mut expect, 10, 24, &mut rng);
        if with_sync {
            let s = engine.sync(no_progress(), &never()).unwrap();
            assert_eq!(s.dirty_chunks, 24, "{s:?}");
            assert_eq!(s.synced_chunks, 24, "{s:?}");
            assert_eq!(s.uploaded_chunks, 24, "noise does not dedup: {s:?}");
            assert_eq!(engine.unsynced().0, 0);
            assert_eq!(engine.synced_chunks(), 24);
            // Nothing changed since: a second sync uploads nothing.
            let again = engine.sync(no_progress(), &never()).unwrap();
            assert_eq!((again.already_synced, again.uploaded_chunks), (24, 0));
        }
        // The tail: 6 new chunks, and 2 of the synced ones written again.
        write_chunks(&engine, &mut expect, 40, 6, &mut rng);
        write_chunks(&engine, &mut expect, 12, 2, &mut rng);
        let started = Instant::now();
        let p = engine.publish(None, 1).unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(p.version, 2);
        assert_eq!(p.dirty_chunks, 30, "{p:?}");
        if with_sync {
            assert_eq!(p.uploaded_chunks, 8, "only the tail uploads: {p:?}");
            assert_eq!(p.synced_chunks, 22, "{p:?}");
        } else {
            assert_eq!(p.uploaded_chunks, 30, "{p:?}");
            assert_eq!(p.synced_chunks, 0, "{p:?}");
        }
        figures.push((with_sync, p.uploaded_chunks, p.bytes_uploaded, secs));
        assert_eq!(engine.synced_chunks(), 0, "a publish clears the record");
        drop(engine);
        fresh_read_equals(parcel.clone(), &expect);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let manifest = rt.block_on(parcel.manifest(2)).unwrap();
        let report = rt
            .block_on(fetcher::ops::verify(&parcel, 2, &manifest, no_progress()))
            .unwrap();
        assert!(report.bad.is_empty(), "{:?}", report.bad);
    }
    for (with_sync, chunks, bytes, secs) in figures {
        println!(
            "publish {} a sync: {chunks} chunks, {bytes} bytes uploaded, {secs:.2} s",
            if with_sync { "after" } else { "without" }
        );
    }
}

/// The record is kept in the cache: a sync, a close and a reopen, then the
/// publish still skips what was synced; a record of another base version
/// is ignored.
#[test]
fn sync_record_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::file_store(dir.path());
    let (parcel, mut expect) = import_parcel(store, 4, 5, secret());
    let root = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    {
        let engine = Engine::open(parcel.clone(), engine_options(root.path(), "a")).unwrap();
        write_chunks(&engine, &mut expect, 3, 10, &mut rng);
        // A chunk of zeros is synced too, as a zero entry.
        engine
            .write(20 * CHUNK, &vec![0u8; CHUNK as usize])
            .unwrap();
        expect[(20 * CHUNK) as usize..][..CHUNK as usize].fill(0);
        engine.flush().unwrap();
        let s = engine.sync(no_progress(), &never()).unwrap();
        assert_eq!((s.synced_chunks, s.uploaded_chunks), (11, 10), "{s:?}");
        engine.close().unwrap();
    }
    let engine = Engine::open(parcel.clone(), engine_options(root.path(), "a")).unwrap();
    assert_eq!(engine.synced_chunks(), 11);
    let p = engine.publish(None, 1).unwrap();
    assert_eq!((p.uploaded_chunks, p.synced_chunks), (0, 11), "{p:?}");
    drop(engine);
    fresh_read_equals(parcel, &expect);
}

/// The store stops in the middle of a sync: the sync fails naming the
/// store, the chunks it uploaded stay recorded, every dirty chunk stays
/// dirty; once the store is back, a sync uploads only the rest and the
/// publish uploads nothing more, and the published disk is right.
#[test]
fn sync_interrupted_by_the_store_going_away_loses_nothing() {
    let mut server = support::S3Server::start();
    let store = s3_store(&server, Duration::from_secs(2));
    let (parcel, mut expect) = import_parcel(store, 8, 9, secret());
    let root = tempfile::tempdir().unwrap();
    let engine = Engine::open(parcel.clone(), engine_options(root.path(), "a")).unwrap();
    let mut rng = Rng(3);
    write_chunks(&engine, &mut expect, 0, 96, &mut rng);
    // Slow enough to be stopped half-way: 96 chunks of 64 KiB of noise
    // at 1 MB/s take about 6 s.
    parcel.store().set_bwlimit(Some(1_000_000), None);
    let first = std::thread::scope(|s| {
        let sync = s.spawn(|| engine.sync(no_progress(), &never()));
        let deadline = Instant::now() + Duration::from_secs(60);
        while engine.upload_progress().0 < 20 * CHUNK && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        server.stop();
        sync.join().unwrap()
    });
    let err = first.unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    assert!(
        err.to_string().contains("127.0.0.1") || err.to_string().contains("s3://"),
        "{err}"
    );
    let kept = engine.synced_chunks();
    assert!((20..96).contains(&kept), "{kept} chunks recorded");
    assert_eq!(engine.stats().dirty_chunks, 96, "every dirty mark stays");

    server.restart();
    parcel.store().set_bwlimit(None, None);
    let s = engine.sync(no_progress(), &never()).unwrap();
    assert_eq!(s.already_synced, kept, "{s:?}");
    assert_eq!(s.synced_chunks, 96 - kept, "only the rest: {s:?}");
    let p = engine.publish(None, 1).unwrap();
    assert_eq!((p.uploaded_chunks, p.synced_chunks), (0, 96), "{p:?}");
    drop(engine);
    println!(
        "sync cut off after {kept} of 96 chunks; the second sync did the other {}",
        96 - kept
    );
    fresh_read_equals(parcel, &expect);
}

/// `--bwlimit`: a sync of about 2 MB capped at 1 MB/s takes at least about
/// 2 s (a lower bound only: a slow machine may take longer).
#[test]
fn the_bandwidth_cap_holds_for_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (parcel, mut expect) = import_parcel(common::file_store(dir.path()), 4, 1, secret());
    let root = tempfile::tempdir().unwrap();
    let engine = Engine::open(parcel.clone(), engine_options(root.path(), "a")).unwrap();
    write_chunks(&engine, &mut expect, 0, 32, &mut Rng(5));
    parcel.store().set_bwlimit(Some(1_000_000), None);
    let started = Instant::now();
    let s = engine.sync(no_progress(), &never()).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let floor = s.bytes_uploaded as f64 / 1e6;
    println!(
        "{} bytes at 1 MB/s: {secs:.2} s (at least {floor:.2} s expected)",
        s.bytes_uploaded
    );
    assert!(s.bytes_uploaded > 2_000_000, "{s:?}");
    assert!(
        secs >= floor * 0.9,
        "{secs} s for {} bytes",
        s.bytes_uploaded
    );
}
