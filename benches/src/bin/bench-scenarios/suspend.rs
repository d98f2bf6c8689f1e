//! P4 suspend: after N MiB of writes (random 4 KiB, and sequential) to a
//! warm cache, the publish of the dirty chunks through the shaping proxy
//! (the engine on the host: the device is not needed to measure what a
//! suspend sends). Bytes through the proxy against the compressed size of
//! the dirty chunks (the new chunk objects in the store; goal ≤ 1.05×),
//! and the publish's time against those bytes / the bandwidth (≤ 1.3×).

use std::path::Path;
use std::time::Duration;

use benches::{Shape, ShapingProxy};
use fetcher::ops::{ImportOptions, import};
use fetcher::{Engine, EngineOptions, Parcel, no_progress};
use serde_json::json;

use crate::env::{self, MIB, Rng, S3Server};
use crate::report::Row;

pub struct Config {
    /// Disk size.
    pub disk_mib: u64,
    /// MiB written at random 4 KiB offsets.
    pub random_mib: u64,
    /// MiB written sequentially.
    pub sequential_mib: u64,
    /// The link.
    pub rate: u64,
    pub rtt: Duration,
}

pub fn run(work: &Path, s3s: &Path, cfg: &Config) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for (kind, mib) in [
        ("random 4 KiB", cfg.random_mib),
        ("sequential", cfg.sequential_mib),
    ] {
        rows.push(one(work, s3s, cfg, kind, mib)?);
        eprintln!(
            "P4 {kind}: {}",
            rows.last().map_or("", |r| r.figure.as_str())
        );
    }
    Ok(rows)
}

fn one(work: &Path, s3s: &Path, cfg: &Config, kind: &str, mib: u64) -> Result<Row, String> {
    let e = |e: fetcher::Error| e.to_string();
    // A server each: nothing of one run dedups against the other.
    let server = S3Server::start(s3s, work)?;
    let dir = tempfile::tempdir_in(work).map_err(|e| e.to_string())?;
    let image = dir.path().join("image");
    // Half random, half text: chunks compress to about 60 %.
    env::write_image(&image, cfg.disk_mib, 2, 17).map_err(|e| e.to_string())?;
    let direct = Parcel::new(env::store(&server.endpoint())?, "vm", env::secret()).map_err(e)?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(import(
        &direct,
        &image,
        &ImportOptions::default(),
        no_progress(),
    ))
    .map_err(e)?;
    drop(rt);
    std::fs::remove_file(&image).map_err(|e| e.to_string())?;

    let proxy = ShapingProxy::start(server.addr, Shape::NONE).map_err(|e| e.to_string())?;
    let parcel = Parcel::new(env::store(&proxy.endpoint())?, "vm", env::secret()).map_err(e)?;
    let options = EngineOptions {
        cache_root: dir.path().join("cache"),
        prefetch: false,
        host: "bench".into(),
        ..Default::default()
    };
    let engine = Engine::open(parcel, options).map_err(e)?;
    // A warm cache, as after a session: hoarded unshaped.
    engine.hoard(no_progress()).map_err(e)?;
    let chunk = engine.geometry().chunk_size() as u64;
    let disk = engine.geometry().disk_size();
    let mut rng = Rng(0x5eed ^ mib);
    let mut block = vec![0u8; 4096];
    let writes = if kind == "sequential" {
        let mut buf = vec![0u8; MIB as usize];
        let start = (disk / 4) / chunk * chunk;
        for i in 0..mib {
            rng.fill(&mut buf);
            engine.write(start + i * MIB, &buf).map_err(e)?;
        }
        mib
    } else {
        let n = mib * MIB / 4096;
        for _ in 0..n {
            rng.fill(&mut block);
            let off = rng.next() % (disk / 4096) * 4096;
            engine.write(off, &block).map_err(e)?;
        }
        n
    };
    engine.flush().map_err(e)?;
    let before_files = env::chunk_files(&server.bucket_dir());
    proxy.set_shape(Shape::new(cfg.rtt, Some(cfg.rate)));
    let before = proxy.counters();
    proxy.reset_max_open();
    let summary = engine.publish(None, 1).map_err(e)?;
    let after = proxy.counters();
    proxy.set_shape(Shape::NONE);
    engine.close().map_err(e)?;
    let new_chunks: Vec<u64> = env::chunk_files(&server.bucket_dir())
        .into_iter()
        .filter(|(p, _)| !before_files.contains_key(p))
        .map(|(_, n)| n)
        .collect();
    let compressed: u64 = new_chunks.iter().sum();
    let sent = after.up - before.up;
    let ratio = sent as f64 / compressed.max(1) as f64;
    let ideal = sent as f64 / cfg.rate as f64;
    let time_ratio = summary.seconds / ideal;
    let met = ratio <= 1.05 && time_ratio <= 1.3;
    Ok(Row {
        id: "P4".into(),
        what: format!(
            "publish after {mib} MiB of {kind} writes ({} dirty chunks of {} KiB)",
            summary.dirty_chunks,
            chunk / 1024
        ),
        link: format!(
            "{:.0} Mbit/s, RTT {} ms",
            cfg.rate as f64 * 8.0 / 1e6,
            cfg.rtt.as_millis()
        ),
        figure: format!(
            "sent {:.1} MB for {:.1} MB of compressed dirty chunks; {:.2} s vs {:.2} s at link rate",
            sent as f64 / 1e6,
            compressed as f64 / 1e6,
            summary.seconds,
            ideal
        ),
        ratio: Some(ratio),
        goal: format!("bytes ≤ 1.05× (time {time_ratio:.2}× ≤ 1.3×)"),
        met: Some(met),
        details: json!({
            "disk_mib": cfg.disk_mib,
            "written_mib": mib,
            "writes": writes,
            "kind": kind,
            "chunk_size": chunk,
            "dirty_chunks": summary.dirty_chunks,
            "uploaded_chunks": summary.uploaded_chunks,
            "new_chunk_objects": new_chunks.len(),
            "compressed_dirty_bytes": compressed,
            "engine_bytes_uploaded": summary.bytes_uploaded,
            "bytes_sent": sent,
            "bytes_received": after.down - before.down,
            "bytes_ratio": ratio,
            "seconds": summary.seconds,
            "seconds_at_link_rate": ideal,
            "time_ratio": time_ratio,
            "connections": after.connections - before.connections,
            "max_open_connections": after.max_open,
            "set_rate_bytes_per_s": cfg.rate,
            "set_rtt_ms": cfg.rtt.as_secs_f64() * 1e3,
        }),
    })
}
