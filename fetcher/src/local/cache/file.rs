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
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::Error;
use crate::aligned::{ALIGN, AlignedBuf};
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
/// log recording it, if any; and, once [`enable_direct`](Self::enable_direct)
/// succeeded, a second descriptor that bypasses the page cache.
#[derive(Debug)]
pub struct CacheFile {
    file: File,
    name: &'static str,
    path: PathBuf,
    log: Option<Arc<FileLog>>,
    direct: OnceLock<Direct>,
}

/// A cache file opened again with `O_DIRECT`, and the alignment (of file
/// offset, length and memory) its file system asks for direct I/O.
#[derive(Debug)]
struct Direct {
    file: File,
    align: usize,
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
            direct: OnceLock::new(),
        })
    }

    /// The file itself (through the page cache), for reads and for a
    /// device doing its own I/O.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Opens the file again with `O_DIRECT`: from then on, reads and writes
    /// whose offset, length and memory are aligned bypass the page cache
    /// (what is not aligned, a disk's last partial block, goes through it;
    /// the kernel keeps the two coherent, and an fdatasync covers both).
    /// Returns the alignment, or why direct I/O is not used: a file system
    /// that keeps file data in memory anyway (tmpfs, ramfs), or one that
    /// refuses `O_DIRECT` or asks more than a page of alignment.
    pub fn enable_direct(&self) -> Result<usize, String> {
        if let Some(d) = self.direct.get() {
            return Ok(d.align);
        }
        if let Some(fs) = in_memory_fs(&self.file) {
            return Err(format!(
                "{} is on {fs}, which keeps file data in memory: O_DIRECT would keep nothing out of the page cache",
                self.path.display()
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .map_err(|e| {
                format!(
                    "the file system of {} refuses O_DIRECT ({e})",
                    self.path.display()
                )
            })?;
        let align = dio_align(&file).unwrap_or(ALIGN);
        if align > ALIGN {
            return Err(format!(
                "the file system of {} asks {align}-byte alignment for O_DIRECT",
                self.path.display()
            ));
        }
        // A direct read proves the descriptor works (a short file reads
        // short, which is no error).
        let mut probe = AlignedBuf::zeroed(ALIGN);
        if let Err(e) = file.read_at(&mut probe, 0) {
            return Err(format!(
                "a direct read of {} failed ({e})",
                self.path.display()
            ));
        }
        let _ = self.direct.set(Direct { file, align });
        Ok(align)
    }

    /// The `O_DIRECT` descriptor and its alignment, once enabled.
    pub fn direct(&self) -> Option<(&File, usize)> {
        self.direct.get().map(|d| (&d.file, d.align))
    }

    /// How much of `len` bytes at `offset` can go direct: the descriptor
    /// and an aligned prefix (the rest goes buffered).
    fn direct_part(&self, len: usize, offset: u64) -> Option<(&File, usize)> {
        let d = self.direct.get()?;
        let prefix = len & !(d.align - 1);
        (offset.is_multiple_of(d.align as u64) && prefix > 0).then_some((&d.file, prefix))
    }

    /// Whether memory at `ptr` suits direct I/O (else it goes through an
    /// aligned copy).
    fn mem_aligned(&self, ptr: *const u8) -> bool {
        self.direct
            .get()
            .is_some_and(|d| (ptr as usize).is_multiple_of(d.align))
    }

    /// Reads `buf.len()` bytes at `offset` through the `O_DIRECT`
    /// descriptor `direct` (both aligned), through an aligned copy when
    /// `buf` is not.
    fn read_direct(&self, direct: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.mem_aligned(buf.as_ptr()) {
            return direct.read_exact_at(buf, offset);
        }
        let mut bounce = AlignedBuf::zeroed(buf.len());
        direct.read_exact_at(&mut bounce, offset)?;
        buf.copy_from_slice(&bounce);
        Ok(())
    }

    /// Writes `data` at `offset` through the `O_DIRECT` descriptor `direct`
    /// (both aligned), through an aligned copy when `data` is not.
    fn write_direct(&self, direct: &File, data: &[u8], offset: u64) -> io::Result<()> {
        if self.mem_aligned(data.as_ptr()) {
            return direct.write_all_at(data, offset);
        }
        let mut bounce = AlignedBuf::zeroed(data.len());
        bounce.copy_from_slice(data);
        direct.write_all_at(&bounce, offset)
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

    /// Reads exactly `buf.len()` bytes at `offset` (directly where it can:
    /// see [`enable_direct`](Self::enable_direct)).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some((direct, n)) = self.direct_part(buf.len(), offset) {
            match self.read_direct(direct, &mut buf[..n], offset) {
                Ok(()) => return self.file.read_exact_at(&mut buf[n..], offset + n as u64),
                // Refused after all (an alignment the probe did not see):
                // the page cache serves it.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
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
            || {
                if let Some((direct, n)) = self.direct_part(data.len(), offset) {
                    match self.write_direct(direct, &data[..n], offset) {
                        Ok(()) => return self.file.write_all_at(&data[n..], offset + n as u64),
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                        Err(e) => return Err(e),
                    }
                }
                self.file.write_all_at(data, offset)
            },
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

/// The in-memory file system `file` is on (tmpfs, ramfs), if it is.
fn in_memory_fs(file: &File) -> Option<&'static str> {
    // SAFETY: fstatfs writes into the zeroed struct we pass; the fd is ours.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    match st.f_type {
        libc::TMPFS_MAGIC => Some("tmpfs"),
        // RAMFS_MAGIC (linux/magic.h; not in libc).
        0x8584_58f6 => Some("ramfs"),
        _ => None,
    }
}

/// The alignment direct I/O on `file` needs (`statx`'s `STATX_DIOALIGN`,
/// Linux 6.1), if the file system says.
fn dio_align(file: &File) -> Option<usize> {
    // SAFETY: statx writes into the zeroed struct we pass; the path is an
    // empty C string with AT_EMPTY_PATH, so the fd itself is asked.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some(
        (st.stx_dio_offset_align as usize)
            .max(st.stx_dio_mem_align as usize)
            .max(512),
    )
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
