//! The daemon that serves a parcel's block device (`isr resume`, `isr run`
//! and `isr recover` start it), its control protocol over a unix socket
//! under the run directory (`/run/isr`, or `$ISR_RUN_DIR`), and the client
//! side that `isr status`, `suspend` and `sync` talk to it with.
//!
//! ```text
//! isr resume ──spawns──► isr resume --foreground --daemon   (setsid, own mount ns)
//!     ▲  one JSON line on stdout: the device, or the error      │ lease, Engine, ublk device
//!     └──────────────────────────────────────────────────────────┘
//! isr status|suspend NAME ──"status"/"suspend"──► <run>/NAME.sock ──► one JSON line back
//! <run>/NAME.json: what `isr recover` needs to reattach after the daemon died
//! ```

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use fetcher::{Engine, EngineOptions, SavedVm};
use serde_json::{Value, json};

use crate::args::{explain, host_name, open_parcel};
use crate::output;
use crate::run_dir::{pid_alive, read_state, run_dir, socket_path, state_path};
use crate::session::{Session, nonce_path};
use crate::time::now_unix;

mod client;
mod control;
mod launch;
mod ram;

pub use client::{answer, ask, ask_with_progress};
use control::{Control, Reply, SuspendRequest};
pub use launch::{Options, start};
use ram::{open_ram, serve_ram};

/// prctl: the process writes back for the kernel (Linux 5.6; not in libc).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// The daemon (`isr resume --foreground`): lease, engine, device, control
/// socket; returns after suspend.
pub fn serve(a: Options) -> anyhow::Result<ExitCode> {
    ublk_target::check_ublk()?;
    let report_ready = a.report_ready;
    let result = serve_inner(&a);
    match result {
        Ok(code) => Ok(code),
        Err(e) if report_ready => {
            println!("{}", output::error_json(&e));
            Err(e)
        }
        Err(e) => Err(e),
    }
}

