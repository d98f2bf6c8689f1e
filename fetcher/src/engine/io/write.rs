//! The write path: writes, discards and flushes, as the block device issues
//! them, and what keeps a write over a chunk that is not local safe.
//!
//! A write covering only part of a chunk that is not cached waits for its
//! fetch. A write covering a whole chunk that is not cached does not (it
//! would fetch what it is about to replace); until its data is in the
//! image, the chunk holds neither its old content nor the new one (holes,
//! or stale bytes), so:
//!
//! ```text
//!  begin_write ── chunk absent, covered whole ──► WRITING (+ a slot: readers
//!      │                                           and partial writers wait)
//!      ▼ data into the image
//!  end_write ───► dirty in memory, slot completed; on disk still WRITING
//!      ▼
//!  flush: unsettled chunks taken ─► image synced ─► their dirty entries
//!         written ─► map synced          (Cache::settle)
//! ```
//!
//! A dirty entry never reaches the disk before the data it stands for: a
//! host crash cannot leave a chunk marked dirty over holes. A crash finds
//! WRITING chunks and resolves them (`Cache::resolve_writing`): on the same
//! boot, one whose data all landed is dirty; any other goes back to its
//! base version (that write was never acknowledged, or no flush covered it).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::Error;
use crate::engine::{Engine, Shared, Slot};
use crate::local::cache::{self, ABSENT, DIRTY, WRITING};

