//! The block device's data path: the fetch pipeline (demand fetch, single
//! flight, prefetch and readahead in an adaptive window), the write path
//! (dirty tracking, whole-chunk writes that skip their fetch, discard,
//! flush), and hoard (every chunk made local).

pub(in crate::engine) mod fetch;
pub(in crate::engine) mod hoard;
pub(in crate::engine) mod write;
