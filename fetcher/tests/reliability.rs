//! Host-tier reliability tests of issue 7's closing table, each printing one
//! summary line (`R3:`, `R6:`) that the closing note quotes:
//!
//! * R3: corrupt, truncated and swapped chunk objects are caught by every
//!   read path (verify, an engine read, export), on a local directory and a
//!   real S3 server (s3s-fs on 127.0.0.1).
//! * R6: a publish (suspend) killed with SIGKILL at random points leaves
//!   HEAD at the old or the new version, complete either way, and a rerun on
//!   the same cache completes it.
//!
//! `cargo test -p fetcher --test reliability -- r3 | r6`

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use common::{CHUNK, Rng, file_store, read_all};

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fetcher::ops::{export, verify};
use fetcher::{ChunkFault, Engine, EngineOptions, Error, Parcel, Store, StoreOptions, no_progress};
use format::{ChunkEntry, ChunkId, Secret};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

fn secret() -> Secret {
    Secret::new(&[0x44; 32])
}

fn options(root: &Path) -> EngineOptions {
    common::engine_options(root, "reliability")
}

/// Imports a generated image of `mib` MiB as version 1 of parcel "vm".
fn make_parcel(store: Store, mib: u64, seed: u64) -> (Parcel, Vec<u8>) {
    common::import_parcel(store, mib, seed, secret())
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

// ---- R6: kill -9 of a publish -------------------------------------------

/// What `data` is as a manifest entry.
fn entry_of(data: &[u8]) -> ChunkEntry {
    if format::is_zero(data) {
        ChunkEntry::Zero
    } else {
        ChunkEntry::Data(secret().chunk_key(data))
    }
}

/// The manifest entries of a disk image.
fn entries_of(model: &[u8]) -> Vec<ChunkEntry> {
    model.chunks(CHUNK as usize).map(entry_of).collect()
}

/// A directory for a throw-away cache: in memory where there is a tmpfs
/// (a fill's fdatasync costs nothing there), else in the temporary directory.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

/// The disk of the R6 parcel, in MiB.
const R6_MIB: u64 = 16;

/// What round `round` writes: about 3/8 of the chunks, each whole: mostly
/// random bytes, some text, some zeros, some one block shared by several
/// chunks (dedup within a publish); and one more chunk that is written
/// back unchanged (as a guest rewrites a block with what it holds).
fn round_writes(round: u64) -> (Vec<(u64, Vec<u8>)>, u64) {
    let chunks = (R6_MIB << 20) / CHUNK;
    let mut rng = Rng(round.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let mut order: Vec<u64> = (0..chunks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let shared = rng.bytes(CHUNK as usize);
    let text: Vec<u8> = format!("round {round} of R6: suspend, kill, resume. ")
        .bytes()
        .cycle()
        .take(CHUNK as usize)
        .collect();
    let rewritten = order[(chunks * 3 / 8) as usize];
    order.truncate((chunks * 3 / 8) as usize);
    order.sort_unstable();
    let writes = order
        .into_iter()
        .map(|c| {
            let data = match rng.below(10) {
                0 => vec![0u8; CHUNK as usize],
                1 => shared.clone(),
                2 => text.clone(),
                _ => rng.bytes(CHUNK as usize),
            };
            (c, data)
        })
        .collect();
    (writes, rewritten)
}

/// The store a child opens: `s3://isr-test/r6` through `Store::open` and
/// the AWS_* environment when `ISR_R6_S3` is set, else the local directory.
fn child_store(dir: &Path) -> Store {
    if std::env::var_os("ISR_R6_S3").is_some() {
        let options = StoreOptions {
            retry_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        Store::open(&format!("s3://{}/r6", support::BUCKET), &options).unwrap()
    } else {
        file_store(dir)
    }
}

/// Records how far the child got (atomically: a kill never leaves half).
fn phase(dir: &Path, p: &str) {
    let tmp = dir.join("phase.tmp");
    std::fs::write(&tmp, p).unwrap();
    std::fs::rename(tmp, dir.join("phase")).unwrap();
}

/// The child of `r6_kill_publish_at_random_points`: writes its round's
/// chunks, flushes, says "ready", publishes, says "published SECONDS", and
/// waits to be killed.
#[test]
fn r6_child_publishes() {
    let Some(dir) = std::env::var_os("ISR_R6_CHILD") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let round: u64 = std::env::var("ISR_R6_ROUND").unwrap().parse().unwrap();
    let parcel = Parcel::new(child_store(&dir), "vm", secret()).unwrap();
    let engine = Engine::open(parcel, options(&dir.join("cache"))).unwrap();
    let (writes, rewritten) = round_writes(round);
    for (c, data) in writes {
        engine.write(c * CHUNK, &data).unwrap();
    }
    let mut same = vec![0u8; CHUNK as usize];
    engine.read(rewritten * CHUNK, &mut same).unwrap();
    engine.write(rewritten * CHUNK, &same).unwrap();
    engine.flush().unwrap();
    phase(&dir, "before");
    println!("ready");
    phase(&dir, "during");
    let s = engine.publish(None, round as i64).unwrap();
    phase(&dir, "after");
    println!("published {}", s.seconds);
    std::thread::sleep(Duration::from_secs(60));
}

#[derive(Debug, Default)]
struct R6Tally {
    rounds: u32,
    head_old: u32,
    head_new: u32,
    /// Where the child was when killed: before, during, after its publish.
    killed: [u32; 3],
    reruns: u32,
    /// Kills that landed after the commit but before the publish returned
    /// (the reopen must recognise the commit as its own).
    committed_mid: u32,
    publish_ms: f64,
    seconds: u64,
}

/// One store's R6 rounds. `parcel` is the parent's handle on the parcel
/// the children write (through `child_env`); `model` is its disk.
fn r6_rounds(
    parcel: &Parcel,
    dir: &Path,
    child_env: &[(&'static str, String)],
    first_round: u64,
    rounds: u64,
    model: &mut Vec<u8>,
    tally: &mut R6Tally,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cache = dir.join("cache");
    let mut rng = Rng(first_round * 7919 + 17);
    // The first round (not counted) measures the publish, left to finish.
    let mut publish = Duration::ZERO;
    let started = Instant::now();
    for round in first_round..first_round + rounds + 1 {
        let (old, old_m) = rt.block_on(parcel.resolve(None)).unwrap();
        let mut new_model = model.clone();
        for (c, data) in round_writes(round).0 {
            new_model[(c * CHUNK) as usize..][..CHUNK as usize].copy_from_slice(&data);
        }
        let mut env = child_env.to_vec();
        env.push(("ISR_R6_CHILD", dir.display().to_string()));
        env.push(("ISR_R6_ROUND", round.to_string()));
        let (mut child, mut out, _) = common::spawn_ready_child("r6_child_publishes", dir, &env);
        if round == first_round {
            let mut line = String::new();
            while !line.contains("published") {
                line.clear();
                assert!(out.read_line(&mut line).unwrap() > 0, "calibration died");
            }
            let secs: f64 = line.split_whitespace().last().unwrap().parse().unwrap();
            publish = Duration::from_secs_f64(secs);
        } else {
            // 0 to 1.5 times the publish time; one round in ten at once.
            let delay = if round % 10 == 0 {
                Duration::ZERO
            } else {
                publish.mul_f64(rng.below(1501) as f64 / 1000.0)
            };
            std::thread::sleep(delay);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let at = std::fs::read_to_string(dir.join("phase")).unwrap();
        let k = ["before", "during", "after"]
            .iter()
            .position(|p| *p == at)
            .unwrap_or_else(|| panic!("round {round}: phase {at:?}"));

        // HEAD is the old version or the new one, and complete.
        let (v, m) = rt.block_on(parcel.resolve(None)).unwrap();
        if v == old {
            assert_eq!(m.chunks, old_m.chunks, "round {round}: HEAD {v} changed");
            assert!(k < 2, "round {round}: publish returned but HEAD is old");
        } else {
            assert_eq!(v, old + 1, "round {round}: HEAD {v} after {old}");
            assert_eq!(m.parent, Some(old), "round {round}");
            assert!(
                m.chunks == entries_of(&new_model),
                "round {round}: HEAD {v} is not the written disk"
            );
            assert!(k > 0, "round {round}: HEAD moved before the publish began");
        }
        let report = rt.block_on(verify(parcel, v, &m, no_progress())).unwrap();
        assert!(
            report.bad.is_empty(),
            "round {round}: HEAD {v} is incomplete: {:?}",
            report.bad
        );

        // The rerun on the same cache completes the publish.
        let engine = Engine::open(parcel.clone(), options(&cache))
            .unwrap_or_else(|e| panic!("round {round}: reopen after the kill: {e}"));
        assert!(engine.open_report().recovered, "round {round}: {k}");
        let s = engine
            .publish(None, 1_795_000_000 + round as i64)
            .unwrap_or_else(|e| panic!("round {round}: rerun failed: {e}"));
        // A publish the kill let commit is recognised as this cache's own:
        // nothing is left dirty, and the rerun publishes nothing again.
        assert!(
            v == old || s.dirty_chunks == 0,
            "round {round}: the killed publish committed version {v}, yet the reopened cache \
             still held {} dirty chunks and the rerun published them again as version {}",
            s.dirty_chunks,
            s.version
        );
        assert_eq!(s.version, old + 1, "round {round}: {s:?}");
        assert_eq!(engine.stats().dirty_chunks, 0, "round {round}");
        engine.close().unwrap();
        let (v2, m2) = rt.block_on(parcel.resolve(None)).unwrap();
        assert_eq!(v2, old + 1, "round {round}");
        assert!(m2.chunks == entries_of(&new_model), "round {round}");
        let fresh = scratch_dir();
        let engine = Engine::open(parcel.clone(), options(fresh.path())).unwrap();
        engine.hoard(no_progress()).unwrap();
        assert!(
            read_all(&engine) == new_model,
            "round {round}: a fresh cache does not read what was written"
        );
        drop(engine);
        *model = new_model;

        if round != first_round {
            tally.rounds += 1;
            tally.killed[k] += 1;
            tally.reruns += 1;
            if v == old {
                tally.head_old += 1;
            } else {
                tally.head_new += 1;
                if k == 1 {
                    tally.committed_mid += 1;
                }
            }
        } else {
            tally.publish_ms = publish.as_secs_f64() * 1000.0;
        }
    }
    tally.seconds = started.elapsed().as_secs();
}

/// R6: a publish is killed with SIGKILL at a random point, 40 times on a
/// local directory and 10 times on a real S3 server: HEAD is then the old
/// version or the new one and complete, and a rerun completes the publish
/// with exactly what was written.
#[test]
fn r6_kill_publish_at_random_points() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (parcel, mut model) = make_parcel(file_store(dir.path()), R6_MIB, 61);
    let mut file = R6Tally::default();
    r6_rounds(&parcel, dir.path(), &[], 1, 40, &mut model, &mut file);

    let server = support::S3Server::start();
    let s3dir = tempfile::tempdir().unwrap();
    let store = s3_store(s3_raw(&server.endpoint(), "r6"), "r6");
    let (parcel, mut model) = make_parcel(store, R6_MIB, 62);
    let mut env = server.env();
    env.push(("ISR_R6_S3", "1".into()));
    let mut s3 = R6Tally::default();
    r6_rounds(&parcel, s3dir.path(), &env, 101, 10, &mut model, &mut s3);

    let line = |t: &R6Tally, what: &str| {
        format!(
            "{what} {} rounds in {} s (publish {:.0} ms, killed before/during/after it \
             {}/{}/{}): HEAD old {}, new {} ({} of them killed after the commit, mid-publish); \
             reruns completed {}/{}",
            t.rounds,
            t.seconds,
            t.publish_ms,
            t.killed[0],
            t.killed[1],
            t.killed[2],
            t.head_old,
            t.head_new,
            t.committed_mid,
            t.reruns,
            t.rounds
        )
    };
    println!(
        "R6: {}; {}; HEAD always old or new and complete, every rerun read back exact ({} s)",
        line(&file, "file://"),
        line(&s3, "s3s-fs"),
        started.elapsed().as_secs()
    );
    assert_eq!((file.rounds, s3.rounds), (40, 10));
    assert_eq!(file.reruns + s3.reruns, 50);
    // The kills landed on both sides of the commit.
    assert!(file.head_old > 0 && file.head_new > 0, "{file:?}");
}
