//! A guest thread of the explorer: I/O as a ublk queue issues it (and as
//! the engine's own `write` does), each placing its model events.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fetcher::Engine;
use fetcher::local::cache::FileOp;

use super::model::{BLOCK, Event, Recorder, block_data, tag_of};
use super::splitmix;
use crate::{BLOCKS, CHUNKS, PER_CHUNK};

/// A seeded generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = splitmix(self.0);
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// One guest thread: I/O as a ublk queue issues it, with model events.
pub struct Guest<'a> {
    pub engine: &'a Engine,
    pub rec: &'a Recorder,
    pub ids: &'a AtomicU64,
    pub rng: Rng,
    pub tag: u64,
    /// The session's hot chunk: half the I/O of every thread goes there,
    /// so that the threads (and the fetcher) meet on one chunk.
    pub hot: u64,
}

impl Guest<'_> {
    pub fn op(&mut self) -> Result<(), String> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        // A range of blocks: a whole chunk, or a few blocks, in the hot
        // chunk or anywhere.
        let chunk = if self.rng.chance(2) {
            self.hot
        } else {
            self.rng.below(CHUNKS)
        };
        let (first, n) = if self.rng.chance(2) {
            (chunk * PER_CHUNK, PER_CHUNK)
        } else {
            let first = chunk * PER_CHUNK + self.rng.below(PER_CHUNK);
            (first, (1 + self.rng.below(6)).min(BLOCKS - first))
        };
        let (offset, len) = (first * BLOCK as u64, (n * BLOCK as u64) as usize);
        match self.rng.below(10) {
            0..=3 => {
                self.tag += 1;
                let tag = self.tag;
                let data: Vec<u8> = (first..first + n)
                    .flat_map(|b| block_data(tag, b))
                    .collect();
                self.rec.push(Event::WriteStart { id, first, n, tag });
                if self.rng.chance(2) {
                    self.engine
                        .write(offset, &data)
                        .map_err(|e| format!("write: {e}"))?;
                } else {
                    self.queue_write(offset, &data)?;
                }
                self.rec.push(Event::WriteEnd { id });
            }
            4..=6 => {
                let mut buf = vec![0u8; len];
                self.rec.push(Event::ReadStart { id });
                self.engine
                    .read(offset, &mut buf)
                    .map_err(|e| format!("read: {e}"))?;
                let mut torn = Vec::new();
                let tags = (0..n)
                    .map(|i| {
                        let b = first + i;
                        let block = &buf[(i as usize) * BLOCK..(i as usize + 1) * BLOCK];
                        tag_of(block, b).unwrap_or_else(|_| {
                            torn.push((b, block.to_vec()));
                            u64::MAX
                        })
                    })
                    .collect();
                self.rec.push(Event::ReadEnd {
                    id,
                    first,
                    tags,
                    torn,
                });
            }
            7 => {
                self.rec.push(Event::WriteStart {
                    id,
                    first,
                    n,
                    tag: 0,
                });
                self.engine
                    .discard(offset, len as u64)
                    .map_err(|e| format!("discard: {e}"))?;
                self.rec.push(Event::WriteEnd { id });
            }
            _ => {
                self.rec.push(Event::FlushStart { id });
                self.engine.flush().map_err(|e| format!("flush: {e}"))?;
                self.rec.push(Event::FlushEnd { id });
            }
        }
        Ok(())
    }

    /// A write as the ublk queue does it: chunks it covers in part are
    /// fetched first; marked dirty, the data written straight to the
    /// image (logged: the queue's ring is not seen otherwise), marked again.
    fn queue_write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let e = self.engine;
        let need = e
            .prepare_io(offset, data.len(), true)
            .map_err(|e| format!("prepare: {e}"))?;
        for c in need {
            while let Some(slot) = e.request(c, None) {
                slot.wait(Duration::from_secs(60))
                    .map_err(|w| format!("waiting for chunk {c}: {w:?}"))?;
            }
        }
        e.begin_write(offset, data.len())
            .map_err(|e| format!("begin write: {e}"))?;
        self.rec
            .log
            .run(
                FileOp::Write {
                    file: "image".into(),
                    offset,
                    data: data.to_vec(),
                },
                || e.image_file().write_all_at(data, offset),
            )
            .map_err(|e| format!("image write: {e}"))?;
        e.end_write(offset, data.len())
            .map_err(|e| format!("end write: {e}"))
    }
}
