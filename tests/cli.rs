//! End-to-end tests of the `isr` binary against real stores: a local
//! directory and a real S3 server (s3s-fs) on 127.0.0.1.

mod support;

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
}

impl Env {
    fn file() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}/store", dir.path().display());
        Env::with(dir, store, vec![])
    }

    fn s3(server: &S3Server, prefix: &str) -> Env {
        Env::with(
            tempfile::tempdir().unwrap(),
            format!("s3://{}/{prefix}", support::BUCKET),
            server.env(),
        )
    }

    fn with(dir: tempfile::TempDir, store: String, vars: Vec<(&'static str, String)>) -> Env {
        let env = Env { dir, store, vars };
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
    env.vars.push(("ISR_RETRY_TIMEOUT", "2".into()));
    let started = std::time::Instant::now();
    let r = env.on("log", "vm", &[]).fails();
    assert!(r.stderr().contains("s3://isr-test/gone"), "{}", r.stderr());
    assert!(r.stderr().contains("parcels/vm/"), "{}", r.stderr());
    assert!(started.elapsed().as_secs() < 60);
}

#[test]
fn qcow2_images_import_through_qemu_img() {
    let env = Env::file();
    let raw = env.path("image");
    write_mixed_image(&raw, 8 << 20, 13);
    let qcow2 = env.path("image.qcow2");
    let st = Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&qcow2),
        ])
        .status()
        .expect("qemu-img (apt install qemu-utils; scripts/setup installs it)");
    assert!(st.success());
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

/// Output to a closed pipe (`isr log | head -0`) ends quietly with 141; to a
/// full disk (/dev/full) with a clear error and 1. Neither panics.
#[test]
fn closed_or_full_stdout_fails_cleanly() {
    let env = Env::file();
    env.imported(4, 29);
    for json in [false, true] {
        let extra: &[&str] = if json { &["--json"] } else { &[] };
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = env
            .on_command("log", "vm", extra)
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{err}");
        assert!(err.is_empty(), "{err}");

        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = env
            .on_command("log", "vm", extra)
            .stdout(full)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.starts_with("isr: cannot write to standard output: No space left on device"),
            "{err}"
        );
    }
}

/// With --json, every failure puts one JSON object with an "error" on
/// stdout (and the message on stderr).
#[test]
fn json_failures_print_one_error_object() {
    let env = Env::file();
    let r = env.on("log", "nothing", &["--json"]).fails();
    let j = r.json();
    let msg = j["error"].as_str().expect("an error field");
    assert!(msg.contains("parcel nothing does not exist"), "{j}");
    assert!(r.stderr().contains(msg), "{}", r.stderr());
    let r = env
        .on("import", "vm", &[s(&env.path("missing")), "--json"])
        .fails();
    assert!(r.json()["error"].as_str().unwrap().contains("missing"));
    let mut status = env.command(&["status", "nothing", "--json"]);
    status.env("ISR_RUN_DIR", env.path("run"));
    let r = Run {
        out: status.output().unwrap(),
    }
    .fails();
    assert!(r.json()["error"].as_str().unwrap().contains("not resumed"));
}

/// 0 ok, 1 failure, 2 usage; the help says so.
#[test]
fn exit_statuses_are_documented_and_kept() {
    let env = Env::file();
    let help = env.isr(&["--help"]).ok();
    for line in [
        "Exit status:",
        "0    success",
        "1    failure",
        "2    usage",
        "141",
    ] {
        assert!(help.stdout().contains(line), "{}", help.stdout());
    }
    let r = env.isr(&["export", "--no-such-flag"]);
    assert_eq!(r.out.status.code(), Some(2), "{}", r.stderr());
}

/// Runs `cmd`, killing it (and failing the test) if it has not finished
/// within `secs` seconds: a hang is a failure, not a stuck test run.
fn within(mut cmd: Command, secs: u64) -> Run {
    use std::process::Stdio;
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run isr");
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(out) => Run {
            out: out.expect("wait for isr"),
        },
        Err(_) => {
            // SAFETY: kill(2) on the pid of the child started above, which
            // has not been reaped (its waiter has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv();
            panic!("isr {cmd:?} did not finish within {secs} s");
        }
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    // SAFETY: a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn file_type(path: &Path) -> std::fs::FileType {
    std::fs::symlink_metadata(path).unwrap().file_type()
}

