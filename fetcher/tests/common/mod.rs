//! Helpers shared by the fetcher's integration tests (beside the
//! workspace-wide `tests/support`). Each test binary uses a part of them.
#![allow(dead_code)]

use std::ops::Range;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use fetcher::ops::{ImportOptions, import};
use fetcher::{Engine, EngineOptions, Parcel, Store, no_progress};
use format::Secret;
use object_store::aws::AmazonS3Builder;

use crate::support;

/// A client of the test S3 server, with the test bucket and keys.
pub fn s3_builder(server: &support::S3Server) -> AmazonS3Builder {
    AmazonS3Builder::new()
        .with_bucket_name(support::BUCKET)
        .with_endpoint(server.endpoint())
        .with_access_key_id(support::ACCESS_KEY)
        .with_secret_access_key(support::SECRET_KEY)
        .with_region("us-east-1")
        .with_allow_http(true)
}

/// A store on the test S3 server that retries transient failures for
/// `retry` (and gives up connecting after half a second).
pub fn s3_store(server: &support::S3Server, retry: std::time::Duration) -> Store {
    let s3 = s3_builder(server)
        .with_retry(object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: retry,
            ..Default::default()
        })
        .with_client_options(
            object_store::ClientOptions::new()
                .with_allow_http(true)
                .with_connect_timeout(std::time::Duration::from_millis(500)),
        )
        .build()
        .unwrap();
    Store::from_object_store(std::sync::Arc::new(s3), "s3://isr-test/", true)
        .with_retry_timeout(retry)
}

/// Reads a whole disk through the engine.
pub fn read_all(engine: &Engine) -> Vec<u8> {
    let mut buf = vec![0u8; engine.geometry().disk_size() as usize];
    engine.read(0, &mut buf).unwrap();
    buf
}

/// A small deterministic generator (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn range_in(&mut self, r: &Range<u64>, max_len: u64) -> (u64, u64) {
        let off = r.start + self.below(r.end - r.start);
        let len = 1 + self.below(max_len.min(r.end - off));
        (off, len)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// Size of the chunks of the parcels the tests make.
pub const CHUNK: u64 = 64 * 1024;

/// Imports a generated image of `mib` MiB as version 1 of parcel "vm"
/// under `secret`; returns the parcel and the image.
pub fn import_parcel(store: Store, mib: u64, seed: u64, secret: Secret) -> (Parcel, Vec<u8>) {
    import_parcel_of(store, mib << 20, seed, secret)
}

/// [`import_parcel`] of an image of `size` bytes (a multiple of nothing).
pub fn import_parcel_of(store: Store, size: u64, seed: u64, secret: Secret) -> (Parcel, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    support::write_mixed_image(&image, size, seed);
    let parcel = Parcel::new(store, "vm", secret).unwrap();
    let options = ImportOptions {
        chunk_size: Some(CHUNK as u32),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(import(&parcel, &image, &options, no_progress()))
        .unwrap();
    (parcel, std::fs::read(&image).unwrap())
}

/// The file store under `dir` that the crash tests and their children share.
pub fn file_store(dir: &Path) -> Store {
    Store::open(
        &format!("file://{}/store", dir.display()),
        &Default::default(),
    )
    .unwrap()
}

/// Runs test `name` of this binary as a child process with `env`, and waits
/// for its line saying "ready"; returns the child, its stdout (to read on),
/// and the rest of that line. (The harness may print "test NAME ... "
/// before the child's words.)
pub fn spawn_ready_child(
    name: &str,
    dir: &Path,
    env: &[(&str, String)],
) -> (Child, BufReader<ChildStdout>, String) {
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
    (child, out, rest)
}

/// Engine options of the tests: caches under `root`, no prefetch, misses
/// that wait up to a minute, and `host` as the host name.
pub fn engine_options(root: &Path, host: &str) -> EngineOptions {
    EngineOptions {
        cache_root: root.to_owned(),
        miss_timeout: std::time::Duration::from_secs(60),
        prefetch: false,
        host: host.into(),
        ..Default::default()
    }
}
