//! `isr import`: a disk image becomes the next version of a parcel.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::args::{ParcelArgs, explain, host_name, open_parcel, parse_rate};
use crate::interrupt::{released_or_not, until_signal};
use crate::output::{self, mib, progress};
use crate::{image, time};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The image to import.
    pub image: PathBuf,
    #[command(flatten)]
    pub parcel: ParcelArgs,
    /// Chunk size of a new parcel (64K to 4M, a power of two).
    #[arg(long, value_parser = parse_chunk_size)]
    pub chunk_size: Option<u32>,
    /// Allow the new version's disk size to differ from HEAD's (without it,
    /// an image of another size is refused).
    #[arg(long)]
    pub resize: bool,
    /// Take the parcel's lease over from a live holder (elsewhere, or a
    /// process on this host) instead of refusing; its session's next
    /// publish then fails and its changes stay in its cache. A holder that
    /// died on this host having left nothing behind (an import, a
    /// rollback) is taken over without it.
    #[arg(long)]
    pub steal: bool,
    /// Cap the upload at this rate (see `resume --bwlimit`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Print one JSON object instead of text, and no progress bar.
    #[arg(long)]
    pub json: bool,
}

pub async fn import(a: ImportArgs) -> anyhow::Result<()> {
    let parcel = open_parcel(&a.parcel)?;
    parcel.store().set_bwlimit(a.bwlimit, None);
    let raw = image::open_raw(&a.image)?;
    let options = fetcher::ops::ImportOptions {
        chunk_size: a.chunk_size,
        resize: a.resize,
        host: host_name(),
        created_unix: time::now_unix(),
        ..Default::default()
    };
    // What would be refused is refused before the lease is taken: a
    // refused import leaves nothing in the store.
    fetcher::ops::check_import(&parcel, raw.size(), &options)
        .await
        .map_err(|e| explain(e, &a.parcel))?;
    // A parcel in use elsewhere (resumed on some host) is not published
    // over: the import holds the lease while it publishes, and lets go of
    // it on failure and on SIGINT/SIGTERM.
    let lease = fetcher::Lease::acquire_for(
        parcel.store(),
        parcel.name(),
        &host_name(),
        time::now_unix(),
        None,
        a.steal,
        fetcher::Task::Import,
    )
    .await
    .map_err(|e| explain(e, &a.parcel))?;
    if let Some(dead) = lease.dead_before() {
        output::note(format_args!(
            "isr: took the lease on parcel {} over from {}, which had died",
            parcel.name(),
            dead.describe()
        ));
    }
    let (bar, sink) = progress::bytes_bar(raw.size(), "import", a.json);
    let imported = until_signal(fetcher::ops::import(&parcel, raw.path(), &options, sink)).await;
    let released = lease.release().await;
    bar.finish_and_clear();
    let s = match imported {
        Ok(r) => r.map_err(|e| explain(e, &a.parcel))?,
        Err(signal) => {
            return Err(output::Interrupted {
                signal,
                what: released_or_not(parcel.name(), &released),
            }
            .into());
        }
    };
    released.map_err(|e| explain(e, &a.parcel))?;
    if a.json {
        output::line(json!({
            "parcel": parcel.name(),
            "version": s.version,
            "chunks": s.chunks,
            "zero_chunks": s.zero_chunks,
            "dedup_chunks": s.dedup_chunks,
            "uploaded_chunks": s.uploaded_chunks,
            "repaired_chunks": s.repaired_chunks,
            "bytes_in": s.bytes_in,
            "bytes_uploaded": s.bytes_uploaded,
            "seconds": s.seconds,
        }))?;
    } else {
        output::line(format_args!(
            "imported {} as version {} of parcel {}: {} chunks ({} zero, {} already stored, {} uploaded{}); {:.1} MiB in, {:.1} MiB uploaded, {:.2} s ({:.0} MiB/s)",
            a.image.display(),
            s.version,
            parcel.name(),
            s.chunks,
            s.zero_chunks,
            s.dedup_chunks,
            s.uploaded_chunks,
            match s.repaired_chunks {
                0 => String::new(),
                n => format!(", {n} of them over damaged objects in the store"),
            },
            mib(s.bytes_in),
            mib(s.bytes_uploaded),
            s.seconds,
            mib(s.bytes_in) / s.seconds.max(1e-9),
        ))?;
    }
    Ok(())
}

/// Parses `262144`, `256K`, `256k`, `1M`, `4MiB`.
/// A chunk size: a size that is a power of two from 64 KiB to 4 MiB.
fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    format::Geometry::new(0, n)
        .map(|_| n)
        .map_err(|e| e.to_string().replace("invalid geometry: ", ""))
}

fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K or M)")),
    };
    n.checked_mul(mult)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_say_what_is_wrong() {
        assert_eq!(parse_chunk_size("256K"), Ok(256 * 1024));
        let big = parse_chunk_size("8M").unwrap_err();
        assert!(big.contains("outside 64 KiB to 4 MiB"), "{big}");
        assert!(!big.contains("power of two"), "{big}");
        let odd = parse_chunk_size("100K").unwrap_err();
        assert!(odd.contains("not a power of two"), "{odd}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256K"), Ok(256 * 1024));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("1G").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999M").is_err());
    }
}
