//! One conformance suite, run against every store back end: memory, a local
//! directory, a real S3 server (s3s-fs on 127.0.0.1) and, read-only, an http
//! mirror (Python's http.server on 127.0.0.1).

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use fetcher::ops::{ImportOptions, export, import, verify};
use fetcher::{ChunkFault, Error, Parcel, PutOutcome, Store, StoreOptions, no_progress};
use format::chunk::ChunkEncoder;
use format::{ChunkEntry, Secret};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

fn secret() -> Secret {
    Secret::new(&[0x11; 32])
}

fn options() -> ImportOptions {
    ImportOptions {
        chunk_size: Some(64 * 1024),
        host: "conformance".into(),
        created_unix: 1_795_000_000,
        ..Default::default()
    }
}

/// Chunk objects: create-if-absent, existence, fetch, and named misses.
async fn chunk_objects(store: &Store) {
    let chunk = ChunkEncoder::new(secret(), 1)
        .encode(b"conformance chunk")
        .unwrap();
    assert!(!store.has_chunk(&chunk.id).await.unwrap());
    match store.get_chunk(&chunk.id).await {
        Err(Error::NotFound { object, .. }) => {
            assert_eq!(object, Store::chunk_path(&chunk.id))
        }
        other => panic!("missing chunk gave {other:?}"),
    }
    let bytes = Bytes::from(chunk.object.clone());
    assert_eq!(
        store.put_chunk(&chunk.id, bytes.clone()).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store.put_chunk(&chunk.id, bytes).await.unwrap(),
        PutOutcome::AlreadyPresent
    );
    assert!(store.has_chunk(&chunk.id).await.unwrap());
    assert_eq!(store.get_chunk(&chunk.id).await.unwrap(), chunk.object);
}

/// Versions: put-if-absent publishing and HEAD discovery despite bad hints.
async fn versions(store: &Store, raw: &Arc<dyn ObjectStore>) {
    let p = "versions";
    assert_eq!(store.head(p).await.unwrap(), None);
    store
        .create_manifest(p, 1, Bytes::from_static(b"m1"))
        .await
        .unwrap();
    match store
        .create_manifest(p, 1, Bytes::from_static(b"other"))
        .await
    {
        Err(Error::VersionExists { version: 1, .. }) => {}
        other => panic!("second create of version 1 gave {other:?}"),
    }
    assert_eq!(store.get_manifest(p, 1).await.unwrap().unwrap(), &b"m1"[..]);
    assert_eq!(store.head(p).await.unwrap(), Some(1));
    for v in 2..=11 {
        store
            .create_manifest(p, v, Bytes::from(format!("m{v}")))
            .await
            .unwrap();
    }
    assert_eq!(store.head(p).await.unwrap(), Some(11));
    assert_eq!(store.get_manifest(p, 12).await.unwrap(), None);
    for hint in ["3", "11", "100", "garbage", ""] {
        let path = ObjectPath::from(format!("parcels/{p}/HEAD"));
        raw.put(&path, PutPayload::from(hint.to_owned()))
            .await
            .unwrap();
        assert_eq!(store.head(p).await.unwrap(), Some(11), "hint {hint:?}");
    }
}

