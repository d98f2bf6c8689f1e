//! `isr ls`: every parcel of a store. Without a key, what needs none (the
//! versions, the lease) is shown, and the output says what is missing. A
//! parcel whose HEAD manifest cannot be read is listed with its error, and
//! the command exits 1 (like `isr log`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use fetcher::LeaseInfo;
use fetcher::ops::ParcelListing;
use serde_json::{Value, json};

use crate::args::{StoreArgs, open_store, read_key};
use crate::output::{self, mib};
use crate::time;

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The secret key file; without it, what needs no key is shown (HEAD,
    /// versions, leases), not disk sizes or memory images.
    #[arg(long, env = "ISR_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

const NO_KEY: &str =
    "no key given (--key-file or ISR_KEY_FILE): disk sizes and memory images are not shown";

pub async fn ls(a: LsArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let secret = a.key_file.as_deref().map(read_key).transpose()?;
    let parcels = fetcher::ops::list_parcels(&store, secret.as_ref()).await?;
    let errors: Vec<(&str, String)> = parcels
        .iter()
        .filter_map(|p| match &p.head {
            Some(Err(e)) => Some((p.name.as_str(), e.to_string())),
            _ => None,
        })
        .collect();
    for (name, e) in &errors {
        output::note(format_args!("isr: cannot read HEAD of parcel {name}: {e}"));
    }
    if a.json {
        let mut out = json!({
            "store": store.url(),
            "key": secret.is_some(),
            "parcels": parcels.iter().map(row_json).collect::<Vec<_>>(),
        });
        if secret.is_none() {
            out["note"] = json!(NO_KEY);
        }
        output::line(out)?;
    } else {
        if secret.is_none() {
            output::note(format_args!("isr: {NO_KEY}"));
        }
        print_table(&parcels)?;
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn lease_json(lease: &Option<LeaseInfo>) -> Value {
    match lease {
        Some(l) => json!({
            "host": l.host,
            "pid": l.pid,
            "since": l.since_unix,
            "since_utc": time::format_utc(l.since_unix),
        }),
        None => Value::Null,
    }
}

fn row_json(p: &ParcelListing) -> Value {
    let mut row = json!({
        "parcel": p.name,
        "head": p.head_version(),
        "oldest": p.versions.first(),
        "versions": p.versions.len(),
        "lease": lease_json(&p.lease),
        "free": p.lease.is_none(),
        "disk_size": null,
        "memory_image": null,
    });
    match &p.head {
        Some(Ok(h)) => {
            row["disk_size"] = json!(h.disk_size);
            row["chunk_size"] = json!(h.chunk_size);
            row["memory_image"] = json!(h.memory_size > 0);
            row["memory_size"] = json!(h.memory_size);
            row["created"] = json!(h.created_unix);
            row["created_utc"] = json!(time::format_utc(h.created_unix));
            row["host"] = json!(h.host);
        }
        Some(Err(e)) => row["error"] = json!(e.to_string()),
        None => {}
    }
    row
}

fn print_table(parcels: &[ParcelListing]) -> anyhow::Result<()> {
    output::line(format_args!(
        "{:<24}  {:>6}  {:>11}  {:>12}  {:<6}  LEASE",
        "PARCEL", "HEAD", "VERSIONS", "DISK", "MEMORY"
    ))?;
    for p in parcels {
        let versions = match (p.versions.first(), p.versions.last()) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => "none".into(),
        };
        let (disk, memory) = match &p.head {
            Some(Ok(h)) => (
                format!("{:.1} MiB", mib(h.disk_size)),
                if h.memory_size > 0 { "yes" } else { "no" }.to_owned(),
            ),
            Some(Err(_)) => ("unreadable".into(), "?".into()),
            None => ("-".into(), "-".into()),
        };
        let lease = match &p.lease {
            Some(l) => format!(
                "{} (pid {}) since {}",
                l.host,
                l.pid,
                time::format_utc(l.since_unix)
            ),
            None => "free".into(),
        };
        output::line(format_args!(
            "{:<24}  {:>6}  {:>11}  {:>12}  {:<6}  {lease}",
            p.name,
            p.head_version().map_or("-".into(), |v| v.to_string()),
            versions,
            disk,
            memory
        ))?;
    }
    Ok(())
}
