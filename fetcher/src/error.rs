//! Errors of the fetcher: each names the object, the store and the cause.

use format::ChunkId;

/// Why a chunk could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChunkFault {
    /// The manifest names it but the store does not have it.
    #[error("missing from the store")]
    Missing,
    /// The store failed to deliver it.
    #[error("{0}")]
    Store(Box<Error>),
    /// It arrived but did not decode (corrupt, truncated, tampered with).
    #[error("{0}")]
    Decode(#[from] format::Error),
    /// Its decoding was cancelled: the runtime shut down (a suspend with
    /// fetches in flight).
    #[error("not decoded: isr is shutting down")]
    Cancelled,
}

/// An error of a store or parcel operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store URL could not be understood or opened.
    #[error("store URL {url}: {why}")]
    BadUrl { url: String, why: String },
    /// The S3 endpoint (from `from`) is not a usable URL.
    #[error("S3 endpoint {endpoint:?} (from {from}) for store {store}: {why}")]
    BadEndpoint {
        endpoint: String,
        from: &'static str,
        store: String,
        why: String,
    },
    /// The HTTP(S) client of an s3:// or http(s):// store could not be built.
    #[error("cannot set up the HTTPS client for {store}: {why}")]
    HttpClient { store: String, why: String },
    /// A `file://` store whose directory does not exist (only a publish
    /// creates one).
    #[error(
        "store {store} does not exist (no directory {path}); check the URL, or import a parcel to create it"
    )]
    NoStore { store: String, path: String },
    /// The store does not refuse to create an object that exists, so two
    /// writers could both publish one version.
    #[error(
        "store {store} does not refuse to overwrite an existing object (it ignores the conditional create, If-None-Match: *), so two hosts could both publish the same version; isr does not publish to it. Use a store whose conditional writes work (AWS S3, MinIO, Ceph RGW, a file:// directory)"
    )]
    UntrustedStore { store: String },
    /// An object that must exist does not.
    #[error("{op} {object} in {store}: not found")]
    NotFound {
        op: &'static str,
        object: String,
        store: String,
    },
    /// The store refused the credentials or the operation.
    #[error("{op} {object} in {store}: access denied ({detail})")]
    Denied {
        op: &'static str,
        object: String,
        store: String,
        detail: String,
    },
    /// Any other store failure (after retries, for transient ones).
    #[error("{op} {object} in {store} failed{}: {source}", retried(*attempts, *seconds))]
    Store {
        op: &'static str,
        object: String,
        store: String,
        /// Requests made, the last (failed) one included.
        attempts: u32,
        /// Seconds from the first request to giving up.
        seconds: f64,
        /// Whether the store could not be reached at all (refused
        /// connections, timeouts), as the store layer judged the failure.
        unreachable: bool,
        #[source]
        source: Box<object_store::Error>,
    },
    /// A write to a read-only store (an http(s) mirror).
    #[error("store {store} is read-only (an http(s) mirror); use file:// or s3:// to write")]
    ReadOnly { store: String },
    /// A parcel name isr does not accept.
    #[error("invalid parcel name {name:?}: {why}")]
    BadParcelName { name: String, why: &'static str },
    /// The parcel has no version in the store.
    #[error("parcel {parcel} does not exist in {store}")]
    NoParcel { parcel: String, store: String },
    /// The asked-for version does not exist.
    #[error("parcel {parcel} has no version {version} (HEAD is version {head})")]
    NoVersion {
        parcel: String,
        version: u64,
        head: u64,
    },
    /// The asked-for version was removed by `isr gc`.
    #[error(
        "version {version} of parcel {parcel} was removed by isr gc (the oldest version kept is {oldest})"
    )]
    VersionRemoved {
        parcel: String,
        version: u64,
        oldest: u64,
    },
    /// The store cannot list its objects (an http(s) mirror).
    #[error(
        "store {store} cannot list its objects (an http(s) mirror has no listing; use the store's own file:// or s3:// URL): {detail}"
    )]
    NoListing { store: String, detail: String },
    /// gc could not read a version it must keep, so it cannot know which
    /// chunks are in use: it deleted no chunk (`removed` counts any it had
    /// deleted before a version that appeared during the run failed).
    #[error("{}", gc_blocked(parcel, *version, *removed, source))]
    GcBlocked {
        parcel: String,
        version: u64,
        removed: u64,
        #[source]
        source: Box<Error>,
    },
    /// The manifest was written under another key.
    #[error("the key does not open parcel {parcel} (manifest {object})")]
    WrongKey { parcel: String, object: String },
    /// The manifest is damaged or of an unsupported format.
    #[error("manifest {object} of parcel {parcel} is unusable: {source}")]
    BadManifest {
        parcel: String,
        object: String,
        #[source]
        source: format::Error,
    },
    /// A chunk named by a manifest is missing, unreadable or corrupt.
    #[error("chunk {id} ({image} chunk {index}) of parcel {parcel} version {version}: {fault}")]
    BadChunk {
        id: ChunkId,
        image: crate::Image,
        index: u64,
        parcel: String,
        version: u64,
        fault: ChunkFault,
    },
    /// Somebody else published this version first (put-if-absent lost), or
    /// at the same time (`concurrent`: the store let both creates through and
    /// the manifest read back was the other writer's).
    #[error("{}", if *concurrent {
        format!("another writer published version {version} of parcel {parcel} at the same time; nothing of yours was published")
    } else {
        format!("version {version} of parcel {parcel} was published by another writer first; nothing was overwritten")
    })]
    VersionExists {
        parcel: String,
        version: u64,
        concurrent: bool,
    },
    /// Another process has the cache open.
    #[error("cache {dir} is in use by another isr process ({holder})")]
    CacheBusy { dir: String, holder: String },
    /// Another host (or session) holds the parcel's lease.
    #[error(
        "parcel {parcel} is in use by {holder}; stop it there first, or take it over with --steal"
    )]
    LeaseHeld { parcel: String, holder: String },
    /// The lease was taken over while this session ran.
    #[error(
        "the lease on parcel {parcel} is no longer ours: it is held by {holder}; nothing was published"
    )]
    LeaseLost { parcel: String, holder: String },
    /// The lease was stolen and the stealer fenced this session: its
    /// commit lost to the stealer's fence version. Nothing was published;
    /// every change is still in the cache.
    #[error(
        "the lease on parcel {parcel} was taken over by {holder} (isr resume --steal), which fences this session (HEAD is version {version}): nothing of it was published. Its {dirty} changed chunks are still in the cache {cache}; to keep them, publish them as a new parcel: isr fork --parcel {parcel} --to NEW-NAME (with the same --store and --key-file)"
    )]
    Fenced {
        parcel: String,
        holder: String,
        version: u64,
        dirty: u64,
        cache: String,
    },
    /// Local changes and a newer version from elsewhere: never merged.
    #[error("{0}")]
    Conflict(String),
    /// A read of a missing chunk waited longer than the miss timeout.
    #[error(
        "chunk {id} (disk chunk {index}) of parcel {parcel}: not fetched after {seconds} s waiting ({cause})"
    )]
    MissTimeout {
        id: ChunkId,
        index: u64,
        parcel: String,
        seconds: u64,
        cause: String,
    },
    /// One failure seen by several waiters (e.g. of a shared fetch).
    #[error(transparent)]
    Shared(#[from] std::sync::Arc<Error>),
    /// A request that contradicts the parcel (e.g. another chunk size).
    #[error("{0}")]
    Invalid(String),
    /// A sync of the cache image failed earlier in this session; writes made
    /// before it may be lost, so every later flush fails too.
    #[error(
        "an earlier sync of {path} failed ({first}): writes since the last good flush may be lost; every flush fails until the device is stopped (the dirty chunks stay marked)"
    )]
    SyncFailed { path: String, first: String },
    /// A destination isr will not write: writing it would destroy
    /// something that is not isr's (a device, another file, a link).
    #[error("{path}: {why}")]
    Refused { path: String, why: String },
    /// A local file failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn gc_blocked(parcel: &str, version: u64, removed: u64, source: &Error) -> String {
    let done = if removed == 0 {
        "gc removed no chunk".to_owned()
    } else {
        format!("gc stopped after removing {removed} unreferenced chunks")
    };
    format!(
        "{done}: version {version} of parcel {parcel} cannot be read ({source}); gc must read every version it keeps to know which chunks are in use, and assumes one key opens every parcel of the store"
    )
}

