//! The proxy's check of its own accuracy: a small server on 127.0.0.1
//! behind a [`ShapingProxy`], pinged for the RTT and pushed bytes through
//! both ways (over several connections at once, sharing the cap), achieved
//! against what was set.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::shaper::{Shape, ShapingProxy};

/// What [`run`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// What was set.
    pub shape: Shape,
    /// Median round trip of a one-byte ping on an open connection.
    pub rtt: Duration,
    /// The same straight to the server, without the proxy.
    pub base_rtt: Duration,
    /// Time from connect to the first reply (one RTT for the handshake
    /// plus one for the ping).
    pub connect_rtt: Duration,
    /// Server → client, bytes/s, all connections together.
    pub down: f64,
    /// Client → server, bytes/s.
    pub up: f64,
    /// Connections used for each transfer.
    pub connections: usize,
    /// Bytes moved each way.
    pub bytes: u64,
}

impl Report {
    /// The worst relative error of the RTT (beyond 1 ms) and both rates
    /// against the shape (rates only when capped).
    pub fn worst_error(&self) -> f64 {
        let mut worst = 0.0f64;
        if !self.shape.rtt.is_zero() {
            // Beyond the timer's millisecond.
            let set = self.shape.rtt.as_secs_f64();
            let off = ((self.rtt.as_secs_f64() - set).abs() - 1e-3).max(0.0);
            worst = worst.max(off / set);
        }
        if let Some(rate) = self.shape.rate {
            for got in [self.down, self.up] {
                worst = worst.max((got - rate as f64).abs() / rate as f64);
            }
        }
        worst
    }

    /// The report as a JSON object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "set_rtt_ms": self.shape.rtt.as_secs_f64() * 1e3,
            "set_rate_bytes_per_s": self.shape.rate,
            "rtt_ms": self.rtt.as_secs_f64() * 1e3,
            "base_rtt_ms": self.base_rtt.as_secs_f64() * 1e3,
            "connect_rtt_ms": self.connect_rtt.as_secs_f64() * 1e3,
            "down_bytes_per_s": self.down,
            "up_bytes_per_s": self.up,
            "connections": self.connections,
            "bytes": self.bytes,
            "worst_error": self.worst_error(),
        })
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mbit = |b: f64| b * 8.0 / 1e6;
        let set =
            |r: Option<u64>| r.map_or("unlimited".to_owned(), |r| format!("{:.1}", mbit(r as f64)));
        writeln!(
            f,
            "RTT        set {:7.1} ms   achieved {:7.1} ms (without the proxy {:.1} ms; connect + first reply {:.1} ms)",
            self.shape.rtt.as_secs_f64() * 1e3,
            self.rtt.as_secs_f64() * 1e3,
            self.base_rtt.as_secs_f64() * 1e3,
            self.connect_rtt.as_secs_f64() * 1e3
        )?;
        writeln!(
            f,
            "down       set {:>7} Mbit/s achieved {:7.1} Mbit/s ({} connections, {:.1} MB)",
            set(self.shape.rate),
            mbit(self.down),
            self.connections,
            self.bytes as f64 / 1e6
        )?;
        write!(
            f,
            "up         set {:>7} Mbit/s achieved {:7.1} Mbit/s; worst error {:.1} %",
            set(self.shape.rate),
            mbit(self.up),
            self.worst_error() * 100.0
        )
    }
}

/// A server for the self-test: per connection, one command byte:
/// `p` echoes every byte back; `d` + 8-byte length sends that many bytes;
/// `u` + 8-byte length reads that many and answers with the seconds
/// between the first and the last byte (an f64).
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens (on 127.0.0.1).
    pub addr: SocketAddr,
}

impl TestServer {
    /// Starts it on a free port; it serves until the process ends.
    pub fn start() -> std::io::Result<TestServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || {
                    let _ = serve(conn);
                });
            }
        });
        Ok(TestServer { addr })
    }
}

fn serve(mut c: TcpStream) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut cmd = [0u8; 1];
    c.read_exact(&mut cmd)?;
    match cmd[0] {
        b'p' => {
            let mut b = [0u8; 1];
            while c.read(&mut b)? == 1 {
                c.write_all(&b)?;
            }
        }
        b'd' => {
            let n = read_len(&mut c)?;
            let buf = vec![0xa5u8; 256 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                c.write_all(&buf[..k])?;
                left -= k as u64;
            }
        }
        b'u' => {
            let n = read_len(&mut c)?;
            let secs = receive(&mut c, n)?;
            c.write_all(&secs.to_le_bytes())?;
        }
        _ => {}
    }
    Ok(())
}

