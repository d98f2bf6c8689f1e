//! The fetch pipeline: one slot per chunk in flight (single flight), a
//! scheduler that runs demand fetches at once and prefetches within an
//! adaptive window, and fetch tasks that retry until the store answers.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use format::{ChunkEntry, ChunkKey};
use tokio::sync::mpsc;

use crate::engine::Shared;
use crate::local::cache::{self, ABSENT};
use crate::local::notify::Notifier;
use crate::{ChunkFault, Error};

/// The fetch of one chunk, shared by everyone waiting for it.
#[derive(Debug, Default)]
pub struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
    /// Signalled when a new reader joins: a fetch waiting out its backoff
    /// tries again at once (the store may be back, and this reader's
    /// deadline may come before the backoff ends).
    retry: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct SlotState {
    done: Option<Result<(), Arc<Error>>>,
    last_error: Option<String>,
    demanded: bool,
    notifiers: Vec<Arc<Notifier>>,
}

/// Why a wait for a chunk ended without it.
#[derive(Debug)]
pub enum WaitError {
    /// The fetch failed for good (the chunk is corrupt or missing).
    Failed(Arc<Error>),
    /// The miss timeout passed; the store's last error, if any.
    TimedOut(String),
}

impl Slot {
    /// Whether the fetch has finished; `Some(Err)` if it failed.
    pub fn result(&self) -> Option<Result<(), Arc<Error>>> {
        self.state.lock().expect("slot lock").done.clone()
    }

    /// Blocks until the fetch finishes or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> Result<(), WaitError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().expect("slot lock");
        loop {
            if let Some(done) = &st.done {
                return done.clone().map_err(WaitError::Failed);
            }
            let now = Instant::now();
            if now >= deadline {
                let cause = st
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the store did not answer".into());
                return Err(WaitError::TimedOut(cause));
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .expect("slot lock")
                .0;
        }
    }

    pub(in crate::engine) fn complete(&self, result: Result<(), Arc<Error>>) {
        let mut st = self.state.lock().expect("slot lock");
        st.done = Some(result);
        for n in st.notifiers.drain(..) {
            n.signal();
        }
        self.cv.notify_all();
    }

    /// A reader joins: the fetch is demanded now, and `notifier` (if any)
    /// is signalled when it completes (at once if it has). True if the
    /// reader is new to the slot (a notifier it did not have, or a thread
    /// that will wait on it).
    fn join(&self, notifier: Option<&Arc<Notifier>>) -> bool {
        let mut st = self.state.lock().expect("slot lock");
        st.demanded = true;
        let Some(n) = notifier else { return true };
        if st.done.is_some() {
            n.signal();
        } else if !st.notifiers.iter().any(|m| Arc::ptr_eq(m, n)) {
            // Deadlines are the waiter's own business (a ublk queue keeps
            // one per request in its ring).
            st.notifiers.push(n.clone());
            return true;
        }
        false
    }

    fn demanded(&self) -> bool {
        self.state.lock().expect("slot lock").demanded
    }

    fn note_error(&self, e: &Error) {
        self.state.lock().expect("slot lock").last_error = Some(e.to_string());
    }
}

impl Shared {
    /// `None` if chunk `c` is cached; else the slot of its fetch, started
    /// now if none is in flight.
    pub(crate) fn demand(&self, c: u64, notifier: Option<&Arc<Notifier>>) -> Option<Arc<Slot>> {
        match cache::state_of(self.cache.entry(c)) {
            ABSENT => {}
            // Written whole right now: wait for that write, not the store.
            cache::WRITING => {
                let slot = self.writing_slot(c)?;
                slot.join(notifier);
                return Some(slot);
            }
            _ => return None,
        }
        let ChunkEntry::Data(key) = self.base().entry(c) else {
            // Never stored: zeros. The image range is made a hole now
            // (unless a write got there first: see `fill_zeros`).
            self.cache.point("demand: absent zero chunk");
            let _ = self.fill_zeros(&[c]);
            return None;
        };
        let mut map = self.inflight.lock().expect("inflight lock");
        // Re-check under the lock: a fill completes before its slot leaves the map.
        if cache::state_of(self.cache.entry(c)) != ABSENT {
            return None;
        }
        let (slot, new) = match map.get(&key) {
            Some(s) => (s.clone(), false),
            None => {
                let s = Arc::new(Slot::default());
                map.insert(key, s.clone());
                (s, true)
            }
        };
        let joined = slot.join(notifier);
        drop(map);
        if joined && !new {
            // A fetch waiting out a backoff tries again now. Only for a
            // waiter new to the slot: a queue asking again after every
            // wake-up must not turn the backoff into a storm.
            slot.retry.notify_one();
        }
        if new {
            let _ = self.demand_tx.send(c);
        }
        Some(slot)
    }