/// " after N attempts in S s" when a failure was retried.
fn retried(attempts: u32, seconds: f64) -> String {
    if attempts > 1 {
        format!(" after {attempts} attempts in {seconds:.1} s")
    } else {
        String::new()
    }
}

/// What a failure means for the user, beyond its message: the CLI's exit
/// status and the `kind` of its JSON errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The store could not be reached (refused connections, timeouts)
    /// for the whole retry timeout.
    Unreachable,
    /// Another host or writer has the parcel: its lease is held by
    /// another, this session was fenced or lost its lease, or another
    /// writer published first (or a cache conflicts with a newer version).
    Conflict,
    /// What the user typed cannot work: a malformed store URL or endpoint.
    Usage,
    /// Anything else.
    Other,
}

impl Error {
    /// Whether this is the store being out of reach (after the retries):
    /// refused, reset or timed-out connections, which working offline rides
    /// out, unlike a refusal or a missing object.
    pub fn is_unreachable(&self) -> bool {
        self.class() == ErrorClass::Unreachable
    }

    /// What kind of failure this is (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Store {
                unreachable: true, ..
            } => ErrorClass::Unreachable,
            Error::BadChunk {
                fault: ChunkFault::Store(inner),
                ..
            } => inner.class(),
            Error::Shared(inner) => inner.class(),
            Error::LeaseHeld { .. }
            | Error::LeaseLost { .. }
            | Error::Fenced { .. }
            | Error::Conflict(_)
            | Error::VersionExists { .. } => ErrorClass::Conflict,
            Error::BadUrl { .. } | Error::BadEndpoint { .. } => ErrorClass::Usage,
            _ => ErrorClass::Other,
        }
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}
