//! This host: which boot it is in (a cache opened in another boot, or a
//! lease taken in one, outlived a restart).

/// This boot of the host: the kernel's random boot id (or `$ISR_BOOT_ID`,
/// which lets a test play a host crash), hashed to 16 bytes.
pub fn current_boot_id() -> [u8; 16] {
    let text = std::env::var("ISR_BOOT_ID")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok())
        .unwrap_or_default();
    let h = blake3::hash(text.trim().as_bytes());
    h.as_bytes()[..16].try_into().expect("16 bytes")
}
