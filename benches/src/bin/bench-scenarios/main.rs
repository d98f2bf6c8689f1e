//! `bench-scenarios`: isr's scenario benchmarks over a shaped link, each a
//! row of a table and a JSON line, every ratio computed in the same run.
//! `scripts/bench-scenarios` builds and runs it; it writes
//! `BENCHMARKS.md` (the table, the machine, the date, how to reproduce,
//! and `benches/analysis.md`) and appends the rows to
//! `benches/results.jsonl`. Not a test: nothing here runs under
//! `cargo test`.

mod env;
mod hoard;
mod replay;
mod report;
mod suspend;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "isr's scenario benchmarks over a shaped link")]
struct Args {
    /// The repository: BENCHMARKS.md and benches/results.jsonl go there.
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Scratch space (servers' data, caches, images).
    #[arg(long, default_value = "target/bench-work")]
    work: PathBuf,
    /// The realistic disk and its boot trace for P3 (made by
    /// `scripts/make-boot-image` there if missing).
    #[arg(long, default_value_os_t = default_boot_image())]
    boot_image: PathBuf,
    /// P3: run only these peers (isr, nbdkit, download).
    #[arg(long, value_delimiter = ',')]
    p3_peers: Vec<String>,
    /// Run only these scenarios (P1 … P6).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Smaller sizes (a quick look, not for BENCHMARKS.md).
    #[arg(long)]
    quick: bool,
    /// Print the table only; write nothing.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    for (k, v) in env::aws_env() {
        // SAFETY: first thing in main, before any other thread exists; the
        // S3 clients of this process read these.
        unsafe { std::env::set_var(k, v) };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-scenarios: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let s3s = env::find_program("s3s-fs")
        .ok_or("s3s-fs is not installed: run scripts/setup (or cargo install s3s-fs --version 0.14.1 --features binary --locked)")?;
    if !env::isr_bin().is_file() {
        return Err(format!(
            "no isr binary at {} (cargo build --release, or set ISR_BIN)",
            env::isr_bin().display()
        ));
    }
    const SCENARIOS: [&str; 6] = ["P1", "P2", "P3", "P4", "P5", "P6"];
    const PEERS: [&str; 3] = ["isr", "nbdkit", "download"];
    if let Some(bad) = args
        .only
        .iter()
        .find(|o| !SCENARIOS.iter().any(|s| s.eq_ignore_ascii_case(o)))
    {
        return Err(format!(
            "--only {bad}: no such scenario (there are {})",
            SCENARIOS.join(", ")
        ));
    }
    if let Some(bad) = args.p3_peers.iter().find(|p| !PEERS.contains(&p.as_str())) {
        return Err(format!(
            "--p3-peers {bad}: no such peer (there are {})",
            PEERS.join(", ")
        ));
    }
    std::fs::create_dir_all(&args.work).map_err(|e| format!("{}: {e}", args.work.display()))?;
    let want =
        |id: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(id));
    let q = args.quick;
    let rtt = Duration::from_millis(40);
    let mut rows = Vec::new();
    let mut p3 = Vec::new();
    if want("P3") {
        make_boot_image(&args.repo, &args.boot_image)?;
        let cfg = replay::Config {
            image_dir: args.boot_image.clone(),
            rates: if q {
                vec![12_500_000]
            } else {
                vec![1_250_000, 12_500_000]
            },
            rtt,
            peers: args.p3_peers.clone(),
        };
        let (r, points) = replay::run(&args.work, &s3s, &cfg)?;
        rows.extend(r);
        p3 = points;
    }
    if want("P6") {
        let cfg = hoard::Config {
            mib: if q { 64 } else { 384 },
            rtt,
        };
        rows.extend(hoard::run(&args.work, &s3s, &cfg)?);
    }
    if want("P4") {
        let cfg = suspend::Config {
            disk_mib: if q { 64 } else { 256 },
            random_mib: 1,
            sequential_mib: if q { 8 } else { 32 },
            rate: 12_500_000,
            rtt,
        };
        rows.extend(suspend::run(&args.work, &s3s, &cfg)?);
    }
    if want("P5") {
        let size = if q { "256" } else { "1024" };
        rows.extend(report::script_rows(
            &args.repo,
            "bench-import",
            &["--json", size],
        )?);
    }
    // The kernel tier's two, each in a throw-away guest of its own.
    if want("P2") {
        rows.extend(report::script_rows(
            &args.repo,
            "bench-resume",
            &["--json"],
        )?);
    }
    if want("P1") {
        rows.extend(report::script_rows(&args.repo, "bench-ublk", &["--json"])?);
    }
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    let table = report::table(&rows);
    println!("{table}");
    let took = started.elapsed().as_secs_f64();
    eprintln!("bench-scenarios: {} rows in {took:.0} s", rows.len());
    if args.dry_run {
        return Ok(());
    }
    let date = sh("date -u +%Y-%m-%dT%H:%M:%SZ");
    let mut jsonl = String::new();
    for r in &rows {
        jsonl.push_str(&r.json(&date).to_string());
        jsonl.push('\n');
    }
    let results = args.repo.join("benches/results.jsonl");
    append(&results, &jsonl)?;
    let plot = if p3.is_empty() {
        String::new()
    } else {
        let png = args.repo.join("benches/p3.png");
        report::plot_p3(&p3, &png, &args.work)?;
        "![P3: time to the boot's working set against the link speed](benches/p3.png)\n\n"
            .to_owned()
    };
    let analysis =
        std::fs::read_to_string(args.repo.join("benches/analysis.md")).unwrap_or_default();
    let md = format!(
        "# Scenario benchmarks\n\n\
         Written by `scripts/bench-scenarios` on {date} (commit {commit}, {took:.0} s{quick}). \
         Every ratio is computed in the same run; the JSON lines of every run are in \
         `benches/results.jsonl`.\n\n{table}\n{plot}{p1}\
         ## Machine\n\n{machine}\n\n\
         ## How to reproduce\n\n    scripts/bench-scenarios            # all (installs what it needs)\n    \
         scripts/bench-scenarios --only P6  # one scenario\n    \
         target/release/shaping-proxy --self-test --rtt 40ms --rate 100Mbit   # the link's accuracy\n\n\
         The link is `benches/src/shaper.rs`, a TCP proxy on 127.0.0.1 between the client and \
         the S3 server (s3s-fs): half the RTT each way, a bandwidth cap per direction shared by \
         every connection through it, and one more RTT for each new connection (the handshake). \
         Each P6 row runs the proxy's self-test at the same shape first (in `details.proxy_check` \
         of its JSON line).\n\n{analysis}",
        commit = sh("git rev-parse --short HEAD"),
        p1 = report::p1_tables(&rows),
        quick = if q { ", --quick" } else { "" },
        machine = machine(),
    );
    let path = args.repo.join("BENCHMARKS.md");
    std::fs::write(&path, md).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!(
        "bench-scenarios: wrote {} and {}",
        path.display(),
        results.display()
    );
    Ok(())
}

fn default_boot_image() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    cache.join("isr-bench/boot-v1")
}

/// Runs `scripts/make-boot-image DIR` (it does nothing once DIR is made).
fn make_boot_image(repo: &std::path::Path, dir: &std::path::Path) -> Result<(), String> {
    let script = repo.join("scripts/make-boot-image");
    let status = Command::new(&script)
        .arg(dir)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!(
            "{} {} failed ({status})",
            script.display(),
            dir.display()
        ));
    }
    Ok(())
}

fn append(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
    format!(
        "- CPU: {} × {}\n- memory: {}\n- kernel: {}\n- rustc: {}\n- s3s-fs: {}",
        sh("nproc"),
        cpu.trim(),
        sh("grep MemTotal /proc/meminfo | awk '{printf \"%.1f GiB\", $2/1048576}'"),
        sh("uname -sr"),
        sh("rustc --version"),
        sh("s3s-fs --version 2>/dev/null || ~/.cargo/bin/s3s-fs --version"),
    )
}
