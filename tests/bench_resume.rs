//! Kernel-tier benchmark (not a test): how long `isr resume` takes to a
//! usable device, cold (empty cache) and warm (after a clean suspend on the
//! same host), and how long `isr recover` takes after a SIGKILL of the
//! daemon, for a 1 GiB and a 64 GiB parcel holding the same 160 MiB of data;
//! and (P2 of the scenario benchmarks) cold and warm resume from an S3 store
//! (s3s-fs) behind the shaping proxy at 40 ms RTT, 100 Mbit/s, beside the
//! same resumes unshaped and the time of `isr --version`, references taken
//! in the same guest. DESIGN.md invariant 9: resuming costs what changed,
//! not what exists. Run by `scripts/bench-resume` in a guest with ublk; it
//! prints a table and one JSON line per parcel size. Nothing is asserted
//! on timings.

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const DATA_MIB: u64 = 160;

struct Parcel {
    dir: PathBuf,
    name: String,
    cache: PathBuf,
    /// The store's URL (a file:// directory, or s3://bucket/prefix).
    store: String,
    /// Environment of every isr run (the S3 endpoint and keys).
    env: Vec<(&'static str, String)>,
}

/// The isr binary: the guest's own copy (/usr/local/bin/isr, in RAM) when
/// there is one, so that no run pays for loading it over 9p.
fn isr_bin() -> PathBuf {
    let local = Path::new("/usr/local/bin/isr");
    if local.exists() {
        local.to_owned()
    } else {
        env!("CARGO_BIN_EXE_isr").into()
    }
}

/// Runs of each measurement (the median is reported).
fn runs() -> usize {
    std::env::var("ISR_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// The median of `n` runs of `f`.
fn median(n: usize, mut f: impl FnMut(usize) -> f64) -> f64 {
    let mut v: Vec<f64> = (0..n).map(&mut f).collect();
    v.sort_by(f64::total_cmp);
    v[n / 2]
}

impl Parcel {
    fn isr(&self) -> Command {
        let mut c = Command::new(isr_bin());
        c.env("ISR_RUN_DIR", self.dir.join("run"))
            .env("ISR_CACHE_DIR", &self.cache)
            .env_remove("ISR_STORE")
            .env_remove("ISR_KEY_FILE")
            .envs(self.env.iter().cloned());
        c
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--store".into(),
            self.store.clone(),
            "--parcel".into(),
            self.name.clone(),
            "--key-file".into(),
            self.dir.join("key").display().to_string(),
        ]
    }

    fn ok(&self, args: &[&str], parcel_args: bool) -> Value {
        let mut c = self.isr();
        c.args(args);
        if parcel_args {
            c.args(self.args());
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "isr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap_or(Value::Null)
    }

    /// Seconds from `isr resume` until its device answers a read.
    fn timed(&self, args: &[&str], parcel_args: bool) -> (f64, Value) {
        let t = Instant::now();
        let v = self.ok(args, parcel_args);
        let dev = v["device"].as_str().expect("a device").to_owned();
        let mut buf = [0u8; 4096];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&dev)
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        (t.elapsed().as_secs_f64(), v)
    }

    fn daemon_pid(&self) -> i32 {
        let st: Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.join(format!("run/{}.json", self.name))).unwrap(),
        )
        .unwrap();
        st["pid"].as_i64().unwrap() as i32
    }
}

/// A sparse image of `size` with `DATA_MIB` MiB of random data spread
/// over it, imported as a parcel into a file:// store.
fn parcel(root: &Path, size: u64) -> Parcel {
    let store = format!("file://{}/p{}g/store", root.display(), size >> 30);
    parcel_in(root, size, store, Vec::new())
}

