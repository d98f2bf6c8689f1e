//! The cache image's I/O mode (`EngineOptions::cache_io`): direct I/O keeps
//! the cache's chunks out of the host's page cache, on a disk whose size is
//! no multiple of a block too; the mode is recorded in the cache; a file
//! system that keeps files in memory (tmpfs) works buffered and says so.
//!
//! The page cache is measured with util-linux's `fincore`. The caches live
//! under the target directory (a disk-backed file system: `/tmp` may be
//! tmpfs).

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::path::Path;

use common::{Rng, read_all};
use fetcher::{CacheIo, Engine, EngineOptions, Parcel, Store, no_progress};
use format::Secret;

fn secret() -> Secret {
    Secret::new(&[21; 32])
}

/// A parcel of an image of `size` bytes in a memory store, and the image.
fn parcel_of(size: u64) -> (Parcel, Vec<u8>) {
    let store = Store::open("memory://", &Default::default()).unwrap();
    common::import_parcel_of(store, size, 5, secret())
}

fn options(root: &Path, io: Option<CacheIo>) -> EngineOptions {
    EngineOptions {
        cache_io: io,
        ..common::engine_options(root, "test-host")
    }
}

/// A directory on the disk the tests build on.
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Bytes of `file` in the page cache.
fn resident(file: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .expect("fincore (util-linux) runs");
    assert!(out.status.success(), "fincore: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The image file of `engine`'s cache.
fn image_of(engine: &Engine) -> std::path::PathBuf {
    engine.cache_dir().join("image")
}

/// Hoards a parcel (every chunk fetched and written into the cache), reads
/// it all back, and says how much of the cache image the page cache holds.
fn hoard_and_read(parcel: &Parcel, root: &Path, io: CacheIo, model: &[u8]) -> u64 {
    let engine = Engine::open(parcel.clone(), options(root, Some(io))).unwrap();
    assert_eq!(engine.cache_io(), io, "{:?}", engine.open_report().warnings);
    let stats = engine.hoard(no_progress()).unwrap();
    assert_eq!(stats.cached_chunks, stats.chunks);
    assert!(read_all(&engine) == model, "the cache serves the image");
    let image = image_of(&engine);
    engine.close().unwrap();
    resident(&image)
}

#[test]
fn a_direct_cache_keeps_its_chunks_out_of_the_page_cache() {
    // 16 MiB and 1000 bytes: the last chunk ends off any block boundary.
    let size = (16 << 20) + 1000;
    let (parcel, model) = parcel_of(size);
    let direct_root = disk_dir();
    let direct = hoard_and_read(&parcel, direct_root.path(), CacheIo::Direct, &model);
    let buffered_root = disk_dir();
    let buffered = hoard_and_read(&parcel, buffered_root.path(), CacheIo::Buffered, &model);
    // The measure sees the page cache (a buffered cache's image is in it),
    // and a direct cache leaves at most its tail block there.
    assert!(
        buffered > size / 2,
        "buffered: {buffered} of {size} bytes resident"
    );
    assert!(
        direct <= size / 20,
        "direct: {direct} of {size} bytes resident (goal ≤ 5 %)"
    );
}

#[test]
fn a_direct_cache_writes_publishes_and_remembers_its_mode() {
    let size = (4 << 20) + 1000;
    let (parcel, mut model) = parcel_of(size);
    let root = disk_dir();
    let a = Engine::open(parcel.clone(), options(root.path(), Some(CacheIo::Direct))).unwrap();
    assert_eq!(a.cache_io(), CacheIo::Direct);
    let mut rng = Rng(7);
    for _ in 0..40 {
        let (off, len) = rng.range_in(&(0..size), 300_000);
        let data = rng.bytes(len as usize);
        a.write(off, &data).unwrap();
        model[off as usize..][..len as usize].copy_from_slice(&data);
    }
    // The tail, written whole.
    let tail = size - 1000;
    let data = rng.bytes(1000);
    a.write(tail, &data).unwrap();
    model[tail as usize..].copy_from_slice(&data);
    a.flush().unwrap();
    assert!(read_all(&a) == model);
    assert_eq!(a.publish(None, 1_800_000_000).unwrap().version, 2);
    a.close().unwrap();
    // Opened again without a choice: as the cache recorded.
    let again = Engine::open(parcel.clone(), options(root.path(), None)).unwrap();
    assert_eq!(again.cache_io(), CacheIo::Direct);
    assert!(read_all(&again) == model);
    again.close().unwrap();
    // And what it published reads the same from a fresh buffered cache.
    let other = disk_dir();
    let b = Engine::open(parcel, options(other.path(), Some(CacheIo::Buffered))).unwrap();
    assert_eq!(b.cache_io(), CacheIo::Buffered);
    assert!(read_all(&b) == model);
}

#[test]
fn direct_io_on_tmpfs_works_buffered_and_says_why() {
    let shm = Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs /dev/shm (tmpfs)");
    let root = tempfile::tempdir_in(shm).unwrap();
    let (parcel, model) = parcel_of(1 << 20);
    let engine = Engine::open(parcel, options(root.path(), Some(CacheIo::Direct))).unwrap();
    assert_eq!(engine.cache_io(), CacheIo::Buffered);
    let warnings = engine.open_report().warnings.join("; ");
    assert!(
        warnings.contains("tmpfs") && warnings.contains("page cache"),
        "{warnings}"
    );
    assert!(read_all(&engine) == model);
}

#[test]
fn the_default_mode_on_tmpfs_works_buffered_without_a_warning() {
    let root = tempfile::tempdir_in("/dev/shm").unwrap();
    let (parcel, model) = parcel_of(1 << 20);
    let engine = Engine::open(parcel.clone(), options(root.path(), None)).unwrap();
    assert_eq!(engine.cache_io(), CacheIo::Buffered);
    assert!(
        engine.open_report().warnings.is_empty(),
        "{:?}",
        engine.open_report().warnings
    );
    assert!(read_all(&engine) == model);
    engine.close().unwrap();
    // Nothing was asked, so nothing was recorded: a later ask is followed.
    let again = Engine::open(parcel, options(root.path(), Some(CacheIo::Direct))).unwrap();
    assert_eq!(again.cache_io(), CacheIo::Buffered);
    assert_eq!(again.open_report().warnings.len(), 1);
}
