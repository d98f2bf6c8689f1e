//! Current transfer rates, for `isr status`: a sliding window of the last
//! [`WINDOW_SECS`] seconds in one-second buckets, not a lifetime average (a
//! session that fetched fast an hour ago and is stalled now must say so).
//!
//! ```text
//!  buckets: [ s-9 | s-8 | … | s-1 | s ]   bytes added in each whole second
//!  rate  = sum / seconds covered (≤ 10, at least 1, no more than the meter's age)
//!  peak  = the fullest complete second in the window (held once it leaves:
//!          the link estimate of an idle engine is the last one it saw)
//! ```
//!
//! One tiny mutex: the meter is fed once per chunk (not per block I/O), so
//! it is never contended. The clock is injected ([`Clock`]) so the tests
//! can move time by hand.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seconds the window covers.
pub const WINDOW_SECS: u64 = 10;

/// Where a meter reads the time: a monotonic duration since some origin.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The time elapsed since the clock's origin.
    fn now(&self) -> Duration;
}

/// The monotonic system clock, counted from its creation.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> SystemClock {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// Bytes per second over the last [`WINDOW_SECS`] seconds.
#[derive(Debug)]
pub struct RateMeter {
    clock: Arc<dyn Clock>,
    /// When the meter was made (a young meter divides by its age).
    created: Duration,
    inner: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// Bytes of second `s` are in `bytes[s % WINDOW_SECS]`.
    bytes: [u64; WINDOW_SECS as usize],
    /// The newest second a bucket was advanced to.
    second: u64,
    /// The second the meter was made in (older buckets never held data).
    created_sec: u64,
    /// The last non-zero peak, kept after its second left the window.
    held_peak: u64,
}

impl Buckets {
    /// Moves the window so that `now_sec` is its newest second, emptying
    /// the buckets of the seconds it skipped.
    fn advance(&mut self, now_sec: u64) {
        if now_sec <= self.second {
            return;
        }
        // Every second up to `self.second` is complete now: remember the
        // fullest before the buckets are reused.
        let peak = self.peak_up_to(self.second);
        if peak > 0 {
            self.held_peak = peak;
        }
        let skipped = (now_sec - self.second).min(WINDOW_SECS);
        for i in 0..skipped {
            let s = now_sec - i;
            self.bytes[(s % WINDOW_SECS) as usize] = 0;
        }
        self.second = now_sec;
    }

    /// The fullest of the seconds of the window that end at `last`.
    fn peak_up_to(&self, last: u64) -> u64 {
        (0..WINDOW_SECS)
            .filter_map(|back| last.checked_sub(back))
            .filter(|&s| s >= self.created_sec && s + WINDOW_SECS > self.second)
            .map(|s| self.bytes[(s % WINDOW_SECS) as usize])
            .max()
            .unwrap_or(0)
    }
}

impl Default for RateMeter {
    fn default() -> Self {
        RateMeter::new()
    }
}

impl RateMeter {
    /// A meter on the system clock.
    pub fn new() -> RateMeter {
        RateMeter::with_clock(Arc::new(SystemClock::new()))
    }

    /// A meter on `clock` (tests move it by hand).
    pub fn with_clock(clock: Arc<dyn Clock>) -> RateMeter {
        let created = clock.now();
        RateMeter {
            clock,
            created,
            inner: Mutex::new(Buckets {
                second: created.as_secs(),
                created_sec: created.as_secs(),
                ..Buckets::default()
            }),
        }
    }

    /// Counts `bytes` transferred now.
    pub fn add(&self, bytes: u64) {
        let now = self.clock.now().as_secs();
        let mut b = self.inner.lock().expect("meter lock");
        b.advance(now);
        let slot = (now % WINDOW_SECS) as usize;
        b.bytes[slot] = b.bytes[slot].saturating_add(bytes);
    }

    /// Bytes per second over the window: what was added in the last
    /// [`WINDOW_SECS`] seconds (the current one included), divided by the
    /// time those cover (the meter's age if younger, at least one second).
    pub fn rate(&self) -> u64 {
        let now = self.clock.now();
        let mut b = self.inner.lock().expect("meter lock");
        b.advance(now.as_secs());
        let sum: u64 = b.bytes.iter().sum();
        // The window starts at the oldest whole second it holds.
        let window_start = Duration::from_secs(now.as_secs().saturating_sub(WINDOW_SECS - 1));
        let covered = now - window_start.max(self.created);
        (sum as f64 / covered.as_secs_f64().max(1.0)) as u64
    }

