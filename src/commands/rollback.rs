//! `isr rollback NAME --to N`: version N's content (disk, memory image,
//! settings) published as version HEAD+1, parent HEAD, by this host, now.
//! Refused while the parcel is resumed on this host (its daemon answers)
//! or leased by anyone (the rollback takes the lease while it publishes,
//! as import does; `--steal` takes it over): exit 4. A parcel or version
//! that does not exist is refused before any lease is taken. N = HEAD
//! publishes nothing: it says so and exits 0.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::args::{StoreArgs, explain, host_name, open_parcel, parcel_args};
use crate::interrupt::{released_or_not, until_signal};
use crate::output;
use crate::time;

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The parcel's name.
    pub parcel: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The secret key file (see `isr keygen`).
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: PathBuf,
    /// The version whose content becomes the next version.
    #[arg(long, value_name = "N")]
    pub to: u64,
    /// Take the parcel's lease over from a live holder instead of refusing
    /// (see `import --steal`).
    #[arg(long)]
    pub steal: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let pa = parcel_args(&a.store, &a.parcel, &a.key_file);
    let parcel = open_parcel(&pa)?;
    let name = parcel.name().to_owned();
    if let Ok(status) = crate::daemon::ask(&name, "status") {
        anyhow::bail!(
            "parcel {name} is resumed on this host ({} served by daemon pid {}): suspend it first (isr suspend {name}), then roll back",
            status["device"].as_str().unwrap_or("its device"),
            status["pid"]
        );
    }
    // A parcel or version that does not exist is refused before the lease
    // is taken: a failed rollback leaves nothing in the store.
    parcel
        .resolve(Some(a.to))
        .await
        .map_err(|e| explain(e, &pa))?;
    let lease = fetcher::Lease::acquire_for(
        parcel.store(),
        &name,
        &host_name(),
        time::now_unix(),
        None,
        a.steal,
        fetcher::Task::Rollback,
    )
    .await
    .map_err(|e| explain(e, &pa))?;
    if let Some(dead) = lease.dead_before() {
        output::note(format_args!(
            "isr: took the lease on parcel {} over from {}, which had died",
            parcel.name(),
            dead.describe()
        ));
    }
    let done = until_signal(fetcher::ops::rollback(
        &parcel,
        a.to,
        &host_name(),
        time::now_unix(),
    ))
    .await;
    let released = lease.release().await;
    let s = match done {
        Ok(r) => r.map_err(|e| explain(e, &pa))?,
        Err(signal) => {
            return Err(output::Interrupted {
                signal,
                what: released_or_not(&name, &released),
            }
            .into());
        }
    };
    released.map_err(|e| explain(e, &pa))?;
    if a.json {
        output::line(json!({
            "parcel": name,
            "from": s.from,
            "head": s.head,
            "version": s.version,
            "published": s.version.is_some(),
            "chunks": s.chunks,
            "refreshed_chunks": s.refreshed_chunks,
        }))?;
    } else {
        match s.version {
            Some(v) => output::line(format_args!(
                "rolled parcel {name} back to version {}: published as version {v} (parent {}; {} chunks, {} refreshed in the store)",
                s.from, s.head, s.chunks, s.refreshed_chunks
            ))?,
            None => output::line(format_args!(
                "parcel {name} is at version {} already (HEAD): nothing to roll back, no version published",
                s.from
            ))?,
        }
    }
    Ok(())
}