impl Engine {
    /// Marks every chunk under `len` bytes at `offset` before a write's data
    /// goes to the image (a fetch completing meanwhile then leaves the chunk
    /// alone): dirty, or, for a chunk not local that the write covers
    /// whole, being written (see the module docs). Call
    /// [`end_write`](Self::end_write) once the data is in the image, or the
    /// write failed.
    /// On an error, what it marked is ended again (nothing waits for a
    /// write that will not come).
    pub fn begin_write(&self, offset: u64, len: usize) -> Result<(), Error> {
        let s = &self.shared;
        let mut begun = Vec::new();
        for span in s.spans(offset, len)? {
            let _g = s.stripe(span.chunk);
            begun.push(span.chunk);
            if let Err(e) = s.begin_chunk_write(span.chunk, span.covers(&s.geometry)) {
                drop(_g);
                for c in begun {
                    let _g = s.stripe(c);
                    let _ = s.end_chunk_write(c);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Ends a write of every chunk under `len` bytes at `offset`, once its
    /// data is in the image (or the write failed): a sync or publish may
    /// vouch for the chunk's content again, the readers of a chunk being
    /// written whole go on, and a chunk that is no longer dirty (a discard
    /// changed it meanwhile) is marked again.
    pub fn end_write(&self, offset: u64, len: usize) -> Result<(), Error> {
        let s = &self.shared;
        for span in s.spans(offset, len)? {
            let _g = s.stripe(span.chunk);
            s.end_chunk_write(span.chunk)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. A write covering only part of a chunk that
    /// is not cached fetches it first; one covering whole chunks does not.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let s = &self.shared;
        s.note_io();
        for span in s.spans(offset, data.len())? {
            s.touch(span.chunk);
            if !span.covers(&s.geometry) {
                s.ensure_cached(span.chunk)?;
            }
            let src = &data[span.buf_offset..span.buf_offset + span.len as usize];
            let at = s.geometry.chunk_offset(span.chunk) + span.offset_in_chunk as u64;
            let _g = s.stripe(span.chunk);
            // The mark goes to the map before the data goes to the image:
            // after a crash of this process the page cache holds both, in
            // that order, so no chunk with new data is found unmarked.
            let written = s
                .begin_chunk_write(span.chunk, span.covers(&s.geometry))
                .and_then(|()| {
                    s.cache.point("write: marked dirty");
                    s.cache.write_image(src, at)
                });
            // Ended whatever happened: nothing waits for a write that failed.
            let ended = s.end_chunk_write(span.chunk);
            written?;
            ended?;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset` (discard and write-zeroes): whole
    /// chunks are deallocated and become zero and dirty; partial ones are
    /// written with zeros.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        let s = &self.shared;
        s.note_io();
        let len = usize::try_from(len).map_err(|_| Error::Invalid("discard too long".into()))?;
        for span in s.spans(offset, len)? {
            let at = s.geometry.chunk_offset(span.chunk) + span.offset_in_chunk as u64;
            if span.covers(&s.geometry) {
                s.touch(span.chunk);
                let _g = s.stripe(span.chunk);
                if cache::state_of(s.cache.entry(span.chunk)) == ABSENT {
                    // An absent chunk's bytes may be anything (a write a
                    // crash undid): the hole is durable before the chunk is
                    // marked, or a host crash could keep the mark and lose
                    // the hole. (Under the stripe lock: no fill meanwhile.)
                    s.cache.punch_hole(at, span.len as u64)?;
                    s.cache.sync_image_shared()?;
                    s.cache.set(span.chunk, DIRTY)?;
                } else {
                    // Marked before the hole is made, as writes are. A
                    // whole write still in flight lands over zeros from here
                    // on: each page is the one or the other, so its readers
                    // go on.
                    s.cache.set(span.chunk, DIRTY)?;
                    s.cache.punch_hole(at, span.len as u64)?;
                }
                s.release_writing(span.chunk);
            } else {
                self.write(at, &vec![0u8; span.len as usize])?;
            }
        }
        Ok(())
    }

    /// Makes every write so far durable, data and dirty marks both. Once a
    /// sync of the image failed, every later flush fails
    /// ([`Error::SyncFailed`]).
    pub fn flush(&self) -> Result<(), Error> {
        let unsettled = self.settling();
        self.shared.cache.sync_image()?;
        self.settle(&unsettled)?;
        self.shared.cache.sync_state()
    }

    /// For a device that flushes through its own ring: the chunks whose
    /// dirty entries wait for the image to be durable; take them before
    /// the image's sync, and [`settle`](Self::settle) them after it.
    pub fn settling(&self) -> Vec<u64> {
        self.shared.cache.unsettled()
    }

    /// Writes the dirty entries of `chunks` (taken by
    /// [`settling`](Self::settling) before a sync of the image that has
    /// now ended) to the map; the map's sync follows.
    pub fn settle(&self, chunks: &[u64]) -> Result<(), Error> {
        let s = &self.shared;
        for &c in chunks {
            let _g = s.stripe(c);
            s.cache.settle(c)?;
        }
        Ok(())
    }
}

impl Shared {
    /// Whether chunk `c` can be served from the cache now.
    pub(crate) fn is_cached(&self, c: u64) -> bool {
        !matches!(cache::state_of(self.cache.entry(c)), ABSENT | WRITING)
    }

    /// Whether a write of chunk `c` is between its begin and its end (its
    /// data may be landing). Callers hold the stripe lock.
    pub(crate) fn write_in_flight(&self, c: u64) -> bool {
        self.writes_in_flight[c as usize].load(Ordering::Relaxed) > 0
    }

    /// The slot the readers of chunk `c` wait on while it is written whole.
    pub(crate) fn writing_slot(&self, c: u64) -> Option<Arc<Slot>> {
        let map = self.writing.lock().expect("writing lock");
        map.get(&c).map(|(_, slot)| slot.clone())
    }

    /// Marks chunk `c` before a write's data goes in; `whole`: the write
    /// covers all of it. Caller holds the stripe lock.
    fn begin_chunk_write(&self, c: u64, whole: bool) -> Result<(), Error> {
        self.writes_in_flight[c as usize].fetch_add(1, Ordering::Relaxed);
        let state = cache::state_of(self.cache.entry(c));
        if !whole || !matches!(state, ABSENT | WRITING) {
            self.cache.set(c, DIRTY)?;
            return Ok(());
        }
        // The slot exists before the state says so: a reader that sees
        // WRITING finds it (or, once it is gone, a dirty chunk).
        self.writing
            .lock()
            .expect("writing lock")
            .entry(c)
            .or_insert_with(|| (0, Arc::new(Slot::default())))
            .0 += 1;
        self.cache.set(c, WRITING)?;
        Ok(())
    }

    /// Ends a write of chunk `c` after its data went in (or failed): the
    /// last whole write of a chunk being written makes it dirty and lets
    /// its readers go on. A chunk still dirty keeps the entry its
    /// [`begin_chunk_write`](Self::begin_chunk_write) wrote: that new
    /// generation already stands for this write's data, since nothing that
    /// reads a chunk to upload it vouches for what it read while a write of
    /// it is in flight (`write_in_flight`), so a second entry would only
    /// cost a map write per request. One that is no longer dirty (changed
    /// meanwhile) is marked again. Caller holds the stripe lock.
    fn end_chunk_write(&self, c: u64) -> Result<(), Error> {
        self.writes_in_flight[c as usize].fetch_sub(1, Ordering::Relaxed);
        let whole = {
            let mut map = self.writing.lock().expect("writing lock");
            match map.get_mut(&c) {
                Some((n, _)) if *n > 1 => {
                    *n -= 1;
                    return Ok(());
                }
                Some(_) => true,
                None => false,
            }
        };
        if !whole && cache::state_of(self.cache.entry(c)) == DIRTY {
            return Ok(());
        }
        // Dirty before the readers wake: asking again, they find it cached.
        let r = self.cache.set(c, DIRTY).map(|_| ());
        self.release_writing(c);
        r
    }

    /// Completes and forgets the slot of chunk `c` being written, if any.
    fn release_writing(&self, c: u64) {
        let slot = self.writing.lock().expect("writing lock").remove(&c);
        if let Some((_, slot)) = slot {
            slot.complete(Ok(()));
        }
    }
}