    /// Bytes in the fullest complete second of the window; once the
    /// window holds no transfer, the last such peak (a link estimate that
    /// survives idle time: an engine with everything cached still knows
    /// how fast its store was).
    pub fn peak(&self) -> u64 {
        let now = self.clock.now().as_secs();
        let mut b = self.inner.lock().expect("meter lock");
        b.advance(now);
        match now.checked_sub(1).map_or(0, |last| b.peak_up_to(last)) {
            0 => b.held_peak,
            peak => peak,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A clock moved by hand, in milliseconds.
    #[derive(Debug, Default)]
    struct Manual(AtomicU64);

    impl Manual {
        fn set_ms(&self, ms: u64) {
            self.0.store(ms, Ordering::Relaxed);
        }
    }

    impl Clock for Manual {
        fn now(&self) -> Duration {
            Duration::from_millis(self.0.load(Ordering::Relaxed))
        }
    }

    fn meter() -> (Arc<Manual>, RateMeter) {
        let clock = Arc::new(Manual::default());
        clock.set_ms(100_000);
        let m = RateMeter::with_clock(clock.clone());
        (clock, m)
    }

    #[test]
    fn a_steady_transfer_reads_as_its_rate() {
        let (clock, m) = meter();
        // 1 MB every 100 ms for 20 s: 10 MB/s.
        for tick in 1..=200 {
            clock.set_ms(100_000 + tick * 100);
            m.add(1_000_000);
        }
        let r = m.rate();
        assert!((9_500_000..=10_500_000).contains(&r), "{r}");
        assert!((9_000_000..=11_000_000).contains(&m.peak()), "{}", m.peak());
    }

    #[test]
    fn the_rate_is_current_not_a_lifetime_average() {
        let (clock, m) = meter();
        for tick in 1..=100 {
            clock.set_ms(100_000 + tick * 100);
            m.add(1_000_000);
        }
        assert!(m.rate() > 5_000_000);
        // Nothing for 10 s: the window is empty, whatever came before.
        clock.set_ms(100_000 + 10_000 + 10_000);
        assert_eq!(m.rate(), 0);
        // The link estimate keeps the last peak it saw.
        assert!((9_000_000..=11_000_000).contains(&m.peak()), "{}", m.peak());
        // A slow trickle now reads as slow.
        for tick in 1..=50 {
            clock.set_ms(120_000 + tick * 200);
            m.add(10_000);
        }
        let r = m.rate();
        assert!((40_000..=60_000).contains(&r), "{r}");
    }

    #[test]
    fn a_young_meter_divides_by_its_age() {
        let (clock, m) = meter();
        clock.set_ms(102_000);
        m.add(4_000_000);
        // 4 MB in the 2 s since it was made, not spread over 10 s.
        assert_eq!(m.rate(), 2_000_000);
        // Less than a second old: counted as one second.
        let (clock, m) = meter();
        clock.set_ms(100_010);
        m.add(500);
        assert_eq!(m.rate(), 500);
    }

    #[test]
    fn buckets_left_behind_by_a_long_pause_are_empty() {
        let (clock, m) = meter();
        clock.set_ms(100_500);
        m.add(7_000);
        // Exactly one window later the same bucket is reused: it must not
        // still hold the old bytes (3000 B over the 9.9 s covered).
        clock.set_ms(110_500);
        m.add(3_000);
        clock.set_ms(110_900);
        assert_eq!(m.rate(), 303);
    }

    #[test]
    fn an_untouched_meter_reads_zero() {
        let (clock, m) = meter();
        assert_eq!((m.rate(), m.peak()), (0, 0));
        clock.set_ms(1_000_000);
        assert_eq!((m.rate(), m.peak()), (0, 0));
    }

    #[test]
    fn the_peak_is_the_fullest_complete_second() {
        let (clock, m) = meter();
        clock.set_ms(101_100);
        m.add(100);
        clock.set_ms(102_100);
        m.add(900);
        clock.set_ms(103_100);
        m.add(300);
        // The current second (103) is not complete: the peak is second 102.
        assert_eq!(m.peak(), 900);
        clock.set_ms(104_000);
        assert_eq!(m.peak(), 900);
    }
}
