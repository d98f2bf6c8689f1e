//! The upload half of the chunk pipeline, shared by import, the memory
//! image's upload and (through [`Store::store_chunk`](crate::Store::store_chunk))
//! the engine's publish: reader/encoder threads (one per core) read an
//! image's data extents chunk by chunk, skip all-zero chunks, and encode
//! the rest; an async uploader stores each chunk the store cannot vouch
//! for with bounded concurrency. Nothing is published here: the caller
//! names the chunks in its manifest once all are durable (invariant 4).

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use format::chunk::{ChunkEncoder, EncodedChunk};
use format::{ChunkEntry, ChunkKey, Chunker, Geometry, Layout};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::local::sparse;
use crate::remote::Parcel;
use crate::{ChunkStored, Error, Progress};

/// How an upload runs.
#[derive(Debug, Clone, Copy)]
pub struct UploadOptions {
    /// Encoder threads.
    pub threads: usize,
    /// Store requests in flight.
    pub concurrency: usize,
    /// zstd level.
    pub zstd_level: i32,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            concurrency: super::DEFAULT_CONCURRENCY,
            zstd_level: 1,
        }
    }
}

enum Encoded {
    Zero(u64),
    Data(u64, EncodedChunk),
}

/// What an import of an image of some size into a parcel publishes over.
/// What uploading an image did (the disk at import, or a memory image).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageUpload {
    /// Size of the image.
    pub size: u64,
    /// Its chunk table, for the manifest.
    pub table: Vec<ChunkEntry>,
    /// The length of each chunk when the image was cut by content (empty:
    /// fixed chunks), for the manifest.
    pub lengths: Vec<u32>,
    /// All-zero chunks (not stored).
    pub zero_chunks: u64,
    /// Chunks the store already had: those of the version it is published
    /// over (disk and memory image), or a repeat within the image.
    pub dedup_chunks: u64,
    /// Chunks uploaded.
    pub uploaded_chunks: u64,
    /// Of those, chunks whose damaged object in the store they replaced.
    pub repaired_chunks: u64,
    /// Bytes of chunk objects uploaded.
    pub bytes_uploaded: u64,
}

/// Cuts the memory image at `path` by content ([`format::cdc`]: chunks of
/// a quarter of `chunk_size` on average, at most `chunk_size`), and
/// uploads every chunk that is neither all zero nor in `known` (the chunks
/// of the version it is published over, and of its disk) nor in the store.
/// Nothing is published: the caller names the chunks, and their lengths,
/// in its manifest. A second save of a little-changed VM repeats most
/// chunks of the first, though the stream's offsets shift between saves.
pub async fn upload_memory(
    parcel: &Parcel,
    path: &Path,
    chunk_size: u32,
    known: &mut HashSet<ChunkKey>,
    progress: Progress,
) -> Result<ImageUpload, Error> {
    let file = File::open(path).map_err(|e| Error::io("open memory image", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io("stat memory image", path, e))?;
    if !meta.is_file() || meta.len() == 0 {
        return Err(Error::Refused {
            path: path.display().to_string(),
            why: "is not a non-empty regular file; a memory image is a VM's saved state file"
                .into(),
        });
    }
    Geometry::new(meta.len(), chunk_size).map_err(|e| Error::Invalid(e.to_string()))?;
    let chunker = Chunker::new(parcel.secret(), chunk_size);
    let (file, lengths) = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let lengths = cut_file(&file, meta.len(), &chunker)
                .map_err(|e| Error::io("read memory image", &path, e))?;
            Ok::<_, Error>((file, lengths))
        })
        .await
        .expect("the chunker does not panic")?
    };
    let layout = Layout::cut(&lengths, chunk_size).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut up = upload_file(
        parcel,
        file,
        path,
        layout,
        known,
        &UploadOptions::default(),
        progress,
    )
    .await?;
    up.lengths = lengths;
    Ok(up)
}

/// The lengths of the chunks `chunker` cuts the first `size` bytes of
/// `file` into, read in order through a window of a few MiB.
fn cut_file(file: &File, size: u64, chunker: &Chunker) -> std::io::Result<Vec<u32>> {
    const WINDOW: usize = 8 << 20;
    let max = chunker.max_len();
    let mut buf = vec![0u8; WINDOW + max];
    let (mut start, mut end) = (0usize, 0usize); // buf[start..end]: unread bytes
    let mut read_to = 0u64; // file offset of buf[end]
    let mut lengths = Vec::new();
    loop {
        if end - start < max && read_to < size {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
            let n = ((size - read_to) as usize).min(buf.len() - end);
            file.read_exact_at(&mut buf[end..end + n], read_to)?;
            end += n;
            read_to += n as u64;
        }
        if start == end {
            return Ok(lengths);
        }
        let n = chunker.cut(&buf[start..end]);
        lengths.push(n as u32);
        start += n;
    }
}

