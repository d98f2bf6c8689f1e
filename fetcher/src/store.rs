//! A store: where parcels live, named by URL, on top of one `object_store`
//! back end. Layout inside the store (under the URL's path):
//!
//! ```text
//! chunks/<2 hex>/<64 hex>            content-addressed chunks, shared by all parcels
//! parcels/<name>/versions/<20 digits> one immutable manifest per version
//! parcels/<name>/HEAD                 hint: the newest version (never trusted alone)
//! ```
//!
//! Publishing version N+1 *is* creating its manifest with put-if-absent
//! (`PutMode::Create`), so two writers can never both publish N+1. HEAD is the
//! highest version that exists: found from the hint by probing upward, then
//! bisecting, in O(log N) existence checks and no listing (an http mirror
//! cannot list).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use format::ChunkId;
use object_store::client::SpawnedReqwestConnector;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

use crate::Error;

/// Tunables for opening a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Overrides the S3 endpoint (otherwise `AWS_ENDPOINT_URL`, then AWS).
    pub endpoint: Option<String>,
    /// How long transient errors (timeouts, 5xx, refused connections) are
    /// retried, with exponential backoff, before an operation fails.
    pub retry_timeout: Duration,
    /// Timeout of one request.
    pub request_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            endpoint: None,
            retry_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Whether a put created the object or found it there already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was created by this put.
    Created,
    /// An object of that name existed already (for content-addressed chunks:
    /// the same content).
    AlreadyPresent,
}

/// A store of parcels.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: String,
    writable: bool,
}

/// Checks a parcel name: 1–128 characters of `A-Z a-z 0-9 . _ -`, not
/// starting with a dot.
pub fn validate_parcel_name(name: &str) -> Result<(), Error> {
    let bad = |why| {
        Err(Error::BadParcelName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if name.starts_with('.') {
        return bad("must not start with a dot");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return bad("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

impl Store {
    /// Opens the store named by `url`: `file:///path`, `s3://bucket/prefix`,
    /// `http(s)://host/path` (read-only) or `memory://` (empty, private).
    pub fn open(url: &str, options: &StoreOptions) -> Result<Store, Error> {
        let bad = |why: String| Error::BadUrl {
            url: url.to_owned(),
            why,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: 10,
            retry_timeout: options.retry_timeout,
        };
        let client = ClientOptions::new()
            .with_timeout(options.request_timeout)
            .with_connect_timeout(Duration::from_secs(5));
        let (inner, writable): (Arc<dyn ObjectStore>, bool) = match parsed.scheme() {
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|_| bad("not an absolute local path".into()))?;
                std::fs::create_dir_all(&path)
                    .map_err(|e| bad(format!("cannot create {}: {e}", path.display())))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&path)
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(fs), true)
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("no bucket: use s3://BUCKET/PREFIX".into()))?;
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry);
                let endpoint = options
                    .endpoint
                    .clone()
                    .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
                let mut client = client;
                if let Some(endpoint) = endpoint {
                    // The user named a plain-http endpoint: allow it.
                    if endpoint.starts_with("http://") {
                        client = client.with_allow_http(true);
                    }
                    builder = builder.with_endpoint(endpoint);
                }
                if std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1") {
                    client = client.with_allow_http(true);
                }
                let s3 = builder
                    .with_http_connector(SpawnedReqwestConnector::new(io_runtime()?))
                    .with_client_options(client)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                (with_prefix(Arc::new(s3), parsed.path()), true)
            }
            "http" | "https" => {
                let http = object_store::http::HttpBuilder::new()
                    .with_url(url)
                    .with_retry(retry)
                    .with_http_connector(SpawnedReqwestConnector::new(io_runtime()?))
                    .with_client_options(client.with_allow_http(true))
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(http), false)
            }
            "memory" => (Arc::new(object_store::memory::InMemory::new()), true),
            other => {
                return Err(bad(format!(
                    "unknown scheme {other:?}: use file://, s3://, http(s):// or memory://"
                )));
            }
        };
        Ok(Store {
            inner,
            url: url.to_owned(),
            writable,
        })
    }

    /// Wraps an existing back end (tests use this to share an in-memory store
    /// or to inject latency and faults).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: &str, writable: bool) -> Store {
        Store {
            inner,
            url: url.to_owned(),
            writable,
        }
    }

    /// The URL the store was opened with (used in messages).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the store accepts writes.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The object name of a chunk.
    pub fn chunk_path(id: &ChunkId) -> String {
        let hex = id.to_string();
        format!("chunks/{}/{hex}", &hex[..2])
    }

    /// The object name of a manifest.
    pub fn manifest_path(parcel: &str, version: u64) -> String {
        format!("parcels/{parcel}/versions/{version:020}")
    }

    fn head_path(parcel: &str) -> String {
        format!("parcels/{parcel}/HEAD")
    }

    /// Fetches a chunk object.
    pub async fn get_chunk(&self, id: &ChunkId) -> Result<Bytes, Error> {
        self.get("get chunk", &Self::chunk_path(id)).await
    }

    /// Whether a chunk object exists.
    pub async fn has_chunk(&self, id: &ChunkId) -> Result<bool, Error> {
        self.exists("check chunk", &Self::chunk_path(id)).await
    }

    /// Stores a chunk object unless one of that name exists (names derive from
    /// content, so an existing one holds the same bytes).
    pub async fn put_chunk(&self, id: &ChunkId, object: Bytes) -> Result<PutOutcome, Error> {
        self.create("put chunk", &Self::chunk_path(id), object)
            .await
    }

    /// Fetches a manifest; `None` if that version does not exist.
    pub async fn get_manifest(&self, parcel: &str, version: u64) -> Result<Option<Bytes>, Error> {
        match self
            .get("get manifest", &Self::manifest_path(parcel, version))
            .await
        {
            Ok(b) => Ok(Some(b)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates version `version` of `parcel`: the commit point of a publish.
    /// Fails with [`Error::VersionExists`] if another writer created it first.
    pub async fn create_manifest(
        &self,
        parcel: &str,
        version: u64,
        object: Bytes,
    ) -> Result<(), Error> {
        match self
            .create(
                "publish manifest",
                &Self::manifest_path(parcel, version),
                object,
            )
            .await?
        {
            PutOutcome::Created => Ok(()),
            PutOutcome::AlreadyPresent => Err(Error::VersionExists {
                parcel: parcel.to_owned(),
                version,
            }),
        }
    }

    /// The newest version of `parcel`, or `None` if it has none.
    pub async fn head(&self, parcel: &str) -> Result<Option<u64>, Error> {
        let exists = |v: u64| async move {
            self.exists("check manifest", &Self::manifest_path(parcel, v))
                .await
        };
        let hint = match self.get("get HEAD hint", &Self::head_path(parcel)).await {
            Ok(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok()),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        // `lo` exists (or is 0), `hi` does not.
        let mut lo = match hint {
            Some(h) if h > 0 && exists(h).await? => h,
            _ => 0,
        };
        let mut step = 1u64;
        let mut hi = loop {
            let v = lo.saturating_add(step);
            if !exists(v).await? {
                break v;
            }
            lo = v;
            step = step.saturating_mul(2);
        };
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if exists(mid).await? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok((lo > 0).then_some(lo))
    }

    /// Records `version` as the HEAD hint (plain overwrite: the hint only
    /// speeds up [`head`](Self::head), which checks it).
    pub async fn put_head_hint(&self, parcel: &str, version: u64) -> Result<(), Error> {
        self.check_writable()?;
        let path = Self::head_path(parcel);
        self.inner
            .put(
                &Path::from(path.as_str()),
                PutPayload::from(version.to_string()),
            )
            .await
            .map(|_| ())
            .map_err(|e| self.error("put HEAD hint", &path, e))
    }

    pub(crate) async fn get(&self, op: &'static str, path: &str) -> Result<Bytes, Error> {
        let location = Path::from(path);
        let result = self.inner.get(&location).await;
        match result {
            Ok(r) => r.bytes().await.map_err(|e| self.error(op, path, e)),
            Err(e) => Err(self.error(op, path, e)),
        }
    }

    async fn exists(&self, op: &'static str, path: &str) -> Result<bool, Error> {
        match self.inner.head(&Path::from(path)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(op, path, e)),
        }
    }

    pub(crate) async fn create(
        &self,
        op: &'static str,
        path: &str,
        object: Bytes,
    ) -> Result<PutOutcome, Error> {
        self.check_writable()?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&Path::from(path), PutPayload::from(object), opts)
            .await
        {
            Ok(_) => Ok(PutOutcome::Created),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(PutOutcome::AlreadyPresent),
            Err(e) => Err(self.error(op, path, e)),
        }
    }

    pub(crate) async fn delete(&self, op: &'static str, path: &str) -> Result<(), Error> {
        self.check_writable()?;
        match self.inner.delete(&Path::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(op, path, e)),
        }
    }

    /// The object name of a parcel's lease.
    pub fn lease_path(parcel: &str) -> String {
        format!("parcels/{parcel}/lease")
    }

    fn check_writable(&self) -> Result<(), Error> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                store: self.url.clone(),
            })
        }
    }

    fn error(&self, op: &'static str, path: &str, e: object_store::Error) -> Error {
        let object = path.to_owned();
        let store = self.url.clone();
        match e {
            object_store::Error::NotFound { .. } => Error::NotFound { op, object, store },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => Error::Denied {
                op,
                object,
                store,
                detail: source.to_string(),
            },
            source => Error::Store {
                op,
                object,
                store,
                source: Box::new(source),
            },
        }
    }
}

