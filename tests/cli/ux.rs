//! What users of such tools expect (issue 9, part 4): exit statuses that
//! say what went wrong (3 unreachable store, 4 conflict, 2 usage), JSON on
//! every summary and error, `--quiet`, `RUST_LOG` logging, and `isr
//! status` listing what this host has resumed.

use std::path::Path;

use serde_json::{Value, json};

use super::support;
use super::{Env, Run, s};

/// A store URL and environment pointing at a port where nothing listens.
fn unreachable_env() -> Env {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again at once
    let mut env = Env::file();
    env.store = format!("s3://{}/gone", support::BUCKET);
    env.vars = support::s3_env(&format!("http://127.0.0.1:{port}"));
    env
}

#[test]
fn an_unreachable_store_exits_3() {
    let env = unreachable_env();
    let r = env.on("log", "vm", &["--retry-timeout", "1"]).exits(3);
    assert!(r.stderr().starts_with("isr: "), "{}", r.stderr());
    assert!(r.stderr().contains("s3://isr-test/gone"), "{}", r.stderr());
    let r = env
        .on("log", "vm", &["--retry-timeout", "1", "--json"])
        .exits(3);
    let j = r.json();
    assert_eq!(j["kind"], "unreachable", "{j}");
    assert!(j["error"].as_str().unwrap().contains("gone"), "{j}");
}

/// Someone else's lease on parcel `parcel` in the `file://` store of `env`:
/// the next generation after those there, held by "elsewhere".
fn lease_elsewhere(env: &Env, parcel: &str) {
    let dir = env
        .path("store")
        .join("parcels")
        .join(parcel)
        .join("leases");
    std::fs::create_dir_all(&dir).unwrap();
    let highest = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    std::fs::write(
        dir.join(format!("{:020}", highest + 1)),
        "host=elsewhere\npid=4242\nsince=1700000000\nnonce=feedfeed\n",
    )
    .unwrap();
}

#[test]
fn importing_over_a_parcel_leased_elsewhere_exits_4() {
    let env = Env::file();
    let image = env.imported(4, 71);
    lease_elsewhere(&env, "vm");
    let r = env.on("import", "vm", &[s(&image)]).exits(4);
    assert!(
        r.stderr().contains("in use by host elsewhere"),
        "{}",
        r.stderr()
    );
    let r = env.on("import", "vm", &[s(&image), "--json"]).exits(4);
    let j = r.json();
    assert_eq!(j["kind"], "conflict", "{j}");
    assert!(j["error"].as_str().unwrap().contains("elsewhere"), "{j}");
    // Nothing was published over it.
    let log = env.on("log", "vm", &["--json"]).ok().json();
    assert_eq!(log.as_array().unwrap().len(), 1, "{log}");
}

#[test]
fn usage_errors_exit_2_with_a_json_error_when_asked() {
    let env = Env::file();
    env.isr(&["export", "--no-such-flag"]).exits(2);
    let r = env.isr(&["log", "--json", "--no-such-flag"]).exits(2);
    let j = r.json();
    assert_eq!(j["kind"], "usage", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("--no-such-flag"),
        "{j}"
    );
    // The JSON error names what is missing, not only that something is.
    let r = env.isr(&["rollback", "vm", "--json"]).exits(2);
    let j = r.json();
    assert!(j["error"].as_str().unwrap().contains("--to <N>"), "{j}");
    // A store URL that cannot work is a usage error too.
    for url in ["bogus://x", "file:relative", "s3://"] {
        let r = env.isr(&["ls", "--store", url, "--json"]).exits(2);
        assert_eq!(r.json()["kind"], "usage", "{url}: {}", r.stdout());
        assert!(r.stderr().contains(url), "{}", r.stderr());
    }
    // --help and --version are no errors.
    env.isr(&["--version"]).exits(0);
    let help = env.isr(&["--help"]).exits(0);
    for line in ["3    the store is unreachable", "4    conflict", "RUST_LOG"] {
        assert!(help.stdout().contains(line), "{}", help.stdout());
    }
}

#[test]
fn keygen_prints_its_file_in_json() {
    let env = Env::file();
    let key = env.path("second.key");
    let r = env.isr(&["keygen", s(&key), "--json"]).ok();
    let j = r.json();
    assert_eq!(
        j,
        json!({ "key_file": std::fs::canonicalize(&key).unwrap() })
    );
    assert!(r.stderr().is_empty(), "{}", r.stderr());
    // A failure is one JSON error too.
    let r = env.isr(&["keygen", s(&key), "--json"]).exits(1);
    assert!(r.json()["error"].as_str().unwrap().contains("refusing"));
    assert_eq!(r.json()["kind"], "failure");
}

