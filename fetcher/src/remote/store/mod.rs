//! A store: where parcels live, named by URL, on top of one `object_store`
//! back end. Layout inside the store (under the URL's path):
//!
//! ```text
//! chunks/<2 hex>/<64 hex>            content-addressed chunks, shared by all parcels
//! parcels/<name>/versions/<20 digits> one immutable manifest per version
//! parcels/<name>/HEAD                 hint: the newest version (never trusted alone)
//! parcels/<name>/FLOOR                the oldest version `isr gc` kept (only raised)
//! ```
//!
//! Publishing version N+1 *is* creating its manifest with put-if-absent
//! (`PutMode::Create`), so two writers can never both publish N+1. HEAD is the
//! highest version that exists: found from the hint (or the floor, whichever
//! is higher) by probing upward, then bisecting, in O(log N) existence checks
//! and no listing (an http mirror cannot list). Versions below the floor
//! were removed by gc (`history`); versions from the floor to HEAD all
//! exist. Only where the probe finds nothing does [`head`](Store::head) list
//! the parcel's versions.
//!
//! A chunk is reused by a publisher only while it is young (`fresh`): that
//! is what lets `isr gc` delete unreferenced chunks while others publish.
//!
//! Every operation goes through one retry policy (`retry`): transient
//! failures are retried for the store's whole retry timeout, permanent ones
//! fail at once. Because not every S3-compatible server makes its conditional
//! create atomic (or honours it at all), publishing also checks the store
//! (`commit`): once per `Store`, that it refuses to create an existing
//! object, and after each manifest, that the manifest read back is ours.
//!
//! ```text
//! .isr/probe-<32 hex>                 transient: the conditional-create check
//! ```

mod commit;
mod fresh;
mod history;
mod limit;
mod list;
mod open;
mod retry;

