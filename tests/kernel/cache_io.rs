//! The cache's I/O in the kernel tier: a FLUSH after the cache failed to
//! sync fails for good, and `--cache-io direct` keeps the image out of the
//! host's page cache while the data stays right.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use super::{Aligned, Vm, direct, ok, run, sha256_of, support};

/// The device's FLUSH syncs the cache image through its ring; when that
/// sync fails (the cache's disk fails writeback: here an ext4 whose loop
/// device runs out of room), the guest's fsync fails, and so does every
/// later one (Linux would report the error to one fsync only), and suspend
/// refuses to publish what may be lost.
#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_flush_fails_for_good_once_the_cache_cannot_sync() {
    let fs = support::FailingFs::new();
    let mut vm = Vm::new(32);
    vm.cache = fs.path().join("cache");
    // Writeback that fails is the page cache's: buffered whatever the run
    // asks (direct I/O reports the failure at the write itself).
    let dev = vm.resume(&["--no-prefetch", "--cache-io", "buffered"]);
    let f = direct(&dev);
    let mut a = Aligned::new(1 << 20);
    for mib in 0..16u64 {
        a.buf(1 << 20)
            .copy_from_slice(&format::noise(1 << 20, 7 + mib));
        f.write_all_at(a.buf(1 << 20), mib << 20).unwrap();
    }
    for round in 0..3 {
        let e = f
            .sync_all()
            .expect_err("a FLUSH after the cache failed to sync must fail");
        eprintln!("flush {round} failed as it must: {e}");
    }
    drop(f);
    let out = run(vm.isr().args(["suspend", "vm"]));
    assert!(
        !out.status.success(),
        "suspend published after a failed sync"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sync"), "{err}");
    vm.device = None;
}

/// Bytes of `file` in the page cache (util-linux's fincore).
fn page_cache_bytes(file: &Path) -> u64 {
    let out = ok(Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file));
    out.trim().parse().unwrap()
}

/// `--cache-io direct` keeps the cache image out of the host's page cache
/// while a guest reads and writes the whole disk through the device (zero
/// copy where the kernel offers it), and the data stays right through a
/// suspend and a resume in a fresh cache; `buffered` keeps the image in it
/// (which shows that the measure sees the page cache at all). The caches
/// are on an ext4 on a block device: on tmpfs direct I/O changes nothing.
#[test]
#[ignore = "kernel tier: needs /dev/ublk-control; run by scripts/vm-test"]
fn ublk_direct_cache_io_keeps_the_image_out_of_the_page_cache() {
    let fs = support::Ext4Fs::new(512);
    for mode in ["direct", "buffered"] {
        let mut vm = Vm::new(64);
        vm.cache = fs.path().join(format!("cache-{mode}"));
        let dev = vm.resume(&["--cache-io", mode]);
        assert_eq!(vm.status()["cache_io"], mode, "{}", vm.status());
        let image_sha = ok(Command::new("sha256sum").arg(&vm.image))[..64].to_owned();
        assert_eq!(sha256_of(&dev), image_sha);
        // A write of every 4th MiB, through to the cache.
        let f = direct(&dev);
        let mut a = Aligned::new(1 << 20);
        for mib in (0..64u64).step_by(4) {
            a.buf(1 << 20).fill(mib as u8 + 1);
            f.write_all_at(a.buf(1 << 20), mib << 20).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        let image = vm.status()["cache"].as_str().unwrap().to_owned() + "/image";
        let cached = page_cache_bytes(Path::new(&image));
        let size = 64u64 << 20;
        eprintln!("{mode}: {cached} of {size} bytes of the cache image in the page cache");
        if mode == "direct" {
            assert!(
                cached <= size / 20,
                "direct: {cached} of {size} bytes cached"
            );
        } else {
            assert!(
                cached > size / 2,
                "buffered: {cached} of {size} bytes cached"
            );
        }
        let written = sha256_of(&dev);
        vm.suspend();
        vm.cache = fs.path().join(format!("fresh-{mode}"));
        let dev = vm.resume(&["--cache-io", mode]);
        assert_eq!(
            sha256_of(&dev),
            written,
            "{mode}: the published disk reads back"
        );
        vm.suspend();
    }
}
