//! The local layer: what isr keeps on this host's disk. The cache of a
//! parcel (its image file, chunk map and states), private files (keys,
//! nonces), a group sync shared by concurrent callers, sparse files and
//! the files and devices an image is read from or written to, and the
//! eventfd a device's queue threads wait on.

pub mod cache;
pub mod disk_file;
pub mod group_sync;
pub mod notify;
pub mod private;
pub mod sparse;
