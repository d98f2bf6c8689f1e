//! The daemon's side of its control socket: `status`, `sync` and
//! `suspend`, each answered on its own thread.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use fetcher::{Engine, LeaseInfo, SavedVm};
use serde_json::{Value, json};

/// Replies to a daemon command.
pub(super) type Reply = mpsc::Sender<Value>;

use super::client::ANSWER_TIMEOUT;
use crate::session::Session;
/// Writes `{"progress": DONE, "total": BYTES}` lines to `writer` every half
/// second until `rx` delivers the answer.
pub(super) fn answer_with_progress(
    writer: &mut UnixStream,
    engine: &Engine,
    rx: &mpsc::Receiver<Value>,
) -> Value {
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(v) => return v,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let (done, total) = engine.upload_progress();
                // A client that went away only misses the bar.
                let _ = writeln!(writer, "{}", json!({ "progress": done, "total": total }));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return json!({"error": "the daemon stopped without an answer"});
            }
        }
    }
}

/// What a suspend asked for.
#[derive(Debug, Clone, Default)]
pub(super) struct SuspendRequest {
    /// The VM's memory image and settings, for the publish.
    pub(super) saved: SavedVm,
    /// Publish nothing; keep the lease and the changes (`--offline`).
    pub(super) offline: bool,
    /// Cap on the upload.
    pub(super) bwlimit: Option<u64>,
}

/// What the control socket's threads share.
pub(super) struct Control {
    pub(super) name: String,
    pub(super) engine: Arc<Engine>,
    pub(super) device: Arc<OnceLock<ublk_target::DeviceInfo>>,
    /// The guest RAM's engine and device (`isr resume --ram-mib`).
    pub(super) ram: Option<Arc<Engine>>,
    pub(super) ram_device: Arc<OnceLock<ublk_target::DeviceInfo>>,
    pub(super) requests: Arc<Mutex<Vec<Reply>>>,
    pub(super) request: Arc<Mutex<SuspendRequest>>,
    pub(super) session: Arc<Session>,
    pub(super) started: Instant,
}

