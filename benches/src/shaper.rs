//! A TCP proxy on 127.0.0.1 that makes loopback behave like a WAN link
//! (the host kernel has no netem): a round-trip delay and a bandwidth cap
//! on everything between a client and a server.
//!
//! The model, per direction (client→server "up", server→client "down"):
//! bytes read from one side are first serialised onto the link — one
//! virtual clock per direction, **shared by every connection** through the
//! proxy (a token bucket in GCRA form), so N connections split the cap —
//! then arrive at the other side half the RTT later. A request/response
//! thus costs one RTT plus its serialisation time, and a new connection
//! costs one more RTT (the TCP handshake: its first bytes cannot leave
//! before the SYN/SYN-ACK round trip). The cap applies to each direction
//! separately, as on a full-duplex link. A reader does not read faster than
//! its direction's link drains, so what the proxy holds is at most the
//! bandwidth-delay product plus a few reads.
//!
//! The shape can be changed while connections are open
//! ([`ShapingProxy::set_shape`]): a benchmark prepares unshaped and then
//! measures over the shaped link. Bytes delivered each way are counted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Largest read forwarded as one unit.
const READ_SIZE: usize = 64 * 1024;
/// How late tokio's timer fires, about (it rounds up to its millisecond
/// tick): deliveries wake this much before they are due.
const TIMER_LATE: Duration = Duration::from_millis(1);
/// How much link time a reader keeps queued ahead (the timer's
/// granularity would otherwise leave the link idle between reads).
const READ_AHEAD: Duration = Duration::from_millis(10);

/// What the link looks like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Round-trip time added (half each way).
    pub rtt: Duration,
    /// Bandwidth cap in bytes per second, each direction, shared by all
    /// connections; `None`: unlimited.
    pub rate: Option<u64>,
}

impl Shape {
    /// No delay, no cap: a plain forwarding proxy.
    pub const NONE: Shape = Shape {
        rtt: Duration::ZERO,
        rate: None,
    };

    /// A link of `rate` bytes/s each way and `rtt`.
    pub fn new(rtt: Duration, rate: Option<u64>) -> Shape {
        Shape { rtt, rate }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rate {
            Some(r) => write!(f, "{} Mbit/s", r as f64 * 8.0 / 1e6)?,
            None => write!(f, "unlimited")?,
        }
        write!(f, ", RTT {} ms", self.rtt.as_secs_f64() * 1e3)
    }
}

/// Bytes delivered through the proxy so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Client → server.
    pub up: u64,
    /// Server → client.
    pub down: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Most connections open at once (see [`ShapingProxy::reset_max_open`]).
    pub max_open: u64,
}

/// One direction of the link: its virtual clock (when the last byte
/// handed to it has left).
#[derive(Debug)]
struct Link {
    busy_until: Mutex<Instant>,
}

impl Link {
    fn new() -> Link {
        Link {
            busy_until: Mutex::new(Instant::now()),
        }
    }

    /// Puts `n` bytes on the link, not before `ready` (a connection's
    /// first bytes wait for its handshake); returns when their last byte
    /// has left (never sooner than their serialisation from then).
    fn reserve(&self, n: usize, rate: Option<u64>, ready: Instant) -> Instant {
        let now = Instant::now().max(ready);
        let Some(rate) = rate.filter(|&r| r > 0) else {
            return now;
        };
        let mut busy = self.busy_until.lock().expect("link lock");
        *busy = (*busy).max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
        *busy
    }
}

/// How far ahead of the link a reader may read: enough that a late
/// timer does not leave the link idle, two reads at least.
fn read_ahead(rate: Option<u64>) -> Duration {
    match rate.filter(|&r| r > 0) {
        Some(r) => READ_AHEAD.max(Duration::from_secs_f64(2.0 * READ_SIZE as f64 / r as f64)),
        None => Duration::ZERO,
    }
}

#[derive(Debug)]
struct Shared {
    backend: SocketAddr,
    shape: RwLock<Shape>,
    links: [Link; 2],
    delivered: [AtomicU64; 2],
    connections: AtomicU64,
    open: AtomicU64,
    max_open: AtomicU64,
}

impl Shared {
    fn shape(&self) -> Shape {
        *self.shape.read().expect("shape lock")
    }
}

const UP: usize = 0;
const DOWN: usize = 1;

