//! Opening a cache: creating it, recovering from an unclean stop, and
//! reconciling it with a store whose HEAD moved on.
//!
//! * Our own publish that crashed before the cache recorded it (the new
//!   manifest names this cache as its writer and the base as its parent):
//!   dirty chunks whose content is what that version holds become present.
//! * Another writer's version: with no local changes, chunks it changed are
//!   invalidated (refetched on use); with local changes, it is a conflict,
//!   reported and never merged.

use std::path::Path;

use format::{ChunkEntry, Manifest};

use crate::aligned::AlignedBuf;
use crate::engine::{EngineOptions, OpenReport, new_header};
use crate::local::cache::{self, Cache, CacheIo, DIRTY, PRESENT};
use crate::{Error, Parcel};

/// Opens or creates the cache in `dir` and brings it up to date with the
/// store when the store answers (offline, it stays on its base version).
pub(crate) async fn open_cache(
    parcel: &Parcel,
    dir: &Path,
    options: &EngineOptions,
    boot_id: [u8; 16],
    report: &mut OpenReport,
) -> Result<(Cache, (u64, Manifest)), Error> {
    let reconcile = options.reconcile;
    if !reconcile && !Cache::exists(dir) {
        return Err(Error::Invalid(format!(
            "parcel {} has no cache on this host (looked in {})",
            parcel.name(),
            dir.display()
        )));
    }
    let lock = Cache::lock(dir)?;
    if !Cache::exists(dir) {
        report.created = true;
        let created = create(parcel, lock, dir, options).await?;
        use_io(&created.0, options.cache_io, report);
        report.reached_store = true;
        return Ok(created);
    }
    let cache = Cache::open(lock, dir)?;
    use_io(&cache, options.cache_io, report);
    let repaired = cache.repair()?;
    if repaired != Default::default() {
        tracing::warn!(
            parcel = parcel.name(),
            dir = %dir.display(),
            bad_entries = repaired.bad_entries,
            truncated = repaired.truncated.len(),
            lost_dirty = repaired.lost_dirty.len(),
            "repaired a damaged cache"
        );
        report.warnings.push(format!(
            "the cache was damaged: {} impossible map entries and {} chunks cut off a truncated image are fetched again; {} unpublished chunks were lost with them",
            repaired.bad_entries,
            repaired.truncated.len(),
            repaired.lost_dirty.len()
        ));
    }
    let header = cache.header();
    let path = cache.manifest_path(header.base_version);
    let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
    let base = options.view(parcel.decode_manifest(
        &bytes,
        header.base_version,
        path.display().to_string(),
    )?)?;
    tracing::debug!(
        parcel = parcel.name(),
        dir = %dir.display(),
        base_version = header.base_version,
        unclean = header.open,
        "opened the cache"
    );
    if header.open {
        report.recovered = true;
        // Same boot: the process died, the page cache did not; every write
        // was marked dirty before its data went in. Nothing is in doubt.
        // Whole writes of chunks not local that were in flight, or whose
        // data no flush covered (see `write.rs`).
        let (landed, undone) = cache.resolve_writing(header.boot_id == boot_id)?;
        if !landed.is_empty() || !undone.is_empty() {
            tracing::info!(
                parcel = parcel.name(),
                landed = ?landed,
                undone = ?undone,
                "chunks written whole when the session stopped: those whose data landed are dirty, the others back to the base version"
            );
        }
        if header.boot_id != boot_id {
            let started = std::time::Instant::now();
            let (scanned, dirtied) = recover(parcel, &cache, &base)?;
            report.scanned_chunks = scanned;
            report.recovered_dirty = dirtied;
            cache.sync_state()?;
            tracing::info!(
                parcel = parcel.name(),
                scanned,
                dirtied,
                ms = started.elapsed().as_millis() as u64,
                "recovered the cache after a host crash: re-hashed the present chunks holding data"
            );
        } else {
            tracing::info!(
                parcel = parcel.name(),
                "the previous session of this cache stopped uncleanly (same boot: nothing to re-read)"
            );
        }
    }
    if options.ram.is_some() && !options.reattach {
        // The RAM of a VM that is gone (its device state went with it).
        let mut stale = cache.chunks_in(DIRTY);
        stale.extend(cache.chunks_in(cache::WRITING));
        if !stale.is_empty() {
            tracing::info!(
                parcel = parcel.name(),
                chunks = stale.len(),
                "dropped the RAM a previous run left unpublished"
            );
            cache.drop_chunks(&stale)?;
            let _ = cache.remove_file(crate::engine::upload::sync::SYNCED);
        }
    }
    let mut base = (header.base_version, base);
    if !reconcile {
        return Ok((cache, base));
    }
    let head = match parcel.head().await {
        Ok(h) => {
            report.reached_store = true;
            h
        }
        Err(e) => {
            tracing::info!(parcel = parcel.name(), version = base.0, error = %e, "the store does not answer: working offline");
            report
                .warnings
                .push(format!("working offline on version {}: {e}", base.0));
            return Ok((cache, base));
        }
    };
    let head = head.ok_or_else(|| Error::NoParcel {
        parcel: parcel.name().to_owned(),
        store: parcel.store().url().to_owned(),
    })?;
    if head < base.0 {
        return Err(Error::Conflict(format!(
            "the store's HEAD of parcel {} is version {head}, older than version {} this cache is based on; was the store rolled back? (cache {})",
            parcel.name(),
            base.0,
            dir.display()
        )));
    }
    while base.0 < head {
        let next = base.0 + 1;
        // The version after the base may have been removed by gc: then it
        // cannot be recognised as ours, and HEAD is another writer's.
        let own = parcel
            .manifest_with_object(next)
            .await
            .and_then(|(m, object)| Ok((options.view(m)?, object)));
        let own = match own {
            Ok((m, object))
                if m.writer == Some(cache.header().cache_id) && m.parent == Some(base.0) =>
            {
                Some((m, object))
            }
            Ok(_) | Err(Error::VersionRemoved { .. }) => None,
            Err(e) => return Err(e),
        };
        let ours = own.is_some();
        let (version, manifest, object) = match own {
            Some((m, object)) => (next, m, object),
            None => {
                let (h, object) = parcel.manifest_with_object(head).await?;
                (head, options.view(h)?, object)
            }
        };
        if manifest.geometry() != base.1.geometry() {
            if dirty_count(&cache) > 0 {
                return Err(conflict(parcel, &cache, base.0, version, &manifest));
            }
            // The disk changed size: start a fresh cache (create replaces
            // the old files).
            drop(cache);
            report.created = true;
            return create(parcel, Cache::lock(dir)?, dir, options).await;
        }
        if ours {
            adopt_own(parcel, &cache, &manifest)?;
        } else if options.reattach {
            return Err(moved_under_device(
                parcel, &cache, base.0, version, &manifest,
            ));
        } else if dirty_count(&cache) > 0 {
            return Err(conflict(parcel, &cache, base.0, version, &manifest));
        }
        let invalidated = invalidate_changed(&cache, &base.1, &manifest)?;
        tracing::info!(
            parcel = parcel.name(),
            from = base.0,
            to = version,
            ours,
            invalidated,
            "brought the cache up to a newer version"
        );
        report.invalidated += invalidated;
        cache.save_manifest(version, &object)?;
        cache.sync_state()?;
        cache.update_header(|h| h.base_version = version)?;
        cache.clear_trace()?;
        cache.prune_manifests(version);
        base = (version, manifest);
    }
    Ok((cache, base))
}

