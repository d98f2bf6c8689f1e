//! Import: a raw image becomes the next version of a parcel.
//!
//! Reader/encoder threads (one per core) read the image's data extents chunk
//! by chunk, skip all-zero chunks, and encode the rest; an async uploader
//! skips chunks the store already has and uploads the others with bounded
//! concurrency. Only when every chunk is durable in the store is the manifest
//! created (invariant 4).

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use format::chunk::{ChunkEncoder, EncodedChunk};
use format::{ChunkEntry, ChunkKey, Chunker, DEFAULT_CHUNK_SIZE, Geometry, Layout, Manifest};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::{ChunkStored, Error, Parcel, Progress, sparse};

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Chunk size; `None` keeps the parcel's (or the default for a new one).
    pub chunk_size: Option<u32>,
    /// Encoder threads.
    pub threads: usize,
    /// Store requests in flight.
    pub concurrency: usize,
    /// Host name recorded in the manifest.
    pub host: String,
    /// Creation time recorded in the manifest (Unix seconds).
    pub created_unix: i64,
    /// zstd level.
    pub zstd_level: i32,
    /// Allow a disk size other than HEAD's (without it, such an image is
    /// refused: it would silently grow or shrink the disk).
    pub resize: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            chunk_size: None,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            concurrency: super::DEFAULT_CONCURRENCY,
            host: String::new(),
            created_unix: 0,
            zstd_level: 1,
            resize: false,
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportSummary {
    /// The version published.
    pub version: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// All-zero chunks (not stored).
    pub zero_chunks: u64,
    /// Non-zero chunks the store already had (or that repeat in the image).
    pub dedup_chunks: u64,
    /// Chunks uploaded.
    pub uploaded_chunks: u64,
    /// Of those, chunks whose object in the store was damaged (another
    /// size, or other bytes on a `file://` store), replaced.
    pub repaired_chunks: u64,
    /// Size of the image.
    pub bytes_in: u64,
    /// Bytes of chunk objects uploaded.
    pub bytes_uploaded: u64,
    /// Wall time.
    pub seconds: f64,
}

enum Encoded {
    Zero(u64),
    Data(u64, EncodedChunk),
}

/// What an import of an image of some size into a parcel publishes over.
struct Plan {
    head: Option<u64>,
    parent: Option<Manifest>,
    geometry: Geometry,
}

/// Checks, before anything is taken or written, that an image of `size`
/// bytes can be imported into `parcel` with `options` (a writable store,
/// the parcel's chunk size, HEAD's disk size unless resizing): a refused
/// import leaves no trace in the store (no lease, no parcel).
pub async fn check_import(
    parcel: &Parcel,
    size: u64,
    options: &ImportOptions,
) -> Result<(), Error> {
    plan(parcel, size, options).await.map(|_| ())
}

async fn plan(parcel: &Parcel, size: u64, options: &ImportOptions) -> Result<Plan, Error> {
    if !parcel.store().is_writable() {
        return Err(Error::ReadOnly {
            store: parcel.store().url().to_owned(),
        });
    }
    let head = parcel.head().await?;
    let parent = match head {
        Some(v) => Some(parcel.manifest(v).await?),
        None => None,
    };
    let chunk_size = match (&parent, options.chunk_size) {
        (Some(p), Some(c)) if p.chunk_size != c => {
            return Err(Error::Invalid(format!(
                "parcel {} has {}-byte chunks; it cannot take {c}-byte chunks",
                parcel.name(),
                p.chunk_size
            )));
        }
        (Some(p), _) => p.chunk_size,
        (None, c) => c.unwrap_or(DEFAULT_CHUNK_SIZE),
    };
    if let (Some(p), Some(h)) = (&parent, head)
        && p.disk_size != size
        && !options.resize
    {
        return Err(Error::Invalid(format!(
            "the image is {size} bytes but version {h} (HEAD) of parcel {} is {} bytes; importing it would resize the disk (pass --resize to do so)",
            parcel.name(),
            p.disk_size
        )));
    }
    let geometry = Geometry::new(size, chunk_size).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(Plan {
        head,
        parent,
        geometry,
    })
}

/// Imports the image at `path` as the next version of `parcel`. An image
/// that changes while it is read (its size, modification time or inode,
/// as tar checks) is refused and nothing is published.
pub async fn import(
    parcel: &Parcel,
    path: &Path,
    options: &ImportOptions,
    progress: Progress,
) -> Result<ImportSummary, Error> {
    let started = Instant::now();
    let file = File::open(path).map_err(|e| Error::io("open image", path, e))?;
    let size = image_size(&file).map_err(|e| Error::io("size image", path, e))?;
    let before = Identity::of(path)?;
    let Plan {
        head,
        parent,
        geometry,
    } = plan(parcel, size, options).await?;

    let mut manifest = Manifest::empty(geometry);
    manifest.parent = head;
    manifest.host = options.host.clone();
    manifest.created_unix = options.created_unix;
    // The same VM runs on the new disk (its memory image does not carry over).
    manifest.vm = parent.as_ref().and_then(|p| p.vm.clone());

    // Chunks this import stored or vouched for already. (The parent's are
    // not trusted blindly: each is checked against the bytes in hand.)
    let mut known = HashSet::new();
    let up = upload_file(
        parcel,
        file,
        path,
        Layout::Fixed(geometry),
        &mut known,
        options,
        progress,
    )
    .await?;
    manifest.chunks = up.table;
    if Identity::of(path)? != before {
        return Err(Error::Refused {
            path: path.display().to_string(),
            why: "changed while it was imported (its size, modification time or inode differ from when the import began); nothing was published: import it again once nothing writes to it".into(),
        });
    }
    let mut summary = ImportSummary {
        chunks: geometry.chunk_count(),
        zero_chunks: up.zero_chunks,
        dedup_chunks: up.dedup_chunks,
        uploaded_chunks: up.uploaded_chunks,
        repaired_chunks: up.repaired_chunks,
        bytes_in: size,
        bytes_uploaded: up.bytes_uploaded,
        ..Default::default()
    };

    let version = head.map_or(1, |h| h + 1);
    parcel.publish(&manifest, version).await?;
    summary.version = version;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// What tells a file that changed: size, modification and change times,
/// device and inode.
#[derive(Debug, PartialEq, Eq)]
struct Identity(u64, i64, i64, i64, i64, u64, u64);

impl Identity {
    fn of(path: &Path) -> Result<Identity, Error> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).map_err(|e| Error::io("stat image", path, e))?;
        Ok(Identity(
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.dev(),
            m.ino(),
        ))
    }
}

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
        &ImportOptions::default(),
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
async fn upload_file(
    parcel: &Parcel,
    file: File,
    path: &Path,
    geometry: Layout,
    known: &mut HashSet<ChunkKey>,
    options: &ImportOptions,
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

/// Size of a non-empty regular file or block device; anything else is
/// refused.
fn image_size(file: &File) -> std::io::Result<u64> {
    crate::disk_file::image_size(file)
}
