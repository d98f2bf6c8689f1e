//! Bad input at the command line (issue 7, "Trust"): nothing outside isr's
//! own files is overwritten without --force, nothing panics or hangs, and
//! every refusal names the object and the cause.

use std::path::Path;
use std::process::Command;

use super::support::{sha256, write_mixed_image};
use super::{Env, Run, s, to_qcow2};

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
    to_qcow2(&raw, &qcow2);
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
    // (the store itself does not exist yet: nothing was imported)
    assert!(msg.contains("does not exist"), "{j}");
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

/// Every chunk object in the `file://` store of `env`, by path.
fn chunk_objects(env: &Env) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(env.path("store").join("chunks"))
        .unwrap()
        .flatten()
    {
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

#[test]
fn an_import_replaces_damaged_chunk_objects_instead_of_naming_them() {
    let env = Env::file();
    let image = env.imported(4, 86);
    let objects = chunk_objects(&env);
    assert!(objects.len() >= 2, "{objects:?}");
    // One object truncated to nothing, one with a byte flipped.
    std::fs::write(&objects[0], b"").unwrap();
    let mut bytes = std::fs::read(&objects[1]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&objects[1], &bytes).unwrap();
    env.on("verify", "vm", &[]).fails();

    // Importing the same image again puts the good bytes back: the new
    // version names no object the import could not vouch for.
    let r = env.on("import", "vm", &[s(&image), "--json"]).ok().json();
    assert_eq!(r["repaired_chunks"], 2, "{r}");
    assert_eq!(r["uploaded_chunks"], 2, "{r}");
    env.on("verify", "vm", &[]).ok();
    env.on("verify", "vm", &["--version", "1"]).ok();
    let r = env.on("import", "vm", &[s(&image)]).ok();
    assert!(!r.stdout().contains("damaged"), "{}", r.stdout());
}

#[test]
fn export_names_a_missing_directory_and_keeps_the_owner_of_what_it_replaces() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::file();
    let image = env.imported(4, 87);
    let missing = env.path("no/such/dir/out.img");
    let r = env.on("export", "vm", &[s(&missing)]).fails();
    assert!(r.stderr().contains("its directory"), "{}", r.stderr());
    assert!(r.stderr().contains("does not exist"), "{}", r.stderr());
    assert!(!r.stderr().contains("isr-partial"), "{}", r.stderr());

    // Someone else's file, with a second name: --force keeps its owner,
    // group and mode; the other name keeps the old content, and is told.
    let out = env.path("theirs.img");
    std::fs::write(&out, b"old").unwrap();
    let link = env.path("theirs-link.img");
    std::fs::hard_link(&out, &link).unwrap();
    std::os::unix::fs::chown(&out, Some(4321), Some(4322)).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let r = env.on("export", "vm", &[s(&out), "--force"]).ok();
    assert!(r.stderr().contains("1 other hard links"), "{}", r.stderr());
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (4321, 4322, 0o640));
    assert_eq!(sha256(&out), sha256(&image));
    assert_eq!(std::fs::read(&link).unwrap(), b"old");
}