impl Control {
    /// Answers one command on `conn`: `status`, `sync [JSON]` (`{"bwlimit":
    /// RATE}`), or `suspend [JSON]` (`{"memory": PATH, "vm": SETTINGS,
    /// "offline": BOOL, "bwlimit": RATE}`, all optional). Long commands send
    /// progress lines before their answer.
    pub(super) fn serve(&self, conn: UnixStream) {
        let mut line = String::new();
        let Ok(mut writer) = conn.try_clone() else {
            return;
        };
        let _ = conn.set_read_timeout(Some(ANSWER_TIMEOUT));
        if BufReader::new(conn).read_line(&mut line).is_err() {
            return;
        }
        let (command, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        let options: Value = serde_json::from_str(rest).unwrap_or(Value::Null);
        let reply = match command {
            "status" => self.status(),
            "sync" => self.sync(&mut writer, options["bwlimit"].as_u64()),
            "suspend" => {
                let Some(info) = self.device.get() else {
                    let _ = writeln!(writer, "{}", json!({"error": "the device is not up yet"}));
                    return;
                };
                tracing::info!(parcel = self.name, request = rest, "suspend requested");
                let offline = options["offline"].as_bool().unwrap_or(false);
                if offline && self.ram.is_some() {
                    let _ = writeln!(
                        writer,
                        "{}",
                        json!({"error": format!("parcel {} serves its VM's RAM from a device, which an offline suspend cannot keep yet; nothing was changed: suspend online (or save the VM with its memory to a file and resume without the RAM device)", self.name)})
                    );
                    return;
                }
                match crate::vm::saved_from_json(rest) {
                    Ok(saved) => {
                        *self.request.lock().expect("request") = SuspendRequest {
                            saved,
                            offline: options["offline"].as_bool().unwrap_or(false),
                            bwlimit: options["bwlimit"].as_u64(),
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(writer, "{}", json!({ "error": e.to_string() }));
                        return;
                    }
                }
                let (tx, rx) = mpsc::channel();
                self.requests.lock().expect("requests").push(tx);
                if writeln!(writer, "{}", json!({ "accepted": true })).is_err() {
                    return;
                }
                // Background uploads give way; stopping the device drains
                // in-flight I/O; the main thread then publishes and answers.
                self.session
                    .stopping
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(ram) = self.ram_device.get()
                    && let Err(e) = ublk_target::stop(ram.id)
                {
                    json!({ "error": e.to_string() })
                } else if let Err(e) = ublk_target::stop(info.id) {
                    json!({ "error": e.to_string() })
                } else {
                    answer_with_progress(&mut writer, &self.engine, &rx)
                }
            }
            other => json!({ "error": format!("unknown command {other:?}") }),
        };
        let _ = writeln!(writer, "{reply}");
    }

    /// `isr sync`: uploads while the device serves, sending progress.
    fn sync(&self, writer: &mut UnixStream, bwlimit: Option<u64>) -> Value {
        let store = self.engine.parcel().store();
        let before = store.bwlimit();
        if bwlimit.is_some() {
            store.set_bwlimit(bwlimit, before.1);
        }
        let (tx, rx) = mpsc::channel();
        let engine = self.engine.clone();
        let name = self.name.clone();
        std::thread::spawn(move || {
            let stop = std::sync::atomic::AtomicBool::new(false);
            let reply = match engine.sync(fetcher::no_progress(), &stop) {
                Ok(s) => crate::session::sync_json(&name, &s, &engine),
                Err(e) => {
                    let (left, _) = engine.unsynced();
                    json!({ "error": format!(
                        "{e}; nothing is lost: the {left} chunks not uploaded stay dirty in the cache and the next sync or suspend uploads them"
                    ) })
                }
            };
            let _ = tx.send(reply);
        });
        let reply = answer_with_progress(writer, &self.engine, &rx);
        if bwlimit.is_some() {
            store.set_bwlimit(before.0, before.1);
        }
        reply
    }

    /// The RAM device's part of `status`.
    fn ram_status(&self) -> Value {
        let Some(r) = &self.ram else {
            return Value::Null;
        };
        let s = r.stats();
        json!({
            "device": self.ram_device.get().map(|d| d.path.clone()),
            "size": r.geometry().disk_size(),
            "base_version": r.base_version(),
            "cached_chunks": s.cached_chunks,
            "dirty_chunks": s.dirty_chunks,
            "fetched_chunks": s.fetched_chunks,
            "fetched_bytes": s.fetched_bytes,
            "cache": r.cache_dir(),
            "cache_io": r.cache_io().name(),
        })
    }

    /// The answer to `status` (`isr status` shows its fields).
    fn status(&self) -> Value {
        let (engine, s) = (&self.engine, self.engine.stats());
        let geometry = engine.geometry();
        let report = engine.open_report();
        let offline = self.session.offline();
        let lease: Option<LeaseInfo> = self.session.lease().map(|l| l.info().clone());
        let mut reply = json!({
            "parcel": self.name,
            "state": "running",
            "device": self.device.get().map(|d| d.path.clone()),
            "pid": std::process::id(),
            "store": engine.parcel().store().url(),
            "base_version": engine.base_version(),
            "disk_size": geometry.disk_size(),
            "chunk_size": geometry.chunk_size(),
            "chunks": s.chunks,
            "cached_chunks": s.cached_chunks,
            "dirty_chunks": s.dirty_chunks,
            "dirty_bytes": s.dirty_bytes,
            "synced_chunks": engine.synced_chunks(),
            "unsynced_chunks": s.unsynced_chunks,
            "pending_upload_bytes": s.pending_upload_bytes,
            "fetched_chunks": s.fetched_chunks,
            "fetched_bytes": s.fetched_bytes,
            "uploaded_bytes": s.uploaded_bytes,
            "fetch_rate": s.fetch_rate,
            "upload_rate": s.upload_rate,
            "link_estimate": s.link_estimate,
            "online": s.online && offline.is_none(),
            "last_store_error": s.last_store_error,
            "window": s.window,
            "trace_chunks": s.trace_chunks,
            "offline_reason": offline,
            "idle_seconds": engine.idle_for().as_secs(),
            "lease": lease.as_ref().map(LeaseInfo::describe),
            "lease_holder": lease.as_ref().map(|l| json!({
                "host": l.host,
                "pid": l.pid,
                "since": l.since_unix,
            })),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "cache": engine.cache_dir(),
            "cache_io": engine.cache_io().name(),
            "unclean_stop": report.recovered,
            "scanned_chunks": report.scanned_chunks,
            "recovered_dirty": report.recovered_dirty,
        });
        reply["ram"] = self.ram_status();
        reply
    }
}
