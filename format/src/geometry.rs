//! Offset ↔ chunk arithmetic: which chunks, and which bytes of each, an I/O
//! of `(offset, len)` touches.

use crate::{Error, MAX_CHUNK_SIZE, MAX_CHUNKS, MIN_CHUNK_SIZE};

/// A disk's size and chunk size, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    disk_size: u64,
    chunk_size: u32,
}

/// The part of one chunk that an I/O touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Chunk index.
    pub chunk: u64,
    /// First byte touched, relative to the chunk's start.
    pub offset_in_chunk: u32,
    /// Bytes touched in this chunk.
    pub len: u32,
    /// Where these bytes sit in the I/O's buffer.
    pub buf_offset: usize,
}

impl Span {
    /// Whether the span covers its whole chunk (so a write need not read it).
    pub fn covers(&self, geometry: &Geometry) -> bool {
        self.offset_in_chunk == 0 && self.len == geometry.chunk_len(self.chunk)
    }
}

impl Geometry {
    /// Checks that `chunk_size` is a power of two in
    /// [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`] and the disk has at most
    /// [`MAX_CHUNKS`] chunks.
    pub fn new(disk_size: u64, chunk_size: u32) -> Result<Self, Error> {
        if !chunk_size.is_power_of_two() {
            return Err(Error::Geometry(format!(
                "chunk size {chunk_size} is not a power of two"
            )));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(Error::Geometry(format!(
                "chunk size {chunk_size} is outside {} KiB to {} MiB",
                MIN_CHUNK_SIZE >> 10,
                MAX_CHUNK_SIZE >> 20
            )));
        }
        let g = Geometry {
            disk_size,
            chunk_size,
        };
        if g.chunk_count() > MAX_CHUNKS {
            return Err(Error::Geometry(format!(
                "a {disk_size}-byte disk has {} chunks of {chunk_size} bytes, more than the limit of {MAX_CHUNKS}; choose larger chunks",
                g.chunk_count()
            )));
        }
        Ok(g)
    }

    /// Size of the disk in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Size of every chunk but possibly the last.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks (the last one may be short).
    pub fn chunk_count(&self) -> u64 {
        self.disk_size.div_ceil(self.chunk_size as u64)
    }

    /// Byte offset of chunk `chunk` on the disk.
    pub fn chunk_offset(&self, chunk: u64) -> u64 {
        chunk * self.chunk_size as u64
    }

    /// Length of chunk `chunk` (short for the last chunk of an unaligned
    /// disk; 0 past the end).
    pub fn chunk_len(&self, chunk: u64) -> u32 {
        let start = self.chunk_offset(chunk).min(self.disk_size);
        (self.disk_size - start).min(self.chunk_size as u64) as u32
    }

    /// The chunk that holds byte `offset`.
    pub fn chunk_of(&self, offset: u64) -> u64 {
        offset / self.chunk_size as u64
    }

    /// The spans an I/O of `len` bytes at `offset` touches, in order; an
    /// error if it reaches past the end of the disk.
    pub fn spans(&self, offset: u64, len: usize) -> Result<Spans, Error> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(end) if end <= self.disk_size => Ok(Spans {
                geometry: *self,
                pos: offset,
                end,
                buf_offset: 0,
            }),
            _ => Err(Error::Geometry(format!(
                "I/O of {len} bytes at offset {offset} reaches past the end of a {}-byte disk",
                self.disk_size
            ))),
        }
    }
}

/// Iterator returned by [`Geometry::spans`].
#[derive(Debug, Clone)]
pub struct Spans {
    geometry: Geometry,
    pos: u64,
    end: u64,
    buf_offset: usize,
}

impl Iterator for Spans {
    type Item = Span;

    fn next(&mut self) -> Option<Span> {
        if self.pos >= self.end {
            return None;
        }
        let chunk = self.geometry.chunk_of(self.pos);
        let offset_in_chunk = (self.pos - self.geometry.chunk_offset(chunk)) as u32;
        let chunk_end = self.geometry.chunk_offset(chunk) + self.geometry.chunk_len(chunk) as u64;
        let len = (chunk_end.min(self.end) - self.pos) as u32;
        let span = Span {
            chunk,
            offset_in_chunk,
            len,
            buf_offset: self.buf_offset,
        };
        self.pos += len as u64;
        self.buf_offset += len as usize;
        Some(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K64: u32 = 64 * 1024;

    #[test]
    fn rejects_bad_chunk_sizes_and_huge_disks() {
        assert!(Geometry::new(1 << 30, 1000).is_err());
        assert!(Geometry::new(1 << 30, 32 * 1024).is_err());
        assert!(Geometry::new(1 << 30, 8 << 20).is_err());
        assert!(Geometry::new(MAX_CHUNKS * K64 as u64 + 1, K64).is_err());
        assert!(Geometry::new(MAX_CHUNKS * K64 as u64, K64).is_ok());
    }

    #[test]
    fn last_chunk_is_short() {
        let g = Geometry::new(3 * K64 as u64 + 100, K64).unwrap();
        assert_eq!(g.chunk_count(), 4);
        assert_eq!(g.chunk_len(2), K64);
        assert_eq!(g.chunk_len(3), 100);
        assert_eq!(g.chunk_len(4), 0);
        let spans: Vec<_> = g.spans(3 * K64 as u64 - 10, 110).unwrap().collect();
        assert_eq!(spans.len(), 2);
        assert_eq!(
            (spans[0].chunk, spans[0].offset_in_chunk, spans[0].len),
            (2, K64 - 10, 10)
        );
        assert_eq!(
            (spans[1].chunk, spans[1].offset_in_chunk, spans[1].len),
            (3, 0, 100)
        );
        assert!(spans[1].covers(&g));
        assert!(!spans[0].covers(&g));
        assert!(g.spans(3 * K64 as u64, 101).is_err());
        assert!(g.spans(u64::MAX, 2).is_err());
    }

    proptest! {
        #[test]
        fn spans_tile_the_io_exactly(
            disk in 1u64..(64u64 << 20),
            shift in 0u32..3,
            offset_frac in 0.0f64..1.0,
            len in 0usize..(3 << 20),
        ) {
            let chunk = K64 << shift;
            let g = Geometry::new(disk, chunk).unwrap();
            let offset = (disk as f64 * offset_frac) as u64;
            let len = len.min((disk - offset) as usize);
            let mut pos = offset;
            let mut buf = 0usize;
            for s in g.spans(offset, len).unwrap() {
                prop_assert!(s.len > 0);
                prop_assert_eq!(g.chunk_offset(s.chunk) + s.offset_in_chunk as u64, pos);
                prop_assert_eq!(s.buf_offset, buf);
                prop_assert!(s.offset_in_chunk + s.len <= g.chunk_len(s.chunk));
                pos += s.len as u64;
                buf += s.len as usize;
            }
            prop_assert_eq!(pos, offset + len as u64);
        }
    }
}