async fn create(
    parcel: &Parcel,
    lock: std::fs::File,
    dir: &Path,
    options: &EngineOptions,
) -> Result<(Cache, (u64, Manifest)), Error> {
    let head = parcel.require_head().await?;
    let (manifest, object) = parcel.manifest_with_object(head).await?;
    let manifest = options.view(manifest)?;
    tracing::info!(
        parcel = parcel.name(),
        dir = %dir.display(),
        version = head,
        chunks = manifest.chunks.len(),
        "creating the cache"
    );
    let present: Vec<bool> = manifest
        .chunks
        .iter()
        .map(|e| *e == ChunkEntry::Zero)
        .collect();
    let cache = Cache::create(lock, dir, new_header(head, &manifest)?, &object, &present)?;
    Ok((cache, (head, manifest)))
}

/// Reads and writes the image as `asked` (recorded in the cache), else as
/// the cache recorded, else [`CacheIo::DEFAULT`]: from the first read on, a
/// recovery's scan included. Direct I/O that cannot be is no failure: the
/// cache works buffered, with a warning when direct was asked (now or
/// before), quietly when it was only the default (a cache on tmpfs).
pub(crate) fn use_io(cache: &Cache, asked: Option<CacheIo>, report: &mut OpenReport) {
    let chosen = asked.or(cache.header().cache_io);
    if let Some(mode) = asked {
        cache.record_io(mode);
    }
    let mode = chosen.unwrap_or(CacheIo::DEFAULT);
    match cache.use_io(mode) {
        Err(why) if chosen.is_some() => {
            tracing::warn!(cache = %cache.dir().display(), "direct I/O not used: {why}");
            report
                .warnings
                .push(format!("the cache works through the page cache: {why}"));
        }
        Err(why) => {
            tracing::info!(cache = %cache.dir().display(), "direct I/O not used: {why}");
        }
        Ok(()) => {}
    }
}

