//! End-to-end tests of the `isr` binary against real stores: a local
//! directory and a real S3 server (s3s-fs) on 127.0.0.1.

#[path = "cli/checkin.rs"]
mod checkin;
#[path = "cli/leases.rs"]
mod leases;
mod support;
#[path = "cli/trust.rs"]
mod trust;
#[path = "cli/ux.rs"]
mod ux;
#[path = "cli/versions.rs"]
mod versions;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{FaultProxy, S3Server, sha256, write_mixed_image};

struct Run {
    out: Output,
}

impl Run {
    fn ok(self) -> Self {
        assert!(
            self.out.status.success(),
            "isr failed: {}\n{}",
            self.out.status,
            self.stderr()
        );
        self
    }
    fn fails(self) -> Self {
        assert_eq!(self.out.status.code(), Some(1), "stderr: {}", self.stderr());
        let err = self.stderr();
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.is_empty() || err.starts_with("isr: "), "{err}");
        self
    }
    /// Asserts exit status `code` and no panic.
    fn exits(self, code: i32) -> Self {
        assert_eq!(
            self.out.status.code(),
            Some(code),
            "stdout: {}\nstderr: {}",
            self.stdout(),
            self.stderr()
        );
        assert!(!self.stderr().contains("panicked"), "{}", self.stderr());
        self
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout()).expect("one JSON value on stdout")
    }
}

/// A scratch directory with a key, and how to run isr against a store.
struct Env {
    dir: tempfile::TempDir,
    store: String,
    vars: Vec<(&'static str, String)>,
    /// The S3 endpoint, for tests that open the store themselves.
    s3: Option<String>,
}

impl Env {
    fn file() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}/store", dir.path().display());
        Env::with(dir, store, vec![])
    }

    fn s3(server: &S3Server, prefix: &str) -> Env {
        let mut env = Env::with(
            tempfile::tempdir().unwrap(),
            format!("s3://{}/{prefix}", support::BUCKET),
            server.env(),
        );
        env.s3 = Some(server.endpoint());
        env
    }

    fn with(dir: tempfile::TempDir, store: String, vars: Vec<(&'static str, String)>) -> Env {
        let env = Env {
            dir,
            store,
            vars,
            s3: None,
        };
        env.isr(&["keygen", env.key().to_str().unwrap()]).ok();
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn key(&self) -> PathBuf {
        self.path("key")
    }

    /// The isr command line for `args`, not yet run.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_isr"));
        cmd.args(args)
            .env_remove("ISR_STORE")
            .env_remove("ISR_KEY_FILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env("ISR_RETRY_TIMEOUT", "10");
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }

    fn isr(&self, args: &[&str]) -> Run {
        Run {
            out: self.command(args).output().expect("run isr"),
        }
    }

    /// Writes a mixed image of `mib` MiB and imports it as parcel "vm".
    fn imported(&self, mib: u64, seed: u64) -> PathBuf {
        let image = self.path("image");
        write_mixed_image(&image, mib << 20, seed);
        self.on("import", "vm", &[s(&image)]).ok();
        image
    }

    /// Runs a parcel command with --store, --parcel and --key-file filled in.
    fn on(&self, cmd: &str, parcel: &str, extra: &[&str]) -> Run {
        Run {
            out: self
                .on_command(cmd, parcel, extra)
                .output()
                .expect("run isr"),
        }
    }

    /// The command line of [`Env::on`], not yet run.
    fn on_command(&self, cmd: &str, parcel: &str, extra: &[&str]) -> Command {
        let key = self.key();
        let mut args = vec![
            cmd,
            "--store",
            &self.store,
            "--parcel",
            parcel,
            "--key-file",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.command(&args)
    }
}

/// Converts raw image `raw` to qcow2 `qcow2` with qemu-img.
fn to_qcow2(raw: &Path, qcow2: &Path) {
    let st = Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(raw),
            s(qcow2),
        ])
        .status()
        .expect("qemu-img (apt install qemu-utils; scripts/setup installs it)");
    assert!(st.success());
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Import, export bit-identically, re-import uploading nothing: the issue's
/// "done when", at `size` bytes.
fn round_trip(env: &Env, size: u64) {
    let image = env.path("image");
    write_mixed_image(&image, size, 42);
    let first = env.on("import", "vm", &[s(&image), "--json"]).ok().json();
    assert_eq!(first["version"], 1);
    assert_eq!(first["chunks"], size / (256 * 1024));
    assert_eq!(first["bytes_in"], size);
    let uploaded = first["uploaded_chunks"].as_u64().unwrap();
    let zero = first["zero_chunks"].as_u64().unwrap();
    let dedup = first["dedup_chunks"].as_u64().unwrap();
    assert!(uploaded > 0 && zero > 0 && dedup > 0, "{first}");
    assert_eq!(uploaded + zero + dedup, first["chunks"].as_u64().unwrap());
    assert!(first["bytes_uploaded"].as_u64().unwrap() < size);

    let out = env.path("out");
    let export = env.on("export", "vm", &[s(&out), "--json"]).ok().json();
    assert_eq!(export["version"], 1);
    assert_eq!(sha256(&out), sha256(&image));

    let second = env.on("import", "vm", &[s(&image), "--json"]).ok().json();
    assert_eq!(second["version"], 2);
    assert_eq!(second["uploaded_chunks"], 0);
    assert_eq!(second["bytes_uploaded"], 0);

    env.on("verify", "vm", &[]).ok();
    let log = env.on("log", "vm", &["--json"]).ok().json();
    let versions: Vec<_> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].clone())
        .collect();
    assert_eq!(versions, vec![2, 1]);
    assert_eq!(log[0]["parent"], 1);
    assert_eq!(log[0]["disk_size"], size);
}