/// A running proxy: listens on 127.0.0.1 and forwards every connection to
/// its backend, shaped. Runs on a thread of its own; stops when dropped
/// (open connections are cut).
#[derive(Debug)]
pub struct ShapingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ShapingProxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `backend`.
    pub fn start(backend: SocketAddr, shape: Shape) -> std::io::Result<ShapingProxy> {
        Self::start_on("127.0.0.1:0".parse().expect("an address"), backend, shape)
    }

    /// Starts a proxy listening on `listen` in front of `backend`.
    pub fn start_on(
        listen: SocketAddr,
        backend: SocketAddr,
        shape: Shape,
    ) -> std::io::Result<ShapingProxy> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            backend,
            shape: RwLock::new(shape),
            links: [Link::new(), Link::new()],
            delivered: [AtomicU64::new(0), AtomicU64::new(0)],
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
            max_open: AtomicU64::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("shaping-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("shaping proxy: cannot listen on {addr}: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        () = accept_loop(listener, s) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(ShapingProxy {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The current shape.
    pub fn shape(&self) -> Shape {
        self.shared.shape()
    }

    /// Changes the shape; it applies to bytes read from now on, on open
    /// connections too.
    pub fn set_shape(&self, shape: Shape) {
        *self.shared.shape.write().expect("shape lock") = shape;
    }

    /// Bytes delivered each way and connections accepted so far.
    pub fn counters(&self) -> Counters {
        Counters {
            up: self.shared.delivered[UP].load(Ordering::Relaxed),
            down: self.shared.delivered[DOWN].load(Ordering::Relaxed),
            connections: self.shared.connections.load(Ordering::Relaxed),
            max_open: self.shared.max_open.load(Ordering::Relaxed),
        }
    }

    /// Starts counting the most connections open at once from those open
    /// now.
    pub fn reset_max_open(&self) {
        let open = self.shared.open.load(Ordering::Relaxed);
        self.shared.max_open.store(open, Ordering::Relaxed);
    }
}

impl Drop for ShapingProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or similar: wait and keep serving.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let open = shared.open.fetch_add(1, Ordering::Relaxed) + 1;
        shared.max_open.fetch_max(open, Ordering::Relaxed);
        let accepted = Instant::now();
        let s = shared.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(s.backend).await else {
                s.open.fetch_sub(1, Ordering::Relaxed);
                return; // the client sees the connection close
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = tokio::spawn(direction(cr, sw, s.clone(), UP, Some(accepted)));
            let down = tokio::spawn(direction(sr, cw, s.clone(), DOWN, None));
            let _ = tokio::join!(up, down);
            s.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Forwards one direction: reads, puts the bytes on the link, and hands
/// them to a writer that delivers each read when it is due. `handshake`:
/// the connection's accept time, for the direction whose first bytes wait
/// for the TCP handshake's round trip.
async fn direction(
    mut from: OwnedReadHalf,
    to: OwnedWriteHalf,
    shared: Arc<Shared>,
    dir: usize,
    handshake: Option<Instant>,
) {
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(deliver(rx, to, shared.clone(), dir));
    loop {
        let mut buf = vec![0u8; READ_SIZE];
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.truncate(n);
        let shape = shared.shape();
        let ready = handshake.map_or_else(Instant::now, |t| t + shape.rtt);
        let left = shared.links[dir].reserve(n, shape.rate, ready);
        if tx.send((left + shape.rtt / 2, buf)).is_err() {
            break; // the other side is gone
        }
        // Read no faster than the link drains.
        let next = left.checked_sub(read_ahead(shape.rate)).unwrap_or(left);
        if next > Instant::now() {
            tokio::time::sleep_until(next).await;
        }
    }
    // The end of the stream arrives after the data before it.
    drop(tx);
    let _ = writer.await;
}

async fn deliver(
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    dir: usize,
) {
    while let Some((due, buf)) = rx.recv().await {
        // tokio's timer fires on the millisecond tick after the deadline.
        let wake = due.checked_sub(TIMER_LATE).unwrap_or(due);
        if wake > Instant::now() {
            tokio::time::sleep_until(wake).await;
        }
        if to.write_all(&buf).await.is_err() {
            return;
        }
        shared.delivered[dir].fetch_add(buf.len() as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}
