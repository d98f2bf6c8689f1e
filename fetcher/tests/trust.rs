//! How far a store is trusted (issue 7): transient failures are retried for
//! the whole retry timeout and permanent ones are not; a store that ignores
//! the conditional create is refused; a publish that lost a race on a
//! check-then-write store says so; and two writers racing to publish one
//! version (R5) leave exactly one winner, on a local directory and on two
//! real S3 servers on 127.0.0.1.
//!
//! `cargo test -p fetcher --test trust -- retry | race | ignores`

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use fetcher::ops::{ImportOptions, export, import};
use fetcher::{Error, Parcel, Store, StoreOptions, no_progress};
use format::{Geometry, Manifest, Secret};
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RetryConfig,
};

fn secret() -> Secret {
    Secret::new(&[0x33; 32])
}

/// object_store's own retries off, as `Store::open` sets them.
fn no_retries() -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        retry_timeout: Duration::ZERO,
        ..Default::default()
    }
}

/// A store in front of another that counts requests and can misbehave the
/// way some S3-compatible servers do.
#[derive(Debug)]
struct Shaky {
    inner: Arc<dyn ObjectStore>,
    requests: AtomicU32,
    /// Treat every create as an overwrite (a server ignoring If-None-Match).
    ignore_create: bool,
    /// Creates of manifests check, wait for the other writer, then write
    /// (s3s-fs's check-then-write, with the race forced every time).
    racy: Option<(tokio::sync::Barrier, tokio::sync::Barrier)>,
}

impl Shaky {
    fn new(inner: Arc<dyn ObjectStore>) -> Shaky {
        Shaky {
            inner,
            requests: AtomicU32::new(0),
            ignore_create: false,
            racy: None,
        }
    }
}

