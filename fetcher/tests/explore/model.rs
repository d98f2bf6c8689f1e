//! The oracle: a plain model of the disk in 4 KiB blocks, built from the
//! events the workload placed in the run's log (in the same order as the
//! cache's file operations), that says which contents a block may hold at
//! any point of the log: after a crash there, or for a read that ran then.
//!
//! A block's contents are named by a tag: a block holding tag `t` at block
//! `b` is `t`, `b`, then bytes derived from both (tag 0 is all zeros), so a
//! read tells which write it came from, and data that was never written
//! there cannot pass for one that was.
//!
//! The rule (the guarantees of a disk with a volatile write cache): a write
//! `w` of a block is possible at log point `p` if it began before `p`,
//! unless some write `w'` of the block began after `w` ended and ended
//! before a FLUSH that completed before `p` began (then `w'` or something
//! later is what the block must hold). For a read, writes that ended before
//! the read began play the FLUSH's part.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fetcher::local::cache::{FileLog, FileOp};

/// Bytes in a block of the model.
pub const BLOCK: usize = 4096;

/// A model event, placed in the log.
#[derive(Debug, Clone)]
pub enum Event {
    /// A write of tag `tag` to blocks `first..first + n` began.
    WriteStart {
        id: u64,
        first: u64,
        n: u64,
        tag: u64,
    },
    WriteEnd {
        id: u64,
    },
    FlushStart {
        id: u64,
    },
    FlushEnd {
        id: u64,
    },
    /// A read of blocks `first..first + n` began / ended with these tags
    /// (`torn`: the blocks that were no one write's, with their bytes).
    ReadStart {
        id: u64,
    },
    ReadEnd {
        id: u64,
        first: u64,
        tags: Vec<u64>,
        torn: Vec<(u64, Vec<u8>)>,
    },
    /// The store committed an object.
    StorePut(String, Bytes),
    /// A publish returned (the store holds this content as its HEAD).
    Published,
    /// The cache's copy of a chunk was damaged (as a failing disk might),
    /// and later repaired by `isr check`: in between, the cache serves
    /// bytes the store does not hold.
    Damaged(u64),
    Repaired(u64),
}

/// The payloads of the events in a log (the log holds their indices).
#[derive(Default)]
pub struct Events(Mutex<Vec<Event>>);

impl Events {
    /// Records `e` in `log`, at this point of its order.
    pub fn push(&self, log: &FileLog, e: Event) {
        let mut v = self.0.lock().unwrap();
        let i = v.len() as u64;
        v.push(e);
        // Under the events lock: the log's order is the events' order.
        log.event(i.to_le_bytes().to_vec());
    }

    /// The event an `Event` entry of the log names.
    pub fn get(&self, op: &FileOp) -> Option<Event> {
        match op {
            FileOp::Event(b) => {
                let i = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                Some(self.0.lock().unwrap()[i].clone())
            }
            _ => None,
        }
    }
}

/// The contents of block `block` holding tag `tag`.
pub fn block_data(tag: u64, block: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0; BLOCK];
    }
    let mut out = Vec::with_capacity(BLOCK);
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    let mut x = super::splitmix(tag ^ block.rotate_left(32));
    while out.len() < BLOCK {
        x = super::splitmix(x);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The tag of block `block` holding `data`, or `Err` describing what it
/// holds if no write could have put it there.
pub fn tag_of(data: &[u8], block: u64) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let tag = u64::from_le_bytes(data[..8].try_into().unwrap());
    let at = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if tag != 0 && at == block && block_data(tag, block) == data {
        Ok(tag)
    } else {
        let zeros = data.iter().filter(|&&b| b == 0).count();
        Err(format!(
            "bytes no write put there (claims tag {tag:#x} of block {at}; {zeros} zero bytes)"
        ))
    }
}

#[derive(Debug, Clone, Copy)]
struct W {
    tag: u64,
    start: usize,
    end: Option<usize>,
}

/// The model at one point of the log: the writes of each block so far.
pub struct Model {
    /// Per block, the writes (initial contents are writes at point 0).
    writes: Vec<Vec<W>>,
    /// The start point of the latest FLUSH that completed.
    flushed_from: usize,
    flush_starts: HashMap<u64, usize>,
    write_ids: HashMap<u64, (u64, u64, usize)>,
    reads: HashMap<u64, usize>,
    /// Reads that returned something the model forbids.
    pub read_violations: Vec<String>,
    /// Store objects committed so far.
    pub puts: Vec<(String, Bytes)>,
    /// Chunks damaged in the cache and not repaired yet.
    pub damaged: BTreeSet<u64>,
}

impl Model {
    /// A model whose block `b` may hold any of `initial[b]`.
    pub fn new(initial: &[BTreeSet<u64>]) -> Model {
        Model {
            writes: initial
                .iter()
                .map(|tags| {
                    tags.iter()
                        .map(|&tag| W {
                            tag,
                            start: 0,
                            end: Some(0),
                        })
                        .collect()
                })
                .collect(),
            flushed_from: 0,
            flush_starts: HashMap::new(),
            write_ids: HashMap::new(),
            reads: HashMap::new(),
            read_violations: Vec::new(),
            puts: Vec::new(),
            damaged: BTreeSet::new(),
        }
    }

