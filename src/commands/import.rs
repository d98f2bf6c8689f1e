//! `isr import`: a disk image becomes the next version of a parcel.

use serde_json::json;

use super::{explain, host_name, mib, open_parcel, released_or_not, until_signal};
use crate::cli::ImportArgs;
use crate::{image, output, progress, time};

pub(super) async fn import(a: ImportArgs) -> anyhow::Result<()> {
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
