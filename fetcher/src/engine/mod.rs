//! The chunk engine: everything the block device does, without the device.
//!
//! ```text
//!  read / write / flush / discard          (sync; called from any thread)
//!        │  present? ── lock-free entry load ── yes ──► pread/pwrite the cache image
//!        │  no: demand(c) ──► Slot (one per chunk in flight: single flight)
//!        ▼                          ▲ completes, wakes condvar waiters + eventfds
//!  scheduler (tokio, own runtime): demand first, then prefetch
//!        │  (trace order, then ascending) within an adaptive window
//!        ▼
//!  fetch task: store get → verify/decrypt/decompress (blocking pool)
//!        → pwrite + fdatasync image → mark present
//! ```
//!
//! Writes mark chunks dirty (with a generation); [`Engine::publish`] uploads
//! dirty chunks and commits the next version (see `upload/publish.rs`).
//!
//! Its rooms: `io/` (the data path: fetch, write, hoard), `upload/` (sync,
//! publish, fork), `repair/` (open and reconcile, check, discard).

mod io;
mod options;
mod repair;
mod report;
mod upload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use format::{ChunkEntry, ChunkKey, Geometry, Manifest};
use tokio::sync::mpsc;

use crate::local::cache::{self, ABSENT, Cache, CacheIo, DIRTY, Header, PRESENT};
use crate::local::notify::Notifier;
use crate::transfer::meter::RateMeter;
use crate::{Error, Parcel};

use io::fetch;
pub use io::fetch::Slot;
pub use options::EngineOptions;
pub use repair::check::{CheckReport, check};
pub use repair::discard::{CacheLease, Discard, DiscardReport, release_cache_lease};
use repair::reconcile;
pub use report::{EngineStats, OpenReport};
pub use upload::fork::fork;
pub use upload::publish::{PublishSummary, SavedVm};
use upload::sync::SyncRecord;
pub use upload::sync::SyncSummary;

const STRIPES: usize = 256;

/// The version the cache is based on, its manifest, and where each stored
/// chunk appears (a chunk that repeats is fetched once for all its places).
pub(crate) struct Base {
    pub(crate) version: u64,
    pub(crate) manifest: Manifest,
    pub(crate) by_key: HashMap<ChunkKey, Vec<u64>>,
}

impl Base {
    pub(crate) fn new(version: u64, manifest: Manifest) -> Base {
        let mut by_key: HashMap<ChunkKey, Vec<u64>> = HashMap::new();
        for (i, e) in manifest.chunks.iter().enumerate() {
            if let ChunkEntry::Data(k) = e {
                by_key.entry(*k).or_default().push(i as u64);
            }
        }
        Base {
            version,
            manifest,
            by_key,
        }
    }

    pub(crate) fn entry(&self, c: u64) -> ChunkEntry {
        self.manifest.chunks[c as usize]
    }
}

pub(crate) struct Shared {
    parcel: Parcel,
    cache: Cache,
    geometry: Geometry,
    /// The base version and its manifest.
    base: RwLock<Arc<Base>>,
    stripes: Box<[Mutex<()>]>,
    /// Fetches in flight, one per stored chunk (single flight).
    inflight: Mutex<HashMap<ChunkKey, Arc<Slot>>>,
    /// Chunks being written whole while not local: the writes in flight
    /// and the slot their readers wait on (see `write.rs`).
    writing: Mutex<HashMap<u64, (usize, Arc<Slot>)>>,
    /// Per chunk, the writes between their begin and their end (see
    /// `write.rs`).
    writes_in_flight: Box<[std::sync::atomic::AtomicU32]>,
    demand_tx: mpsc::UnboundedSender<u64>,
    touched: Box<[AtomicU64]>,
    trace: Mutex<Vec<u64>>,
    prefetch_on: AtomicBool,
    fetched_chunks: AtomicU64,
    fetched_bytes: AtomicU64,
    /// Current fetch and upload rates (`isr status`).
    fetch_meter: RateMeter,
    upload_meter: RateMeter,
    uploaded_bytes: AtomicU64,
    /// Whether the last store operation succeeded, and its error if not.
    online: AtomicBool,
    last_store_error: Mutex<Option<String>>,
    window: AtomicU64,
    /// Stored chunks whose fetch failed for good (corrupt, missing):
    /// prefetch skips them.
    failed: Mutex<HashMap<ChunkKey, Arc<Error>>>,
    /// Signalled on every completed fetch (hoard waits on it).
    progress: (Mutex<u64>, Condvar),
    /// Which generations of dirty chunks the store holds (see `sync`).
    synced: Mutex<SyncRecord>,
    /// Held by a sync or publish while it uploads: one at a time.
    upload_pass: tokio::sync::Mutex<()>,
    /// When the device last did I/O (milliseconds since the engine opened),
    /// for `idle_for`.
    last_io: AtomicU64,
    opened: std::time::Instant,
    /// The upload pass running (sync or publish): plaintext bytes of dirty
    /// chunks done, and to do.
    pass_done: AtomicU64,
    pass_total: AtomicU64,
    options: EngineOptions,
    shutdown: AtomicBool,
    runtime: tokio::runtime::Handle,
}

