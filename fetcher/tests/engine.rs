//! Host tests of the chunk engine against real stores (no ublk): single
//! flight under concurrency, corrupt chunks, store outages, leases and
//! reconciling two hosts, round trips, and SIGKILL crash rounds.
//!
//! `cargo test -p fetcher -- crash | outage | single_flight | corrupt |
//! lease | roundtrip` selects each group.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use common::{Rng, read_all};

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fetcher::ops::{ImportOptions, import};
use fetcher::{Engine, EngineOptions, Error, Lease, Parcel, Store, no_progress};
use format::{ChunkEntry, Secret};
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

const CHUNK: u64 = 64 * 1024;

fn secret() -> Secret {
    Secret::new(&[0x33; 32])
}

/// A store wrapper that counts GETs per object and can be switched off
/// (every request fails, like an unreachable store).
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn ObjectStore>,
    gets: Mutex<HashMap<String, usize>>,
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
        if !options.head {
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

/// A parcel (version 1 = a generated image) in `raw`, and that image.
fn make_parcel(store: Store, mib: u64, seed: u64) -> (Parcel, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    support::write_mixed_image(&image, mib << 20, seed);
    let parcel = Parcel::new(store, "vm", secret()).unwrap();
    let options = ImportOptions {
        chunk_size: Some(CHUNK as u32),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(import(&parcel, &image, &options, no_progress()))
        .unwrap();
    (parcel, std::fs::read(&image).unwrap())
}

fn options(root: &Path) -> EngineOptions {
    EngineOptions {
        cache_root: root.to_owned(),
        miss_timeout: Duration::from_secs(60),
        prefetch: false,
        host: "test-host".into(),
        ..Default::default()
    }
}

fn memory_store() -> (Store, Arc<Counting>) {
    let counting = Arc::new(Counting {
        inner: Arc::new(object_store::memory::InMemory::new()),
        gets: Mutex::new(HashMap::new()),
        offline: AtomicBool::new(false),
    });
    let store = Store::from_object_store(counting.clone(), "memory://test", true);
    (store, counting)
}

/// Many threads read and write random ranges through a store with latency:
/// every byte matches a reference model and each chunk is fetched once,
/// including chunks that all threads read at the same moment.
#[test]
fn single_flight_many_threads_random_io_match_the_model() {
    let (store, counting) = memory_store();
    let (parcel, image) = make_parcel(store.clone(), 16, 21);
    // Latency on every GET, as from a distant store.
    let throttled: Arc<dyn ObjectStore> = Arc::new(object_store::throttle::ThrottledStore::new(
        counting.clone() as Arc<dyn ObjectStore>,
        object_store::throttle::ThrottleConfig {
            wait_get_per_call: Duration::from_millis(20),
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

fn s3_store(server: &support::S3Server, retry: Duration) -> Store {
    let s3 = common::s3_builder(server)
        .with_retry(object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: retry,
            ..Default::default()
        })
        .with_client_options(
            object_store::ClientOptions::new()
                .with_allow_http(true)
                .with_connect_timeout(Duration::from_millis(500)),
        )
        .build()
        .unwrap();
    Store::from_object_store(Arc::new(s3), "s3://isr-test/", true).with_retry_timeout(retry)
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
    assert!(err.contains("host-a") && err.contains("since 100"), "{err}");

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

// ---- crash rounds -------------------------------------------------------

/// The file store under `dir` that the crash tests and their children share.
fn file_store(dir: &Path) -> Store {
    Store::open(
        &format!("file://{}/store", dir.display()),
        &Default::default(),
    )
    .unwrap()
}

/// In a crash child: the engine on `dir`'s parcel and cache.
fn child_engine(dir: &Path) -> Engine {
    let parcel = Parcel::new(file_store(dir), "vm", secret()).unwrap();
    Engine::open(parcel, options(&dir.join("cache"))).unwrap()
}

/// Runs test `name` of this binary as a child process with `env`, and waits
/// for its line saying "ready"; returns the child and the rest of that line.
/// (The harness may print "test NAME ... " before the child's words.)
fn spawn_ready_child(name: &str, dir: &Path, env: &[(&str, String)]) -> (Child, String) {
    let err = dir.join("child.err");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "{name} died before ready: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
    }
    let rest = line.split("ready").nth(1).unwrap_or("").trim().to_owned();
    (child, rest)
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
        let (mut child, _) = spawn_ready_child(
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
    let (mut child, cache) = spawn_ready_child(
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
    let (mut child, _) = spawn_ready_child(
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
    let (store, _) = memory_store();
    // 24 MiB of mixed data (more than half of it not zero) cannot fit.
    let (parcel, _) = make_parcel(store, 24, 99);
    let mut opts = options(&fs.path());
    opts.prefetch = true;
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
