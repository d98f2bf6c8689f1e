//! The explorer's store: an in-memory object store that records every
//! object it commits into the run's log (so that a crash state has the
//! store as it was at that point) and injects seeded faults: GETs of chunk
//! objects that fail (transient) and short delays.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use fetcher::Store;
use fetcher::local::cache::FileLog;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use super::model::{Event, Events};

/// The objects of a store: path → bytes.
pub type Objects = BTreeMap<String, Bytes>;

/// The URL every explorer store has (the cache directory derives from it).
pub const URL: &str = "memory://explore";

pub struct Faulty {
    inner: Arc<dyn ObjectStore>,
    /// Where commits are recorded (none while a state is being checked).
    record: Option<(Arc<FileLog>, Arc<Events>)>,
    /// Per mille of chunk GETs that fail (changeable while it runs).
    fail_per_mille: Arc<AtomicU64>,
    seed: u64,
    n: AtomicU64,
}

impl fmt::Debug for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty")
    }
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

impl Faulty {
    fn roll(&self) -> u64 {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        super::splitmix(self.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
    fn commit(&self, e: Event) {
        if let Some((log, events)) = &self.record {
            events.push(log, e);
        }
    }
}

/// A store holding `objects`, recording its commits into `log` (if any),
/// failing `fail_per_mille` ‰ of chunk GETs.
pub fn store(
    rt: &tokio::runtime::Runtime,
    objects: &Objects,
    record: Option<(Arc<FileLog>, Arc<Events>)>,
    fail_per_mille: u64,
    seed: u64,
) -> (Store, Arc<InMemory>) {
    let (store, mem, _) = store_with_switch(rt, objects, record, fail_per_mille, seed);
    (store, mem)
}

/// [`store`], with the failure rate to change later.
pub fn store_with_switch(
    rt: &tokio::runtime::Runtime,
    objects: &Objects,
    record: Option<(Arc<FileLog>, Arc<Events>)>,
    fail_per_mille: u64,
    seed: u64,
) -> (Store, Arc<InMemory>, Arc<AtomicU64>) {
    let fail = Arc::new(AtomicU64::new(fail_per_mille));
    let inner = Arc::new(InMemory::new());
    rt.block_on(async {
        for (p, b) in objects {
            inner
                .put(&ObjectPath::from(p.as_str()), b.clone().into())
                .await
                .unwrap();
        }
    });
    let faulty = Faulty {
        inner: inner.clone(),
        record,
        fail_per_mille: fail.clone(),
        seed,
        n: AtomicU64::new(0),
    };
    (
        Store::from_object_store(Arc::new(faulty), URL, true),
        inner,
        fail,
    )
}

/// The objects of a store into which `image` was imported as version 1
/// of parcel `name` under `secret`, in chunks of `chunk` bytes (`dir`
/// holds the image file meanwhile).
pub fn imported(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    image: &[u8],
    name: &str,
    secret: format::Secret,
    chunk: u32,
) -> Objects {
    let path = dir.join("disk.img");
    std::fs::write(&path, image).unwrap();
    let (store, mem) = store(rt, &Objects::new(), None, 0, 0);
    let parcel = fetcher::Parcel::new(store, name, secret).unwrap();
    let opts = fetcher::ops::ImportOptions {
        chunk_size: Some(chunk),
        ..Default::default()
    };
    rt.block_on(fetcher::ops::import(
        &parcel,
        &path,
        &opts,
        fetcher::no_progress(),
    ))
    .unwrap();
    std::fs::remove_file(&path).unwrap();
    objects(rt, &mem)
}

/// Every object of `os`.
pub fn objects(rt: &tokio::runtime::Runtime, os: &InMemory) -> Objects {
    rt.block_on(async {
        let mut out = Objects::new();
        let metas: Vec<ObjectMeta> = os.list(None).map(|m| m.unwrap()).collect().await;
        for m in metas {
            let b = os.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.insert(m.location.to_string(), b);
        }
        out
    })
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let bytes: Bytes = payload.clone().into();
        let r = self.inner.put_opts(location, payload, opts).await?;
        self.commit(Event::StorePut(location.to_string(), bytes));
        Ok(r)
    }
    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if location.as_ref().starts_with("chunks/") && !options.head {
            let r = self.roll();
            if r % 1000 < self.fail_per_mille.load(Ordering::Relaxed) {
                return Err(object_store::Error::Generic {
                    store: "explore",
                    source: "connection reset (injected)".into(),
                });
            }
            if r.is_multiple_of(7) {
                tokio::time::sleep(std::time::Duration::from_micros(r % 2000)).await;
            }
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
