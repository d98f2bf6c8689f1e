//! Versions and garbage collection against real stores (a local directory
//! and s3s-fs on 127.0.0.1): listing a store's parcels, rollback, discarding
//! a cache's local changes, the freshness rule of chunk reuse, gc's
//! semantics, and gc racing publishes for many rounds.
//!
//! `cargo test -p fetcher --test versions -- --nocapture` prints the race's
//! tallies.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;
#[path = "versions/race.rs"]
mod race;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{CHUNK, Rng, read_all};
use fetcher::engine::{CacheLease, Discard, release_cache_lease};
use fetcher::ops::{
    GcOptions, GcProgress, GcReport, ImportOptions, export, gc, import, list_parcels, rollback,
    verify,
};
use fetcher::{Engine, Error, Lease, Parcel, Store, no_progress};
use format::chunk::ChunkEncoder;
use format::{ChunkEntry, ChunkId, Manifest, Secret};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

fn secret() -> Secret {
    Secret::new(&[0x44; 32])
}

/// A store and its raw back end (to damage or remove objects behind isr's
/// back), with what keeps it alive.
struct Backend {
    store: Store,
    raw: Arc<dyn ObjectStore>,
    _dir: tempfile::TempDir,
    _server: Option<support::S3Server>,
}

fn file_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir_all(&root).unwrap();
    Backend {
        store: Store::open(&format!("file://{}", root.display()), &Default::default()).unwrap(),
        raw: Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&root).unwrap()),
        _dir: dir,
        _server: None,
    }
}

fn s3_backend(prefix: &str) -> Backend {
    let server = support::S3Server::start();
    let s3 = common::s3_builder(&server).build().unwrap();
    let raw: Arc<dyn ObjectStore> = Arc::new(object_store::prefix::PrefixStore::new(s3, prefix));
    Backend {
        store: Store::from_object_store(
            raw.clone(),
            &format!("s3://{}/{prefix}", support::BUCKET),
            true,
        ),
        raw,
        _dir: tempfile::tempdir().unwrap(),
        _server: Some(server),
    }
}

/// `n` distinct random chunk-sized blocks.
fn vocabulary(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed);
    (0..n).map(|_| rng.bytes(CHUNK as usize)).collect()
}

/// Imports the image made of `blocks` (one per chunk) as the next version
/// of `parcel`; returns the version.
async fn import_blocks(parcel: &Parcel, blocks: &[&[u8]]) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    std::fs::write(&image, blocks.concat()).unwrap();
    let options = ImportOptions {
        chunk_size: Some(CHUNK as u32),
        threads: 1,
        host: "versions-test".into(),
        created_unix: 1_800_000_000,
        resize: true,
        ..Default::default()
    };
    import(parcel, &image, &options, no_progress())
        .await
        .unwrap()
        .version
}

fn refs(blocks: &[Vec<u8>], range: std::ops::Range<usize>) -> Vec<&[u8]> {
    blocks[range].iter().map(Vec::as_slice).collect()
}

/// The store's name of a block's chunk under `secret()`.
fn chunk_id(block: &[u8]) -> ChunkId {
    secret().chunk_key(block).id()
}

/// Every chunk object in the store.
async fn chunk_objects(store: &Store) -> HashSet<ChunkId> {
    store
        .list("chunks")
        .await
        .unwrap()
        .iter()
        .filter_map(|o| ChunkId::parse(o.path.rsplit('/').next()?))
        .collect()
}

/// Every chunk a manifest names.
fn named(m: &Manifest) -> HashSet<ChunkId> {
    m.chunks
        .iter()
        .chain(&m.memory_chunks)
        .filter_map(|e| match e {
            ChunkEntry::Data(k) => Some(k.id()),
            ChunkEntry::Zero => None,
        })
        .collect()
}

