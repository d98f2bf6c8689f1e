//! `isr verify`: checks that every chunk of a version exists and decodes.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use crate::args::{ParcelArgs, explain, open_parcel};
use crate::output::{self, progress};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Version to verify (default: HEAD).
    #[arg(long)]
    pub version: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

pub async fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let parcel = open_parcel(&a.parcel)?;
    let (version, manifest) = parcel
        .resolve(a.version)
        .await
        .map_err(|e| explain(e, &a.parcel))?;
    let (bar, sink) = progress::bytes_bar(manifest.disk_size, "verify", a.json);
    let report = fetcher::ops::verify(&parcel, version, &manifest, sink)
        .await
        .map_err(|e| explain(e, &a.parcel))?;
    bar.finish_and_clear();
    let bad: Vec<String> = report.bad.iter().map(|e| e.to_string()).collect();
    if a.json {
        let ids: Vec<String> = report
            .bad
            .iter()
            .filter_map(|e| match e {
                fetcher::Error::BadChunk { id, .. } => Some(id.to_string()),
                _ => None,
            })
            .collect();
        let mut reply = json!({
            "parcel": parcel.name(),
            "version": report.version,
            "chunks_checked": report.chunks_checked,
            "ok": bad.is_empty(),
            "bad_chunks": ids,
            "errors": bad,
        });
        if !bad.is_empty() {
            reply["error"] = json!(format!(
                "version {} of parcel {}: {} of {} chunks bad",
                report.version,
                parcel.name(),
                bad.len(),
                report.chunks_checked
            ));
            reply["kind"] = json!(output::Kind::Failure.name());
        }
        output::line(reply)?;
    } else {
        for line in &bad {
            output::error(format_args!("isr: bad {line}"));
        }
        output::line(format_args!(
            "version {} of parcel {}: {} chunks checked, {} bad",
            report.version,
            parcel.name(),
            report.chunks_checked,
            bad.len()
        ))?;
    }
    Ok(if bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
