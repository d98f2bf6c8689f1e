//! `isr hoard`: fetches every chunk of a parcel (its disk, and its RAM where
//! the version keeps one) into the local cache, to work offline.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::args::{ParcelArgs, explain, host_name, open_parcel, parse_rate};
use crate::output::{self, mib, progress};

/// `isr hoard`'s arguments (and `isr check`'s, and `isr fork`'s cache):
/// a parcel and where its cache is.
#[derive(Debug, Args)]
pub struct HoardArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Root of the local caches (default: /var/lib/isr as root, else
    /// $XDG_CACHE_HOME/isr).
    #[arg(long, env = "ISR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Cap the transfer at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

/// "N chunks filled from M objects fetched (X MiB)": one object fills
/// every chunk that holds its content.
fn filled_from(filled: u64, objects: u64, bytes: u64) -> String {
    format!(
        "{filled} chunks filled from {objects} objects fetched ({:.1} MiB)",
        mib(bytes)
    )
}

pub async fn hoard(a: HoardArgs) -> anyhow::Result<()> {
    let parcel = open_parcel(&a.parcel)?;
    parcel.store().set_bwlimit(a.bwlimit, a.bwlimit);
    let mut options = fetcher::EngineOptions {
        host: host_name(),
        ..Default::default()
    };
    if let Some(dir) = &a.cache_dir {
        options.cache_root = dir.clone();
    }
    let json = a.json;
    let started = std::time::Instant::now();
    // The engine runs its own runtime and blocks: keep it off ours.
    let runtime = tokio::runtime::Handle::current();
    let ((filled, stats), report, dir, ram) = tokio::task::spawn_blocking(move || {
        let engine = fetcher::Engine::open(parcel.clone(), options.clone())?;
        let total = engine.geometry().disk_size();
        // What is cached already is verified first: a damaged or truncated
        // cache is repaired, never reported complete.
        let (bar, sink) = progress::bytes_bar(total, "verify cache", json);
        let (_, damaged) = engine.verify_cached(sink)?;
        bar.finish_and_clear();
        if !damaged.is_empty() {
            output::warn(format_args!(
                "{} cached chunks of parcel {} were damaged; fetching them again",
                damaged.len(),
                engine.parcel().name()
            ));
        }
        let before = engine.stats().cached_chunks;
        let (bar, sink) = progress::bytes_bar(total, "hoard", json);
        let stats = engine.hoard(sink);
        bar.finish_and_clear();
        let report = engine.open_report().clone();
        let dir = engine.cache_dir();
        let stats = stats?;
        // Chunks this hoard made local: more than the objects it fetched
        // where one object fills several chunks (repeated content).
        let filled = stats.cached_chunks.saturating_sub(before);
        engine.close()?;
        // The VM's RAM, where the version keeps it as an image of its own.
        let manifest = runtime.block_on(parcel.manifest(report.base_version))?;
        let ram = match manifest.ram {
            Some(r) => {
                let ram = fetcher::Engine::open(
                    parcel,
                    fetcher::EngineOptions {
                        ram: Some(r.size),
                        ..options
                    },
                )?;
                let (bar, sink) = progress::bytes_bar(r.size, "hoard RAM", json);
                let verified = ram.verify_cached(fetcher::no_progress());
                let before = ram.stats().cached_chunks;
                let stats = verified.and_then(|_| ram.hoard(sink));
                bar.finish_and_clear();
                let stats = stats?;
                ram.close()?;
                Some((stats.cached_chunks.saturating_sub(before), stats))
            }
            None => None,
        };
        Ok::<_, fetcher::Error>(((filled, stats), report, dir, ram))
    })
    .await?
    .map_err(|e| explain(e, &a.parcel))?;
    for w in &report.warnings {
        output::warn(w);
    }
    let seconds = started.elapsed().as_secs_f64();
    if a.json {
        output::line(json!({
            "parcel": a.parcel.parcel,
            "version": report.base_version,
            "cache": dir,
            "chunks": stats.chunks,
            "cached_chunks": stats.cached_chunks,
            "dirty_chunks": stats.dirty_chunks,
            "filled_chunks": filled,
            "fetched_chunks": stats.fetched_chunks,
            "bytes_fetched": stats.fetched_bytes,
            "ram": ram.as_ref().map(|(filled, r)| json!({
                "chunks": r.chunks,
                "filled_chunks": filled,
                "fetched_chunks": r.fetched_chunks,
                "bytes_fetched": r.fetched_bytes,
            })),
            "seconds": seconds,
        }))?;
    } else {
        output::line(format_args!(
            "hoarded version {} of parcel {} in {}: {}, {} of {} chunks cached{}, {:.2} s",
            report.base_version,
            a.parcel.parcel,
            dir.display(),
            filled_from(filled, stats.fetched_chunks, stats.fetched_bytes),
            stats.cached_chunks,
            stats.chunks,
            match &ram {
                Some((filled, r)) => format!(
                    "; the VM's RAM: {}, {} of {} cached",
                    filled_from(*filled, r.fetched_chunks, r.fetched_bytes),
                    r.cached_chunks,
                    r.chunks
                ),
                None => String::new(),
            },
            seconds
        ))?;
    }
    Ok(())
}