    /// Replays the events among the first `n` log entries (points 1..=n).
    pub fn replay(initial: &[BTreeSet<u64>], log: &[FileOp], events: &Events) -> Model {
        let mut m = Model::new(initial);
        for (i, op) in log.iter().enumerate() {
            if let Some(e) = events.get(op) {
                m.apply(i + 1, e);
            }
        }
        m
    }

    fn apply(&mut self, at: usize, e: Event) {
        match e {
            Event::WriteStart { id, first, n, tag } => {
                for b in first..first + n {
                    self.writes[b as usize].push(W {
                        tag,
                        start: at,
                        end: None,
                    });
                }
                self.write_ids.insert(id, (first, n, at));
            }
            Event::WriteEnd { id } => {
                let (first, n, start) = self.write_ids[&id];
                for b in first..first + n {
                    for w in self.writes[b as usize].iter_mut() {
                        if w.start == start && w.end.is_none() {
                            w.end = Some(at);
                        }
                    }
                }
            }
            Event::FlushStart { id } => {
                self.flush_starts.insert(id, at);
            }
            Event::FlushEnd { id } => {
                let s = self.flush_starts[&id];
                self.flushed_from = self.flushed_from.max(s);
            }
            Event::ReadStart { id } => {
                self.reads.insert(id, at);
            }
            Event::ReadEnd {
                id,
                first,
                tags,
                torn,
            } => {
                let rs = self.reads[&id];
                for (i, &tag) in tags.iter().enumerate() {
                    let b = first + i as u64;
                    let possible = self.possible(b, rs, at);
                    // A read that ran while writes of the block were in
                    // flight may see them half done (page cache copies are
                    // not atomic; nor is a disk's overlapping I/O): each
                    // byte then comes from one of the possible writes.
                    let mixed = || {
                        let concurrent = self.writes[b as usize]
                            .iter()
                            .any(|w| w.start < at && w.end.is_none_or(|e| e > rs));
                        let data = torn.iter().find(|(t, _)| *t == b).map(|(_, d)| d);
                        let values: Vec<Vec<u8>> =
                            possible.iter().map(|&t| block_data(t, b)).collect();
                        concurrent
                            && data.is_some_and(|d| {
                                (0..BLOCK).all(|k| values.iter().any(|v| v[k] == d[k]))
                            })
                    };
                    let ok = possible.contains(&tag) || mixed();
                    if !ok {
                        self.read_violations.push(format!(
                            "a read of block {b} (log {rs}..{at}) returned tag {tag:#x}; possible: {:x?}",
                            self.possible(b, rs, at)
                        ));
                    }
                }
            }
            Event::StorePut(p, b) => self.puts.push((p, b)),
            Event::Published => {}
            Event::Damaged(c) => {
                self.damaged.insert(c);
            }
            Event::Repaired(c) => {
                self.damaged.remove(&c);
            }
        }
    }

    /// Tags block `b` may hold for a reader between points `from` and
    /// `to`, where everything that ended before `from` counts as flushed.
    fn possible(&self, b: u64, from: usize, to: usize) -> BTreeSet<u64> {
        let ws = &self.writes[b as usize];
        let floor = ws
            .iter()
            .filter(|w| w.end.is_some_and(|e| e < from))
            .map(|w| w.start)
            .max()
            .unwrap_or(0);
        ws.iter()
            .filter(|w| w.start < to.max(1) && w.end.is_none_or(|e| e >= floor))
            .map(|w| w.tag)
            .collect()
    }

    /// Tags block `b` may hold after a crash at the end of the replay.
    pub fn after_crash(&self, b: u64) -> BTreeSet<u64> {
        let ws = &self.writes[b as usize];
        let floor = ws
            .iter()
            .filter(|w| w.end.is_some_and(|e| e < self.flushed_from))
            .map(|w| w.start)
            .max()
            .unwrap_or(0);
        ws.iter()
            .filter(|w| w.end.is_none_or(|e| e >= floor))
            .map(|w| w.tag)
            .collect()
    }

    /// The writes of block `b` and the last completed FLUSH, for messages.
    pub fn describe(&self, b: u64) -> String {
        format!(
            "writes (tag, start, end): {:x?}; last completed flush began at {}",
            self.writes[b as usize]
                .iter()
                .map(|w| (w.tag, w.start, w.end))
                .collect::<Vec<_>>(),
            self.flushed_from
        )
    }

    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.writes.len() as u64
    }
}

/// A shared handle the workload threads use to place events.
#[derive(Clone)]
pub struct Recorder {
    pub log: Arc<FileLog>,
    pub events: Arc<Events>,
}

impl Recorder {
    pub fn push(&self, e: Event) {
        self.events.push(&self.log, e);
    }
}