pub(crate) use fresh::age_of;
pub use fresh::{ChunkStored, DEFAULT_CHUNK_REFRESH};
pub use list::StoredObject;
pub(crate) use list::version_of;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use format::ChunkId;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::Error;
use limit::Bandwidth;
pub use limit::parse_rate;
pub(crate) use retry::is_unreachable;
use retry::{Failed, Op, Retry};

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
    /// A cap on chunk transfers, bytes per second, each way (`--bwlimit`).
    pub bwlimit: Option<u64>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            endpoint: None,
            retry_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            bwlimit: None,
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
    /// The directory of a `file://` store.
    local_root: Option<Arc<PathBuf>>,
    retry: Retry,
    /// Set once the store has shown that it refuses to create an existing
    /// object (shared by the clones of this `Store`).
    create_checked: Arc<tokio::sync::OnceCell<()>>,
    /// Caps on chunk uploads and downloads (shared by the clones).
    up: Arc<Bandwidth>,
    down: Arc<Bandwidth>,
    /// A chunk older than this is rewritten, not reused (see [`fresh`]).
    chunk_refresh: Duration,
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
    ///
    /// Nothing is created: a `file://` store's directory is made by the first
    /// write into it, so a command that only reads a store that is not there
    /// fails (see [`check_exists`](Self::check_exists)) instead of leaving an
    /// empty one behind.
    pub fn open(url: &str, options: &StoreOptions) -> Result<Store, Error> {
        let backend = open::open(url, options)?;
        let mut store = Store::from_object_store(backend.inner, url, backend.writable);
        store.local_root = backend.local_root.map(Arc::new);
        store.retry.timeout = options.retry_timeout;
        store.set_bwlimit(options.bwlimit, options.bwlimit);
        Ok(store)
    }

    /// Wraps an existing back end (tests use this to share an in-memory store
    /// or to inject latency and faults). Transient failures are retried for
    /// the default retry timeout; see [`with_retry_timeout`](Self::with_retry_timeout).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: &str, writable: bool) -> Store {
        Store {
            inner,
            url: url.to_owned(),
            writable,
            local_root: None,
            retry: Retry {
                timeout: StoreOptions::default().retry_timeout,
            },
            create_checked: Arc::default(),
            up: Arc::default(),
            down: Arc::default(),
            chunk_refresh: fresh::refresh_from_env(),
        }
    }

    /// Caps chunk uploads and downloads at these rates, bytes per second
    /// (`None`: no cap), for every clone of this store, from now on.
    pub fn set_bwlimit(&self, up: Option<u64>, down: Option<u64>) {
        self.up.set(up);
        self.down.set(down);
    }

    /// The caps in force: (up, down), bytes per second.
    pub fn bwlimit(&self) -> (Option<u64>, Option<u64>) {
        (self.up.get(), self.down.get())
    }

    /// The same store, reusing an existing chunk only while it is younger
    /// than `age` (default [`DEFAULT_CHUNK_REFRESH`], or
    /// `$ISR_CHUNK_REFRESH_SECS`); an older one is rewritten to refresh it.
    pub fn with_chunk_refresh(mut self, age: Duration) -> Store {
        self.chunk_refresh = age;
        self
    }

    /// The age below which an existing chunk is reused as it is.
    pub fn chunk_refresh(&self) -> Duration {
        self.chunk_refresh
    }

    /// The same store, retrying transient failures for `timeout`.
    pub fn with_retry_timeout(mut self, timeout: Duration) -> Store {
        self.retry.timeout = timeout;
        self
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

    /// The lease hint of a parcel: the generation its last release left
    /// (it only speeds up finding the lease, which checks it).
    pub(crate) fn lease_hint_path(parcel: &str) -> String {
        format!("parcels/{parcel}/LEASE")
    }

    /// The object name of generation `generation` of a parcel's lease.
    pub fn lease_path(parcel: &str, generation: u64) -> String {
        format!("parcels/{parcel}/leases/{generation:020}")
    }

    /// Fetches a chunk object.
    pub async fn get_chunk(&self, id: &ChunkId) -> Result<Bytes, Error> {
        let object = self.get("get chunk", &Self::chunk_path(id)).await?;
        // The size is known only once it arrived: the next transfer waits.
        self.down.take(object.len() as u64).await;
        Ok(object)
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

    /// The newest version of `parcel`, or `None` if it has none. Probes
    /// upward from the HEAD hint or the floor gc left, whichever is higher;
    /// if that finds nothing (both gone, and versions 1… removed by gc), the
    /// parcel's versions are listed (where the store can list).
    pub async fn head(&self, parcel: &str) -> Result<Option<u64>, Error> {
        // Both at once: one round trip, not two.
        let head_path = Self::head_path(parcel);
        let (hint, floor) = futures::join!(
            self.get_number("get HEAD hint", &head_path),
            self.floor(parcel)
        );
        let (hint, floor) = (hint?, floor?);
        let found = self
            .highest("check manifest", hint.max(floor), |v| {
                Self::manifest_path(parcel, v)
            })
            .await?;
        match found {
            Some(v) => Ok(Some(v)),
            None => self.highest_listed(parcel).await,
        }
    }

    /// A decimal number stored in object `path` (a hint); `None` if the
    /// object is missing or holds something else.
    pub(crate) async fn get_number(
        &self,
        op: &'static str,
        path: &str,
    ) -> Result<Option<u64>, Error> {
        match self.get(op, path).await {
            Ok(b) => Ok(std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The highest `n` ≥ 1 for which object `name(n)` exists, given that
    /// they exist for every `n` from the first one up to the highest (they
    /// are created in order 1, 2, 3…, and gc removes only from below):
    /// probing upward from `hint` (or 1), then bisecting, in O(log n)
    /// existence checks and no listing. A hint that does not exist counts
    /// as none.
    pub(crate) async fn highest(
        &self,
        op: &'static str,
        hint: Option<u64>,
        name: impl Fn(u64) -> String,
    ) -> Result<Option<u64>, Error> {
        let exists = |v: u64| {
            let path = name(v);
            async move { self.exists(op, &path).await }
        };
        // `lo` exists (or is 0), `hi` does not. The hint is usually the
        // answer: it and the next are checked at once, in one round trip.
        let (mut lo, mut step) = match hint {
            Some(h) if h > 0 && h < u64::MAX => {
                let (here, next) = futures::join!(exists(h), exists(h + 1));
                match (here?, next?) {
                    (true, false) => return Ok(Some(h)),
                    (true, true) => (h + 1, 2),
                    (false, _) => (0, 1),
                }
            }
            _ => (0, 1),
        };
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
        let body = Bytes::from(version.to_string());
        self.overwrite("put HEAD hint", &Self::head_path(parcel), body)
            .await
    }

    /// Writes `path` whether or not it exists (a plain put).
    pub(crate) async fn overwrite(
        &self,
        op: &'static str,
        path: &str,
        object: Bytes,
    ) -> Result<(), Error> {
        self.check_writable()?;
        let location = Path::from(path);
        let body = PutPayload::from(object);
        self.retry
            .run_as(self.op(op, path), || {
                self.inner.put(&location, body.clone())
            })
            .await
            .map(|_| ())
            .map_err(|f| self.error(op, path, f))
    }

    pub(crate) async fn get(&self, op: &'static str, path: &str) -> Result<Bytes, Error> {
        let location = Path::from(path);
        self.retry
            .run_as(self.op(op, path), || async {
                // The body is read inside the attempt: a transfer cut off
                // half-way is retried like a refused connection.
                self.inner.get(&location).await?.bytes().await
            })
            .await
            .map_err(|f| self.error(op, path, f))
    }

    pub(crate) async fn exists(&self, op: &'static str, path: &str) -> Result<bool, Error> {
        let location = Path::from(path);
        match self
            .retry
            .run_as(self.op(op, path), || self.inner.head(&location))
            .await
        {
            Ok(_) => Ok(true),
            Err(f) => match self.error(op, path, f) {
                Error::NotFound { .. } => Ok(false),
                e => Err(e),
            },
        }
    }

    /// Creates `path` unless it exists. A retried create may find the object
    /// its own earlier attempt created: callers that must tell that apart
    /// from another writer's object compare contents (see `commit`).
    pub(crate) async fn create(
        &self,
        op: &'static str,
        path: &str,
        object: Bytes,
    ) -> Result<PutOutcome, Error> {
        self.check_writable()?;
        let location = Path::from(path);
        let payload = PutPayload::from(object);
        let attempt = || {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            self.inner.put_opts(&location, payload.clone(), opts)
        };
        match self.retry.run_as(self.op(op, path), attempt).await {
            Ok(_) => Ok(PutOutcome::Created),
            Err(Failed {
                error:
                    object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
                ..
            }) => Ok(PutOutcome::AlreadyPresent),
            Err(f) => Err(self.error(op, path, f)),
        }
    }

    pub(crate) async fn delete(&self, op: &'static str, path: &str) -> Result<(), Error> {
        self.check_writable()?;
        let location = Path::from(path);
        match self
            .retry
            .run_as(self.op(op, path), || self.inner.delete(&location))
            .await
        {
            Ok(()) => Ok(()),
            Err(f) => match self.error(op, path, f) {
                // Gone already (perhaps by an attempt whose answer was lost).
                Error::NotFound { .. } => Ok(()),
                e => Err(e),
            },
        }
    }

    /// [`Error::NoStore`] if this is a `file://` store whose directory does
    /// not exist. Its reads simply find nothing, and its first write creates
    /// it; a reader that finds nothing asks this to say which is missing,
    /// the parcel or the whole store.
    pub fn check_exists(&self) -> Result<(), Error> {
        match &self.local_root {
            Some(root) if !root.is_dir() => Err(Error::NoStore {
                store: self.url.clone(),
                path: root.display().to_string(),
            }),
            _ => Ok(()),
        }
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

    /// Operation `op` on `path`, for the retry policy's log.
    fn op<'a>(&'a self, op: &'static str, path: &'a str) -> Op<'a> {
        Op {
            op,
            object: path,
            store: &self.url,
        }
    }

    fn error(&self, op: &'static str, path: &str, failed: Failed) -> Error {
        let object = path.to_owned();
        let store = self.url.clone();
        match failed.error {
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
                attempts: failed.attempts,
                seconds: failed.elapsed.as_secs_f64(),
                unreachable: is_unreachable(&source),
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
pub(crate) fn io_runtime() -> Result<tokio::runtime::Handle, Error> {
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
