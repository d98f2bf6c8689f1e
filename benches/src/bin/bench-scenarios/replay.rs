//! P3 working-set replay: the reads of a real boot (`scripts/make-boot-image`:
//! a debootstrapped Debian disk and its boot trace) replayed from a cold
//! cache over a shaped link, one read at a time in boot order, through
//!
//! - isr's engine on the host (s3s-fs through the shaping proxy), first on
//!   a version without an access trace (the parcel's first session), then
//!   on one that carries the trace of an earlier boot (every later
//!   session), which orders the prefetch;
//! - nbdkit's curl plugin with its cache filter, reading the raw image from
//!   an HTTP server with Range support through the same kind of link, the
//!   trace replayed through NBD with libnbd (`benches/scripts/nbd-replay.py`);
//! - a download of the whole image first (zstd-compressed, decompressed on
//!   the way in), ISR-1's way;
//!
//! against the physical limit: the compressed bytes of the chunks the trace
//! touches / the bandwidth + one RTT.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use benches::http::FileServer;
use benches::{Shape, ShapingProxy};
use fetcher::ops::{ImportOptions, import};
use fetcher::{Engine, EngineOptions, Parcel, Store, no_progress};
use format::{ChunkEntry, Manifest};
use serde_json::{Value, json};

use crate::env::{self, S3Server};
use crate::report::Row;

pub struct Config {
    /// Holds `image` and `trace` (made by `scripts/make-boot-image`).
    pub image_dir: PathBuf,
    /// The links' rates, bytes/s.
    pub rates: Vec<u64>,
    pub rtt: Duration,
    /// Run only these of isr, nbdkit, download (empty: all); the others'
    /// rows show no figure.
    pub peers: Vec<String>,
}

/// One read of the trace.
#[derive(Debug, Clone, Copy)]
struct Read {
    offset: u64,
    len: u64,
}

/// What one replay took.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub seconds: f64,
    pub bytes_down: u64,
    pub extra: Value,
}

/// The figures of one link, for the rows and the plot.
#[derive(Debug, Clone)]
pub struct Point {
    pub rate: u64,
    pub limit: f64,
    pub first: f64,
    pub second: f64,
    pub nbdkit: f64,
    pub download: f64,
}

