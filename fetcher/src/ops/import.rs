//! Import: a raw image becomes the next version of a parcel, through the
//! chunk pipeline ([`crate::transfer::upload`]). Only when every chunk is
//! durable in the store is the manifest created (invariant 4).

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::time::Instant;

use format::{DEFAULT_CHUNK_SIZE, Geometry, Layout, Manifest};

use crate::remote::Parcel;
use crate::transfer::upload::{UploadOptions, upload_file};
use crate::{Error, Progress};

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
            concurrency: crate::transfer::DEFAULT_CONCURRENCY,
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
        &UploadOptions {
            threads: options.threads,
            concurrency: options.concurrency,
            zstd_level: options.zstd_level,
        },
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

/// Size of a non-empty regular file or block device; anything else is
/// refused.
fn image_size(file: &File) -> std::io::Result<u64> {
    crate::local::disk_file::image_size(file)
}