impl std::fmt::Display for Shaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shaky({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Shaky {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let create = matches!(opts.mode, PutMode::Create);
        if create && self.ignore_create {
            opts.mode = PutMode::Overwrite;
        }
        match &self.racy {
            Some((checked, written)) if create && location.as_ref().contains("/versions/") => {
                let exists = self.inner.head(location).await.is_ok();
                checked.wait().await;
                let r = if exists {
                    Err(object_store::Error::AlreadyExists {
                        path: location.to_string(),
                        source: "exists".into(),
                    })
                } else {
                    opts.mode = PutMode::Overwrite;
                    self.inner.put_opts(location, payload, opts).await
                };
                written.wait().await;
                r
            }
            _ => self.inner.put_opts(location, payload, opts).await,
        }
    }
    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
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

/// A manifest that names no chunks, told apart by its host.
fn manifest(host: &str) -> Manifest {
    let mut m = Manifest::empty(Geometry::new(1 << 20, 64 * 1024).unwrap());
    m.host = host.to_owned();
    m
}

async fn objects_under(store: &Arc<dyn ObjectStore>, prefix: &str) -> usize {
    use futures::TryStreamExt;
    store
        .list(Some(&ObjectPath::from(prefix)))
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .len()
}

/// A server that lets every create through is refused before anything is
/// published, with a message that names the store, and the probe object is
/// removed again. A store that honours creates passes, once per Store.
#[tokio::test]
async fn ignores_conditional_create_store_is_refused() {
    let raw: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let mut shaky = Shaky::new(raw.clone());
    shaky.ignore_create = true;
    let store = Store::from_object_store(Arc::new(shaky), "s3://careless/x", true);
    let parcel = Parcel::new(store, "vm", secret()).unwrap();
    let err = parcel.publish(&manifest("a"), 1).await.unwrap_err();
    assert!(matches!(err, Error::UntrustedStore { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("s3://careless/x"), "{text}");
    assert!(text.contains("If-None-Match"), "{text}");
    assert_eq!(parcel.head().await.unwrap(), None);
    assert_eq!(objects_under(&raw, ".isr").await, 0, "probe left behind");

    let honest = Arc::new(Shaky::new(raw.clone()));
    let store = Store::from_object_store(honest.clone(), "memory://", true);
    let parcel = Parcel::new(store, "vm", secret()).unwrap();
    parcel.publish(&manifest("a"), 1).await.unwrap();
    let first = honest.requests.load(Ordering::Relaxed);
    parcel.publish(&manifest("a"), 2).await.unwrap();
    let second = honest.requests.load(Ordering::Relaxed) - first;
    assert!(second < first, "the check ran again: {first} then {second}");
    assert_eq!(objects_under(&raw, ".isr").await, 0, "probe left behind");
}

/// Two writers race on a check-then-write store, both creates "succeed",
/// and the second write replaces the first: the writer whose manifest was
/// replaced is told it lost, and the other wins. Forced every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_lost_on_a_check_then_write_store_is_reported() {
    let raw: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let mut shaky = Shaky::new(raw.clone());
    shaky.racy = Some((tokio::sync::Barrier::new(2), tokio::sync::Barrier::new(2)));
    let store = Store::from_object_store(Arc::new(shaky), "s3://racy/x", true);
    let a = Parcel::new(store.clone(), "vm", secret()).unwrap();
    let b = Parcel::new(store, "vm", secret()).unwrap();
    let (ma, mb) = (manifest("writer-a"), manifest("writer-b"));
    let (ra, rb) = tokio::join!(a.publish(&ma, 1), b.publish(&mb, 1));
    let winner = match (&ra, &rb) {
        (Ok(p), Err(e)) | (Err(e), Ok(p)) => {
            assert!(
                matches!(
                    e,
                    Error::VersionExists {
                        version: 1,
                        concurrent: true,
                        ..
                    }
                ),
                "{e}"
            );
            let text = e.to_string();
            assert!(text.contains("at the same time"), "{text}");
            assert!(text.contains("nothing of yours was published"), "{text}");
            p.object.clone()
        }
        _ => panic!("not exactly one winner: {ra:?} / {rb:?}"),
    };
    let stored = raw
        .get(&ObjectPath::from(Store::manifest_path("vm", 1)))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored, winner);
}

/// How the two writers of one R5 trial fared.
#[derive(Debug, Default)]
struct RaceTally {
    a_won: u32,
    b_won: u32,
    /// The loser was refused by the conditional create.
    refused: u32,
    /// The loser's create went through and its read-back caught it.
    caught: u32,
    /// Both writers were told they won (a race no check caught).
    slipped: u32,
}

/// R5: `trials` times, two writers (separate `Store`s, separate threads)
/// publish version `trial` of one parcel at the same instant. Every trial
/// must leave the stored manifest equal to what a writer that was told "you
/// won" wrote, and no trial may leave two losers. With `atomic`, every
/// trial must have exactly one winner; otherwise both-won trials are
/// counted (and the stored manifest is then one of the two).
fn race(open: impl Fn() -> Store, trials: u64, atomic: bool, what: &str) -> RaceTally {
    let stores = [open(), open()];
    let barrier = Arc::new(Barrier::new(2));
    let results = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for (i, store) in stores.iter().enumerate() {
            let (barrier, results) = (barrier.clone(), results.clone());
            let parcel = Parcel::new(store.clone(), "race", secret()).unwrap();
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                // The conditional-create check is made before the race.
                rt.block_on(store.create_manifest("warm-up", 1 + i as u64, Bytes::new()))
                    .unwrap();
                for trial in 1..=trials {
                    let m = manifest(&format!("writer-{i}-trial-{trial}"));
                    barrier.wait();
                    let r = rt.block_on(parcel.publish(&m, trial));
                    results.lock().unwrap().push((trial, i, r));
                }
            });
        }
    });
    let mut results = Arc::try_unwrap(results).unwrap().into_inner().unwrap();
    results.sort_by_key(|(t, i, _)| (*t, *i));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = Parcel::new(open(), "race", secret()).unwrap();
    let mut tally = RaceTally::default();
    for pair in results.chunks(2) {
        let [(trial, _, ra), (_, _, rb)] = pair else {
            panic!("{pair:?}")
        };
        let stored = rt
            .block_on(reader.store().get_manifest("race", *trial))
            .unwrap()
            .unwrap();
        let loser = |e: &Error| match e {
            Error::VersionExists {
                concurrent: true, ..
            } => 1,
            Error::VersionExists { .. } => 0,
            other => panic!("{what} trial {trial}: the loser got {other}"),
        };
        match (ra, rb) {
            (Ok(p), Err(e)) | (Err(e), Ok(p)) => {
                assert_eq!(
                    stored, p.object,
                    "{what} trial {trial}: the winner's is not stored"
                );
                if ra.is_ok() {
                    tally.a_won += 1;
                } else {
                    tally.b_won += 1;
                }
                match loser(e) {
                    0 => tally.refused += 1,
                    _ => tally.caught += 1,
                }
            }
            (Ok(pa), Ok(pb)) if !atomic => {
                assert!(stored == pa.object || stored == pb.object);
                tally.slipped += 1;
            }
            _ => panic!("{what} trial {trial}: not exactly one winner: {ra:?} / {rb:?}"),
        }
    }
    println!(
        "R5 {what}: {trials} trials: writer A won {}, writer B won {}; the loser was refused by \
         the conditional create {} times, caught by the read-back {} times; both told they won \
         {} times",
        tally.a_won, tally.b_won, tally.refused, tally.caught, tally.slipped
    );
    tally
}

const TRIALS: u64 = 50;

#[test]
fn race_r5_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", dir.path().display());
    let t = race(
        || Store::open(&url, &StoreOptions::default()).unwrap(),
        TRIALS,
        true,
        "file://",
    );
    assert_eq!(t.a_won + t.b_won, TRIALS as u32);
}