    /// Makes never-stored chunks that are still absent present holes
    /// (see [`fill_absent`](Self::fill_absent): a full-chunk write that made
    /// one dirty since the caller saw it absent is not punched away).
    pub(crate) fn fill_zeros(&self, chunks: &[u64]) -> Result<(), Error> {
        self.cache.point("fill_zeros: begin");
        self.fill_absent(chunks, |c| {
            let len = self.geometry.chunk_len(c) as u64;
            self.cache.punch_hole(self.geometry.chunk_offset(c), len)
        })?;
        self.note_progress();
        Ok(())
    }

    /// Takes the fetch of `key` out of the in-flight map after a transient
    /// error, unless a reader has joined it (then it goes on retrying):
    /// decided under the in-flight lock, where [`demand`](Self::demand)
    /// joins, so that no reader joins between the decision and the slot
    /// leaving the map (it would receive a transient error as final, and
    /// its read would fail with EIO). At shutdown (`force`) it leaves
    /// regardless. The caller then [`finish`](Self::finish)es the slot.
    fn leave_unless_demanded(&self, key: ChunkKey, slot: &Arc<Slot>, force: bool) -> bool {
        self.cache.point("fetch: giving up");
        let mut map = self.inflight.lock().expect("inflight lock");
        if !force && slot.demanded() {
            return false;
        }
        map.remove(&key);
        true
    }

    /// Ends the fetch of `key`: the slot leaves the map, then waiters wake.
    fn finish(&self, key: ChunkKey, slot: &Arc<Slot>, result: Result<(), Arc<Error>>) {
        {
            // Only this fetch's own slot: one that left the map already
            // (see `leave_unless_demanded`) may have a successor there.
            let mut map = self.inflight.lock().expect("inflight lock");
            if map.get(&key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                map.remove(&key);
            }
        }
        slot.complete(result);
        self.note_progress();
    }
}

enum Outcome {
    Fetched(u64),
    Permanent,
    Transient,
}

/// Whether a fetch error will not go away by retrying.
fn is_permanent(e: &Error) -> bool {
    match e {
        Error::BadChunk { fault, .. } => match fault {
            ChunkFault::Missing | ChunkFault::Decode(_) => true,
            ChunkFault::Store(inner) => matches!(**inner, Error::Denied { .. }),
            ChunkFault::Cancelled => false,
        },
        Error::Io { .. } | Error::Invalid(_) => true,
        _ => false,
    }
}