#[test]
fn quiet_silences_notes_but_not_warnings_or_results() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::file();
    let loud = env.isr(&["keygen", s(&env.path("k1"))]).ok();
    assert!(
        loud.stderr().contains("wrote a new key"),
        "{}",
        loud.stderr()
    );
    for args in [["-q", "keygen"], ["keygen", "--quiet"]] {
        let key = env.path(&format!("k-{}", args[0]));
        let r = env.isr(&[args[0], args[1], s(&key)]).ok();
        assert!(r.stderr().is_empty(), "{args:?}: {}", r.stderr());
        assert!(key.exists());
    }
    env.imported(4, 72);
    std::fs::set_permissions(env.key(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = env.on("log", "vm", &["-q"]).ok();
    assert!(
        r.stderr().contains("isr: warning: key file"),
        "{}",
        r.stderr()
    );
    assert!(r.stdout().contains("VERSION"), "{}", r.stdout());
}

#[test]
fn rust_log_shows_the_retries_and_the_default_shows_none() {
    let env = unreachable_env();
    let mut cmd = env.on_command("log", "vm", &["--retry-timeout", "1"]);
    cmd.env("RUST_LOG", "fetcher=debug");
    let r = Run {
        out: cmd.output().unwrap(),
    }
    .exits(3);
    let err = r.stderr();
    assert!(err.contains("transient store failure; retrying"), "{err}");
    assert!(err.contains("attempt=1"), "{err}");
    assert!(err.contains("delay_ms="), "{err}");
    assert!(err.contains("DEBUG"), "{err}");
    // Without RUST_LOG: isr's own lines only.
    let mut cmd = env.on_command("log", "vm", &["--retry-timeout", "1"]);
    cmd.env_remove("RUST_LOG");
    let r = Run {
        out: cmd.output().unwrap(),
    }
    .exits(3);
    assert!(
        r.stderr().lines().all(|l| l.starts_with("isr: ")),
        "{}",
        r.stderr()
    );
}

/// `isr status` (no name) with the run directory `run`.
fn status_in(env: &Env, run: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["status"];
    args.extend_from_slice(extra);
    let mut cmd = env.command(&args);
    cmd.env("ISR_RUN_DIR", run);
    Run {
        out: cmd.output().unwrap(),
    }
}

#[test]
fn status_without_parcels_says_so() {
    let env = Env::file();
    std::fs::create_dir(env.path("run")).unwrap();
    for run in [env.path("run"), env.path("missing")] {
        let r = status_in(&env, &run, &[]).ok();
        assert!(
            r.stdout().contains("no parcel is resumed"),
            "{}",
            r.stdout()
        );
        let r = status_in(&env, &run, &["--json"]).ok();
        assert_eq!(r.json(), json!([]));
    }
}

/// A pid that is not running (a child that has exited and been reaped).
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn status_lists_a_parcel_whose_daemon_died() {
    let env = Env::file();
    let run = env.path("run");
    std::fs::create_dir(&run).unwrap();
    let pid = dead_pid();
    let state = json!({
        "pid": pid,
        "store": env.store,
        "key_file": env.key(),
        "retry_timeout": 10,
        "device_id": 7,
        "device": "/dev/ublkb7",
    });
    std::fs::write(run.join("vm.json"), state.to_string()).unwrap();
    // Its VM record is not a parcel of its own ("vm.vm").
    std::fs::write(
        run.join("vm.vm.json"),
        json!({"pid": pid, "qmp": "q"}).to_string(),
    )
    .unwrap();
    std::fs::write(run.join("vm.log"), "").unwrap();

    let r = status_in(&env, &run, &["--json"]).ok();
    let list: Vec<Value> = r.json().as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["parcel"], "vm");
    assert_eq!(list[0]["state"], "died");
    assert_eq!(list[0]["pid"], pid);
    assert_eq!(list[0]["device"], "/dev/ublkb7");
    assert!(
        list[0]["error"]
            .as_str()
            .unwrap()
            .contains("run isr recover vm"),
        "{list:?}"
    );
    let r = status_in(&env, &run, &[]).ok();
    assert_eq!(
        r.stdout().trim_end(),
        format!("vm  /dev/ublkb7  daemon died (pid {pid}); run isr recover vm")
    );
    // Asked by name, it is a failure that says what to do.
    let r = status_in(&env, &run, &["vm"]).fails();
    assert!(
        r.stderr().contains("died; run isr recover vm"),
        "{}",
        r.stderr()
    );
}

/// Logging to a stderr that was closed early (`2>&1 | head -3`) neither
/// panics nor stops the command.
#[test]
fn logging_to_a_closed_stderr_does_not_end_the_command() {
    use std::process::Stdio;
    let env = Env::file();
    let image = env.path("image");
    support::write_mixed_image(&image, 2 << 20, 73);
    let mut cmd = env.on_command("import", "vm", &[s(&image)]);
    cmd.env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stderr.take()); // the reader is gone before the first line
    assert!(child.wait().unwrap().success());
    let log = env.on("log", "vm", &["--json"]).ok().json();
    assert_eq!(log[0]["version"], 1, "{log}");
}
