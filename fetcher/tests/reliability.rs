//! Host-tier reliability tests of issue 7's closing table, each printing one
//! summary line (`R3:`) that the closing note quotes:
//!
//! * R3: corrupt, truncated and swapped chunk objects are caught by every
//!   read path (verify, an engine read, export), on a local directory and a
//!   real S3 server (s3s-fs on 127.0.0.1).
//!
//! `cargo test -p fetcher --test reliability -- r3`

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fetcher::ops::{ImportOptions, export, import, verify};
use fetcher::{ChunkFault, Engine, EngineOptions, Error, Parcel, Store, StoreOptions, no_progress};
use format::{ChunkEntry, ChunkId, Secret};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

const CHUNK: u64 = 64 * 1024;

fn secret() -> Secret {
    Secret::new(&[0x44; 32])
}

fn options(root: &Path) -> EngineOptions {
    EngineOptions {
        cache_root: root.to_owned(),
        miss_timeout: Duration::from_secs(60),
        prefetch: false,
        host: "reliability".into(),
        ..Default::default()
    }
}

fn read_all(engine: &Engine) -> Vec<u8> {
    let mut buf = vec![0u8; engine.geometry().disk_size() as usize];
    engine.read(0, &mut buf).unwrap();
    buf
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Imports a generated image of `mib` MiB as version 1 of parcel "vm".
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

fn file_store(dir: &Path) -> Store {
    Store::open(
        &format!("file://{}/store", dir.display()),
        &StoreOptions::default(),
    )
    .unwrap()
}

/// A raw client of the test S3 server, under `prefix` of its bucket.
fn s3_raw(endpoint: &str, prefix: &str) -> Arc<dyn ObjectStore> {
    let s3 = AmazonS3Builder::new()
        .with_bucket_name(support::BUCKET)
        .with_endpoint(endpoint)
        .with_access_key_id(support::ACCESS_KEY)
        .with_secret_access_key(support::SECRET_KEY)
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_retry(RetryConfig {
            max_retries: 0,
            retry_timeout: Duration::ZERO,
            ..Default::default()
        })
        .build()
        .unwrap();
    Arc::new(PrefixStore::new(s3, prefix))
}

/// The store `s3://isr-test/PREFIX` on the test server, as `Store::open`
/// names it (so caches of either are the same cache).
fn s3_store(raw: Arc<dyn ObjectStore>, prefix: &str) -> Store {
    Store::from_object_store(raw, &format!("s3://{}/{prefix}", support::BUCKET), true)
        .with_retry_timeout(Duration::from_secs(20))
}

// ---- R3: corrupt, truncated and swapped chunk objects -------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Flip,
    Truncate,
    Swap,
}

const FAULTS: [Fault; 3] = [Fault::Flip, Fault::Truncate, Fault::Swap];

/// Detected / tried, per fault kind (in `FAULTS` order).
#[derive(Debug, Default)]
struct R3Tally {
    detected: [u32; 3],
    tried: [u32; 3],
    misses: Vec<String>,
}

/// Whether `e` is a bad-chunk error naming `id` as undecodable.
fn names_bad(e: &Error, id: &ChunkId) -> bool {
    match e {
        Error::BadChunk {
            id: got,
            fault: ChunkFault::Decode(_),
            ..
        } => got == id,
        Error::Shared(inner) => names_bad(inner, id),
        _ => false,
    }
}

