//! Delta publish, the core of suspend: upload the dirty chunks, then commit
//! the next version; only what changed moves.
//!
//! Order (invariant 4): every chunk the new manifest names is durable in the
//! store before the manifest is created, and that creation (put-if-absent)
//! is the commit. Only then does the cache record the new base; a chunk
//! written again while its upload was in flight keeps its dirty mark
//! (its generation changed). A crash anywhere leaves every dirty mark in
//! place; the next open recognises a committed-but-unrecorded publish as its
//! own and a rerun completes it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use format::chunk::ChunkEncoder;
use format::{ChunkEntry, ChunkKey, VmSettings};
use futures::{StreamExt, TryStreamExt, stream};

use crate::Image;
use crate::aligned::AlignedBuf;
use crate::engine::{Base, Engine, Shared};
use crate::local::cache::{DIRTY, PRESENT, state_of};
use crate::remote::lease::Lease;
use crate::transfer::DEFAULT_CONCURRENCY;
use crate::transfer::upload::ImageUpload;
use crate::{ChunkFault, Error, Parcel};

/// What a publish did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishSummary {
    /// The version published (the old base when nothing was dirty).
    pub version: u64,
    /// Dirty chunks found.
    pub dirty_chunks: u64,
    /// Chunk objects uploaded.
    pub uploaded_chunks: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Dirty chunks not uploaded again because a sync had (`isr sync`).
    pub synced_chunks: u64,
    /// Chunks of the base version that a fork shares, written to the store
    /// again because they were old or gone (from the cache, else from the
    /// store; see [`Store::has_chunk`](crate::Store::has_chunk)).
    pub refreshed_chunks: u64,
    /// The memory image published with the disk, if any (its chunk table
    /// left out).
    pub memory: Option<ImageUpload>,
    /// The guest RAM published with the disk ([`SavedVm::ram`]): dirty
    /// chunks, chunk objects uploaded and their bytes.
    pub ram_dirty_chunks: u64,
    pub ram_uploaded_chunks: u64,
    pub ram_bytes_uploaded: u64,
    /// Wall time.
    pub seconds: f64,
}

/// What a suspend publishes besides the disk's changes.
#[derive(Debug, Clone, Default)]
pub struct SavedVm {
    /// The VM's saved memory and device state (a hypervisor's state file):
    /// published with the disk as one version. Without it, the version has
    /// no memory image (the disk changed: the base's would not match it).
    pub memory: Option<PathBuf>,
    /// The VM's settings, if they are new; without them the base version's
    /// carry over.
    pub vm: Option<VmSettings>,
    /// The engine serving the guest's RAM (see [`EngineOptions::ram`]): its
    /// changes are published in the same version, as the version's RAM
    /// image. Without it, the version has no RAM image.
    ///
    /// [`EngineOptions::ram`]: crate::EngineOptions::ram
    pub ram: Option<Arc<Engine>>,
}

impl Engine {
    /// Publishes this cache (its base version with its local changes) as
    /// version 1 of a new parcel `to` in the same store, with the same key:
    /// the way to keep the work of a session that was fenced. Only the
    /// changed chunks upload; the others are shared, once made young in
    /// the store (written again, from this cache or the store's old copy,
    /// if they are old or gc removed them). The cache is then based on
    /// `to` (move it with [`fork`](crate::engine::fork)).
    pub fn publish_fork(&self, to: &Parcel, created_unix: i64) -> Result<PublishSummary, Error> {
        self.shared.refuse_if_ram()?;
        let (shared, to) = (self.shared.clone(), to.clone());
        self.flush_and_run(async move {
            // Refused before anything uploads; `publish` catches a race.
            if to.head().await?.is_some() {
                return Err(fork_target_exists(&to));
            }
            publish(shared, None, Some(&to), created_unix, &SavedVm::default()).await
        })
    }

    /// Publishes the dirty chunks as the next version. With `lease`, checks
    /// first that it is still ours. With nothing dirty, publishes nothing.
    pub fn publish(
        &self,
        lease: Option<&Lease>,
        created_unix: i64,
    ) -> Result<PublishSummary, Error> {
        self.publish_with(lease, created_unix, &SavedVm::default())
    }