/// Whether `data` is what `entry` says the chunk holds.
fn matches(parcel: &Parcel, data: &[u8], entry: &ChunkEntry) -> bool {
    match entry {
        ChunkEntry::Zero => format::is_zero(data),
        ChunkEntry::Data(k) => parcel.secret().chunk_key(data) == *k,
    }
}

/// Reads chunk `c` of `m`'s disk from the image into `buf` (aligned: a
/// cache that works direct reads it past the page cache).
fn read_chunk(cache: &Cache, m: &Manifest, c: u64, buf: &mut AlignedBuf) -> Result<(), Error> {
    let g = m.geometry();
    let len = g.chunk_len(c) as usize;
    if buf.len() != len {
        *buf = AlignedBuf::zeroed(len);
    }
    cache.read_image(buf, g.chunk_offset(c))
}

/// After a host crash: a chunk marked present may hold data whose dirty
/// mark never reached the disk. Such chunks are found by hashing what the
/// image holds where it holds anything (see [`present_mismatches`]); those
/// that do not match become dirty. Returns (chunks hashed, chunks made
/// dirty).
fn recover(parcel: &Parcel, cache: &Cache, base: &Manifest) -> Result<(u64, u64), Error> {
    // A dirty chunk's content at its generation is in doubt after a host
    // crash: its map entry may have gone back to an older generation while
    // its data did not (or the other way round), so a generation `isr sync`
    // recorded as uploaded could come round again for other data. Every
    // dirty chunk takes a generation no record can name.
    for c in cache.chunks_in(DIRTY) {
        cache.set(c, DIRTY)?;
    }
    let found = present_mismatches(parcel, cache, base, &cache.chunks_in(PRESENT), &|_| {})?;
    for &c in &found.mismatched {
        cache.set(c, DIRTY)?;
    }
    Ok((found.hashed, found.mismatched.len() as u64))
}

/// What [`present_mismatches`] found.
pub(crate) struct Mismatches {
    /// Chunks whose bytes were read and hashed.
    pub(crate) hashed: u64,
    /// Chunks whose image bytes are not what the manifest says.
    pub(crate) mismatched: Vec<u64>,
}

