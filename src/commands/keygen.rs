//! `isr keygen FILE`: a new secret key file (32 random bytes, mode 0600).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::output;

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key; an existing file is never overwritten.
    pub keyfile: PathBuf,
    /// Print one JSON object ({"key_file": PATH}) on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `isr keygen`.
pub fn keygen(a: KeygenArgs) -> anyhow::Result<()> {
    write_key(&a.keyfile, a.json)
}

fn write_key(path: &Path, json: bool) -> anyhow::Result<()> {
    let mut raw = [0u8; format::keys::SECRET_LEN];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                anyhow::anyhow!("{} exists; refusing to overwrite a key", path.display())
            }
            _ => anyhow::Error::new(e).context(format!("cannot create {}", path.display())),
        })?;
    file.write_all(&raw)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    if json {
        let full = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        output::line(json!({ "key_file": full }))?;
        return Ok(());
    }
    output::note(format_args!(
        "wrote a new key to {}; keep it safe: without it no parcel made with it can be opened",
        path.display()
    ));
    Ok(())
}
