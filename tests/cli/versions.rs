//! Versions and garbage collection at the command line (issue 9, part 3):
//! `isr ls`, `isr rollback`, `isr discard`, `isr gc`. The semantics of gc
//! (and its race with publishes) are tested in `fetcher/tests/versions.rs`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fetcher::{Engine, Lease, Parcel, Store};
use format::Secret;

use super::support::{S3Server, sha256, write_mixed_image};
use super::{Env, Run, s};

impl Env {
    /// Runs `isr ARGS --store STORE [EXTRA…]` (a command on a whole store,
    /// or on a parcel named by an argument).
    fn at_store(&self, args: &[&str], extra: &[&str]) -> Run {
        Run {
            out: self.store_command(args, extra).output().expect("run isr"),
        }
    }

    fn store_command(&self, args: &[&str], extra: &[&str]) -> Command {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--store", self.store.as_str()]);
        all.extend_from_slice(extra);
        let mut cmd = self.command(&all);
        cmd.env("ISR_RUN_DIR", self.path("run"));
        cmd
    }

    /// The same with `--key-file KEY` too.
    fn keyed(&self, args: &[&str], extra: &[&str]) -> Run {
        let key = self.key();
        let mut all = vec!["--key-file", s(&key)];
        all.extend_from_slice(extra);
        self.at_store(args, &all)
    }

    /// Imports a mixed image of `mib` MiB as the next version of `parcel`;
    /// returns the image's path.
    fn import_as(&self, parcel: &str, mib: u64, seed: u64) -> PathBuf {
        let image = self.path(&format!("image-{parcel}-{seed}"));
        write_mixed_image(&image, mib << 20, seed);
        self.on("import", parcel, &[s(&image)]).ok();
        image
    }

    fn secret(&self) -> Secret {
        Secret::from_key_file_bytes(&std::fs::read(self.key()).unwrap()).unwrap()
    }