#[test]
fn roundtrip_file_store_1gib() {
    round_trip(&Env::file(), 1 << 30);
}

#[test]
fn roundtrip_s3_store_1gib() {
    let server = S3Server::start();
    round_trip(&Env::s3(&server, "parcels-a"), 1 << 30);
    assert!(server.bucket_dir().join("parcels-a/chunks").is_dir());
}

#[test]
fn keygen_makes_private_keys_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::file();
    let meta = std::fs::metadata(env.key()).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(env.key()).unwrap();
    let r = env.isr(&["keygen", s(&env.key())]).fails();
    assert!(
        r.stderr().contains("refusing to overwrite"),
        "{}",
        r.stderr()
    );
    assert_eq!(std::fs::read(env.key()).unwrap(), before);
}

#[test]
fn corrupt_chunk_fails_verify_and_export_naming_it() {
    let env = Env::file();
    env.imported(16, 5);
    let chunks = env.path("store/chunks");
    let victim = std::fs::read_dir(&chunks)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let id = victim.file_name().unwrap().to_str().unwrap().to_owned();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x80;
    std::fs::write(&victim, bytes).unwrap();

    let v = env.on("verify", "vm", &[]).fails();
    assert!(v.stderr().contains(&id), "{}", v.stderr());
    assert!(v.stderr().contains("version 1"), "{}", v.stderr());
    let vj = env.on("verify", "vm", &["--json"]).fails().json();
    assert_eq!(vj["bad_chunks"], serde_json::json!([id]));

    let out = env.path("out");
    std::fs::write(&out, b"earlier content").unwrap();
    let e = env.on("export", "vm", &[s(&out), "--force"]).fails();
    assert!(e.stderr().contains(&id), "{}", e.stderr());
    assert!(e.stderr().contains("corrupt"), "{}", e.stderr());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"earlier content",
        "a failed export keeps OUT"
    );
}

