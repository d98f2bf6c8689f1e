//! `isr discard NAME`: drops this host's unpublished changes to a parcel
//! (see `fetcher::engine::Discard`). On a terminal it asks first; without
//! one it refuses unless `--yes`. Refused while the parcel is resumed here.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use fetcher::engine::{CacheLease, Discard};
use serde_json::json;

use crate::args::{StoreArgs, open_store};
use crate::output;

#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// The parcel's name.
    pub parcel: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Root of the local caches (default: /var/lib/isr as root, else
    /// $XDG_CACHE_HOME/isr).
    #[arg(long, env = "ISR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Do not ask (needed when there is no terminal to ask on).
    #[arg(long)]
    pub yes: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn discard(a: DiscardArgs) -> anyhow::Result<ExitCode> {
    let root = a
        .cache_dir
        .clone()
        .unwrap_or_else(fetcher::local::cache::default_cache_root);
    let (url, name) = (a.store.store.clone(), a.parcel.clone());
    let opened = tokio::task::spawn_blocking(move || Discard::open(&url, &name, &root)).await?;
    let d = opened.map_err(|e| match e {
        fetcher::Error::CacheBusy { dir, holder } => anyhow::anyhow!(
            "parcel {} is resumed on this host (its cache {dir} is in use: {holder}); suspend it first",
            a.parcel
        ),
        e => e.into(),
    })?;
    let (chunks, bytes) = d.dirty();
    let what = if d.host_crashed() {
        format!(
            "{chunks} cached chunks ({bytes} bytes) of parcel {}, all it holds: the host crashed while it was resumed, so which chunks changed is not known",
            a.parcel
        )
    } else {
        format!(
            "{chunks} dirty chunks ({bytes} bytes) of parcel {}",
            a.parcel
        )
    };
    if chunks > 0 && !a.yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "not discarding {what} without --yes (there is no terminal to ask on); nothing was changed"
            );
        }
        if !confirm(&format!("discard {what}? [y/N] "))? {
            anyhow::bail!("not discarding {what}: not confirmed; nothing was changed");
        }
    }
    let report = tokio::task::block_in_place(|| d.apply())?;
    let lease = if d.lease_nonce().is_some() {
        let store = open_store(&a.store)?;
        fetcher::engine::release_cache_lease(&store, &a.parcel, d.dir())
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}; but the lease it holds could not be released: {e}; its nonce stays in {}: run isr discard {} again once the store is reachable",
                    if chunks > 0 { format!("discarded {what}") } else { format!("parcel {} had nothing dirty", a.parcel) },
                    d.dir().join("lease").display(),
                    a.parcel
                )
            })?
    } else {
        CacheLease::None
    };
    let lease_word = match lease {
        CacheLease::None => "none",
        CacheLease::Released => "released",
        CacheLease::NotHeld => "not held",
    };
    if a.json {
        output::line(json!({
            "parcel": a.parcel,
            "base_version": report.base_version,
            "discarded_chunks": report.dirty_chunks,
            "discarded_bytes": report.dirty_bytes,
            "host_crashed": d.host_crashed(),
            "synced_removed": report.synced_removed,
            "lease": lease_word,
            "cache": d.dir(),
        }))?;
    } else {
        let mut text = if chunks == 0 {
            format!(
                "parcel {}: nothing dirty to discard (the cache is version {})",
                a.parcel, report.base_version
            )
        } else {
            format!(
                "discarded {what}: the cache is version {} again",
                report.base_version
            )
        };
        if report.synced_removed {
            text.push_str("; the record of synced chunks is deleted");
        }
        match lease {
            CacheLease::Released => text.push_str("; its lease is released"),
            CacheLease::NotHeld => {
                text.push_str("; its lease was no longer held by this cache (nothing to release)")
            }
            CacheLease::None => {}
        }
        output::line(text)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks `question` on the terminal; true for "y" or "yes".
fn confirm(question: &str) -> anyhow::Result<bool> {
    let mut err = std::io::stderr().lock();
    write!(err, "{question}")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}