    /// [`publish`](Self::publish), with the VM's memory image and settings
    /// in the same version: a version is published even when the disk did
    /// not change, if there is a memory image or new settings.
    pub fn publish_with(
        &self,
        lease: Option<&Lease>,
        created_unix: i64,
        saved: &SavedVm,
    ) -> Result<PublishSummary, Error> {
        self.shared.refuse_if_ram()?;
        if let Some(ram) = &saved.ram {
            ram.flush()?;
        }
        let shared = self.shared.clone();
        self.flush_and_run(async move {
            if let Some(l) = lease
                && let Err(e) = l.check().await
            {
                return Err(fenced(&shared, e).await);
            }
            publish(shared, lease, None, created_unix, saved).await
        })
    }

    /// Flushes, then runs a publish on the fetcher's runtime, timing both.
    fn flush_and_run(
        &self,
        publish: impl std::future::Future<Output = Result<PublishSummary, Error>>,
    ) -> Result<PublishSummary, Error> {
        let started = Instant::now();
        self.flush()?;
        let mut summary = self.block_on(publish)??;
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }
}

fn fork_target_exists(to: &Parcel) -> Error {
    Error::Conflict(format!(
        "parcel {} exists already in {}; choose another name",
        to.name(),
        to.store().url()
    ))
}

/// Publishes the dirty chunks: as the next version of the engine's parcel,
/// or (`fork_to`) as version 1 of a new parcel.
async fn publish(
    shared: Arc<Shared>,
    lease: Option<&Lease>,
    fork_to: Option<&Parcel>,
    created_unix: i64,
    saved: &SavedVm,
) -> Result<PublishSummary, Error> {
    let base = shared.base();
    let (base_version, base_manifest) = (&base.version, &base.manifest);
    let dirty = shared.cache.chunks_in(DIRTY);
    let mut summary = PublishSummary {
        version: *base_version,
        dirty_chunks: dirty.len() as u64,
        ..Default::default()
    };
    let new_vm = saved
        .vm
        .as_ref()
        .filter(|&vm| base_manifest.vm.as_ref() != Some(vm));
    if dirty.is_empty()
        && fork_to.is_none()
        && saved.memory.is_none()
        && saved.ram.is_none()
        && new_vm.is_none()
    {
        return Ok(summary);
    }
    // One upload pass at a time (see `sync`).
    let _pass = shared.upload_pass.lock().await;
    let uploaded = upload_dirty(&shared, dirty, *base_version).await?;
    // The RAM's changes, uploaded the same way (its pass taken after the
    // disk's: only a publish takes both).
    let ram = saved.ram.as_ref().map(|e| e.shared.clone());
    let _ram_pass = match &ram {
        Some(r) => Some(r.upload_pass.lock().await),
        None => None,
    };
    let ram_uploaded = match &ram {
        Some(r) => {
            let dirty = r.cache.chunks_in(DIRTY);
            summary.ram_dirty_chunks = dirty.len() as u64;
            Some(upload_dirty(r, dirty, r.base_version()).await?)
        }
        None => None,
    };

    let mut manifest = base_manifest.clone();
    for u in &uploaded {
        manifest.chunks[u.chunk as usize] = u.table_entry;
        if let Some(size) = u.sent {
            summary.uploaded_chunks += 1;
            summary.bytes_uploaded += size;
        }
        summary.synced_chunks += u64::from(u.synced);
    }
    manifest.ram = None;
    if let (Some(r), Some(up)) = (&ram, &ram_uploaded) {
        let base = r.base();
        let mut chunks = base.manifest.chunks.clone();
        for u in up {
            chunks[u.chunk as usize] = u.table_entry;
            if let Some(size) = u.sent {
                summary.ram_uploaded_chunks += 1;
                summary.ram_bytes_uploaded += size;
            }
        }
        manifest.ram = Some(format::RamImage {
            size: r.geometry.disk_size(),
            chunks,
            access_trace: r.trace.lock().expect("trace lock").clone(),
            writer: Some(r.cache.header().cache_id),
        });
    }
    // The memory image: cut by content and deduplicated, against
    // the chunks of the base version and of the new disk.
    manifest.memory_size = 0;
    manifest.memory_chunks.clear();
    manifest.memory_lengths.clear();
    if let Some(path) = &saved.memory {
        // Each chunk is checked against the store once (none is trusted
        // for being named by the base version: see `Store::store_chunk`).
        let mut known = std::collections::HashSet::new();
        let mut up = crate::transfer::upload::upload_memory(
            &shared.parcel,
            path,
            manifest.chunk_size,
            &mut known,
            crate::no_progress(),
        )
        .await?;
        manifest.memory_size = up.size;
        manifest.memory_chunks = std::mem::take(&mut up.table);
        manifest.memory_lengths = up.lengths.clone();
        summary.memory = Some(up);
    }
    if let Some(vm) = new_vm {
        manifest.vm = Some(vm.clone());
    }
    if let Some(to) = fork_to {
        summary.refreshed_chunks = keep_inherited_young(&shared, &base, &uploaded, to).await?;
    }
    manifest.parent = fork_to.is_none().then_some(*base_version);
    manifest.created_unix = created_unix;
    manifest.host = shared.options.host.clone();
    manifest.access_trace = shared.trace.lock().expect("trace lock").clone();
    manifest.writer = Some(shared.cache.header().cache_id);
    let (target, version) = match fork_to {
        Some(p) => (p, 1),
        None => (&shared.parcel, base_version + 1),
    };
    let published = match target.publish(&manifest, version).await {
        Ok(p) => p,
        Err(Error::VersionExists { .. }) if fork_to.is_some() => {
            return Err(fork_target_exists(target));
        }
        Err(Error::VersionExists { .. }) => {
            // A lease stolen meanwhile: the stealer's fence took this
            // version number (see `lease`).
            if let Some(l) = lease
                && let Err(e) = l.check().await
            {
                return Err(fenced(&shared, e).await);
            }
            return Err(Error::Conflict(format!(
                "version {version} of parcel {} was published by another writer while this cache was based on version {base_version}; nothing was published and every change is still in the cache ({})",
                shared.parcel.name(),
                shared.cache.dir().display()
            )));
        }
        Err(e) => return Err(e),
    };

    // Committed. Record it locally; a crash from here on is recognised at
    // the next open (the manifest names this cache as its writer, and the
    // RAM image the RAM's cache).
    if let (Some(r), Some(up)) = (&ram, &ram_uploaded) {
        let view = r.options.view(manifest.clone())?;
        adopt(r, version, &published.object, view, up)?;
    }
    adopt(&shared, version, &published.object, manifest, &uploaded)?;
    summary.version = version;
    Ok(summary)
}

