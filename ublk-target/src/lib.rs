//! The ublk block device that serves isr's chunk engine to the kernel.
//!
//! Not built yet: the device arrives with the ublk issue, after the chunk
//! engine. The crate exists now so the workspace has its final shape.