pub fn run(work: &Path, s3s: &Path, cfg: &Config) -> Result<(Vec<Row>, Vec<Point>), String> {
    let e = |e: fetcher::Error| e.to_string();
    let image = cfg.image_dir.join("image");
    let trace_path = cfg.image_dir.join("trace");
    let trace = read_trace(&trace_path)?;
    let trace_bytes: u64 = trace.iter().map(|r| r.len).sum();
    let zst = compressed_image(&cfg.image_dir)?;
    let which = |p: &str| {
        env::find_program(p).ok_or(format!("{p} is not installed (scripts/setup installs it)"))
    };
    // Debian's python3-libnbd is a module of the system's python3.
    let python = Some(PathBuf::from("/usr/bin/python3"))
        .filter(|p| p.is_file())
        .map_or_else(|| which("python3"), Ok)?;
    let (nbdkit, curl) = (which("nbdkit")?, which("curl")?);

    let server = S3Server::start(s3s, work)?;
    let direct = env::store(&server.endpoint())?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let started = Instant::now();
    for name in ["first", "later"] {
        let parcel = Parcel::new(direct.clone(), name, env::secret()).map_err(e)?;
        rt.block_on(import(
            &parcel,
            &image,
            &ImportOptions::default(),
            no_progress(),
        ))
        .map_err(e)?;
    }
    drop(rt);
    eprintln!(
        "P3: imported {} twice in {:.1} s; {} reads, {:.1} MB, in the trace",
        image.display(),
        started.elapsed().as_secs_f64(),
        trace.len(),
        trace_bytes as f64 / 1e6
    );
    // The earlier boot of "later": replayed unshaped, one block written (a
    // boot writes: its journal, the superblock's mount count), published:
    // the version the second sessions resume carries its access trace.
    let scratch = tempfile::tempdir_in(work).map_err(|e| e.to_string())?;
    let earlier = replay_isr(
        &direct,
        "later",
        &scratch.path().join("earlier"),
        &trace,
        None,
        |engine| {
            engine.write(trace[0].offset, &[0u8; 4096])?;
            engine.publish(None, 2).map(drop)
        },
    )?;
    let first_manifest = manifest(&direct, "first")?;
    let later_manifest = manifest(&direct, "later")?;
    if later_manifest.access_trace.is_empty() {
        return Err("the earlier session's publish carries no access trace".into());
    }
    let bucket = server.bucket_dir();
    let (first_touched, first_bytes) = touched(&first_manifest, &trace, &bucket)?;
    let (_, later_bytes) = touched(&later_manifest, &trace, &bucket)?;
    eprintln!(
        "P3: the trace touches {first_touched} chunks, {:.1} MB compressed; earlier boot (unshaped) {:.1} s",
        first_bytes as f64 / 1e6,
        earlier.seconds
    );

    let serve = scratch.path().join("www");
    std::fs::create_dir(&serve).map_err(|e| e.to_string())?;
    for (from, to) in [(&image, "image"), (&zst, "image.zst")] {
        std::os::unix::fs::symlink(
            std::path::absolute(from).map_err(|e| e.to_string())?,
            serve.join(to),
        )
        .map_err(|e| e.to_string())?;
    }
    let http = FileServer::start(&serve).map_err(|e| e.to_string())?;
    // A link each: the three peers run at the same time (each is bound by
    // its link, not by the CPU), so the scenario takes the slowest's time.
    let s3_link = ShapingProxy::start(server.addr, Shape::NONE).map_err(|e| e.to_string())?;
    let nbd_link = ShapingProxy::start(http.addr(), Shape::NONE).map_err(|e| e.to_string())?;
    let download_link = ShapingProxy::start(http.addr(), Shape::NONE).map_err(|e| e.to_string())?;
    let shaped = env::store(&s3_link.endpoint())?;

    let mut rows = Vec::new();
    let mut points = Vec::new();
    let want = |p: &str| cfg.peers.is_empty() || cfg.peers.iter().any(|x| x == p);
    for (i, &rate) in cfg.rates.iter().enumerate() {
        let shape = Shape::new(cfg.rtt, Some(rate));
        for l in [&s3_link, &nbd_link, &download_link] {
            l.set_shape(shape);
        }
        let link = format!(
            "{:.0} Mbit/s, RTT {} ms",
            rate as f64 * 8.0 / 1e6,
            cfg.rtt.as_millis()
        );
        let limit = |bytes: u64| bytes as f64 / rate as f64 + cfg.rtt.as_secs_f64();
        let dir = scratch.path().join(format!("link-{i}"));
        let skipped = || {
            Ok(Run {
                seconds: f64::NAN,
                ..Default::default()
            })
        };
        let (isr, nbd, down) = std::thread::scope(|scope| {
            let isr = scope.spawn(|| -> Result<(Run, Run), String> {
                if !want("isr") {
                    return Ok((skipped()?, skipped()?));
                }
                let first = replay_isr(
                    &shaped,
                    "first",
                    &dir.join("first"),
                    &trace,
                    Some(&s3_link),
                    |_| Ok(()),
                )?;
                eprintln!("P3 {link}: isr, first session {:.1} s", first.seconds);
                let second = replay_isr(
                    &shaped,
                    "later",
                    &dir.join("later"),
                    &trace,
                    Some(&s3_link),
                    |_| Ok(()),
                )?;
                eprintln!("P3 {link}: isr, later session {:.1} s", second.seconds);
                Ok((first, second))
            });
            let nbd = scope.spawn(|| {
                if !want("nbdkit") {
                    return skipped();
                }
                let r = replay_nbdkit(
                    &nbdkit,
                    &python,
                    (&nbd_link, &http),
                    &trace_path,
                    &dir.join("nbd"),
                );
                if let Ok(r) = &r {
                    eprintln!(
                        "P3 {link}: nbdkit curl+cache {:.1} s ({})",
                        r.seconds, r.extra
                    );
                }
                r
            });
            let down = scope.spawn(|| {
                if !want("download") {
                    return skipped();
                }
                let r = download(&curl, &download_link, &dir.join("download"));
                if let Ok(r) = &r {
                    eprintln!("P3 {link}: full download {:.1} s", r.seconds);
                }
                r
            });
            let join = |h: std::thread::ScopedJoinHandle<'_, Result<Run, String>>| {
                h.join()
                    .unwrap_or_else(|_| Err("a P3 peer panicked".into()))
            };
            (
                isr.join()
                    .unwrap_or_else(|_| Err("the isr replay panicked".into())),
                join(nbd),
                join(down),
            )
        });
        let ((first, second), nbd, down) = (isr?, nbd?, down?);
        let _ = std::fs::remove_dir_all(&dir);

        let point = Point {
            rate,
            limit: limit(later_bytes),
            first: first.seconds,
            second: second.seconds,
            nbdkit: nbd.seconds,
            download: down.seconds,
        };
        let common = json!({
            "set_rate_bytes_per_s": rate,
            "set_rtt_ms": cfg.rtt.as_secs_f64() * 1e3,
            "trace_reads": trace.len(),
            "trace_bytes": trace_bytes,
            "touched_chunks": first_touched,
            "touched_compressed_bytes_first": first_bytes,
            "touched_compressed_bytes_later": later_bytes,
            "image_zst_bytes": std::fs::metadata(&zst).map(|m| m.len()).unwrap_or(0),
        });
        let row =
            |what: String, r: &Run, figure: String, ratio: f64, goal: &str, met: Option<bool>| {
                Row {
                    id: "P3".into(),
                    what,
                    link: link.clone(),
                    figure: if r.seconds.is_nan() {
                        "not run (--p3-peers)".into()
                    } else {
                        figure
                    },
                    ratio: Some(ratio).filter(|x| x.is_finite()),
                    goal: goal.into(),
                    met: met.filter(|_| ratio.is_finite()),
                    details: json!({
                        "seconds": r.seconds,
                        "bytes_down": r.bytes_down,
                        "run": r.extra,
                        "link": common,
                    }),
                }
            };
        let vs_limit = second.seconds / point.limit;
        rows.push(row(
            "boot working set, isr, a later session (prefetch in the previous boot's order)".into(),
            &second,
            format!(
                "{:.1} s, {:.1} MB moved; limit {:.1} s ({:.1} MB compressed / link + RTT)",
                second.seconds,
                second.bytes_down as f64 / 1e6,
                point.limit,
                later_bytes as f64 / 1e6
            ),
            vs_limit,
            "≤ 1.3× limit",
            Some(vs_limit <= 1.3),
        ));
        let first_limit = limit(first_bytes);
        rows.push(row(
            "boot working set, isr, the first session (no trace yet)".into(),
            &first,
            format!(
                "{:.1} s, {:.1} MB moved; limit {:.1} s; {:.2}× the later session",
                first.seconds,
                first.bytes_down as f64 / 1e6,
                first_limit,
                first.seconds / second.seconds
            ),
            first.seconds / first_limit,
            "– (vs limit; the trace's effect)",
            None,
        ));
        let speedup = nbd.seconds / second.seconds;
        rows.push(row(
            "boot working set, nbdkit curl plugin + cache filter (raw image over HTTP)".into(),
            &nbd,
            format!(
                "{:.1} s, {:.1} MB moved; isr {speedup:.1}× faster (first session {:.1}×)",
                nbd.seconds,
                nbd.bytes_down as f64 / 1e6,
                nbd.seconds / first.seconds
            ),
            speedup,
            "isr ≥ 3× faster",
            Some(speedup >= 3.0),
        ));
        rows.push(row(
            "boot working set, download the whole image first (zstd, ISR-1's way)".into(),
            &down,
            format!(
                "{:.1} s, {:.1} MB moved; isr {:.1}× faster",
                down.seconds,
                down.bytes_down as f64 / 1e6,
                down.seconds / second.seconds
            ),
            down.seconds / second.seconds,
            "– (vs isr, a later session)",
            None,
        ));
        points.push(point);
    }
    Ok((rows, points))
}