fn read_len(c: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    c.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads `n` bytes; returns the seconds from the end of the first read to
/// the last byte (so the latency before the first byte is not counted),
/// and the bytes after that first read.
fn receive_timed(c: &mut TcpStream, n: u64) -> std::io::Result<(f64, u64)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut first: Option<(Instant, u64)> = None;
    while got < n {
        let want = (n - got).min(buf.len() as u64) as usize;
        let k = c.read(&mut buf[..want])?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += k as u64;
        first.get_or_insert((Instant::now(), got));
    }
    let (t, before) = first.unwrap_or((Instant::now(), 0));
    Ok((t.elapsed().as_secs_f64(), n - before))
}

fn receive(c: &mut TcpStream, n: u64) -> std::io::Result<f64> {
    let (secs, after) = receive_timed(c, n)?;
    // Scale to the whole transfer at the rate seen after the first read.
    Ok(if after == 0 {
        0.0
    } else {
        secs * n as f64 / after as f64
    })
}

/// Measures a proxy with `shape` in front of a local test server: the
/// median of `pings` one-byte round trips, then `bytes` down and `bytes`
/// up, each split over `connections` connections at once.
pub fn run(shape: Shape, bytes: u64, connections: usize, pings: usize) -> std::io::Result<Report> {
    let server = TestServer::start()?;
    let proxy = ShapingProxy::start(server.addr, shape)?;
    measure(&proxy, server.addr, bytes, connections, pings)
}

/// [`run`] through an existing proxy in front of the test server at
/// `server`.
fn measure(
    proxy: &ShapingProxy,
    server: SocketAddr,
    bytes: u64,
    connections: usize,
    pings: usize,
) -> std::io::Result<Report> {
    let addr = proxy.addr();
    let (_, base_rtt) = ping(server, pings)?;
    let (connect_rtt, rtt) = ping(addr, pings)?;

    let connections = connections.max(1);
    let each = bytes / connections as u64;
    // Down: every connection asks for its share at once; the rate is the
    // slowest connection's (they all share one cap).
    let down_secs = parallel(connections, |_| download(addr, each))?;
    let up_secs = parallel(connections, |_| upload(addr, each))?;
    let total = (each * connections as u64) as f64;
    Ok(Report {
        shape: proxy.shape(),
        rtt,
        base_rtt,
        connect_rtt,
        down: total / down_secs.max(1e-9),
        up: total / up_secs.max(1e-9),
        connections,
        bytes: each * connections as u64,
    })
}

/// Connects to `addr` and pings the test server: returns the time from
/// connect to the first reply, and the median of `pings` round trips after.
pub fn ping(addr: SocketAddr, pings: usize) -> std::io::Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    c.write_all(b"p")?;
    let mut b = [0u8; 1];
    c.write_all(&[0])?;
    c.read_exact(&mut b)?;
    let first = started.elapsed();
    let mut rtts = Vec::new();
    for i in 0..pings.max(1) {
        let t = Instant::now();
        c.write_all(&[i as u8])?;
        c.read_exact(&mut b)?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    Ok((first, rtts[rtts.len() / 2]))
}

/// Asks the test server at `addr` for `n` bytes; returns the seconds they
/// took to arrive, the wait for the first read left out (scaled up to all
/// `n` bytes at the rate after it).
pub fn download(addr: SocketAddr, n: u64) -> std::io::Result<f64> {
    let mut c = TcpStream::connect(addr)?;
    let mut req = vec![b'd'];
    req.extend_from_slice(&n.to_le_bytes());
    c.write_all(&req)?;
    receive(&mut c, n)
}

/// Sends `n` bytes to the test server at `addr`; returns the seconds it
/// took to receive them, measured there as [`download`] does.
pub fn upload(addr: SocketAddr, n: u64) -> std::io::Result<f64> {
    let mut c = TcpStream::connect(addr)?;
    let mut req = vec![b'u'];
    req.extend_from_slice(&n.to_le_bytes());
    c.write_all(&req)?;
    let buf = vec![0x5au8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        c.write_all(&buf[..k])?;
        left -= k as u64;
    }
    let mut s = [0u8; 8];
    c.read_exact(&mut s)?;
    Ok(f64::from_le_bytes(s))
}

/// Runs `f` on `n` threads at once; returns the largest result.
pub fn parallel(
    n: usize,
    f: impl Fn(usize) -> std::io::Result<f64> + Sync,
) -> std::io::Result<f64> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        let mut worst = 0.0f64;
        for h in handles {
            let secs = h
                .join()
                .map_err(|_| std::io::Error::other("a self-test thread panicked"))??;
            worst = worst.max(secs);
        }
        Ok(worst)
    })
}
