//! What many commands share: the argument groups that say where a parcel is
//! (`--store`, `--parcel`, `--key-file`, …) and how its device behaves, and
//! opening them: the key file, the store, the parcel, and a fetcher error
//! in the user's words.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use fetcher::{Parcel, Store, StoreOptions};
use format::Secret;

use crate::output;

/// Where the parcel is and how to open it.
#[derive(Debug, Args, Clone)]
pub struct ParcelArgs {
    /// Store URL: file:///path, s3://bucket/prefix, http(s)://mirror, memory://.
    #[arg(long, env = "ISR_STORE")]
    pub store: String,
    /// S3 endpoint (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// Parcel name.
    #[arg(long)]
    pub parcel: String,
    /// The secret key file (see `isr keygen`).
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: PathBuf,
    /// Seconds to keep retrying a store that fails transiently (timeouts,
    /// 5xx, refused connections), with exponential backoff.
    #[arg(long, env = "ISR_RETRY_TIMEOUT", default_value_t = 60)]
    pub retry_timeout: u64,
}

/// Where the store is (for the commands on a whole store, or on a parcel
/// named by an argument).
#[derive(Debug, Args, Clone)]
pub struct StoreArgs {
    /// Store URL: file:///path, s3://bucket/prefix, http(s)://mirror, memory://.
    #[arg(long, env = "ISR_STORE")]
    pub store: String,
    /// S3 endpoint (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// Seconds to keep retrying a store that fails transiently (timeouts,
    /// 5xx, refused connections), with exponential backoff.
    #[arg(long, env = "ISR_RETRY_TIMEOUT", default_value_t = 60)]
    pub retry_timeout: u64,
}

/// How a resumed parcel's device and cache behave.
#[derive(Debug, Args, Clone)]
pub struct DeviceArgs {
    /// Root of the local caches (default: /var/lib/isr as root, else
    /// $XDG_CACHE_HOME/isr).
    #[arg(long, env = "ISR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Break another holder's lease on the parcel.
    #[arg(long)]
    pub steal: bool,
    /// Seconds a read of a chunk not yet fetched waits for the store.
    #[arg(long, default_value_t = 600)]
    pub miss_timeout: u64,
    /// Do not prefetch in the background (fetch on demand only).
    #[arg(long)]
    pub no_prefetch: bool,
    /// Work from the local cache without contacting the store (after `isr
    /// hoard`, or a suspend with --offline). Without it, a store that cannot
    /// be reached while a cache exists also means working offline; the
    /// daemon reconnects by itself when the store is back.
    #[arg(long)]
    pub offline: bool,
    /// Upload dirty chunks in the background (as `isr sync` does) whenever
    /// the device has been idle for this many seconds.
    #[arg(long, value_name = "SECS")]
    pub trickle: Option<u64>,
    /// Cap the daemon's chunk transfers (fetch, prefetch, trickle,
    /// suspend), each way: 10M = 10 MB/s; K, M, G (powers of 1000) or
    /// KiB, MiB, GiB.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// How the cache image's data is read and written: `direct` (O_DIRECT:
    /// past this host's page cache; the guest caches its own disk) or
    /// `buffered` (through it). Recorded in the cache: without it, as the
    /// cache was last asked (never asked: direct). A file system that keeps
    /// files in memory (tmpfs) works buffered (and warns, when asked).
    #[arg(long, env = "ISR_CACHE_IO", value_name = "MODE", value_parser = fetcher::CacheIo::parse)]
    pub cache_io: Option<fetcher::CacheIo>,
}

/// A transfer rate (`--bwlimit`): `10M`, `512KiB`, ….
pub fn parse_rate(s: &str) -> Result<u64, String> {
    fetcher::parse_rate(s)
}

pub fn open_parcel(a: &ParcelArgs) -> anyhow::Result<Parcel> {
    let secret = read_key(&a.key_file)?;
    let store = open_store(&StoreArgs {
        store: a.store.clone(),
        endpoint: a.endpoint.clone(),
        retry_timeout: a.retry_timeout,
    })?;
    Ok(Parcel::new(store, &a.parcel, secret)?)
}

/// The secret in key file `path` (with a warning if others can read it).
pub fn read_key(path: &Path) -> anyhow::Result<Secret> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    warn_if_key_exposed(path);
    Secret::from_key_file_bytes(&bytes).with_context(|| {
        format!(
            "{} is not an isr key (32 bytes, or 64 hex digits; see `isr keygen`)",
            path.display()
        )
    })
}

pub fn open_store(a: &StoreArgs) -> anyhow::Result<Store> {
    let options = StoreOptions {
        endpoint: a.endpoint.clone(),
        retry_timeout: std::time::Duration::from_secs(a.retry_timeout),
        ..StoreOptions::default()
    };
    Ok(Store::open(&a.store, &options)?)
}

/// The arguments of a parcel command for a parcel named by an argument.
pub fn parcel_args(store: &StoreArgs, parcel: &str, key_file: &Path) -> ParcelArgs {
    ParcelArgs {
        store: store.store.clone(),
        endpoint: store.endpoint.clone(),
        parcel: parcel.to_owned(),
        key_file: key_file.to_owned(),
        retry_timeout: store.retry_timeout,
    }
}

/// Warns (once per process) when the key file can be read by its group or
/// by others: whoever reads it can decrypt every parcel made with it.
fn warn_if_key_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    static WARNED: std::sync::Once = std::sync::Once::new();
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        WARNED.call_once(|| {
            output::warn(format_args!(
                "key file {p} is readable by others (mode {mode:04o}); chmod 600 {p}",
                p = path.display()
            ));
        });
    }
}

/// Turns a fetcher error into the user's words (a wrong key names the file).
pub fn explain(e: fetcher::Error, a: &ParcelArgs) -> anyhow::Error {
    match e {
        fetcher::Error::WrongKey { .. } => anyhow::anyhow!(
            "the key in {} does not open parcel {}",
            a.key_file.display(),
            a.parcel
        ),
        e => e.into(),
    }
}

/// This host's name, as a lease and a manifest record it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| {
            h.trim()
                .chars()
                .take(format::manifest::MAX_HOST_LEN)
                .collect()
        })
        .unwrap_or_else(|_| "unknown".into())
}
