//! Bandwidth caps (`--bwlimit`): one per direction, shared by every clone
//! of a [`Store`](super::Store), so that all transfers of a process together
//! stay under the cap however many run at once.
//!
//! A cap is a virtual clock: each transfer of `n` bytes reserves the next
//! `n / rate` seconds of the link and waits until its slot begins. Nothing is
//! allowed to burst ahead, so the rate over any stretch longer than one
//! chunk's slot is the cap. The rate can change at any time (`isr sync
//! --bwlimit` on a running daemon); 0 means no cap.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A bandwidth cap for one direction.
#[derive(Debug, Default)]
pub(crate) struct Bandwidth {
    /// Bytes per second; 0: unlimited.
    rate: AtomicU64,
    /// When the link is free again.
    next: Mutex<Option<Instant>>,
}

impl Bandwidth {
    pub(crate) fn set(&self, rate: Option<u64>) {
        self.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Option<u64> {
        Some(self.rate.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }

    /// Reserves the link for `bytes` and returns how long to wait before
    /// using it (zero when uncapped or idle).
    fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || bytes == 0 {
            return Duration::ZERO;
        }
        let mut next = self.next.lock().expect("bandwidth lock");
        let start = next.map_or(now, |n| n.max(now));
        *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
        start - now
    }

    /// Waits for the slot of a transfer of `bytes`.
    pub(crate) async fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Parses `10M`, `500K`, `1G`, `1.5M` or a plain number, in bytes per
/// second (K = 1000; KiB = 1024).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (e.g. 10M, 500K)"))?;
    let unit = unit.trim().trim_end_matches("/s").to_ascii_lowercase();
    let mult: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    let v = n * mult;
    if !(1.0..1e15).contains(&v) {
        return Err(format!("{s:?} is out of range (at least 1 byte/s)"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("10M"), Ok(10_000_000));
        assert_eq!(parse_rate("500k"), Ok(500_000));
        assert_eq!(parse_rate("1.5MB/s"), Ok(1_500_000));
        assert_eq!(parse_rate("2MiB"), Ok(2 << 20));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("3X").is_err());
    }

    #[test]
    fn slots_follow_each_other_at_the_rate() {
        let b = Bandwidth::default();
        let t0 = Instant::now();
        assert_eq!(b.reserve(1000, t0), Duration::ZERO, "uncapped");
        b.set(Some(1000));
        assert_eq!(b.reserve(500, t0), Duration::ZERO);
        assert_eq!(b.reserve(500, t0), Duration::from_millis(500));
        assert_eq!(b.reserve(1000, t0), Duration::from_secs(1));
        // An idle link does not save up credit.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.reserve(1000, later), Duration::ZERO);
        assert_eq!(b.reserve(1, later), Duration::from_secs(1));
        b.set(None);
        assert_eq!(b.reserve(1_000_000, later), Duration::ZERO);
    }
}
