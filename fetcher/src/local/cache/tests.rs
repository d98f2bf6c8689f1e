use super::*;

/// The header of the unit tests' caches: 10 chunks of 64 KiB based on
/// `base_version`.
pub(crate) fn header_of(base_version: u64) -> Header {
    Header {
        base_version,
        disk_size: 10 * 65536,
        chunk_size: 65536,
        cache_id: [9; 16],
        open: true,
        boot_id: [7; 16],
        cache_io: None,
    }
}

fn header() -> Header {
    header_of(3)
}

#[test]
fn state_survives_reopen_and_the_lock_is_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("c");
    let lock = Cache::lock(&d).unwrap();
    assert!(matches!(Cache::lock(&d), Err(Error::CacheBusy { .. })));
    let mut present = vec![false; 10];
    present[4] = true;
    let cache = Cache::create(lock, &d, header(), b"m", &present).unwrap();
    assert_eq!(state_of(cache.entry(4)), PRESENT);
    let e = cache.set(2, DIRTY).unwrap();
    assert_eq!((state_of(e), generation_of(e)), (DIRTY, 1));
    let e = cache.set(2, DIRTY).unwrap();
    assert_eq!(generation_of(e), 2);
    cache.write_trace(0, 7).unwrap();
    cache.write_trace(1, 2).unwrap();
    cache.sync_state().unwrap();
    drop(cache);

    let cache = Cache::open(Cache::lock(&d).unwrap(), &d).unwrap();
    assert_eq!(cache.header(), header());
    assert_eq!(state_of(cache.entry(2)), DIRTY);
    assert_eq!(generation_of(cache.entry(2)), 2);
    assert_eq!(state_of(cache.entry(4)), PRESENT);
    assert_eq!(state_of(cache.entry(5)), ABSENT);
    assert_eq!(cache.read_trace().unwrap(), vec![7, 2]);
    cache.update_header(|h| h.open = false).unwrap();
    drop(cache);
    let cache = Cache::open(Cache::lock(&d).unwrap(), &d).unwrap();
    assert!(!cache.header().open);
}

#[test]
fn cache_dirs_differ_per_store_and_parcel() {
    let r = Path::new("/r");
    assert_ne!(
        cache_dir(r, "file:///a", "p"),
        cache_dir(r, "file:///b", "p")
    );
    assert_eq!(
        cache_dir(r, "file:///a/", "p"),
        cache_dir(r, "file:///a", "p")
    );
    assert!(cache_dir(r, "s3://x/y", "vm").ends_with("vm"));
}
