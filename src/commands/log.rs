//! `isr log`: a parcel's versions.

use serde_json::json;

use super::{explain, open_parcel};
use crate::cli::LogArgs;
use crate::{output, time};

pub(super) async fn log(a: LogArgs) -> anyhow::Result<()> {
    let parcel = open_parcel(&a.parcel)?;
    let head = parcel
        .require_head()
        .await
        .map_err(|e| explain(e, &a.parcel))?;
    let mut rows = Vec::new();
    for version in (1..=head).rev() {
        let m = parcel
            .manifest(version)
            .await
            .map_err(|e| explain(e, &a.parcel))?;
        let data = m
            .chunks
            .iter()
            .filter(|e| matches!(e, format::ChunkEntry::Data(_)))
            .count();
        rows.push((version, m, data));
    }
    if a.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(v, m, data)| {
                json!({
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
                })
            })
            .collect();
        output::line(serde_json::Value::Array(out))?;
        return Ok(());
    }
    output::line(format_args!(
        "{:>7}  {:<20}  {:<20}  {:>12}  {:>6}  {:>9}",
        "VERSION", "CREATED (UTC)", "HOST", "SIZE", "PARENT", "DATA"
    ))?;
    for (v, m, data) in &rows {
        output::line(format_args!(
            "{:>7}  {:<20}  {:<20}  {:>12}  {:>6}  {:>9}",
            if *v == head {
                format!("{v}*")
            } else {
                v.to_string()
            },
            time::format_utc(m.created_unix),
            m.host,
            m.disk_size,
            m.parent.map_or("-".into(), |p| p.to_string()),
            format!("{data}/{}", m.chunks.len()),
        ))?;
    }
    Ok(())
}
