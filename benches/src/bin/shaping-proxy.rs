//! `shaping-proxy`: a TCP proxy on 127.0.0.1 adding a round-trip delay and
//! a shared bandwidth cap (each direction) in front of a server, for
//! benchmarks and tests over a WAN-like link; or, with `--self-test`, a
//! check of its own accuracy (achieved RTT and throughput vs set).
//!
//!     shaping-proxy --to 127.0.0.1:9000 --rtt 40ms --rate 100Mbit
//!     shaping-proxy --self-test --rtt 40ms --rate 100Mbit --mb 16
//!
//! Serving, it prints `listening on 127.0.0.1:PORT` and runs until killed;
//! with `--stdin`, until its standard input ends (so that a parent that
//! dies stops it), and then prints the bytes it delivered each way as one
//! JSON line.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use benches::units::{parse_duration, parse_rate};
use benches::{Shape, ShapingProxy, selftest};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "A TCP proxy adding delay and a bandwidth cap")]
struct Args {
    /// The server to forward to (HOST:PORT).
    #[arg(long, required_unless_present = "self_test")]
    to: Option<SocketAddr>,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Round-trip time to add (half each way), e.g. 40ms.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    rtt: Duration,
    /// Bandwidth cap each way, shared by all connections, e.g. 100Mbit,
    /// 1Gbit, 4MB; none: unlimited.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Measure the proxy's accuracy instead of serving: RTT by pings, then
    /// MB down and up over --connections connections; exits 1 when off by
    /// more than --tolerance.
    #[arg(long)]
    self_test: bool,
    /// Megabytes to move each way in the self-test.
    #[arg(long, default_value_t = 16)]
    mb: u64,
    /// Connections sharing the cap in the self-test.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Relative error the self-test accepts.
    #[arg(long, default_value_t = 0.1)]
    tolerance: f64,
    /// Print JSON instead of text (self-test).
    #[arg(long)]
    json: bool,
    /// Stop when standard input ends (a pipe from the parent), printing
    /// the bytes delivered each way.
    #[arg(long)]
    stdin: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let shape = Shape::new(args.rtt, args.rate);
    if args.self_test {
        return match selftest::run(shape, args.mb * 1_000_000, args.connections, 10) {
            Ok(report) => {
                if args.json {
                    println!("{}", report.json());
                } else {
                    println!("{report}");
                }
                if report.worst_error() > args.tolerance {
                    eprintln!(
                        "shaping-proxy: off by {:.1} % (> {:.1} %)",
                        report.worst_error() * 100.0,
                        args.tolerance * 100.0
                    );
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("shaping-proxy: self-test failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(to) = args.to else {
        eprintln!("shaping-proxy: --to HOST:PORT is needed");
        return ExitCode::from(2);
    };
    let proxy = match ShapingProxy::start_on(args.listen, to, shape) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("shaping-proxy: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {} ({shape})", proxy.addr());
    if args.stdin {
        // Until the parent closes the pipe (or dies).
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    } else {
        // Until killed.
        loop {
            std::thread::park();
        }
    }
    let c = proxy.counters();
    println!(
        "{}",
        serde_json::json!({"up": c.up, "down": c.down, "connections": c.connections})
    );
    ExitCode::SUCCESS
}
