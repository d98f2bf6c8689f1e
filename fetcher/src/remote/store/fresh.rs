//! Chunk objects, and the freshness rule that lets `isr gc` delete
//! unreferenced chunks while other hosts publish.
//!
//! A publisher that finds a chunk in the store does not upload it again.
//! But a chunk that no kept version names may be an orphan that gc is about
//! to delete; a publish that reused it would commit a manifest naming a
//! chunk that is gone. So a chunk is *reused* only while it is young:
//!
//! * [`Store::has_chunk`] answers true only for a chunk whose
//!   `last_modified` is less than the refresh age R ago (default 6 h,
//!   [`DEFAULT_CHUNK_REFRESH`]; `$ISR_CHUNK_REFRESH_SECS` overrides it);
//! * [`Store::put_chunk`], finding the chunk present but older than R,
//!   writes it again (a plain put of the same bytes: the name derives from
//!   the content), which makes it young; it then waits a moment and checks
//!   that the chunk is still there (a gc that had decided to delete it just
//!   before the write may delete it just after: then it is written again).
//!
//! gc deletes only chunks older than its grace G > R, and only after it last
//! looked at the versions at most δ before the delete. A publish whose check
//! of a chunk and commit are less than G − R − δ apart is then safe: either
//! the chunk was young at the check, so gc cannot find it older than G
//! until after the commit, when gc sees the new manifest naming it; or the
//! publisher wrote it, which restarts its age. Every publisher (the
//! engine's publish, import, the memory image's upload, rollback) reuses
//! chunks through these two functions only. Ages compare the store's
//! `last_modified` with this host's clock: clocks apart by more than a few
//! minutes eat into the margin.
//!
//! A publisher that holds a chunk's bytes stores it through
//! [`Store::store_chunk`], which also refuses to reuse an object it cannot
//! vouch for: one whose size differs from the bytes in hand (a truncated or
//! damaged object, which the object name alone cannot tell) is replaced by
//! them, and on a `file://` store, where reading is local and cheap, so is
//! one whose content differs. (The encoding is deterministic: the bytes in
//! hand are what any writer of that chunk stored. Other stores are checked
//! by size only: an S3 ETag is not an MD5 under every kind of encryption.)

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use format::ChunkId;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use super::{PutOutcome, Store};

/// What [`Store::store_chunk`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkStored {
    /// The object was not there: uploaded.
    Uploaded,
    /// A young copy the publisher could vouch for was there (or an old
    /// one, now refreshed): nothing uploaded.
    Reused,
    /// The object there was damaged (why): replaced by these bytes.
    Replaced(String),
}
use crate::Error;

/// Default refresh age R: a chunk older than this is rewritten, not reused.
pub const DEFAULT_CHUNK_REFRESH: Duration = Duration::from_secs(6 * 3600);

