//! Leases that outlive their process, and commands that fail: what a new
//! user tripped over (issue 18, part 4). An import or rollback lets go of
//! its lease on failure and on SIGINT/SIGTERM; a lease whose process died
//! on this host is taken over when its holder left nothing behind, and
//! named as dead when it may have; `--steal` exists wherever a lease is
//! taken; a refused command leaves no parcel behind; an image that changes
//! while it is imported is refused.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::support::write_mixed_image;
use super::{Env, Run, s};

/// The lease objects of `parcel` in the `file://` store of `env`: the
/// highest generation, and whether it is released.
fn lease_state(env: &Env, parcel: &str) -> (u64, bool) {
    let dir = leases_dir(env, parcel);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let highest = names
        .iter()
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let released = names.contains(&format!("{highest:020}.released"));
    (highest, released)
}

fn leases_dir(env: &Env, parcel: &str) -> PathBuf {
    env.path("store")
        .join("parcels")
        .join(parcel)
        .join("leases")
}

/// An import of an 8 MiB image of its own into "vm" at 1 MiB/s, started
/// and left running once it holds the lease (a generation above `after`).
fn slow_import(env: &Env, name: &str, after: u64) -> (Child, PathBuf) {
    let image = env.path(name);
    write_mixed_image(&image, 8 << 20, after + 100);
    let mut child = env
        .on_command("import", "vm", &[s(&image), "--bwlimit", "1M", "--resize"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lease_state(env, "vm").0 <= after {
        assert!(Instant::now() < deadline, "the import took no lease");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the import ended before it took the lease: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300)); // uploading now
    (child, image)
}

fn versions(env: &Env) -> usize {
    let log = env.on("log", "vm", &["--json"]).ok().json();
    log.as_array().unwrap().len()
}

#[test]
fn sigint_and_sigterm_stop_an_import_that_then_publishes_nothing_and_releases_its_lease() {
    let env = Env::file();
    env.imported(4, 81);
    for (signal, code, name) in [
        (libc::SIGTERM, 143, "SIGTERM"),
        (libc::SIGINT, 130, "SIGINT"),
    ] {
        let (generation, _) = lease_state(&env, "vm");
        let (child, _) = slow_import(&env, "big", generation);
        // SAFETY: signals the child this test started and still owns.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert!(
            stderr.contains(&format!("interrupted by {name}")),
            "{stderr}"
        );
        assert!(stderr.contains("nothing was published"), "{stderr}");
        assert_eq!(lease_state(&env, "vm"), (generation + 1, true), "released");
        assert_eq!(versions(&env), 1, "nothing was published");
    }
}

#[test]
fn a_lease_whose_import_was_killed_is_taken_over_by_the_next_import_on_this_host() {
    let env = Env::file();
    let image = env.imported(4, 82);
    let (mut child, _) = slow_import(&env, "big", 1);
    child.kill().unwrap(); // SIGKILL: nothing can release the lease
    child.wait().unwrap();
    assert_eq!(lease_state(&env, "vm"), (2, false), "the lease is left");
    let lease = std::fs::read_to_string(leases_dir(&env, "vm").join(format!("{:020}", 2))).unwrap();
    assert!(lease.contains("task=import"), "{lease}");
    assert!(lease.contains("boot="), "{lease}");

    // Its process is gone: the next import takes the lease over and says so.
    let r = env.on("import", "vm", &[s(&image), "--resize"]).ok();
    assert!(r.stderr().contains("had died"), "{}", r.stderr());
    assert_eq!(versions(&env), 2);
    assert_eq!(lease_state(&env, "vm"), (3, true));

    // A dead session may have left changes in its cache: named, not taken.
    let (mut child, _) = slow_import(&env, "big2", 3);
    child.kill().unwrap();
    child.wait().unwrap();
    let path = leases_dir(&env, "vm").join(format!("{:020}", 4));
    let lease = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, lease.replace("task=import", "task=session")).unwrap();
    let r = env.on("import", "vm", &[s(&image)]).exits(4);
    for words in ["isr resume", "is dead", "isr recover vm", "isr discard vm"] {
        assert!(r.stderr().contains(words), "{words}: {}", r.stderr());
    }
    // ... unless asked to.
    env.on("import", "vm", &[s(&image), "--steal"]).ok();
    assert_eq!(versions(&env), 3);

    // A lease from before this host restarted is dead too.
    let (mut child, _) = slow_import(&env, "big3", 5);
    child.kill().unwrap();
    child.wait().unwrap();
    let out = env
        .on_command("import", "vm", &[s(&image)])
        .env("ISR_BOOT_ID", "another boot")
        .output()
        .unwrap();
    let r = Run { out }.ok();
    assert!(r.stderr().contains("had died"), "{}", r.stderr());
    assert_eq!(versions(&env), 4);
}