/// The same, imported into `store` with `env`.
fn parcel_in(root: &Path, size: u64, store: String, env: Vec<(&'static str, String)>) -> Parcel {
    let name = format!("p{}g", size >> 30);
    let dir = root.join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let p = Parcel {
        cache: dir.join("cache"),
        dir,
        name,
        store,
        env,
    };
    let image = p.dir.join("image");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(size).unwrap();
    let pieces = 10;
    let step = size / pieces;
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ size;
    let mut buf = vec![0u8; (DATA_MIB / pieces * MIB) as usize];
    for i in 0..pieces {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        use std::os::unix::fs::FileExt;
        f.write_all_at(&buf, i * step).unwrap();
    }
    drop(f);
    p.ok(&["keygen", p.dir.join("key").to_str().unwrap()], false);
    let mut c = p.isr();
    c.arg("import").arg(&image).args(p.args());
    assert!(c.status().unwrap().success());
    std::fs::remove_file(&image).unwrap();
    p
}

#[test]
#[ignore = "benchmark: run by scripts/bench-resume in a guest with ublk"]
fn bench_resume_cold_warm_recover() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: run scripts/bench-resume"
    );
    let root = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for size in [1u64 << 30, 64 << 30] {
        let mut p = parcel(root.path(), size);
        let runs = runs();
        // Cold: an empty cache each time.
        let cold = median(runs, |i| {
            p.cache = p.dir.join(format!("cold-{i}"));
            let (t, _) = p.timed(&["resume", "--json"], true);
            p.ok(&["suspend", &p.name, "--json"], false);
            t
        });
        // Warm: one cache, filled (hoard), resumed right after a clean close.
        p.cache = p.dir.join("cache");
        p.ok(&["hoard", "--json"], true);
        // What is measured is a resume right after a clean suspend.
        p.ok(&["resume", "--json"], true);
        p.ok(&["suspend", &p.name, "--json"], false);
        let mut st = Value::Null;
        let warm = median(runs, |_| {
            let (t, _) = p.timed(&["resume", "--json"], true);
            st = p.ok(&["status", &p.name, "--json"], false);
            p.ok(&["suspend", &p.name, "--json"], false);
            t
        });
        // Recover: SIGKILL the daemon, reattach the same device.
        let mut rst = Value::Null;
        let recover = median(runs, |_| {
            p.timed(&["resume", "--json"], true);
            // SAFETY: sends SIGKILL to the daemon's pid; no memory involved.
            unsafe { libc::kill(p.daemon_pid(), libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(300));
            let (t, _) = p.timed(&["recover", &p.name, "--json"], false);
            rst = p.ok(&["status", &p.name, "--json"], false);
            p.ok(&["suspend", &p.name, "--json"], false);
            t
        });
        let row = json!({
            "scenario": "resume",
            "disk_bytes": size,
            "data_mib": DATA_MIB,
            "cold_s": cold,
            "warm_s": warm,
            "recover_s": recover,
            "warm_over_cold": warm / cold,
            "runs": runs,
            "warm_cached_chunks": st["cached_chunks"],
            "warm_scanned_chunks": st["scanned_chunks"],
            "recover_scanned_chunks": rst["scanned_chunks"],
        });
        println!("{row}");
        rows.push(row);
    }
    println!();
    println!(
        "| parcel | cold resume | warm resume | recover after SIGKILL | warm/cold |  (medians)"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} GiB ({} MiB data) | {:.2} s | {:.2} s | {:.2} s | {:.2} |",
            r["disk_bytes"].as_u64().unwrap() >> 30,
            DATA_MIB,
            r["cold_s"].as_f64().unwrap(),
            r["warm_s"].as_f64().unwrap(),
            r["recover_s"].as_f64().unwrap(),
            r["warm_over_cold"].as_f64().unwrap(),
        );
    }
    let ratio = |k: &str| rows[1][k].as_f64().unwrap() / rows[0][k].as_f64().unwrap();
    println!(
        "64 GiB / 1 GiB: cold {:.2}x, warm {:.2}x, recover {:.2}x",
        ratio("cold_s"),
        ratio("warm_s"),
        ratio("recover_s")
    );
}

/// The shaping proxy (`target/release/shaping-proxy`, named by
/// `$ISR_SHAPING_PROXY`) in front of a server on 127.0.0.1; it stops when
/// its standard input (held here) closes.
struct Shaper {
    child: Child,
    addr: String,
}

