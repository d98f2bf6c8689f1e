//! Content-defined chunking of a memory image (a saved VM's migration
//! stream), and the layout of an image whose chunks differ in length.
//!
//! Fixed-size chunks of a migration stream never match between two saves:
//! a page that turned zero, or one more dirty page early in the stream,
//! shifts every byte after it. Cut where the content says instead, and a
//! second save of a little-changed VM repeats most chunks of the first.
//!
//! The chunker is FastCDC's (Xia et al., USENIX ATC 2016): a gear rolling
//! hash (`h = (h << 1) + gear[byte]`, so `h`'s top bits depend on the last
//! 64 bytes), no cut before the minimum, a harder cut condition before the
//! average length and an easier one after it (normalized chunking: lengths
//! cluster at the average), a forced cut at the maximum. The lengths are
//! desync's defaults (16/64/256 KiB) scaled to the parcel's chunk size:
//! minimum ¹⁄₁₆, average ¼, maximum 1 chunk size, so every chunk fits the
//! buffers and decode limits a fixed chunk does.
//!
//! The gear table derives from the user's secret (its own key, see [`Secret`]):
//! where a stream is cut says nothing about its content to anyone without
//! the key (chunk lengths are visible in the store as object sizes).

use std::sync::Arc;

use crate::{Error, Geometry, MAX_CHUNKS, Secret};

/// Cuts a byte stream into chunks where its content says.
#[derive(Clone)]
pub struct Chunker {
    gear: Box<[u64; 256]>,
    min: usize,
    avg: usize,
    max: usize,
    /// Cut condition below `avg` (two more bits than the average: harder).
    mask_small: u64,
    /// Cut condition from `avg` on (two bits fewer: easier).
    mask_large: u64,
}

impl Chunker {
    /// A chunker for a parcel of `chunk_size`-byte chunks under `secret`.
    pub fn new(secret: &Secret, chunk_size: u32) -> Self {
        let max = chunk_size as usize;
        let avg = max / 4;
        let bits = avg.trailing_zeros();
        let top = |n: u32| !0u64 << (64 - n);
        Chunker {
            gear: Box::new(secret.cdc_gear()),
            min: max / 16,
            avg,
            max,
            mask_small: top(bits + 2),
            mask_large: top(bits - 2),
        }
    }

    /// Longest chunk the chunker cuts.
    pub fn max_len(&self) -> usize {
        self.max
    }

    /// Length of the chunk that starts at `data[0]`. `data` must hold at
    /// least [`max_len`](Self::max_len) bytes unless it is the end of the
    /// stream; the chunk is then at most `data.len()`.
    pub fn cut(&self, data: &[u8]) -> usize {
        let end = data.len().min(self.max);
        if end <= self.min {
            return end;
        }
        let normal = end.min(self.avg);
        let mut h = 0u64;
        for (i, &b) in data.iter().enumerate().take(normal).skip(self.min) {
            h = (h << 1).wrapping_add(self.gear[b as usize]);
            if h & self.mask_small == 0 {
                return i + 1;
            }
        }
        for (i, &b) in data.iter().enumerate().take(end).skip(normal) {
            h = (h << 1).wrapping_add(self.gear[b as usize]);
            if h & self.mask_large == 0 {
                return i + 1;
            }
        }
        end
    }

    /// The lengths of the chunks `data` (a whole stream) is cut into.
    pub fn lengths(&self, mut data: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let n = self.cut(data);
            out.push(n as u32);
            data = &data[n..];
        }
        out
    }
}

impl std::fmt::Debug for Chunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The gear table derives from the secret: never printed.
        f.debug_struct("Chunker")
            .field("min", &self.min)
            .field("avg", &self.avg)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// Where each chunk of an image lies: fixed-size chunks (a disk, a RAM
/// image, an older memory image) or chunks cut by content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Every chunk `chunk_size` bytes but possibly the last.
    Fixed(Geometry),
    /// Chunk `i` ends at byte `ends[i]` (strictly increasing, each chunk
    /// 1..=chunk size bytes long).
    Cut {
        /// Cumulative end offsets.
        ends: Arc<[u64]>,
        /// The parcel's chunk size (the longest chunk).
        chunk_size: u32,
    },
}