/// Checks every existing version of every parcel: each chunk it names
/// exists and decodes. Returns the versions checked.
async fn verify_everything(store: &Store, secret: &Secret) -> u64 {
    let mut checked = 0;
    for name in store.parcels().await.unwrap() {
        let parcel = Parcel::new(store.clone(), &name, secret.clone()).unwrap();
        for v in store.versions(&name).await.unwrap() {
            let m = match parcel.manifest(v).await {
                Ok(m) => m,
                // Removed by gc since the listing.
                Err(Error::VersionRemoved { .. }) => continue,
                Err(e) => panic!("{name} v{v}: {e}"),
            };
            let report = verify(&parcel, v, &m, no_progress()).await.unwrap();
            assert!(report.bad.is_empty(), "{name} v{v}: {:?}", report.bad);
            checked += 1;
        }
    }
    checked
}

fn quiet() -> GcProgress {
    Arc::new(|_, _, _| {})
}

fn gc_options(keep: u64, grace_secs: u64) -> GcOptions {
    GcOptions {
        grace: Duration::from_secs(grace_secs),
        ..GcOptions::new(keep)
    }
}

/// `isr ls`'s data: two parcels, one of them leased; the same without a
/// key (no sizes); on a local directory and on S3. An http mirror cannot
/// list, and says so.
#[tokio::test(flavor = "multi_thread")]
async fn ls_lists_versions_sizes_and_leases() {
    let blocks = vocabulary(12, 5);
    for b in [file_backend(), s3_backend("ls")] {
        let store = &b.store;
        let alpha = Parcel::new(store.clone(), "alpha", secret()).unwrap();
        import_blocks(&alpha, &refs(&blocks, 0..4)).await;
        import_blocks(&alpha, &refs(&blocks, 2..6)).await;
        let beta = Parcel::new(store.clone(), "beta", secret()).unwrap();
        import_blocks(&beta, &refs(&blocks, 4..12)).await;
        let lease = Lease::acquire(store, "beta", "host-b", 1_800_000_123, None, false)
            .await
            .unwrap();

        let listed = list_parcels(store, Some(&secret())).await.unwrap();
        let names: Vec<&str> = listed.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["alpha", "beta"], "{}", store.url());
        assert_eq!(listed[0].versions, [1, 2]);
        assert_eq!(listed[0].head_version(), Some(2));
        assert!(listed[0].lease.is_none());
        let head = listed[0].head.as_ref().unwrap().as_ref().unwrap();
        assert_eq!((head.disk_size, head.memory_size), (4 * CHUNK, 0));
        assert_eq!(listed[1].versions, [1]);
        let held = listed[1].lease.as_ref().expect("beta is leased");
        assert_eq!(
            (held.host.as_str(), held.pid, held.since_unix),
            ("host-b", std::process::id(), 1_800_000_123)
        );
        let head = listed[1].head.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(head.disk_size, 8 * CHUNK);

        // Without a key: the versions and the lease, nothing decoded.
        let bare = list_parcels(store, None).await.unwrap();
        assert!(bare.iter().all(|p| p.head.is_none()));
        assert_eq!(bare[0].versions, [1, 2]);
        assert!(bare[1].lease.is_some());

        // A wrong key: each parcel listed with its error.
        let other = Secret::new(&[0x99; 32]);
        for p in list_parcels(store, Some(&other)).await.unwrap() {
            assert!(
                matches!(p.head, Some(Err(Error::WrongKey { .. }))),
                "{:?}",
                p.head
            );
        }

        lease.release().await.unwrap();
        let after = list_parcels(store, None).await.unwrap();
        assert!(after[1].lease.is_none(), "released");
    }

    let b = file_backend();
    let alpha = Parcel::new(b.store.clone(), "alpha", secret()).unwrap();
    import_blocks(&alpha, &refs(&blocks, 0..2)).await;
    let http = support::HttpServer::start(&b._dir.path().join("store"));
    let mirror = Store::open(&http.url(), &Default::default()).unwrap();
    match list_parcels(&mirror, None).await {
        Err(e @ Error::NoListing { .. }) => {
            assert!(e.to_string().contains("cannot list"), "{e}");
        }
        other => panic!("listing an http mirror gave {other:?}"),
    }
    // It still finds HEAD without a listing.
    assert_eq!(mirror.head("alpha").await.unwrap(), Some(1));
}

