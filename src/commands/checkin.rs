//! `isr checkin NAME`: publishes the work of a parcel suspended with
//! `--offline` (or whose suspend could not reach the store).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use fetcher::{Engine, EngineOptions, Lease};
use serde_json::json;

use crate::args::{StoreArgs, explain, host_name, open_parcel, parcel_args, parse_rate};
use crate::daemon::{answer, ask, publish_json};
use crate::output;
use crate::session::{nonce_path, read_nonce};
use crate::time::now_unix;

#[derive(Debug, Args)]
pub struct CheckinArgs {
    /// The parcel's name.
    pub parcel: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The secret key file (see `isr keygen`).
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: PathBuf,
    /// Root of the local caches (default: /var/lib/isr as root, else
    /// $XDG_CACHE_HOME/isr).
    #[arg(long, env = "ISR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Cap the upload at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Take the parcel's lease over from a live holder instead of refusing
    /// (see `import --steal`): the check-in's own publish fences it.
    #[arg(long)]
    pub steal: bool,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

/// `isr checkin NAME`: publishes the cache of a parcel whose device is gone
/// (suspended with `--offline`, or whose suspend could not reach the
/// store), with the VM state a failed suspend saved, and releases the
/// lease. Conflicts (the parcel moved on elsewhere; another host holds
/// its lease) are refused and the cache kept.
pub fn checkin(a: CheckinArgs) -> anyhow::Result<ExitCode> {
    let name = a.parcel.clone();
    if let Ok(st) = ask(&name, "status")
        && st.get("error").is_none()
    {
        bail!(
            "parcel {name} is resumed on this host ({}); `isr suspend {name}` publishes it (or `isr sync {name}` uploads while it runs)",
            st["device"].as_str().unwrap_or("?")
        );
    }
    let pa = parcel_args(&a.store, &name, &a.key_file);
    let parcel = open_parcel(&pa)?;
    parcel.store().set_bwlimit(a.bwlimit, None);
    let mut options = EngineOptions {
        host: host_name(),
        prefetch: false,
        ..Default::default()
    };
    if let Some(dir) = &a.cache_dir {
        options.cache_root = dir.clone();
    }
    let cache_dir =
        fetcher::local::cache::cache_dir(&options.cache_root, parcel.store().url(), &name);
    if !fetcher::local::cache::Cache::exists(&cache_dir) {
        bail!(
            "parcel {name} has no cache on this host ({}): nothing to check in",
            cache_dir.display()
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reuse = read_nonce(&cache_dir);
    let lease = rt
        .block_on(Lease::acquire(
            parcel.store(),
            &name,
            &host_name(),
            now_unix(),
            reuse.as_deref(),
            a.steal,
        ))
        .map_err(|e| explain(e, &pa))?;
    if let Some(old) = lease.stolen_from() {
        // No fence: the publish below is the next version, which the old
        // holder's commit then cannot take.
        output::note(format_args!(
            "isr: took the lease on parcel {name} from {}",
            old.describe()
        ));
    }
    let engine = match Engine::open(parcel, options) {
        Ok(e) => e,
        Err(e) => {
            if reuse.as_deref() != Some(lease.info().nonce.as_str()) {
                let _ = rt.block_on(lease.release());
            }
            return Err(explain(e, &pa));
        }
    };
    for w in &engine.open_report().warnings {
        output::warn(w);
    }
    // A VM a failed (or offline) suspend saved: its state goes in too.
    let saved = crate::vm::save(&name)?;
    let saved = crate::vm::saved_from_json(&saved.to_string())?;
    let base = engine.base_version();
    let summary = engine.publish_with(Some(&lease), now_unix(), &saved);
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            let _ = fetcher::local::private::write(&nonce_path(&cache_dir), &lease.info().nonce);
            let _ = engine.close();
            return Err(explain(e, &pa));
        }
    };
    let released = rt.block_on(lease.release());
    let _ = std::fs::remove_file(nonce_path(&cache_dir));
    crate::vm::forget(&name);
    engine.close().map_err(|e| explain(e, &pa))?;
    let mut reply = publish_json(&name, &summary, released.is_ok());
    reply["published"] = json!(summary.version != base);
    answer(reply, a.json, |r| {
        if r["published"] == false {
            return format!(
                "parcel {name}: nothing to check in (no local changes); version {} stays HEAD; lease released",
                r["version"]
            );
        }
        format!(
            "checked in parcel {name}: version {} published ({} dirty chunks, {} uploaded, {} bytes, {} synced before) in {:.1} s; lease released",
            r["version"],
            r["dirty_chunks"],
            r["uploaded_chunks"],
            r["bytes_uploaded"],
            r["synced_chunks"],
            r["seconds"].as_f64().unwrap_or(0.0)
        )
    })
}
