//! Test support shared by the integration tests of every crate: real servers
//! on 127.0.0.1 (s3s-fs for S3, Python's http.server for an http mirror), a
//! fault-injecting TCP proxy, and generated disk images.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "isr-test";
pub const ACCESS_KEY: &str = "isr-test-access";
pub const SECRET_KEY: &str = "isr-test-secret-key";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on 127.0.0.1:{port} within 20 s");
}

/// Finds a program on PATH, in ~/.cargo/bin or in ~/.local/bin.
fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
        dirs.push(Path::new(&home).join(".local/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// A real S3 server (s3s-fs) on 127.0.0.1, stopped when dropped.
pub struct S3Server {
    pub port: u16,
    pub root: tempfile::TempDir,
    child: Child,
}

impl S3Server {
    /// Starts s3s-fs with one bucket, [`BUCKET`]. Panics (fails the test)
    /// when s3s-fs is not installed, saying how to install it.
    pub fn start() -> S3Server {
        let program = find_program("s3s-fs").unwrap_or_else(|| {
            panic!(
                "s3s-fs is not installed; the S3 tests need it. Install it with \
                 `scripts/setup` or `cargo install s3s-fs --version 0.14.1 --features binary --locked`"
            )
        });
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = free_port();
        let child = Self::spawn(&program, port, root.path());
        S3Server { port, root, child }
    }

    fn spawn(program: &Path, port: u16, root: &Path) -> Child {
        let mut child = Command::new(program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        wait_for_port(port, &mut child, "s3s-fs");
        child
    }

    /// Stops the server (its data stays).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        let program = find_program("s3s-fs").expect("s3s-fs");
        self.child = Self::spawn(&program, self.port, self.root.path());
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory holding the bucket's objects.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }

    /// Environment for a client of this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        s3_env(&self.endpoint())
    }
}

/// AWS_* variables pointing an S3 client at `endpoint` with the test keys.
pub fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", endpoint.into()),
        ("AWS_ALLOW_HTTP", "true".into()),
    ]
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// LocalBucket (PyPI `localbucket`), an S3 server on 127.0.0.1 whose
/// conditional create is atomic: it writes a temporary file and `link()`s it
/// into place, which fails if the object exists. s3s-fs checks and then
/// writes, so racing creates can both succeed there. It does not check
/// credentials. Stopped when dropped.
pub struct LocalBucketServer {
    pub port: u16,
    pub root: tempfile::TempDir,
    child: Child,
}

impl LocalBucketServer {
    /// Starts it with one bucket, [`BUCKET`]. Panics (fails the test) when
    /// it is not installed, saying how to install it.
    pub fn start() -> LocalBucketServer {
        let program = find_program("localbucket").unwrap_or_else(|| {
            panic!(
                "localbucket is not installed; the atomic-S3 tests need it. Install it with \
                 `scripts/setup` or `pip install localbucket==1.2.1`"
            )
        });
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = free_port();
        let mut child = Command::new(program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start localbucket");
        wait_for_port(port, &mut child, "localbucket");
        LocalBucketServer { port, root, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for LocalBucketServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Python's http.server serving `dir` read-only on 127.0.0.1.
pub struct HttpServer {
    pub port: u16,
    child: Child,
}

impl HttpServer {
    pub fn start(dir: &Path) -> HttpServer {
        let port = free_port();
        let mut child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed for the http mirror tests");
        wait_for_port(port, &mut child, "python3 -m http.server");
        HttpServer { port, child }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy on 127.0.0.1 that answers the first `failures` connections
/// with `503 Service Unavailable` and forwards the rest to `backend`.
pub struct FaultProxy {
    pub port: u16,
    pub failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(backend: u16, failures: usize) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (failed.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut client) = conn else { continue };
                if f.load(Ordering::Relaxed) < failures {
                    f.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 4096];
                    let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = client.read(&mut buf);
                    let _ = client.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", backend)) else {
                    continue;
                };
                pipe(client, server);
            }
        });
        FaultProxy { port, failed, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    copy(a, b2);
    copy(b, a2);
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Writes a disk image of `size` bytes (a multiple of 1 MiB) mixing, per
/// MiB: random bytes, holes, repeats of earlier MiBs, and text; the last
/// 1000 bytes are data. Deterministic for a seed.
pub fn write_mixed_image(path: &Path, size: u64, seed: u64) {
    const MIB: usize = 1 << 20;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; MIB];
    let words: [&[u8]; 6] = [
        b"suspend ",
        b"resume ",
        b"parcel ",
        b"chunk ",
        b"\n",
        b"kernel ",
    ];
    for i in 0..(size as usize / MIB) {
        let off = (i * MIB) as u64;
        match rand() % 4 {
            0 => {
                for w in buf.chunks_exact_mut(8) {
                    w.copy_from_slice(&rand().to_le_bytes());
                }
                f.write_all_at(&buf, off).unwrap();
            }
            1 => {} // hole
            2 if i > 0 => {
                let from = (rand() as usize % i * MIB) as u64;
                f.read_exact_at(&mut buf, from).unwrap();
                f.write_all_at(&buf, off).unwrap();
            }
            _ => {
                let mut pos = 0;
                while pos < MIB {
                    let w = words[rand() as usize % words.len()];
                    let n = w.len().min(MIB - pos);
                    buf[pos..pos + n].copy_from_slice(&w[..n]);
                    pos += n;
                }
                f.write_all_at(&buf, off).unwrap();
            }
        }
    }
    f.write_all_at(&[0x5a; 1000], size - 1000).unwrap();
}

/// SHA-256 of a file, through `sha256sum`.
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// One completed system call from an `strace -f -y` log.
#[derive(Debug, Clone)]
pub struct Syscall {
    pub name: String,
    /// The quoted path arguments, in order.
    pub paths: Vec<String>,
    /// The path of the first file-descriptor argument (shown by `-y`).
    pub fd_path: Option<PathBuf>,
}

/// The successful system calls of an `strace -f -y` log, in the order they
/// completed (an interrupted call is joined with its resumption).
pub fn strace_events(log: &str) -> Vec<Syscall> {
    let mut pending: std::collections::HashMap<&str, String> = Default::default();
    let mut out = Vec::new();
    for line in log.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(start) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(pid, start.trim_end().to_owned());
            continue;
        }
        let call = match rest.strip_prefix("<... ") {
            Some(resumed) => match (resumed.split_once("resumed>"), pending.remove(pid)) {
                (Some((_, tail)), Some(start)) => format!("{start}{tail}"),
                _ => continue,
            },
            None => rest.to_owned(),
        };
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        let Some((args, result)) = args.rsplit_once(" = ") else {
            continue;
        };
        if result.trim().starts_with('-') || result.trim().starts_with('?') {
            continue;
        }
        let paths = args
            .split('"')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, p)| p.to_owned())
            .collect();
        let fd_path = args
            .split_once('<')
            .filter(|(fd, _)| fd.chars().all(|c| c.is_ascii_digit()) && !fd.is_empty())
            .and_then(|(_, p)| p.split_once('>'))
            .map(|(p, _)| PathBuf::from(p));
        out.push(Syscall {
            name: name.to_owned(),
            paths,
            fd_path,
        });
    }
    out
}