/// Rollback publishes version N's content as HEAD+1 (parent HEAD, no
/// writer) that exports bit-exact; N = HEAD publishes nothing; a version
/// that does not exist is named. Chunks older than the refresh age are
/// rewritten, so that a gc cannot take them while the rollback publishes.
#[tokio::test(flavor = "multi_thread")]
async fn rollback_republishes_an_old_version() {
    let b = file_backend();
    let store = b.store.clone().with_chunk_refresh(Duration::from_secs(1));
    let blocks = vocabulary(8, 9);
    let parcel = Parcel::new(store.clone(), "vm", secret()).unwrap();
    import_blocks(&parcel, &refs(&blocks, 0..4)).await;
    import_blocks(&parcel, &refs(&blocks, 4..8)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let s = rollback(&parcel, 1, "rollback-host", 1_800_000_500)
        .await
        .unwrap();
    assert_eq!((s.from, s.head, s.version), (1, 2, Some(3)));
    assert_eq!(s.chunks, 4);
    assert_eq!(s.refreshed_chunks, 4, "chunks older than R are rewritten");
    let (v, m) = parcel.resolve(None).await.unwrap();
    assert_eq!(v, 3);
    assert_eq!(m.parent, Some(2));
    assert_eq!(
        (m.host.as_str(), m.created_unix),
        ("rollback-host", 1_800_000_500)
    );
    assert_eq!(m.writer, None);
    assert_eq!(m.chunks, parcel.manifest(1).await.unwrap().chunks);
    let out = b._dir.path().join("v3");
    export(&parcel, 3, &m, &out, no_progress()).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), blocks[0..4].concat());

    let again = rollback(&parcel, 3, "h", 0).await.unwrap();
    assert_eq!(again.version, None, "rollback to HEAD publishes nothing");
    assert_eq!(parcel.head().await.unwrap(), Some(3));
    for bad in [0, 9] {
        match rollback(&parcel, bad, "h", 0).await {
            Err(Error::NoVersion {
                version, head: 3, ..
            }) => assert_eq!(version, bad),
            other => panic!("rollback to {bad} gave {other:?}"),
        }
    }
}

/// Rollback carries the memory image and the VM's settings of the version
/// it copies (and `isr ls` sees the memory image).
#[test]
fn rollback_carries_the_memory_image_and_settings() {
    let b = file_backend();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blocks = vocabulary(12, 51);
    let parcel = Parcel::new(b.store.clone(), "vm", secret()).unwrap();
    rt.block_on(import_blocks(&parcel, &refs(&blocks, 0..4)));
    let memory = b._dir.path().join("memory");
    std::fs::write(&memory, blocks[4..8].concat()).unwrap();
    let vm = format::VmSettings {
        memory_mib: 512,
        cpus: 2,
        args: vec!["-machine".into(), "pc".into()],
        ..Default::default()
    };
    let engine = Engine::open(
        parcel.clone(),
        common::engine_options(&b._dir.path().join("cache"), "host-m"),
    )
    .unwrap();
    let saved = fetcher::SavedVm {
        memory: Some(memory),
        vm: Some(vm.clone()),
        ram: None,
    };
    assert_eq!(engine.publish_with(None, 5, &saved).unwrap().version, 2);
    drop(engine);
    rt.block_on(import_blocks(&parcel, &refs(&blocks, 8..12)));
    let v3 = rt.block_on(parcel.manifest(3)).unwrap();
    assert_eq!(v3.memory_size, 0, "a new disk drops the memory image");

    let s = rt.block_on(rollback(&parcel, 2, "h", 6)).unwrap();
    assert_eq!(s.version, Some(4));
    let (v2, v4) = (
        rt.block_on(parcel.manifest(2)).unwrap(),
        rt.block_on(parcel.manifest(4)).unwrap(),
    );
    let memory_chunks: std::collections::HashSet<_> = v2.memory_chunks.iter().collect();
    assert!(
        v2.memory_lengths.len() > 4,
        "the memory image is cut by content"
    );
    assert_eq!(
        s.chunks as usize,
        4 + memory_chunks.len(),
        "disk and memory image"
    );
    assert_eq!(v4.memory_size, 4 * CHUNK);
    assert_eq!(v4.memory_chunks, v2.memory_chunks);
    assert_eq!(v4.memory_lengths, v2.memory_lengths);
    assert_eq!(v4.chunks, v2.chunks);
    assert_eq!(v4.vm.as_ref(), Some(&vm));
    let listed = rt
        .block_on(list_parcels(&b.store, Some(&secret())))
        .unwrap();
    let head = listed[0].head.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(head.memory_size, 4 * CHUNK);
}

