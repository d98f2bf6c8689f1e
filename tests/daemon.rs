//! Host tests of what surrounds the device daemon and needs no ublk: the
//! commands that talk to a daemon give up on one that does not answer, and
//! the plaintext cache is private whatever the umask.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn isr(run_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_isr"));
    c.env("ISR_RUN_DIR", run_dir)
        .env_remove("ISR_STORE")
        .env_remove("ISR_KEY_FILE");
    c
}

/// A "daemon" that accepts connections and never answers: `status` and
/// `suspend` fail within their timeout, naming the parcel, instead of
/// hanging forever.
#[test]
fn commands_give_up_on_a_daemon_that_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let listener = UnixListener::bind(run.join("vm.sock")).unwrap();
    let held = std::thread::spawn(move || {
        // Accept and keep the connections open, silent, for a bounded time.
        let mut conns = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until && conns.len() < 2 {
            match listener.accept() {
                Ok((c, _)) => conns.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        std::thread::sleep(Duration::from_secs(25));
    });
    for cmd in ["status", "suspend"] {
        let started = Instant::now();
        let out = isr(&run).args([cmd, "vm"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains("parcel vm") && err.contains("did not answer"),
            "{cmd}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{cmd} took {:?}",
            started.elapsed()
        );
    }
    drop(held);
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// `isr hoard` under umask 000: every directory of the cache is 0700 and
/// every file 0600 (the cache image is the decrypted disk).
#[test]
fn the_cache_is_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}/store", dir.path().display());
    let key = dir.path().join("key");
    let image = dir.path().join("image");
    support::write_mixed_image(&image, 4 << 20, 5);
    let cache = dir.path().join("cache");
    let sh = |args: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("umask 000; exec \"$ISR\" {args}"))
            .env("ISR", env!("CARGO_BIN_EXE_isr"))
            .env("ISR_CACHE_DIR", &cache)
            .env_remove("ISR_STORE")
            .env_remove("ISR_KEY_FILE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "isr {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&format!("keygen {}", key.display()));
    let parcel = format!("--store {store} --parcel vm --key-file {}", key.display());
    sh(&format!("import {} {parcel}", image.display()));
    sh(&format!("hoard {parcel}"));
    let mut seen = 0;
    let mut stack = vec![cache.clone()];
    while let Some(d) = stack.pop() {
        assert_eq!(mode_of(&d), 0o700, "{}", d.display());
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                assert_eq!(mode_of(&e.path()), 0o600, "{}", e.path().display());
                seen += 1;
            }
        }
    }
    assert!(
        seen >= 4,
        "image, state, trace, lock and a manifest: {seen}"
    );
}

/// The one cache directory under `root` (root/<store hash>/vm).
fn cache_of(root: &Path) -> std::path::PathBuf {
    let store = std::fs::read_dir(root).unwrap().next().unwrap().unwrap();
    store.path().join("vm")
}

/// `isr check` finds a damaged chunk and a truncated image, drops what is
/// damaged (exit 1, named in the report), and passes once repaired;
/// `isr hoard` notices damage too and fetches the chunk again instead of
/// calling a damaged cache complete.
#[test]
fn check_and_hoard_repair_a_damaged_or_truncated_cache() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}/store", dir.path().display());
    let key = dir.path().join("key");
    let image = dir.path().join("image");
    support::write_mixed_image(&image, 8 << 20, 9);
    let cache = dir.path().join("cache");
    let run = |args: &[&str]| {
        let out = isr(&dir.path().join("run"))
            .args(args)
            .args(["--store", &store, "--parcel", "vm", "--key-file"])
            .arg(&key)
            .env("ISR_CACHE_DIR", &cache)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            err,
        )
    };
    let keygen = isr(dir.path()).arg("keygen").arg(&key).output().unwrap();
    assert!(keygen.status.success());
    assert_eq!(run(&["import", image.to_str().unwrap()]).0, Some(0));
    // Checking before anything is cached is an error naming the parcel.
    let (code, _, err) = run(&["check"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no cache"), "{err}");
    assert_eq!(run(&["hoard"]).0, Some(0));
    let (code, out, _) = run(&["check", "--json"]);
    assert_eq!(code, Some(0), "{out}");

    // Damage: a flipped byte in a chunk that holds data (the last MiB of a
    // mixed image is data), and an image cut short.
    let data = std::fs::read(&image).unwrap();
    let at = data.len() as u64 - 3000;
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(cache_of(&cache).join("image"))
        .unwrap();
    img.write_all_at(&[data[at as usize] ^ 0xff], at).unwrap();
    let (code, out, _) = run(&["check", "--json"]);
    assert_eq!(code, Some(1), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["damaged_chunks"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["ok"], false);
    let (code, out, _) = run(&["check", "--json"]);
    assert_eq!(code, Some(0), "repaired: {out}");

    // Hoard notices a damaged chunk and fetches it again.
    let first_data = (0..8u64 << 20)
        .step_by(4096)
        .find(|&o| data[o as usize] != 0)
        .unwrap();
    img.write_all_at(&[data[first_data as usize] ^ 1], first_data)
        .unwrap();
    let (code, _, err) = run(&["hoard"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("damaged"), "{err}");
    // A truncated image: the chunks cut off are dropped and fetched again.
    img.set_len(3 << 20).unwrap();
    let (code, out, _) = run(&["check", "--json"]);
    assert_eq!(code, Some(1), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!v["truncated_chunks"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(run(&["hoard"]).0, Some(0));
    assert_eq!(run(&["check"]).0, Some(0));
    // And the cache now holds the image exactly.
    let cached = std::fs::read(cache_of(&cache).join("image")).unwrap();
    assert!(cached == data, "the repaired cache differs from the image");
}

/// `isr import` does not publish over a parcel resumed elsewhere: with the
/// lease held by another host it fails (exit 4, a conflict) naming the
/// holder and HEAD stays; once released, it publishes.
#[test]
fn import_honours_a_lease_held_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}/store", dir.path().display());
    let key = dir.path().join("key");
    let image = dir.path().join("image");
    support::write_mixed_image(&image, 2 << 20, 3);
    let import = || {
        isr(&dir.path().join("run"))
            .arg("import")
            .arg(&image)
            .args(["--store", &store_url, "--parcel", "vm", "--key-file"])
            .arg(&key)
            .arg("--resize")
            .output()
            .unwrap()
    };
    assert!(
        isr(dir.path())
            .arg("keygen")
            .arg(&key)
            .status()
            .unwrap()
            .success()
    );
    assert!(import().status.success());
    let store = fetcher::Store::open(&store_url, &Default::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lease = rt
        .block_on(fetcher::Lease::acquire(
            &store,
            "vm",
            "other-host",
            5,
            None,
            false,
        ))
        .unwrap();
    let out = import();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "a conflict: {err}");
    assert!(err.contains("in use by host other-host"), "{err}");
    assert_eq!(rt.block_on(store.head("vm")).unwrap(), Some(1));
    rt.block_on(lease.release()).unwrap();
    assert!(import().status.success());
    assert_eq!(rt.block_on(store.head("vm")).unwrap(), Some(2));
}
