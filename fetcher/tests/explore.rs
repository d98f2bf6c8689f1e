//! The crash-and-race explorer (DESIGN.md, test tier 4): seeded workloads
//! against the engine, every crash state they can leave, and an oracle.
//!
//! A run is a sequence of sessions on one parcel. Each session opens the
//! engine on a cache whose files go through a recording log
//! (`fetcher::local::cache::record`), and runs guest threads — writes (the
//! engine's own and the ublk queue's sequence: prepare, mark dirty, data,
//! mark dirty), reads, discards, FLUSHes — beside prefetch, hoard and
//! `sync`, over a store that fails and delays chunk GETs; the threads'
//! order is perturbed at the engine's synchronisation points (stripe lock,
//! in-flight map, fill, record save) with seeded delays and stalls: a
//! stalled thread goes on once the others took some steps. Half of the
//! threads' I/O goes to a hot chunk, one the cache does not hold when the
//! session starts (a never-stored one if it can be), where fills race
//! with writes. Between sessions: publish, `isr discard` (back to the
//! store's HEAD, read from the store), a damaged chunk and `isr check`.
//! Model events (write/flush/read start and end, store commits) go into
//! the same log as the file operations, so any prefix of the log is a
//! point a crash could hit with the model as it was there.
//!
//! After each session, crash points are drawn from its log; each gives the
//! state a crash of the process leaves (reopened with the same boot id and
//! another) and several a crash of the host may leave (another boot id;
//! see `explore/crash.rs`). Each state is opened as `isr` would (recovery,
//! reconcile with the store as it was at that point), read whole and
//! checked against the model (`explore/model.rs`): every write a completed
//! FLUSH covered reads back, no block holds what was never written there;
//! then published, and the store's new version must equal what was read.
//! Reads during the session are checked the same way. A session may go on
//! from a host-crash state instead of its clean end.
//!
//! `cargo test -p fetcher --test explore` runs the bounded CI set;
//! `ISR_EXPLORE_SEEDS=N` runs N seeds (from `ISR_EXPLORE_FROM`, default 1),
//! `ISR_EXPLORE_SEED=S` one seed. A failure prints its seed and the line
//! that replays it. Not seen here: the ublk queue's own io_uring (the
//! explorer issues its sequence with pread/pwrite), ext4 below the page
//! cache (the crash model is page-granular writeback), and the kernel's
//! block layer.

mod explore {
    pub mod crash;
    pub mod defects;
    pub mod guest;
    pub mod inspect;
    pub mod model;
    pub mod store;

    /// A 64-bit mixer (splitmix64's finaliser).
    pub fn splitmix(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use explore::crash::{self, Files};
use explore::guest::{Guest, Rng};
use explore::inspect::{chunks_in, history, read_version};
use explore::model::{BLOCK, Event, Events, Model, Recorder, block_data, tag_of};
use explore::splitmix;
use explore::store::{self as xstore, Objects, URL};
use fetcher::local::cache::{FileLog, FileOp};
use fetcher::{Engine, EngineOptions, Parcel, no_progress};
use format::{ChunkEntry, Secret};

const CHUNK: u64 = 64 * 1024;
const CHUNKS: u64 = 10;
const PER_CHUNK: u64 = CHUNK / BLOCK as u64;
const BLOCKS: u64 = CHUNKS * PER_CHUNK;
const NAME: &str = "vm";
/// The top of the tag of the data a damage writes (no write's tag has it).
const JUNK: u64 = 0xbad;

fn secret() -> Secret {
    Secret::new(&[0x5e; 32])
}

/// What a run explored.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    sessions: u64,
    guest_ops: u64,
    file_ops: u64,
    crash_points: u64,
    crash_states: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.sessions += o.sessions;
        self.guest_ops += o.guest_ops;
        self.file_ops += o.file_ops;
        self.crash_points += o.crash_points;
        self.crash_states += o.crash_states;
    }
}

/// How hard a run pushes (the CI set and a long run use the same).
#[derive(Debug, Clone, Copy)]
struct Shape {
    sessions: u64,
    crash_points: u64,
    host_states: u64,
}

const SHAPE: Shape = Shape {
    sessions: 5,
    crash_points: 6,
    host_states: 3,
};

