//! A resumed parcel's link to its store: the lease (taken at resume, or
//! later when the daemon started offline and the store came back), working
//! offline, and background uploads (`--trickle`).
//!
//! ```text
//! resume ── store reachable? ── yes ─► lease, reconcile, online
//!               │ no, and a cache exists (or --offline)
//!               ▼
//!           offline: the cache as it is ── every RECONNECT ──► lease taken ─► online
//! trickle: device idle ≥ SECS and dirty chunks not synced ─► Engine::sync (stops on I/O)
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use fetcher::{Engine, Lease, Parcel};
use serde_json::{Value, json};

use crate::args::{DeviceArgs, ParcelArgs, explain, host_name};
use crate::time::now_unix;

/// How long a resume with a cache to fall back on tries the store before
/// working offline (not the whole retry timeout).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an offline daemon tries the store again.
const RECONNECT_EVERY: Duration = Duration::from_secs(15);
/// How long trickle waits after a failed upload before trying again.
const TRICKLE_BACKOFF: Duration = Duration::from_secs(30);

/// The daemon's standing with the store.
#[derive(Debug, Default)]
pub(crate) struct Session {
    lease: Mutex<Option<Lease>>,
    /// Why the daemon works offline; `None`: online.
    offline: Mutex<Option<String>>,
    /// Set once the device is being stopped: background work ends.
    pub(crate) stopping: AtomicBool,
}

impl Session {
    pub(crate) fn new(lease: Option<Lease>, offline: Option<String>) -> Session {
        Session {
            lease: Mutex::new(lease),
            offline: Mutex::new(offline),
            stopping: AtomicBool::new(false),
        }
    }

    pub(crate) fn lease(&self) -> Option<Lease> {
        self.lease.lock().expect("lease lock").clone()
    }

    /// Why the daemon is offline, if it is.
    pub(crate) fn offline(&self) -> Option<String> {
        self.offline.lock().expect("offline lock").clone()
    }

    fn go_online(&self, lease: Lease) {
        *self.lease.lock().expect("lease lock") = Some(lease);
        *self.offline.lock().expect("offline lock") = None;
    }

    fn set_offline(&self, why: String) {
        *self.offline.lock().expect("offline lock") = Some(why);
    }
}

/// The lease nonce file of a cache (kept by an offline suspend).
pub(crate) fn nonce_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join("lease")
}

pub(crate) fn read_nonce(cache_dir: &Path) -> Option<String> {
    std::fs::read_to_string(nonce_path(cache_dir))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Takes the lease on `parcel`'s store (this cache's own, if its nonce is
/// kept), trying the store for at most `probe`; the lease then uses the
/// store's own retry timeout.
pub(crate) fn acquire(
    rt: &tokio::runtime::Runtime,
    parcel: &Parcel,
    cache_dir: &Path,
    probe: Duration,
    steal: bool,
) -> Result<Lease, fetcher::Error> {
    let store = parcel.store().clone().with_retry_timeout(probe);
    let lease = rt.block_on(Lease::acquire(
        &store,
        parcel.name(),
        &host_name(),
        now_unix(),
        read_nonce(cache_dir).as_deref(),
        steal,
    ))?;
    if let Err(e) = fetcher::local::private::write(&nonce_path(cache_dir), &lease.info().nonce) {
        eprintln!(
            "isr: cannot record the lease in {}: {e}",
            cache_dir.display()
        );
    }
    Ok(lease.with_store(parcel.store()))
}

/// How long to try the store before working offline.
pub(crate) fn probe_timeout(retry_timeout: u64) -> Duration {
    PROBE_TIMEOUT.min(Duration::from_secs(retry_timeout))
}

/// Takes the lease at resume, or decides to work offline: with `--offline`,
/// or when a cache exists and the store cannot be reached. Returns the
/// lease (if taken) and, when offline, why.
pub(crate) fn take_lease(
    rt: &tokio::runtime::Runtime,
    parcel: &Parcel,
    (pa, device): (&ParcelArgs, &DeviceArgs),
    cache_dir: &Path,
) -> anyhow::Result<(Option<Lease>, Option<String>)> {
    let name = &pa.parcel;
    let has_cache = fetcher::local::cache::Cache::exists(cache_dir);
    if device.offline {
        if !has_cache {
            bail!(
                "parcel {name} has no cache on this host ({}): resume or hoard it once while the store can be reached, then it works offline",
                cache_dir.display()
            );
        }
        return Ok((None, Some("resumed with --offline".into())));
    }
    // With a cache to fall back on, a store that is away costs seconds,
    // not the whole retry timeout.
    let probe = if has_cache {
        probe_timeout(pa.retry_timeout)
    } else {
        Duration::from_secs(pa.retry_timeout)
    };
    match acquire(rt, parcel, cache_dir, probe, device.steal) {
        Ok(l) => Ok((Some(l), None)),
        Err(e) if has_cache && e.is_unreachable() && !device.steal => {
            Ok((None, Some(format!("the store cannot be reached ({e})"))))
        }
        Err(e) => Err(explain(e, pa)),
    }
}

/// While the daemon is offline, tries the store every [`RECONNECT_EVERY`];
/// once it answers, takes the lease (this cache's own if it kept one) and
/// works online. Ends when the device stops.
pub(crate) fn spawn_reconnect(session: Arc<Session>, engine: Arc<Engine>, pa: &ParcelArgs) {
    let name = pa.parcel.clone();
    let timeout = probe_timeout(pa.retry_timeout);
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let parcel = engine.parcel().clone();
        let cache_dir = engine.cache_dir();
        let mut said = String::new();
        while session.offline().is_some() {
            if sleep_unless_stopping(&session, RECONNECT_EVERY) {
                return;
            }
            match acquire(&rt, &parcel, &cache_dir, timeout, false) {
                Ok(lease) => {
                    let head = rt.block_on(parcel.head()).ok().flatten().unwrap_or(0);
                    if head > engine.base_version() {
                        eprintln!(
                            "isr: warning: parcel {name} moved on to version {head} elsewhere while this cache (based on version {}) was offline: its changes cannot be published over it (isr fork keeps them)",
                            engine.base_version()
                        );
                    }
                    eprintln!(
                        "isr: the store is reachable again: took the lease on parcel {name}; working online"
                    );
                    engine.note_store_reached();
                    session.go_online(lease);
                }
                Err(e) => {
                    engine.note_store_failed(&e);
                    let why = if e.is_unreachable() {
                        format!("the store cannot be reached ({e})")
                    } else {
                        e.to_string()
                    };
                    if why != said && !e.is_unreachable() {
                        eprintln!("isr: still offline: {why}");
                    }
                    said.clone_from(&why);
                    session.set_offline(why);
                }
            }
        }
    });
}

