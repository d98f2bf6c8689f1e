//! Host tests of the chunk engine against real stores (no ublk): single
//! flight under concurrency, corrupt chunks, store outages, leases and
//! reconciling two hosts, fencing, round trips. The crash tests are in
//! `crash.rs`.
//!
//! `cargo test -p fetcher -- crash | outage | single_flight | corrupt |
//! lease | roundtrip` selects each group (across both files).

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use common::{CHUNK, Rng, read_all, s3_store};

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fetcher::{Engine, EngineOptions, Error, Lease, Parcel, Store, no_progress};
use format::{ChunkEntry, Secret};
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

fn secret() -> Secret {
    Secret::new(&[0x33; 32])
}

/// A store wrapper that counts GETs per object and can be switched off
/// (every request fails, like an unreachable store).
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn ObjectStore>,
    gets: Mutex<HashMap<String, usize>>,
    /// HEAD requests (existence checks).
    heads: std::sync::atomic::AtomicUsize,
    offline: AtomicBool,
}

impl fmt::Display for Counting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

impl Counting {
    fn check(&self) -> object_store::Result<()> {
        if self.offline.load(Ordering::Relaxed) {
            return Err(object_store::Error::Generic {
                store: "test",
                source: "connection refused (simulated outage)".into(),
            });
        }
        Ok(())
    }
    fn chunk_gets(&self) -> HashMap<String, usize> {
        self.gets
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("chunks/"))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check()?;
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check()?;
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.check()?;
        if options.head {
            self.heads.fetch_add(1, Ordering::Relaxed);
        } else {
            *self
                .gets
                .lock()
                .unwrap()
                .entry(location.to_string())
                .or_default() += 1;
        }
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A parcel (version 1 = a generated image) in `store`, and that image.
fn make_parcel(store: Store, mib: u64, seed: u64) -> (Parcel, Vec<u8>) {
    common::import_parcel(store, mib, seed, secret())
}

fn options(root: &Path) -> EngineOptions {
    common::engine_options(root, "test-host")
}

fn memory_store() -> (Store, Arc<Counting>) {
    let counting = Arc::new(Counting {
        inner: Arc::new(object_store::memory::InMemory::new()),
        gets: Mutex::new(HashMap::new()),
        heads: Default::default(),
        offline: AtomicBool::new(false),
    });
    let store = Store::from_object_store(counting.clone(), "memory://test", true);
    (store, counting)
}

/// A 16 MiB parcel (image seed `seed`) in a memory store whose every GET
/// waits `ms` milliseconds, as from a distant store; its GETs are counted
/// from here on.
fn distant_parcel(seed: u64, ms: u64) -> (Parcel, Vec<u8>, Arc<Counting>) {
    let (store, counting) = memory_store();
    let (parcel, image) = make_parcel(store, 16, seed);
    let throttled: Arc<dyn ObjectStore> = Arc::new(object_store::throttle::ThrottledStore::new(
        counting.clone() as Arc<dyn ObjectStore>,
        object_store::throttle::ThrottleConfig {
            wait_get_per_call: Duration::from_millis(ms),
            ..Default::default()
        },
    ));
    let parcel = Parcel::new(
        Store::from_object_store(throttled, "memory://throttled", true),
        parcel.name(),
        secret(),
    )
    .unwrap();
    counting.gets.lock().unwrap().clear();
    (parcel, image, counting)
}

/// Many threads read and write random ranges through a store with latency:
/// every byte matches a reference model and each chunk is fetched once,
/// including chunks that all threads read at the same moment.
#[test]
fn single_flight_many_threads_random_io_match_the_model() {
    // Latency on every GET, as from a distant store.
    let (parcel, image, counting) = distant_parcel(21, 20);
    let root = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(parcel, options(root.path())).unwrap());
    let model = Arc::new(Mutex::new(image));
    let threads = 8u64;
    let per = engine.geometry().chunk_count() / threads;
    let barrier = Arc::new(Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (engine, model, barrier) = (engine.clone(), model.clone(), barrier.clone());
            std::thread::spawn(move || {
                // All threads read the same missing chunks at once.
                barrier.wait();
                for c in [3u64, 4, 5] {
                    let mut buf = vec![0u8; 1000];
                    engine.read(c * CHUNK + 17, &mut buf).unwrap();
                    let m = model.lock().unwrap();
                    assert_eq!(buf, m[(c * CHUNK + 17) as usize..][..1000]);
                }
                barrier.wait();
                // Then each thread works on its own chunks.
                let region = (t * per * CHUNK)..((t + 1) * per * CHUNK);
                let mut rng = Rng(t * 7919 + 1);
                for _ in 0..150 {
                    let (off, len) = rng.range_in(&region, 300_000);
                    if rng.below(2) == 0 {
                        let data = rng.bytes(len as usize);
                        engine.write(off, &data).unwrap();
                        model.lock().unwrap()[off as usize..][..len as usize]
                            .copy_from_slice(&data);
                    } else {
                        let mut buf = vec![0u8; len as usize];
                        engine.read(off, &mut buf).unwrap();
                        let m = model.lock().unwrap();
                        assert_eq!(buf, m[off as usize..][..len as usize], "read {off}+{len}");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(read_all(&engine), *model.lock().unwrap());
    let gets = counting.chunk_gets();
    assert!(!gets.is_empty());
    for (chunk, n) in &gets {
        assert_eq!(*n, 1, "{chunk} fetched {n} times");
    }
    assert!(engine.stats().fetched_chunks as usize >= gets.len());
}

/// A corrupted chunk object gives an error naming it; other chunks are
/// still served.
#[test]
fn corrupt_chunk_is_named_and_others_are_served() {
    let (store, counting) = memory_store();
    let (parcel, image) = make_parcel(store, 4, 5);
    let manifest = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(parcel.manifest(1))
        .unwrap();
    let (victim, key) = manifest
        .chunks
        .iter()
        .enumerate()
        .find_map(|(i, e)| match e {
            ChunkEntry::Data(k) => Some((i as u64, *k)),
            ChunkEntry::Zero => None,
        })
        .unwrap();
    let path = ObjectPath::from(Store::chunk_path(&key.id()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut bytes = rt
        .block_on(async { counting.inner.get(&path).await.unwrap().bytes().await })
        .unwrap()
        .to_vec();
    bytes[30] ^= 4;
    rt.block_on(counting.inner.put(&path, PutPayload::from(bytes)))
        .unwrap();

    let root = tempfile::tempdir().unwrap();
    let engine = Engine::open(parcel, options(root.path())).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = engine
        .read(victim * CHUNK, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&key.id().to_string()), "{err}");
    assert!(err.contains("corrupt"), "{err}");
    for c in 0..engine.geometry().chunk_count() {
        if c == victim || manifest.chunks[c as usize] == ChunkEntry::Data(key) {
            continue;
        }
        let mut buf = vec![0u8; CHUNK as usize];
        engine.read(c * CHUNK, &mut buf).unwrap();
        assert_eq!(buf, image[(c * CHUNK) as usize..][..CHUNK as usize]);
    }
}

/// The S3 server stops for several seconds: cached chunks are still
/// served, a miss waits and succeeds once the server is back; with a short
/// miss timeout, a miss fails naming the chunk.
#[test]
fn outage_cached_reads_go_on_and_misses_wait_for_the_store() {
    let mut server = support::S3Server::start();
    let (parcel, image) = make_parcel(s3_store(&server, Duration::from_secs(1)), 8, 21);
    let root = tempfile::tempdir().unwrap();
    let mut opts = options(root.path());
    opts.miss_timeout = Duration::from_secs(60);
    let engine = Arc::new(Engine::open(parcel, opts).unwrap());
    let data_chunks: Vec<u64> = (0..engine.geometry().chunk_count())
        .filter(|&c| !engine.is_cached(c))
        .collect();
    assert!(data_chunks.len() >= 3, "the image needs data chunks");
    let (warm, cold) = (data_chunks[0], data_chunks[data_chunks.len() - 1]);
    let mut buf = vec![0u8; CHUNK as usize];
    engine.read(warm * CHUNK, &mut buf).unwrap();

    server.stop();
    let started = std::time::Instant::now();
    engine.read(warm * CHUNK, &mut buf).unwrap();
    assert_eq!(buf, image[(warm * CHUNK) as usize..][..CHUNK as usize]);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "cached read waited"
    );

    let reader = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK as usize];
            engine.read(cold * CHUNK, &mut buf).map(|()| buf)
        })
    };
    std::thread::sleep(Duration::from_secs(4));
    if reader.is_finished() {
        panic!(
            "the miss did not wait for the store: {:?}",
            reader.join().unwrap().map(|_| ())
        );
    }
    server.restart();
    let got = reader.join().unwrap().unwrap();
    assert_eq!(got, image[(cold * CHUNK) as usize..][..CHUNK as usize]);

    // Down again, with a short miss timeout: the read fails naming the chunk.
    drop(engine);
    server.stop();
    let mut opts = options(root.path());
    opts.miss_timeout = Duration::from_secs(2);
    let parcel = Parcel::new(s3_store(&server, Duration::from_secs(1)), "vm", secret()).unwrap();
    let engine = Engine::open(parcel, opts).unwrap();
    assert!(
        !engine.open_report().warnings.is_empty(),
        "offline open warns"
    );
    let other = data_chunks[data_chunks.len() / 2];
    let err = engine.read(other * CHUNK, &mut buf).unwrap_err();
    assert!(
        matches!(err, Error::MissTimeout { index, .. } if index == other),
        "{err}"
    );
    server.restart();
}

/// Write, publish, and read the new version from a fresh cache.
#[test]
fn roundtrip_publish_then_resume_in_a_fresh_cache() {
    let (store, _) = memory_store();
    let (parcel, mut model) = make_parcel(store, 8, 3);
    let root_a = tempfile::tempdir().unwrap();
    let a = Engine::open(parcel.clone(), options(root_a.path())).unwrap();
    let mut rng = Rng(99);
    let size = model.len() as u64;
    for _ in 0..40 {
        let (off, len) = rng.range_in(&(0..size), 200_000);
        let data = rng.bytes(len as usize);
        a.write(off, &data).unwrap();
        model[off as usize..][..len as usize].copy_from_slice(&data);
    }
    a.discard(2 * CHUNK, 3 * CHUNK).unwrap();
    model[(2 * CHUNK) as usize..][..(3 * CHUNK) as usize].fill(0);
    a.discard(9 * CHUNK + 100, 1000).unwrap();
    model[(9 * CHUNK + 100) as usize..][..1000].fill(0);
    let dirty = a.stats().dirty_chunks;
    assert!(dirty > 0);
    let s = a.publish(None, 1_795_000_000).unwrap();
    assert_eq!((s.version, s.dirty_chunks), (2, dirty));
    assert_eq!(a.stats().dirty_chunks, 0);
    // Nothing dirty: publishing again creates nothing.
    assert_eq!(a.publish(None, 1).unwrap().version, 2);
    a.close().unwrap();

    let root_b = tempfile::tempdir().unwrap();
    let b = Engine::open(parcel.clone(), options(root_b.path())).unwrap();
    assert_eq!(b.base_version(), 2);
    assert_eq!(read_all(&b), model);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m2 = rt.block_on(parcel.manifest(2)).unwrap();
    assert_eq!(m2.parent, Some(1));
    assert!(
        !m2.access_trace.is_empty(),
        "the session's trace is published"
    );
    // Hoarding fetches the rest.
    drop(b);
    let root_c = tempfile::tempdir().unwrap();
    let c = Engine::open(parcel, options(root_c.path())).unwrap();
    let stats = c.hoard(no_progress()).unwrap();
    assert_eq!(stats.cached_chunks, stats.chunks);
    assert_eq!(read_all(&c), model);
}

/// A release leaves a hint naming its generation: the next taker finds the
/// highest generation with one round of three checks however many sessions
/// came before (probing from 1 takes about 2·log2(n)); a stale hint (a
/// session that died holding the lease) is checked and still finds the
/// holder.
#[test]
fn lease_hint_finds_the_generation_in_one_round_and_a_stale_one_is_checked() {
    let (store, counting) = memory_store();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for i in 0..40 {
        let l = rt
            .block_on(Lease::acquire(&store, "vm", "host-a", i, None, false))
            .unwrap();
        rt.block_on(l.release()).unwrap();
    }
    counting.heads.store(0, Ordering::Relaxed);
    let b = rt
        .block_on(Lease::acquire(&store, "vm", "host-b", 100, None, false))
        .unwrap();
    // lease 40, lease 41, 40.released
    assert_eq!(counting.heads.load(Ordering::Relaxed), 3);
    // B dies holding generation 41; the hint still says 40.
    drop(b);
    let err = rt
        .block_on(Lease::acquire(&store, "vm", "host-c", 200, None, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("host-b") && err.contains("since 1970-01-01 00:01:40Z"),
        "{err}"
    );
    let c = rt
        .block_on(Lease::acquire(&store, "vm", "host-c", 300, None, true))
        .unwrap();
    assert_eq!(c.stolen_from().map(|h| h.since_unix), Some(100));
}

/// Two hosts, one store: the lease refuses the second; after suspend on
/// the first, the second resumes with identical contents; stale caches are
/// invalidated, and dirty ones conflict instead of merging.
#[test]
fn lease_two_hosts_suspend_here_resume_there() {
    let (store, _) = memory_store();
    let (parcel, mut model) = make_parcel(store.clone(), 4, 17);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lease_a = rt
        .block_on(Lease::acquire(&store, "vm", "host-a", 100, None, false))
        .unwrap();
    let err = rt
        .block_on(Lease::acquire(&store, "vm", "host-b", 200, None, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("host-a") && err.contains("since 1970-01-01 00:01:40Z"),
        "{err}"
    );

    let (root_a, root_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Engine::open(parcel.clone(), options(root_a.path())).unwrap();
    // B has a clean cache of version 1 with some chunks present.
    let b = Engine::open(parcel.clone(), options(root_b.path())).unwrap();
    let _ = read_all(&b);
    b.close().unwrap();

    a.write(5, b"written on host a").unwrap();
    model[5..22].copy_from_slice(b"written on host a");
    a.publish(Some(&lease_a), 1).unwrap();
    a.close().unwrap();
    rt.block_on(lease_a.clone().release()).unwrap();

    let lease_b = rt
        .block_on(Lease::acquire(&store, "vm", "host-b", 300, None, false))
        .unwrap();
    let b = Engine::open(parcel.clone(), options(root_b.path())).unwrap();
    assert_eq!(b.base_version(), 2);
    assert!(b.open_report().invalidated >= 1);
    assert_eq!(read_all(&b), model);

    // A's lease is gone: publishing with it is refused.
    assert!(matches!(
        rt.block_on(lease_a.check()),
        Err(Error::LeaseLost { .. })
    ));
    // Steal: B's lease is broken deliberately, and B can no longer publish.
    let lease_c = rt
        .block_on(Lease::acquire(&store, "vm", "host-c", 400, None, true))
        .unwrap();
    b.write(0, b"b").unwrap();
    assert!(matches!(
        b.publish(Some(&lease_b), 2),
        Err(Error::Fenced { .. })
    ));
    b.close().unwrap();
    drop(lease_c);

    // A (based on 2, now dirty) and another writer publishing 3: conflict,
    // at publish and at the next open; nothing is lost or merged.
    let a = Engine::open(parcel.clone(), options(root_a.path())).unwrap();
    a.write(CHUNK, b"a's change").unwrap();
    let root_d = tempfile::tempdir().unwrap();
    let d = Engine::open(parcel.clone(), options(root_d.path())).unwrap();
    d.write(0, b"d's change").unwrap();
    d.publish(None, 3).unwrap();
    let err = a.publish(None, 4).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert_eq!(a.stats().dirty_chunks, 1);
    drop(a);
    let err = Engine::open(parcel, options(root_a.path())).unwrap_err();
    assert!(err.to_string().contains("refusing to merge"), "{err}");
}

/// A thread that sleeps on an eventfd (as a ublk queue does in its ring) is
/// woken when the chunk it asked for arrives; a second open of the same
/// cache is refused while the first is open.
#[test]
fn single_flight_notifier_wakes_an_fd_waiter_and_the_cache_is_exclusive() {
    let (store, _) = memory_store();
    let (parcel, image) = make_parcel(store, 8, 21);
    let root = tempfile::tempdir().unwrap();
    let engine = Engine::open(parcel.clone(), options(root.path())).unwrap();
    let err = Engine::open(parcel, options(root.path())).unwrap_err();
    assert!(matches!(err, Error::CacheBusy { .. }), "{err}");
    let c = (0..engine.geometry().chunk_count())
        .find(|&c| !engine.is_cached(c))
        .unwrap();
    let notifier = Arc::new(fetcher::Notifier::new().unwrap());
    let slot = engine.request(c, Some(&notifier)).expect("not cached yet");
    assert!(notifier.wait(10_000), "no wake-up through the eventfd");
    assert!(matches!(slot.result(), Some(Ok(()))));
    assert!(engine.is_cached(c));
    assert!(engine.request(c, Some(&notifier)).is_none());
    let mut buf = vec![0u8; CHUNK as usize];
    engine.read(c * CHUNK, &mut buf).unwrap();
    assert_eq!(buf, image[(c * CHUNK) as usize..][..CHUNK as usize]);
}

/// A steal fences the old holder: after host C takes the lease with
/// `steal` and publishes its fence version, host A's commit of the same
/// version cannot pass (with or without its lease check), A is told why and
/// keeps every change in its cache; A's release cannot remove C's lease;
/// and `fork` publishes A's work as a new parcel.
#[test]
fn lease_steal_fences_the_old_holder_which_keeps_its_work_by_forking() {
    let (store, _) = memory_store();
    let (parcel, mut model) = make_parcel(store.clone(), 4, 31);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lease_a = rt
        .block_on(Lease::acquire(&store, "vm", "host-a", 100, None, false))
        .unwrap();
    let root_a = tempfile::tempdir().unwrap();
    let a = Engine::open(parcel.clone(), options(root_a.path())).unwrap();
    a.write(7, b"work of host a").unwrap();
    model[7..21].copy_from_slice(b"work of host a");

    let lease_c = rt
        .block_on(Lease::acquire(&store, "vm", "host-c", 200, None, true))
        .unwrap();
    assert_eq!(lease_c.stolen_from().unwrap().host, "host-a");
    let fence = rt.block_on(parcel.publish_fence("host-c", 200)).unwrap();
    assert_eq!(fence, 2);

    // A commits as if its lease check had passed just before the steal:
    // the fence holds that version number.
    let err = a.publish(None, 300).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    // With its lease: told who took it and how to keep the work.
    let err = a.publish(Some(&lease_a), 300).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Fenced { .. }), "{text}");
    assert!(
        text.contains("host-c") && text.contains("isr fork"),
        "{text}"
    );
    assert_eq!(rt.block_on(parcel.require_head()).unwrap(), 2);
    assert_eq!(a.stats().dirty_chunks, 1, "the work stays in the cache");
    // A's release cannot undo C's lease.
    assert!(rt.block_on(lease_a.clone().release()).is_err());
    rt.block_on(lease_c.check()).unwrap();
    a.close().unwrap();
    drop(a);

    let mine = Parcel::new(store.clone(), "vm-a", secret()).unwrap();
    let (summary, dir) =
        fetcher::engine::fork(&parcel, &mine, options(root_a.path()), 400).unwrap();
    assert_eq!((summary.version, summary.dirty_chunks), (1, 1));
    // The cache moved to the new parcel: resuming it is warm and clean.
    let warm = Engine::open(mine.clone(), options(root_a.path())).unwrap();
    assert_eq!(warm.cache_dir(), dir);
    assert!(!warm.open_report().created);
    assert_eq!(warm.stats().dirty_chunks, 0);
    drop(warm);
    let fresh = tempfile::tempdir().unwrap();
    let engine = Engine::open(mine, options(fresh.path())).unwrap();
    assert_eq!(read_all(&engine), model);
    // The original parcel is untouched: its HEAD is the fence, version 1's
    // content.
    let engine = Engine::open(parcel, options(tempfile::tempdir().unwrap().path())).unwrap();
    assert_eq!(engine.base_version(), 2);
}

/// A guest reading a file that spans chunks is read ahead of: after reads
/// of two consecutive chunks in the middle of the disk, the 16 chunks
/// after them are fetched before the background prefetch (ascending from
/// chunk 0, held to one fetch at a time while the guest waits for data)
/// gets anywhere near them.
#[test]
fn readahead_runs_ahead_of_a_sequential_stream() {
    let (parcel, image, counting) = distant_parcel(23, 30);
    let root = tempfile::tempdir().unwrap();
    let mut opts = options(root.path());
    opts.prefetch = true;
    let engine = Engine::open(parcel, opts).unwrap();
    let (a, read, ahead) = (100u64, 2u64, 16u64);
    for c in a..a + read {
        let mut buf = vec![0u8; 4096];
        engine.read(c * CHUNK, &mut buf).unwrap();
        assert_eq!(buf, image[(c * CHUNK) as usize..][..4096]);
    }
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let (first, last) = (a + read, a + read - 1 + ahead);
    while !(first..=last).all(|c| engine.is_cached(c)) {
        assert!(
            std::time::Instant::now() < until,
            "chunks {first}..={last} never came"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let gets = counting.chunk_gets().len();
    let below = (0..a).filter(|&c| engine.is_cached(c)).count();
    eprintln!("{gets} chunk GETs, {below} chunks below {a} cached, when {last} came");
    // What was read and read ahead, and the background prefetch's start;
    // without readahead chunk {last} comes only after the ascending
    // prefetch passed the 100 before it.
    assert!(gets < (read + ahead) as usize + 20, "{gets} chunk GETs");
    engine.close().unwrap();
}
