//! What the explorer reads back: a failing chunk's history from the log,
//! a version's whole image from the store, a cache's map.

use std::path::Path;

use fetcher::Parcel;
use fetcher::local::cache::FileOp;
use format::ChunkEntry;

use super::model::{Event, Events};
use crate::{CHUNK, CHUNKS, PER_CHUNK};

/// With `ISR_EXPLORE_HISTORY` set: what the log holds about chunk `c` —
/// its map entries, its image ranges, the syncs, and the model's events on
/// its blocks — one line each, for the failure message.
pub fn history(ops: &[FileOp], events: &Events, c: Option<u64>) -> String {
    let Some(c) = c.filter(|_| std::env::var_os("ISR_EXPLORE_HISTORY").is_some()) else {
        return String::new();
    };
    let (lo, hi) = (c * CHUNK, (c + 1) * CHUNK);
    let blocks = c * PER_CHUNK..(c + 1) * PER_CHUNK;
    let mut out = format!("\n  history of chunk {c}:");
    let mut ids = std::collections::HashSet::new();
    for (i, op) in ops.iter().enumerate() {
        let line = match op {
            FileOp::Write { file, offset, data } if file == "state" && *offset == 4096 + c * 8 => {
                let e = u64::from_le_bytes(data[..8].try_into().unwrap());
                Some(format!(
                    "map entry {e:#x} (state {}, generation {})",
                    e & 3,
                    e >> 2
                ))
            }
            FileOp::Write { file, offset, data }
                if file == "image" && *offset < hi && offset + data.len() as u64 > lo =>
            {
                Some(format!("image write {offset}+{}", data.len()))
            }
            FileOp::Punch { file, offset, len }
                if file == "image" && *offset < hi && offset + len > lo =>
            {
                Some(format!("image punch {offset}+{len}"))
            }
            FileOp::Sync { file } => Some(format!("sync {file}")),
            FileOp::Replace { file, .. } => Some(format!("replace {file}")),
            FileOp::Event(_) => match events.get(op) {
                Some(Event::WriteStart { id, first, n, tag })
                    if first < blocks.end && first + n > blocks.start =>
                {
                    ids.insert(id);
                    Some(format!(
                        "write {id} of {tag:#x} to blocks {first}+{n} begins"
                    ))
                }
                Some(Event::WriteEnd { id }) if ids.contains(&id) => {
                    Some(format!("write {id} ends"))
                }
                Some(
                    e @ (Event::FlushStart { .. } | Event::FlushEnd { .. } | Event::Published),
                ) => Some(format!("{e:?}")),
                Some(Event::StorePut(p, _)) if !p.starts_with("chunks/") => {
                    Some(format!("store put {p}"))
                }
                _ => None,
            },
            _ => None,
        };
        if let Some(l) = line {
            out.push_str(&format!("\n    {:>4} {l}", i + 1));
        }
    }
    out
}

/// The whole image of `version` (HEAD if `None`) as the store holds it.
pub fn read_version(
    rt: &tokio::runtime::Runtime,
    parcel: &Parcel,
    version: Option<u64>,
) -> Result<Vec<u8>, fetcher::Error> {
    rt.block_on(async {
        let version = match version {
            Some(v) => v,
            None => parcel.require_head().await?,
        };
        let m = parcel.manifest(version).await?;
        let mut out = Vec::new();
        for (c, e) in m.chunks.iter().enumerate() {
            match e {
                ChunkEntry::Zero => out.extend_from_slice(&vec![0u8; CHUNK as usize]),
                ChunkEntry::Data(k) => out.extend_from_slice(
                    &parcel
                        .fetch_chunk(*k, CHUNK as usize, c as u64, version)
                        .await?,
                ),
            }
        }
        Ok(out)
    })
}

/// The chunks whose map entry in the cache at `dir` is in `state`.
pub fn chunks_in(dir: &Path, state: u64) -> Vec<u64> {
    let map = std::fs::read(dir.join("state")).unwrap();
    (0..CHUNKS)
        .filter(|&c| {
            let at = 4096 + c as usize * 8;
            let e = u64::from_le_bytes(map[at..at + 8].try_into().unwrap());
            e & 3 == state
        })
        .collect()
}
