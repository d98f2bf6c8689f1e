//! `isr fork`: publishes a parcel's local cache (its base version and local
//! changes) as version 1 of a new parcel, and moves the cache to it.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::hoard::HoardArgs;
use crate::args::{explain, host_name, open_parcel};
use crate::output;

#[derive(Debug, Args)]
pub struct ForkArgs {
    #[command(flatten)]
    pub cache: HoardArgs,
    /// Name of the new parcel (it must not exist).
    #[arg(long)]
    pub to: String,
}

pub async fn fork(a: ForkArgs) -> anyhow::Result<ExitCode> {
    let parcel = open_parcel(&a.cache.parcel)?;
    let to = fetcher::Parcel::new(parcel.store().clone(), &a.to, parcel.secret().clone())?;
    let mut options = fetcher::EngineOptions {
        host: host_name(),
        ..Default::default()
    };
    if let Some(dir) = &a.cache.cache_dir {
        options.cache_root = dir.clone();
    }
    let (from, to_name) = (parcel.name().to_owned(), a.to.clone());
    let (s, dir) = tokio::task::spawn_blocking(move || {
        fetcher::engine::fork(&parcel, &to, options, crate::time::now_unix())
    })
    .await?
    .map_err(|e| explain(e, &a.cache.parcel))?;
    if a.cache.json {
        output::line(json!({
            "parcel": to_name,
            "from": from,
            "version": s.version,
            "dirty_chunks": s.dirty_chunks,
            "uploaded_chunks": s.uploaded_chunks,
            "bytes_uploaded": s.bytes_uploaded,
            "cache": dir,
        }))?;
    } else {
        output::line(format_args!(
            "published the cache of parcel {from} as version {} of parcel {to_name}: {} changed chunks, {} uploaded ({} bytes); the cache is now {to_name}'s ({})",
            s.version,
            s.dirty_chunks,
            s.uploaded_chunks,
            s.bytes_uploaded,
            dir.display()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
