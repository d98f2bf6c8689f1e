//! Living with a resumed parcel: `isr sync` while the device serves, so
//! that the suspend uploads only the tail; `--trickle`; working offline
//! (suspend `--offline`, resume with the store unreachable, automatic
//! reconnection) and `isr checkin`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Vm, ok, run, sha256_of};

/// Deterministic noise (xorshift), so that two runs write the same files.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn mount(dev: &str, at: &Path) {
    std::fs::create_dir_all(at).unwrap();
    ok(Command::new("mount").args(["-t", "ext4", dev]).arg(at));
}

fn umount(at: &Path) {
    ok(Command::new("umount").arg(at));
}

/// Writes files `first..first+n` of 512 KiB each into `dir`, then syncs.
fn write_files(dir: &Path, first: u64, n: u64) {
    for i in first..first + n {
        std::fs::write(dir.join(format!("f{i}")), noise(i + 1, 512 << 10)).unwrap();
    }
    ok(&mut Command::new("sync"));
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{out:?}: {e}"))
}

/// One session: mkfs, 16 files, (sync), 2 more files, suspend. Returns the
/// suspend's summary, the sync's (if any), and the suspend's wall time.
fn session(vm: &mut Vm, with_sync: bool) -> (Value, Option<Value>, f64) {
    let dev = vm.resume(&[]);
    ok(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard", &dev]));
    let mnt = vm.dir.path().join("mnt");
    mount(&dev, &mnt);
    write_files(&mnt, 0, 16);
    let synced = with_sync.then(|| {
        let s = json_of(&ok(vm.isr().args(["sync", "vm", "--json"])));
        // The device kept serving: the files are still there.
        assert_eq!(std::fs::read(mnt.join("f3")).unwrap(), noise(4, 512 << 10));
        s
    });
    write_files(&mnt, 16, 2);
    umount(&mnt);
    let started = Instant::now();
    let s = vm.suspend();
    (s, synced, started.elapsed().as_secs_f64())
}

/// The scenario: resume → mkfs + files → sync → more files →
/// suspend uploads only the tail → resume into a fresh cache → the files
/// are identical. The same session without a sync is the reference.
#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_sync_while_running_then_suspend_uploads_only_the_tail() {
    let mut reference = Vm::new(64);
    let (plain, _, plain_secs) = session(&mut reference, false);
    let mut vm = Vm::new(64);
    let (tail, synced, tail_secs) = session(&mut vm, true);
    let synced = synced.unwrap();
    println!(
        "suspend without a sync: {} chunks, {} bytes uploaded, {plain_secs:.2} s",
        plain["uploaded_chunks"], plain["bytes_uploaded"]
    );
    println!(
        "sync while running: {} chunks, {} bytes uploaded in {:.2} s",
        synced["uploaded_chunks"],
        synced["bytes_uploaded"],
        synced["seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "suspend after the sync: {} chunks, {} bytes uploaded ({} synced before), {tail_secs:.2} s",
        tail["uploaded_chunks"], tail["bytes_uploaded"], tail["synced_chunks"]
    );
    let bytes = |v: &Value| v["bytes_uploaded"].as_u64().unwrap();
    assert!(
        bytes(&synced) > 8 << 20,
        "the sync uploaded the 16 files: {synced}"
    );
    assert!(tail["synced_chunks"].as_u64().unwrap() > 0, "{tail}");
    // The tail is 2 files of 16 (1 MiB) and the metadata they touched.
    assert!(
        bytes(&tail) < (2 << 20) + (1 << 20),
        "the suspend after a sync uploads only the tail: {tail}"
    );
    assert!(
        bytes(&tail) * 4 < bytes(&plain),
        "against {} bytes without a sync: {tail}",
        bytes(&plain)
    );

    // Another host: a fresh cache reads the same files.
    vm.cache = vm.dir.path().join("fresh-cache");
    let dev = vm.resume(&[]);
    let mnt = vm.dir.path().join("mnt2");
    mount(&dev, &mnt);
    for i in 0..18 {
        assert_eq!(
            std::fs::read(mnt.join(format!("f{i}"))).unwrap(),
            noise(i + 1, 512 << 10),
            "file f{i}"
        );
    }
    umount(&mnt);
    ok(Command::new("e2fsck").args(["-fn", &dev]));
    vm.suspend();
}

/// `--trickle 1`: once the device is idle, the dirty chunks upload by
/// themselves; the suspend then has (almost) nothing left to send.
#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_trickle_uploads_when_the_device_is_idle() {
    let mut vm = Vm::new(32);
    let dev = vm.resume(&["--trickle", "1"]);
    ok(Command::new("sh").arg("-c").arg(format!(
        "dd if=/dev/urandom of={dev} bs=256k count=16 seek=8 oflag=direct 2>/dev/null"
    )));
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = vm.status();
        if st["unsynced_chunks"] == 0 || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(st["unsynced_chunks"], 0, "trickle did not upload: {st}");
    assert!(st["synced_chunks"].as_u64().unwrap() > 0, "{st}");
    let s = vm.suspend();
    assert_eq!(s["uploaded_chunks"], 0, "trickle had uploaded it all: {s}");
    assert!(s["synced_chunks"].as_u64().unwrap() > 0, "{s}");
}