impl Shaper {
    fn start(to: u16, rtt: &str, rate: &str) -> Shaper {
        let program = std::env::var_os("ISR_SHAPING_PROXY").expect(
            "$ISR_SHAPING_PROXY must name the shaping proxy \
             (cargo build --release -p isr-benches; scripts/bench-resume sets it)",
        );
        let mut child = Command::new(&program)
            .args([
                "--to",
                &format!("127.0.0.1:{to}"),
                "--rtt",
                rtt,
                "--rate",
                rate,
            ])
            .arg("--stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", Path::new(&program).display()));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "listening on 127.0.0.1:PORT (100 Mbit/s, RTT 40 ms)"
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("shaping-proxy said {line:?}"))
            .to_owned();
        Shaper { child, addr }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seconds `isr --version` takes: what starting a process costs here (a
/// reference for the times measured beside it, inflated alike by TCG).
fn version_seconds(runs: usize) -> f64 {
    median(runs, |_| {
        let t = Instant::now();
        let out = Command::new(isr_bin()).arg("--version").output().unwrap();
        assert!(out.status.success());
        t.elapsed().as_secs_f64()
    })
}

#[test]
#[ignore = "benchmark: run by scripts/bench-resume in a guest with ublk"]
fn bench_resume_s3_shaped() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: run scripts/bench-resume"
    );
    let rtt = std::env::var("ISR_BENCH_RTT").unwrap_or_else(|_| "40ms".into());
    let rate = std::env::var("ISR_BENCH_RATE").unwrap_or_else(|_| "100Mbit".into());
    let runs = runs();
    let s3 = support::S3Server::start();
    let shaper = Shaper::start(s3.port, &rtt, &rate);
    let (direct, shaped) = (
        support::s3_env(&s3.endpoint()),
        support::s3_env(&shaper.endpoint()),
    );
    let root = tempfile::tempdir().unwrap();
    let version = version_seconds(runs.max(3));
    let mut rows = Vec::new();
    for size in [1u64 << 30, 64 << 30] {
        let store = format!("s3://{}/p{}g", support::BUCKET, size >> 30);
        // Made and filled over the direct endpoint; only resumes go through the link.
        let mut p = parcel_in(root.path(), size, store, direct.clone());
        let cold = |p: &mut Parcel, env: &[(&'static str, String)], tag: &str| {
            median(runs, |i| {
                p.cache = p.dir.join(format!("cold-{tag}-{i}"));
                p.env = env.to_vec();
                let (t, _) = p.timed(&["resume", "--json"], true);
                p.ok(&["suspend", &p.name, "--json"], false);
                t
            })
        };
        let cold_shaped = cold(&mut p, &shaped, "shaped");
        let cold_direct = cold(&mut p, &direct, "direct");
        // Warm: a filled cache (hoarded unshaped), resumed right after a clean close.
        p.cache = p.dir.join("cache");
        p.env = direct.clone();
        p.ok(&["hoard", "--json"], true);
        p.ok(&["resume", "--json"], true);
        p.ok(&["suspend", &p.name, "--json"], false);
        let warm = |p: &mut Parcel, env: &[(&'static str, String)]| {
            p.env = env.to_vec();
            median(runs, |_| {
                let (t, _) = p.timed(&["resume", "--json"], true);
                p.ok(&["suspend", &p.name, "--json"], false);
                t
            })
        };
        let warm_shaped = warm(&mut p, &shaped);
        let warm_direct = warm(&mut p, &direct);
        let row = json!({
            "scenario": "resume-s3-shaped",
            "disk_bytes": size,
            "data_mib": DATA_MIB,
            "rtt": rtt,
            "rate": rate,
            "cold_s": cold_shaped,
            "warm_s": warm_shaped,
            "unshaped_cold_s": cold_direct,
            "unshaped_warm_s": warm_direct,
            "isr_version_s": version,
            "runs": runs,
        });
        println!("{row}");
        rows.push(row);
    }
    println!();
    println!(
        "| parcel | cold, {rtt} {rate} | warm, shaped | cold, unshaped | warm, unshaped |  (medians; isr --version {version:.3} s)"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap();
        println!(
            "| {} GiB ({} MiB data) | {:.2} s | {:.2} s | {:.2} s | {:.2} s |",
            r["disk_bytes"].as_u64().unwrap() >> 30,
            DATA_MIB,
            f("cold_s"),
            f("warm_s"),
            f("unshaped_cold_s"),
            f("unshaped_warm_s"),
        );
    }
}
