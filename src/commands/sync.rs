//! `isr sync NAME`: the daemon of a resumed parcel uploads its dirty chunks
//! while the device keeps serving, without publishing a version.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use crate::args::parse_rate;
use crate::daemon::{answer, ask_with_progress};

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The parcel's name.
    pub parcel: String,
    /// Cap the upload at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

/// `isr sync NAME`: the daemon uploads; a bar shows how far.
pub fn sync(a: SyncArgs) -> anyhow::Result<ExitCode> {
    let request = json!({ "bwlimit": a.bwlimit });
    let reply = ask_with_progress(&a.parcel, "sync", &request, "sync", a.json)?;
    answer(reply, a.json, |r| {
        format!(
            "synced parcel {}: {} chunks uploaded ({} bytes), {} found in the store or zero, {} synced before; {} of {} dirty chunks left to upload, in {:.1} s",
            r["parcel"].as_str().unwrap_or("?"),
            r["uploaded_chunks"],
            r["bytes_uploaded"],
            r["synced_chunks"].as_u64().unwrap_or(0) - r["uploaded_chunks"].as_u64().unwrap_or(0),
            r["already_synced"],
            r["unsynced_chunks"],
            r["dirty_chunks"],
            r["seconds"].as_f64().unwrap_or(0.0),
        )
    })
}
