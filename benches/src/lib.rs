//! isr's scenario benchmarks (run by `scripts/bench-scenarios`, never by
//! `cargo test`) and what they stand on: a TCP proxy that shapes loopback
//! like a WAN link ([`shaper`]), its accuracy check ([`selftest`]), and
//! the parsing of rates and durations ([`units`]), and a static HTTP file
//! server with byte ranges ([`http`]).

pub mod http;
pub mod selftest;
pub mod shaper;
pub mod units;

pub use shaper::{Counters, Shape, ShapingProxy};