/// Where the run stands between sessions.
struct Run {
    seed: u64,
    rng: Rng,
    rt: tokio::runtime::Runtime,
    tmp: tempfile::TempDir,
    /// The cache files the next session starts from (empty: none yet).
    files: Files,
    /// The store's objects the next session starts from.
    objects: Objects,
    /// Per block, what it may hold when the next session starts.
    initial: Vec<BTreeSet<u64>>,
    /// The cache was closed cleanly (`isr check` may damage and repair it).
    clean: bool,
    boot: u64,
    /// The chunk the guests meet on (a never-stored one if the parcel has
    /// one: the zero fill's races are there).
    hot: u64,
    /// The chunk the last failed check was about (for the history dump).
    failed_chunk: Option<u64>,
    tally: Tally,
    next_tag: u64,
    n_dirs: u64,
}

fn boot_id(n: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..].copy_from_slice(b"explore!");
    b
}

fn options(root: &Path, boot: u64, prefetch: bool) -> EngineOptions {
    EngineOptions {
        cache_root: root.to_owned(),
        miss_timeout: Duration::from_secs(60),
        prefetch,
        max_fetches: 4,
        host: "explorer".into(),
        boot_id: Some(boot_id(boot)),
        ..Default::default()
    }
}

fn cache_dir(root: &Path) -> PathBuf {
    fetcher::local::cache::cache_dir(root, URL, NAME)
}

