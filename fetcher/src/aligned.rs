//! Buffers whose start is aligned to a page: what `O_DIRECT` reads and
//! writes of the cache image need (the file system's direct-I/O alignment
//! is at most a page on every file system isr runs on).

use std::ops::{Deref, DerefMut};

/// The alignment of an [`AlignedBuf`]'s start.
pub const ALIGN: usize = 4096;

/// A zero-filled byte buffer whose first byte is [`ALIGN`]-aligned.
#[derive(Clone)]
pub struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes, aligned.
    pub fn zeroed(len: usize) -> AlignedBuf {
        // Zeroed memory comes from the allocator's zeroed pages: no pass
        // over it here.
        let mem = vec![0u8; len + ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN);
        debug_assert!(start < ALIGN);
        AlignedBuf { mem, start, len }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_aligned_and_hold_their_length() {
        for len in [0, 1, 511, 4096, 65536 + 7] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(7);
            assert!(b.iter().all(|&x| x == 7));
        }
    }
}
