//! `isr suspend NAME`: stops the VM `isr run` started (its memory saved),
//! then the daemon drains, flushes, publishes the new version, releases the
//! lease and removes the device.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;

use crate::args::parse_rate;
use crate::daemon::{answer, ask, ask_with_progress};

#[derive(Debug, Args)]
pub struct SuspendArgs {
    /// The parcel's name.
    pub parcel: String,
    /// Publish this saved VM state file (from any hypervisor: QEMU's
    /// `migrate` to a file, `virsh save`) as the version's memory image.
    /// Without it, a VM started by `isr run` is saved through QMP.
    #[arg(long, value_name = "FILE")]
    pub memory: Option<PathBuf>,
    /// Flush and remove the device but publish nothing and keep the lease
    /// and every local change, without the network (`isr checkin` publishes
    /// later; `isr resume` works on from the cache).
    #[arg(long)]
    pub offline: bool,
    /// Cap the upload at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `isr suspend NAME`.
pub fn suspend(a: SuspendArgs) -> anyhow::Result<ExitCode> {
    let status = ask(&a.parcel, "status")?;
    if let Some(e) = status.get("error") {
        bail!("the daemon of parcel {}: {e}", a.parcel);
    }
    // The VM's memory: a state file given, or saved from the VM `isr run`
    // started (stopped, saved, quit); either way QEMU is gone after this.
    let saved = match &a.memory {
        Some(path) => {
            let path = std::fs::canonicalize(path)
                .with_context(|| format!("memory image {}", path.display()))?;
            json!({ "memory": path })
        }
        None => crate::vm::save(&a.parcel)?,
    };
    if let Some(dev) = status["device"].as_str() {
        let users = users_of(dev);
        if !users.is_empty() {
            bail!(
                "{dev} (parcel {}) is still in use: {}; stop its users (the VM, mounts) first, then suspend",
                a.parcel,
                users.join(", ")
            );
        }
    }
    let mut request = saved;
    request["offline"] = json!(a.offline);
    request["bwlimit"] = json!(a.bwlimit);
    // The publish may take as long as the upload: wait while the daemon
    // lives, showing how far it is.
    let reply = ask_with_progress(&a.parcel, "suspend", &request, "suspend", a.json)?;
    if reply.get("error").is_none() {
        crate::vm::forget(&a.parcel);
    }
    answer(reply, a.json, |r| {
        if r["offline"] == true {
            return format!(
                "suspended parcel {} offline: device {} removed, nothing published; {} dirty chunks ({} not yet uploaded) kept in the cache, {}; `isr checkin {}` publishes them",
                r["parcel"].as_str().unwrap_or("?"),
                r["device"].as_str().unwrap_or("?"),
                r["dirty_chunks"],
                r["unsynced_chunks"],
                if r["lease_kept"] == true {
                    "lease kept"
                } else {
                    "no lease held (the store was not reached)"
                },
                r["parcel"].as_str().unwrap_or("?"),
            );
        }
        let memory = match r.get("memory").filter(|m| !m.is_null()) {
            Some(m) => format!(
                "; memory image {} bytes in {} chunks: {} uploaded ({} bytes), {} deduplicated, {} zero",
                m["size"],
                m["chunks"],
                m["uploaded_chunks"],
                m["bytes_uploaded"],
                m["dedup_chunks"],
                m["zero_chunks"]
            ),
            None => "; no memory image (the next run boots afresh)".into(),
        };
        let memory = match r["ram"]["dirty_chunks"].as_u64() {
            Some(n) if n > 0 => format!(
                "{memory}; RAM: {n} chunks changed, {} uploaded ({} bytes)",
                r["ram"]["uploaded_chunks"], r["ram"]["bytes_uploaded"]
            ),
            _ => memory,
        };
        format!(
            "suspended parcel {}: version {} published ({} dirty chunks, {} uploaded, {} bytes, {} synced before{memory}) in {:.1} s, device {} removed, lease released",
            r["parcel"].as_str().unwrap_or("?"),
            r["version"],
            r["dirty_chunks"],
            r["uploaded_chunks"],
            r["bytes_uploaded"],
            r["synced_chunks"],
            r["seconds"].as_f64().unwrap_or(0.0),
            r["device"].as_str().unwrap_or("?"),
        )
    })
}

/// Who still uses block device `dev`: processes holding it open, and
/// mounts of it (in this mount namespace).
fn users_of(dev: &str) -> Vec<String> {
    let mut users = Vec::new();
    let target = std::fs::canonicalize(dev).unwrap_or_else(|_| dev.into());
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == std::process::id().to_string() {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            if fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target))
            {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                users.push(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for line in mounts.lines() {
            let mut f = line.split_whitespace();
            if f.next() == Some(dev) {
                users.push(format!("mounted at {}", f.next().unwrap_or("?")));
            }
        }
    }
    users
}