/// A file system on a block device, for what tmpfs cannot show (direct
/// I/O: tmpfs keeps file data in memory whatever the flags): an ext4 on a
/// loop device over a sparse file. Needs root and a loop device.
pub struct Ext4Fs {
    dir: tempfile::TempDir,
    device: String,
}

impl Ext4Fs {
    pub fn new(mib: u64) -> Ext4Fs {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m");
        std::fs::create_dir_all(&m).unwrap();
        let back = dir.path().join("back");
        sh(&format!("truncate -s {mib}M {}", back.display()));
        let device = sh(&format!("losetup -f --show {}", back.display()));
        let fs = Ext4Fs { dir, device };
        sh(&format!("mkfs.ext4 -q -F {}", fs.device));
        sh(&format!("mount {} {}", fs.device, m.display()));
        fs
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("m")
    }
}

impl Drop for Ext4Fs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// Runs `cmd` in a shell; its stdout, or a panic that says what failed.
fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{} (this test needs root and a loop device)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A small file system whose device fails writes once 4 MiB of data are
/// written: an ext4 on a loop device over a sparse file in a tmpfs with
/// that much room left. Writes land
/// in the page cache and fail at writeback, as on a failing or full disk;
/// Linux reports that to the first fsync only. Needs root (CI runs as root).
pub struct FailingFs {
    dir: tempfile::TempDir,
    device: String,
}

impl FailingFs {
    pub fn new() -> FailingFs {
        let dir = tempfile::tempdir().unwrap();
        let (t, m) = (dir.path().join("t"), dir.path().join("m"));
        std::fs::create_dir_all(&t).unwrap();
        std::fs::create_dir_all(&m).unwrap();
        sh(&format!(
            "mount -t tmpfs -o size=8m isr-test {}",
            t.display()
        ));
        sh(&format!("truncate -s 64M {}/back", t.display()));
        let device = sh(&format!("losetup -f --show {}/back", t.display()));
        let fs = FailingFs { dir, device };
        // No journal and no lazy initialisation: nothing writes to the
        // device in the background, so the room left is known. Then the
        // tmpfs is shrunk to what mkfs used plus 4 MiB.
        sh(&format!(
            "mkfs.ext4 -q -F -O ^has_journal -E lazy_itable_init=0 {}",
            fs.device
        ));
        sh(&format!(
            "mount -o errors=continue {} {}",
            fs.device,
            m.display()
        ));
        sh("sync");
        let used_kib: u64 = sh(&format!("du -k {}/back | cut -f1", t.display()))
            .parse()
            .unwrap();
        sh(&format!(
            "mount -o remount,size={}k {}",
            used_kib + 4096,
            t.display()
        ));
        fs
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("m")
    }
}

impl Drop for FailingFs {
    fn drop(&mut self) {
        let m = self.dir.path().join("m");
        let t = self.dir.path().join("t");
        let _ = Command::new("umount").arg("-l").arg(&m).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
        let _ = Command::new("umount").arg("-l").arg(&t).status();
    }
}
