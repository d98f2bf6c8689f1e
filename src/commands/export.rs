//! `isr export`: a version of a parcel's disk, written to a file or device.

use serde_json::json;

use super::{explain, mib, open_parcel};
use crate::cli::ExportArgs;
use crate::{output, progress};

pub(super) async fn export(a: ExportArgs) -> anyhow::Result<()> {
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
