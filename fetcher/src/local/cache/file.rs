//! The seam between the cache and its files: every change the cache makes
//! to its files (image, map, trace, sync record, manifests) goes through a
//! [`CacheFile`] or [`replace`]/[`remove`], which can record it, in order,
//! into a [`FileLog`]. Production code records nothing; the crash-and-race
//! explorer (`fetcher/tests/explore`) registers a log for a cache directory
//! with [`record`] and rebuilds, from the log, every state a crash of the
//! process or of the host could leave (CrashMonkey/ALICE-style).
//!
//! ```text
//!   Cache ──► CacheFile { File, name, log } ──► pwrite / fallocate / ftruncate / fdatasync
//!                                  └──────────► FileLog: [Write, Punch, SetLen, Sync, Replace, Remove, Event…]
//!   Engine ─► FileLog::point(name) at its synchronisation points (seeded delays in the explorer)
//! ```
//!
//! While a log records, each operation and its log entry happen under the
//! log's lock, so the log's order is the order in which the file system saw
//! them. What the log cannot see: the ublk queue's own io_uring reads and
//! writes of the image (the explorer issues the queue's sequence itself and
//! logs the data write), and what ext4 does below the page cache (the
//! crash model works at page granularity: per file, everything before its
//! last fdatasync is durable, and each page written since holds the
//! content it had at some moment since).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::Error;
use crate::local::private;

/// One recorded change to a cache file (names are relative to the cache
/// directory, e.g. `image`, `state`, `manifests/3`), or an event the
/// explorer's model placed in the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    /// `data` written at `offset`.
    Write {
        file: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// `len` bytes at `offset` deallocated (they read as zeros).
    Punch { file: String, offset: u64, len: u64 },
    /// The file's length set.
    SetLen { file: String, len: u64 },
    /// fdatasync: everything written to the file before is durable.
    Sync { file: String },
    /// The whole file replaced durably (write a temporary file, fsync,
    /// rename, fsync the directory).
    Replace { file: String, data: Vec<u8> },
    /// The file removed (not durable until a later directory sync: a crash
    /// may bring it back).
    Remove { file: String },
    /// A mark of the explorer's (a model event, a store operation).
    Event(Vec<u8>),
}

type Point = Box<dyn Fn(&'static str) + Send + Sync>;

/// An ordered record of the changes made to one cache directory's files.
#[derive(Default)]
pub struct FileLog {
    ops: Mutex<Vec<FileOp>>,
    point: OnceLock<Point>,
}

impl std::fmt::Debug for FileLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLog")
            .field("ops", &self.len())
            .finish_non_exhaustive()
    }
}

impl FileLog {
    /// An empty log.
    pub fn new() -> FileLog {
        FileLog::default()
    }

