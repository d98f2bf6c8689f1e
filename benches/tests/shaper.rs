//! Host tests of the shaping proxy on real sockets on 127.0.0.1: the
//! delay and the cap it adds (properties of the proxy, with generous
//! bounds), that the cap is shared by all connections, that a new shape
//! applies to open connections, and that bytes pass unchanged and a
//! half-close gets through. A few seconds in all.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use benches::selftest::{self, TestServer};
use benches::{Shape, ShapingProxy};

const MB: u64 = 1_000_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// 1 MB through a 4 MB/s cap takes at least about 0.25 s, each way; a
/// ping on an open connection costs the RTT set, and a new connection one
/// more (the handshake).
#[test]
fn delay_and_cap_hold_both_ways() {
    let server = TestServer::start().unwrap();
    let proxy = ShapingProxy::start(server.addr, Shape::new(ms(50), Some(4 * MB))).unwrap();
    let (first, rtt) = selftest::ping(proxy.addr(), 5).unwrap();
    assert!(
        rtt >= ms(45) && rtt < ms(500),
        "ping took {rtt:?}, set 50 ms"
    );
    assert!(
        first >= ms(90),
        "connect + first reply took {first:?}, want 2 RTT"
    );
    for way in ["down", "up"] {
        let started = Instant::now();
        match way {
            "down" => selftest::download(proxy.addr(), MB).unwrap(),
            _ => selftest::upload(proxy.addr(), MB).unwrap(),
        };
        let took = started.elapsed();
        assert!(
            took >= ms(200) && took < ms(5000),
            "1 MB {way} through 4 MB/s took {took:?}"
        );
    }
    let c = proxy.counters();
    assert!(c.down >= MB && c.up >= MB, "{c:?}");
    // The ping connection and one per transfer.
    assert_eq!(c.connections, 3, "{c:?}");
}

/// Two connections at once share one cap: 2 × 0.5 MB through 2 MB/s take
/// about 0.5 s (0.25 s if each had a cap of its own).
#[test]
fn the_cap_is_shared_by_all_connections() {
    let server = TestServer::start().unwrap();
    let proxy = ShapingProxy::start(server.addr, Shape::new(Duration::ZERO, Some(2 * MB))).unwrap();
    let started = Instant::now();
    selftest::parallel(2, |_| selftest::download(proxy.addr(), MB / 2)).unwrap();
    let took = started.elapsed();
    assert!(
        took >= ms(420) && took < ms(5000),
        "2 × 0.5 MB at 2 MB/s shared took {took:?}"
    );
}

/// A shape set while a connection is open applies to its next bytes.
#[test]
fn a_new_shape_applies_to_open_connections() {
    let server = TestServer::start().unwrap();
    let proxy = ShapingProxy::start(server.addr, Shape::NONE).unwrap();
    let mut c = TcpStream::connect(proxy.addr()).unwrap();
    c.set_nodelay(true).unwrap();
    c.write_all(b"p").unwrap();
    let mut b = [0u8; 1];
    let ping = |c: &mut TcpStream, b: &mut [u8; 1]| {
        let t = Instant::now();
        c.write_all(b"x").unwrap();
        c.read_exact(b).unwrap();
        t.elapsed()
    };
    let fast = ping(&mut c, &mut b);
    assert!(fast < ms(40), "unshaped ping took {fast:?}");
    proxy.set_shape(Shape::new(ms(80), None));
    let slow = ping(&mut c, &mut b);
    assert!(slow >= ms(75), "ping after setting 80 ms took {slow:?}");
    assert_eq!(proxy.shape().rtt, ms(80));
}

/// Bytes pass unchanged both ways, and the client's half-close reaches the
/// server (which answers after it): an HTTP/1.0-style exchange.
#[test]
fn bytes_pass_unchanged_and_half_close_gets_through() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap(); // until the client's half-close
        got.reverse();
        s.write_all(&got).unwrap();
        got.len()
    });
    let proxy = ShapingProxy::start(backend, Shape::new(ms(10), Some(50 * MB))).unwrap();
    let mut x = 0x9e3779b97f4a7c15u64;
    let data: Vec<u8> = (0..3_000_001)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut c = TcpStream::connect(proxy.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let writer = {
        let (mut w, data) = (c.try_clone().unwrap(), data.clone());
        std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(echo.join().unwrap(), data.len());
    let mut want = data;
    want.reverse();
    assert!(back == want, "the bytes changed on the way");
    let counters = proxy.counters();
    assert_eq!((counters.up, counters.down), (3_000_001, 3_000_001));
}