/// Discard: dirty chunks go back to the base version (absent in the map,
/// a hole in the image), `synced` goes, the lease the cache held is
/// released; refused while the cache is in use.
#[test]
fn discard_returns_the_cache_to_its_base() {
    let b = file_backend();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blocks = vocabulary(8, 13);
    let parcel = Parcel::new(b.store.clone(), "vm", secret()).unwrap();
    rt.block_on(import_blocks(&parcel, &refs(&blocks, 0..8)));
    let base = blocks.concat();
    let root = b._dir.path().join("cache");
    let options = common::engine_options(&root, "host-a");

    let engine = Engine::open(parcel.clone(), options.clone()).unwrap();
    engine.write(CHUNK, &vec![0xee; CHUNK as usize]).unwrap();
    engine.write(3 * CHUNK + 100, b"local change").unwrap();
    engine.flush().unwrap();
    assert_eq!(engine.stats().dirty_chunks, 2);
    // While the cache is in use, discard is refused.
    match Discard::open(b.store.url(), "vm", &root) {
        Err(Error::CacheBusy { .. }) => {}
        other => panic!("discard of a cache in use gave {other:?}"),
    }
    let dir = engine.cache_dir();
    drop(engine);

    std::fs::write(dir.join("synced"), b"1\n").unwrap();
    let lease = rt
        .block_on(Lease::acquire(&b.store, "vm", "host-a", 1, None, false))
        .unwrap();
    std::fs::write(dir.join("lease"), &lease.info().nonce).unwrap();

    let d = Discard::open(b.store.url(), "vm", &root).unwrap();
    assert_eq!(d.dirty(), (2, 2 * CHUNK));
    assert_eq!(
        d.lease_nonce().as_deref(),
        Some(lease.info().nonce.as_str())
    );
    let report = d.apply().unwrap();
    assert_eq!((report.dirty_chunks, report.base_version), (2, 1));
    assert!(report.synced_removed);
    assert!(!dir.join("synced").exists());
    assert_eq!(
        rt.block_on(release_cache_lease(&b.store, "vm", d.dir()))
            .unwrap(),
        CacheLease::Released
    );
    assert!(!dir.join("lease").exists());
    assert!(
        rt.block_on(Lease::holder_of(&b.store, "vm"))
            .unwrap()
            .is_none()
    );
    drop(d);

    let engine = Engine::open(parcel, options).unwrap();
    assert_eq!(engine.stats().dirty_chunks, 0);
    assert!(!engine.is_cached(1) && !engine.is_cached(3));
    assert_eq!(read_all(&engine), base, "the base version's content");
    drop(engine);
    let d = Discard::open(b.store.url(), "vm", &root).unwrap();
    assert_eq!(d.dirty(), (0, 0));
}

