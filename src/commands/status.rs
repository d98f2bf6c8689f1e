//! `isr status [NAME]`: what a resumed parcel's daemon reports, in a few
//! aligned lines or as JSON; without a name, every parcel resumed on this
//! host (found by its socket or state file in the run directory), a daemon
//! that died included.
//!
//! ```text
//! vm1  /dev/ublkb0  version 7  online
//!   cache   82.5% of 4096 chunks  dirty 12 (3.0 MiB), 3.0 MiB to upload
//!   rates   fetch 11.2 MB/s  upload 0 B/s  link ~11.5 MB/s
//!   lease   host A (pid 123) since 2025-05-01 10:00:00Z
//!   trace   311 chunks  up 2m13s  daemon pid 4242
//!   vm      running, QEMU pid 4300, QMP /run/isr/vm1.qmp, console …
//! ```
//!
//! The rates are current (the last ~10 s, see `fetcher::transfer::meter`), not
//! lifetime averages; the link estimate is the fullest second of fetching
//! in that window (kept while idle). The JSON object is the daemon's reply
//! (`fetch_rate`, `upload_rate`, `link_estimate` in bytes/s; `dirty_bytes`,
//! `pending_upload_bytes`; `online`; `lease_holder`; `uptime_seconds`; …)
//! plus `vm` and `state` (`running`, `died`, `not answering`).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use serde_json::{Value, json};

use crate::daemon::{answer, ask};
use crate::output;
use crate::run_dir::{pid_alive, read_state, run_dir, socket_path};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The parcel's name (default: every parcel resumed on this host).
    pub parcel: Option<String>,
    /// Print one JSON object (without a name: an array) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `isr status [NAME]`.
pub fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let Some(name) = a.parcel else {
        return list(a.json);
    };
    let reply = match ask(&name, "status") {
        Ok(r) => r,
        Err(e) => match died(&name) {
            Some(entry) => anyhow::bail!("{}", entry["error"].as_str().unwrap_or_default()),
            None => return Err(e),
        },
    };
    let reply = with_vm(&name, reply);
    answer(reply, a.json, text)
}

/// Every parcel resumed on this host: one entry each, asked in parallel.
fn list(json: bool) -> anyhow::Result<ExitCode> {
    let dir = run_dir();
    let names = resumed_parcels(&dir)?;
    let entries: Vec<Value> = std::thread::scope(|scope| {
        let asks: Vec<_> = names
            .iter()
            .map(|name| scope.spawn(move || entry(name)))
            .collect();
        asks.into_iter()
            .zip(&names)
            .map(|(h, name)| {
                h.join().unwrap_or_else(
                    |_| json!({ "parcel": name, "state": "unknown", "error": "status failed" }),
                )
            })
            .collect()
    });
    if json {
        output::line(Value::Array(entries))?;
    } else if entries.is_empty() {
        output::line(format_args!(
            "no parcel is resumed on this host (nothing in {})",
            dir.display()
        ))?;
    } else {
        let blocks: Vec<String> = entries.iter().map(text).collect();
        output::line(blocks.join("\n"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One parcel's entry: its daemon's status, or why there is none.
fn entry(name: &str) -> Value {
    match ask(name, "status") {
        Ok(reply) if reply.get("error").is_none() => with_vm(name, reply),
        Ok(reply) => json!({
            "parcel": name,
            "state": "error",
            "error": reply["error"],
        }),
        Err(e) => died(name).unwrap_or_else(|| {
            let pid = read_state(name).map_or(Value::Null, |s| s["pid"].clone());
            json!({
                "parcel": name,
                "state": "not answering",
                "pid": pid,
                "error": output::describe(&e),
            })
        }),
    }
}

/// The entry of a parcel whose daemon died (its state file names a pid
/// that is gone), if that is what happened.
fn died(name: &str) -> Option<Value> {
    let st = read_state(name)?;
    let pid = st["pid"].as_i64().unwrap_or(0);
    if pid_alive(pid) {
        return None;
    }
    Some(json!({
        "parcel": name,
        "state": "died",
        "pid": pid,
        "device": st["device"],
        "store": st["store"],
        "error": format!("the daemon of parcel {name} (pid {pid}) died; run isr recover {name}"),
    }))
}

fn with_vm(name: &str, mut reply: Value) -> Value {
    if reply.get("error").is_none() {
        reply["vm"] = crate::vm::describe(name);
        if reply.get("state").is_none() {
            reply["state"] = json!("running");
        }
    }
    reply
}

/// The parcels that have a daemon socket or a daemon state file in `dir`
/// (none if it does not exist), sorted. A parcel's VM record
/// (`NAME.vm.json`) is told from a state file by its content: only a state
/// file names a store.
fn resumed_parcels(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = BTreeSet::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot list the run directory {} (set ISR_RUN_DIR, or run as its owner)",
                dir.display()
            )));
        }
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".sock") {
            if socket_path(name) == e.path() {
                names.insert(name.to_owned());
            }
        } else if let Some(name) = file.strip_suffix(".json") {
            let is_state = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|v| v.get("store").is_some() && v.get("pid").is_some());
            if is_state {
                names.insert(name.to_owned());
            }
        }
    }
    Ok(names.into_iter().collect())
}