fn serve_inner(a: &Options) -> anyhow::Result<ExitCode> {
    let name = a.parcel.parcel.clone();
    private_mounts();
    // The kernel writes back through this process (the guest's RAM pages
    // under reclaim, too): its own allocations must not wait for that.
    // SAFETY: prctl with integer arguments only; a refusal (no
    // CAP_SYS_RESOURCE) leaves the process as it was.
    let _ = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    fetcher::local::private::create_dir_all(&run_dir())
        .with_context(|| format!("cannot create {}", run_dir().display()))?;
    let parcel = open_parcel(&a.parcel)?;
    parcel
        .store()
        .set_bwlimit(a.device.bwlimit, a.device.bwlimit);
    let mut options = EngineOptions {
        host: host_name(),
        miss_timeout: Duration::from_secs(a.device.miss_timeout),
        prefetch: !a.device.no_prefetch,
        cache_io: a.device.cache_io,
        ..Default::default()
    };
    if let Some(dir) = &a.device.cache_dir {
        options.cache_root = dir.clone();
    }
    let cache_dir =
        fetcher::local::cache::cache_dir(&options.cache_root, parcel.store().url(), &name);
    fetcher::local::private::create_dir_all(&cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;

    // A device whose daemon died is reattached, not replaced (and so is
    // its RAM device).
    let dead = read_state(&name).filter(|st| !pid_alive(st["pid"].as_i64().unwrap_or(0)));
    let live_device = |key: &str| {
        let id = dead.as_ref()?[key].as_u64()? as u32;
        std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}"))
            .exists()
            .then_some(id)
    };
    let recover = live_device("device_id");
    let recover_ram = recover.and(live_device("ram_device_id"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nonce_path = nonce_path(&cache_dir);
    let reuse = crate::session::read_nonce(&cache_dir);
    let (lease, offline) =
        crate::session::take_lease(&rt, &parcel, (&a.parcel, &a.device), &cache_dir)?;
    if let Some(lease) = &lease {
        fetcher::local::private::write(&nonce_path, &lease.info().nonce)
            .with_context(|| format!("cannot write {}", nonce_path.display()))?;
        if let Some(old) = lease.stolen_from() {
            // Fence the old holder: its commit of the next version now fails.
            let fence = rt
                .block_on(parcel.publish_fence(&host_name(), now_unix()))
                .map_err(|e| explain(e, &a.parcel))?;
            eprintln!(
                "isr: took the lease on parcel {name} from {}; published version {fence} to fence that session",
                old.describe()
            );
        }
    }
    if let Some(why) = &offline {
        eprintln!("isr: parcel {name} works offline from its cache: {why}");
        // Offline, the cache is taken as it is: the store cannot say what
        // moved on.
        options.reconcile = false;
    }
    // Under a live device the cache may not move to another writer's
    // version (the guest's page cache holds the old one).
    options.reattach = recover.is_some();
    let ram_options = a.ram_mib.map(|mib| EngineOptions {
        ram: Some(u64::from(mib) << 20),
        ..options.clone()
    });
    let opened = Engine::open(parcel.clone(), options).and_then(|disk| {
        let ram = match ram_options {
            Some(o) => Some(open_ram(
                parcel.clone(),
                o,
                a.ram_zero && recover_ram.is_none(),
            )?),
            None => None,
        };
        Ok((disk, ram))
    });
    let (engine, ram) = match opened {
        Ok((disk, ram)) => (Arc::new(disk), ram.map(Arc::new)),
        Err(e) => {
            if let Some(lease) = &lease
                && reuse.as_deref() != Some(lease.info().nonce.as_str())
            {
                let _ = rt.block_on(lease.clone().release());
                let _ = std::fs::remove_file(&nonce_path);
            }
            return Err(explain(e, &a.parcel));
        }
    };
    for w in &engine.open_report().warnings {
        eprintln!("isr: warning: {w}");
    }
    if offline.is_some() {
        let s = engine.stats();
        if s.cached_chunks < s.chunks {
            eprintln!(
                "isr: warning: {} of {} chunks of parcel {name} are not cached: reads of them wait for the store (up to --miss-timeout); `isr hoard` while online makes a cache that works offline",
                s.chunks - s.cached_chunks,
                s.chunks
            );
        }
    }
    let session = Arc::new(Session::new(lease, offline.clone()));
    if offline.is_some() {
        crate::session::spawn_reconnect(session.clone(), engine.clone(), &a.parcel);
    }
    if let Some(secs) = a.device.trickle {
        crate::session::spawn_trickle(session.clone(), engine.clone(), Duration::from_secs(secs));
    }

    let state = json!({
        "pid": std::process::id(),
        "store": a.parcel.store,
        "endpoint": a.parcel.endpoint,
        "key_file": std::fs::canonicalize(&a.parcel.key_file).unwrap_or(a.parcel.key_file.clone()),
        "retry_timeout": a.parcel.retry_timeout,
        "cache_root": a.device.cache_dir,
        "miss_timeout": a.device.miss_timeout,
        "no_prefetch": a.device.no_prefetch,
        "trickle": a.device.trickle,
        "bwlimit": a.device.bwlimit,
        "cache_io": a.device.cache_io.map(fetcher::CacheIo::name),
        "ram_mib": a.ram_mib,
    });
    let device: Arc<OnceLock<ublk_target::DeviceInfo>> = Arc::new(OnceLock::new());
    // The RAM's device comes up first: the disk's readiness names both.
    let ram_device: Arc<OnceLock<ublk_target::DeviceInfo>> = Arc::new(OnceLock::new());
    let ram_served = match &ram {
        Some(r) => Some(serve_ram(r.clone(), recover_ram, &ram_device)?),
        None => None,
    };
    let suspend_requests: Arc<Mutex<Vec<Reply>>> = Arc::new(Mutex::new(Vec::new()));
    let request: Arc<Mutex<SuspendRequest>> = Arc::default();
    let sock = socket_path(&name);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("cannot listen on {}", sock.display()))?;
    fetcher::local::private::narrow(&sock, fetcher::local::private::FILE_MODE)
        .with_context(|| format!("cannot make {} private", sock.display()))?;
    {
        let ctl = Arc::new(Control {
            name: name.clone(),
            engine: engine.clone(),
            device: device.clone(),
            ram: ram.clone(),
            ram_device: ram_device.clone(),
            requests: suspend_requests.clone(),
            request: request.clone(),
            session: session.clone(),
            started: Instant::now(),
        });
        std::thread::spawn(move || {
            // One thread per connection: a client that never writes, or a
            // suspend that publishes for minutes, holds up nobody else.
            for conn in listener.incoming().flatten() {
                let ctl = ctl.clone();
                std::thread::spawn(move || ctl.serve(conn));
            }
        });
    }

    let (ready_device, mut ready_state) = (device.clone(), state.clone());
    let ready_ram = ram_device.get().cloned();
    if let Some(r) = &ready_ram {
        ready_state["ram_device_id"] = json!(r.id);
        ready_state["ram_device"] = json!(r.path);
    }
    let ready_name = name.clone();
    let ready_base = engine.base_version();
    let report_ready = a.report_ready;
    let dev_options = ublk_target::DeviceOptions {
        recover,
        ..Default::default()
    };
    let served = ublk_target::serve(engine.clone(), &dev_options, move |info| {
        tracing::info!(
            parcel = ready_name,
            device = info.path,
            id = info.id,
            recovered = recover.is_some(),
            base_version = ready_base,
            zero_copy = info.zero_copy,
            "device up"
        );
        let mut st = ready_state;
        st["device_id"] = json!(info.id);
        st["device"] = json!(info.path);
        let _ = fetcher::local::private::write(&state_path(&ready_name), st.to_string());
        let reply = json!({
            "parcel": ready_name,
            "device": info.path,
            "device_id": info.id,
            "recovered": recover.is_some(),
            "pid": std::process::id(),
            "base_version": ready_base,
            "offline": offline,
            "ram_device": ready_ram.as_ref().map(|r| r.path.clone()),
        });
        let path = info.path.clone();
        // Known to `status` before anyone is told the device is up (`isr
        // run` asks for it right after the reply).
        let _ = ready_device.set(info);
        if report_ready {
            println!("{reply}");
            detach_stdout();
        } else {
            eprintln!("isr: serving parcel {ready_name} on {path}");
        }
    });
    session
        .stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // The RAM's device stops with the disk's (a suspend stopped it first).
    if let Some(served) = ram_served {
        if let Some(info) = ram_device.get() {
            let _ = ublk_target::stop(info.id);
        }
        if let Ok(Err(e)) = served.join() {
            eprintln!("isr: the RAM device of parcel {name}: {e}");
        }
    }
    let requests: Vec<Reply> = std::mem::take(&mut *suspend_requests.lock().expect("requests"));
    if let Err(e) = served {
        let msg = e.to_string();
        for r in &requests {
            let _ = r.send(json!({ "error": msg }));
        }
        return Err(e.into());
    }
    // The queues have drained and exited: flush, publish, release (or,
    // offline, keep it all for later).
    let request = request.lock().expect("request").clone();
    let device_path = device.get().map(|d| d.path.clone());
    let (reply, result) = if request.offline {
        let flushed = engine.flush().map_err(|e| explain(e, &a.parcel));
        if let Some(r) = &ram {
            // Kept for `isr checkin` with the VM's saved state.
            if let Err(e) = r.flush() {
                eprintln!("isr: flushing the RAM of parcel {name}: {e}");
            }
        }
        let reply = match &flushed {
            Ok(()) => {
                let st = engine.stats();
                json!({
                    "parcel": name,
                    "offline": true,
                    "dirty_chunks": st.dirty_chunks,
                    "unsynced_chunks": st.unsynced_chunks,
                    "lease_kept": session.lease().is_some(),
                    "device": device_path,
                })
            }
            Err(e) => output::error_json(e),
        };
        tracing::info!(
            parcel = name,
            "device stopped; suspended offline, nothing published"
        );
        (reply, flushed.map(|()| ExitCode::SUCCESS))
    } else {
        if let Some(r) = request.bwlimit {
            engine.parcel().store().set_bwlimit(Some(r), None);
        }
        tracing::info!(parcel = name, "device stopped; publishing");
        let mut saved = request.saved.clone();
        // The VM's RAM goes with it, when the VM was saved (a device state
        // to go with); without one, it is a dead VM's.
        if saved.memory.is_some() {
            saved.ram = ram.clone();
        }
        publish_and_release(&rt, &engine, &session, &saved, a, device_path)
    };
    if let Some(r) = &ram
        && let Err(e) = r.close()
    {
        eprintln!("isr: closing the RAM cache of parcel {name}: {e}");
    }
    // Close cleanly even though the control thread still holds the engine:
    // the next resume on this host then trusts the cache as it is.
    if let Err(e) = engine.close() {
        eprintln!("isr: closing the cache of parcel {name}: {e}");
    }
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(state_path(&name));
    for r in &requests {
        let _ = r.send(reply.clone());
    }
    // Let the repliers write before the process ends.
    std::thread::sleep(Duration::from_millis(100));
    result
}

/// Publishes the session's work with the lease (taking it now if the
/// daemon was offline) and releases the lease; the reply for the suspend.
fn publish_and_release(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    session: &Session,
    saved: &SavedVm,
    a: &Options,
    device: Option<String>,
) -> (Value, anyhow::Result<ExitCode>) {
    let name = &a.parcel.parcel;
    let nonce_path = nonce_path(&engine.cache_dir());
    let lease = match session.lease() {
        Some(l) => Ok(l),
        // Offline until now: the store may be back (a short try: if it is
        // not, everything stays in the cache for `isr checkin`).
        None => crate::session::acquire(
            rt,
            engine.parcel(),
            &engine.cache_dir(),
            crate::session::probe_timeout(a.parcel.retry_timeout),
            false,
        ),
    };
    let summary = lease
        .and_then(|l| {
            engine
                .publish_with(Some(&l), now_unix(), saved)
                .map(|s| (s, l))
        })
        .map_err(|e| {
            let unreachable = e.is_unreachable();
            let e = explain(e, &a.parcel);
            if unreachable {
                let dirty = engine.stats().dirty_chunks;
                crate::session::unpublished(name, e, dirty)
            } else {
                e
            }
        });
    match summary {
        Ok((s, lease)) => {
            tracing::info!(
                parcel = name,
                version = s.version,
                dirty_chunks = s.dirty_chunks,
                uploaded_chunks = s.uploaded_chunks,
                synced_chunks = s.synced_chunks,
                bytes_uploaded = s.bytes_uploaded,
                seconds = s.seconds,
                "published"
            );
            let released = rt.block_on(lease.release());
            let _ = std::fs::remove_file(&nonce_path);
            let mut reply = publish_json(name, &s, released.is_ok());
            reply["device"] = json!(device);
            (reply, Ok(ExitCode::SUCCESS))
        }
        Err(e) => {
            tracing::info!(parcel = name, error = %output::describe(&e), "publish failed");
            (output::error_json(&e), Err(e))
        }
    }
}

/// The JSON of a publish's summary.
pub fn publish_json(name: &str, s: &fetcher::PublishSummary, released: bool) -> Value {
    let mut v = json!({
        "parcel": name,
        "version": s.version,
        "dirty_chunks": s.dirty_chunks,
        "uploaded_chunks": s.uploaded_chunks,
        "bytes_uploaded": s.bytes_uploaded,
        "synced_chunks": s.synced_chunks,
        "memory": s.memory.as_ref().map(|m| json!({
            "size": m.size,
            "chunks": m.zero_chunks + m.dedup_chunks + m.uploaded_chunks,
            "zero_chunks": m.zero_chunks,
            "dedup_chunks": m.dedup_chunks,
            "uploaded_chunks": m.uploaded_chunks,
            "bytes_uploaded": m.bytes_uploaded,
        })),
        "seconds": s.seconds,
        "lease_released": released,
    });
    v["ram"] = json!({
        "dirty_chunks": s.ram_dirty_chunks,
        "uploaded_chunks": s.ram_uploaded_chunks,
        "bytes_uploaded": s.ram_bytes_uploaded,
    });
    v
}

/// The daemon must not share a mount namespace with users of its own device
/// (a mount of /dev/ublkbN in ours would deadlock its removal).
fn private_mounts() {
    // SAFETY: unshare and mount take no pointers but the C strings below,
    // which live across the calls.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            eprintln!(
                "isr: warning: cannot unshare the mount namespace: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        let root = c"/";
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
    }
}

/// After reporting readiness, stdout goes to /dev/null so that the
/// launching `isr resume` sees end of file and returns.
fn detach_stdout() {
    let _ = std::io::stdout().flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 of two fds we hold onto fd 1; no memory involved.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}