/// Imports a parcel into `store` (whose objects `raw` reaches directly),
/// then `n` times damages one distinct chunk object, checks that verify, an
/// engine read and export each catch it, and restores the object.
fn r3_faults(store: Store, raw: Arc<dyn ObjectStore>, n: usize, seed: u64, what: &str) -> R3Tally {
    let (parcel, image) = make_parcel(store, 10, seed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt.block_on(parcel.manifest(1)).unwrap();
    // Distinct chunk objects, each with the disk chunks holding it.
    let mut objects: Vec<(ChunkId, Vec<u64>)> = Vec::new();
    for (c, e) in m.chunks.iter().enumerate() {
        if let ChunkEntry::Data(k) = e {
            match objects.iter_mut().find(|(id, _)| *id == k.id()) {
                Some((_, at)) => at.push(c as u64),
                None => objects.push((k.id(), vec![c as u64])),
            }
        }
    }
    assert!(objects.len() > n, "{what}: only {} objects", objects.len());
    let mut rng = Rng(seed * 0x9e37_79b9 + 1);
    for i in (1..objects.len()).rev() {
        objects.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let get = |id: &ChunkId| -> Vec<u8> {
        let path = ObjectPath::from(Store::chunk_path(id));
        rt.block_on(async { raw.get(&path).await.unwrap().bytes().await })
            .unwrap()
            .to_vec()
    };
    let put = |id: &ChunkId, bytes: Vec<u8>| {
        let path = ObjectPath::from(Store::chunk_path(id));
        rt.block_on(raw.put(&path, PutPayload::from(bytes)))
            .unwrap();
    };
    let cache = tempfile::tempdir().unwrap();
    let engine = Engine::open(parcel.clone(), options(cache.path())).unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut tally = R3Tally::default();
    for (i, (id, at)) in objects.iter().take(n).enumerate() {
        let kind = FAULTS[i % 3];
        let original = get(id);
        let damaged = match kind {
            Fault::Flip => {
                let mut b = original.clone();
                let bit = rng.below(b.len() as u64 * 8);
                b[(bit / 8) as usize] ^= 1 << (bit % 8);
                b
            }
            // The first truncation is to nothing; the others anywhere short.
            Fault::Truncate if i < 3 => Vec::new(),
            Fault::Truncate => original[..rng.below(original.len() as u64) as usize].to_vec(),
            Fault::Swap => {
                let other = &objects[n + rng.below((objects.len() - n) as u64) as usize].0;
                assert_ne!(other, id);
                get(other)
            }
        };
        assert_ne!(damaged, original, "{what}: fault {i} changed nothing");
        put(id, damaged);
        let mut missed = Vec::new();

        // verify names exactly this chunk.
        let report = rt.block_on(verify(&parcel, 1, &m, no_progress())).unwrap();
        if !(report.bad.len() == 1 && names_bad(&report.bad[0], id)) {
            missed.push(format!("verify reported {:?}", report.bad));
        }
        // An engine read of every disk chunk holding it fails naming it,
        // and leaves the caller's buffer and the cache untouched.
        for &c in at {
            let mut buf = vec![0xeeu8; CHUNK as usize];
            match engine.read(c * CHUNK, &mut buf) {
                Ok(()) => missed.push(format!("engine read of disk chunk {c} succeeded")),
                Err(e) => {
                    if !names_bad(&e, id) || !e.to_string().contains(&id.to_string()) {
                        missed.push(format!("engine read of disk chunk {c}: {e}"));
                    }
                }
            }
            if buf.iter().any(|&b| b != 0xee) || engine.is_cached(c) {
                missed.push(format!("engine read of disk chunk {c} let bytes through"));
            }
        }
        // export fails naming it and leaves no output.
        let out = work.path().join("out");
        match rt.block_on(export(&parcel, 1, &m, &out, no_progress())) {
            Err(e) if names_bad(&e, id) => {}
            other => missed.push(format!("export gave {:?}", other.map(|_| ()))),
        }
        if out.exists() {
            missed.push("export left output".into());
            std::fs::remove_file(&out).unwrap();
        }

        put(id, original);
        let k = kind as usize;
        tally.tried[k] += 1;
        if missed.is_empty() {
            tally.detected[k] += 1;
        } else {
            tally
                .misses
                .push(format!("{what} {kind:?} of {id}: {}", missed.join("; ")));
        }
    }
    drop(engine);
    // Restored, the parcel is whole again: the faults were the only damage.
    let report = rt.block_on(verify(&parcel, 1, &m, no_progress())).unwrap();
    assert!(report.bad.is_empty(), "{what}: {:?}", report.bad);
    let fresh = tempfile::tempdir().unwrap();
    let engine = Engine::open(parcel, options(fresh.path())).unwrap();
    assert!(
        read_all(&engine) == image,
        "{what}: restored parcel differs"
    );
    tally
}

/// R3: 30 chunk objects on a local directory and 30 on a real S3 server
/// get one fault each (a flipped bit, a truncation, or another chunk's
/// bytes); every read path must catch every one.
#[test]
fn r3_corrupt_truncated_swapped_chunks_are_detected() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let file = file_store(dir.path());
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let raw: Arc<dyn ObjectStore> = Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("store")).unwrap(),
    );
    let file_tally = r3_faults(file, raw, 30, 3, "file://");
    let server = support::S3Server::start();
    let raw = s3_raw(&server.endpoint(), "r3");
    let s3_tally = r3_faults(s3_store(raw.clone(), "r3"), raw, 30, 5, "s3 (s3s-fs)");

    let both = |k: usize| {
        (
            file_tally.detected[k] + s3_tally.detected[k],
            file_tally.tried[k] + s3_tally.tried[k],
        )
    };
    let ((fd, ft), (td, tt), (sd, st)) = (both(0), both(1), both(2));
    println!(
        "R3: flip {fd}/{ft}, truncate {td}/{tt}, swap {sd}/{st} detected by verify, engine read \
         and export alike (file:// and s3s-fs, {} s)",
        started.elapsed().as_secs()
    );
    let misses: Vec<_> = file_tally.misses.iter().chain(&s3_tally.misses).collect();
    assert!(misses.is_empty(), "undetected faults: {misses:#?}");
    assert_eq!((fd, td, sd), (ft, tt, st));
    assert_eq!(ft + tt + st, 60);
}
