//! What the scenarios stand on: an S3 server (s3s-fs) on 127.0.0.1, stores
//! on it (straight, or through a shaping proxy), the key, images.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fetcher::{Store, StoreOptions};
use format::Secret;

pub const BUCKET: &str = "isr-bench";
pub const ACCESS_KEY: &str = "isr-bench-access";
pub const SECRET_KEY: &str = "isr-bench-secret-key";
pub const MIB: u64 = 1 << 20;
const KEY: [u8; 32] = [0x42; 32];

/// The AWS_* variables for the S3 clients (the engine in this process and
/// the isr child processes).
pub fn aws_env() -> [(&'static str, &'static str); 4] {
    [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
    ]
}

pub fn secret() -> Secret {
    Secret::from_key_file_bytes(&KEY).expect("a 32-byte key")
}

/// Writes the key file the isr CLI reads.
pub fn write_key_file(path: &Path) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, &KEY)
}

/// s3s-fs on 127.0.0.1 with one bucket, stopped when dropped.
pub struct S3Server {
    pub addr: SocketAddr,
    pub root: tempfile::TempDir,
    child: Child,
}

impl S3Server {
    pub fn start(program: &Path, under: &Path) -> Result<S3Server, String> {
        let root = tempfile::tempdir_in(under).map_err(|e| e.to_string())?;
        std::fs::create_dir(root.path().join(BUCKET)).map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let mut child = Command::new(program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                let _ = child.kill();
                return Err("s3s-fs did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(S3Server { addr, root, child })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// CPU seconds the server has used so far (from /proc; 0 if unknown).
    pub fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.child.id())
    }

    /// The directory holding the bucket's objects.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The store `s3://isr-bench/` at `endpoint`, opened as the CLI opens it.
pub fn store(endpoint: &str) -> Result<Store, String> {
    let options = StoreOptions {
        endpoint: Some(endpoint.to_owned()),
        ..Default::default()
    };
    Store::open(&format!("s3://{BUCKET}/"), &options).map_err(|e| e.to_string())
}

/// A small deterministic generator (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            w.copy_from_slice(&x[..w.len()]);
        }
    }
}

/// Writes an image of `mib` MiB: per MiB, random bytes with probability
/// `random` (out of 4), else text (compressible). No holes: every chunk is
/// data to move.
pub fn write_image(path: &Path, mib: u64, random: u64, seed: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    let mut rng = Rng(seed | 1);
    let words: [&[u8]; 6] = [
        b"suspend ",
        b"resume ",
        b"parcel ",
        b"chunk ",
        b"\n",
        b"kernel ",
    ];
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..mib {
        if rng.next() % 4 < random {
            rng.fill(&mut buf);
        } else {
            let mut pos = 0;
            while pos < buf.len() {
                let w = words[rng.next() as usize % words.len()];
                let n = w.len().min(buf.len() - pos);
                buf[pos..pos + n].copy_from_slice(&w[..n]);
                pos += n;
            }
        }
        f.write_all_at(&buf, i * MIB)?;
    }
    f.sync_all()
}

/// The sizes of the chunk objects under the bucket directory, by path.
pub fn chunk_files(bucket: &Path) -> std::collections::BTreeMap<PathBuf, u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut dirs = vec![bucket.join("chunks")];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(e.path());
            } else {
                out.insert(e.path(), meta.len());
            }
        }
    }
    out
}

/// The isr binary: next to this one (both built by `cargo build
/// --release`), or `$ISR_BIN`.
pub fn isr_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ISR_BIN") {
        return p.into();
    }
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("isr")
}

/// A program on PATH or in ~/.cargo/bin.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// CPU seconds (user + system) process `pid` has used, from /proc.
pub fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name (which may hold spaces).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// CPU seconds used by waited-for children of this process so far.
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage, RUSAGE_CHILDREN is a valid who.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
