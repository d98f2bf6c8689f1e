//! The local cache of one parcel on one host: a sparse plaintext image (chunk
//! i at offset i × chunk size) and a persistent chunk-state map.
//!
//! ```text
//! <root>/<blake3(store URL)[..16]>/<parcel>/
//!     lock            flock held by the one process using the cache
//!     image           sparse plaintext disk image
//!     state           4 KiB header + one u64 per chunk: state (2 bits: absent,
//!                     present, dirty, writing) | generation
//!     synced          what `isr sync` uploaded (engine/upload/sync.rs)
//!     trace           u64 chunk indices, first touches of this session, in order
//!     manifests/<v>   the encrypted manifest the cache is based on
//!     lease           nonce of the store lease this cache holds, if any
//! ```
//!
//! Durability rules (DESIGN.md invariants 2 and 3):
//! * a fetched chunk's data is fdatasync'ed before its entry says present
//!   (and a publish syncs the image before it marks chunks present);
//! * a write's data and dirty mark are written at once and made durable by
//!   the next flush (data first, then the map), before the flush completes;
//! * a write marks its chunk dirty in the map *before* its data goes to the
//!   image (and again after), so that whatever of the data reached the page
//!   cache, the dirty mark did too;
//! * a write covering a whole chunk that is not local marks it
//!   [`WRITING`], and the map on disk keeps saying so until a flush has
//!   synced the image ([`Cache::settle`]): a dirty entry never reaches the
//!   disk before the data it stands for;
//! * a chunk is dropped absent durably before its hole is punched
//!   ([`Cache::drop_chunks`]);
//! * the map appears whole, renamed into place after the base manifest
//!   ([`Cache::create`]): a cache exists only once it is complete;
//! * the header's `open` flag and the boot id are set (and synced) while a
//!   process uses the cache. Finding the flag set on open means an unclean
//!   stop. On the same boot (the daemon died, the kernel did not) the page
//!   cache kept every write and every dirty mark in that order: nothing is in
//!   doubt and nothing is re-read but a whole write still in flight
//!   ([`Cache::resolve_writing`]). After a host crash (another boot id),
//!   data may have reached the disk without its dirty mark: the chunks
//!   marked present that hold data are re-hashed against the manifest (holes
//!   are never read), and one that does not match becomes dirty, so nothing
//!   the guest wrote is silently dropped; every dirty chunk takes a new
//!   generation (an `isr sync` record cannot vouch for one whose content a
//!   crash put in doubt);
//! * a failed sync of the image is remembered for the whole session (Linux
//!   reports a writeback error to the first fsync only): every later sync,
//!   and so every later FLUSH, fails too.
//!
//! The directory is 0700 and its files 0600 (they hold the plaintext disk).
//! Every change to them goes through `file.rs` (a seam that can record it).

mod file;
mod io_mode;

pub use file::{CacheFile, FileLog, FileOp, Recording, record};
pub use io_mode::CacheIo;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Error;
use crate::local::private;

/// Chunk states, in the low two bits of an entry.
pub const ABSENT: u64 = 0;
/// The chunk's data in the image equals the base manifest's.
pub const PRESENT: u64 = 1;
/// The chunk was written since the base version; it must be uploaded.
pub const DIRTY: u64 = 2;
/// The chunk is being written whole while its base content is not local
/// (the write skipped the fetch): until that data is in the image, the
/// chunk holds neither the old content nor the new, so nothing reads it
/// (readers and partial writers wait), and on disk it stays in this state
/// until a flush has made the data durable (see [`Cache::settle`]). Found
/// after a crash, it goes back to the base (see [`Cache::resolve_writing`]).
pub const WRITING: u64 = 3;
const STATE_MASK: u64 = 3;

const MAGIC: &[u8; 4] = b"ISRs";
const FORMAT: u32 = 1;
const HEADER_LEN: u64 = 4096;
const FLAG_OPEN: u32 = 1;

/// An entry's state.
pub fn state_of(entry: u64) -> u64 {
    entry & STATE_MASK
}

