//! `isr export`: a version of a parcel's disk, written to a file or device.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::args::{ParcelArgs, explain, open_parcel, parse_rate};
use crate::output::{self, mib, progress};

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Version to export (default: HEAD).
    #[arg(long)]
    pub version: Option<u64>,
    /// Output file or block device. A symbolic link is followed to the file
    /// it names; a character device, FIFO, socket or directory is refused.
    pub out: PathBuf,
    /// Replace an existing file, or write over a block device (which must
    /// be at least as large as the disk). Without it, export writes only a
    /// new file.
    #[arg(long)]
    pub force: bool,
    /// Cap the transfer at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

pub async fn export(a: ExportArgs) -> anyhow::Result<()> {
    let parcel = open_parcel(&a.parcel)?;
    parcel.store().set_bwlimit(None, a.bwlimit);
    let (version, manifest) = parcel
        .resolve(a.version)
        .await
        .map_err(|e| explain(e, &a.parcel))?;
    if a.force
        && let Ok(m) = std::fs::metadata(&a.out)
        && m.is_file()
        && std::os::unix::fs::MetadataExt::nlink(&m) > 1
    {
        output::note(format_args!(
            "isr: {} has {} other hard links; they keep the old content (export replaces the file)",
            a.out.display(),
            std::os::unix::fs::MetadataExt::nlink(&m) - 1
        ));
    }
    let (bar, sink) = progress::bytes_bar(manifest.disk_size, "export", a.json);
    let options = fetcher::ops::ExportOptions { force: a.force };
    let s = fetcher::ops::export_with(&parcel, version, &manifest, &a.out, &options, sink)
        .await
        .map_err(|e| explain(e, &a.parcel))?;
    bar.finish_and_clear();
    if a.json {
        output::line(json!({
            "parcel": parcel.name(),
            "version": s.version,
            "out": a.out,
            "bytes_out": s.bytes_out,
            "chunks": s.chunks,
            "fetched_chunks": s.fetched_chunks,
            "bytes_fetched": s.bytes_fetched,
            "seconds": s.seconds,
        }))?;
    } else {
        output::line(format_args!(
            "exported version {} of parcel {} to {}: {:.1} MiB, {} chunks fetched, {:.2} s",
            s.version,
            parcel.name(),
            a.out.display(),
            mib(s.bytes_out),
            s.fetched_chunks,
            s.seconds
        ))?;
    }
    Ok(())
}