/// A chunk is reused only while it is younger than the refresh age; an
/// older one answers "not there" and is rewritten by put_chunk (its
/// last_modified moves), so a gc's grace counts from that write.
#[tokio::test(flavor = "multi_thread")]
async fn old_chunks_are_rewritten_not_reused() {
    for b in [file_backend(), s3_backend("fresh")] {
        let store = b.store.clone().with_chunk_refresh(Duration::from_secs(2));
        let chunk = ChunkEncoder::new(secret(), 1)
            .encode(&vocabulary(1, 21)[0])
            .unwrap();
        let object = Bytes::from(chunk.object.clone());
        store.put_chunk(&chunk.id, object.clone()).await.unwrap();
        assert!(store.has_chunk(&chunk.id).await.unwrap(), "young: reused");
        let modified = |store: Store| async move {
            let listed = store.list("chunks").await.unwrap();
            assert_eq!(listed.len(), 1);
            listed[0].last_modified
        };
        let first = modified(store.clone()).await;
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert!(
            !store.has_chunk(&chunk.id).await.unwrap(),
            "{}: old: not reused",
            store.url()
        );
        assert_eq!(
            store.put_chunk(&chunk.id, object).await.unwrap(),
            fetcher::PutOutcome::AlreadyPresent
        );
        assert!(store.has_chunk(&chunk.id).await.unwrap(), "refreshed");
        let second = modified(store.clone()).await;
        assert!(second > first, "{first:?} → {second:?}");
        assert_eq!(store.get_chunk(&chunk.id).await.unwrap(), chunk.object);
    }
}

/// Four parcels sharing chunks, several versions each, one leased. gc
/// --keep 1 (dry, then for real) removes the old versions of the free
/// parcels and exactly the chunks only they named; shared chunks, the
/// leased parcel's versions and a chunk newer than the grace stay; every
/// kept version verifies; HEAD is found with the hint (and the floor)
/// gone; a removed version is named as removed.
async fn gc_semantics(b: Backend) {
    let store = b.store.clone().with_chunk_refresh(Duration::from_secs(1));
    let v = vocabulary(32, 17);
    let p = |name| Parcel::new(store.clone(), name, secret()).unwrap();
    let (p1, p2, p3, p4) = (p("p1"), p("p2"), p("p3"), p("p4"));
    import_blocks(&p1, &refs(&v, 0..8)).await;
    import_blocks(&p1, &refs(&v, 4..12)).await;
    import_blocks(&p1, &refs(&v, 8..16)).await;
    let mix: Vec<&[u8]> = refs(&v, 0..4).into_iter().chain(refs(&v, 16..20)).collect();
    import_blocks(&p2, &mix).await;
    import_blocks(&p2, &refs(&v, 16..24)).await;
    let mix: Vec<&[u8]> = refs(&v, 12..16)
        .into_iter()
        .chain(refs(&v, 20..24))
        .collect();
    import_blocks(&p3, &mix).await;
    import_blocks(&p4, &refs(&v, 24..28)).await;
    import_blocks(&p4, &refs(&v, 28..32)).await;
    let lease = Lease::acquire(&store, "p4", "host-4", 7, None, false)
        .await
        .unwrap();
    let all: HashSet<ChunkId> = v.iter().map(|b| chunk_id(b)).collect();
    assert_eq!(chunk_objects(&store).await, all);

    // Past the grace (and the one second gc adds for coarse clocks).
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let young = ChunkEncoder::new(secret(), 1)
        .encode(b"written just now")
        .unwrap();
    store
        .put_chunk(&young.id, Bytes::from(young.object))
        .await
        .unwrap();
    let only_old: HashSet<ChunkId> = v[0..8].iter().map(|b| chunk_id(b)).collect();

    let mut dry = gc_options(1, 2);
    dry.dry_run = true;
    let r = gc(&store, &secret(), &dry, quiet()).await.unwrap();
    check_plan(&r);
    assert!(r.dry_run);
    assert_eq!(r.removed_chunks, 8, "{r:?}");
    assert_eq!(r.young_chunks, 1);
    assert_eq!(
        chunk_objects(&store).await.len(),
        33,
        "dry run removed nothing"
    );
    assert!(store.get_manifest("p1", 1).await.unwrap().is_some());
    assert_eq!(store.floor("p1").await.unwrap(), None);

    let r = gc(&store, &secret(), &gc_options(1, 2), quiet())
        .await
        .unwrap();
    check_plan(&r);
    assert!(!r.dry_run);
    assert_eq!((r.chunks, r.referenced_chunks), (33, 24), "{r:?}");
    assert_eq!((r.removed_chunks, r.young_chunks), (8, 1), "{r:?}");
    assert_eq!(r.removed_bytes, r.chunk_bytes - chunk_bytes(&store).await);
    let left = chunk_objects(&store).await;
    assert!(left.is_disjoint(&only_old), "unreferenced chunks are gone");
    assert_eq!(left.len(), 25);
    assert!(
        left.contains(&young.id),
        "a chunk newer than the grace stays"
    );
    // Shared with removed versions, named by kept ones: still there.
    for shared in [&v[8], &v[12], &v[16], &v[20]] {
        assert!(left.contains(&chunk_id(shared)));
    }
    for (name, gone) in [("p1", vec![1, 2]), ("p2", vec![1])] {
        for version in gone {
            assert!(store.get_manifest(name, version).await.unwrap().is_none());
        }
    }
    assert_eq!(
        store.versions("p4").await.unwrap(),
        [1, 2],
        "leased: all kept"
    );
    assert_eq!(verify_everything(&store, &secret()).await, 5);
    match p1.resolve(Some(1)).await {
        Err(e @ Error::VersionRemoved { oldest: 3, .. }) => {
            assert!(e.to_string().contains("removed by isr gc"), "{e}")
        }
        other => panic!("a removed version gave {other:?}"),
    }

    // HEAD without its hint: from the floor; without both: from a listing.
    b.raw
        .delete(&ObjectPath::from("parcels/p1/HEAD"))
        .await
        .unwrap();
    assert_eq!(store.head("p1").await.unwrap(), Some(3));
    b.raw
        .delete(&ObjectPath::from("parcels/p1/FLOOR"))
        .await
        .unwrap();
    assert_eq!(store.head("p1").await.unwrap(), Some(3));
    assert_eq!(p1.resolve(None).await.unwrap().0, 3);

    // Once the lease is released, p4's old version and its chunks go too.
    lease.release().await.unwrap();
    let r = gc(&store, &secret(), &gc_options(1, 2), quiet())
        .await
        .unwrap();
    assert_eq!(r.removed_chunks, 4, "{r:?}");
    assert_eq!(store.versions("p4").await.unwrap(), [2]);
    assert_eq!(verify_everything(&store, &secret()).await, 4);
}