/// Fetches stored chunk `key` (first needed at disk chunk `c`) into every
/// place it appears, retrying transient store errors until it arrives (a
/// prefetch nobody waits for gives up instead, to be retried later).
async fn fetch_one(
    shared: Arc<Shared>,
    key: ChunkKey,
    c: u64,
    slot: Arc<Slot>,
    prefetch: bool,
) -> Outcome {
    let mut backoff = Duration::from_millis(100);
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        let base = shared.base();
        let len = shared.geometry.chunk_len(c) as usize;
        attempts += 1;
        let image = match shared.options.ram {
            Some(_) => crate::Image::Ram,
            None => crate::Image::Disk,
        };
        let fetched = shared
            .parcel
            .fetch_image_chunk(key, len, image, c, base.version)
            .await;
        shared.note_store_result(match &fetched {
            // A missing or corrupt chunk: the store answered.
            Err(e) if !is_permanent(e) => Err(e),
            _ => Ok(()),
        });
        match fetched {
            Ok(data) => {
                tracing::debug!(
                    parcel = shared.parcel.name(),
                    chunk = c,
                    id = %short_id(key),
                    bytes = len,
                    ms = started.elapsed().as_millis() as u64,
                    attempts,
                    prefetch = prefetch && !slot.demanded(),
                    "fetched a chunk"
                );
                // Counted before the fill: a hoard that sees every chunk
                // cached then sees every fetch that filled one.
                shared.note_fetched(len as u64);
                let (s, places) = (
                    shared.clone(),
                    base.by_key.get(&key).cloned().unwrap_or_default(),
                );
                let filled = tokio::task::spawn_blocking(move || s.fill(&places, &data))
                    .await
                    .unwrap_or_else(|e| Err(Error::Invalid(format!("fill task failed: {e}"))));
                return complete(&shared, key, &slot, filled.map(|()| len as u64));
            }
            Err(e) if is_permanent(&e) => {
                tracing::warn!(
                    parcel = shared.parcel.name(),
                    chunk = c,
                    "cannot fetch: {e}"
                );
                return complete(&shared, key, &slot, Err(e));
            }
            Err(e) => {
                slot.note_error(&e);
                let shutdown = shutting_down(&shared);
                if (shutdown || prefetch) && shared.leave_unless_demanded(key, &slot, shutdown) {
                    tracing::debug!(
                        parcel = shared.parcel.name(),
                        chunk = c,
                        error = %e,
                        "prefetch failed; the chunk is tried again later"
                    );
                    shared.finish(key, &slot, Err(Arc::new(e)));
                    return Outcome::Transient;
                }
                tracing::debug!(
                    parcel = shared.parcel.name(),
                    chunk = c,
                    attempts,
                    delay_ms = backoff.as_millis() as u64,
                    error = %e,
                    "a demanded chunk could not be fetched; trying again"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = slot.retry.notified() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The first 16 hex digits of a chunk's object name, for the log.
fn short_id(key: ChunkKey) -> String {
    let mut id = key.id().to_string();
    id.truncate(16);
    id
}

fn shutting_down(shared: &Shared) -> bool {
    shared.shutdown.load(Ordering::Relaxed)
}

fn complete(shared: &Shared, key: ChunkKey, slot: &Arc<Slot>, r: Result<u64, Error>) -> Outcome {
    match r {
        Ok(bytes) => {
            shared.finish(key, slot, Ok(()));
            Outcome::Fetched(bytes)
        }
        Err(e) => {
            let e = Arc::new(e);
            shared
                .failed
                .lock()
                .expect("failed lock")
                .insert(key, e.clone());
            shared.finish(key, slot, Err(e));
            Outcome::Permanent
        }
    }
}

/// Adapts the prefetch window: starts small (on a slow link every
/// prefetch in flight delays a demand fetch that joins them), doubles while
/// throughput grows (slow start: a fast, distant store needs many requests
/// in flight, and growing a quarter at a time cost a 1 Gbit/s link 40% of
/// its throughput), gives back a quarter when throughput clearly drops, and
/// halves on errors.
struct Window {
    size: usize,
    max: usize,
    bytes: u64,
    done: usize,
    since: Instant,
    last_rate: f64,
}

impl Window {
    fn new(max: usize) -> Window {
        Window {
            size: 4.min(max).max(1),
            max: max.max(1),
            bytes: 0,
            done: 0,
            since: Instant::now(),
            last_rate: 0.0,
        }
    }

    fn success(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.done += 1;
        if self.done < self.size {
            return;
        }
        let rate = self.bytes as f64 / self.since.elapsed().as_secs_f64().max(1e-6);
        if rate > self.last_rate * 1.1 {
            self.size = (self.size * 2).min(self.max);
        } else if rate < self.last_rate * 0.7 {
            // A clear drop: give back a quarter, so that a window a noisy
            // rate grew on a slow link comes down again (slowly: a dip is
            // more often the demand or the disk than the store).
            self.size = (self.size - (self.size / 4).max(1)).max(1);
        }
        self.last_rate = rate;
        self.bytes = 0;
        self.done = 0;
        self.since = Instant::now();
    }

    fn error(&mut self) {
        self.size = (self.size / 2).max(1);
    }

    /// Skips the slow start: the whole window at once (the rate measured
    /// from here on still brings it down on a clear drop).
    fn open(&mut self) {
        self.size = self.max;
        self.bytes = 0;
        self.done = 0;
        self.since = Instant::now();
    }
}

/// A message on the demand channel that is a readahead hint, not a demand:
/// this bit, the sequential bit, and the chunk first touched.
const HINT: u64 = 1 << 62;
const SEQUENTIAL: u64 = 1 << 61;
/// Readahead: a first touch right after the chunk before it (a stream:
/// files are mostly contiguous on disk), or one into what was read ahead,
/// reads this many chunks ahead of it; any other first touch reads the
/// next chunk only (a file may just cross into it). In a boot replayed at
/// 100 Mbit/s this took the first session from 10.7 s to 10.2 s; a ramp
/// (1, doubling on each hit) wasted less but, one read at a time, stayed
/// too shallow: 14.4 s.
const READAHEAD_STREAM: u64 = 16;
const READAHEAD_SINGLE: u64 = 1;
/// Never-stored chunks the prefetch makes holes of at once (one sync).
const ZERO_BATCH: usize = 4096;
/// Streams followed at once (the most recent).
const STREAMS: usize = 32;
/// How long after a demand fetch the prefetch of chunks nobody hinted at
/// (the ascending rest) is held to about the link's bandwidth-delay
/// product: while a guest is waiting for its data, the link is mostly its
/// (a whole window of such prefetches queued every demand fetch behind it;
/// none at all made a boot's first session slower at 100 Mbit/s, where the
/// ascending order finds much of what a boot reads next).
const DEMAND_QUIET: Duration = Duration::from_secs(1);

/// What the guest is reading through: the chunks after `next` up to `end`
/// have been read ahead.
#[derive(Debug, Clone, Copy)]
struct Stream {
    next: u64,
    end: u64,
}

/// The demand-channel message that opens the prefetch window fully (a
/// hoard: everything is wanted now, and nobody waits for one chunk).
pub(crate) const OPEN_WINDOW: u64 = u64::MAX - 1;

/// The demand-channel message for a readahead hint after chunk `c`.
pub(crate) fn readahead_hint(c: u64, sequential: bool) -> u64 {
    HINT | if sequential { SEQUENTIAL } else { 0 } | c
}

/// The order of prefetch: chunks read ahead of the guest's reads first
/// (newest hint first), then the previous session's trace, then every
/// other chunk ascending, then chunks pushed back after a transient error.
/// Nothing of the size of the disk is built up front (a warm resume of a
/// large disk should not pay for it).
struct PrefetchOrder {
    near: VecDeque<u64>,
    streams: VecDeque<Stream>,
    trace: VecDeque<u64>,
    in_trace: Vec<u64>,
    next: u64,
    n: u64,
    again: VecDeque<u64>,
}

impl PrefetchOrder {
    fn new(trace: &[u64], n: u64) -> PrefetchOrder {
        let mut in_trace = vec![0u64; n.div_ceil(64) as usize];
        let mut order = VecDeque::new();
        for &c in trace {
            if c < n && in_trace[(c / 64) as usize] & (1 << (c % 64)) == 0 {
                in_trace[(c / 64) as usize] |= 1 << (c % 64);
                order.push_back(c);
            }
        }
        PrefetchOrder {
            near: VecDeque::new(),
            streams: VecDeque::new(),
            trace: order,
            in_trace,
            next: 0,
            n,
            again: VecDeque::new(),
        }
    }

    /// Chunk `c` was first touched (`sequential`: right after the chunk
    /// before it): reads ahead of it, far if it starts or continues a
    /// stream. Not for a chunk of the previous session's trace: while the
    /// guest follows the trace, the trace knows better what comes next than
    /// the disk's layout.
    fn touched(&mut self, c: u64, sequential: bool) {
        if c >= self.n || self.in_trace[(c / 64) as usize] & (1 << (c % 64)) != 0 {
            return;
        }
        let (mut stream, depth) = match self.streams.iter().position(|s| s.next <= c && c <= s.end)
        {
            Some(i) => (
                self.streams.remove(i).expect("an index of the streams"),
                READAHEAD_STREAM,
            ),
            None if sequential => (
                Stream {
                    next: c + 1,
                    end: c,
                },
                READAHEAD_STREAM,
            ),
            None => (
                Stream {
                    next: c + 1,
                    end: c,
                },
                READAHEAD_SINGLE,
            ),
        };
        stream.next = c + 1;
        let target = c.saturating_add(depth).min(self.n - 1);
        for x in (stream.end + 1..=target).rev() {
            self.near.push_front(x);
        }
        stream.end = stream.end.max(target);
        self.streams.push_front(stream);
        self.streams.truncate(STREAMS);
        // Hints of long ago are stale: the guest has moved on.
        self.near.truncate(256);
    }

    /// Whether the next chunk is one somebody asked for (read ahead of the
    /// guest, or in the trace), not the ascending rest.
    fn has_priority(&self) -> bool {
        !self.near.is_empty() || !self.trace.is_empty()
    }

    fn pop_front(&mut self) -> Option<u64> {
        if let Some(c) = self.near.pop_front() {
            return Some(c);
        }
        if let Some(c) = self.trace.pop_front() {
            return Some(c);
        }
        while self.next < self.n {
            let c = self.next;
            self.next += 1;
            if self.in_trace[(c / 64) as usize] & (1 << (c % 64)) == 0 {
                return Some(c);
            }
        }
        self.again.pop_front()
    }

    fn push_back(&mut self, c: u64) {
        self.again.push_back(c);
    }
}

/// Runs until shutdown: demand fetches start at once; prefetches fill the
/// window, in the base manifest's trace order, then ascending.
pub(crate) async fn scheduler(shared: Arc<Shared>, mut demand_rx: mpsc::UnboundedReceiver<u64>) {
    let n = shared.geometry.chunk_count();
    let mut order = {
        let base = shared.base();
        PrefetchOrder::new(&base.manifest.access_trace, n)
    };
    let mut window = Window::new(shared.options.max_fetches);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, bool, Outcome, Duration)>();
    let mut min_latency = Duration::MAX;
    let mut prefetching = 0usize;
    let mut pause_until = Instant::now();
    let mut pause = Duration::from_secs(1);
    let mut last_demand: Option<Instant> = None;
    let mut demands = 0usize;
    loop {
        if shutting_down(&shared) {
            return;
        }
        // Prefetch into the window. While demand fetches are recent, the
        // ascending rest keeps only about the link's bandwidth-delay
        // product in flight (the fetch rate seen at its fullest times the
        // quickest fetch, in chunks; at least one): enough to use what the
        // demands leave of a fast link, too little to queue them behind it
        // on a slow one. A demand fetch still in flight counts however long
        // it takes (on a slow link it may wait seconds behind prefetches:
        // that is when the window must not fill up again).
        let demanding = demands > 0 || last_demand.is_some_and(|t| t.elapsed() < DEMAND_QUIET);
        let beside_demand = if !demanding {
            usize::MAX
        } else if min_latency == Duration::MAX {
            1
        } else {
            let chunks_per_s =
                shared.fetch_meter.peak() as f64 / shared.geometry.chunk_size() as f64;
            ((chunks_per_s * min_latency.as_secs_f64()) as usize).clamp(1, window.size.max(1))
        };
        let mut zeros = Vec::new();
        while shared.prefetch_on.load(Ordering::Relaxed)
            && prefetching < window.size
            && (prefetching < beside_demand || order.has_priority())
            && Instant::now() >= pause_until
        {
            let Some(c) = order.pop_front() else { break };
            if cache::state_of(shared.cache.entry(c)) != ABSENT {
                continue;
            }
            let ChunkEntry::Data(key) = shared.base().entry(c) else {
                zeros.push(c);
                if zeros.len() >= ZERO_BATCH {
                    break;
                }
                continue;
            };
            if shared
                .failed
                .lock()
                .expect("failed lock")
                .contains_key(&key)
            {
                continue;
            }
            let slot = {
                let mut map = shared.inflight.lock().expect("inflight lock");
                if map.contains_key(&key) || cache::state_of(shared.cache.entry(c)) != ABSENT {
                    continue;
                }
                let s = Arc::new(Slot::default());
                map.insert(key, s.clone());
                s
            };
            prefetching += 1;
            let (s, tx) = (shared.clone(), done_tx.clone());
            tokio::spawn(async move {
                let t0 = Instant::now();
                let outcome = fetch_one(s, key, c, slot, true).await;
                let _ = tx.send((c, true, outcome, t0.elapsed()));
            });
        }
        if !zeros.is_empty() {
            // Never-stored chunks: holes, made durable by one sync for the
            // batch, off the scheduler's thread.
            let s = shared.clone();
            tokio::task::spawn_blocking(move || {
                let _ = s.fill_zeros(&zeros);
            });
        }
        shared.window.store(window.size as u64, Ordering::Relaxed);
        let wait = pause_until.saturating_duration_since(Instant::now());
        tokio::select! {
            Some(c) = demand_rx.recv() => {
                if c == u64::MAX {
                    continue; // a wake-up
                }
                if c == OPEN_WINDOW {
                    window.open();
                    continue;
                }
                if c & HINT != 0 {
                    order.touched(c & !(HINT | SEQUENTIAL), c & SEQUENTIAL != 0);
                    continue;
                }
                last_demand = Some(Instant::now());
                let ChunkEntry::Data(key) = shared.base().entry(c) else { continue };
                let slot = shared.inflight.lock().expect("inflight lock").get(&key).cloned();
                if let Some(slot) = slot {
                    demands += 1;
                    let (s, tx) = (shared.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let t0 = Instant::now();
                        let outcome = fetch_one(s, key, c, slot, false).await;
                        let _ = tx.send((c, false, outcome, t0.elapsed()));
                    });
                }
            }
            Some((c, prefetch, outcome, took)) = done_rx.recv() => {
                if prefetch {
                    prefetching -= 1;
                } else {
                    demands -= 1;
                    last_demand = Some(Instant::now());
                }
                match outcome {
                    Outcome::Fetched(bytes) => {
                        min_latency = min_latency.min(took);
                        window.success(bytes);
                        pause = Duration::from_secs(1);
                    }
                    Outcome::Transient => {
                        window.error();
                        order.push_back(c);
                        pause_until = Instant::now() + pause;
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                    Outcome::Permanent => {}
                }
            }
            // Sooner while demanding: the rest waits for the quiet to begin.
            _ = tokio::time::sleep(wait.max(Duration::from_millis(if demanding { 50 } else { 200 }))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_order_is_trace_then_the_rest_then_retries() {
        let mut o = PrefetchOrder::new(&[5, 2, 5, 99], 8);
        o.push_back(7);
        let got: Vec<u64> = std::iter::from_fn(|| o.pop_front()).collect();
        assert_eq!(got, [5, 2, 0, 1, 3, 4, 6, 7, 7]);
    }

    #[test]
    fn readahead_follows_streams_and_not_the_trace() {
        let mut o = PrefetchOrder::new(&[5], 60);
        let near = |o: &mut PrefetchOrder| -> Vec<u64> { o.near.drain(..).collect() };
        o.touched(5, true); // on the trace: the trace leads
        assert!(near(&mut o).is_empty());
        o.touched(9, false); // alone: the next chunk only
        assert_eq!(near(&mut o), [10]);
        o.touched(10, true); // after 9: a stream, 16 ahead
        assert_eq!(near(&mut o), (11..=26).collect::<Vec<_>>());
        o.touched(12, true); // into it: 16 ahead of 12
        assert_eq!(near(&mut o), [27, 28]);
        o.touched(40, false); // another, ahead of the others
        o.touched(20, false); // into the first stream, though not after 19
        assert_eq!(near(&mut o), [29, 30, 31, 32, 33, 34, 35, 36, 41]);
        o.touched(50, true); // clipped at the end of the disk
        assert_eq!(near(&mut o), (51..=59).collect::<Vec<_>>());
        // Readahead goes before the trace, the trace before the rest.
        o.touched(41, false);
        assert!(o.has_priority());
        let got: Vec<u64> = std::iter::from_fn(|| o.pop_front()).take(18).collect();
        assert_eq!(got[..16], (42..=57).collect::<Vec<_>>());
        assert_eq!(got[16..], [5, 0]);
    }

    #[test]
    fn hints_are_not_demands() {
        let h = readahead_hint(77, true);
        assert_ne!(h & HINT, 0);
        assert_ne!(h & SEQUENTIAL, 0);
        assert_eq!(h & !(HINT | SEQUENTIAL), 77);
        assert_eq!(readahead_hint(77, false) & SEQUENTIAL, 0);
    }

    #[test]
    fn window_grows_with_throughput_and_halves_on_errors() {
        let mut w = Window::new(64);
        assert_eq!(w.size, 4);
        for _ in 0..4 {
            w.success(1 << 20);
        }
        assert_eq!(w.size, 8, "doubles while the rate grows");
        // A window-full at a clearly lower rate gives back a quarter.
        w.last_rate = f64::MAX;
        for _ in 0..8 {
            w.success(1);
        }
        assert_eq!(w.size, 6);
        let grown = w.size;
        w.error();
        assert_eq!(w.size, (grown / 2).max(1));
        for _ in 0..100 {
            w.error();
        }
        assert_eq!(w.size, 1);
    }
}