/// An entry's generation (bumped by every write to a dirty chunk).
pub fn generation_of(entry: u64) -> u64 {
    entry >> 2
}

fn entry(state: u64, generation: u64) -> u64 {
    (generation << 2) | state
}

/// Default root of all caches: `$ISR_CACHE_DIR`, else `/var/lib/isr` for
/// root, else `$XDG_CACHE_HOME/isr` (or `~/.cache/isr`).
pub fn default_cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("ISR_CACHE_DIR") {
        return dir.into();
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return "/var/lib/isr".into();
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        return Path::new(&xdg).join("isr");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    Path::new(&home).join(".cache/isr")
}

/// The directory of one (store, parcel) cache under `root`.
pub fn cache_dir(root: &Path, store_url: &str, parcel: &str) -> PathBuf {
    let h = blake3::hash(store_url.trim_end_matches('/').as_bytes()).to_hex();
    root.join(&h.as_str()[..16]).join(parcel)
}

/// The cache of the guest RAM of `parcel` (see
/// [`EngineOptions::ram`](crate::EngineOptions::ram)): beside the disk's,
/// under a name no parcel can have.
pub fn ram_cache_dir(root: &Path, store_url: &str, parcel: &str) -> PathBuf {
    cache_dir(root, store_url, parcel).with_file_name(format!("{parcel}+ram"))
}

/// The persistent header of a cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub base_version: u64,
    pub disk_size: u64,
    pub chunk_size: u32,
    pub cache_id: [u8; 16],
    pub open: bool,
    /// The boot the cache was last opened in (see [`current_boot_id`]).
    pub boot_id: [u8; 16],
    /// How its image's data is read and written, as last asked (`None`:
    /// never asked, a cache from before the choice existed).
    pub cache_io: Option<CacheIo>,
}

pub use crate::host::current_boot_id;

/// What [`Cache::repair`] fixed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Map entries with an impossible state (made absent): a chunk being
    /// written whole in a cache that was closed cleanly.
    pub bad_entries: u64,
    /// Chunks present in the map but cut off a truncated image (absent now).
    pub truncated: Vec<u64>,
    /// Dirty chunks cut off a truncated image: unpublished data lost.
    pub lost_dirty: Vec<u64>,
}

/// An open cache: its files, held locked, and the chunk-state map in memory.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    _lock: File,
    pub(crate) image: CacheFile,
    state: CacheFile,
    trace: CacheFile,
    entries: Box<[AtomicU64]>,
    /// Chunks written whole while not local whose data no flush has made
    /// durable yet: their map entries say WRITING on disk (see `settle`).
    unsettled: Box<[std::sync::atomic::AtomicBool]>,
    header: std::sync::Mutex<Header>,
    /// The first failed sync of the image, kept until the cache is closed.
    sync_failure: OnceLock<String>,
    /// Syncs of the image shared by concurrent fetches.
    group: crate::local::group_sync::GroupSync,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| Error::io(op, path, e)
}