/// What the first gc plans per parcel (the same dry and for real).
fn check_plan(r: &GcReport) {
    let plan: Vec<(&str, u64, u64, &[u64], bool)> = r
        .parcels
        .iter()
        .map(|p| {
            (
                p.parcel.as_str(),
                p.head,
                p.oldest_kept,
                p.removed_versions.as_slice(),
                p.lease.is_some(),
            )
        })
        .collect();
    let expected: Vec<(&str, u64, u64, &[u64], bool)> = vec![
        ("p1", 3, 3, &[1, 2], false),
        ("p2", 2, 2, &[1], false),
        ("p3", 1, 1, &[], false),
        ("p4", 2, 1, &[], true),
    ];
    assert_eq!(plan, expected);
}

async fn chunk_bytes(store: &Store) -> u64 {
    store
        .list("chunks")
        .await
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_semantics_file() {
    gc_semantics(file_backend()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_semantics_s3() {
    gc_semantics(s3_backend("gc")).await;
}

/// A parcel whose manifest does not decode (another key; damaged) stops
/// gc before it removes anything, naming the parcel and version; a grace
/// not above the refresh age is refused.
#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_nothing_when_a_manifest_is_unreadable() {
    let b = file_backend();
    let store = b.store.clone().with_chunk_refresh(Duration::from_secs(1));
    let v = vocabulary(12, 23);
    let mine = Parcel::new(store.clone(), "mine", secret()).unwrap();
    import_blocks(&mine, &refs(&v, 0..4)).await;
    import_blocks(&mine, &refs(&v, 4..8)).await;
    let theirs = Parcel::new(store.clone(), "theirs", Secret::new(&[0x55; 32])).unwrap();
    import_blocks(&theirs, &refs(&v, 8..12)).await;
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let before = store.list("").await.unwrap().len();

    match gc(&store, &secret(), &gc_options(1, 2), quiet()).await {
        Err(e @ Error::GcBlocked { removed: 0, .. }) => {
            let text = e.to_string();
            assert!(text.contains("removed no chunk"), "{text}");
            assert!(text.contains("version 1 of parcel theirs"), "{text}");
            assert!(text.contains("key"), "{text}");
        }
        other => panic!("gc over another key's parcel gave {other:?}"),
    }
    assert_eq!(
        store.list("").await.unwrap().len(),
        before,
        "nothing removed"
    );
    assert!(store.get_manifest("mine", 1).await.unwrap().is_some());

    // The same for a damaged manifest of a parcel the key opens.
    b.raw
        .delete(&ObjectPath::from(
            "parcels/theirs/versions/00000000000000000001",
        ))
        .await
        .unwrap();
    let path = ObjectPath::from(Store::manifest_path("mine", 2));
    let mut bytes = b
        .raw
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    b.raw.put(&path, bytes.into()).await.unwrap();
    match gc(&store, &secret(), &gc_options(1, 2), quiet()).await {
        Err(Error::GcBlocked {
            parcel, version: 2, ..
        }) => assert_eq!(parcel, "mine"),
        other => panic!("gc over a damaged manifest gave {other:?}"),
    }
    assert!(store.get_manifest("mine", 1).await.unwrap().is_some());

    match gc(&store, &secret(), &gc_options(1, 1), quiet()).await {
        Err(Error::Invalid(why)) => assert!(why.contains("refresh age"), "{why}"),
        other => panic!("a grace equal to R gave {other:?}"),
    }
}

/// A chunk that a publisher refreshes after gc listed it as a candidate
/// (here: every candidate's file is touched as gc starts deleting) is
/// looked at again before its delete, found young, and kept.
#[tokio::test(flavor = "multi_thread")]
async fn gc_spares_chunks_refreshed_after_the_listing() {
    let b = file_backend();
    let store = b.store.clone().with_chunk_refresh(Duration::from_secs(1));
    let v = vocabulary(16, 41);
    let parcel = Parcel::new(store.clone(), "vm", secret()).unwrap();
    import_blocks(&parcel, &refs(&v, 0..8)).await;
    import_blocks(&parcel, &refs(&v, 8..16)).await;
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let chunks_dir = b._dir.path().join("store/chunks");
    let touched = Arc::new(std::sync::Once::new());
    let progress: GcProgress = Arc::new(move |phase, _, _| {
        if phase == fetcher::ops::GcPhase::DeleteChunks {
            touched.call_once(|| touch_all(&chunks_dir));
        }
    });
    let r = gc(&store, &secret(), &gc_options(1, 2), progress)
        .await
        .unwrap();
    assert_eq!(r.parcels[0].removed_versions, [1]);
    assert_eq!((r.removed_chunks, r.spared_chunks), (0, 8), "{r:?}");
    assert_eq!(chunk_objects(&store).await.len(), 16);
}

/// Sets the mtime of every file under `dir` to now (what a rewrite does).
fn touch_all(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            touch_all(&e.path());
        } else {
            std::fs::File::options()
                .write(true)
                .open(e.path())
                .unwrap()
                .set_modified(SystemTime::now())
                .unwrap();
        }
    }
}