/// Makes version `version` (its manifest `object`, decoded and seen as
/// this engine serves it: `manifest`) the cache's base after its commit:
/// each uploaded chunk not written since becomes present.
fn adopt(
    shared: &Shared,
    version: u64,
    object: &[u8],
    manifest: format::Manifest,
    uploaded: &[Uploaded],
) -> Result<(), Error> {
    shared.cache.save_manifest(version, object)?;
    // What was read and uploaded is durable in the image before any chunk
    // is marked present (invariant 3): a write that landed after the
    // flush this publish began with was read in its new generation.
    shared.cache.sync_image()?;
    for u in uploaded {
        let _g = shared.stripe(u.chunk);
        if Some(shared.cache.entry(u.chunk)) == u.map_entry {
            shared.cache.set(u.chunk, PRESENT)?;
        }
    }
    shared.cache.sync_state()?;
    // The records belonged to the old base.
    {
        let mut record = shared.synced.lock().expect("synced lock");
        record.base_version = version;
        record.chunks.clear();
        // Only a hint: a stale file is ignored at the next open (other base).
        let _ = record.save(&shared.cache);
    }
    shared.cache.update_header(|h| h.base_version = version)?;
    *shared.base.write().expect("base lock") =
        Arc::new(crate::engine::Base::new(version, manifest));
    shared.cache.clear_trace()?;
    shared.trace.lock().expect("trace lock").clear();
    for word in shared.touched.iter() {
        word.store(0, std::sync::atomic::Ordering::Relaxed);
    }
    shared.cache.prune_manifests(version);
    Ok(())
}

