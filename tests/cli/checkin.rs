//! `isr checkin` on the host (no device needed): a cache left with local
//! changes and its lease, as `isr suspend --offline` leaves it, is
//! published later; a lease held by another host is refused and the
//! changes stay; chunks a sync uploaded are not sent again.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use fetcher::{Engine, EngineOptions, Lease, Parcel, Store};

use super::support::{S3Server, sha256};
use super::{Env, s};

const CHUNK: u64 = 256 * 1024;

fn parcel(env: &Env) -> Parcel {
    let store = match &env.s3 {
        // The same store the CLI opens, with the test server's keys.
        Some(endpoint) => {
            let s3 = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(super::support::BUCKET)
                .with_endpoint(endpoint)
                .with_access_key_id(super::support::ACCESS_KEY)
                .with_secret_access_key(super::support::SECRET_KEY)
                .with_region("us-east-1")
                .with_allow_http(true)
                .build()
                .unwrap();
            let prefix = env.store.rsplit('/').next().unwrap();
            let inner = object_store::prefix::PrefixStore::new(s3, prefix);
            Store::from_object_store(std::sync::Arc::new(inner), &env.store, true)
        }
        None => Store::open(&env.store, &Default::default()).unwrap(),
    };
    let key = std::fs::read(env.key()).unwrap();
    let secret = format::Secret::from_key_file_bytes(&key).unwrap();
    Parcel::new(store, "vm", secret).unwrap()
}

fn options(env: &Env) -> EngineOptions {
    EngineOptions {
        cache_root: env.path("cache"),
        prefetch: false,
        host: "laptop".into(),
        ..Default::default()
    }
}

/// An offline session's cache: version 1 with chunks `chunks` overwritten
/// (recorded in `expect`), `synced` of them uploaded by a sync; with
/// `lease`, the lease taken and its nonce kept as an offline suspend keeps
/// it. Returns the cache directory.
fn offline_session(
    env: &Env,
    expect: &mut [u8],
    chunks: std::ops::Range<u64>,
    synced: u64,
    lease: bool,
) -> PathBuf {
    let p = parcel(env);
    let dir = fetcher::local::cache::cache_dir(&env.path("cache"), p.store().url(), "vm");
    let rt = tokio::runtime::Runtime::new().unwrap();
    if lease {
        let l = rt
            .block_on(Lease::acquire(p.store(), "vm", "laptop", 1, None, false))
            .unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("lease"), &l.info().nonce).unwrap();
    }
    let engine = Engine::open(p, options(env)).unwrap();
    let start = chunks.start;
    for c in chunks {
        let data = vec![(c * 7 + 1) as u8; CHUNK as usize];
        engine.write(c * CHUNK, &data).unwrap();
        expect[(c * CHUNK) as usize..][..CHUNK as usize].copy_from_slice(&data);
        if c + 1 == start + synced {
            engine.flush().unwrap();
            let s = engine
                .sync(fetcher::no_progress(), &AtomicBool::new(false))
                .unwrap();
            assert_eq!(s.synced_chunks, synced);
        }
    }
    engine.close().unwrap();
    dir
}

fn checkin(env: &Env, extra: &[&str]) -> super::Run {
    let key = env.key();
    let cache = env.path("cache");
    let mut args = vec![
        "checkin",
        "vm",
        "--store",
        &env.store,
        "--key-file",
        s(&key),
        "--cache-dir",
        s(&cache),
    ];
    args.extend_from_slice(extra);
    env.isr(&args)
}

#[test]
fn checkin_publishes_an_offline_cache_and_releases_its_lease() {
    let env = Env::file();
    let image = env.imported(4, 7);
    let mut expect = std::fs::read(&image).unwrap();
    let dir = offline_session(&env, &mut expect, 2..8, 4, true);

    let c = checkin(&env, &["--json"]).ok().json();
    assert_eq!(c["version"], 2, "{c}");
    assert_eq!(c["dirty_chunks"], 6, "{c}");
    assert_eq!(
        c["synced_chunks"], 4,
        "what the sync uploaded is not sent again: {c}"
    );
    assert_eq!(c["lease_released"], true, "{c}");
    assert!(!dir.join("lease").exists(), "the nonce goes with the lease");

    let out = env.path("out");
    env.on("export", "vm", &[s(&out)]).ok();
    let want = env.path("want");
    std::fs::write(&want, &expect).unwrap();
    assert_eq!(sha256(&out), sha256(&want));

    // The lease is free again: another host can take the parcel.
    env.on("import", "vm", &[s(&image)]).ok();
    // Nothing left to check in.
    let again = checkin(&env, &[]).ok();
    assert!(
        again.stdout().contains("nothing to check in"),
        "{}",
        again.stdout()
    );
}