    /// This process's handle on a file:// store (for leases and engines).
    fn fetcher_store(&self) -> Store {
        Store::open(&self.store, &Default::default()).unwrap()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A lease object as `fetcher::Lease` writes it, put straight into the
/// directory that holds store `root` (a file:// store, or s3s-fs's
/// bucket): generation 2, after the one the parcel's only import took and
/// released.
fn write_lease(root: &Path, parcel: &str, host: &str) {
    let dir = root.join(format!("parcels/{parcel}/leases"));
    assert!(dir.join("00000000000000000001.released").exists());
    std::fs::write(
        dir.join("00000000000000000002"),
        format!("host={host}\npid=4242\nsince=1800000000\nnonce=00ff\n"),
    )
    .unwrap();
}

fn ls_on(env: &Env, root: &Path) {
    env.import_as("vm", 4, 1);
    env.import_as("vm", 4, 2);
    env.import_as("db", 8, 3);
    write_lease(root, "db", "host-x");

    let j = env.keyed(&["ls", "--json"], &[]).ok().json();
    assert_eq!(j["key"], true, "{j}");
    let rows = j["parcels"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{j}");
    let (db, vm) = (&rows[0], &rows[1]);
    assert_eq!(db["parcel"], "db");
    assert_eq!((&db["head"], &db["versions"]), (&1.into(), &1.into()));
    assert_eq!(db["disk_size"], 8 << 20);
    assert_eq!(db["memory_image"], false);
    assert_eq!(db["free"], false);
    assert_eq!(db["lease"]["host"], "host-x");
    assert_eq!(db["lease"]["pid"], 4242);
    assert_eq!(db["lease"]["since"], 1_800_000_000);
    assert_eq!(db["lease"]["since_utc"], "2027-01-15 08:00:00Z");
    assert_eq!(vm["parcel"], "vm");
    assert_eq!(
        (&vm["head"], &vm["versions"], &vm["oldest"]),
        (&2.into(), &2.into(), &1.into())
    );
    assert_eq!(vm["disk_size"], 4 << 20);
    assert_eq!(vm["free"], true);
    assert!(vm["lease"].is_null());

    let text = env.keyed(&["ls"], &[]).ok().stdout();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("PARCEL"), "{text}");
    assert!(
        lines[1].starts_with("db") && lines[1].contains("host-x (pid 4242)"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("vm") && lines[2].ends_with("free"),
        "{text}"
    );
    assert!(
        lines[2].contains("1-2") && lines[2].contains("4.0 MiB"),
        "{text}"
    );

    // Without a key: what needs none, and a note saying what is missing.
    let r = env.at_store(&["ls", "--json"], &[]).ok();
    let j = r.json();
    assert_eq!(j["key"], false);
    assert!(j["note"].as_str().unwrap().contains("no key"), "{j}");
    let rows = j["parcels"].as_array().unwrap();
    assert_eq!(rows[1]["head"], 2);
    assert!(rows[1]["disk_size"].is_null() && rows[1]["memory_image"].is_null());
    assert_eq!(rows[0]["lease"]["host"], "host-x");
    let r = env.at_store(&["ls"], &[]).ok();
    assert!(r.stderr().contains("no key given"), "{}", r.stderr());
}

#[test]
fn ls_on_a_file_store() {
    let env = Env::file();
    ls_on(&env, &env.path("store"));

    // Another key: each parcel with its error, exit 1 (like log).
    let other = env.path("other.key");
    env.isr(&["keygen", s(&other)]).ok();
    let r = env
        .at_store(&["ls", "--json", "--key-file", s(&other)], &[])
        .fails();
    let j = r.json();
    for row in j["parcels"].as_array().unwrap() {
        assert!(row["error"].as_str().unwrap().contains("key"), "{j}");
    }
    assert!(
        r.stderr().contains("cannot read HEAD of parcel db"),
        "{}",
        r.stderr()
    );

    // An http mirror cannot list: a clear error.
    let http = super::support::HttpServer::start(&env.path("store"));
    let mirror = Env::with(tempfile::tempdir().unwrap(), http.url(), vec![]);
    let r = mirror.at_store(&["ls"], &[]).fails();
    assert!(
        r.stderr().contains("cannot list its objects"),
        "{}",
        r.stderr()
    );
}

#[test]
fn ls_on_an_s3_store() {
    let server = S3Server::start();
    let env = Env::s3(&server, "lsprefix");
    ls_on(&env, &server.bucket_dir().join("lsprefix"));
}

/// A "daemon" for parcel `parcel` under `run` that answers one status.
fn fake_daemon(run: &Path, parcel: &str) -> std::thread::JoinHandle<()> {
    std::fs::create_dir_all(run).unwrap();
    let listener = UnixListener::bind(run.join(format!("{parcel}.sock"))).unwrap();
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(conn.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut w = conn;
        let _ = writeln!(w, r#"{{"parcel":"vm","device":"/dev/ublkb7","pid":4242}}"#);
    })
}

/// rollback --to 1 after two imports: version 3 exports bit-exact as
/// version 1's image; --to HEAD publishes nothing; a bad N, a lease held
/// elsewhere and a parcel resumed here are refused, naming the cause.
#[test]
fn rollback_publishes_an_old_version_again() {
    let env = Env::file();
    let a = env.import_as("vm", 4, 11);
    env.import_as("vm", 4, 12);
    let j = env
        .keyed(&["rollback", "vm", "--to", "1", "--json"], &[])
        .ok()
        .json();
    assert_eq!(
        (&j["version"], &j["from"], &j["head"]),
        (&3.into(), &1.into(), &2.into()),
        "{j}"
    );
    let out = env.path("v3.img");
    env.on("export", "vm", &["--version", "3", s(&out)]).ok();
    assert_eq!(sha256(&out), sha256(&a));
    let log = env.on("log", "vm", &["--json"]).ok().json();
    assert_eq!(log[0]["version"], 3);
    assert_eq!(log[0]["parent"], 2);

    let r = env.keyed(&["rollback", "vm", "--to", "3"], &[]).ok();
    assert!(
        r.stdout().contains("nothing to roll back"),
        "{}",
        r.stdout()
    );
    let r = env.keyed(&["rollback", "vm", "--to", "9"], &[]).fails();
    assert!(r.stderr().contains("has no version 9"), "{}", r.stderr());

    // Leased by another host: refused, nothing published.
    let store = env.fetcher_store();
    let rt = rt();
    let lease = rt
        .block_on(Lease::acquire(&store, "vm", "other-host", 1, None, false))
        .unwrap();
    // A conflict, as the README says: exit 4.
    let r = env.keyed(&["rollback", "vm", "--to", "1"], &[]).exits(4);
    assert!(
        r.stderr().contains("in use by host other-host"),
        "{}",
        r.stderr()
    );
    rt.block_on(lease.release()).unwrap();

    // Resumed on this host (its daemon answers): refused.
    let daemon = fake_daemon(&env.path("run"), "vm");
    let r = env.keyed(&["rollback", "vm", "--to", "1"], &[]).fails();
    assert!(
        r.stderr().contains("resumed on this host") && r.stderr().contains("/dev/ublkb7"),
        "{}",
        r.stderr()
    );
    daemon.join().unwrap();
    assert_eq!(rt.block_on(store.head("vm")).unwrap(), Some(3));
}

/// Dirty chunks made through the engine; discard without --yes and no
/// terminal refuses and changes nothing; with --yes the cache is the base
/// version again, `synced` is gone and the lease is released; refused
/// while the cache is in use; on a terminal it asks.
#[test]
fn discard_drops_local_changes() {
    let env = Env::file();
    let image = env.import_as("vm", 2, 21);
    let cache = env.path("cache");
    let parcel = Parcel::new(env.fetcher_store(), "vm", env.secret()).unwrap();
    let options = fetcher::EngineOptions {
        cache_root: cache.clone(),
        prefetch: false,
        ..Default::default()
    };
    let engine = Engine::open(parcel.clone(), options.clone()).unwrap();
    let chunk = engine.geometry().chunk_size() as usize;
    engine.write(0, &vec![0xaa; chunk]).unwrap();
    engine.write(3 * chunk as u64 + 7, b"changed").unwrap();
    engine.flush().unwrap();
    let dir = engine.cache_dir();

    let discard = |extra: &[&str]| {
        let c = s(&cache);
        let mut args = vec!["discard", "vm"];
        args.extend_from_slice(extra);
        env.at_store(&args, &["--cache-dir", c])
    };
    let r = discard(&["--yes"]).fails();
    assert!(
        r.stderr().contains("resumed on this host"),
        "{}",
        r.stderr()
    );
    drop(engine);

    let rt = rt();
    let lease = rt
        .block_on(Lease::acquire(
            parcel.store(),
            "vm",
            "this-host",
            1,
            None,
            false,
        ))
        .unwrap();
    std::fs::write(dir.join("lease"), &lease.info().nonce).unwrap();
    std::fs::write(dir.join("synced"), b"0\n").unwrap();

    let r = discard(&[]).fails();
    assert!(
        r.stderr().contains("2 dirty chunks") && r.stderr().contains("without --yes"),
        "{}",
        r.stderr()
    );
    let d = fetcher::engine::Discard::open(&env.store, "vm", &cache).unwrap();
    assert_eq!(d.dirty().0, 2, "nothing changed");
    drop(d);
    assert!(dir.join("synced").exists() && dir.join("lease").exists());

    // On a terminal it asks; "n" keeps everything.
    let asked = on_terminal(&env, &cache, "n\n");
    assert!(asked.contains("discard 2 dirty chunks ("), "{asked}");
    assert!(
        asked.contains("[y/N]") && asked.contains("not confirmed"),
        "{asked}"
    );

    let j = discard(&["--yes", "--json"]).ok().json();
    assert_eq!(j["discarded_chunks"], 2, "{j}");
    assert_eq!(j["discarded_bytes"], 2 * chunk);
    assert_eq!(j["lease"], "released");
    assert_eq!(j["synced_removed"], true);
    assert!(!dir.join("synced").exists() && !dir.join("lease").exists());
    assert!(
        rt.block_on(Lease::holder_of(parcel.store(), "vm"))
            .unwrap()
            .is_none()
    );
    let engine = Engine::open(parcel, options).unwrap();
    assert_eq!(engine.stats().dirty_chunks, 0);
    let mut back = vec![0u8; engine.geometry().disk_size() as usize];
    engine.read(0, &mut back).unwrap();
    assert_eq!(
        back,
        std::fs::read(&image).unwrap(),
        "the base version again"
    );
    drop(engine);

    let r = discard(&[]).ok();
    assert!(r.stdout().contains("nothing dirty"), "{}", r.stdout());
}

/// Runs `isr discard vm` with a terminal on stdin (through script(1)),
/// typing `answer`; returns what the terminal showed.
fn on_terminal(env: &Env, cache: &Path, answer: &str) -> String {
    let line = format!(
        "{} discard vm --store {} --cache-dir {}",
        env!("CARGO_BIN_EXE_isr"),
        env.store,
        cache.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env_remove("ISR_STORE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1), from util-linux");
    let mut stdin = child.stdin.take().unwrap();
    // Typed once the question is up (the terminal keeps it until read).
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(answer.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A store that cannot be reached: the local changes are dropped, the
/// lease cannot be released: said, the nonce kept, exit 1.
#[test]
fn discard_keeps_the_lease_nonce_when_the_store_is_unreachable() {
    let mut server = S3Server::start();
    let env = Env::s3(&server, "discard");
    env.import_as("vm", 2, 31);
    let cache = env.path("cache");
    env.on("hoard", "vm", &["--cache-dir", s(&cache)]).ok();
    let dir = fetcher::local::cache::cache_dir(&cache, &env.store, "vm");
    std::fs::write(dir.join("lease"), "0123abcd").unwrap();
    server.stop();
    let mut cmd = env.store_command(&["discard", "vm", "--yes"], &["--cache-dir", s(&cache)]);
    cmd.env("ISR_RETRY_TIMEOUT", "1");
    let r = Run {
        out: cmd.output().unwrap(),
    }
    .fails();
    assert!(
        r.stderr().contains("could not be released") && r.stderr().contains("again"),
        "{}",
        r.stderr()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("lease")).unwrap(),
        "0123abcd"
    );
}

/// gc at the command line: a grace not above the refresh age is refused;
/// --dry-run changes nothing and reports what gc then removes; removed
/// versions leave log without errors and are named by export; shared
/// chunks keep the other parcel whole; a key that does not open every
/// parcel stops it, naming the parcel.
#[test]
fn gc_removes_old_versions_and_their_chunks() {
    let env = Env::file();
    // (write_mixed_image takes seed | 1: odd seeds differ)
    env.import_as("vm", 4, 41);
    env.import_as("vm", 4, 43);
    let head = env.import_as("vm", 4, 45);
    env.import_as("db", 4, 41); // shares every chunk of vm's version 1
    let gc = |extra: &[&str]| {
        let key = env.key();
        let mut args = vec!["gc", "--key-file", s(&key)];
        args.extend_from_slice(extra);
        let mut cmd = env.store_command(&args, &[]);
        cmd.env("ISR_CHUNK_REFRESH_SECS", "1");
        Run {
            out: cmd.output().unwrap(),
        }
    };
    let r = gc(&["--keep", "1", "--grace", "1"]).fails();
    assert!(r.stderr().contains("refresh age"), "{}", r.stderr());
    let r = gc(&["--keep", "0"]).fails();
    assert!(r.stderr().contains("at least 1"), "{}", r.stderr());

    std::thread::sleep(Duration::from_millis(3300));
    let dry = gc(&["--keep", "1", "--grace", "2", "--dry-run", "--json"])
        .ok()
        .json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["removed_versions"], 2, "{dry}");
    let removed = dry["removed_chunks"].as_u64().unwrap();
    assert!(removed > 0, "{dry}");
    assert_eq!(
        env.on("log", "vm", &["--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let j = gc(&["--keep", "1", "--grace", "2", "--json"]).ok().json();
    assert_eq!(j["dry_run"], false);
    assert_eq!(j["removed_chunks"], removed, "as the dry run said: {j}");
    assert_eq!(j["removed_bytes"], dry["removed_bytes"]);
    let vm = j["parcels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["parcel"] == "vm")
        .unwrap();
    assert_eq!(vm["removed_versions"], serde_json::json!([1, 2]));
    assert_eq!(vm["oldest_kept"], 3);

    let log = env.on("log", "vm", &["--json"]).ok().json();
    assert_eq!(log.as_array().unwrap().len(), 1, "{log}");
    assert_eq!(log[0]["version"], 3);
    let r = env
        .on("export", "vm", &["--version", "1", s(&env.path("v1"))])
        .fails();
    assert!(r.stderr().contains("removed by isr gc"), "{}", r.stderr());
    env.on("verify", "vm", &[]).ok();
    env.on("verify", "db", &[]).ok();
    // HEAD without its hint.
    std::fs::remove_file(env.path("store/parcels/vm/HEAD")).unwrap();
    let out = env.path("head.img");
    env.on("export", "vm", &[s(&out)]).ok();
    assert_eq!(sha256(&out), sha256(&head));

    let text = gc(&["--keep", "1", "--grace", "2"]).ok().stdout();
    assert!(
        text.contains("parcel vm: HEAD 3; no version to remove"),
        "{text}"
    );
    assert!(text.contains("removed 0 (0.0 MiB)"), "{text}");
    // Keeping more than there are names only what is there.
    let text = gc(&["--keep", "5", "--dry-run"]).ok().stdout();
    assert!(
        text.contains("parcel vm: HEAD 3; no version to remove (kept version 3)"),
        "{text}"
    );

    // A parcel of another key: gc stops, naming it.
    let other = env.path("other.key");
    env.isr(&["keygen", s(&other)]).ok();
    let image = env.path("image-other");
    write_mixed_image(&image, 1 << 20, 5);
    let (store, k) = (env.store.clone(), s(&other).to_owned());
    env.isr(&[
        "import",
        s(&image),
        "--store",
        &store,
        "--parcel",
        "zz",
        "--key-file",
        &k,
    ])
    .ok();
    let r = gc(&["--keep", "1", "--grace", "2", "--json"]).fails();
    let msg = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("parcel zz") && msg.contains("removed no chunk"),
        "{msg}"
    );
    assert!(msg.contains("does not open every parcel"), "{msg}");
}