/// Uploads `dirty` chunks of the cache (those a sync uploaded in their
/// current generation are not read again, only checked: a chunk gc may
/// have removed since is uploaded afresh). The caller holds the upload
/// pass.
async fn upload_dirty(
    shared: &Arc<Shared>,
    dirty: Vec<u64>,
    base_version: u64,
) -> Result<Vec<Uploaded>, Error> {
    let record = shared.synced.lock().expect("synced lock").clone();
    shared.start_pass(&dirty);
    stream::iter(dirty)
        .map(|c| {
            let shared = shared.clone();
            let entry = shared.cache.entry(c);
            let synced = (record.base_version == base_version)
                .then(|| record.current(c, entry))
                .flatten();
            async move {
                let done = shared.clone();
                let reused = match synced {
                    Some(ChunkEntry::Zero) => true,
                    Some(ChunkEntry::Data(k)) => shared.parcel.store().has_chunk(&k.id()).await?,
                    None => false,
                };
                let u = if reused {
                    Uploaded {
                        chunk: c,
                        map_entry: Some(entry),
                        table_entry: synced.expect("reused"),
                        sent: None,
                        synced: true,
                    }
                } else {
                    upload_chunk(shared, c).await?
                };
                done.pass_did(c);
                Ok::<_, Error>(u)
            }
        })
        .buffer_unordered(DEFAULT_CONCURRENCY)
        .try_collect()
        .await
}

/// One dirty chunk, held by the store in the generation read.
pub(in crate::engine) struct Uploaded {
    pub(in crate::engine) chunk: u64,
    /// The chunk's map entry (state and generation) when it was read;
    /// `None` if a write of it was in flight then (between `begin_write`
    /// and `end_write`: its data may be landing under the generation
    /// `begin_write` gave it, so what was read stands for no generation).
    pub(in crate::engine) map_entry: Option<u64>,
    /// Its entry in the new chunk table.
    pub(in crate::engine) table_entry: ChunkEntry,
    /// Bytes sent, if this created the object.
    pub(in crate::engine) sent: Option<u64>,
    /// An earlier sync had uploaded it (nothing was read or sent now).
    pub(in crate::engine) synced: bool,
}

/// Reads dirty chunk `c` with its map entry, encodes it and uploads it
/// unless the store holds it (an all-zero chunk is never stored).
pub(in crate::engine) async fn upload_chunk(
    shared: Arc<Shared>,
    c: u64,
) -> Result<Uploaded, Error> {
    // Read and encode under the chunk's stripe lock: the snapshot and its
    // generation belong together.
    let s = shared.clone();
    let (map_entry, encoded) = tokio::task::spawn_blocking(move || {
        let mut buf = AlignedBuf::zeroed(s.geometry.chunk_len(c) as usize);
        let _g = s.stripe(c);
        let entry = (!s.write_in_flight(c)).then(|| s.cache.entry(c));
        s.cache
            .image
            .read_exact_at(&mut buf, s.geometry.chunk_offset(c))
            .map_err(|e| Error::io("read", &s.cache.dir().join("image"), e))?;
        if format::is_zero(&buf) {
            return Ok::<_, Error>((entry, None));
        }
        let chunk = ChunkEncoder::new(s.parcel.secret().clone(), 1)
            .encode(&buf)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok((entry, Some(chunk)))
    })
    .await
    .expect("encoding does not panic")?;
    let mut done = Uploaded {
        chunk: c,
        map_entry,
        table_entry: ChunkEntry::Zero,
        sent: None,
        synced: false,
    };
    let Some(chunk) = encoded else {
        return Ok(done);
    };
    done.table_entry = ChunkEntry::Data(chunk.key);
    let store = shared.parcel.store();
    let size = chunk.object.len() as u64;
    match store
        .store_chunk(&chunk.id, Bytes::from(chunk.object))
        .await?
    {
        crate::ChunkStored::Reused => {}
        crate::ChunkStored::Uploaded | crate::ChunkStored::Replaced(_) => {
            done.sent = Some(size);
            shared.note_uploaded(size);
        }
    }
    Ok(done)
}