impl Run {
    /// A run of `seed`: a parcel whose chunks are data, all zero, or mixed.
    fn new(seed: u64) -> Run {
        let mut rng = Rng(seed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut initial = Vec::new();
        let mut image = Vec::new();
        for b in 0..BLOCKS {
            let c = b / PER_CHUNK;
            let tag = match splitmix(seed ^ c) % 3 {
                0 => 0,
                1 => (1 << 40) | b,
                _ if rng.chance(3) => 0,
                _ => (1 << 40) | b,
            };
            initial.push(BTreeSet::from([tag]));
            image.extend_from_slice(&block_data(tag, b));
        }
        let zero_chunks: Vec<u64> = (0..CHUNKS)
            .filter(|&c| {
                (c * PER_CHUNK..(c + 1) * PER_CHUNK).all(|b| initial[b as usize].contains(&0))
            })
            .collect();
        let hot = match zero_chunks.len() {
            0 => rng.below(CHUNKS),
            n => zero_chunks[rng.below(n as u64) as usize],
        };
        let objects = xstore::imported(&rt, tmp.path(), &image, NAME, secret(), CHUNK as u32);
        Run {
            seed,
            rng,
            rt,
            tmp,
            files: Files::default(),
            objects,
            initial,
            clean: true,
            boot: 1,
            hot,
            failed_chunk: None,
            tally: Tally::default(),
            next_tag: 1,
            n_dirs: 0,
        }
    }

    fn fresh_root(&mut self) -> PathBuf {
        self.n_dirs += 1;
        let root = self.tmp.path().join(format!("r{}", self.n_dirs));
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    /// Runs the whole seed.
    fn explore(&mut self, shape: Shape) -> Result<(), String> {
        for s in 0..shape.sessions {
            self.session(shape)
                .map_err(|e| format!("session {s}: {e}"))?;
        }
        Ok(())
    }

    /// One session: (a lifecycle step), open, guest threads, end; then its
    /// crash states.
    fn session(&mut self, shape: Shape) -> Result<(), String> {
        self.tally.sessions += 1;
        // Each session's choices derive from the seed and its number, the
        // crash points' from those: a replay makes the same choices even
        // where the threads' order made the logs differ.
        self.rng = Rng(splitmix(self.seed ^ (self.tally.sessions << 40)));
        let mut crng = Rng(splitmix(self.rng.next() ^ 0xc4a5));
        let root = self.fresh_root();
        let dir = cache_dir(&root);
        if !self.files.is_empty() {
            crash::materialize(&self.files, &dir);
        }
        let base_files = self.files.clone();
        let base_objects = self.objects.clone();
        let initial = self.initial.clone();
        let log = Arc::new(FileLog::new());
        let events = Arc::new(Events::default());
        let rec = Recorder {
            log: log.clone(),
            events: events.clone(),
        };
        {
            let seed = self.seed ^ 0x5eed;
            let n = AtomicU64::new(0);
            let steps = Arc::downgrade(&log);
            log.on_point(move |point| {
                let r = splitmix(seed ^ n.fetch_add(1, Ordering::Relaxed));
                // Where a decision was taken on a chunk's state that the
                // next step relies on, stall more often.
                let window = matches!(
                    point,
                    "demand: absent zero chunk" | "fill_zeros: begin" | "fetch: giving up"
                );
                match (window, if window { r % 8 } else { r % 64 }) {
                    // A descheduled thread: it goes on once the others have
                    // taken some steps (file operations or model events),
                    // say a write, its acknowledgement and a FLUSH.
                    (true, 0..=3) | (false, 0) => {
                        if let Some(log) = steps.upgrade() {
                            stall_for_steps(&log, 1 + (r >> 8) % 32);
                        }
                    }
                    (_, 4..=8) => std::thread::sleep(Duration::from_micros((r >> 8) % 400)),
                    (false, 9..=24) => std::thread::yield_now(),
                    _ => {}
                }
            });
        }
        let _recording = fetcher::local::cache::record(&dir, log.clone());
        let fail = [0, 20, 100][self.rng.below(3) as usize];
        let (store, mem) = xstore::store(
            &self.rt,
            &self.objects,
            Some((log.clone(), events.clone())),
            fail,
            self.seed ^ self.tally.sessions,
        );
        let parcel = Parcel::new(store, NAME, secret()).unwrap();

        // Between sessions, with the engine closed.
        if !self.files.is_empty() {
            if self.clean && self.rng.chance(3) {
                self.damage_and_check(&parcel, &root, &dir, &rec, &initial)?;
            } else if self.rng.chance(3) && fetcher::local::cache::Cache::exists(&dir) {
                // (A crash before the cache was complete left none: there
                // is nothing to discard.)
                let published = self.head_tags();
                // isr discard: every block goes back to the store's HEAD.
                let d = fetcher::engine::Discard::open(URL, NAME, &root)
                    .map_err(|e| format!("discard: {e}"))?;
                self.reassert(&rec, &published, true, |_| {
                    d.apply().map(|_| ()).map_err(|e| format!("discard: {e}"))
                })?;
                drop(d);
            }
        }

        self.pick_hot(&dir);
        let prefetch = self.rng.chance(2);
        let engine = Arc::new(
            Engine::open(parcel.clone(), options(&root, self.boot, prefetch))
                .map_err(|e| format!("open: {e}"))?,
        );
        let threads = 2 + self.rng.below(2);
        let hot = self.hot;
        let ops_each = 6 + self.rng.below(18);
        let with_sync = self.rng.chance(2);
        let with_hoard = self.rng.chance(5);
        let stop = AtomicBool::new(false);
        let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let ids = AtomicU64::new(1);
        let tag_base = self.next_tag;
        self.next_tag += 1;
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (engine, rec, ids, failures) = (&engine, &rec, &ids, &failures);
                let seed = splitmix(self.seed ^ (t << 32) ^ self.tally.sessions);
                scope.spawn(move || {
                    let mut g = Guest {
                        engine,
                        rec,
                        ids,
                        rng: Rng(seed),
                        tag: (tag_base << 24) | (t << 20) | (1 << 48),
                        hot,
                    };
                    for _ in 0..ops_each {
                        if let Err(e) = g.op() {
                            failures.lock().unwrap().push(e);
                            return;
                        }
                    }
                });
            }
            if with_sync {
                let (engine, stop, failures) = (&engine, &stop, &failures);
                scope.spawn(move || {
                    for _ in 0..2 {
                        std::thread::sleep(Duration::from_millis(2));
                        if let Err(e) = engine.sync(no_progress(), stop) {
                            failures.lock().unwrap().push(format!("sync: {e}"));
                        }
                    }
                });
            }
            if with_hoard {
                let (engine, failures) = (&engine, &failures);
                scope.spawn(move || {
                    if let Err(e) = engine.hoard(no_progress()) {
                        failures.lock().unwrap().push(format!("hoard: {e}"));
                    }
                });
            }
        });
        self.tally.guest_ops += threads * ops_each;
        if let Some(e) = failures.lock().unwrap().first() {
            return Err(e.clone());
        }

        // The end of the session: publish (as a suspend does), close, or
        // just stop (the engine flushes as it goes).
        let end = self.rng.below(3);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        rec.push(Event::FlushStart { id });
        let ended = match end {
            0 => engine
                .publish(None, 0)
                .map(|_| rec.push(Event::Published))
                .and_then(|()| engine.close()),
            1 => engine.close(),
            _ => engine.flush(),
        };
        ended.map_err(|e| format!("end of session ({end}): {e}"))?;
        rec.push(Event::FlushEnd { id });
        drop(engine);