fn checkin(vm: &Vm, extra: &[&str]) -> std::process::Output {
    run(vm
        .isr()
        .args(["checkin", "vm", "--store", &vm.store, "--key-file"])
        .arg(vm.key())
        .args(extra))
}

fn dd_random(dev: &str, seek: u64) {
    ok(Command::new("sh").arg("-c").arg(format!(
        "dd if=/dev/urandom of={dev} bs=64k count=8 seek={seek} oflag=direct 2>/dev/null"
    )));
}

fn head(vm: &Vm) -> u64 {
    let log = json_of(&ok(vm
        .isr()
        .arg("log")
        .args(vm.parcel_args())
        .arg("--json")));
    log.as_array().unwrap().len() as u64
}

/// Disconnected operation on an S3 store: suspend --offline publishes
/// nothing and keeps the lease; resume with the store down works from the
/// cache and says so; checkin fails while the store is down (nothing
/// lost) and publishes once it is back; an offline daemon reconnects by
/// itself and its plain suspend publishes.
#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_offline_suspend_resume_without_the_store_then_checkin() {
    let mut vm = Vm::new_s3(32);
    let dev = vm.resume(&[]);
    sha256_of(&dev); // every chunk is cached now
    dd_random(&dev, 5);
    let a = sha256_of(&dev);
    let s = json_of(&ok(vm.isr().args(["suspend", "vm", "--offline", "--json"])));
    vm.device = None;
    assert_eq!(s["offline"], true, "{s}");
    assert_eq!(s["lease_kept"], true, "{s}");
    assert!(s["dirty_chunks"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(head(&vm), 1, "an offline suspend publishes nothing");

    // The store goes away; the laptop works on.
    vm.s3().stop();
    let started = Instant::now();
    let out = ok(vm.isr().arg("resume").args(vm.parcel_args()).arg("--json"));
    let r = json_of(&out);
    let dev = r["device"].as_str().unwrap().to_owned();
    vm.device = Some(dev.clone());
    println!(
        "resume with the store down: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(r["offline"].as_str().is_some(), "says it is offline: {r}");
    assert_eq!(sha256_of(&dev), a, "the offline resume serves the cache");
    dd_random(&dev, 20);
    let b = sha256_of(&dev);
    let st = vm.status();
    assert_eq!(st["online"], false, "{st}");
    assert!(st["offline_reason"].as_str().is_some(), "{st}");
    // `isr status` with no name lists it, with what a suspend would send.
    let all = json_of(&ok(vm.isr().args(["status", "--json"])));
    let listed = &all.as_array().unwrap()[0];
    assert_eq!(listed["parcel"], "vm", "{all}");
    assert!(listed["dirty_bytes"].as_u64().unwrap() > 0, "{all}");
    assert_eq!(
        listed["pending_upload_bytes"], listed["dirty_bytes"],
        "nothing synced: {all}"
    );
    // A plain suspend cannot publish without the store: it says so, exits
    // 3 (unreachable), and keeps everything; the device is gone.
    let out = run(vm.isr().args(["suspend", "vm"]));
    vm.device = None;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("nothing was published"), "{err}");
    // Still offline: resume works on, and suspend --offline needs no network.
    let dev = vm.resume(&[]);
    assert_eq!(sha256_of(&dev), b, "nothing was lost");
    let s = json_of(&ok(vm.isr().args(["suspend", "vm", "--offline", "--json"])));
    vm.device = None;
    assert_eq!(s["offline"], true, "{s}");

    // checkin needs the store: it fails, naming it, and keeps everything.
    let out = checkin(&vm, &["--retry-timeout", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "checkin without a store: {err}");
    assert!(err.contains("127.0.0.1") || err.contains("s3://"), "{err}");

    vm.s3().restart();
    let out = checkin(&vm, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = json_of(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(c["version"], 2, "{c}");
    assert!(c["dirty_chunks"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(c["lease_released"], true, "{c}");

    // Offline again, then the store comes back while the device serves.
    vm.s3().stop();
    let dev = vm.resume(&[]);
    assert_eq!(sha256_of(&dev), b);
    dd_random(&dev, 40);
    let c_sha = sha256_of(&dev);
    vm.s3().restart();
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        let st = vm.status();
        if st["online"] == true || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(st["online"], true, "the daemon reconnects by itself: {st}");
    let s = vm.suspend();
    assert_eq!(s["version"], 3, "{s}");

    vm.cache = vm.dir.path().join("fresh-cache");
    let dev = vm.resume(&[]);
    assert_eq!(sha256_of(&dev), c_sha);
    vm.suspend();
}

/// A resume offline of a parcel never cached on this host is refused,
/// naming what to do.
#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_offline_resume_without_a_cache_is_refused() {
    let vm = Vm::new(8);
    let out = run(vm
        .isr()
        .arg("resume")
        .args(vm.parcel_args())
        .arg("--offline"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no cache on this host"), "{err}");
}
