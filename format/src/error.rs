//! The one error type of the format crate: a small set of kinds a caller can
//! match on, each carrying what it needs to be a useful message.

/// Why an encoding could not be decoded (or a value could not be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The input ends before a field that must be there.
    #[error("{what} is truncated: needs at least {need} bytes, has {have}")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    /// A size field exceeds what this format allows; refused before allocating.
    #[error("{what} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    /// The input does not start with the expected magic number.
    #[error("not an isr {what} (bad magic number)")]
    BadMagic { what: &'static str },
    /// Written by a newer isr than this one.
    #[error(
        "{what} has format version {found}, newer than the {supported} this isr reads; upgrade isr"
    )]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    /// Needs a feature (an extension marked required) this isr does not know.
    #[error("{what} needs feature {feature}, which this isr does not know; upgrade isr")]
    UnsupportedFeature { what: &'static str, feature: u64 },
    /// The AES-GCM tag did not verify: the object was corrupted or tampered with.
    #[error("{what} failed authentication: it is corrupt or was tampered with")]
    AuthFailed { what: &'static str },
    /// The manifest was written under another secret.
    #[error("the key does not open this {what}")]
    WrongKey { what: &'static str },
    /// A chunk decrypted but its plaintext does not hash to the key that named it.
    #[error("chunk content does not match the key that names it")]
    KeyMismatch,
    /// Structurally invalid content behind a valid tag (a writer bug or a forgery
    /// by someone holding the key).
    #[error("{what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    /// A disk size / chunk size combination isr does not accept.
    #[error("invalid geometry: {0}")]
    Geometry(String),
}

impl Error {
    pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Malformed {
            what,
            detail: detail.into(),
        }
    }
}