/// Import, export, verify and their failure modes, through a parcel.
async fn parcel_round_trip(store: &Store, raw: &Arc<dyn ObjectStore>, work: &Path) {
    let image = work.join("image");
    support::write_mixed_image(&image, 8 << 20, 7);
    let parcel = Parcel::new(store.clone(), "vm", secret()).unwrap();
    let first = import(&parcel, &image, &options(), no_progress())
        .await
        .unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(first.chunks, 128);
    assert!(first.uploaded_chunks > 0);
    assert_eq!(
        first.chunks,
        first.zero_chunks + first.dedup_chunks + first.uploaded_chunks
    );

    let (version, manifest) = parcel.resolve(None).await.unwrap();
    assert_eq!(version, 1);
    let out = work.join("out");
    export(&parcel, version, &manifest, &out, no_progress())
        .await
        .unwrap();
    assert_eq!(support::sha256(&out), support::sha256(&image));
    assert!(
        verify(&parcel, 1, &manifest, no_progress())
            .await
            .unwrap()
            .bad
            .is_empty()
    );

    let second = import(&parcel, &image, &options(), no_progress())
        .await
        .unwrap();
    assert_eq!((second.version, second.uploaded_chunks), (2, 0));
    let m2 = parcel.manifest(2).await.unwrap();
    assert_eq!(m2.parent, Some(1));
    assert_eq!(m2.chunks, manifest.chunks);

    // Damage one chunk object and delete another: verify names both, export
    // fails naming one, and a failed export leaves no partial output.
    let data: Vec<_> = manifest
        .chunks
        .iter()
        .filter_map(|e| match e {
            ChunkEntry::Data(k) => Some(k.id()),
            ChunkEntry::Zero => None,
        })
        .collect();
    let (corrupt, missing) = (
        data[0],
        *data.iter().rev().find(|id| **id != data[0]).unwrap(),
    );
    let path = ObjectPath::from(Store::chunk_path(&corrupt));
    let mut bytes = raw
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    bytes[40] ^= 0x01;
    raw.put(&path, PutPayload::from(bytes)).await.unwrap();
    raw.delete(&ObjectPath::from(Store::chunk_path(&missing)))
        .await
        .unwrap();

    let report = verify(&parcel, 2, &m2, no_progress()).await.unwrap();
    let mut bad: Vec<_> = report
        .bad
        .iter()
        .map(|e| match e {
            Error::BadChunk {
                id,
                fault,
                version: 2,
                ..
            } => (*id, matches!(fault, ChunkFault::Missing)),
            other => panic!("unexpected {other}"),
        })
        .collect();
    bad.sort();
    let mut expected = vec![(corrupt, false), (missing, true)];
    expected.sort();
    assert_eq!(bad, expected);
    let out2 = work.join("out2");
    match export(&parcel, 2, &m2, &out2, no_progress()).await {
        Err(Error::BadChunk { id, .. }) => assert!(id == corrupt || id == missing),
        other => panic!("export of a damaged version gave {other:?}"),
    }
    assert!(std::fs::read_dir(work).unwrap().all(|e| {
        let name = e.unwrap().file_name();
        !name.to_string_lossy().contains("out2")
    }));

    let wrong = Parcel::new(store.clone(), "vm", Secret::new(&[0x22; 32])).unwrap();
    assert!(matches!(
        wrong.resolve(None).await,
        Err(Error::WrongKey { .. })
    ));
    let absent = Parcel::new(store.clone(), "absent", secret()).unwrap();
    assert!(matches!(
        absent.resolve(None).await,
        Err(Error::NoParcel { .. })
    ));
    assert!(matches!(
        parcel.resolve(Some(3)).await,
        Err(Error::NoVersion { version: 3, .. })
    ));
}

async fn conformance(store: Store, raw: Arc<dyn ObjectStore>) {
    let work = tempfile::tempdir().unwrap();
    chunk_objects(&store).await;
    versions(&store, &raw).await;
    parcel_round_trip(&store, &raw, work.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_memory() {
    let raw: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    conformance(
        Store::from_object_store(raw.clone(), "memory://", true),
        raw,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_local_dir() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", dir.path().display());
    let store = Store::open(&url, &StoreOptions::default()).unwrap();
    // Opening creates nothing; the raw view below needs the directory.
    std::fs::create_dir(dir.path().join("store")).unwrap();
    let raw: Arc<dyn ObjectStore> = Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("store")).unwrap(),
    );
    conformance(store, raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_s3() {
    let server = support::S3Server::start();
    let s3 = common::s3_builder(&server).build().unwrap();
    let raw: Arc<dyn ObjectStore> = Arc::new(object_store::prefix::PrefixStore::new(s3, "conf"));
    let store = Store::from_object_store(raw.clone(), "s3://isr-test/conf", true);
    conformance(store, raw).await;
    // The objects really are in the server's bucket, under the prefix.
    assert!(server.bucket_dir().join("conf/chunks").is_dir());
}

/// The http mirror is read-only: everything a reader needs works, every
/// write is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_http_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", dir.path().display());
    let writer = Parcel::new(
        Store::open(&url, &StoreOptions::default()).unwrap(),
        "vm",
        secret(),
    )
    .unwrap();
    let image = work.path().join("image");
    support::write_mixed_image(&image, 4 << 20, 3);
    import(&writer, &image, &options(), no_progress())
        .await
        .unwrap();
    import(&writer, &image, &options(), no_progress())
        .await
        .unwrap();

    let server = support::HttpServer::start(&dir.path().join("store"));
    let mirror = Store::open(&server.url(), &StoreOptions::default()).unwrap();
    assert!(!mirror.is_writable());
    let reader = Parcel::new(mirror.clone(), "vm", secret()).unwrap();
    let (version, manifest) = reader.resolve(None).await.unwrap();
    assert_eq!(version, 2);
    let out = work.path().join("out");
    export(&reader, version, &manifest, &out, no_progress())
        .await
        .unwrap();
    assert_eq!(support::sha256(&out), support::sha256(&image));
    assert!(
        verify(&reader, 1, &manifest, no_progress())
            .await
            .unwrap()
            .bad
            .is_empty()
    );
    assert_eq!(mirror.head("absent").await.unwrap(), None);

    let chunk = ChunkEncoder::new(secret(), 1).encode(b"x").unwrap();
    assert!(matches!(
        mirror.put_chunk(&chunk.id, Bytes::new()).await,
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(
        import(&reader, &image, &options(), no_progress()).await,
        Err(Error::ReadOnly { .. })
    ));
}