#[test]
fn checkin_is_refused_while_another_host_holds_the_lease_and_keeps_the_changes() {
    let env = Env::file();
    let image = env.imported(4, 9);
    let mut expect = std::fs::read(&image).unwrap();
    let dir = offline_session(&env, &mut expect, 0..3, 0, false);
    let p = parcel(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = rt
        .block_on(Lease::acquire(p.store(), "vm", "desktop", 1, None, false))
        .unwrap();

    // Exit 4: a conflict (another host holds the lease).
    let r = checkin(&env, &[]).exits(4);
    let err = r.stderr();
    assert!(err.contains("desktop"), "names the holder: {err}");
    let log = env.on("log", "vm", &["--json"]).ok().json();
    assert_eq!(log.as_array().unwrap().len(), 1, "nothing was published");

    // Once the other host lets go, the same changes check in.
    rt.block_on(other.release()).unwrap();
    let c = checkin(&env, &["--json"]).ok().json();
    assert_eq!(
        (c["version"].as_u64(), c["dirty_chunks"].as_u64()),
        (Some(2), Some(3)),
        "{c}"
    );
    assert!(dir.exists());
}

#[test]
fn checkin_steals_a_live_lease_when_asked_and_its_publish_fences_the_holder() {
    let env = Env::file();
    let image = env.imported(4, 10);
    let mut expect = std::fs::read(&image).unwrap();
    offline_session(&env, &mut expect, 0..2, 0, false);
    let p = parcel(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = rt
        .block_on(Lease::acquire(p.store(), "vm", "desktop", 1, None, false))
        .unwrap();
    let r = checkin(&env, &["--steal"]).ok();
    assert!(r.stderr().contains("from host desktop"), "{}", r.stderr());
    let log = env.on("log", "vm", &["--json"]).ok().json();
    assert_eq!(log.as_array().unwrap().len(), 2, "published: {log}");
    // The old holder has lost its lease: its commit would fail.
    assert!(rt.block_on(other.check()).is_err());
}

#[test]
fn checkin_without_a_cache_says_so() {
    let env = Env::file();
    env.imported(1, 3);
    let r = checkin(&env, &[]).fails();
    assert!(
        r.stderr().contains("no cache on this host"),
        "{}",
        r.stderr()
    );
}

/// Working offline against S3: with the server down, checkin fails as
/// unreachable (exit 3) and keeps the lease, the changes and the sync
/// record; once the server is back it publishes, sending only what the
/// sync had not.
#[test]
fn checkin_with_the_s3_store_down_keeps_everything_until_it_is_back() {
    let mut server = S3Server::start();
    let env = Env::s3(&server, "offline");
    let image = env.imported(2, 5);
    let mut expect = std::fs::read(&image).unwrap();
    let dir = offline_session(&env, &mut expect, 1..6, 2, true);

    server.stop();
    let r = checkin(&env, &["--retry-timeout", "2"]).exits(3);
    assert!(
        r.stderr().contains("127.0.0.1"),
        "names the store: {}",
        r.stderr()
    );
    assert!(
        dir.join("lease").exists(),
        "the lease stays with this cache"
    );
    assert!(dir.join("synced").exists(), "the sync record stays");

    server.restart();
    let c = checkin(&env, &["--json"]).ok().json();
    assert_eq!(c["version"], 2, "{c}");
    assert_eq!(
        (c["dirty_chunks"].as_u64(), c["synced_chunks"].as_u64()),
        (Some(5), Some(2)),
        "{c}"
    );
    let out = env.path("out");
    env.on("export", "vm", &[s(&out)]).ok();
    let want = env.path("want");
    std::fs::write(&want, &expect).unwrap();
    assert_eq!(sha256(&out), sha256(&want));
}
