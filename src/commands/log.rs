//! `isr log`: a parcel's versions. A version whose manifest cannot be read
//! (missing, damaged) is named with its error while the others are still
//! listed; the command then exits 1. Versions removed by `isr gc` (below
//! the parcel's floor) are not listed, and are no error.

use std::process::ExitCode;

use clap::Args;
use format::Manifest;
use serde_json::json;

use crate::args::{ParcelArgs, explain, open_parcel};
use crate::output::{self, describe};
use crate::time;

#[derive(Debug, Args)]
pub struct LogArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Print a JSON array instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One version: its manifest and count of stored chunks, or why it could
/// not be read.
type Row = (u64, Result<(Manifest, usize), anyhow::Error>);

pub async fn log(a: LogArgs) -> anyhow::Result<ExitCode> {
    let parcel = open_parcel(&a.parcel)?;
    let head = parcel
        .require_head()
        .await
        .map_err(|e| explain(e, &a.parcel))?;
    let oldest = parcel
        .store()
        .floor(parcel.name())
        .await
        .map_err(|e| explain(e, &a.parcel))?
        .unwrap_or(1)
        .min(head);
    let mut rows: Vec<Row> = Vec::new();
    for version in (oldest..=head).rev() {
        let row = match parcel.manifest(version).await {
            // Removed by a gc that ran meanwhile.
            Err(fetcher::Error::VersionRemoved { .. }) => continue,
            r => r,
        };
        let row = row
            .map(|m| {
                let data = m
                    .chunks
                    .iter()
                    .filter(|e| matches!(e, format::ChunkEntry::Data(_)))
                    .count();
                (m, data)
            })
            .map_err(|e| explain(e, &a.parcel));
        rows.push((version, row));
    }
    // Nothing readable (e.g. the wrong key): one failure, not a list of them.
    if !rows.is_empty() && rows.iter().all(|(_, r)| r.is_err()) {
        let (_, first) = rows.swap_remove(0);
        return Err(first.expect_err("all rows failed"));
    }
    let unreadable = rows.iter().filter(|(_, r)| r.is_err()).count();
    for (v, r) in &rows {
        if let Err(e) = r {
            output::error(format_args!(
                "isr: cannot read version {v} of parcel {}: {}",
                parcel.name(),
                describe(e)
            ));
        }
    }
    if a.json {
        print_json(&rows, head)?;
    } else {
        print_table(&rows, head)?;
    }
    Ok(if unreadable == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_json(rows: &[Row], head: u64) -> anyhow::Result<()> {
    let out: Vec<_> = rows
        .iter()
        .map(|(v, r)| match r {
            Ok((m, data)) => json!({
                "version": v,
                "head": *v == head,
                "created": m.created_unix,
                "created_utc": time::format_utc(m.created_unix),
                "host": m.host,
                "disk_size": m.disk_size,
                "chunk_size": m.chunk_size,
                "chunks": m.chunks.len(),
                "data_chunks": data,
                "parent": m.parent,
            }),
            Err(e) => json!({
                "version": v,
                "head": *v == head,
                "error": describe(e),
            }),
        })
        .collect();
    output::line(serde_json::Value::Array(out))?;
    Ok(())
}

fn print_table(rows: &[Row], head: u64) -> anyhow::Result<()> {
    output::line(format_args!(
        "{:>7}  {:<20}  {:<20}  {:>12}  {:>6}  {:>9}",
        "VERSION", "CREATED (UTC)", "HOST", "SIZE", "PARENT", "DATA"
    ))?;
    for (v, r) in rows {
        let version = if *v == head {
            format!("{v}*")
        } else {
            v.to_string()
        };
        match r {
            Ok((m, data)) => output::line(format_args!(
                "{:>7}  {:<20}  {:<20}  {:>12}  {:>6}  {:>9}",
                version,
                time::format_utc(m.created_unix),
                m.host,
                m.disk_size,
                m.parent.map_or("-".into(), |p| p.to_string()),
                format!("{data}/{}", m.chunks.len()),
            ))?,
            Err(_) => output::line(format_args!(
                "{version:>7}  (unreadable: see the error above)"
            ))?,
        }
    }
    Ok(())
}