/// Encodes the chunks of `file` (of `layout`) on one thread per core and
/// uploads those neither zero nor `known` with bounded concurrency; adds
/// what it uploads to `known`.
pub(crate) async fn upload_file(
    parcel: &Parcel,
    file: File,
    path: &Path,
    geometry: Layout,
    known: &mut HashSet<ChunkKey>,
    options: &UploadOptions,
    progress: Progress,
) -> Result<ImageUpload, Error> {
    let size = geometry.size();
    // Chunks that hold data per SEEK_DATA; the rest are holes, hence zero.
    let extents =
        sparse::data_extents(&file, size).map_err(|e| Error::io("scan image", path, e))?;
    let mut data_chunks: Vec<u64> = Vec::new();
    for r in &extents {
        let first = geometry.chunk_of(r.start);
        let last = geometry.chunk_of(r.end - 1);
        let from = match data_chunks.last() {
            Some(&l) if l >= first => l + 1,
            _ => first,
        };
        data_chunks.extend(from..=last);
    }
    let hole_bytes: u64 = size
        - data_chunks
            .iter()
            .map(|&c| geometry.chunk_len(c) as u64)
            .sum::<u64>();
    progress(hole_bytes);
    let mut summary = ImageUpload {
        size,
        table: vec![ChunkEntry::Zero; geometry.chunk_count() as usize],
        zero_chunks: geometry.chunk_count() - data_chunks.len() as u64,
        ..Default::default()
    };
    let data_chunks = Arc::new(data_chunks);

    let threads = options.threads.max(1);
    let (tx, mut rx) = mpsc::channel::<Result<Encoded, Error>>(threads * 4);
    let stop = Arc::new(AtomicBool::new(false));
    let encoders = spawn_encoders(
        Arc::new(file),
        path,
        geometry.clone(),
        data_chunks.clone(),
        threads,
        parcel.secret().clone(),
        options.zstd_level,
        tx,
        stop.clone(),
    );

    let uploads = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut in_flight: JoinSet<Result<(ChunkStored, u64), Error>> = JoinSet::new();
    let result: Result<(), Error> = async {
        while let Some(msg) = rx.recv().await {
            match msg? {
                Encoded::Zero(index) => {
                    summary.zero_chunks += 1;
                    progress(geometry.chunk_len(index) as u64);
                }
                Encoded::Data(index, chunk) => {
                    summary.table[index as usize] = ChunkEntry::Data(chunk.key);
                    let len = geometry.chunk_len(index) as u64;
                    if !known.insert(chunk.key) {
                        summary.dedup_chunks += 1;
                        progress(len);
                        continue;
                    }
                    let permit = uploads.clone().acquire_owned().await.expect("never closed");
                    let store = parcel.store().clone();
                    let progress = progress.clone();
                    in_flight.spawn(async move {
                        let _permit = permit;
                        let size = chunk.object.len() as u64;
                        let outcome = store
                            .store_chunk(&chunk.id, Bytes::from(chunk.object))
                            .await?;
                        progress(len);
                        Ok((outcome, size))
                    });
                }
            }
            while let Some(done) = in_flight.try_join_next() {
                count_upload(&mut summary, done)?;
            }
        }
        while let Some(done) = in_flight.join_next().await {
            count_upload(&mut summary, done)?;
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    for t in encoders {
        let _ = t.join();
    }
    result?;
    Ok(summary)
}

fn count_upload(
    summary: &mut ImageUpload,
    done: Result<Result<(ChunkStored, u64), Error>, tokio::task::JoinError>,
) -> Result<(), Error> {
    let (stored, size) = done.expect("upload tasks do not panic")?;
    match stored {
        ChunkStored::Reused => summary.dedup_chunks += 1,
        ChunkStored::Uploaded | ChunkStored::Replaced(_) => {
            summary.uploaded_chunks += 1;
            summary.repaired_chunks += u64::from(stored != ChunkStored::Uploaded);
            summary.bytes_uploaded += size;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn spawn_encoders(
    file: Arc<File>,
    path: &Path,
    geometry: Layout,
    chunks: Arc<Vec<u64>>,
    threads: usize,
    secret: format::Secret,
    level: i32,
    tx: mpsc::Sender<Result<Encoded, Error>>,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let next = Arc::new(AtomicUsize::new(0));
    (0..threads)
        .map(|_| {
            let (file, chunks, next, tx, stop) = (
                file.clone(),
                chunks.clone(),
                next.clone(),
                tx.clone(),
                stop.clone(),
            );
            let path = path.to_owned();
            let geometry = geometry.clone();
            let mut encoder = ChunkEncoder::new(secret.clone(), level);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; geometry.max_chunk_len() as usize];
                while !stop.load(Ordering::Relaxed) {
                    let Some(&index) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    let data = &mut buf[..geometry.chunk_len(index) as usize];
                    let msg = match file.read_exact_at(data, geometry.chunk_offset(index)) {
                        Err(e) => Err(Error::io("read image", &path, e)),
                        Ok(()) if format::is_zero(data) => Ok(Encoded::Zero(index)),
                        Ok(()) => encoder
                            .encode(data)
                            .map(|c| Encoded::Data(index, c))
                            .map_err(|e| Error::Invalid(e.to_string())),
                    };
                    if tx.blocking_send(msg).is_err() {
                        return;
                    }
                }
            })
        })
        .collect()
}
