//! The VM itself travels: `isr run` boots a small VM (scripts/make-tiny-vm:
//! a bootable disk whose guest keeps a counter in RAM and re-reads a file
//! from its disk every second) in a real QEMU on /dev/ublkbN, `isr suspend`
//! saves its memory through QMP and publishes it with the disk, and
//! `isr run` on "another host" (a fresh cache and run directory) restores
//! it: the counter goes on, the file is intact, and the disk chunks fetched
//! before it ran are only those it touched. The RAM travels either whole
//! (a migration stream, `--stream-memory`) or on a RAM device of the
//! parcel, fetched as the guest touches it and sent as it changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Vm, ok, run, succeeded};

/// The tiny VM's disk image, built on the host by scripts/vm-test.
fn tiny_vm() -> PathBuf {
    let path = std::env::var_os("ISR_TINY_VM")
        .map(PathBuf::from)
        .expect("ISR_TINY_VM names the tiny VM image (scripts/vm-test builds it)");
    assert!(path.is_file(), "{} does not exist", path.display());
    assert!(
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "qemu-system-x86_64 does not run in this guest"
    );
    path
}

/// `TICK n sha` lines the guest printed (a line cut by a save is skipped).
fn ticks(console: &Path) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split(' ');
            match (f.next(), f.next(), f.next(), f.next()) {
                (Some("TICK"), Some(n), Some(sha), None) if sha.len() == 16 => {
                    Some((n.parse().ok()?, sha.to_owned()))
                }
                _ => None,
            }
        })
        .collect()
}