/// The engine of one open parcel cache.
pub struct Engine {
    shared: Arc<Shared>,
    /// The fetcher's runtime, until [`close`](Engine::close) stops it.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    report: OpenReport,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("parcel", &self.shared.parcel.name())
            .field("cache", &self.shared.cache.dir())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Opens (creating, recovering and reconciling as needed) the cache of
    /// `parcel` and starts the fetcher. Must not be called from inside a
    /// tokio runtime: the engine runs its own.
    pub fn open(parcel: Parcel, options: EngineOptions) -> Result<Engine, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("isr-fetch")
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start the fetcher runtime: {e}")))?;
        let dir = options.cache_dir(&parcel);
        let mut report = OpenReport::default();
        let boot_id = options.boot_id.unwrap_or_else(cache::current_boot_id);
        let (cache, base) = runtime.block_on(reconcile::open_cache(
            &parcel,
            &dir,
            &options,
            boot_id,
            &mut report,
        ))?;
        let geometry = base.1.geometry();

        let trace = cache.read_trace()?;
        let touched: Box<[AtomicU64]> = (0..geometry.chunk_count().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        for &c in &trace {
            touched[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::Relaxed);
        }
        cache.update_header(|h| {
            h.open = true;
            h.boot_id = boot_id;
        })?;
        let (demand_tx, demand_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            parcel,
            cache,
            geometry,
            base: RwLock::new(Arc::new(Base::new(base.0, base.1))),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            inflight: Mutex::new(HashMap::new()),
            writing: Mutex::new(HashMap::new()),
            writes_in_flight: (0..geometry.chunk_count())
                .map(|_| Default::default())
                .collect(),
            demand_tx,
            touched,
            trace: Mutex::new(trace),
            prefetch_on: AtomicBool::new(options.prefetch),
            fetched_chunks: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            fetch_meter: RateMeter::new(),
            upload_meter: RateMeter::new(),
            uploaded_bytes: AtomicU64::new(0),
            online: AtomicBool::new(report.reached_store),
            last_store_error: Mutex::new(None),
            window: AtomicU64::new(4),
            failed: Mutex::new(HashMap::new()),
            progress: (Mutex::new(0), Condvar::new()),
            synced: Mutex::new(SyncRecord::load(&dir, base.0)),
            upload_pass: tokio::sync::Mutex::new(()),
            last_io: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            pass_done: AtomicU64::new(0),
            pass_total: AtomicU64::new(0),
            options,
            shutdown: AtomicBool::new(false),
            runtime: runtime.handle().clone(),
        });
        report.base_version = shared.base_version();
        runtime.spawn(fetch::scheduler(shared.clone(), demand_rx));
        Ok(Engine {
            shared,
            runtime: Mutex::new(Some(runtime)),
            report,
        })
    }

    /// What [`open`](Self::open) found.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The disk's geometry.
    pub fn geometry(&self) -> Geometry {
        self.shared.geometry
    }

    /// The version the cache is based on.
    pub fn base_version(&self) -> u64 {
        self.shared.base_version()
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.shared.cache.dir().to_owned()
    }

    /// The parcel.
    pub fn parcel(&self) -> &Parcel {
        &self.shared.parcel
    }

    /// Whether chunk `c` can be served from the cache now (lock-free): not
    /// absent, and not being written whole while not local.
    pub fn is_cached(&self, c: u64) -> bool {
        self.shared.is_cached(c)
    }

    /// Asks for chunk `c` without waiting: `None` if it is cached, else the
    /// slot of its fetch. With `notifier`, that eventfd is signalled when the
    /// fetch completes (for threads that sleep in their own io_uring).
    pub fn request(&self, c: u64, notifier: Option<&Arc<Notifier>>) -> Option<Arc<Slot>> {
        self.shared.demand(c, notifier)
    }

    /// Prepares a device I/O of `len` bytes at `offset` that will move its
    /// data straight to or from the cache image (the block device does that
    /// through its own io_uring): records the access, and returns the chunks
    /// that must be fetched first — for a read every chunk not cached, for
    /// a write those it covers only in part (or that another whole write is
    /// filling: it waits for that one). Before a write's data is submitted,
    /// call [`begin_write`](Self::begin_write); once it is in the image (or
    /// the write failed), [`end_write`](Self::end_write).
    pub fn prepare_io(&self, offset: u64, len: usize, write: bool) -> Result<Vec<u64>, Error> {
        let s = &self.shared;
        s.note_io();
        let mut need = Vec::new();
        let mut first = Vec::new();
        for span in s.spans(offset, len)? {
            if s.touch(span.chunk) {
                first.push(span.chunk);
            }
            if !self.is_cached(span.chunk) && (!write || !span.covers(&s.geometry)) {
                // Started here, so that the fetch is asked for before the
                // readahead below (the device's `request` joins it).
                s.demand(span.chunk, None);
                need.push(span.chunk);
            }
        }
        for c in first {
            s.readahead(c);
        }
        Ok(need)
    }

    /// The cache image, for a device that does its own I/O on it (through
    /// the page cache; see [`image_direct`](Self::image_direct)).
    pub fn image_file(&self) -> &std::fs::File {
        self.shared.cache.image.file()
    }

    /// The cache image opened with `O_DIRECT` and the alignment its I/O
    /// needs, when the cache works direct: a device reads and writes
    /// through it what is aligned, the rest through
    /// [`image_file`](Self::image_file) (one fdatasync on either covers
    /// both).
    pub fn image_direct(&self) -> Option<(&std::fs::File, usize)> {
        self.shared.cache.image_direct()
    }

    /// How the cache image's data is read and written now.
    pub fn cache_io(&self) -> CacheIo {
        match self.image_direct() {
            Some(_) => CacheIo::Direct,
            None => CacheIo::Buffered,
        }
    }

    /// How long a read of a missing chunk may wait.
    pub fn miss_timeout(&self) -> Duration {
        self.shared.options.miss_timeout
    }

    /// Reads `buf.len()` bytes at `offset`, waiting for missing chunks.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let s = &self.shared;
        s.note_io();
        for span in s.spans(offset, buf.len())? {
            let first = s.touch(span.chunk);
            s.ensure_cached_then(span.chunk, || {
                if first {
                    s.readahead(span.chunk);
                }
            })?;
            let dst = &mut buf[span.buf_offset..span.buf_offset + span.len as usize];
            let at = s.geometry.chunk_offset(span.chunk) + span.offset_in_chunk as u64;
            s.cache.read_image(dst, at)?;
        }
        Ok(())
    }

    /// The files a flush must sync (image, map, trace), for a device that
    /// syncs through its own ring; it reports the outcome with
    /// [`note_sync_result`](Self::note_sync_result).
    pub fn sync_files(&self) -> [&std::fs::File; 3] {
        self.shared.cache.sync_files()
    }

    /// Fails if a sync of the image failed earlier in this session.
    pub fn check_synced(&self) -> Result<(), Error> {
        self.shared.cache.check_synced()
    }

    /// Records the result of a sync done by the device (`res` as io_uring
    /// returns it: 0 or a negative errno): a failure makes every later flush
    /// fail.
    pub fn note_sync_result(&self, res: i32) -> Result<(), Error> {
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res);
            self.shared.cache.note_sync_failure(&e);
        }
        self.check_synced()
    }

    /// How long the device has done no I/O (since the engine opened, if
    /// it never did).
    pub fn idle_for(&self) -> Duration {
        let s = &self.shared;
        let now = s.opened.elapsed();
        now.saturating_sub(Duration::from_millis(s.last_io.load(Ordering::Relaxed)))
    }

    /// How far the running upload pass (a sync, or a publish) is: plaintext
    /// bytes of dirty chunks done, and in all; (0, 0) before the first.
    pub fn upload_progress(&self) -> (u64, u64) {
        let s = &self.shared;
        (
            s.pass_done.load(Ordering::Relaxed),
            s.pass_total.load(Ordering::Relaxed),
        )
    }

    /// Records that the store answered an operation made outside the engine
    /// (e.g. an offline daemon taking its lease on reconnecting).
    pub fn note_store_reached(&self) {
        self.shared.note_store_result(Ok(()));
    }

    /// Records that an operation outside the engine failed because the
    /// store could not be reached.
    pub fn note_store_failed(&self, e: &Error) {
        self.shared.note_store_result(Err(e));
    }

    /// Pauses or resumes background prefetch (demand fetches always run).
    pub fn set_prefetch(&self, on: bool) {
        self.shared.prefetch_on.store(on, Ordering::Relaxed);
        if on {
            // Wake the scheduler with a no-op demand.
            let _ = self.shared.demand_tx.send(u64::MAX);
        }
    }

    /// Counters and current rates.
    pub fn stats(&self) -> EngineStats {
        let s = &self.shared;
        let (mut cached, mut dirty, mut dirty_bytes) = (0, 0, 0);
        for c in 0..s.geometry.chunk_count() {
            match cache::state_of(s.cache.entry(c)) {
                ABSENT => {}
                DIRTY | cache::WRITING => {
                    cached += 1;
                    dirty += 1;
                    dirty_bytes += s.geometry.chunk_len(c) as u64;
                }
                _ => cached += 1,
            }
        }
        // Dirty chunks a sync put in the store already do not count.
        let (unsynced_chunks, pending_upload_bytes) = self.unsynced();
        EngineStats {
            fetched_chunks: s.fetched_chunks.load(Ordering::Relaxed),
            fetched_bytes: s.fetched_bytes.load(Ordering::Relaxed),
            cached_chunks: cached,
            dirty_chunks: dirty,
            dirty_bytes,
            unsynced_chunks,
            pending_upload_bytes,
            chunks: s.geometry.chunk_count(),
            window: s.window.load(Ordering::Relaxed),
            uploaded_bytes: s.uploaded_bytes.load(Ordering::Relaxed),
            fetch_rate: s.fetch_meter.rate(),
            upload_rate: s.upload_meter.rate(),
            link_estimate: s.fetch_meter.peak(),
            trace_chunks: s.trace.lock().expect("trace lock").len() as u64,
            online: s.online.load(Ordering::Relaxed),
            last_store_error: s.last_store_error.lock().expect("store error lock").clone(),
        }
    }

    /// Stops the fetcher, flushes, and marks the cache cleanly closed, so
    /// that the next open trusts the map as it is (a warm resume reads
    /// nothing). Callable through a shared reference (the daemon's control
    /// thread may still hold one); the engine serves nothing afterwards.
    /// If the flush fails, the cache stays marked open: the next open then
    /// treats it as an unclean stop, which is always safe.
    pub fn close(&self) -> Result<(), Error> {
        self.stop();
        self.flush()?;
        self.shared.cache.update_header(|h| h.open = false)?;
        self.shared.cache.unlock();
        Ok(())
    }

    /// Stops the fetcher; true if it was running.
    fn stop(&self) -> bool {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        let _ = self.shared.demand_tx.send(u64::MAX);
        let rt = self.runtime.lock().expect("runtime lock").take();
        match rt {
            Some(rt) => {
                rt.shutdown_timeout(Duration::from_secs(5));
                true
            }
            None => false,
        }
    }

    /// Runs `f` on the fetcher's runtime, from outside any runtime.
    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> Result<F::Output, Error> {
        if self.shared.shutdown.load(Ordering::Relaxed) {
            return Err(Error::Invalid(format!(
                "the engine of parcel {} is closed",
                self.shared.parcel.name()
            )));
        }
        Ok(self.shared.runtime.block_on(f))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.stop() {
            // Leave the `open` flag set unless everything was flushed: the
            // next open then treats the stop as unclean, which is always safe.
            if self.flush().is_ok() {
                let _ = self.shared.cache.update_header(|h| h.open = false);
            }
        }
    }
}

