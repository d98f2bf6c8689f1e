//! What the engine reports: what opening the cache found, and its
//! counters.

/// What opening the cache found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The version the cache is based on now.
    pub base_version: u64,
    /// The cache was created by this open.
    pub created: bool,
    /// The previous session stopped uncleanly.
    pub recovered: bool,
    /// Chunks re-hashed because the stop was a host crash (0 after a crash
    /// of the process alone: then nothing is in doubt).
    pub scanned_chunks: u64,
    /// Chunks found changed by unflushed writes (now dirty).
    pub recovered_dirty: u64,
    /// Chunks invalidated because a newer version changed them.
    pub invalidated: u64,
    /// Non-fatal problems (e.g. the store was unreachable: working offline).
    pub warnings: Vec<String>,
    /// The store answered while the cache was opened (false: offline).
    pub reached_store: bool,
}

/// Counters, for status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Chunks fetched from the store.
    pub fetched_chunks: u64,
    /// Plaintext bytes fetched.
    pub fetched_bytes: u64,
    /// Chunks present or dirty in the cache.
    pub cached_chunks: u64,
    /// Dirty chunks.
    pub dirty_chunks: u64,
    /// Bytes of the dirty chunks (the last chunk of the disk may be shorter).
    pub dirty_bytes: u64,
    /// Dirty chunks that a suspend still has to upload (not synced).
    pub unsynced_chunks: u64,
    /// Their bytes.
    pub pending_upload_bytes: u64,
    /// Chunks of the disk.
    pub chunks: u64,
    /// Current prefetch window.
    pub window: u64,
    /// Bytes uploaded to the store by this engine (chunk objects).
    pub uploaded_bytes: u64,
    /// Plaintext bytes fetched per second, over the last
    /// [`meter::WINDOW_SECS`](crate::transfer::meter::WINDOW_SECS) seconds.
    pub fetch_rate: u64,
    /// Bytes uploaded per second, over the same window.
    pub upload_rate: u64,
    /// The link estimate, bytes/s: the fullest second of fetching in the
    /// window, else the last such second seen (see [`crate::transfer::meter`]).
    pub link_estimate: u64,
    /// Chunks in this session's access trace.
    pub trace_chunks: u64,
    /// Whether the engine's last store operation succeeded.
    pub online: bool,
    /// The error of the last store operation, when it failed.
    pub last_store_error: Option<String>,
}