fn engine_options(cache_root: &Path) -> EngineOptions {
    EngineOptions {
        cache_root: cache_root.to_owned(),
        host: "bench".into(),
        ..Default::default()
    }
}

/// Opens `name` with an empty cache under `cache_root` (prefetch on, as a
/// resume does) and replays the trace, one read at a time; the time runs
/// from the open to the last read's data. The engine stays open (prefetch
/// going) until then; `then` runs on it (the earlier boot writes and
/// publishes there), and it is closed after.
fn replay_isr(
    store: &Store,
    name: &str,
    cache_root: &Path,
    trace: &[Read],
    link: Option<&ShapingProxy>,
    then: impl FnOnce(&Engine) -> Result<(), fetcher::Error>,
) -> Result<Run, String> {
    let e = |e: fetcher::Error| format!("isr replay of {name}: {e}");
    let parcel = Parcel::new(store.clone(), name, env::secret()).map_err(e)?;
    let before = link.map(|l| l.counters());
    let started = Instant::now();
    let engine = Engine::open(parcel, engine_options(cache_root)).map_err(e)?;
    let opened = started.elapsed().as_secs_f64();
    let disk = engine.geometry().disk_size();
    let mut buf = vec![0u8; 1 << 20];
    for r in trace {
        if r.offset >= disk {
            continue;
        }
        let len = r.len.min(disk - r.offset) as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        engine.read(r.offset, &mut buf[..len]).map_err(e)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let bytes_down = match (link, before) {
        (Some(l), Some(b)) => l.counters().down - b.down,
        _ => 0,
    };
    let stats = engine.stats();
    then(&engine).map_err(e)?;
    engine.close().map_err(e)?;
    Ok(Run {
        seconds,
        bytes_down,
        extra: json!({
            "open_seconds": opened,
            "fetched_chunks": stats.fetched_chunks,
            "fetched_bytes": stats.fetched_bytes,
        }),
    })
}

/// nbdkit's curl plugin under its cache filter, on a Unix socket, reading
/// `image` from the HTTP server through `link`; the trace replayed by
/// libnbd (one read at a time); the time runs from the NBD connect.
fn replay_nbdkit(
    nbdkit: &Path,
    python: &Path,
    (link, http): (&ShapingProxy, &FileServer),
    trace: &Path,
    dir: &Path,
) -> Result<Run, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let sock = dir.join("nbd.sock");
    let before = link.counters();
    let served = http.requests();
    let mut child = Command::new(nbdkit)
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(&sock)
        .args(["--filter=cache", "curl"])
        .arg(format!("url=http://{}/image", link.addr()))
        .env("TMPDIR", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", nbdkit.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let out = child
                .wait_with_output()
                .map(|o| o.stderr)
                .unwrap_or_default();
            return Err(format!(
                "nbdkit did not start: {}",
                String::from_utf8_lossy(&out)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nbd-replay.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(&sock)
        .arg(trace)
        .output();
    let _ = child.kill();
    let _ = child.wait();
    let out = out.map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the NBD replay failed (is python3-libnbd installed?): {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut report: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("nbd-replay printed no JSON: {e}"))?;
    let after = link.counters();
    report["http_requests"] = json!(http.requests() - served);
    report["connections"] = json!(after.connections - before.connections);
    Ok(Run {
        seconds: report["seconds"].as_f64().unwrap_or(f64::NAN),
        bytes_down: after.down - before.down,
        extra: report,
    })
}

/// `curl URL | zstd -d`: the whole compressed image through `link`, made
/// a raw image again on the way in.
fn download(curl: &Path, link: &ShapingProxy, dir: &Path) -> Result<Run, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let out = dir.join("image");
    let before = link.counters();
    let started = Instant::now();
    let status = Command::new("bash")
        .arg("-c")
        .arg(r#"set -o pipefail; "$0" -sf "$1" | zstd -d -q -f -o "$2""#)
        .arg(curl)
        .arg(format!("http://{}/image.zst", link.addr()))
        .arg(&out)
        .status()
        .map_err(|e| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("the download of image.zst failed ({status})"));
    }
    Ok(Run {
        seconds,
        bytes_down: link.counters().down - before.down,
        extra: json!({}),
    })
}

/// `DIR/image.zst` (`zstd -1`), made once next to the image.
fn compressed_image(dir: &Path) -> Result<PathBuf, String> {
    let zst = dir.join("image.zst");
    if !zst.exists() {
        let tmp = dir.join("image.zst.tmp");
        let ok = Command::new("zstd")
            .args(["-1", "-T0", "-q", "-f"])
            .arg(dir.join("image"))
            .arg("-o")
            .arg(&tmp)
            .status()
            .map_err(|e| format!("cannot run zstd: {e}"))?
            .success();
        if !ok {
            return Err(format!("zstd of {} failed", dir.join("image").display()));
        }
        std::fs::rename(&tmp, &zst).map_err(|e| e.to_string())?;
    }
    Ok(zst)
}

fn read_trace(path: &Path) -> Result<Vec<Read>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: {e} (scripts/make-boot-image makes it)", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace().map(str::parse::<u64>);
        match (f.next(), f.next()) {
            (Some(Ok(offset)), Some(Ok(len))) if len > 0 => out.push(Read { offset, len }),
            _ => {
                return Err(format!(
                    "{}:{}: not \"OFFSET LENGTH\": {line}",
                    path.display(),
                    n + 1
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(format!("{}: no reads", path.display()));
    }
    Ok(out)
}

fn manifest(store: &Store, name: &str) -> Result<Manifest, String> {
    let parcel = Parcel::new(store.clone(), name, env::secret()).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(parcel.resolve(None))
        .map(|(_, m)| m)
        .map_err(|e| e.to_string())
}

/// The chunks the trace touches and the stored (compressed, encrypted)
/// bytes of those that hold data.
fn touched(m: &Manifest, trace: &[Read], bucket: &Path) -> Result<(u64, u64), String> {
    let cs = m.chunk_size as u64;
    let mut set = BTreeSet::new();
    for r in trace.iter().filter(|r| r.offset < m.disk_size) {
        let end = (r.offset + r.len).min(m.disk_size);
        set.extend(r.offset / cs..end.div_ceil(cs));
    }
    let mut bytes = 0;
    for &c in &set {
        if let Some(ChunkEntry::Data(key)) = m.chunks.get(c as usize) {
            let path = bucket.join(Store::chunk_path(&key.id()));
            bytes += std::fs::metadata(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .len();
        }
    }
    Ok((set.len() as u64, bytes))
}