impl Shared {
    /// Counts `bytes` of chunk objects uploaded to the store (the rate and
    /// total `isr status` shows); a successful upload also means online.
    pub(crate) fn note_uploaded(&self, bytes: u64) {
        self.uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.upload_meter.add(bytes);
        self.note_store_result(Ok(()));
    }

    /// Records `bytes` of plaintext fetched.
    pub(super) fn note_fetched(&self, bytes: u64) {
        self.fetched_chunks.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.fetch_meter.add(bytes);
    }

    /// Records the outcome of a store operation: online is whether the last
    /// one succeeded.
    pub(crate) fn note_store_result(&self, result: Result<(), &Error>) {
        let was = self.online.swap(result.is_ok(), Ordering::Relaxed);
        match result {
            Ok(()) => {
                if !was {
                    tracing::info!(
                        parcel = self.parcel.name(),
                        "the store answers again: online"
                    );
                    *self.last_store_error.lock().expect("store error lock") = None;
                }
            }
            Err(e) => {
                if was {
                    tracing::info!(parcel = self.parcel.name(), error = %e, "a store operation failed: offline");
                }
                *self.last_store_error.lock().expect("store error lock") = Some(e.to_string());
            }
        }
    }

    fn base_version(&self) -> u64 {
        self.base.read().expect("base lock").version
    }