/// The text of one entry (see the module docs).
pub fn text(r: &Value) -> String {
    let name = r["parcel"].as_str().unwrap_or("?");
    match r["state"].as_str() {
        Some("running") | None if r.get("error").is_none() => running_text(name, r),
        Some("died") => format!(
            "{name}  {}  daemon died (pid {}); run isr recover {name}",
            r["device"].as_str().unwrap_or("(no device)"),
            r["pid"]
        ),
        state => format!(
            "{name}  {}: {}",
            state.unwrap_or("error"),
            r["error"].as_str().unwrap_or("?")
        ),
    }
}

fn running_text(name: &str, r: &Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let chunks = n("chunks");
    let cached = if chunks == 0 {
        100.0
    } else {
        n("cached_chunks") as f64 * 100.0 / chunks as f64
    };
    let online = if r["online"].as_bool().unwrap_or(false) {
        "online".to_owned()
    } else {
        match r["last_store_error"].as_str() {
            Some(e) => format!("offline ({e})"),
            None => "offline".to_owned(),
        }
    };
    let lease = match r["lease_holder"].as_object() {
        Some(h) => format!(
            "host {} (pid {}) since {}",
            h.get("host").and_then(Value::as_str).unwrap_or("?"),
            h.get("pid").and_then(Value::as_u64).unwrap_or(0),
            crate::time::format_utc(h.get("since").and_then(Value::as_i64).unwrap_or(0))
        ),
        None => r["lease"].as_str().unwrap_or("?").to_owned(),
    };
    let mut lines = vec![
        format!(
            "{name}  {}  version {}  {online}",
            r["device"].as_str().unwrap_or("(device not up yet)"),
            r["base_version"]
        ),
        format!(
            "  cache   {cached:.1}% of {chunks} chunks  dirty {} ({}), {} to upload{}",
            n("dirty_chunks"),
            size(n("dirty_bytes")),
            size(n("pending_upload_bytes")),
            match r["cache_io"].as_str() {
                Some(mode) => format!("  I/O {mode}"),
                None => String::new(),
            }
        ),
        format!(
            "  rates   fetch {}  upload {}  link ~{}",
            rate(n("fetch_rate")),
            rate(n("upload_rate")),
            rate(n("link_estimate"))
        ),
        format!("  lease   {lease}"),
        format!(
            "  trace   {} chunks  up {}  daemon pid {}",
            n("trace_chunks"),
            duration(n("uptime_seconds")),
            r["pid"]
        ),
    ];
    if let Some(ram) = r.get("ram").filter(|v| v.is_object()) {
        let m = |k: &str| ram[k].as_u64().unwrap_or(0);
        lines.push(format!(
            "  ram     {} of {}  fetched {}  cached {} chunks  dirty {}",
            ram["device"].as_str().unwrap_or("(device not up yet)"),
            size(m("size")),
            size(m("fetched_bytes")),
            m("cached_chunks"),
            m("dirty_chunks")
        ));
    }
    if r.get("vm").is_some() {
        lines.push(format!("  vm      {}", crate::vm::describe_text(&r["vm"])));
    }
    lines.join("\n")
}