/// Makes every stored chunk that a fork's version 1 shares with the base
/// version (every disk chunk not uploaded now) young in the store before
/// the fork commits; returns how many were written again. The base is
/// usually old when a cache is forked (a fenced session's), and `isr gc`
/// may have deleted its chunks once its versions went, or may be about to:
/// a chunk is reused only through the freshness rule (see
/// `store/fresh.rs`), as rollback does.
async fn keep_inherited_young(
    shared: &Arc<Shared>,
    base: &Arc<Base>,
    uploaded: &[Uploaded],
    to: &Parcel,
) -> Result<u64, Error> {
    // The uploaded chunks' keys are young already (checked or put now).
    let mut young: std::collections::HashSet<ChunkKey> = uploaded
        .iter()
        .filter_map(|u| match u.table_entry {
            ChunkEntry::Data(k) => Some(k),
            ChunkEntry::Zero => None,
        })
        .collect();
    let replaced: std::collections::HashSet<u64> = uploaded.iter().map(|u| u.chunk).collect();
    let mut inherited = Vec::new();
    for (c, e) in base.manifest.chunks.iter().enumerate() {
        if let ChunkEntry::Data(k) = e
            && !replaced.contains(&(c as u64))
            && young.insert(*k)
        {
            inherited.push((*k, c as u64));
        }
    }
    let refreshed: Vec<bool> = stream::iter(inherited)
        .map(|(key, c)| keep_young(shared.clone(), base.clone(), key, c, to))
        .buffer_unordered(DEFAULT_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(refreshed.iter().filter(|&&r| r).count() as u64)
}

/// Makes the base's chunk `key` (at disk chunk `c`, among others) young:
/// true if it was written again, from this cache if it holds it, else from
/// the store's old copy. A chunk in neither fails the fork.
async fn keep_young(
    shared: Arc<Shared>,
    base: Arc<Base>,
    key: ChunkKey,
    c: u64,
    to: &Parcel,
) -> Result<bool, Error> {
    let id = key.id();
    let store = shared.parcel.store();
    if store.has_chunk(&id).await? {
        return Ok(false);
    }
    let (s, b) = (shared.clone(), base.clone());
    let cached = tokio::task::spawn_blocking(move || encode_from_cache(&s, &b, key))
        .await
        .expect("encoding does not panic")?;
    let object = match cached {
        Some(object) => Bytes::from(object),
        None => match store.get_chunk(&id).await {
            Ok(object) => object,
            Err(Error::NotFound { .. }) => {
                return Err(Error::Invalid(format!(
                    "cannot fork parcel {} (version {}) to {}: chunk {id} (disk chunk {c}), which the fork shares with version {}, is neither in the store (isr gc removed it) nor in this cache ({}); nothing was published",
                    shared.parcel.name(),
                    base.version,
                    to.name(),
                    base.version,
                    shared.cache.dir().display()
                )));
            }
            Err(e) => {
                return Err(Error::BadChunk {
                    id,
                    image: Image::Disk,
                    index: c,
                    parcel: shared.parcel.name().to_owned(),
                    version: base.version,
                    fault: ChunkFault::Store(Box::new(e)),
                });
            }
        },
    };
    store.put_chunk(&id, object).await?;
    Ok(true)
}

/// The base's chunk `key` encoded from this cache's image, if a place the
/// base names it at is present (holds the base's data) and hashes to it.
fn encode_from_cache(s: &Shared, base: &Base, key: ChunkKey) -> Result<Option<Vec<u8>>, Error> {
    let secret = s.parcel.secret();
    for &c in base.by_key.get(&key).into_iter().flatten() {
        let mut buf = AlignedBuf::zeroed(s.geometry.chunk_len(c) as usize);
        {
            let _g = s.stripe(c);
            if state_of(s.cache.entry(c)) != PRESENT {
                continue;
            }
            s.cache
                .image
                .read_exact_at(&mut buf, s.geometry.chunk_offset(c))
                .map_err(|e| Error::io("read", &s.cache.dir().join("image"), e))?;
        }
        if secret.chunk_key(&buf) != key {
            continue;
        }
        let chunk = ChunkEncoder::new(secret.clone(), 1)
            .encode(&buf)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        return Ok(Some(chunk.object));
    }
    Ok(None)
}

/// The error of a session whose lease is gone (`lost`, from
/// [`Lease::check`]): fenced, with what it still holds and how to keep it.
async fn fenced(shared: &Shared, lost: Error) -> Error {
    let Error::LeaseLost { holder, .. } = lost else {
        return lost;
    };
    let dirty = shared.cache.chunks_in(DIRTY).len() as u64;
    Error::Fenced {
        parcel: shared.parcel.name().to_owned(),
        holder,
        version: shared.parcel.head().await.ok().flatten().unwrap_or(0),
        dirty,
        cache: shared.cache.dir().display().to_string(),
    }
}