/// Which of `candidates` (chunks the map says are present) do not hold
/// what `base` says. Holes are never read: a chunk that is all hole matches
/// exactly when the manifest has zeros there (stored chunks are never all
/// zero). The rest is read and hashed in parallel; `progress` gets the
/// bytes hashed. No stripe lock is taken: callers run where nothing writes
/// the cache (before the device starts, or in `hoard` and `check`).
pub(crate) fn present_mismatches(
    parcel: &Parcel,
    cache: &Cache,
    base: &Manifest,
    candidates: &[u64],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Mismatches, Error> {
    let g = base.geometry();
    let image_path = cache.dir().join("image");
    let extents = crate::local::sparse::data_extents(cache.image.file(), g.disk_size())
        .map_err(|e| Error::io("seek", &image_path, e))?;
    let mut allocated = vec![false; cache.len()];
    for r in &extents {
        for c in g.chunk_of(r.start)..=g.chunk_of(r.end - 1) {
            allocated[c as usize] = true;
        }
    }
    let mut mismatched = Vec::new();
    let mut to_hash = Vec::new();
    for &c in candidates {
        match (&base.chunks[c as usize], allocated[c as usize]) {
            (ChunkEntry::Zero, false) => {}
            (ChunkEntry::Data(_), false) => mismatched.push(c),
            (_, true) => to_hash.push(c),
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = to_hash.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = to_hash
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    let mut buf = AlignedBuf::zeroed(0);
                    let mut bad = Vec::new();
                    for &c in part {
                        read_chunk(cache, base, c, &mut buf)?;
                        if !matches(parcel, &buf, &base.chunks[c as usize]) {
                            bad.push(c);
                        }
                        progress(buf.len() as u64);
                    }
                    Ok::<_, Error>(bad)
                })
            })
            .collect();
        for w in workers {
            mismatched.extend(w.join().expect("hashing does not panic")?);
        }
        Ok::<_, Error>(())
    })?;
    mismatched.sort_unstable();
    Ok(Mismatches {
        hashed: to_hash.len() as u64,
        mismatched,
    })
}

/// Our own publish of `next`: dirty chunks holding what `next` says are
/// clean. Every dirty chunk is checked, not only those `next` changed: a
/// chunk rewritten with the bytes it had (zeros over zeros, a block written
/// again unchanged) is dirty although its entry did not change.
fn adopt_own(parcel: &Parcel, cache: &Cache, next: &Manifest) -> Result<(), Error> {
    let mut buf = AlignedBuf::zeroed(0);
    for c in 0..cache.len() as u64 {
        let i = c as usize;
        if cache::state_of(cache.entry(c)) == DIRTY {
            read_chunk(cache, next, c, &mut buf)?;
            if matches(parcel, &buf, &next.chunks[i]) {
                cache.set(c, PRESENT)?;
            }
        }
    }
    Ok(())
}

/// Chunks that `next` changed and the cache holds clean: dropped (zero
/// chunks become present holes, once the holes are durable). Dirty chunks
/// are left alone.
fn invalidate_changed(cache: &Cache, base: &Manifest, next: &Manifest) -> Result<u64, Error> {
    let changed: Vec<u64> = (0..cache.len() as u64)
        .filter(|&c| {
            let i = c as usize;
            base.chunks[i] != next.chunks[i] && cache::state_of(cache.entry(c)) != DIRTY
        })
        .collect();
    cache.drop_chunks(&changed)?;
    for &c in &changed {
        if next.chunks[c as usize] == ChunkEntry::Zero {
            cache.set(c, PRESENT)?;
        }
    }
    Ok(changed.len() as u64)
}

/// Re-attaching a live device (its daemon died) to a parcel that another
/// writer moved on: the guest still holds the old version's data in its
/// page cache, so bringing the cache under it to the new version would mix
/// the two. The cache is kept as it is.
fn moved_under_device(
    parcel: &Parcel,
    cache: &Cache,
    base: u64,
    version: u64,
    m: &Manifest,
) -> Error {
    Error::Conflict(format!(
        "parcel {} moved on while its device was without a daemon: the device serves version {base}, but host {} published version {version} (at {} Unix time), so the lease was taken over meanwhile; refusing to re-attach the device to another writer's version under the guest. The cache ({}) is kept with its {} unpublished chunks: stop the guest, remove the device, and `isr fork --parcel {} --to NEW` keeps this host's work",
        parcel.name(),
        m.host,
        m.created_unix,
        cache.dir().display(),
        dirty_count(cache),
        parcel.name()
    ))
}

fn dirty_count(cache: &Cache) -> usize {
    cache.chunks_in(DIRTY).len()
}

fn conflict(parcel: &Parcel, cache: &Cache, base: u64, version: u64, m: &Manifest) -> Error {
    Error::Conflict(format!(
        "the cache of parcel {} ({}) holds {} unpublished chunks based on version {base}, but version {version} was published by host {} at {}; refusing to merge them. Move the cache directory aside to keep its changes (its image holds every chunk it wrote), or remove it to discard them",
        parcel.name(),
        cache.dir().display(),
        dirty_count(cache),
        m.host,
        crate::time::format_utc(m.created_unix)
    ))
}
