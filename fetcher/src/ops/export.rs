//! Export (bit-exact reconstruction of a version into a file) and verify
//! (every chunk a version names exists and decodes).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use format::{ChunkEntry, Geometry, Manifest};
use futures::{StreamExt, TryStreamExt, stream};

use super::{DEFAULT_CONCURRENCY, distinct_chunks};
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

/// Writes version `version` of `parcel`, whose manifest is `manifest` (see
/// [`Parcel::resolve`]), to `out`.
///
/// A regular file is written sparse (zero chunks, and zero 4 KiB blocks
/// inside chunks, are left as holes) into a temporary file beside `out`,
/// renamed over it only when complete, so a failed export leaves any earlier
/// `out` untouched. A block device is written in place, zeros included.
pub async fn export(
    parcel: &Parcel,
    version: u64,
    manifest: &Manifest,
    out: &Path,
    progress: Progress,
) -> Result<ExportSummary, Error> {
    let started = Instant::now();
    let geometry = manifest.geometry();
    let is_device = std::fs::metadata(out).is_ok_and(|m| m.file_type().is_block_device());
    let target = Target::open(out, is_device, geometry.disk_size())?;
    let file = target.file.clone();

    let chunks = distinct_chunks(manifest);
    let data_bytes: u64 = chunks
        .iter()
        .flat_map(|(_, at)| at)
        .map(|&i| geometry.chunk_len(i) as u64)
        .sum();
    if is_device {
        write_zero_chunks(&file, &target.path, &geometry, manifest).await?;
    }
    progress(geometry.disk_size() - data_bytes);

    let fetched = stream::iter(chunks)
        .map(|(key, at)| {
            let file = file.clone();
            let path = target.path.clone();
            let progress = progress.clone();
            async move {
                let len = geometry.chunk_len(at[0]) as usize;
                let data = parcel.fetch_chunk(key, len, at[0], version).await?;
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
        bytes_out: geometry.disk_size(),
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
/// `manifest`.
/// A bad chunk does not stop the check: all of them are reported.
pub async fn verify(
    parcel: &Parcel,
    version: u64,
    manifest: &Manifest,
    progress: Progress,
) -> Result<VerifyReport, Error> {
    let geometry = manifest.geometry();
    let chunks = distinct_chunks(manifest);
    let checked = chunks.len() as u64;
    let results: Vec<Result<(), Error>> = stream::iter(chunks)
        .map(|(key, at)| {
            let progress = progress.clone();
            async move {
                let len = geometry.chunk_len(at[0]);
                let r = parcel.fetch_chunk(key, len as usize, at[0], version).await;
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

/// Where an export writes: the device itself, or a temporary file renamed
/// over the output at the end (and removed if the export fails).
struct Target {
    file: Arc<File>,
    path: PathBuf,
    rename_to: Option<PathBuf>,
}

impl Target {
    fn open(out: &Path, is_device: bool, size: u64) -> Result<Target, Error> {
        if is_device {
            let file = OpenOptions::new()
                .write(true)
                .open(out)
                .map_err(|e| Error::io("open", out, e))?;
            return Ok(Target {
                file: Arc::new(file),
                path: out.to_owned(),
                rename_to: None,
            });
        }
        let name = out
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{} is not a file name", out.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".isr-partial");
        let tmp = out.with_file_name(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        file.set_len(size).map_err(|e| Error::io("size", &tmp, e))?;
        Ok(Target {
            file: Arc::new(file),
            path: tmp,
            rename_to: Some(out.to_owned()),
        })
    }

    fn commit(mut self) -> Result<(), Error> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("sync", &self.path, e))?;
        if let Some(out) = self.rename_to.take() {
            std::fs::rename(&self.path, &out).map_err(|e| Error::io("rename", &self.path, e))?;
        }
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.rename_to.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
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
    geometry: &Geometry,
    manifest: &Manifest,
) -> Result<(), Error> {
    let file = file.clone();
    let geometry = *geometry;
    let zeros: Vec<u64> = manifest
        .chunks
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == ChunkEntry::Zero)
        .map(|(i, _)| i as u64)
        .collect();
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let buf = vec![0u8; geometry.chunk_size() as usize];
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
