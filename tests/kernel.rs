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
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A parcel imported into a `file://` store, resumable as a device.
struct Vm {
    dir: tempfile::TempDir,
    store: String,
    image: PathBuf,
    cache: PathBuf,
    device: Option<String>,
}

impl Vm {
    fn new(mib: u64) -> Vm {
        require_ublk();
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}/store", dir.path().display());
        let image = dir.path().join("image");
        support::write_mixed_image(&image, mib << 20, 31);
        let vm = Vm {
            store,
            image,
            cache: dir.path().join("cache"),
            dir,
            device: None,
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
        c
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
    let mut vm = Vm::new(64);
    let dev = vm.resume(&[]);
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
            "--loops=6",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut fio = fio;
    let mut kills = 0;
    while kills < 3 {
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
    eprintln!("recovery: {kills} kills; fio: {}", out.status);
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
