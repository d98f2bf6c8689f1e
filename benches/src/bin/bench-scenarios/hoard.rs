//! P6 hoard: `isr hoard` of a whole parcel from s3s-fs through the shaping
//! proxy, at 100 Mbit/s and 1 Gbit/s (RTT 40 ms), and unshaped on
//! loopback: bytes through the proxy per second of the hoard against the
//! link's rate (goal ≥ 0.9×).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use benches::{Shape, ShapingProxy, selftest};
use fetcher::ops::{ImportOptions, import};
use fetcher::{Parcel, no_progress};
use serde_json::json;

use crate::env::{self, MIB, S3Server};
use crate::report::Row;

pub struct Config {
    /// Parcel size.
    pub mib: u64,
    /// RTT of the shaped links.
    pub rtt: Duration,
}

pub fn run(work: &Path, s3s: &Path, cfg: &Config) -> Result<Vec<Row>, String> {
    let server = S3Server::start(s3s, work)?;
    let dir = tempfile::tempdir_in(work).map_err(|e| e.to_string())?;
    let image = dir.path().join("image");
    env::write_image(&image, cfg.mib, 4, 61).map_err(|e| e.to_string())?;
    let parcel = Parcel::new(env::store(&server.endpoint())?, "hoard", env::secret())
        .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let imported = rt
        .block_on(import(
            &parcel,
            &image,
            &ImportOptions::default(),
            no_progress(),
        ))
        .map_err(|e| e.to_string())?;
    drop(rt);
    std::fs::remove_file(&image).map_err(|e| e.to_string())?;
    let chunk_bytes: u64 = env::chunk_files(&server.bucket_dir()).values().sum();
    eprintln!(
        "P6: imported {} MiB ({:?} chunk bytes in the store)",
        cfg.mib, chunk_bytes
    );
    let key = dir.path().join("key");
    env::write_key_file(&key).map_err(|e| e.to_string())?;
    let proxy = ShapingProxy::start(server.addr, Shape::NONE).map_err(|e| e.to_string())?;
    let _ = imported;

    let links = [
        ("100 Mbit/s", Some(12_500_000u64), cfg.rtt),
        ("1 Gbit/s", Some(125_000_000), cfg.rtt),
        ("loopback", None, Duration::ZERO),
    ];
    let mut rows = Vec::new();
    for (name, rate, rtt) in links {
        let shape = Shape::new(rtt, rate);
        proxy.set_shape(shape);
        // What the link itself does, in this run: the proxy's self-test.
        let check = selftest::run(shape, rate.map_or(256 * MIB, |r| r * 2), 4, 5)
            .map_err(|e| format!("proxy self-test: {e}"))?;
        let cache = dir.path().join(format!("cache-{}", rows.len()));
        let before = proxy.counters();
        proxy.reset_max_open();
        let (cpu0, s3_cpu0) = (env::children_cpu_seconds(), server.cpu_seconds());
        let started = Instant::now();
        let out = Command::new(env::isr_bin())
            .args(["hoard", "--parcel", "hoard", "--json"])
            .args(["--store", &format!("s3://{}/", env::BUCKET)])
            .args(["--endpoint", &proxy.endpoint()])
            .arg("--key-file")
            .arg(&key)
            .arg("--cache-dir")
            .arg(&cache)
            .envs(env::aws_env())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", env::isr_bin().display()))?;
        let wall = started.elapsed().as_secs_f64();
        let isr_cpu = env::children_cpu_seconds() - cpu0;
        let s3_cpu = server.cpu_seconds() - s3_cpu0;
        if !out.status.success() {
            return Err(format!(
                "isr hoard failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let after = proxy.counters();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("isr hoard --json printed no JSON: {e}"))?;
        let secs = report["seconds"].as_f64().unwrap_or(wall);
        let down = after.down - before.down;
        let requests_guess = report["fetched_chunks"].as_u64().unwrap_or(0);
        let throughput = down as f64 / secs;
        // Against the link as set; on loopback against what the proxy
        // itself moved in its self-test (the most loopback carries here).
        let link_rate = rate.map_or(check.down, |r| r as f64);
        let ratio = throughput / link_rate;
        let mbit = |b: f64| b * 8.0 / 1e6;
        rows.push(Row {
            id: "P6".into(),
            what: format!("hoard {} MiB (`isr hoard`)", cfg.mib),
            link: match rate {
                Some(_) => format!("{name}, RTT {} ms", rtt.as_millis()),
                None => format!("loopback, proxy unshaped ({:.0} Mbit/s)", mbit(check.down)),
            },
            figure: format!(
                "{:.1} Mbit/s ({:.1} MB in {:.2} s, {} connections; CPU isr {:.1} s, s3s-fs {:.1} s)",
                mbit(throughput),
                down as f64 / 1e6,
                secs,
                after.max_open,
                isr_cpu,
                s3_cpu
            ),
            ratio: Some(ratio),
            goal: match rate {
                Some(_) => "≥ 0.9× link".into(),
                None => "– (the host's ceiling: vs the proxy's own rate)".into(),
            },
            met: rate.map(|_| ratio >= 0.9),
            details: json!({
                "parcel_mib": cfg.mib,
                "set_rate_bytes_per_s": rate,
                "set_rtt_ms": rtt.as_secs_f64() * 1e3,
                "proxy_check": check.json(),
                "bytes_down": down,
                "bytes_up": after.up - before.up,
                "chunk_bytes_in_store": chunk_bytes,
                "seconds": secs,
                "wall_seconds": wall,
                "throughput_bytes_per_s": throughput,
                "connections": after.connections - before.connections,
                "max_open_connections": after.max_open,
                "fetched_chunks": requests_guess,
                "isr_cpu_seconds": isr_cpu,
                "s3s_fs_cpu_seconds": s3_cpu,
                "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
                "isr": report,
            }),
        });
        eprintln!(
            "P6 {name}: {}",
            rows.last().map_or("", |r| r.figure.as_str())
        );
        let _ = std::fs::remove_dir_all(&cache);
    }
    Ok(rows)
}