    fn base(&self) -> Arc<Base> {
        self.base.read().expect("base lock").clone()
    }

    fn spans(&self, offset: u64, len: usize) -> Result<format::geometry::Spans, Error> {
        self.geometry
            .spans(offset, len)
            .map_err(|e| Error::Invalid(e.to_string()))
    }

    fn stripe(&self, c: u64) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[c as usize % STRIPES]
            .lock()
            .expect("stripe lock")
    }

    /// Starts counting an upload pass over `chunks`.
    fn start_pass(&self, chunks: &[u64]) {
        let total = chunks
            .iter()
            .map(|&c| self.geometry.chunk_len(c) as u64)
            .sum();
        self.pass_done.store(0, Ordering::Relaxed);
        self.pass_total.store(total, Ordering::Relaxed);
    }

    /// Counts chunk `c` of the upload pass as done.
    fn pass_did(&self, c: u64) {
        self.pass_done
            .fetch_add(self.geometry.chunk_len(c) as u64, Ordering::Relaxed);
    }

    /// Records that the device does I/O now.
    fn note_io(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_io.fetch_max(ms, Ordering::Relaxed);
    }

    /// Records the first touch of chunk `c` in the access trace; true if
    /// this was it.
    fn touch(&self, c: u64) -> bool {
        let bit = 1u64 << (c % 64);
        if self.touched[(c / 64) as usize].fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            return false;
        }
        let mut trace = self.trace.lock().expect("trace lock");
        // A failed trace write loses only a prefetch hint.
        let _ = self.cache.write_trace(trace.len(), c);
        trace.push(c);
        true
    }

    fn touched(&self, c: u64) -> bool {
        self.touched[(c / 64) as usize].load(Ordering::Relaxed) & (1 << (c % 64)) != 0
    }

    /// Asks the scheduler to read ahead of chunk `c`, first touched now:
    /// the chunks after it, further when the chunk before was touched too
    /// (a sequential stream: files are mostly contiguous on disk). Sent
    /// after any demand for `c`, so that the demand goes first.
    ///
    /// Not for a RAM image: a guest's memory is not laid out in the order
    /// it is used, and the trace of the previous session (prefetched
    /// first) knows that order better.
    fn readahead(&self, c: u64) {
        if self.options.ram.is_some() {
            return;
        }
        let sequential = c > 0 && self.touched(c - 1);
        let _ = self.demand_tx.send(fetch::readahead_hint(c, sequential));
    }

    /// Waits until chunk `c` is cached, or fails naming it.
    fn ensure_cached(&self, c: u64) -> Result<(), Error> {
        self.ensure_cached_then(c, || {})
    }

    /// [`ensure_cached`](Self::ensure_cached), running `asked` once the
    /// fetch has been asked for (before waiting for it).
    ///
    /// A completed fetch is not the end: a whole write may have begun on
    /// the chunk meanwhile (its fill then left the chunk to the write, whose
    /// data is not in yet), so the chunk is asked for again until it is
    /// cached, as the device's queues do.
    fn ensure_cached_then(&self, c: u64, asked: impl FnOnce()) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + self.options.miss_timeout;
        let mut slot = self.demand(c, None);
        asked();
        while let Some(s) = slot {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            s.wait(left).map_err(|cause| self.wait_error(c, cause))?;
            slot = self.demand(c, None);
        }
        Ok(())
    }

    /// The error of a read or write that waited for chunk `c` in vain.
    fn wait_error(&self, c: u64, cause: fetch::WaitError) -> Error {
        match cause {
            fetch::WaitError::Failed(e) => Error::Shared(e),
            fetch::WaitError::TimedOut(cause) => {
                let id = match self.base().entry(c) {
                    ChunkEntry::Data(k) => k.id(),
                    ChunkEntry::Zero => format::ChunkId([0; 32]),
                };
                Error::MissTimeout {
                    id,
                    index: c,
                    parcel: self.parcel.name().to_owned(),
                    seconds: self.options.miss_timeout.as_secs(),
                    cause,
                }
            }
        }
    }

    /// Fills every not-yet-cached place of a fetched chunk with `data`
    /// (where a write got there first, the write wins).
    fn fill(&self, places: &[u64], data: &[u8]) -> Result<(), Error> {
        self.fill_absent(places, |c| {
            self.cache.write_image(data, self.geometry.chunk_offset(c))
        })
    }

    /// Puts the content of each chunk of `chunks` that is still absent into
    /// the image with `put`, under the chunk's stripe lock (a write that
    /// got there first, having made the chunk dirty, wins: nothing is put
    /// over it), makes all of it durable with one shared sync, and only
    /// then marks those chunks present (invariant 3).
    fn fill_absent(
        &self,
        chunks: &[u64],
        put: impl Fn(u64) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut filled = Vec::with_capacity(chunks.len());
        for &c in chunks {
            let _g = self.stripe(c);
            self.cache.point("fill: locked");
            if cache::state_of(self.cache.entry(c)) != ABSENT {
                continue;
            }
            put(c)?;
            filled.push(c);
        }
        if filled.is_empty() {
            return Ok(());
        }
        self.cache.point("fill: put");
        // Shared with the fetches completing at the same time: the data is
        // durable once a sync begun after these writes has ended.
        self.cache.sync_image_shared()?;
        for c in filled {
            let _g = self.stripe(c);
            if cache::state_of(self.cache.entry(c)) == ABSENT {
                self.cache.set(c, PRESENT)?;
            }
        }
        Ok(())
    }

    /// A RAM engine publishes only with its disk's.
    pub(crate) fn refuse_if_ram(&self) -> Result<(), Error> {
        match self.options.ram {
            Some(_) => Err(Error::Invalid(format!(
                "the RAM of parcel {} is published with its disk, not on its own",
                self.parcel.name()
            ))),
            None => Ok(()),
        }
    }

    /// Wakes whoever waits for fetches to complete (`hoard`).
    fn note_progress(&self) {
        let (lock, cv) = &self.progress;
        *lock.lock().expect("progress lock") += 1;
        cv.notify_all();
    }
}

/// A fresh cache header for `manifest` at `version`.
fn new_header(version: u64, manifest: &Manifest) -> Result<Header, Error> {
    let mut cache_id = [0u8; 16];
    getrandom::fill(&mut cache_id).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
    Ok(Header {
        base_version: version,
        disk_size: manifest.disk_size,
        chunk_size: manifest.chunk_size,
        cache_id,
        open: false,
        boot_id: [0; 16],
        cache_io: None,
    })
}