#[test]
fn a_live_lease_elsewhere_is_refused_by_import_and_rollback_unless_stolen() {
    let env = Env::file();
    let image = env.imported(4, 83);
    env.on("import", "vm", &[s(&image)]).ok();
    let (generation, _) = lease_state(&env, "vm");
    std::fs::write(
        leases_dir(&env, "vm").join(format!("{:020}", generation + 1)),
        "host=elsewhere\npid=4242\nsince=1700000000\nnonce=feedfeed\n",
    )
    .unwrap();
    let r = env.on("import", "vm", &[s(&image)]).exits(4);
    // the holder's time is a date, not raw Unix time
    assert!(
        r.stderr().contains("2023-11-14 22:13:20Z"),
        "{}",
        r.stderr()
    );
    let key = env.key();
    let rollback = |extra: &[&str]| {
        let mut args = vec!["rollback", "vm", "--to", "1", "--store", &env.store];
        args.extend_from_slice(&["--key-file", key.to_str().unwrap()]);
        args.extend_from_slice(extra);
        env.isr(&args)
    };
    let r = rollback(&["--json"]).exits(4);
    assert_eq!(r.json()["kind"], "conflict", "{}", r.stdout());
    assert!(r.stderr().contains("--steal"), "{}", r.stderr());
    rollback(&["--steal"]).ok();
    assert_eq!(versions(&env), 3);
    assert_eq!(lease_state(&env, "vm"), (generation + 2, true));
}

#[test]
fn refused_commands_leave_no_parcel_and_no_lease_behind() {
    let env = Env::file();
    let image = env.imported(4, 84);
    let key = env.key();
    let r = env
        .isr(&[
            "rollback",
            "ghost",
            "--to",
            "1",
            "--store",
            &env.store,
            "--key-file",
            key.to_str().unwrap(),
        ])
        .fails();
    assert!(r.stderr().contains("ghost"), "{}", r.stderr());
    assert!(
        !env.path("store").join("parcels").join("ghost").exists(),
        "a rollback of a parcel that does not exist created it"
    );
    // What an older isr left in such a case (a released lease, no
    // version) is no parcel to `isr ls`.
    let old = leases_dir(&env, "old-ghost");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join(format!("{:020}", 1)),
        "host=h\npid=1\nsince=1\nnonce=ab\n",
    )
    .unwrap();
    std::fs::write(old.join(format!("{:020}.released", 1)), "released\n").unwrap();
    let ls = env
        .isr(&["ls", "--store", &env.store, "--json"])
        .ok()
        .json();
    assert!(!ls.to_string().contains("ghost"), "{ls}");
    assert!(ls.to_string().contains("\"vm\""), "{ls}");

    let before = lease_state(&env, "vm");
    let r = env
        .on("import", "vm", &[s(&image), "--chunk-size", "64K"])
        .fails();
    assert!(
        r.stderr().contains("cannot take 65536-byte chunks"),
        "{}",
        r.stderr()
    );
    assert_eq!(lease_state(&env, "vm"), before, "no lease was taken");
    let r = env
        .on("import", "new", &[s(&image), "--chunk-size", "8M"])
        .exits(2);
    assert!(
        r.stderr().contains("outside 64 KiB to 4 MiB"),
        "{}",
        r.stderr()
    );
    assert!(!r.stderr().contains("power of two"), "{}", r.stderr());
    assert!(!env.path("store").join("parcels").join("new").exists());
}

#[test]
fn an_image_that_changes_while_it_is_imported_is_refused() {
    let env = Env::file();
    env.imported(4, 85);
    let (child, image) = slow_import(&env, "moving", 1);
    // The guest still runs on it: a block somewhere is rewritten.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 4096], 1 << 20).unwrap();
    drop(f);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("changed while it was imported"), "{stderr}");
    assert!(stderr.contains(image.to_str().unwrap()), "{stderr}");
    assert_eq!(versions(&env), 1, "nothing was published");
    assert_eq!(
        lease_state(&env, "vm"),
        (2, true),
        "and the lease is released"
    );
}