/// `isr fork` of a cache whose base version gc removed, with its chunks:
/// the fork writes the chunks it shares with that base again from the
/// cache before it commits, so every chunk its version 1 names exists and
/// it exports the cache's content. A shared chunk that is neither in the
/// store nor in the cache fails the fork, naming it; nothing is published.
#[test]
fn fork_rewrites_the_base_chunks_gc_removed() {
    let b = file_backend();
    let store = b.store.clone().with_chunk_refresh(Duration::from_secs(1));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blocks = vocabulary(32, 61);
    let root = b._dir.path().join("cache");
    let options = common::engine_options(&root, "host-f");
    // "full": every chunk read into the cache; "part": chunk 0 only.
    let full = Parcel::new(store.clone(), "full", secret()).unwrap();
    let part = Parcel::new(store.clone(), "part", secret()).unwrap();
    rt.block_on(import_blocks(&full, &refs(&blocks, 0..8)));
    rt.block_on(import_blocks(&part, &refs(&blocks, 16..24)));

    let engine = Engine::open(full.clone(), options.clone()).unwrap();
    let mut expected = read_all(&engine);
    assert_eq!(expected, blocks[0..8].concat());
    engine.write(CHUNK, &vec![0xee; CHUNK as usize]).unwrap();
    engine.write(3 * CHUNK + 100, b"local change").unwrap();
    engine.flush().unwrap();
    expected[CHUNK as usize..2 * CHUNK as usize].fill(0xee);
    expected[3 * CHUNK as usize + 100..][..12].copy_from_slice(b"local change");
    assert_eq!(read_all(&engine), expected);
    drop(engine);
    let engine = Engine::open(part.clone(), options.clone()).unwrap();
    let mut first = vec![0u8; CHUNK as usize];
    engine.read(0, &mut first).unwrap();
    engine.write(CHUNK, b"part's change").unwrap();
    engine.flush().unwrap();
    drop(engine);

    // Both parcels move on elsewhere, every chunk replaced; past the
    // grace, gc removes version 1 of each and every chunk it named.
    rt.block_on(import_blocks(&full, &refs(&blocks, 8..16)));
    rt.block_on(import_blocks(&part, &refs(&blocks, 24..32)));
    std::thread::sleep(Duration::from_millis(3300));
    let r = rt
        .block_on(gc(&store, &secret(), &gc_options(1, 2), quiet()))
        .unwrap();
    assert_eq!(r.removed_chunks, 16, "{r:?}");
    let left = rt.block_on(chunk_objects(&store));
    assert!(blocks[0..8].iter().all(|b| !left.contains(&chunk_id(b))));

    let to = Parcel::new(store.clone(), "full-fork", secret()).unwrap();
    let (summary, dir) = fetcher::engine::fork(&full, &to, options.clone(), 7).unwrap();
    assert_eq!(summary.version, 1);
    assert_eq!(summary.dirty_chunks, 2);
    let m = rt.block_on(to.manifest(1)).unwrap();
    let left = rt.block_on(chunk_objects(&store));
    let missing: Vec<_> = named(&m).difference(&left).copied().collect();
    assert!(
        missing.is_empty(),
        "the fork names missing chunks {missing:?}"
    );
    let report = rt.block_on(verify(&to, 1, &m, no_progress())).unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    let out = b._dir.path().join("fork.img");
    rt.block_on(export(&to, 1, &m, &out, no_progress()))
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), expected);
    assert!(dir.exists(), "the cache moved to the fork");
    assert_eq!(summary.refreshed_chunks, 6, "{summary:?}");

    let to = Parcel::new(store.clone(), "part-fork", secret()).unwrap();
    match fetcher::engine::fork(&part, &to, options, 8) {
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("neither in the store"), "{text}");
            assert!(text.contains("nor in this cache"), "{text}");
            assert!(text.contains("parcel part "), "{text}");
            assert!(text.contains("nothing was published"), "{text}");
            let named_one = blocks[18..24].iter().enumerate().any(|(i, b)| {
                text.contains(&format!("chunk {} (disk chunk {})", chunk_id(b), i + 2))
            });
            assert!(named_one, "names a chunk not in the cache: {text}");
        }
        Ok(s) => panic!("a fork sharing chunks that are gone gave {s:?}"),
    }
    assert_eq!(rt.block_on(to.head()).unwrap(), None, "nothing published");
}