/// Export refuses what is not a file or a block device (a FIFO, a
/// directory, /dev/null), with or without --force, and leaves it alone.
#[test]
fn export_refuses_special_files_and_leaves_them_alone() {
    use std::os::unix::fs::FileTypeExt;
    let env = Env::file();
    env.imported(4, 3);
    // The FIFO first: an export that replaced it fails here, before it gets
    // near /dev/null.
    let fifo = env.path("fifo");
    mkfifo(&fifo);
    let dir = env.path("dir");
    std::fs::create_dir(&dir).unwrap();
    for force in [false, true] {
        let extra = |p: &Path| {
            let mut v = vec![s(p).to_owned()];
            if force {
                v.push("--force".into());
            }
            v
        };
        let args = extra(&fifo);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = within(env.on_command("export", "vm", &args), 60).fails();
        assert!(file_type(&fifo).is_fifo(), "the FIFO was replaced");
        assert!(r.stderr().contains(s(&fifo)), "{}", r.stderr());
        assert!(r.stderr().contains("FIFO"), "{}", r.stderr());

        let args = extra(&dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = env.on("export", "vm", &args).fails();
        assert!(file_type(&dir).is_dir());
        assert!(r.stderr().contains("is a directory"), "{}", r.stderr());

        let null = Path::new("/dev/null");
        let args = extra(null);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = env.on("export", "vm", &args).fails();
        assert!(file_type(null).is_char_device(), "/dev/null was replaced");
        assert!(
            r.stderr().contains("/dev/null: is a character device"),
            "{}",
            r.stderr()
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("isr-partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// An existing file is replaced only with --force; a refused export leaves
/// it as it was, and a forced one replaces it whole.
#[test]
fn export_overwrites_an_existing_file_only_with_force() {
    let env = Env::file();
    let image = env.imported(4, 17);
    let out = env.path("out");
    std::fs::write(&out, b"precious").unwrap();
    let r = env.on("export", "vm", &[s(&out)]).fails();
    assert!(r.stderr().contains(s(&out)), "{}", r.stderr());
    assert!(r.stderr().contains("--force"), "{}", r.stderr());
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let j = env.on("export", "vm", &[s(&out), "--json"]).fails().json();
    assert!(j["error"].as_str().unwrap().contains("exists"), "{j}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");

    env.on("export", "vm", &[s(&out), "--force"]).ok();
    assert_eq!(sha256(&out), sha256(&image));
}

/// A symbolic link is followed: the file it names receives the disk, and
/// the link stays a link. A dangling link is refused.
#[test]
fn export_writes_through_a_symlink_and_keeps_it() {
    let env = Env::file();
    let image = env.imported(4, 19);
    let target = env.path("target");
    let link = env.path("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let r = env.on("export", "vm", &[s(&link)]).fails();
    assert!(r.stderr().contains("does not exist"), "{}", r.stderr());
    assert!(file_type(&link).is_symlink());
    assert!(!target.exists());

    std::fs::write(&target, b"old").unwrap();
    let r = env.on("export", "vm", &[s(&link)]).fails();
    assert!(r.stderr().contains("--force"), "{}", r.stderr());
    assert_eq!(std::fs::read(&target).unwrap(), b"old");

    env.on("export", "vm", &[s(&link), "--force"]).ok();
    assert!(file_type(&link).is_symlink(), "the link was replaced");
    assert_eq!(sha256(&target), sha256(&image));
}

/// Two forced exports of different versions to one path at once: the result
/// is exactly one of the two versions, never a mix, and no temporary file
/// is left behind.
#[test]
fn concurrent_exports_to_one_path_leave_one_whole_version() {
    let env = Env::file();
    let one = env.path("one");
    let two = env.path("two");
    write_mixed_image(&one, 32 << 20, 101);
    write_mixed_image(&two, 32 << 20, 202);
    env.on("import", "vm", &[s(&one)]).ok();
    env.on("import", "vm", &[s(&two)]).ok();
    let (sha1, sha2) = (sha256(&one), sha256(&two));
    let out = env.path("out");
    for round in 0..5 {
        let mut children: Vec<_> = ["1", "2"]
            .iter()
            .map(|v| {
                env.on_command("export", "vm", &["--version", v, "--force", s(&out)])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in &mut children {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            let status = loop {
                if let Some(st) = c.try_wait().unwrap() {
                    break st;
                }
                if std::time::Instant::now() > deadline {
                    let _ = c.kill();
                    panic!("an export did not finish within 120 s");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            assert!(status.success(), "round {round}: {status}");
        }
        let got = sha256(&out);
        assert!(
            got == sha1 || got == sha2,
            "round {round}: the result is neither version"
        );
        let partial: Vec<_> = std::fs::read_dir(env.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("isr-partial"))
            .collect();
        assert!(partial.is_empty(), "round {round}: {partial:?}");
    }
}

/// Import takes a non-empty regular file or block device; anything else is
/// refused naming the file and its kind, at once (a FIFO does not hang),
/// and nothing is published.
#[test]
fn import_refuses_what_cannot_hold_a_disk() {
    let env = Env::file();
    let fifo = env.path("fifo");
    mkfifo(&fifo);
    let empty = env.path("empty");
    std::fs::write(&empty, b"").unwrap();
    let cases = [
        ("/dev/zero".to_owned(), "character device"),
        (s(&fifo).to_owned(), "FIFO"),
        (s(&empty).to_owned(), "empty (0 bytes)"),
    ];
    for (path, kind) in &cases {
        let r = within(env.on_command("import", "vm", &[path]), 60).fails();
        assert!(r.stderr().contains(path.as_str()), "{}", r.stderr());
        assert!(r.stderr().contains(kind), "{}", r.stderr());
    }
    let r = env.on("log", "vm", &[]).fails();
    assert!(r.stderr().contains("does not exist"), "{}", r.stderr());
}

/// A truncated qcow2 (which `qemu-img convert` turns into zeros without a
/// complaint) is refused with what `qemu-img check` found.
#[test]
fn damaged_qcow2_is_refused() {
    let env = Env::file();
    let raw = env.path("image");
    write_mixed_image(&raw, 8 << 20, 37);
    let qcow2 = env.path("image.qcow2");
    let st = Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&qcow2),
        ])
        .status()
        .expect("qemu-img (apt install qemu-utils; scripts/setup installs it)");
    assert!(st.success());
    let len = std::fs::metadata(&qcow2).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&qcow2)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let r = env.on("import", "vm", &[s(&qcow2)]).fails();
    assert!(r.stderr().contains(s(&qcow2)), "{}", r.stderr());
    assert!(r.stderr().contains("qemu-img check"), "{}", r.stderr());
    assert!(r.stderr().contains("errors were found"), "{}", r.stderr());
    env.on("log", "vm", &[]).fails();
}

/// A new version of another disk size needs --resize; without it nothing is
/// published and the error names both sizes.
#[test]
fn import_of_another_size_needs_resize() {
    let env = Env::file();
    env.imported(32, 41);
    for (mib, want) in [(1u64, "1048576"), (64, "67108864")] {
        let other = env.path("other");
        write_mixed_image(&other, mib << 20, 43);
        let r = env.on("import", "vm", &[s(&other)]).fails();
        assert!(r.stderr().contains(want), "{}", r.stderr());
        assert!(r.stderr().contains("33554432"), "{}", r.stderr());
        assert!(r.stderr().contains("--resize"), "{}", r.stderr());
    }
    let log = env.on("log", "vm", &["--json"]).ok().json();
    assert_eq!(log.as_array().unwrap().len(), 1);
    let other = env.path("other");
    let j = env
        .on("import", "vm", &[s(&other), "--resize", "--json"])
        .ok()
        .json();
    assert_eq!(j["version"], 2);
    let log = env.on("log", "vm", &["--json"]).ok().json();
    assert_eq!(log[0]["disk_size"], 64 << 20);
}

/// One unreadable manifest does not hide the others: log lists them, names
/// the broken version, and exits 1; in JSON that version has an "error".
#[test]
fn log_lists_what_it_can_read() {
    let env = Env::file();
    let image = env.imported(4, 47);
    env.on("import", "vm", &[s(&image)]).ok();
    env.on("import", "vm", &[s(&image)]).ok();
    let victim = env.path("store/parcels/vm/versions/00000000000000000002");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();

    let r = env.on("log", "vm", &[]).fails();
    assert!(r.stderr().contains("version 2"), "{}", r.stderr());
    let stdout = r.stdout();
    let rows: Vec<&str> = stdout.lines().skip(1).map(str::trim).collect();
    assert_eq!(rows.len(), 3, "{}", r.stdout());
    assert!(rows[0].starts_with("3*"), "{}", r.stdout());
    assert!(rows[1].contains("unreadable"), "{}", r.stdout());
    assert!(rows[2].starts_with('1'), "{}", r.stdout());

    let j = env.on("log", "vm", &["--json"]).fails().json();
    let versions = j.as_array().unwrap();
    assert_eq!(versions.len(), 3, "{j}");
    assert_eq!(versions[0]["disk_size"], 4 << 20);
    assert!(versions[0].get("error").is_none(), "{j}");
    assert_eq!(versions[1]["version"], 2);
    assert!(
        versions[1]["error"].as_str().unwrap().contains("unusable"),
        "{j}"
    );
    assert_eq!(versions[2]["version"], 1);
}

/// A key file others can read is used, with one warning saying how to fix it.
#[test]
fn a_key_readable_by_others_draws_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::file();
    env.imported(4, 53);
    let r = env.on("log", "vm", &[]).ok();
    assert!(!r.stderr().contains("warning"), "{}", r.stderr());
    std::fs::set_permissions(env.key(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = env.on("log", "vm", &[]).ok();
    let want = format!(
        "isr: warning: key file {k} is readable by others (mode 0644); chmod 600 {k}",
        k = env.key().display()
    );
    assert!(r.stderr().contains(&want), "{}", r.stderr());
    assert_eq!(r.stderr().matches("warning").count(), 1, "{}", r.stderr());
}
