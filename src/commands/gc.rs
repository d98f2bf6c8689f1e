//! `isr gc --keep N`: removes old versions and unreferenced chunks (the
//! rules that keep it safe next to running publishes are in the module docs
//! of `fetcher::ops::gc` and in the README), and says what it removed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use fetcher::ops::{GcOptions, GcPhase, GcProgress, GcReport, ParcelGc};
use serde_json::json;

use crate::args::{StoreArgs, open_store, read_key};
use crate::output::{self, mib, progress};
use crate::time;

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The secret key file: it must open every parcel of the store.
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: PathBuf,
    /// Versions to keep per parcel (HEAD and the N-1 before it).
    #[arg(long, value_name = "N")]
    pub keep: u64,
    /// Seconds: an unreferenced chunk younger than this is kept (it may
    /// belong to a publish under way). Must exceed the chunk refresh age
    /// (6 h, or ISR_CHUNK_REFRESH_SECS).
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub grace: u64,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

pub async fn gc(a: GcArgs) -> anyhow::Result<()> {
    let store = open_store(&a.store)?;
    let secret = read_key(&a.key_file)?;
    let mut options = GcOptions::new(a.keep);
    options.grace = Duration::from_secs(a.grace);
    options.dry_run = a.dry_run;
    let bar = progress::count_bar(a.json);
    let shown = bar.clone();
    let dry = a.dry_run;
    let sink: GcProgress = Arc::new(move |phase, done, total| {
        shown.set_message(match phase {
            GcPhase::ReadManifests => "read manifests",
            GcPhase::DeleteChunks if dry => "check chunks",
            GcPhase::DeleteChunks => "delete chunks",
        });
        shown.set_length(total);
        shown.set_position(done);
    });
    let report = fetcher::ops::gc(&store, &secret, &options, sink).await;
    bar.finish_and_clear();
    let r = report.map_err(|e| match e {
        fetcher::Error::GcBlocked { ref source, .. }
            if matches!(**source, fetcher::Error::WrongKey { .. }) =>
        {
            anyhow::Error::new(e).context(format!(
                "the key in {} does not open every parcel",
                a.key_file.display()
            ))
        }
        e => e.into(),
    })?;
    if a.json {
        output::line(json!({
            "store": store.url(),
            "dry_run": r.dry_run,
            "keep": a.keep,
            "grace": a.grace,
            "parcels": r.parcels.iter().map(parcel_json).collect::<Vec<_>>(),
            "removed_versions": r.parcels.iter().map(|p| p.removed_versions.len()).sum::<usize>(),
            "chunks": r.chunks,
            "chunk_bytes": r.chunk_bytes,
            "referenced_chunks": r.referenced_chunks,
            "young_chunks": r.young_chunks,
            "removed_chunks": r.removed_chunks,
            "removed_bytes": r.removed_bytes,
            "spared_chunks": r.spared_chunks,
            "new_versions": r.new_versions,
        }))?;
    } else {
        print_text(&r, a.grace)?;
    }
    Ok(())
}

fn parcel_json(p: &ParcelGc) -> serde_json::Value {
    json!({
        "parcel": p.parcel,
        "head": p.head,
        "oldest_kept": p.oldest_kept,
        "removed_versions": p.removed_versions,
        "leased": p.lease.is_some(),
        "lease": p.lease.as_ref().map(|l| json!({
            "host": l.host,
            "pid": l.pid,
            "since": l.since_unix,
            "since_utc": time::format_utc(l.since_unix),
        })),
    })
}

fn print_text(r: &GcReport, grace: u64) -> anyhow::Result<()> {
    let remove = if r.dry_run { "would remove" } else { "removed" };
    for p in &r.parcels {
        let kept = span(p.oldest_kept, p.head);
        let line = match &p.lease {
            Some(l) => format!(
                "parcel {}: HEAD {}; leased by {} (pid {}) since {}: every version kept ({kept})",
                p.parcel,
                p.head,
                l.host,
                l.pid,
                time::format_utc(l.since_unix)
            ),
            None if p.removed_versions.is_empty() => format!(
                "parcel {}: HEAD {}; no version to remove (kept {kept})",
                p.parcel, p.head
            ),
            None => format!(
                "parcel {}: HEAD {}; {remove} versions {} (kept {kept})",
                p.parcel,
                p.head,
                ranges(&p.removed_versions)
            ),
        };
        output::line(line)?;
    }
    output::line(format_args!(
        "chunks: {} in the store ({:.1} MiB), {} named by kept versions; {remove} {} ({:.1} MiB); kept {} unreferenced chunks younger than the grace ({grace} s) and {} named or refreshed by publishes during the run",
        r.chunks,
        mib(r.chunk_bytes),
        r.referenced_chunks,
        r.removed_chunks,
        mib(r.removed_bytes),
        r.young_chunks,
        r.spared_chunks
    ))?;
    Ok(())
}

fn span(from: u64, to: u64) -> String {
    if from == to {
        format!("version {from}")
    } else {
        format!("versions {from}-{to}")
    }
}

/// "1-3, 5, 7-8" for ascending versions.
fn ranges(versions: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < versions.len() {
        let start = versions[i];
        let mut end = start;
        while i + 1 < versions.len() && versions[i + 1] == end + 1 {
            i += 1;
            end = versions[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_ranges_read_well() {
        assert_eq!(super::ranges(&[1, 2, 3, 5, 7, 8]), "1-3, 5, 7-8");
        assert_eq!(super::ranges(&[4]), "4");
        assert_eq!(super::ranges(&[]), "");
    }
}
