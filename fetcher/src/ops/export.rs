//! Export (bit-exact reconstruction of a version into a file) and verify
//! (every chunk a version names exists and decodes).

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use format::{ChunkEntry, Layout, Manifest};
use futures::{StreamExt, TryStreamExt, stream};

use crate::Image;
use crate::local::disk_file::{block_device_size, kind_name};
use crate::transfer::{DEFAULT_CONCURRENCY, distinct_chunks};
use crate::{Error, Parcel, Progress};

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportSummary {
    /// The version exported.
    pub version: u64,
    /// Size of the disk written.
    pub bytes_out: u64,
    /// Chunks of the disk.
    pub chunks: u64,
    /// Distinct chunk objects fetched.
    pub fetched_chunks: u64,
    /// Plaintext bytes of the chunks fetched.
    pub bytes_fetched: u64,
    /// Wall time.
    pub seconds: f64,
}

/// What an export may do to what is already at its destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Replace an existing regular file, or write over a block device.
    pub force: bool,
}

/// Writes version `version` of `parcel`, whose manifest is `manifest` (see
/// [`Parcel::resolve`]), to `out`, which must not exist yet: see
/// [`export_with`].
pub async fn export(
    parcel: &Parcel,
    version: u64,
    manifest: &Manifest,
    out: &Path,
    progress: Progress,
) -> Result<ExportSummary, Error> {
    export_with(
        parcel,
        version,
        manifest,
        out,
        &ExportOptions::default(),
        progress,
    )
    .await
}

/// Writes version `version` of `parcel`, whose manifest is `manifest` (see
/// [`Parcel::resolve`]), to `out`.
///
/// A regular file is written sparse (zero chunks, and zero 4 KiB blocks
/// inside chunks, are left as holes) into a temporary file beside `out`
/// with a name of its own, renamed to `out` only when complete, so a failed
/// export leaves any earlier `out` untouched and concurrent exports to one
/// `out` leave exactly one of their results. A symbolic link is followed
/// to the file it names. An existing file is replaced, and a block device
/// written in place (zeros included, if it is large enough), only with
/// [`ExportOptions::force`]; any other kind of file is refused
/// ([`Error::Refused`]) and left as it was.
pub async fn export_with(
    parcel: &Parcel,
    version: u64,
    manifest: &Manifest,
    out: &Path,
    options: &ExportOptions,
    progress: Progress,
) -> Result<ExportSummary, Error> {
    export_image(
        parcel,
        version,
        manifest,
        Image::Disk,
        out,
        options,
        progress,
    )
    .await
}