/// Bounds of the wait between refreshing a chunk and checking it is there.
const SETTLE_MIN: Duration = Duration::from_millis(20);
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// R from `$ISR_CHUNK_REFRESH_SECS` (for tests), else the default.
pub(super) fn refresh_from_env() -> Duration {
    std::env::var("ISR_CHUNK_REFRESH_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(DEFAULT_CHUNK_REFRESH, Duration::from_secs)
}

/// How long ago `t` was (zero if it is in the future: a clock ahead).
pub(crate) fn age_of(t: SystemTime) -> Duration {
    SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
}

impl Store {
    /// Whether a chunk object exists and is young enough to be reused as it
    /// is: written less than [`chunk_refresh`](Self::chunk_refresh) ago. An
    /// older one answers false, so that the caller puts it, which refreshes
    /// it (see the module docs).
    pub async fn has_chunk(&self, id: &ChunkId) -> Result<bool, Error> {
        let age = self.chunk_age("check chunk", &Self::chunk_path(id)).await?;
        Ok(age.is_some_and(|a| a < self.chunk_refresh))
    }

    /// Stores a chunk object unless one of that name exists (names derive
    /// from content, so an existing one holds the same bytes; that includes
    /// one this very call created in an attempt whose answer was lost). An
    /// existing chunk older than the refresh age is written again, to make
    /// it young (still [`PutOutcome::AlreadyPresent`]).
    pub async fn put_chunk(&self, id: &ChunkId, object: Bytes) -> Result<PutOutcome, Error> {
        let path = Self::chunk_path(id);
        self.up.take(object.len() as u64).await;
        match self.create("put chunk", &path, object.clone()).await? {
            PutOutcome::Created => Ok(PutOutcome::Created),
            PutOutcome::AlreadyPresent => {
                self.keep_fresh(&path, object).await?;
                Ok(PutOutcome::AlreadyPresent)
            }
        }
    }

    /// Stores chunk object `object` (the encoding of a chunk whose bytes
    /// the caller holds) as `id`, unless the store has a copy this host can
    /// vouch for: the same size, and on a `file://` store the same bytes.
    /// A copy that is not is replaced; an old one is refreshed (see the
    /// module docs).
    pub async fn store_chunk(&self, id: &ChunkId, object: Bytes) -> Result<ChunkStored, Error> {
        let path = Self::chunk_path(id);
        let location = Path::from(path.as_str());
        let meta = match self
            .retry
            .run_as(self.op("check chunk", &path), || self.inner.head(&location))
            .await
        {
            Ok(meta) => meta,
            Err(f) => match self.error("check chunk", &path, f) {
                Error::NotFound { .. } => return self.store_missing_chunk(id, object).await,
                e => return Err(e),
            },
        };
        let have = meta.size as u64;
        let why = if have != object.len() as u64 {
            Some(format!("{have} bytes where {} were expected", object.len()))
        } else if self.url().starts_with("file://") {
            match self.get("check chunk", &path).await {
                Ok(stored) if stored == object => None,
                Ok(_) => Some("its bytes differ from the chunk's encoding".to_owned()),
                // Deleted since (a gc): stored afresh, as a missing chunk.
                Err(Error::NotFound { .. }) => return self.store_missing_chunk(id, object).await,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        if let Some(why) = why {
            tracing::warn!(chunk = %id, why, "replacing a damaged chunk object");
            self.up.take(object.len() as u64).await;
            self.overwrite("replace chunk", &path, object).await?;
            return Ok(ChunkStored::Replaced(why));
        }
        let age = age_of(super::list::to_system_time(
            meta.last_modified.timestamp_millis(),
        ));
        if age >= self.chunk_refresh {
            self.keep_fresh(&path, object).await?;
        }
        Ok(ChunkStored::Reused)
    }

    /// [`store_chunk`](Self::store_chunk) of a chunk found missing: put (a
    /// racing writer's copy, of the same bytes, is reused).
    async fn store_missing_chunk(&self, id: &ChunkId, object: Bytes) -> Result<ChunkStored, Error> {
        Ok(match self.put_chunk(id, object).await? {
            PutOutcome::Created => ChunkStored::Uploaded,
            PutOutcome::AlreadyPresent => ChunkStored::Reused,
        })
    }

    /// Makes sure the existing chunk `path` is young: rewrites it if it is
    /// older than the refresh age (or was deleted meanwhile), then checks,
    /// after a moment, that it is still there.
    async fn keep_fresh(&self, path: &str, object: Bytes) -> Result<(), Error> {
        let mut age = self.chunk_age("check chunk", path).await?;
        for _ in 0..3 {
            if age.is_some_and(|a| a < self.chunk_refresh) {
                return Ok(());
            }
            let started = tokio::time::Instant::now();
            self.overwrite("refresh chunk", path, object.clone())
                .await?;
            // A gc that found the chunk old just before our write deletes
            // it about one request later: give it that time, then look.
            let settle = (started.elapsed() * 2).clamp(SETTLE_MIN, SETTLE_MAX);
            tokio::time::sleep(settle).await;
            age = self.chunk_age("check chunk", path).await?;
            if age.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// How long ago object `path` was last written; `None` if it is missing.
    pub(crate) async fn chunk_age(
        &self,
        op: &'static str,
        path: &str,
    ) -> Result<Option<Duration>, Error> {
        let location = Path::from(path);
        match self
            .retry
            .run_as(self.op(op, path), || self.inner.head(&location))
            .await
        {
            Ok(meta) => Ok(Some(age_of(super::list::to_system_time(
                meta.last_modified.timestamp_millis(),
            )))),
            Err(f) => match self.error(op, path, f) {
                Error::NotFound { .. } => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Deletes chunk `id` if it is still older than `grace` (looked at
    /// just before the delete: a publisher may have refreshed it since it
    /// was listed). Returns whether it was deleted.
    pub(crate) async fn delete_chunk_if_older(
        &self,
        id: &ChunkId,
        grace: Duration,
    ) -> Result<bool, Error> {
        let path = Self::chunk_path(id);
        match self.chunk_age("check chunk", &path).await? {
            Some(age) if age > grace => {
                self.delete("remove chunk", &path).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