    /// Calls `f` at each of the engine's synchronisation points (with the
    /// point's name): the explorer perturbs the threads' order there.
    pub fn on_point(&self, f: impl Fn(&'static str) + Send + Sync + 'static) {
        let _ = self.point.set(Box::new(f));
    }

    /// The engine reached synchronisation point `name`.
    pub fn point(&self, name: &'static str) {
        if let Some(f) = self.point.get() {
            f(name);
        }
    }

    /// Runs `f` and records `op` with it, atomically with respect to the
    /// other recorded operations; nothing is recorded if `f` fails.
    pub fn run<T>(&self, op: FileOp, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let mut ops = self.ops.lock().expect("file log lock");
        let r = f()?;
        ops.push(op);
        Ok(r)
    }

    /// Appends an event (the explorer's model and store operations).
    pub fn event(&self, e: Vec<u8>) {
        self.ops
            .lock()
            .expect("file log lock")
            .push(FileOp::Event(e));
    }

    /// Entries so far.
    pub fn len(&self) -> usize {
        self.ops.lock().expect("file log lock").len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the entries so far.
    pub fn snapshot(&self) -> Vec<FileOp> {
        self.ops.lock().expect("file log lock").clone()
    }
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<FileLog>>> {
    static LOGS: OnceLock<Mutex<HashMap<PathBuf, Arc<FileLog>>>> = OnceLock::new();
    LOGS.get_or_init(Default::default)
}

/// Records every change to the cache files in `dir` into `log` (for any
/// cache opened there from now on), until the guard is dropped.
pub fn record(dir: &Path, log: Arc<FileLog>) -> Recording {
    registry()
        .lock()
        .expect("file log registry")
        .insert(dir.to_owned(), log);
    Recording(dir.to_owned())
}

/// Stops a [`record`] when dropped.
#[derive(Debug)]
pub struct Recording(PathBuf);

impl Drop for Recording {
    fn drop(&mut self) {
        registry()
            .lock()
            .expect("file log registry")
            .remove(&self.0);
    }
}

/// The log recording the cache in `dir`, if any.
pub(crate) fn log_for(dir: &Path) -> Option<Arc<FileLog>> {
    let map = registry().lock().expect("file log registry");
    if map.is_empty() {
        return None;
    }
    map.get(dir).cloned()
}

/// A file of the cache: the file, its name in the cache directory, and the
/// log recording it, if any.
#[derive(Debug)]
pub struct CacheFile {
    file: File,
    name: &'static str,
    path: PathBuf,
    log: Option<Arc<FileLog>>,
}

impl CacheFile {
    /// Opens (creating) `dir/name`, private to its owner.
    pub(crate) fn open(dir: &Path, name: &'static str) -> Result<CacheFile, Error> {
        let path = dir.join(name);
        let file = private::open_rw(&path).map_err(|e| Error::io("open", &path, e))?;
        Ok(CacheFile {
            file,
            name,
            path,
            log: log_for(dir),
        })
    }

    /// The file itself, for reads and for a device doing its own I/O.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn run<T>(
        &self,
        op: impl FnOnce() -> FileOp,
        f: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        match &self.log {
            None => f(),
            Some(log) => log.run(op(), f),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `data` at `offset`.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.run(
            || FileOp::Write {
                file: self.name.into(),
                offset,
                data: data.to_vec(),
            },
            || self.file.write_all_at(data, offset),
        )
    }

    /// fdatasync.
    pub fn sync_data(&self) -> io::Result<()> {
        self.run(
            || FileOp::Sync {
                file: self.name.into(),
            },
            || self.file.sync_data(),
        )
    }

    /// Sets the length.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.run(
            || FileOp::SetLen {
                file: self.name.into(),
                len,
            },
            || self.file.set_len(len),
        )
    }

    /// Deallocates `len` bytes at `offset` (they read as zeros), writing
    /// zeros where the file system cannot punch holes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(
            || FileOp::Punch {
                file: self.name.into(),
                offset,
                len,
            },
            || {
                // SAFETY: fallocate on an fd we own; no memory is passed.
                let r = unsafe {
                    libc::fallocate(
                        self.file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if r == 0 {
                    return Ok(());
                }
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(err);
                }
                self.file.write_all_at(&vec![0u8; len as usize], offset)
            },
        )
    }

    /// The engine reached synchronisation point `name` (see [`FileLog::point`]).
    pub(crate) fn point(&self, name: &'static str) {
        if let Some(log) = &self.log {
            log.point(name);
        }
    }
}

/// Replaces `dir/name` durably with `bytes`: a temporary file, synced,
/// renamed into place, the directory synced.
pub(crate) fn replace(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let path = dir.join(name);
    let doit = || {
        let tmp = path.with_extension("tmp");
        private::write(&tmp, bytes)?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(path.parent().unwrap_or(dir))?.sync_all()
    };
    match log_for(dir) {
        None => doit(),
        Some(log) => log.run(
            FileOp::Replace {
                file: name.into(),
                data: bytes.to_vec(),
            },
            doit,
        ),
    }
}

/// Removes `dir/name`; Ok if it was not there. True if it was removed.
pub(crate) fn remove(dir: &Path, name: &str) -> io::Result<bool> {
    let path = dir.join(name);
    let doit = || match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    };
    match log_for(dir) {
        None => doit(),
        Some(log) => log.run(FileOp::Remove { file: name.into() }, doit),
    }
}