/// Writes `image` (the disk, or the memory image) of version `version` of
/// `parcel` to `out`, as [`export_with`] does the disk: fetched in
/// parallel, every chunk verified.
pub async fn export_image(
    parcel: &Parcel,
    version: u64,
    manifest: &Manifest,
    image: Image,
    out: &Path,
    options: &ExportOptions,
    progress: Progress,
) -> Result<ExportSummary, Error> {
    let started = Instant::now();
    let geometry = image.layout(manifest);
    let table = image.table(manifest);
    let target = Target::open(out, options.force, geometry.size())?;
    let is_device = target.is_device();
    let file = target.file.clone();

    let chunks = distinct_chunks(table);
    let data_bytes: u64 = chunks
        .iter()
        .flat_map(|(_, at)| at)
        .map(|&i| geometry.chunk_len(i) as u64)
        .sum();
    if is_device {
        write_zero_chunks(&file, &target.path, &geometry, table).await?;
    }
    progress(geometry.size() - data_bytes);

    let fetched = stream::iter(chunks)
        .map(|(key, at)| {
            let file = file.clone();
            let path = target.path.clone();
            let progress = progress.clone();
            let geometry = geometry.clone();
            async move {
                let len = geometry.chunk_len(at[0]) as usize;
                let data = parcel
                    .fetch_image_chunk(key, len, image, at[0], version)
                    .await?;
                tokio::task::spawn_blocking(move || {
                    for &index in &at {
                        write_sparse(&file, &data, geometry.chunk_offset(index), is_device)
                            .map_err(|e| Error::io("write", &path, e))?;
                        progress(len as u64);
                    }
                    Ok::<u64, Error>(len as u64)
                })
                .await
                .expect("writer does not panic")
            }
        })
        .buffer_unordered(DEFAULT_CONCURRENCY)
        .try_fold((0u64, 0u64), |(n, bytes), len| async move {
            Ok((n + 1, bytes + len))
        })
        .await?;

    target.commit()?;
    Ok(ExportSummary {
        version,
        bytes_out: geometry.size(),
        chunks: geometry.chunk_count(),
        fetched_chunks: fetched.0,
        bytes_fetched: fetched.1,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What [`verify`] found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// The version checked.
    pub version: u64,
    /// Distinct chunk objects checked.
    pub chunks_checked: u64,
    /// Every chunk that is missing or does not decode, by name.
    pub bad: Vec<Error>,
}

/// Fetches and decodes every distinct chunk of `version`, whose manifest is
/// `manifest`: the disk's, then the memory image's.
/// A bad chunk does not stop the check: all of them are reported.
pub async fn verify(
    parcel: &Parcel,
    version: u64,
    manifest: &Manifest,
    progress: Progress,
) -> Result<VerifyReport, Error> {
    let chunks: Vec<_> = Image::ALL
        .into_iter()
        .flat_map(|image| {
            let geometry = image.layout(manifest);
            distinct_chunks(image.table(manifest))
                .into_iter()
                .map(move |(key, at)| (image, geometry.chunk_len(at[0]), key, at))
        })
        .collect();
    let checked = chunks.len() as u64;
    let results: Vec<Result<(), Error>> = stream::iter(chunks)
        .map(|(image, len, key, at)| {
            let progress = progress.clone();
            async move {
                let r = parcel
                    .fetch_image_chunk(key, len as usize, image, at[0], version)
                    .await;
                progress(len as u64 * at.len() as u64);
                r.map(|_| ())
            }
        })
        .buffer_unordered(DEFAULT_CONCURRENCY)
        .collect()
        .await;
    let mut bad: Vec<Error> = results.into_iter().filter_map(Result::err).collect();
    bad.sort_by_key(|e| match e {
        Error::BadChunk { index, .. } => *index,
        _ => u64::MAX,
    });
    Ok(VerifyReport {
        version,
        chunks_checked: checked,
        bad,
    })
}

/// Where an export writes: a block device in place, or a fresh temporary
/// file beside the output, renamed over it only when complete (and removed
/// if the export fails).
struct Target {
    file: Arc<File>,
    /// What `file` is: the device, or the temporary file.
    path: PathBuf,
    kind: TargetKind,
}

enum TargetKind {
    Device,
    Temp {
        /// The output the temporary file becomes.
        out: PathBuf,
        /// Whether it may replace an existing file there.
        replace: bool,
        committed: bool,
    },
}

impl Target {
    /// Decides what `out` may become. A symbolic link is followed to the
    /// file it names (the link stays a link); a dangling one is refused.
    /// A block device is written in place, and only with `force`, and only
    /// when it is large enough. An existing regular file is replaced only
    /// with `force`. Everything else (a character device such as /dev/null,
    /// a FIFO, a socket, a directory) is refused.
    fn open(out: &Path, force: bool, size: u64) -> Result<Target, Error> {
        let refuse = |why: String| Error::Refused {
            path: out.display().to_string(),
            why,
        };
        let is_link = std::fs::symlink_metadata(out).is_ok_and(|m| m.file_type().is_symlink());
        let path = if is_link {
            std::fs::canonicalize(out).map_err(|e| match e.kind() {
                ErrorKind::NotFound => refuse(format!(
                    "a symbolic link to {}, which does not exist; export does not create files through a dangling link",
                    std::fs::read_link(out).unwrap_or_default().display()
                )),
                _ => Error::io("resolve symbolic link", out, e),
            })?
        } else {
            out.to_owned()
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("stat", &path, e)),
        };
        match meta {
            None => Target::temp(&path, size, force, None),
            Some(m) if m.is_file() && force => Target::temp(&path, size, true, Some(m)),
            Some(m) if m.is_file() => Err(refuse(
                "exists; refusing to overwrite it (use --force to replace it)".into(),
            )),
            Some(m) if m.file_type().is_block_device() && force => Target::device(&path, size),
            Some(m) if m.file_type().is_block_device() => Err(refuse(
                "is a block device; refusing to overwrite its content (use --force to write the disk onto it)"
                    .into(),
            )),
            Some(m) => Err(refuse(format!(
                "is a {}; export writes only to a regular file or a block device",
                kind_name(m.file_type())
            ))),
        }
    }

    fn device(path: &Path, size: u64) -> Result<Target, Error> {
        // O_EXCL on a block device: fail with EBUSY if it is mounted or held
        // exclusively, rather than write under a file system.
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => Error::Refused {
                    path: path.display().to_string(),
                    why: "the block device is in use (mounted, or held open exclusively)".into(),
                },
                _ => Error::io("open", path, e),
            })?;
        let have = block_device_size(&file).map_err(|e| Error::io("size", path, e))?;
        if have < size {
            return Err(Error::Refused {
                path: path.display().to_string(),
                why: format!("the block device holds {have} bytes; the disk needs {size} bytes"),
            });
        }
        Ok(Target {
            file: Arc::new(file),
            path: path.to_owned(),
            kind: TargetKind::Device,
        })
    }

    /// A new temporary file beside `out` with a name no other export uses
    /// (created with O_EXCL), mode 0600 like any fresh copy of a
    /// plaintext disk, or the mode, owner and group of the file it is to
    /// replace (`old`).
    fn temp(
        out: &Path,
        size: u64,
        replace: bool,
        old: Option<std::fs::Metadata>,
    ) -> Result<Target, Error> {
        let dir = match out.parent() {
            Some(d) if d.as_os_str().is_empty() => Path::new("."),
            Some(d) => d,
            None => Path::new("/"),
        };
        if !dir.is_dir() {
            return Err(Error::Refused {
                path: out.display().to_string(),
                why: format!(
                    "its directory {} does not exist; export creates the file, not directories",
                    dir.display()
                ),
            });
        }
        let name = out
            .file_name()
            .ok_or_else(|| Error::Refused {
                path: out.display().to_string(),
                why: "not a file name".into(),
            })?
            .to_owned();
        let mut attempt = 0u32;
        let (file, tmp) = loop {
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(&name);
            tmp_name.push(format!(".isr-partial-{:016x}", unique_suffix(attempt)));
            let tmp = out.with_file_name(tmp_name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
            {
                Ok(file) => break (file, tmp),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
                Err(e) => return Err(Error::io("create", &tmp, e)),
            }
        };
        // From here on, dropping the target removes the temporary file.
        let target = Target {
            file: Arc::new(file),
            path: tmp,
            kind: TargetKind::Temp {
                out: out.to_owned(),
                replace,
                committed: false,
            },
        };
        if let Some(old) = old {
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::fchown(&*target.file, Some(old.uid()), Some(old.gid())).map_err(
                |e| match e.kind() {
                    ErrorKind::PermissionDenied => Error::Refused {
                        path: out.display().to_string(),
                        why: format!(
                            "belongs to uid {} gid {}, which this user cannot give the new file that replaces it: export as its owner (or root), or to another file",
                            old.uid(),
                            old.gid()
                        ),
                    },
                    _ => Error::io("chown", &target.path, e),
                },
            )?;
            target
                .file
                .set_permissions(old.permissions())
                .map_err(|e| Error::io("chmod", &target.path, e))?;
        }
        target
            .file
            .set_len(size)
            .map_err(|e| Error::io("size", &target.path, e))?;
        Ok(target)
    }

    fn is_device(&self) -> bool {
        matches!(self.kind, TargetKind::Device)
    }

    fn commit(mut self) -> Result<(), Error> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("sync", &self.path, e))?;
        if let TargetKind::Temp {
            out,
            replace,
            committed,
        } = &mut self.kind
        {
            if *replace {
                std::fs::rename(&self.path, &*out)
                    .map_err(|e| Error::io("rename", &self.path, e))?;
            } else {
                rename_no_replace(&self.path, out)?;
            }
            *committed = true;
            // The rename is durable once the directory is.
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
        }
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let TargetKind::Temp {
            committed: false, ..
        } = self.kind
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A suffix that makes a temporary name unlikely to be taken: random, or
/// (should the OS give no randomness) the pid, time and attempt.
fn unique_suffix(attempt: u32) -> u64 {
    let mut raw = [0u8; 8];
    if getrandom::fill(&mut raw).is_ok() {
        return u64::from_le_bytes(raw);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ u64::from(attempt)
}

/// Renames `from` to `to` unless `to` exists (it appeared while exporting):
/// renameat2(RENAME_NOREPLACE), or where the file system lacks it, a hard
/// link (which fails on an existing name too) and an unlink.
fn rename_no_replace(from: &Path, to: &Path) -> Result<(), Error> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Refused {
            path: p.display().to_string(),
            why: "the path contains a NUL byte".into(),
        })
    };
    let (cfrom, cto) = (c(from)?, c(to)?);
    // SAFETY: both pointers are NUL-terminated strings alive for the call;
    // renameat2 reads them and touches no other memory of ours.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    let err = if r == 0 {
        return Ok(());
    } else {
        std::io::Error::last_os_error()
    };
    let err = match err.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
            match std::fs::hard_link(from, to) {
                Ok(()) => {
                    let _ = std::fs::remove_file(from);
                    return Ok(());
                }
                Err(e) => e,
            }
        }
        _ => err,
    };
    if err.kind() == ErrorKind::AlreadyExists {
        return Err(Error::Refused {
            path: to.display().to_string(),
            why: "was created by someone else during the export; refusing to overwrite it (use --force to replace it)".into(),
        });
    }
    Err(Error::io("rename", from, err))
}