impl Cache {
    /// Locks the cache directory `dir` (creating it), so that no second
    /// process opens it. Fails naming the holder's pid if it is in use.
    pub fn lock(dir: &Path) -> Result<File, Error> {
        private::create_dir_all(dir).map_err(io_err("create", dir))?;
        if let Some(store_dir) = dir.parent() {
            private::narrow(store_dir, private::DIR_MODE).map_err(io_err("chmod", store_dir))?;
        }
        let manifests = dir.join("manifests");
        private::create_dir_all(&manifests).map_err(io_err("create", &manifests))?;
        let path = dir.join("lock");
        let lock = open_rw(&path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(Error::CacheBusy {
                    dir: dir.display().to_string(),
                    holder: holder.trim().to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
        }
        lock.set_len(0).map_err(io_err("write", &path))?;
        lock.write_all_at(format!("pid {}\n", std::process::id()).as_bytes(), 0)
            .map_err(io_err("write", &path))?;
        Ok(lock)
    }

    /// Whether `dir` holds a cache (its state file exists).
    pub fn exists(dir: &Path) -> bool {
        dir.join("state").is_file()
    }

    /// Creates a fresh cache in the locked `dir` based on `manifest` (the
    /// encrypted manifest object of the header's base version): an empty
    /// sparse image and a map in which chunks listed in `present` are
    /// present (all-zero chunks: the sparse image already reads them as
    /// zeros) and the rest absent. The map appears last, whole and durable
    /// (written aside and renamed into place): a cache exists
    /// ([`exists`](Self::exists)) only once it is complete, so a creation
    /// cut short by a crash is simply done again.
    pub fn create(
        lock: File,
        dir: &Path,
        header: Header,
        manifest: &[u8],
        present: &[bool],
    ) -> Result<Cache, Error> {
        for name in ["state", "image", "trace"] {
            let p = dir.join(name);
            if p.exists() {
                std::fs::remove_file(&p).map_err(io_err("remove", &p))?;
            }
        }
        let version = header.base_version;
        file::replace(dir, &format!("manifests/{version}"), manifest).map_err(io_err(
            "write",
            &dir.join("manifests").join(version.to_string()),
        ))?;
        let image_path = dir.join("image");
        let image = CacheFile::open(dir, "image")?;
        let trace = CacheFile::open(dir, "trace")?;
        // Fresh files (the old ones were removed): a recording log starts
        // them empty too.
        for f in [&image, &trace] {
            f.set_len(0).map_err(io_err("size", f.path()))?;
        }
        image
            .set_len(header.disk_size)
            .map_err(io_err("size", &image_path))?;
        image.sync_data().map_err(io_err("sync", &image_path))?;
        let mut bytes = encode_header(&header);
        bytes.extend(
            present
                .iter()
                .flat_map(|&p| if p { PRESENT } else { ABSENT }.to_le_bytes()),
        );
        file::replace(dir, "state", &bytes).map_err(io_err("write", &dir.join("state")))?;
        Ok(Cache {
            dir: dir.to_owned(),
            _lock: lock,
            image,
            trace,
            state: CacheFile::open(dir, "state")?,
            entries: present
                .iter()
                .map(|&p| AtomicU64::new(if p { PRESENT } else { ABSENT }))
                .collect(),
            unsettled: present.iter().map(|_| Default::default()).collect(),
            header: std::sync::Mutex::new(header),
            sync_failure: OnceLock::new(),
            group: Default::default(),
        })
    }

    /// Opens the existing cache in the locked `dir`.
    pub fn open(lock: File, dir: &Path) -> Result<Cache, Error> {
        let state_path = dir.join("state");
        let state = CacheFile::open(dir, "state")?;
        let mut head = [0u8; 128];
        state
            .read_exact_at(&mut head, 0)
            .map_err(io_err("read", &state_path))?;
        let bad =
            |why: &str| Error::Invalid(format!("cache state {}: {why}", state_path.display()));
        if &head[0..4] != MAGIC {
            return Err(bad("not an isr cache state file"));
        }
        if u32::from_le_bytes(head[4..8].try_into().expect("4")) != FORMAT {
            return Err(bad("written by another isr version"));
        }
        let header = Header {
            open: u32::from_le_bytes(head[8..12].try_into().expect("4")) & FLAG_OPEN != 0,
            base_version: u64::from_le_bytes(head[16..24].try_into().expect("8")),
            disk_size: u64::from_le_bytes(head[24..32].try_into().expect("8")),
            chunk_size: u32::from_le_bytes(head[32..36].try_into().expect("4")),
            cache_id: head[40..56].try_into().expect("16"),
            boot_id: head[56..72].try_into().expect("16"),
            cache_io: CacheIo::from_code(u32::from_le_bytes(head[36..40].try_into().expect("4"))),
        };
        let count = format::Geometry::new(header.disk_size, header.chunk_size)
            .map_err(|e| bad(&e.to_string()))?
            .chunk_count() as usize;
        let mut bytes = vec![0u8; count * 8];
        state
            .read_exact_at(&mut bytes, HEADER_LEN)
            .map_err(io_err("read", &state_path))?;
        let entries = bytes
            .chunks_exact(8)
            .map(|b| AtomicU64::new(u64::from_le_bytes(b.try_into().expect("8"))))
            .collect();
        let cache = Cache {
            dir: dir.to_owned(),
            _lock: lock,
            image: CacheFile::open(dir, "image")?,
            trace: CacheFile::open(dir, "trace")?,
            state,
            unsettled: (0..count).map(|_| Default::default()).collect(),
            entries,
            header: std::sync::Mutex::new(header),
            sync_failure: OnceLock::new(),
            group: Default::default(),
        };
        Ok(cache)
    }

    /// Repairs what can be seen without reading data: entries with an
    /// impossible state become absent, and an image shorter than the disk
    /// (truncated behind isr's back) regains its size with the chunks it
    /// lost marked absent, to be fetched again. Returns the chunks dropped.
    pub fn repair(&self) -> Result<Repaired, Error> {
        let mut r = Repaired::default();
        let h = self.header();
        let g = format::Geometry::new(h.disk_size, h.chunk_size)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        for c in 0..self.len() as u64 {
            // After an unclean stop they are `resolve_writing`'s.
            if !h.open && state_of(self.entry(c)) == WRITING {
                self.set(c, ABSENT)?;
                r.bad_entries += 1;
            }
        }
        let path = self.dir.join("image");
        let len = self
            .image
            .file()
            .metadata()
            .map_err(io_err("stat", &path))?
            .len();
        if len < h.disk_size {
            for c in g.chunk_of(len)..g.chunk_count() {
                match state_of(self.entry(c)) {
                    ABSENT => {}
                    DIRTY | WRITING => r.lost_dirty.push(c),
                    _ => r.truncated.push(c),
                }
                self.set(c, ABSENT)?;
            }
            self.image
                .set_len(h.disk_size)
                .map_err(io_err("size", &path))?;
        } else if len > h.disk_size {
            self.image
                .set_len(h.disk_size)
                .map_err(io_err("size", &path))?;
        }
        if r != Repaired::default() {
            self.sync_state()?;
        }
        Ok(r)
    }

    /// Gives up the lock (at close: another process may open the cache).
    pub fn unlock(&self) {
        let _ = self._lock.unlock();
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A copy of the header.
    pub fn header(&self) -> Header {
        self.header.lock().expect("header lock").clone()
    }

    /// Changes the header and makes it durable.
    pub fn update_header(&self, f: impl FnOnce(&mut Header)) -> Result<(), Error> {
        f(&mut self.header.lock().expect("header lock"));
        self.write_header()
    }

    fn write_header(&self) -> Result<(), Error> {
        let path = self.dir.join("state");
        self.state
            .write_all_at(&encode_header(&self.header()), 0)
            .and_then(|()| self.state.sync_data())
            .map_err(io_err("write", &path))
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the disk has no chunks.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The chunks whose state is `state`, ascending.
    pub fn chunks_in(&self, state: u64) -> Vec<u64> {
        (0..self.len() as u64)
            .filter(|&c| state_of(self.entry(c)) == state)
            .collect()
    }

    /// The entry of chunk `c` (lock-free).
    pub fn entry(&self, c: u64) -> u64 {
        self.entries[c as usize].load(Ordering::Acquire)
    }

    /// Sets chunk `c` to `state`, bumping the generation when it becomes or
    /// stays dirty (or being written), and writes the entry to the map
    /// (durable at the next [`sync_state`](Self::sync_state)). A chunk
    /// written whole while not local stays [`WRITING`] on disk, whatever
    /// it is in memory, until [`settle`](Self::settle)d. Callers hold the
    /// chunk's stripe lock.
    pub fn set(&self, c: u64, state: u64) -> Result<u64, Error> {
        let old = self.entry(c);
        let generation = generation_of(old) + u64::from(state == DIRTY || state == WRITING);
        let new = entry(state, generation);
        let unsettled = &self.unsettled[c as usize];
        match state {
            WRITING => unsettled.store(true, Ordering::Release),
            DIRTY => {}
            _ => unsettled.store(false, Ordering::Release),
        }
        self.entries[c as usize].store(new, Ordering::Release);
        let on_disk = if state == DIRTY && unsettled.load(Ordering::Acquire) {
            entry(WRITING, generation)
        } else {
            new
        };
        self.write_entry(c, on_disk)?;
        Ok(new)
    }

    fn write_entry(&self, c: u64, e: u64) -> Result<(), Error> {
        self.state
            .write_all_at(&e.to_le_bytes(), HEADER_LEN + c * 8)
            .map_err(io_err("write", &self.dir.join("state")))
    }

    /// The chunks whose whole write has landed in the image (they are dirty
    /// in memory) but that still say WRITING on disk. A flush takes them
    /// before it syncs the image, then [`settle`](Self::settle)s each.
    pub fn unsettled(&self) -> Vec<u64> {
        (0..self.len() as u64)
            .filter(|&c| {
                self.unsettled[c as usize].load(Ordering::Acquire)
                    && state_of(self.entry(c)) == DIRTY
            })
            .collect()
    }

    /// Writes chunk `c`'s dirty entry to the map, now that a sync of the
    /// image begun after its data landed has ended: its data can no longer
    /// be lost to a host crash that keeps the entry. (Only the order
    /// matters: an entry that said dirty before its data was durable
    /// would, after such a crash, present holes as the guest's data.)
    /// Callers hold the chunk's stripe lock.
    /// The flag is cleared only once the entry is written: a flush that
    /// finds the chunk settled can rely on its entry being in the map (a
    /// flush that cleared it first let another, begun later, complete
    /// before the entry was written).
    pub fn settle(&self, c: u64) -> Result<(), Error> {
        let e = self.entry(c);
        let unsettled = &self.unsettled[c as usize];
        if state_of(e) != DIRTY || !unsettled.load(Ordering::Acquire) {
            return Ok(());
        }
        self.point("settle: writing the entry");
        self.write_entry(c, e)?;
        unsettled.store(false, Ordering::Release);
        Ok(())
    }

    /// After an unclean stop: every chunk found WRITING was being written
    /// whole while not local. If `landed` (the same boot: the page cache
    /// kept everything) and the image holds data all over its range, the
    /// write got there and the chunk is dirty (a write that landed was
    /// perhaps acknowledged, and the guest may still be running on it);
    /// otherwise it goes back to the base version, absent: the write was
    /// never acknowledged, or (after a host crash) no flush covered it.
    /// Returns (made dirty, made absent).
    pub fn resolve_writing(&self, landed: bool) -> Result<(Vec<u64>, Vec<u64>), Error> {
        let writing = self.chunks_in(WRITING);
        if writing.is_empty() {
            return Ok(Default::default());
        }
        let g = self.geometry()?;
        let full = if landed {
            let extents = crate::local::sparse::data_extents(self.image.file(), g.disk_size())
                .map_err(io_err("seek", &self.dir.join("image")))?;
            writing
                .iter()
                .map(|&c| {
                    let (start, end) =
                        (g.chunk_offset(c), g.chunk_offset(c) + g.chunk_len(c) as u64);
                    extents.iter().any(|r| r.start <= start && end <= r.end)
                })
                .collect()
        } else {
            vec![false; writing.len()]
        };
        let (mut dirty, mut absent) = (Vec::new(), Vec::new());
        for (c, full) in writing.into_iter().zip(full) {
            if full {
                self.set(c, DIRTY)?;
                dirty.push(c);
            } else {
                absent.push(c);
            }
        }
        self.drop_chunks(&absent)?;
        self.sync_state()?;
        Ok((dirty, absent))
    }

    /// Makes image data durable. Once a sync of the image has failed, every
    /// later one fails too, naming the first failure: the kernel reports a
    /// writeback error to one fsync only, and data written before it may be
    /// lost, so no later flush may claim success.
    pub fn sync_image(&self) -> Result<(), Error> {
        self.check_synced()?;
        self.image.sync_data().map_err(|e| {
            let path = self.dir.join("image");
            self.note_sync_failure(&e);
            Error::io("sync", &path, e)
        })
    }

    /// [`sync_image`](Self::sync_image), shared: returns once a sync that
    /// began after this call has ended, run by this thread or by another
    /// caller's (see `group_sync`). Fetches completing together pay for
    /// about two syncs instead of one each.
    pub fn sync_image_shared(&self) -> Result<(), Error> {
        self.group.sync(
            || self.sync_image(),
            || {
                self.check_synced().err().unwrap_or_else(|| {
                    Error::Invalid("a shared sync of the cache image failed".into())
                })
            },
        )
    }

    /// Fails if a sync of the image has failed in this session.
    pub fn check_synced(&self) -> Result<(), Error> {
        match self.sync_failure.get() {
            None => Ok(()),
            Some(first) => Err(Error::SyncFailed {
                path: self.dir.join("image").display().to_string(),
                first: first.clone(),
            }),
        }
    }

    /// Records a failed sync of the image (done elsewhere, e.g. by the
    /// device's own ring): every later sync fails.
    pub fn note_sync_failure(&self, e: &io::Error) {
        if self.sync_failure.set(e.to_string()).is_ok() {
            eprintln!(
                "isr: syncing the cache image {} failed ({e}): writes may be lost; every later flush fails until the device is stopped",
                self.dir.join("image").display()
            );
        }
    }

    /// The files whose sync makes a flush durable: image, map, trace.
    pub fn sync_files(&self) -> [&File; 3] {
        [self.image.file(), self.state.file(), self.trace.file()]
    }

    /// Makes the map and the trace durable.
    pub fn sync_state(&self) -> Result<(), Error> {
        self.trace
            .sync_data()
            .map_err(io_err("sync", &self.dir.join("trace")))?;
        self.state
            .sync_data()
            .map_err(io_err("sync", &self.dir.join("state")))
    }

    /// The disk's geometry, from the header.
    pub fn geometry(&self) -> Result<format::Geometry, Error> {
        let h = self.header();
        format::Geometry::new(h.disk_size, h.chunk_size)
            .map_err(|e| Error::Invalid(format!("cache {}: {e}", self.dir.display())))
    }

    /// Drops `chunks` from the cache: each is marked absent, the marks are
    /// made durable, and only then are their bytes deallocated (and that
    /// made durable too). The other order is unsafe: a power loss between
    /// the hole and a durable mark leaves a chunk marked present over a
    /// hole, which an open trusting the map serves as zeros and a recovery
    /// after a host crash turns into an all-zero dirty chunk that the next
    /// publish sends. Callers keep fetches away (no device yet, or the
    /// chunks' stripe locks held).
    pub fn drop_chunks(&self, chunks: &[u64]) -> Result<(), Error> {
        if chunks.is_empty() {
            return Ok(());
        }
        let g = self.geometry()?;
        for &c in chunks {
            self.set(c, ABSENT)?;
        }
        self.sync_state()?;
        for &c in chunks {
            self.punch_hole(g.chunk_offset(c), g.chunk_len(c) as u64)?;
        }
        self.sync_image()
    }

    /// Deallocates `len` bytes of the image at `offset`: they read as zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.image
            .punch_hole(offset, len)
            .map_err(io_err("punch hole", &self.dir.join("image")))
    }

    /// Records `mode` in the header (written with the header's next
    /// update): the cache's mode from then on, until asked otherwise.
    pub fn record_io(&self, mode: CacheIo) {
        self.header.lock().expect("header lock").cache_io = Some(mode);
    }

    /// Reads and writes the image's data as `mode` says; `Err`: direct
    /// I/O was asked and cannot be (why), so the image works buffered.
    pub fn use_io(&self, mode: CacheIo) -> Result<(), String> {
        match mode {
            CacheIo::Buffered => Ok(()),
            CacheIo::Direct => self.image.enable_direct().map(drop),
        }
    }

    /// The image's `O_DIRECT` descriptor and its alignment, when direct.
    pub fn image_direct(&self) -> Option<(&File, usize)> {
        self.image.direct()
    }

    /// Writes `data` into the image at `offset`.
    pub fn write_image(&self, data: &[u8], offset: u64) -> Result<(), Error> {
        self.image
            .write_all_at(data, offset)
            .map_err(io_err("write", &self.dir.join("image")))
    }

    /// Reads `buf.len()` bytes of the image at `offset`.
    pub fn read_image(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.image
            .read_exact_at(buf, offset)
            .map_err(io_err("read", &self.dir.join("image")))
    }

    /// The engine reached synchronisation point `name` (the explorer
    /// perturbs the threads' order there; nothing happens otherwise).
    pub(crate) fn point(&self, name: &'static str) {
        self.image.point(name);
    }

    /// Replaces the cache file `name` durably with `bytes` (see
    /// [`file`](self) for the order).
    pub(crate) fn replace_file(&self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        file::replace(&self.dir, name, bytes).map_err(io_err("write", &self.dir.join(name)))
    }

    /// Removes the cache file `name`; true if it was there.
    pub(crate) fn remove_file(&self, name: &str) -> Result<bool, Error> {
        file::remove(&self.dir, name).map_err(io_err("remove", &self.dir.join(name)))
    }

    /// The trace recorded so far (chunk indices in first-touch order).
    pub fn read_trace(&self) -> Result<Vec<u64>, Error> {
        let path = self.dir.join("trace");
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        // First touches only, each chunk once: after a host crash the file
        // may hold entries of an earlier session under this one's (its
        // truncation was not durable), and a manifest's trace is never
        // longer than the disk.
        let mut seen = vec![false; self.entries.len()];
        Ok(bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
            .filter(|&c| c < seen.len() as u64 && !std::mem::replace(&mut seen[c as usize], true))
            .collect())
    }

    /// Appends entry number `n` of the trace.
    pub fn write_trace(&self, n: usize, chunk: u64) -> Result<(), Error> {
        self.trace
            .write_all_at(&chunk.to_le_bytes(), n as u64 * 8)
            .map_err(io_err("write", &self.dir.join("trace")))
    }

    /// Empties the trace (a new base version starts a new session trace).
    pub fn clear_trace(&self) -> Result<(), Error> {
        self.trace
            .set_len(0)
            .map_err(io_err("truncate", &self.dir.join("trace")))
    }

    /// Path of the local copy of manifest `version`.
    pub fn manifest_path(&self, version: u64) -> PathBuf {
        self.dir.join("manifests").join(version.to_string())
    }

    /// Stores the encrypted manifest of `version` durably (write, sync, rename).
    pub fn save_manifest(&self, version: u64, bytes: &[u8]) -> Result<(), Error> {
        self.replace_file(&format!("manifests/{version}"), bytes)
    }

    /// Removes local manifests other than `keep`.
    pub fn prune_manifests(&self, keep: u64) {
        if let Ok(dir) = std::fs::read_dir(self.dir.join("manifests")) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name != keep.to_string() {
                    let _ = self.remove_file(&format!("manifests/{name}"));
                }
            }
        }
    }
}

fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN as usize];
    b[0..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&FORMAT.to_le_bytes());
    b[8..12].copy_from_slice(&(if h.open { FLAG_OPEN } else { 0 }).to_le_bytes());
    b[16..24].copy_from_slice(&h.base_version.to_le_bytes());
    b[24..32].copy_from_slice(&h.disk_size.to_le_bytes());
    b[32..36].copy_from_slice(&h.chunk_size.to_le_bytes());
    b[36..40].copy_from_slice(&CacheIo::code(h.cache_io).to_le_bytes());
    b[40..56].copy_from_slice(&h.cache_id);
    b[56..72].copy_from_slice(&h.boot_id);
    b
}

fn open_rw(path: &Path) -> Result<File, Error> {
    private::open_rw(path).map_err(io_err("open", path))
}

#[cfg(test)]
pub(crate) mod tests;