impl Layout {
    /// The layout of chunks of `lengths` bytes, in order, in a parcel of
    /// `chunk_size`-byte chunks; refuses a length of 0 or over the chunk
    /// size, and more than [`MAX_CHUNKS`] chunks.
    pub fn cut(lengths: &[u32], chunk_size: u32) -> Result<Self, Error> {
        if lengths.len() as u64 > MAX_CHUNKS {
            return Err(Error::Geometry(format!(
                "{} content-defined chunks, more than the limit of {MAX_CHUNKS}",
                lengths.len()
            )));
        }
        if let Some(bad) = lengths.iter().find(|&&l| l == 0 || l > chunk_size) {
            return Err(Error::Geometry(format!(
                "a content-defined chunk of {bad} bytes (1 to {chunk_size} allowed)"
            )));
        }
        let mut end = 0u64;
        let ends = lengths
            .iter()
            .map(|&l| {
                end += l as u64;
                end
            })
            .collect();
        Ok(Layout::Cut { ends, chunk_size })
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Layout::Fixed(g) => g.disk_size(),
            Layout::Cut { ends, .. } => ends.last().copied().unwrap_or(0),
        }
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        match self {
            Layout::Fixed(g) => g.chunk_count(),
            Layout::Cut { ends, .. } => ends.len() as u64,
        }
    }

    /// Longest chunk: the parcel's chunk size.
    pub fn max_chunk_len(&self) -> u32 {
        match self {
            Layout::Fixed(g) => g.chunk_size(),
            Layout::Cut { chunk_size, .. } => *chunk_size,
        }
    }

    /// Byte offset of chunk `chunk`.
    pub fn chunk_offset(&self, chunk: u64) -> u64 {
        match self {
            Layout::Fixed(g) => g.chunk_offset(chunk),
            Layout::Cut { ends, .. } => match chunk {
                0 => 0,
                c => ends[c as usize - 1],
            },
        }
    }

    /// Length of chunk `chunk` (0 past the end).
    pub fn chunk_len(&self, chunk: u64) -> u32 {
        match self {
            Layout::Fixed(g) => g.chunk_len(chunk),
            Layout::Cut { ends, .. } if chunk as usize >= ends.len() => 0,
            Layout::Cut { ends, .. } => (ends[chunk as usize] - self.chunk_offset(chunk)) as u32,
        }
    }

    /// The chunk that holds byte `offset` (< [`size`](Self::size)).
    pub fn chunk_of(&self, offset: u64) -> u64 {
        match self {
            Layout::Fixed(g) => g.chunk_of(offset),
            Layout::Cut { ends, .. } => ends.partition_point(|&e| e <= offset) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        crate::noise(len, seed)
    }

    fn chunks<'a>(c: &Chunker, data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut at = 0;
        c.lengths(data)
            .into_iter()
            .map(|l| {
                at += l as usize;
                &data[at - l as usize..at]
            })
            .collect()
    }

    #[test]
    fn lengths_cover_the_stream_within_bounds_and_cluster_at_the_average() {
        let c = Chunker::new(&Secret::new(&[3; 32]), 256 * 1024);
        let data = noise(1, 32 << 20);
        let lengths = c.lengths(&data);
        assert_eq!(
            lengths.iter().map(|&l| l as u64).sum::<u64>(),
            data.len() as u64
        );
        let (last, rest) = lengths.split_last().unwrap();
        assert!(*last >= 1);
        assert!(rest.iter().all(|&l| (16 * 1024..=256 * 1024).contains(&l)));
        let mean = data.len() / lengths.len();
        assert!((48 * 1024..=96 * 1024).contains(&mean), "mean chunk {mean}");
        let forced = rest.iter().filter(|&&l| l == 256 * 1024).count();
        assert!(
            forced * 100 <= lengths.len(),
            "{forced} of {} cut at the maximum",
            lengths.len()
        );
    }

    #[test]
    fn an_insertion_shifts_only_the_chunks_around_it() {
        let c = Chunker::new(&Secret::new(&[3; 32]), 256 * 1024);
        let old = noise(2, 16 << 20);
        let mut new = old.clone();
        // 100 bytes inserted, 5000 changed, a page zeroed: a save later
        new.splice(3_000_000..3_000_000, noise(9, 100));
        new[9_000_000..9_005_000].copy_from_slice(&noise(8, 5000));
        new[12_000_000..12_004_096].fill(0);
        let before: std::collections::HashSet<&[u8]> = chunks(&c, &old).into_iter().collect();
        let after = chunks(&c, &new);
        let same = after.iter().filter(|ch| before.contains(*ch)).count();
        // each edit costs the chunk it falls in and up to three after it
        assert!(
            same + 12 >= after.len(),
            "{same} of {} chunks repeat",
            after.len()
        );
        // fixed chunks of the same stream repeat only before the insertion
        let fixed_same = new
            .chunks(256 * 1024)
            .filter(|ch| old.chunks(256 * 1024).any(|o| o == *ch))
            .count();
        assert!(
            fixed_same * 4 < new.len() / (256 * 1024),
            "fixed: {fixed_same}"
        );
    }

    #[test]
    fn the_cut_points_depend_on_the_secret() {
        let data = noise(3, 4 << 20);
        let a = Chunker::new(&Secret::new(&[1; 32]), 256 * 1024).lengths(&data);
        let b = Chunker::new(&Secret::new(&[2; 32]), 256 * 1024).lengths(&data);
        assert_ne!(a, b);
    }

    #[test]
    fn a_cut_layout_maps_offsets_to_chunks() {
        let l = Layout::cut(&[10, 5, 7], 64 * 1024).unwrap();
        assert_eq!((l.size(), l.chunk_count()), (22, 3));
        assert_eq!((l.chunk_offset(1), l.chunk_len(1)), (10, 5));
        assert_eq!(
            (l.chunk_offset(2), l.chunk_len(2), l.chunk_len(3)),
            (15, 7, 0)
        );
        assert_eq!(
            [0, 9, 10, 14, 15, 21].map(|o| l.chunk_of(o)),
            [0, 0, 1, 1, 2, 2]
        );
        assert!(Layout::cut(&[10, 0], 64 * 1024).is_err());
        assert!(Layout::cut(&[64 * 1024 + 1], 64 * 1024).is_err());
        let f = Layout::Fixed(Geometry::new(100_000, 64 * 1024).unwrap());
        assert_eq!(
            (f.chunk_count(), f.chunk_len(1), f.chunk_of(70_000)),
            (2, 100_000 - 65536, 1)
        );
    }
}