        let ops = log.snapshot();
        self.tally.file_ops += ops
            .iter()
            .filter(|o| !matches!(o, FileOp::Event(_)))
            .count() as u64;
        let end_model = Model::replay(&initial, &ops, &events);
        if let Some(v) = end_model.read_violations.first() {
            return Err(format!(
                "{v} ({} reads wrong in all)",
                end_model.read_violations.len()
            ));
        }

        // Crash states of this session.
        let mut go_on: Option<(Files, Objects, Vec<BTreeSet<u64>>)> = None;
        for _ in 0..shape.crash_points {
            self.tally.crash_points += 1;
            let at = 1 + crng.below(ops.len() as u64) as usize;
            let prefix = &ops[..at];
            let model = Model::replay(&initial, prefix, &events);
            let mut objects = base_objects.clone();
            for (p, b) in &model.puts {
                objects.insert(p.clone(), b.clone());
            }
            let files = crash::process_crash(&base_files, prefix);
            for boot in [self.boot, self.boot + 1] {
                self.check_state(&files, &objects, &model, boot)
                    .map_err(|e| {
                        format!(
                            "process crash at log entry {at} of {}, reopened on boot {boot}: {e}{}",
                            ops.len(),
                            history(prefix, &events, self.failed_chunk)
                        )
                    })?;
            }
            for k in 0..shape.host_states {
                let files = crash::host_crash(&base_files, prefix, &mut || crng.next());
                let tags = self
                    .check_state(&files, &objects, &model, self.boot + 1)
                    .map_err(|e| {
                        format!(
                            "host crash {k} at log entry {at} of {}: {e}{}",
                            ops.len(),
                            history(prefix, &events, self.failed_chunk)
                        )
                    })?;
                // Not from damage a crash left unrepaired: the model of
                // the next session would take it for data (and `isr
                // discard` rightly leaves a clean chunk as it is).
                if go_on.is_none() && crng.chance(8) && !tags.iter().any(|&t| t >> 40 == JUNK) {
                    let initial = tags.iter().map(|&t| BTreeSet::from([t])).collect();
                    go_on = Some((files, objects.clone(), initial));
                }
            }
        }