/// A size in binary units: `0 B`, `512 B`, `3.0 MiB`, `1.5 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A rate in decimal units, as networks are counted: `0 B/s`, `950 B/s`,
/// `11.2 MB/s`.
pub fn rate(bytes_per_sec: u64) -> String {
    const UNITS: [&str; 4] = ["kB/s", "MB/s", "GB/s", "TB/s"];
    if bytes_per_sec < 1000 {
        return format!("{bytes_per_sec} B/s");
    }
    let mut v = bytes_per_sec as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A duration: `45s`, `2m13s`, `3h05m`, `2d04h`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_human() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(3 << 20), "3.0 MiB");
        assert_eq!(size(1536 << 20), "1.5 GiB");
        assert_eq!(rate(0), "0 B/s");
        assert_eq!(rate(950), "950 B/s");
        assert_eq!(rate(11_200_000), "11.2 MB/s");
        assert_eq!(rate(1_500_000_000), "1.5 GB/s");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(133), "2m13s");
        assert_eq!(duration(3 * 3600 + 5 * 60), "3h05m");
        assert_eq!(duration(2 * 86_400 + 4 * 3600), "2d04h");
    }

    fn running() -> Value {
        json!({
            "parcel": "vm1",
            "state": "running",
            "device": "/dev/ublkb0",
            "pid": 4242,
            "base_version": 7,
            "chunks": 4096,
            "cached_chunks": 3379,
            "dirty_chunks": 12,
            "dirty_bytes": 12 * 262_144,
            "pending_upload_bytes": 12 * 262_144,
            "fetch_rate": 11_200_000,
            "upload_rate": 0,
            "link_estimate": 11_500_000,
            "online": true,
            "last_store_error": null,
            "trace_chunks": 311,
            "lease": "host A (pid 123) since 1970-01-01 00:00:00Z",
            "lease_holder": { "host": "A", "pid": 123, "since": 0 },
            "uptime_seconds": 133,
            "vm": null,
        })
    }

    #[test]
    fn a_running_parcel_reads_in_aligned_lines() {
        let t = text(&running());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "vm1  /dev/ublkb0  version 7  online");
        assert_eq!(
            lines[1],
            "  cache   82.5% of 4096 chunks  dirty 12 (3.0 MiB), 3.0 MiB to upload"
        );
        assert_eq!(
            lines[2],
            "  rates   fetch 11.2 MB/s  upload 0 B/s  link ~11.5 MB/s"
        );
        assert_eq!(
            lines[3],
            "  lease   host A (pid 123) since 1970-01-01 00:00:00Z"
        );
        assert_eq!(lines[4], "  trace   311 chunks  up 2m13s  daemon pid 4242");
        assert_eq!(lines[5], "  vm      none started by isr");
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn the_cache_line_says_how_the_cache_does_its_io() {
        let mut r = running();
        r["cache_io"] = json!("direct");
        let t = text(&r);
        assert_eq!(
            t.lines().nth(1),
            Some(
                "  cache   82.5% of 4096 chunks  dirty 12 (3.0 MiB), 3.0 MiB to upload  I/O direct"
            )
        );
    }

    #[test]
    fn a_ram_device_has_its_line() {
        let mut r = running();
        r["ram"] = json!({
            "device": "/dev/ublkb1", "size": 128u64 << 20, "fetched_bytes": 10u64 << 20,
            "cached_chunks": 40, "dirty_chunks": 3,
        });
        let t = text(&r);
        assert_eq!(
            t.lines().nth(5).unwrap(),
            "  ram     /dev/ublkb1 of 128.0 MiB  fetched 10.0 MiB  cached 40 chunks  dirty 3"
        );
    }

    #[test]
    fn offline_dead_and_silent_daemons_say_so() {
        let mut r = running();
        r["online"] = json!(false);
        r["last_store_error"] = json!("get chunk x: connection refused");
        let first = text(&r).lines().next().unwrap().to_owned();
        assert_eq!(
            first,
            "vm1  /dev/ublkb0  version 7  offline (get chunk x: connection refused)"
        );
        let dead = json!({
            "parcel": "vm2", "state": "died", "pid": 99, "device": "/dev/ublkb1",
            "error": "the daemon of parcel vm2 (pid 99) died; run isr recover vm2",
        });
        assert_eq!(
            text(&dead),
            "vm2  /dev/ublkb1  daemon died (pid 99); run isr recover vm2"
        );
        let silent = json!({
            "parcel": "vm3", "state": "not answering", "error": "it did not answer",
        });
        assert_eq!(text(&silent), "vm3  not answering: it did not answer");
    }
}
