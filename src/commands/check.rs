//! `isr check`: verifies a parcel's local cache against its manifest,
//! offline (every cached chunk re-hashed, the map and the image's size
//! checked); damaged chunks are dropped, to be fetched again.

use std::process::ExitCode;

use serde_json::json;

use super::hoard::HoardArgs;
use crate::args::{explain, open_parcel};
use crate::output::{self, progress};

/// `isr check` takes `isr hoard`'s arguments: a parcel and its cache.
pub type CheckArgs = HoardArgs;

pub async fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let parcel = open_parcel(&a.parcel)?;
    let root = a
        .cache_dir
        .clone()
        .unwrap_or_else(fetcher::local::cache::default_cache_root);
    let json = a.json;
    let name = parcel.name().to_owned();
    let report = tokio::task::spawn_blocking(move || {
        let (bar, sink) = progress::bytes_bar(0, "check", json);
        let r = fetcher::engine::check(&parcel, &root, sink);
        bar.finish_and_clear();
        r
    })
    .await?
    .map_err(|e| explain(e, &a.parcel))?;
    if json {
        let mut reply = json!({
                "parcel": name,
                "version": report.base_version,
                "ok": report.clean(),
                "chunks": report.chunks,
                "present_chunks": report.present,
                "hashed_chunks": report.hashed,
                "dirty_chunks": report.dirty,
                "damaged_chunks": report.damaged,
                "suspect_chunks": report.suspect,
                "bad_map_entries": report.bad_entries,
                "truncated_chunks": report.truncated,
                "lost_dirty_chunks": report.lost_dirty,
                "unclean_stop": report.unclean,
        });
        if !report.clean() {
            reply["error"] = json!(format!(
                "the cache of parcel {name} needed repair: {} damaged chunks (dropped, to be fetched again), {} suspect (kept as local changes), {} bad map entries, {} truncated chunks",
                report.damaged.len(),
                report.suspect.len(),
                report.bad_entries,
                report.truncated.len()
            ));
            reply["kind"] = json!(output::Kind::Failure.name());
        }
        output::line(reply)?;
    } else {
        for c in &report.damaged {
            output::error(format_args!(
                "isr: chunk {c} of the cache is damaged: dropped, it will be fetched again"
            ));
        }
        for c in &report.suspect {
            output::error(format_args!(
                "isr: chunk {c} differs from version {} after an unclean stop: kept as a local change",
                report.base_version
            ));
        }
        if !report.lost_dirty.is_empty() {
            output::error(format_args!(
                "isr: {} unpublished chunks were cut off a truncated cache image and are lost: {:?}",
                report.lost_dirty.len(),
                report.lost_dirty
            ));
        }
        output::line(format_args!(
            "cache of parcel {name} (version {}): {} of {} chunks present, {} hashed, {} dirty; {} damaged, {} suspect, {} bad map entries, {} truncated: {}",
            report.base_version,
            report.present,
            report.chunks,
            report.hashed,
            report.dirty,
            report.damaged.len(),
            report.suspect.len(),
            report.bad_entries,
            report.truncated.len(),
            if report.clean() { "ok" } else { "repaired" }
        ))?;
    }
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