/// LocalBucket's conditional create is atomic (a hard link), like AWS S3's.
#[test]
fn race_r5_atomic_s3_server() {
    let server = support::LocalBucketServer::start();
    let open = || {
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(support::BUCKET)
            .with_endpoint(server.endpoint())
            .with_access_key_id("any")
            .with_secret_access_key("any")
            .with_region("us-east-1")
            .with_allow_http(true)
            .with_retry(no_retries())
            .build()
            .unwrap();
        Store::from_object_store(Arc::new(s3), "s3://isr-test/", true)
    };
    let t = race(open, TRIALS, true, "LocalBucket (atomic S3)");
    assert_eq!(t.a_won + t.b_won, TRIALS as u32);
}

/// s3s-fs 0.14 is NOT atomic: its create checks that the object is absent,
/// then writes it, so both racing creates can succeed. The read-back
/// catches the writer whose manifest was replaced; a race where the winner
/// read back before the loser's write landed slips through both checks and
/// is counted (the stored manifest is then still one writer's whole).
#[test]
fn race_r5_s3s_fs_not_atomic() {
    let server = support::S3Server::start();
    let open = || {
        let s3 = common::s3_builder(&server)
            .with_retry(no_retries())
            .build()
            .unwrap();
        Store::from_object_store(Arc::new(s3), "s3://isr-test/", true)
    };
    race(open, TRIALS, false, "s3s-fs (check-then-write)");
}

/// Nothing listens on the endpoint: the operation is retried until the
/// retry timeout has passed, not given up after a count of attempts.
#[tokio::test]
async fn retry_refused_connection_for_the_whole_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again at once: nothing listens there
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(support::BUCKET)
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_access_key_id(support::ACCESS_KEY)
        .with_secret_access_key(support::SECRET_KEY)
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_retry(no_retries())
        .build()
        .unwrap();
    let timeout = Duration::from_secs(3);
    let store = Store::from_object_store(Arc::new(s3), "s3://isr-test/gone", true)
        .with_retry_timeout(timeout);
    let started = Instant::now();
    let err = store.head("vm").await.unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= timeout.mul_f64(0.8), "gave up after {waited:?}");
    let text = err.to_string();
    assert!(text.contains("s3://isr-test/gone"), "{text}");
    assert!(text.contains("attempts in"), "{text}");
    println!("refused connection, retry timeout {timeout:?}: failed after {waited:?}: {text}");
}

/// A 403 (wrong credentials) is not retried: one request, then the error.
#[tokio::test]
async fn retry_not_for_wrong_credentials() {
    let server = support::S3Server::start();
    let s3 = common::s3_builder(&server)
        .with_secret_access_key("not-the-secret")
        .with_retry(no_retries())
        .build()
        .unwrap();
    let counted = Arc::new(Shaky::new(Arc::new(s3)));
    let store = Store::from_object_store(counted.clone(), "s3://isr-test/", true)
        .with_retry_timeout(Duration::from_secs(120));
    let err = store.head("vm").await.unwrap_err();
    assert!(matches!(err, Error::Denied { .. }), "{err}");
    // head() asks for the HEAD hint and the FLOOR at once: two requests,
    // neither repeated.
    assert_eq!(counted.requests.load(Ordering::Relaxed), 2, "{err}");
}

/// The S3 server goes away for ~3 s in the middle of an import and comes
/// back on the same port: the import rides it out and the parcel is whole.
#[test]
fn retry_import_survives_a_server_restart() {
    let mut server = support::S3Server::start();
    let s3 = common::s3_builder(&server)
        .with_retry(no_retries())
        .build()
        .unwrap();
    let store = Store::from_object_store(Arc::new(s3), "s3://isr-test/", true)
        .with_retry_timeout(Duration::from_secs(20));
    let parcel = Parcel::new(store, "vm", secret()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("image");
    support::write_mixed_image(&image, 8 << 20, 31);

    // Half-way through, the progress callback stops the import's uploads
    // until the server is down, so the rest of the import meets the outage.
    let (down_tx, down_rx) = std::sync::mpsc::channel::<()>();
    let (half_tx, half_rx) = std::sync::mpsc::channel::<()>();
    let down_rx = Mutex::new(down_rx);
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let fired = AtomicBool::new(false);
    let progress: fetcher::Progress = Arc::new(move |n| {
        let total = seen.fetch_add(n, Ordering::Relaxed) + n;
        if total >= 4 << 20 && !fired.swap(true, Ordering::Relaxed) {
            half_tx.send(()).unwrap();
            let _ = down_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
        }
    });
    let options = ImportOptions {
        chunk_size: Some(64 * 1024),
        host: "trust".into(),
        ..Default::default()
    };
    let summary = std::thread::scope(|s| {
        let importer = s.spawn(|| {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(import(&parcel, &image, &options, progress))
        });
        half_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the import reaches half-way");
        server.stop();
        down_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(3));
        server.restart();
        importer.join().unwrap()
    })
    .unwrap();
    assert_eq!(summary.version, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (version, m) = rt.block_on(parcel.resolve(None)).unwrap();
    let out = work.path().join("out");
    rt.block_on(export(&parcel, version, &m, &out, no_progress()))
        .unwrap();
    assert_eq!(support::sha256(&out), support::sha256(Path::new(&image)));
}