/// Block size below which zeros are written rather than left as holes.
const SPARSE_BLOCK: usize = 4096;

/// Writes `data` at `offset`; in a fresh regular file, runs of all-zero
/// 4 KiB blocks are skipped (they read back as zeros from the hole).
fn write_sparse(file: &File, data: &[u8], offset: u64, dense: bool) -> std::io::Result<()> {
    if dense {
        return file.write_all_at(data, offset);
    }
    let mut run_start: Option<usize> = None;
    for (i, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let at = i * SPARSE_BLOCK;
        match (format::is_zero(block), run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(s)) => {
                file.write_all_at(&data[s..at], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        file.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

async fn write_zero_chunks(
    file: &Arc<File>,
    path: &Path,
    geometry: &Layout,
    table: &[ChunkEntry],
) -> Result<(), Error> {
    let file = file.clone();
    let geometry = geometry.clone();
    let zeros: Vec<u64> = table
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == ChunkEntry::Zero)
        .map(|(i, _)| i as u64)
        .collect();
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let buf = vec![0u8; geometry.max_chunk_len() as usize];
        for i in zeros {
            let len = geometry.chunk_len(i) as usize;
            file.write_all_at(&buf[..len], geometry.chunk_offset(i))
                .map_err(|e| Error::io("write", &path, e))?;
        }
        Ok(())
    })
    .await
    .expect("writer does not panic")
}