/// Waits until the console shows at least `n` ticks.
fn wait_ticks(console: &Path, n: usize, limit: Duration) -> Vec<(u64, String)> {
    let start = Instant::now();
    loop {
        let t = ticks(console);
        if t.len() >= n {
            return t;
        }
        assert!(
            start.elapsed() < limit,
            "{} ticks after {limit:?}; console:\n{}",
            t.len(),
            std::fs::read_to_string(console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The restored guest's ticks on `console`: it went on from tick `last`
/// (no boot, the counter kept in RAM next), and its file still hashes to
/// `hello`.
fn carried_on(console: &Path, last: u64, hello: &str) -> Vec<(u64, String)> {
    let after = wait_ticks(console, 3, Duration::from_secs(300));
    let text = std::fs::read_to_string(console).unwrap();
    assert!(
        !text.contains("HELLO"),
        "the guest booted again instead of going on:\n{text}"
    );
    assert!(
        after[0].0 > last && after[0].0 <= last + 2,
        "the counter stopped at {last} and went on at {}",
        after[0].0
    );
    for (n, sha) in &after {
        assert_eq!(sha, hello, "tick {n}: the file read back differs");
    }
    after
}

/// Kills the QEMU pids it holds when dropped (a failed test leaves none).
struct Reaper(Vec<i64>);
impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill sends a signal; no memory involved.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// [`ok`] within `limit`: a command that hangs fails the test, with the
/// end of every log in its run directory (the daemon's, QEMU's console),
/// instead of stalling the suite until vm-run's timeout.
fn ok_within(cmd: &mut Command, limit: Duration) -> String {
    use std::process::Stdio;
    let run_dir = cmd
        .get_envs()
        .find(|(k, _)| *k == "ISR_RUN_DIR")
        .and_then(|(_, v)| v.map(PathBuf::from));
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill sends a signal to the child started above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut logs = String::new();
            for e in run_dir
                .iter()
                .flat_map(|d| std::fs::read_dir(d).into_iter().flatten())
            {
                let path = e.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(4000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                logs.push_str(&format!("\n--- {} (end):\n{tail}", path.display()));
            }
            panic!("{cmd:?} did not finish within {limit:?}{logs}");
        }
    };
    succeeded(cmd, out)
}

/// How long `isr run` and `isr suspend` of the tiny VM may take (they take
/// 2 to 15 s here).
const COMMAND_LIMIT: Duration = Duration::from_secs(240);

fn run_vm(vm: &Vm, host: Option<&Path>, extra: &[&str]) -> Value {
    let mut cmd = vm.isr();
    if let Some(h) = host {
        cmd.env("ISR_RUN_DIR", h.join("run"))
            .env("ISR_CACHE_DIR", h.join("cache"));
    }
    let out = ok_within(
        cmd.arg("run")
            .args(vm.parcel_args())
            .args(["--memory-mib", "128", "--json"])
            .args(extra),
        COMMAND_LIMIT,
    );
    serde_json::from_str(&out).unwrap()
}

/// `isr run` with `extra`, which must fail; its stderr.
fn run_refused(vm: &Vm, extra: &[&str]) -> String {
    let out = run(vm.isr().arg("run").args(vm.parcel_args()).args(extra));
    assert!(!out.status.success(), "isr run {extra:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn suspend_vm(vm: &Vm, host: Option<&Path>) -> Value {
    let mut cmd = vm.isr();
    if let Some(h) = host {
        cmd.env("ISR_RUN_DIR", h.join("run"))
            .env("ISR_CACHE_DIR", h.join("cache"));
    }
    let start = Instant::now();
    let mut v: Value = serde_json::from_str(&ok_within(
        cmd.args(["suspend", "vm", "--json"]),
        COMMAND_LIMIT,
    ))
    .unwrap();
    v["wall_seconds"] = start.elapsed().as_secs_f64().into();
    v
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control and QEMU; run by scripts/vm-test"]
fn ublk_qemu_vm_suspends_with_its_memory_and_resumes_on_another_host() {
    let image = tiny_vm();
    let mut vm = Vm::from_image(&image);
    let disk_size = std::fs::metadata(&image).unwrap().len();
    let mut reaper = Reaper(Vec::new());

    // Host A: a cold boot from the disk, its RAM in QEMU (the stream path).
    let a = run_vm(&vm, None, &["--stream-memory"]);
    vm.device = a["device"].as_str().map(str::to_owned);
    reaper.0.push(a["vm_pid"].as_i64().unwrap());
    assert_eq!(a["restored"], false);
    assert!(a["ram_device"].is_null(), "{a}");
    let console_a = PathBuf::from(a["console"].as_str().unwrap());
    let before = wait_ticks(&console_a, 3, Duration::from_secs(300));
    let hello = before[0].1.clone();
    let st = vm.status();
    assert_eq!(st["vm"]["state"], "running", "{st}");

    let s1 = suspend_vm(&vm, None);
    vm.device = None;
    let last = ticks(&console_a).last().unwrap().0;
    let mem1 = &s1["memory"];
    assert_eq!(s1["version"], 2, "{s1}");
    assert!(mem1["size"].as_u64().unwrap() > 1 << 20, "{s1}");
    assert!(mem1["uploaded_chunks"].as_u64().unwrap() > 0, "{s1}");
    println!(
        "suspend 1: {:.1} s; disk delta {} chunks, {} bytes uploaded; memory image {} bytes, {} bytes uploaded ({} chunks: {} uploaded, {} deduplicated, {} zero)",
        s1["wall_seconds"].as_f64().unwrap(),
        s1["dirty_chunks"],
        s1["bytes_uploaded"],
        mem1["size"],
        mem1["bytes_uploaded"],
        mem1["uploaded_chunks"].as_u64().unwrap()
            + mem1["dedup_chunks"].as_u64().unwrap()
            + mem1["zero_chunks"].as_u64().unwrap(),
        mem1["uploaded_chunks"],
        mem1["dedup_chunks"],
        mem1["zero_chunks"],
    );

    // Host B: a fresh cache and run directory; demand fetches only.
    let host_b = tempfile::tempdir().unwrap();
    let b = run_vm(&vm, Some(host_b.path()), &["--no-prefetch"]);
    reaper.0.push(b["vm_pid"].as_i64().unwrap());
    assert_eq!(b["restored"], true, "{b}");
    assert_eq!(b["version"], 2);
    let fetched_before_run = b["disk_fetched_bytes"].as_u64().unwrap();
    println!(
        "resume on host B: running in {:.1} s (device {:.1} s, memory image {:.1} s, {} bytes); {} bytes of the {} byte disk fetched before it ran",
        b["seconds_total"].as_f64().unwrap(),
        b["seconds_device"].as_f64().unwrap(),
        b["seconds_memory"].as_f64().unwrap(),
        b["memory"]["size"],
        fetched_before_run,
        disk_size
    );
    let console_b = PathBuf::from(b["console"].as_str().unwrap());
    let after = carried_on(&console_b, last, &hello);
    // The file and the counter's file were re-read through isr: the chunks
    // they touched, a small part of the disk.
    let st_b: Value = serde_json::from_str(&ok(vm
        .isr()
        .env("ISR_RUN_DIR", host_b.path().join("run"))
        .args(["status", "vm", "--json"])))
    .unwrap();
    let fetched = st_b["fetched_bytes"].as_u64().unwrap();
    println!(
        "host B fetched {fetched} bytes of disk after {} ticks",
        after.len()
    );
    assert!(fetched > 0 && fetched < disk_size / 4, "{st_b}");

    // Suspend again: the second memory image shares most chunks with the
    // first.
    let s2 = suspend_vm(&vm, Some(host_b.path()));
    let mem2 = &s2["memory"];
    assert_eq!(s2["version"], 3, "{s2}");
    println!(
        "suspend 2: {:.1} s; disk delta {} bytes uploaded; memory image {} bytes: {} bytes uploaded, {} chunks deduplicated against the disk and the previous image, {} uploaded, {} zero",
        s2["wall_seconds"].as_f64().unwrap(),
        s2["bytes_uploaded"],
        mem2["size"],
        mem2["bytes_uploaded"],
        mem2["dedup_chunks"],
        mem2["uploaded_chunks"],
        mem2["zero_chunks"],
    );
    // Cut by content, the second image repeats most chunks of the first
    // although the migration stream shifted (with fixed chunks 0.3 % to
    // 72 % were measured); every chunk is accounted for.
    let n = |k: &str| mem2[k].as_u64().unwrap();
    assert_eq!(
        n("uploaded_chunks") + n("dedup_chunks") + n("zero_chunks"),
        n("chunks"),
        "{s2}"
    );
    assert!(
        n("chunks") > n("size").div_ceil(256 * 1024),
        "cut by content: a quarter chunk on average: {s2}"
    );
    assert!(
        n("dedup_chunks") * 2 > n("chunks") - n("zero_chunks"),
        "most chunks repeat: {s2}"
    );
    drop(reaper);

    // A disk written since the resume no longer matches the memory image:
    // `isr run` refuses to restore it over that disk.
    let dev = vm.resume(&[]);
    ok(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={dev}"),
        "bs=4096",
        "count=1",
        "seek=100",
        "oflag=direct",
        "conv=notrunc",
    ]));
    let err = run_refused(&vm, &["--memory-mib", "128"]);
    assert!(
        err.contains("changed since version 3") && err.contains("--cold"),
        "{err}"
    );
    assert!(vm.status()["vm"].is_null(), "no QEMU was started");
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control and QEMU; run by scripts/vm-test"]
fn ublk_qemu_that_dies_is_reported_and_suspend_publishes_the_disk_alone() {
    let image = tiny_vm();
    let mut vm = Vm::from_image(&image);
    let a = run_vm(&vm, None, &[]);
    vm.device = a["device"].as_str().map(str::to_owned);
    let pid = a["vm_pid"].as_i64().unwrap();
    // SAFETY: kill sends a signal to the QEMU the test started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let start = Instant::now();
    while vm.status()["vm"]["state"] != "exited" {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", vm.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = ok(vm.isr().args(["status", "vm"]));
    assert!(text.contains("exited"), "{text}");

    let out = run(vm.isr().args(["suspend", "vm", "--json"]));
    vm.device = None;
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not running") && err.contains(&pid.to_string()),
        "{err}"
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(s["memory"].is_null(), "{s}");

    // Without QEMU, `isr run` says so before touching the device.
    let err = run_refused(&vm, &["--qemu", "/nonexistent/qemu"]);
    assert!(
        err.contains("/nonexistent/qemu") && err.contains("not installed"),
        "{err}"
    );
    assert!(
        vm.isr()
            .args(["status", "vm"])
            .output()
            .unwrap()
            .status
            .code()
            == Some(1)
    );
}

/// The RAM device's bytes fetched so far, from `isr status` on `host`.
fn ram_fetched(vm: &Vm, host: Option<&Path>) -> u64 {
    let mut cmd = vm.isr();
    if let Some(h) = host {
        cmd.env("ISR_RUN_DIR", h.join("run"));
    }
    let st: Value = serde_json::from_str(&ok(cmd.args(["status", "vm", "--json"]))).unwrap();
    st["ram"]["fetched_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("{st}"))
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control and QEMU; run by scripts/vm-test"]
fn ublk_qemu_vm_ram_on_a_device_resumes_lazily_and_suspends_what_changed() {
    let image = tiny_vm();
    let mut vm = Vm::from_image(&image);
    let mut reaper = Reaper(Vec::new());
    let ram_size = 128u64 << 20;

    // Host A: a cold boot; the RAM is the parcel's RAM device.
    let a = run_vm(&vm, None, &[]);
    vm.device = a["device"].as_str().map(str::to_owned);
    reaper.0.push(a["vm_pid"].as_i64().unwrap());
    let ram_a = a["ram_device"]
        .as_str()
        .unwrap_or_else(|| panic!("{a}"))
        .to_owned();
    assert!(ram_a.starts_with("/dev/ublkb"), "{a}");
    let ra = format!(
        "/sys/block/{}/queue/read_ahead_kb",
        ram_a.trim_start_matches("/dev/")
    );
    assert_eq!(
        std::fs::read_to_string(&ra).unwrap().trim(),
        "0",
        "a RAM fault reads its page alone"
    );
    let console_a = PathBuf::from(a["console"].as_str().unwrap());
    let before = wait_ticks(&console_a, 3, Duration::from_secs(300));
    let hello = before[0].1.clone();
    // The cold boot's RAM starts as zeros: nothing fetched for it.
    assert_eq!(ram_fetched(&vm, None), 0);

    // The daemon dies under the running VM (its RAM faults and disk I/O
    // wait); `isr recover` re-attaches both devices and the VM goes on.
    let pid = vm.status()["pid"].as_i64().unwrap();
    // SAFETY: kill sends a signal to the daemon the test started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let start = Instant::now();
    while vm
        .isr()
        .args(["status", "vm"])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the daemon did not die"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rec: Value = serde_json::from_str(&ok(vm.isr().args(["recover", "vm", "--json"]))).unwrap();
    assert_eq!(rec["recovered"], true, "{rec}");
    assert_eq!(rec["ram_device"].as_str(), Some(ram_a.as_str()), "{rec}");
    let n = ticks(&console_a).len();
    let more = wait_ticks(&console_a, n + 2, Duration::from_secs(120));
    assert_eq!(more.last().unwrap().1, hello, "after the recovery");

    let s1 = suspend_vm(&vm, None);
    vm.device = None;
    let last = ticks(&console_a).last().unwrap().0;
    assert_eq!(s1["version"], 2, "{s1}");
    let (ram1, state1) = (&s1["ram"], &s1["memory"]);
    assert!(ram1["dirty_chunks"].as_u64().unwrap() > 0, "{s1}");
    // The device state alone: a small part of the RAM.
    assert!(state1["size"].as_u64().unwrap() < ram_size / 8, "{s1}");
    println!(
        "lazy suspend 1: {:.1} s; RAM: {} chunks written, {} uploaded, {} bytes; device state {} bytes ({} uploaded)",
        s1["wall_seconds"].as_f64().unwrap(),
        ram1["dirty_chunks"],
        ram1["uploaded_chunks"],
        ram1["bytes_uploaded"],
        state1["size"],
        state1["bytes_uploaded"]
    );

    // Host B: a fresh cache; the VM runs while its RAM is in the store.
    let host_b = tempfile::tempdir().unwrap();
    let b = run_vm(&vm, Some(host_b.path()), &["--no-prefetch"]);
    reaper.0.push(b["vm_pid"].as_i64().unwrap());
    assert_eq!(b["restored"], true, "{b}");
    assert!(b["ram_device"].is_string(), "{b}");
    let fetched_at_run = b["ram_fetched_bytes"].as_u64().unwrap();
    println!(
        "lazy resume on host B: running in {:.1} s (device {:.1} s, device state {:.1} s, {} bytes); {fetched_at_run} bytes of its {ram_size} byte RAM fetched by then",
        b["seconds_total"].as_f64().unwrap(),
        b["seconds_device"].as_f64().unwrap(),
        b["seconds_memory"].as_f64().unwrap(),
        b["memory"]["size"],
    );
    let console_b = PathBuf::from(b["console"].as_str().unwrap());
    let after = carried_on(&console_b, last, &hello);
    let fetched = ram_fetched(&vm, Some(host_b.path()));
    println!(
        "host B fetched {fetched} bytes of RAM after {} ticks",
        after.len()
    );
    assert!(
        fetched > 0 && fetched < ram_size,
        "the guest's RAM was fetched as it ran, not whole: {fetched}"
    );

    // Suspend again: what the guest wrote since the resume, not its RAM.
    let s2 = suspend_vm(&vm, Some(host_b.path()));
    assert_eq!(s2["version"], 3, "{s2}");
    let ram2 = &s2["ram"];
    println!(
        "lazy suspend 2: {:.1} s; RAM: {} chunks written since the resume, {} uploaded, {} bytes; device state {} bytes",
        s2["wall_seconds"].as_f64().unwrap(),
        ram2["dirty_chunks"],
        ram2["uploaded_chunks"],
        ram2["bytes_uploaded"],
        s2["memory"]["size"]
    );
    let chunks = ram_size.div_ceil(256 * 1024);
    assert!(
        ram2["dirty_chunks"].as_u64().unwrap() < chunks,
        "the whole RAM was sent: {s2}"
    );
    assert!(ram2["uploaded_chunks"].as_u64().unwrap() <= ram2["dirty_chunks"].as_u64().unwrap());

    // Back on host A, whose caches are at version 2: version 3 goes on.
    let a2 = run_vm(&vm, None, &[]);
    reaper.0.push(a2["vm_pid"].as_i64().unwrap());
    vm.device = a2["device"].as_str().map(str::to_owned);
    assert_eq!(
        (a2["restored"].clone(), a2["version"].clone()),
        (true.into(), 3.into()),
        "{a2}"
    );
    let console_a2 = PathBuf::from(a2["console"].as_str().unwrap());
    let last_b = ticks(&console_b).last().unwrap().0;
    let again = wait_ticks(&console_a2, 2, Duration::from_secs(300));
    assert!(again[0].0 > last_b, "{again:?} after {last_b}");
    let s3 = suspend_vm(&vm, None);
    vm.device = None;
    assert_eq!(s3["version"], 4, "{s3}");
    drop(reaper);

    // A parcel resumed without a RAM device cannot restore a version whose
    // RAM is an image of its own: `isr run` says so, and starts nothing.
    vm.resume(&[]);
    let err = run_refused(&vm, &["--memory-mib", "128"]);
    assert!(
        err.contains("RAM device") && err.contains("without"),
        "{err}"
    );
    assert!(vm.status()["vm"].is_null(), "no QEMU was started");
}