/// The runtime that drives every HTTP connection of every store in this
/// process. A connection lives on the runtime it was opened from; a store
/// used from two runtimes (the daemon takes the lease on one, the engine
/// fetches on another) would otherwise reuse a pooled connection whose
/// runtime is not running, and its requests would hang until they time
/// out. Spawning all HTTP I/O here makes a store usable from any runtime,
/// or from none.
fn io_runtime() -> Result<tokio::runtime::Handle, Error> {
    static IO: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    let rt = IO.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("isr-store-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(Error::Invalid(format!(
            "cannot start the store's I/O runtime: {e}"
        ))),
    }
}

fn with_prefix(store: Arc<dyn ObjectStore>, prefix: &str) -> Arc<dyn ObjectStore> {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parcel_names_are_checked() {
        for ok in ["vm", "my-vm.2026_11", "A"] {
            assert!(validate_parcel_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "../x", &"x".repeat(129)] {
            assert!(validate_parcel_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_checked() {
        let o = StoreOptions::default();
        assert!(matches!(
            Store::open("ftp://x", &o),
            Err(Error::BadUrl { .. })
        ));
        assert!(matches!(
            Store::open("not a url", &o),
            Err(Error::BadUrl { .. })
        ));
        assert!(matches!(
            Store::open("s3:///prefix", &o),
            Err(Error::BadUrl { .. })
        ));
        assert!(Store::open("memory://", &o).unwrap().is_writable());
        assert!(
            !Store::open("http://127.0.0.1:1/x", &o)
                .unwrap()
                .is_writable()
        );
    }
}