#[test]
fn wrong_key_and_missing_parcel_are_named() {
    let env = Env::file();
    let image = env.imported(4, 9);
    let other = env.path("other-key");
    env.isr(&["keygen", s(&other)]).ok();
    for cmd in ["verify", "log"] {
        let r = env.isr(&[
            cmd,
            "--store",
            &env.store,
            "--parcel",
            "vm",
            "--key-file",
            s(&other),
        ]);
        let r = r.fails();
        let want = format!("the key in {} does not open parcel vm", other.display());
        assert!(r.stderr().contains(&want), "{}", r.stderr());
    }
    // Importing with the wrong key must not publish anything either.
    let r = env.isr(&[
        "import",
        s(&image),
        "--store",
        &env.store,
        "--parcel",
        "vm",
        "--key-file",
        s(&other),
    ]);
    r.fails();
    assert_eq!(
        env.on("log", "vm", &["--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let r = env.on("export", "nothing", &[s(&env.path("out"))]).fails();
    assert!(
        r.stderr().contains("parcel nothing does not exist"),
        "{}",
        r.stderr()
    );
    let r = env
        .on("export", "vm", &["--version", "5", s(&env.path("out"))])
        .fails();
    assert!(r.stderr().contains("no version 5"), "{}", r.stderr());
    let bad_key = env.path("bad-key");
    std::fs::write(&bad_key, b"not a key").unwrap();
    let r = env.isr(&[
        "log",
        "--store",
        &env.store,
        "--parcel",
        "vm",
        "--key-file",
        s(&bad_key),
    ]);
    assert!(r.fails().stderr().contains("is not an isr key"));
}

#[test]
fn transient_s3_errors_are_retried() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.port, 4);
    let mut env = Env::s3(&server, "flaky");
    env.vars.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.vars.push(("AWS_ENDPOINT_URL", proxy.endpoint()));
    let image = env.imported(8, 11);
    assert_eq!(proxy.failed.load(std::sync::atomic::Ordering::Relaxed), 4);
    let out = env.path("out");
    env.on("export", "vm", &[s(&out)]).ok();
    assert_eq!(sha256(&out), sha256(&image));
}

#[test]
fn unreachable_store_fails_naming_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again at once: nothing listens there
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut env = Env::file();
    env.store = format!("s3://{}/gone", support::BUCKET);
    env.vars = support::s3_env(&endpoint);
    env.vars.push(("ISR_RETRY_TIMEOUT", "4".into()));
    let started = std::time::Instant::now();
    let r = env.on("log", "vm", &[]);
    assert_eq!(r.out.status.code(), Some(3), "{}", r.stderr());
    assert!(r.stderr().contains("s3://isr-test/gone"), "{}", r.stderr());
    assert!(r.stderr().contains("parcels/vm/"), "{}", r.stderr());
    // --retry-timeout is honoured: no giving up after a count of attempts.
    let waited = started.elapsed();
    assert!(waited.as_secs_f64() >= 3.2, "gave up after {waited:?}");
    assert!(waited.as_secs() < 60);
}

#[test]
fn qcow2_images_import_through_qemu_img() {
    let env = Env::file();
    let raw = env.path("image");
    write_mixed_image(&raw, 8 << 20, 13);
    let qcow2 = env.path("image.qcow2");
    to_qcow2(&raw, &qcow2);
    env.on("import", "vm", &[s(&qcow2)]).ok();
    let out = env.path("out");
    env.on("export", "vm", &[s(&out)]).ok();
    assert_eq!(sha256(&out), sha256(&raw));
}

