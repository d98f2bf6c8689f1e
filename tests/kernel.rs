//! Kernel-tier tests: a real /dev/ublkbN served by `isr resume`. They need
//! the ublk driver, which our hosts lack, so they are ignored by a plain
//! `cargo test` and run by `scripts/vm-test` inside a QEMU guest booted from
//! a kernel that has it (`--ignored`). There, a missing /dev/ublk-control
//! fails every one of them.

mod support;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

fn require_ublk() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: the kernel tier must run where ublk_drv is loaded (scripts/vm-test)"
    );
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    succeeded(cmd, out)
}

/// The stdout of `cmd`'s output `out`, which must say it succeeded.
fn succeeded(cmd: &Command, out: Output) -> String {
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A parcel imported into a store (`file://`, or S3 on an s3s-fs started
/// in the guest on 127.0.0.1), resumable as a device.
struct Vm {
    dir: tempfile::TempDir,
    store: String,
    image: PathBuf,
    cache: PathBuf,
    device: Option<String>,
    s3: Option<support::S3Server>,
}

impl Vm {
    fn new(mib: u64) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}/store", dir.path().display());
        Vm::with_store(dir, store, None, mib)
    }

    /// A parcel in an S3 store served by s3s-fs inside the guest.
    fn new_s3(mib: u64) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let server = support::S3Server::start();
        let store = format!("s3://{}/kernel", support::BUCKET);
        Vm::with_store(dir, store, Some(server), mib)
    }

    fn with_store(
        dir: tempfile::TempDir,
        store: String,
        s3: Option<support::S3Server>,
        mib: u64,
    ) -> Vm {
        let image = dir.path().join("image");
        support::write_mixed_image(&image, mib << 20, 31);
        Vm::with_image(dir, store, s3, image)
    }

    /// A parcel made from `image` in a `file://` store.
    fn from_image(image: &Path) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}/store", dir.path().display());
        Vm::with_image(dir, store, None, image.to_owned())
    }

    fn with_image(
        dir: tempfile::TempDir,
        store: String,
        s3: Option<support::S3Server>,
        image: PathBuf,
    ) -> Vm {
        require_ublk();
        let vm = Vm {
            store,
            image,
            cache: dir.path().join("cache"),
            dir,
            device: None,
            s3,
        };
        ok(vm.isr().args(["keygen"]).arg(vm.key()));
        ok(vm.isr().arg("import").arg(&vm.image).args(vm.parcel_args()));
        vm
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("key")
    }

    fn isr(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_isr"));
        c.env("ISR_RUN_DIR", self.dir.path().join("run"))
            .env("ISR_CACHE_DIR", &self.cache);
        if let Some(s3) = &self.s3 {
            c.envs(s3.env());
        }
        c
    }

    fn s3(&mut self) -> &mut support::S3Server {
        self.s3.as_mut().expect("an S3 parcel")
    }

    fn parcel_args(&self) -> Vec<String> {
        vec![
            "--store".into(),
            self.store.clone(),
            "--parcel".into(),
            "vm".into(),
            "--key-file".into(),
            self.key().display().to_string(),
        ]
    }

    fn resume(&mut self, extra: &[&str]) -> String {
        let out = ok(self
            .isr()
            .arg("resume")
            .args(self.parcel_args())
            .arg("--json")
            .args(extra));
        let v: Value = serde_json::from_str(&out).unwrap();
        let dev = v["device"].as_str().unwrap().to_owned();
        assert!(Path::new(&dev).exists(), "{dev} does not exist");
        self.device = Some(dev.clone());
        dev
    }

    fn suspend(&mut self) -> Value {
        let out = ok(self.isr().args(["suspend", "vm", "--json"]));
        self.device = None;
        serde_json::from_str(&out).unwrap()
    }

    fn status(&self) -> Value {
        serde_json::from_str(&ok(self.isr().args(["status", "vm", "--json"]))).unwrap()
    }

    fn daemon_pid(&self) -> i32 {
        let st: Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.path().join("run/vm.json")).unwrap(),
        )
        .unwrap();
        st["pid"].as_i64().unwrap() as i32
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.device.is_some() {
            let _ = run(self.isr().args(["suspend", "vm"]));
        }
    }
}

fn sha256_of(path: &str) -> String {
    let out = ok(Command::new("sh").arg("-c").arg(format!(
        "dd if={path} bs=1M iflag=direct 2>/dev/null | sha256sum"
    )));
    out[..64].to_owned()
}