/// Sleeps `d` in small steps; true if the device began stopping meanwhile.
fn sleep_unless_stopping(session: &Session, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if session.stopping.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
    }
    session.stopping.load(Ordering::Relaxed)
}

/// `--trickle SECS`: syncs whenever the device has been idle for `idle`
/// and something dirty is not in the store yet. A sync stops as soon as
/// the device does I/O again (or is being stopped); a failed one (the store
/// went away) is tried again after [`TRICKLE_BACKOFF`]; nothing is dropped.
pub(crate) fn spawn_trickle(session: Arc<Session>, engine: Arc<Engine>, idle: Duration) {
    std::thread::spawn(move || {
        let mut not_before = Instant::now();
        loop {
            if sleep_unless_stopping(&session, Duration::from_secs(1)) {
                return;
            }
            if Instant::now() < not_before || engine.idle_for() < idle || engine.unsynced().0 == 0 {
                continue;
            }
            let stop = AtomicBool::new(false);
            let started = Instant::now();
            let result = std::thread::scope(|scope| {
                scope.spawn(|| {
                    // I/O since the sync began, or a suspend: stop early.
                    while !stop.load(Ordering::Relaxed) {
                        if engine.idle_for() < started.elapsed()
                            || session.stopping.load(Ordering::Relaxed)
                        {
                            stop.store(true, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                });
                let r = engine.sync(fetcher::no_progress(), &stop);
                stop.store(true, Ordering::Relaxed);
                r
            });
            match result {
                Ok(s) if s.uploaded_chunks + s.synced_chunks > 0 => eprintln!(
                    "isr: trickle: {} chunks synced ({} uploaded, {} bytes) in {:.1} s{}",
                    s.synced_chunks,
                    s.uploaded_chunks,
                    s.bytes_uploaded,
                    s.seconds,
                    if s.interrupted {
                        "; stopped: the device is busy"
                    } else {
                        ""
                    }
                ),
                Ok(_) => {}
                Err(e) => {
                    eprintln!(
                        "isr: trickle: {e}; the dirty chunks stay in the cache, trying again in {} s",
                        TRICKLE_BACKOFF.as_secs()
                    );
                    not_before = Instant::now() + TRICKLE_BACKOFF;
                }
            }
        }
    });
}

/// The JSON of a sync's summary.
pub(crate) fn sync_json(name: &str, s: &fetcher::SyncSummary, engine: &Engine) -> Value {
    let (left, left_bytes) = engine.unsynced();
    json!({
        "parcel": name,
        "dirty_chunks": s.dirty_chunks,
        "already_synced": s.already_synced,
        "synced_chunks": s.synced_chunks,
        "uploaded_chunks": s.uploaded_chunks,
        "bytes_uploaded": s.bytes_uploaded,
        "unsynced_chunks": left,
        "unsynced_bytes": left_bytes,
        "interrupted": s.interrupted,
        "seconds": s.seconds,
    })
}

/// The error of a publish that could not reach the store, saying what is
/// kept and what publishes it later (the store's error stays its cause, so
/// the exit status says "unreachable").
pub(crate) fn unpublished(name: &str, e: anyhow::Error, dirty: u64) -> anyhow::Error {
    e.context(format!(
        "nothing was published; every change is kept in the cache ({dirty} dirty chunks): `isr checkin {name}` publishes them once the store is back (or `isr resume` works on offline)"
    ))
}