#[test]
fn hoard_fills_the_cache_and_a_second_hoard_fetches_nothing() {
    let env = Env::file();
    let image = env.imported(16, 23);
    let cache = env.path("cache");
    let first = env
        .on("hoard", "vm", &["--cache-dir", s(&cache), "--json"])
        .ok()
        .json();
    assert_eq!(first["cached_chunks"], first["chunks"]);
    assert!(first["fetched_chunks"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["version"], 1);
    let second = env
        .on("hoard", "vm", &["--cache-dir", s(&cache), "--json"])
        .ok()
        .json();
    assert_eq!(second["fetched_chunks"], 0);
    // The cached image is the disk, byte for byte.
    let dir = std::path::PathBuf::from(first["cache"].as_str().unwrap());
    assert_eq!(sha256(&dir.join("image")), sha256(&image));
}

/// A hoard reports every chunk it made local, not only the objects it
/// fetched: one object fills every chunk that repeats its content.
#[test]
fn hoard_counts_the_chunks_it_filled_beside_the_objects_it_fetched() {
    let env = Env::file();
    let distinct: Vec<Vec<u8>> = (0..6)
        .map(|i| format::noise(256 << 10, 31 + 2 * i))
        .collect();
    let image = env.path("repeats");
    let disk: Vec<u8> = (0..8).flat_map(|i| distinct[i % 6].clone()).collect();
    std::fs::write(&image, &disk).unwrap();
    env.on("import", "vm", &[s(&image)]).ok();
    let cache = env.path("cache");
    let r = env
        .on("hoard", "vm", &["--cache-dir", s(&cache), "--json"])
        .ok()
        .json();
    assert_eq!(
        (r["filled_chunks"].as_u64(), r["fetched_chunks"].as_u64()),
        (Some(8), Some(6)),
        "{r}"
    );
    let r = env
        .on("hoard", "vm", &["--cache-dir", s(&env.path("cache2"))])
        .ok();
    assert!(
        r.stdout()
            .contains("8 chunks filled from 6 objects fetched"),
        "{}",
        r.stdout()
    );
}

/// On a host whose kernel has no ublk driver, resume says exactly that and
/// fails. (The control device is pointed at a path that does not exist, so
/// this checks the message on any host, ublk or not.)
#[test]
fn resume_without_ublk_names_the_missing_driver() {
    let mut env = Env::file();
    let missing = env.path("no-ublk-control");
    env.vars.push(("ISR_UBLK_CONTROL", s(&missing).to_owned()));
    env.imported(4, 1);
    let r = env.on("resume", "vm", &[]).fails();
    assert!(r.stderr().contains("modprobe ublk_drv"), "{}", r.stderr());
    let r = env.isr(&["suspend", "vm"]).fails();
    assert!(r.stderr().contains("not resumed"), "{}", r.stderr());
}

/// Invariant 4 on a local store: every chunk file, and the directory entry
/// naming it, is fsynced before the manifest that names it is linked into
/// place, and the manifest's own entry is fsynced after. Watched with
/// strace on a real import into a store directory that does not exist yet
/// (so its new directories must be made durable too).
#[test]
fn file_store_chunks_are_durable_before_the_manifest() {
    let env = Env::file();
    let image = env.path("image");
    write_mixed_image(&image, 8 << 20, 17);
    let trace = env.path("trace");
    let key = env.key();
    let status = Command::new("strace")
        .args(["-f", "-qq", "-y", "-o", s(&trace)])
        .args([
            "-e",
            "trace=fsync,fdatasync,link,linkat,rename,renameat2,mkdir,mkdirat",
        ])
        .arg(env!("CARGO_BIN_EXE_isr"))
        .args(["import", s(&image), "--store", &env.store, "--parcel", "vm"])
        .args(["--key-file", s(&key)])
        .env_remove("ISR_STORE")
        .env_remove("AWS_ENDPOINT_URL")
        .status()
        .expect("strace (apt install strace; scripts/setup installs it)");
    assert!(status.success());
    let events = support::strace_events(&std::fs::read_to_string(&trace).unwrap());
    let store = env.path("store");
    let manifest = store.join("parcels/vm/versions/00000000000000000001");
    let at = |pred: &dyn Fn(&support::Syscall) -> bool| events.iter().position(pred);
    let linked = |p: &Path| {
        at(&|e: &support::Syscall| {
            e.name == "linkat" && e.paths.get(1).map(PathBuf::from).as_deref() == Some(p)
        })
    };
    let synced_between = |dir: &Path, from: usize, to: usize| {
        events[from..to]
            .iter()
            .any(|e| e.name.ends_with("sync") && e.fd_path.as_deref() == Some(dir))
    };
    let m = linked(&manifest).expect("the manifest is created with link()");
    // The manifest's own bytes before its link, its entry after.
    assert!(
        events[..m].iter().any(|e| e.name.ends_with("sync")
            && e.fd_path.as_ref().is_some_and(|p| p
                .to_string_lossy()
                .starts_with(&format!("{}#", manifest.display())))),
        "manifest contents not synced before its link"
    );
    assert!(
        synced_between(manifest.parent().unwrap(), m, events.len()),
        "manifest's directory not synced after its link"
    );

    let chunks: Vec<PathBuf> = std::fs::read_dir(store.join("chunks"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    assert!(chunks.len() >= 4, "{chunks:?}");
    for chunk in &chunks {
        let l = linked(chunk).unwrap_or_else(|| panic!("{} not linked", chunk.display()));
        assert!(l < m, "{} linked after the manifest", chunk.display());
        let staged = format!("{}#", chunk.display());
        assert!(
            events[..l].iter().any(|e| e.name.ends_with("sync")
                && e.fd_path
                    .as_ref()
                    .is_some_and(|p| p.to_string_lossy().starts_with(&staged))),
            "{} not synced before its link",
            chunk.display()
        );
        assert!(
            synced_between(chunk.parent().unwrap(), l, m),
            "directory of {} not synced between its link and the manifest's",
            chunk.display()
        );
    }
    // Every directory made on the way (the store's own included) is made
    // durable in its parent before the manifest.
    let made: Vec<(usize, PathBuf)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.name.starts_with("mkdir"))
        .map(|(i, e)| (i, PathBuf::from(&e.paths[0])))
        .collect();
    assert!(made.iter().any(|(_, d)| *d == store), "{made:?}");
    for (i, dir) in made.iter().filter(|(i, _)| *i < m) {
        assert!(
            synced_between(dir.parent().unwrap(), *i, m),
            "new directory {} not synced in its parent before the manifest",
            dir.display()
        );
    }
}

/// A malformed S3 endpoint fails naming it and why, from the option or
/// the environment; nothing panics.
#[test]
fn bad_endpoints_fail_naming_them() {
    let mut env = Env::file();
    env.store = format!("s3://{}/x", support::BUCKET);
    env.vars = support::s3_env("unused");
    env.vars.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    for (bad, why) in [
        ("", "empty"),
        ("127.0.0.1:9000", "no scheme"),
        ("localhost:9000", "not http or https"),
        ("http://[::1", "invalid"),
    ] {
        // What the user typed cannot work: a usage error (exit 2).
        let r = env.on("log", "vm", &["--endpoint", bad]).exits(2);
        for want in [&format!("S3 endpoint {bad:?}"), why, "s3://isr-test/x"] {
            assert!(r.stderr().contains(want), "{bad:?}: {}", r.stderr());
        }
        env.vars.push(("AWS_ENDPOINT_URL", bad.into()));
        let r = env.on("log", "vm", &[]).exits(2);
        assert!(r.stderr().contains(why), "{bad:?}: {}", r.stderr());
        env.vars.pop();
    }
}

/// `file:relative` is not quietly read as `/relative`.
#[test]
fn file_urls_must_name_an_absolute_path() {
    let env = Env::file();
    let image = env.path("image");
    write_mixed_image(&image, 1 << 20, 2);
    let name = format!("isr-test-relative-{}", std::process::id());
    let key = env.key();
    for cmd in ["log", "import"] {
        let url = format!("file:{name}");
        let mut args = vec![
            cmd,
            "--store",
            &url,
            "--parcel",
            "vm",
            "--key-file",
            s(&key),
        ];
        if cmd == "import" {
            args.push(s(&image));
        }
        let r = env.isr(&args).exits(2);
        assert!(
            r.stderr().contains("not an absolute local path"),
            "{}",
            r.stderr()
        );
        assert!(r.stderr().contains(&url), "{}", r.stderr());
        assert!(!Path::new("/").join(&name).exists(), "/{name} was created");
    }
}

/// Only a publish creates a local store; reading a missing one says so and
/// leaves nothing behind.
#[test]
fn reading_a_missing_store_fails_without_creating_it() {
    let env = Env::file();
    let dir = env.path("store");
    let out = env.path("out");
    let cache = env.path("cache");
    let want = format!("store {} does not exist", env.store);
    for args in [
        vec!["log"],
        vec!["verify"],
        vec!["export", s(&out)],
        vec!["hoard", "--cache-dir", s(&cache)],
    ] {
        let r = env.on(args[0], "vm", &args[1..]).fails();
        assert!(r.stderr().contains(&want), "{args:?}: {}", r.stderr());
        assert!(!dir.exists(), "{args:?} created the store");
    }
    env.imported(2, 4);
    assert!(dir.is_dir());
}

/// With no CA certificates the HTTP client cannot be built (even for an
/// http:// endpoint): the error says that, not a bare "builder error".
#[test]
fn missing_ca_certificates_are_named() {
    let server = S3Server::start();
    let mut env = Env::s3(&server, "ca");
    env.vars
        .push(("SSL_CERT_FILE", "/nonexistent/ca.pem".into()));
    env.vars.push(("SSL_CERT_DIR", "/nonexistent".into()));
    let r = env.on("log", "vm", &[]).fails();
    for want in [
        "cannot set up the HTTPS client for s3://isr-test/ca",
        "no CA certificates found",
        "install ca-certificates or set SSL_CERT_FILE",
    ] {
        assert!(r.stderr().contains(want), "{}", r.stderr());
    }
}