/// An O_DIRECT handle on the device and a 4 KiB-aligned buffer.
fn direct(dev: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap()
}

struct Aligned(Vec<u8>, usize);
impl Aligned {
    fn new(len: usize) -> Aligned {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096);
        Aligned(v, off)
    }
    fn buf(&mut self, len: usize) -> &mut [u8] {
        &mut self.0[self.1..self.1 + len]
    }
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_dd_patterns_at_sizes_and_alignments() {
    let mut vm = Vm::new(64);
    let dev = vm.resume(&[]);
    let mut model = std::fs::read(&vm.image).unwrap();
    let f = direct(&dev);
    let mut a = Aligned::new(1 << 20);
    let mut seed = 1u64;
    for &size in &[512usize, 1024, 4096, 8192, 65536, 131072, 524288, 1 << 20] {
        for &offset in &[0u64, 512, 4096 - 512, 65536 + 1536, 255 * 1024, 33 << 20] {
            let offset = offset + (size as u64 * 3);
            let buf = a.buf(size);
            for b in buf.iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (seed >> 33) as u8;
            }
            f.write_all_at(buf, offset).unwrap();
            model[offset as usize..offset as usize + size].copy_from_slice(buf);
            let back = a.buf(size);
            back.fill(0);
            f.read_exact_at(back, offset).unwrap();
            assert_eq!(
                back,
                &model[offset as usize..offset as usize + size],
                "{size} at {offset}"
            );
        }
    }
    drop(f);
    // Also through dd, whole-device, against the model.
    let expect = {
        let p = vm.dir.path().join("model");
        std::fs::write(&p, &model).unwrap();
        sha256_of(p.to_str().unwrap())
    };
    assert_eq!(sha256_of(&dev), expect);
    let s = vm.suspend();
    assert_eq!(s["version"], 2);
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_mkfs_ext4_files_then_fsck_is_clean() {
    let mut vm = Vm::new(64);
    let dev = vm.resume(&[]);
    ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev]));
    let mnt = vm.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(Command::new("mount").args(["-t", "ext4", &dev]).arg(&mnt));
    for i in 0..20 {
        std::fs::write(mnt.join(format!("f{i}")), vec![i as u8; 100_000 + i * 4096]).unwrap();
    }
    ok(&mut Command::new("sync"));
    ok(Command::new("umount").arg(&mnt));
    ok(Command::new("e2fsck").args(["-fn", &dev]));
    vm.suspend();
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_fio_random_writes_verify_at_qd32() {
    let mut vm = Vm::new(64);
    let dev = vm.resume(&[]);
    ok(Command::new("fio").args([
        "--name=verify",
        &format!("--filename={dev}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--ioengine=libaio",
        "--direct=1",
        "--size=48M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=terse",
    ]));
    vm.suspend();
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_cold_cache_reads_block_on_misses_and_are_correct() {
    let mut vm = Vm::new(64);
    let dev = vm.resume(&["--no-prefetch"]);
    let expect = sha256_of(vm.image.to_str().unwrap());
    assert_eq!(sha256_of(&dev), expect);
    let st = vm.status();
    assert!(st["fetched_chunks"].as_u64().unwrap() > 0, "{st}");
    vm.suspend();
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_recovery_after_sigkill_under_fio() {
    // ISR_KILLS (default 3; R1 of issue 7 uses 20) SIGKILLs under load.
    let target: u64 = std::env::var("ISR_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut vm = Vm::new(64);
    let dev = vm.resume(&[]);
    let loops = format!("--loops={}", 2 * target);
    let fio = Command::new("fio")
        .args([
            "--name=recover",
            &format!("--filename={dev}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--ioengine=libaio",
            "--direct=1",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            &loops,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut fio = fio;
    let mut kills = 0;
    while kills < target {
        std::thread::sleep(Duration::from_secs(2));
        if fio.try_wait().unwrap().is_some() {
            break; // fio finished: only kills under load count
        }
        kills += 1;
        let pid = vm.daemon_pid();
        // SAFETY: sends SIGKILL to the daemon's pid; no memory involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        std::thread::sleep(Duration::from_millis(500));
        let out = ok(vm.isr().args(["recover", "vm", "--json"]));
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["device"].as_str(),
            Some(dev.as_str()),
            "same device after recovery"
        );
        assert_eq!(v["recovered"], true);
    }
    let out = fio.wait_with_output().unwrap();
    eprintln!(
        "R1: {kills} SIGKILLs of the daemon under fio randwrite+verify; fio: {}",
        out.status
    );
    assert!(
        kills >= 2,
        "fio finished after {kills} kills: too fast to test recovery"
    );
    assert!(
        out.status.success(),
        "fio saw errors across {kills} daemon kills:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    vm.suspend();
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_suspend_then_resume_in_a_fresh_cache_has_the_same_sha() {
    let mut vm = Vm::new(64);
    let dev = vm.resume(&[]);
    ok(Command::new("sh").arg("-c").arg(format!(
        "dd if=/dev/urandom of={dev} bs=64k count=100 seek=37 oflag=direct 2>/dev/null"
    )));
    let before = sha256_of(&dev);
    let s = vm.suspend();
    assert!(s["dirty_chunks"].as_u64().unwrap() > 0, "{s}");
    vm.cache = vm.dir.path().join("fresh-cache");
    let dev = vm.resume(&[]);
    assert_eq!(sha256_of(&dev), before);
    vm.suspend();
}

#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_discard_then_read_gives_zeros() {
    let mut vm = Vm::new(64);
    let dev = vm.resume(&[]);
    ok(Command::new("blkdiscard").args(["-o", "1048576", "-l", "4194304", &dev]));
    let f = direct(&dev);
    let mut a = Aligned::new(4 << 20);
    let buf = a.buf(4 << 20);
    f.read_exact_at(buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "discarded range is not zero");
    // Suspend refuses while the device is open, naming the user.
    let out = run(vm.isr().args(["suspend", "vm"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("still in use") && err.contains("pid"), "{err}");
    drop(f);
    vm.suspend();
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every directory under `root` (and `root`) is 0700, every file 0600.
fn assert_private(root: &Path) {
    assert_eq!(mode_of(root), 0o700, "{}", root.display());
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            assert_private(&p);
        } else {
            assert_eq!(mode_of(&p), 0o600, "{}", p.display());
        }
    }
}

/// Resume from an S3 store (it used to time out on its first GET after
/// 60 s), then SIGKILL + recover, suspend, hoard into a fresh cache and
/// resume from it; with umask 000 every cache and run file is private.
#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_s3_resume_recover_suspend_hoard_and_private_files() {
    // SAFETY: umask only sets this process's file creation mask; the
    // kernel tier runs one test at a time.
    unsafe { libc::umask(0) };
    let mut vm = Vm::new_s3(32);
    let dev = vm.resume(&[]);
    ok(Command::new("sh").arg("-c").arg(format!(
        "dd if=/dev/urandom of={dev} bs=64k count=20 seek=11 oflag=direct 2>/dev/null"
    )));
    let before = sha256_of(&dev);
    // Private whatever the umask: the cache is the plaintext disk.
    assert_private(&vm.cache);
    assert_private(&vm.dir.path().join("run"));

    let pid = vm.daemon_pid();
    // SAFETY: sends SIGKILL to the daemon's pid; no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    let v: Value = serde_json::from_str(&ok(vm.isr().args(["recover", "vm", "--json"]))).unwrap();
    assert_eq!(v["device"].as_str(), Some(dev.as_str()));
    assert_eq!(sha256_of(&dev), before);
    let st = vm.status();
    assert_eq!(st["unclean_stop"], true, "{st}");
    assert_eq!(st["scanned_chunks"], 0, "same boot: nothing re-read: {st}");

    let s = vm.suspend();
    assert_eq!(s["version"], 2, "{s}");
    assert!(s["uploaded_chunks"].as_u64().unwrap() > 0, "{s}");

    vm.cache = vm.dir.path().join("hoarded");
    let h: Value = serde_json::from_str(&ok(vm
        .isr()
        .arg("hoard")
        .args(vm.parcel_args())
        .arg("--json")))
    .unwrap();
    assert!(h["fetched_chunks"].as_u64().unwrap() > 0, "{h}");
    let dev = vm.resume(&[]);
    assert_eq!(sha256_of(&dev), before);
    let st = vm.status();
    assert_eq!(
        st["fetched_chunks"], 0,
        "a hoarded cache fetches nothing: {st}"
    );
    assert_eq!(
        st["unclean_stop"], false,
        "hoard closed the cache cleanly: {st}"
    );
    vm.suspend();
}

/// A clean suspend leaves a clean cache: resuming again on this host is no
/// crash recovery and re-reads nothing.
#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_warm_resume_after_a_clean_suspend_is_no_recovery() {
    let mut vm = Vm::new(64);
    let dev = vm.resume(&[]);
    ok(Command::new("sh").arg("-c").arg(format!(
        "dd if=/dev/urandom of={dev} bs=64k count=10 seek=3 oflag=direct 2>/dev/null"
    )));
    let before = sha256_of(&dev);
    vm.suspend();
    let dev = vm.resume(&[]);
    let st = vm.status();
    assert_eq!(st["unclean_stop"], false, "{st}");
    assert_eq!(st["scanned_chunks"], 0, "{st}");
    assert_eq!(st["fetched_chunks"], 0, "everything was cached: {st}");
    assert_eq!(sha256_of(&dev), before);
    vm.suspend();
}

/// With the store unreachable, every read of a chunk not yet fetched fails
/// with EIO at its own miss deadline (the second read of the same chunk
/// too, though its fetch is still retrying), while cached reads on the
/// same device keep completing; when the store is back, the chunk arrives.
#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_store_outage_fails_each_miss_at_its_deadline_and_cached_reads_go_on() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    let mut vm = Vm::new_s3(32);
    let dev = vm.resume(&["--no-prefetch", "--miss-timeout", "3"]);
    let f = direct(&dev);
    let mut a = Aligned::new(4 << 20);
    f.read_exact_at(a.buf(4 << 20), 0).unwrap(); // the first 4 MiB are cached
    vm.s3().stop();

    let stop = Arc::new(AtomicBool::new(false));
    let cached = {
        let (dev, stop) = (dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let f = direct(&dev);
            let mut a = Aligned::new(65536);
            let (mut n, mut worst, mut at) = (0u64, Duration::ZERO, 0u64);
            while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
                let t = Instant::now();
                f.read_exact_at(a.buf(65536), at).unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
                at = (at + 65536) % (4 << 20);
            }
            (n, worst)
        })
    };
    // The outage lasts ISR_OUTAGE_SECS (default 8; R2 of issue 7 uses 60):
    // reads of absent chunks go on meanwhile, the first two of one chunk,
    // then of others; each must fail at its own deadline.
    let outage = Duration::from_secs(
        std::env::var("ISR_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(8),
    );
    let down = Instant::now();
    // Chunks (256 KiB) beyond what was read that only the store has: data
    // (zero chunks need no store) found nowhere else on the disk (a
    // repeated chunk is filled everywhere by one fetch).
    let image = std::fs::read(&vm.image).unwrap();
    let chunk = |o: u64| &image[o as usize..][..256 << 10];
    let mut seen = std::collections::HashMap::new();
    for o in (0..image.len() as u64).step_by(256 << 10) {
        *seen.entry(chunk(o)).or_insert(0) += 1;
    }
    let absent: Vec<u64> = (16u64 << 20..32 << 20)
        .step_by(256 << 10)
        .filter(|&o| chunk(o).iter().any(|&b| b != 0) && seen[chunk(o)] == 1)
        .take(8)
        .collect();
    assert!(absent.len() >= 2, "the image has data beyond 16 MiB");
    let mut misses = Vec::new();
    let mut attempt = 0u64;
    while attempt < 2 || (down.elapsed() < outage && attempt < 100) {
        // The first two reads are of one chunk, then of the others in turn.
        let at = if attempt < 2 {
            absent[0]
        } else {
            absent[attempt as usize % absent.len()]
        };
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        let dev2 = dev.clone();
        std::thread::spawn(move || {
            let f = direct(&dev2);
            let mut a = Aligned::new(4096);
            let _ = tx.send(f.read_exact_at(a.buf(4096), at));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(40))
            .unwrap_or_else(|_| panic!("read {attempt} of an absent chunk hung past its deadline"));
        let e = r.expect_err("the store is down: the read must fail");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "read {attempt}: {e}");
        assert!(
            started.elapsed() >= Duration::from_millis(2500),
            "read {attempt} failed before its deadline: {:?}",
            started.elapsed()
        );
        misses.push((at, started.elapsed()));
        attempt += 1;
    }
    // A discard of part of an absent chunk must keep the rest of it, so it
    // waits for the chunk too, in the ring, and fails at its deadline;
    // cached reads are still going on meanwhile.
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let (dev2, at) = (dev.clone(), absent[1] + 4096);
    std::thread::spawn(move || {
        let out = Command::new("blkdiscard")
            .args(["-o", &at.to_string(), "-l", "4096", &dev2])
            .output();
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(40))
        .expect("a partial discard of an absent chunk hung past its deadline")
        .unwrap();
    assert!(!out.status.success(), "the discard needed the store");
    assert!(started.elapsed() >= Duration::from_millis(2500));
    stop.store(true, Ordering::Relaxed);
    let (n, worst) = cached.join().unwrap();
    assert!(n > 0, "no cached read completed during the outage");
    // No queue thread sat in a wait for the store (a miss deadline is 3 s).
    assert!(
        worst < Duration::from_secs(2),
        "a cached read waited {worst:?}: a queue was blocked"
    );

    vm.s3().restart();
    // The fetches still retrying (with backoff, up to a few seconds between
    // attempts) complete once the store is back; a read whose 3 s deadline
    // passes first fails and is simply tried again, within a bound.
    let mut a = Aligned::new(4096);
    for &(at, _) in &misses {
        let until = Instant::now() + Duration::from_secs(30);
        while let Err(e) = f.read_exact_at(a.buf(4096), at) {
            assert!(Instant::now() < until, "chunk at {at} never arrived: {e}");
        }
        assert_eq!(a.buf(4096), &image[at as usize..][..4096]);
    }
    let slowest = misses.iter().map(|m| m.1).max().unwrap();
    eprintln!(
        "R2: store down {:.0} s: {n} cached 64 KiB reads meanwhile, worst latency {worst:?}; {} reads of absent chunks each failed with EIO at its deadline (3 s; slowest {slowest:?}); after the store returned all {} read back correct",
        down.elapsed().as_secs_f64(),
        misses.len(),
        misses.len()
    );
    drop(f);
    vm.suspend();
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn over(file: &Path) -> LoopDevice {
        let out = ok(Command::new("losetup").args(["-f", "--show"]).arg(file));
        LoopDevice(out.trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run(Command::new("losetup").args(["-d", &self.0]));
    }
}

/// Export onto a block device: only with --force, only if the device is
/// large enough (else it is left untouched), and then in place, the link
/// from /dev to the device kept.
#[test]
#[ignore = "kernel tier: needs loop devices (root); run by scripts/vm-test"]
fn export_writes_a_large_enough_block_device_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}/store", dir.path().display());
    let key = dir.path().join("key");
    let image = dir.path().join("image");
    support::write_mixed_image(&image, 16 << 20, 59);
    let isr = || Command::new(env!("CARGO_BIN_EXE_isr"));
    ok(isr().arg("keygen").arg(&key));
    let parcel = |cmd: &str| {
        let mut c = isr();
        c.args([cmd, "--store", &store, "--parcel", "vm", "--key-file"])
            .arg(&key);
        c
    };
    ok(parcel("import").arg(&image));

    let backing = |name: &str, mib: u64| {
        let p = dir.path().join(name);
        let f = File::create(&p).unwrap();
        f.set_len(mib << 20).unwrap();
        f.write_all_at(&[0xa5; 4096], 0).unwrap();
        p
    };
    let small = LoopDevice::over(&backing("small", 8));
    let big = LoopDevice::over(&backing("big", 24));

    let out = run(parcel("export").arg(&big.0));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--force") && err.contains(&big.0), "{err}");

    let out = run(parcel("export").arg("--force").arg(&small.0));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("8388608") && err.contains("16777216"), "{err}");
    let mut head = [0u8; 4096];
    File::open(&small.0)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(head, [0xa5; 4096], "a refused device was written");

    ok(parcel("export").arg("--force").arg(&big.0));
    assert!(
        std::fs::metadata(&big.0)
            .unwrap()
            .file_type()
            .is_block_device(),
        "the device node was replaced"
    );
    let mut written = vec![0u8; 16 << 20];
    File::open(&big.0)
        .unwrap()
        .read_exact_at(&mut written, 0)
        .unwrap();
    assert!(
        written == std::fs::read(&image).unwrap(),
        "device differs from the image"
    );
}

#[path = "kernel/qemu.rs"]
mod qemu;

#[path = "kernel/sync.rs"]
mod sync;

#[path = "kernel/cache_io.rs"]
mod cache_io;