        // The next session starts from the clean end, or from a crash.
        match go_on {
            Some((files, objects, initial)) => {
                self.files = files;
                self.objects = objects;
                self.initial = initial;
                self.clean = false;
                self.boot += 1;
            }
            None => {
                self.files = crash::read_dir(&dir);
                self.objects = xstore::objects(&self.rt, &mem);
                self.initial = (0..BLOCKS).map(|b| end_model.after_crash(b)).collect();
                self.clean = end != 2;
            }
        }
        Ok(())
    }

    /// The session's hot chunk: one the cache does not hold, if there is
    /// one (fills race with writes there), a never-stored one if it can be
    /// (the zero fill's races); else the last one.
    fn pick_hot(&mut self, dir: &Path) {
        if !dir.join("state").exists() {
            return;
        }
        let absent = chunks_in(dir, fetcher::local::cache::ABSENT);
        let head = self.head_manifest();
        let never_stored: Vec<u64> = absent
            .iter()
            .copied()
            .filter(|&c| head.chunks[c as usize] == ChunkEntry::Zero)
            .collect();
        for set in [never_stored, absent] {
            if !set.is_empty() {
                self.hot = set[self.rng.below(set.len() as u64) as usize];
                return;
            }
        }
    }

    /// The manifest of the store's HEAD as the next session finds it.
    fn head_manifest(&self) -> format::Manifest {
        let (store, _) = xstore::store(&self.rt, &self.objects, None, 0, 0);
        let parcel = Parcel::new(store, NAME, secret()).unwrap();
        self.rt
            .block_on(async { parcel.manifest(parcel.require_head().await?).await })
            .unwrap()
    }

    /// Per block, the tag the store's HEAD holds there (what `isr discard`
    /// brings back).
    fn head_tags(&self) -> Vec<BTreeSet<u64>> {
        let (store, _) = xstore::store(&self.rt, &self.objects, None, 0, 0);
        let parcel = Parcel::new(store, NAME, secret()).unwrap();
        let image = read_version(&self.rt, &parcel, None).unwrap();
        (0..BLOCKS)
            .map(|b| {
                let data = &image[b as usize * BLOCK..(b as usize + 1) * BLOCK];
                BTreeSet::from([tag_of(data, b).expect("the store holds whole blocks")])
            })
            .collect()
    }

    /// Runs `f`, during which every block may hold what it held or `to`;
    /// after it (`flush`: as if flushed), only `to`.
    fn reassert(
        &mut self,
        rec: &Recorder,
        to: &[BTreeSet<u64>],
        flush: bool,
        f: impl FnOnce(&mut Run) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut ids = Vec::new();
        for (b, tags) in to.iter().enumerate() {
            for &tag in tags {
                let id = (1 << 62) | ((b as u64) << 20) | self.rng.below(1 << 20);
                rec.push(Event::WriteStart {
                    id,
                    first: b as u64,
                    n: 1,
                    tag,
                });
                ids.push(id);
            }
        }
        f(self)?;
        for id in ids {
            rec.push(Event::WriteEnd { id });
        }
        if flush {
            rec.push(Event::FlushStart { id: 1 << 61 });
            rec.push(Event::FlushEnd { id: 1 << 61 });
        }
        Ok(())
    }

    /// Damages one present chunk of the closed cache (another write's data
    /// over one of its blocks, as a failing disk might), then `isr check`,
    /// which must drop it: the block reads what it held before again.
    fn damage_and_check(
        &mut self,
        parcel: &Parcel,
        root: &Path,
        dir: &Path,
        rec: &Recorder,
        held: &[BTreeSet<u64>],
    ) -> Result<(), String> {
        let present = chunks_in(dir, fetcher::local::cache::PRESENT);
        if present.is_empty() {
            return Ok(());
        }
        // The hot chunk when it can be (dropped, it is absent at the next
        // session, where the threads meet), else any.
        let c = if present.contains(&self.hot) && self.rng.chance(2) {
            self.hot
        } else {
            present[self.rng.below(present.len() as u64) as usize]
        };
        let b = c * PER_CHUNK + self.rng.below(PER_CHUNK);
        let junk = (JUNK << 40) | self.rng.below(1 << 20);
        let before = held[b as usize].clone();
        // The damage, as a write that may or may not be there...
        rec.push(Event::Damaged(c));
        let id = 1 << 60;
        rec.push(Event::WriteStart {
            id,
            first: b,
            n: 1,
            tag: junk,
        });
        let image = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("image"))
            .unwrap();
        let data = block_data(junk, b);
        rec.log
            .run(
                FileOp::Write {
                    file: "image".into(),
                    offset: b * BLOCK as u64,
                    data: data.clone(),
                },
                || image.write_all_at(&data, b * BLOCK as u64),
            )
            .unwrap();
        rec.push(Event::WriteEnd { id });
        // ... and check brings back what was there.
        let mut to: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); BLOCKS as usize];
        to[b as usize] = before;
        self.reassert(rec, &to, true, |_| {
            let report = fetcher::engine::check(parcel, root, no_progress())
                .map_err(|e| format!("check: {e}"))?;
            if !report.damaged.contains(&c) {
                return Err(format!("check did not find chunk {c} damaged: {report:?}"));
            }
            rec.push(Event::Repaired(c));
            Ok(())
        })
    }

    /// Opens a crash state as `isr` would, reads it whole, checks it
    /// against `model`, publishes, and checks the store's new version;
    /// returns the tags read.
    fn check_state(
        &mut self,
        files: &Files,
        objects: &Objects,
        model: &Model,
        boot: u64,
    ) -> Result<Vec<u64>, String> {
        self.tally.crash_states += 1;
        let root = self.fresh_root();
        let dir = cache_dir(&root);
        crash::materialize(files, &dir);
        let (store, _) = xstore::store(&self.rt, objects, None, 0, 0);
        let parcel = Parcel::new(store, NAME, secret()).unwrap();
        let engine = Engine::open(parcel.clone(), options(&root, boot, false))
            .map_err(|e| format!("open: {e}"))?;
        let mut disk = vec![0u8; (BLOCKS * BLOCK as u64) as usize];
        engine
            .read(0, &mut disk)
            .map_err(|e| format!("read: {e}"))?;
        let mut tags = Vec::new();
        for b in 0..model.blocks() {
            let data = &disk[b as usize * BLOCK..(b as usize + 1) * BLOCK];
            let possible = model.after_crash(b);
            match tag_of(data, b) {
                Ok(t) if possible.contains(&t) => tags.push(t),
                Ok(t) => {
                    self.failed_chunk = Some(b / PER_CHUNK);
                    return Err(format!(
                        "block {b} (chunk {}) holds tag {t:#x}; possible: {possible:x?}; {}",
                        b / PER_CHUNK,
                        model.describe(b)
                    ));
                }
                Err(what) => {
                    self.failed_chunk = Some(b / PER_CHUNK);
                    return Err(format!(
                        "block {b} (chunk {}) holds {what}; possible: {possible:x?}",
                        b / PER_CHUNK
                    ));
                }
            }
        }
        let published = engine
            .publish(None, 0)
            .map_err(|e| format!("publish after recovery: {e}"))?;
        let version = published.version;
        let stored = read_version(&self.rt, &parcel, Some(version))
            .map_err(|e| format!("reading back version {version}: {e}"))?;
        // A chunk damaged in the cache and not repaired yet is served as it
        // is (the model allows its bytes); the store holds what it held.
        let differs = (0..CHUNKS as usize).find(|&c| {
            !model.damaged.contains(&(c as u64))
                && stored[c * CHUNK as usize..(c + 1) * CHUNK as usize]
                    != disk[c * CHUNK as usize..(c + 1) * CHUNK as usize]
        });
        if let Some(c) = differs {
            self.failed_chunk = Some(c as u64);
            let b = (c as u64 * PER_CHUNK..(c as u64 + 1) * PER_CHUNK)
                .find(|&b| {
                    let r = b as usize * BLOCK..(b as usize + 1) * BLOCK;
                    stored[r.clone()] != disk[r]
                })
                .unwrap_or(0);
            let r = b as usize * BLOCK..(b as usize + 1) * BLOCK;
            return Err(format!(
                "the version published after recovery ({version}) differs from the recovered disk at chunk {c}: block {b} holds {:?} there, {:?} in the store ({} chunks dirty before the publish, {} uploaded)",
                tag_of(&disk[r.clone()], b),
                tag_of(&stored[r], b),
                published.dirty_chunks,
                published.uploaded_chunks
            ));
        }
        engine.close().map_err(|e| format!("close: {e}"))?;
        drop(engine);
        let _ = std::fs::remove_dir_all(&root);
        Ok(tags)
    }
}

