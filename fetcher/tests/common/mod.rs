//! Helpers shared by the fetcher's integration tests (beside the
//! workspace-wide `tests/support`). Each test binary uses a part of them.
#![allow(dead_code)]

use std::ops::Range;

use fetcher::Engine;
use object_store::aws::AmazonS3Builder;

use crate::support;

/// A client of the test S3 server, with the test bucket and keys.
pub fn s3_builder(server: &support::S3Server) -> AmazonS3Builder {
    AmazonS3Builder::new()
        .with_bucket_name(support::BUCKET)
        .with_endpoint(server.endpoint())
        .with_access_key_id(support::ACCESS_KEY)
        .with_secret_access_key(support::SECRET_KEY)
        .with_region("us-east-1")
        .with_allow_http(true)
}

/// Reads a whole disk through the engine.
pub fn read_all(engine: &Engine) -> Vec<u8> {
    let mut buf = vec![0u8; engine.geometry().disk_size() as usize];
    engine.read(0, &mut buf).unwrap();
    buf
}

/// A small deterministic generator (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn range_in(&mut self, r: &Range<u64>, max_len: u64) -> (u64, u64) {
        let off = r.start + self.below(r.end - r.start);
        let len = 1 + self.below(max_len.min(r.end - off));
        (off, len)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}
