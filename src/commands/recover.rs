//! `isr recover NAME`: reattaches a resumed parcel's device after its
//! daemon died, with what the dead daemon recorded.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;

use crate::args::{DeviceArgs, ParcelArgs};
use crate::run_dir::{pid_alive, read_state};

use super::resume::{ResumeArgs, resume};

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The parcel's name.
    pub parcel: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `isr recover NAME`: resume again with what the dead daemon recorded.
pub fn recover(a: RecoverArgs) -> anyhow::Result<ExitCode> {
    let st = read_state(&a.parcel)
        .with_context(|| format!("parcel {} was not resumed on this host", a.parcel))?;
    if pid_alive(st["pid"].as_i64().unwrap_or(0)) {
        bail!(
            "the daemon of parcel {} (pid {}) is running; nothing to recover",
            a.parcel,
            st["pid"]
        );
    }
    let s = |k: &str| st[k].as_str().map(str::to_owned);
    let args = ResumeArgs {
        parcel: ParcelArgs {
            store: s("store").context("state file lacks the store")?,
            endpoint: s("endpoint"),
            parcel: a.parcel.clone(),
            key_file: s("key_file")
                .context("state file lacks the key file")?
                .into(),
            retry_timeout: st["retry_timeout"].as_u64().unwrap_or(60),
        },
        device: DeviceArgs {
            cache_dir: s("cache_root").map(PathBuf::from),
            steal: false,
            miss_timeout: st["miss_timeout"].as_u64().unwrap_or(600),
            no_prefetch: st["no_prefetch"].as_bool().unwrap_or(false),
            offline: false,
            trickle: st["trickle"].as_u64(),
            bwlimit: st["bwlimit"].as_u64(),
            // As the dead daemon asked (else as the cache recorded).
            cache_io: s("cache_io").and_then(|m| fetcher::CacheIo::parse(&m).ok()),
        },
        foreground: false,
        memory_out: None,
        ram_mib: st["ram_mib"].as_u64().and_then(|m| u32::try_from(m).ok()),
        ram_zero: false,
        json: a.json,
        daemon: false,
    };
    resume(args)
}