/// Waits until `steps` more entries are in `log`: the other threads made
/// that much progress. At most 10 ms (they may be waiting for this one).
fn stall_for_steps(log: &FileLog, steps: u64) {
    let until = log.len() + steps as usize;
    let deadline = Instant::now() + Duration::from_millis(10);
    while log.len() < until && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

/// Explores `seeds` on two threads; returns the tally and the failures.
fn explore_seeds(seeds: Vec<u64>, shape: Shape) -> (Tally, Vec<(u64, String)>) {
    let next = AtomicU64::new(0);
    let tally = Mutex::new(Tally::default());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&seed) = seeds.get(i) else { return };
                    let mut run = Run::new(seed);
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run.explore(shape)
                    }));
                    *tally.lock().unwrap() += run.tally;
                    let failed = match r {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e),
                        Err(p) => Some(format!(
                            "panicked: {}",
                            p.downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default()
                        )),
                    };
                    if let Some(e) = failed {
                        eprintln!(
                            "explore: seed {seed} FAILED: {e}\n  reproduce: ISR_EXPLORE_SEED={seed} cargo test -p fetcher --test explore -- explore_seeds --nocapture"
                        );
                        failures.lock().unwrap().push((seed, e));
                    }
                }
            });
        }
    });
    (tally.into_inner().unwrap(), failures.into_inner().unwrap())
}

#[test]
fn explore_seeds_crash_states_and_interleavings() {
    let seeds: Vec<u64> = match (env_u64("ISR_EXPLORE_SEED"), env_u64("ISR_EXPLORE_SEEDS")) {
        (Some(s), _) => vec![s],
        (None, Some(n)) => {
            let from = env_u64("ISR_EXPLORE_FROM").unwrap_or(1);
            (from..from + n).collect()
        }
        (None, None) => (1..=CI_SEEDS).collect(),
    };
    let started = Instant::now();
    let (tally, failures) = explore_seeds(seeds.clone(), SHAPE);
    eprintln!(
        "explore: {} seeds in {:.1} s: {} sessions, {} guest ops, {} file ops, {} crash points, {} crash states; {} failed",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        tally.sessions,
        tally.guest_ops,
        tally.file_ops,
        tally.crash_points,
        tally.crash_states,
        failures.len()
    );
    assert!(tally.crash_states > 0, "nothing was explored");
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}

/// Seeds of the bounded run in CI (about a minute on two cores).
const CI_SEEDS: u64 = 30;
