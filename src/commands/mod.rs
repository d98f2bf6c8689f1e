//! The commands: argument handling, output and exit status around the
//! operations that `fetcher` implements.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use fetcher::{Parcel, Store, StoreOptions};
use format::Secret;
use serde_json::json;

use crate::cli::{Cli, Command, HoardArgs, ParcelArgs, StoreArgs, VerifyArgs};
use crate::{output, progress};

mod discard;
mod export;
mod gc;
mod import;
mod log;
mod ls;
mod rollback;

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen { keyfile, json } => keygen(&keyfile, json).map(|()| ExitCode::SUCCESS),
        Command::Import(a) => import::import(a).await.map(|()| ExitCode::SUCCESS),
        Command::Export(a) => export::export(a).await.map(|()| ExitCode::SUCCESS),
        Command::Verify(a) => verify(a).await,
        Command::Log(a) => log::log(a).await,
        Command::Hoard(a) => hoard(a).await.map(|()| ExitCode::SUCCESS),
        Command::Check(a) => crate::check::check(a).await,
        Command::Fork(a) => crate::check::fork(a).await,
        Command::Ls(a) => ls::ls(a).await,
        Command::Rollback(a) => rollback::rollback(a).await.map(|()| ExitCode::SUCCESS),
        Command::Discard(a) => discard::discard(a).await,
        Command::Gc(a) => gc::gc(a).await.map(|()| ExitCode::SUCCESS),
        Command::Resume(_)
        | Command::Run(_)
        | Command::Suspend(_)
        | Command::Status(_)
        | Command::Sync(_)
        | Command::Checkin(_)
        | Command::Recover(_) => {
            unreachable!("run outside the async runtime by main")
        }
    }
}

/// Runs `op` to its end unless SIGINT or SIGTERM comes first: then `op` is
/// dropped (its work cancelled) and the signal returned, for the caller to
/// let go of what it holds and end with [`crate::output::Interrupted`].
pub(crate) async fn until_signal<T>(op: impl std::future::Future<Output = T>) -> Result<T, i32> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return Ok(op.await);
    };
    tokio::select! {
        r = op => Ok(r),
        _ = int.recv() => Err(libc::SIGINT),
        _ = term.recv() => Err(libc::SIGTERM),
    }
}

/// What an interrupted command that published nothing left: the lease on
/// `parcel` released (`released` is how its release went).
pub(crate) fn released_or_not(parcel: &str, released: &Result<(), fetcher::Error>) -> String {
    match released {
        Ok(()) => format!("nothing was published; the lease on parcel {parcel} is released"),
        Err(e) => format!(
            "nothing was published; the lease on parcel {parcel} could not be released ({e}): the next import or rollback on this host takes it over"
        ),
    }
}

/// One line for the user: the error and its causes, each said once.
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn keygen(path: &Path, json: bool) -> anyhow::Result<()> {
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

pub(crate) fn open_parcel(a: &ParcelArgs) -> anyhow::Result<Parcel> {
    let secret = read_key(&a.key_file)?;
    let store = open_store(&StoreArgs {
        store: a.store.clone(),
        endpoint: a.endpoint.clone(),
        retry_timeout: a.retry_timeout,
    })?;
    Ok(Parcel::new(store, &a.parcel, secret)?)
}

/// The secret in key file `path` (with a warning if others can read it).
pub(crate) fn read_key(path: &Path) -> anyhow::Result<Secret> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    warn_if_key_exposed(path);
    Secret::from_key_file_bytes(&bytes).with_context(|| {
        format!(
            "{} is not an isr key (32 bytes, or 64 hex digits; see `isr keygen`)",
            path.display()
        )
    })
}

pub(crate) fn open_store(a: &StoreArgs) -> anyhow::Result<Store> {
    let options = StoreOptions {
        endpoint: a.endpoint.clone(),
        retry_timeout: std::time::Duration::from_secs(a.retry_timeout),
        ..StoreOptions::default()
    };
    Ok(Store::open(&a.store, &options)?)
}

/// The arguments of a parcel command for a parcel named by an argument.
pub(crate) fn parcel_args(store: &StoreArgs, parcel: &str, key_file: &Path) -> ParcelArgs {
    ParcelArgs {
        store: store.store.clone(),
        endpoint: store.endpoint.clone(),
        parcel: parcel.to_owned(),
        key_file: key_file.to_owned(),
        retry_timeout: store.retry_timeout,
    }
}

/// Warns (once per process) when the key file can be read by its group or
/// by others: whoever reads it can decrypt every parcel made with it.
fn warn_if_key_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    static WARNED: std::sync::Once = std::sync::Once::new();
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        WARNED.call_once(|| {
            output::warn(format_args!(
                "key file {p} is readable by others (mode {mode:04o}); chmod 600 {p}",
                p = path.display()
            ));
        });
    }
}

/// Turns a fetcher error into the user's words (a wrong key names the file).
pub(crate) fn explain(e: fetcher::Error, a: &ParcelArgs) -> anyhow::Error {
    match e {
        fetcher::Error::WrongKey { .. } => anyhow::anyhow!(
            "the key in {} does not open parcel {}",
            a.key_file.display(),
            a.parcel
        ),
        e => e.into(),
    }
}

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| {
            h.trim()
                .chars()
                .take(format::manifest::MAX_HOST_LEN)
                .collect()
        })
        .unwrap_or_else(|_| "unknown".into())
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let parcel = open_parcel(&a.parcel)?;
    let (version, manifest) = parcel
        .resolve(a.version)
        .await
        .map_err(|e| explain(e, &a.parcel))?;
    let (bar, sink) = progress::bytes_bar(manifest.disk_size, "verify", a.json);
    let report = fetcher::ops::verify(&parcel, version, &manifest, sink)
        .await
        .map_err(|e| explain(e, &a.parcel))?;
    bar.finish_and_clear();
    let bad: Vec<String> = report.bad.iter().map(|e| e.to_string()).collect();
    if a.json {
        let ids: Vec<String> = report
            .bad
            .iter()
            .filter_map(|e| match e {
                fetcher::Error::BadChunk { id, .. } => Some(id.to_string()),
                _ => None,
            })
            .collect();
        let mut reply = json!({
            "parcel": parcel.name(),
            "version": report.version,
            "chunks_checked": report.chunks_checked,
            "ok": bad.is_empty(),
            "bad_chunks": ids,
            "errors": bad,
        });
        if !bad.is_empty() {
            reply["error"] = json!(format!(
                "version {} of parcel {}: {} of {} chunks bad",
                report.version,
                parcel.name(),
                bad.len(),
                report.chunks_checked
            ));
            reply["kind"] = json!(output::Kind::Failure.name());
        }
        output::line(reply)?;
    } else {
        for line in &bad {
            output::error(format_args!("isr: bad {line}"));
        }
        output::line(format_args!(
            "version {} of parcel {}: {} chunks checked, {} bad",
            report.version,
            parcel.name(),
            report.chunks_checked,
            bad.len()
        ))?;
    }
    Ok(if bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// "N chunks filled from M objects fetched (X MiB)": one object fills
/// every chunk that holds its content.
fn filled_from(filled: u64, objects: u64, bytes: u64) -> String {
    format!(
        "{filled} chunks filled from {objects} objects fetched ({:.1} MiB)",
        mib(bytes)
    )
}

async fn hoard(a: HoardArgs) -> anyhow::Result<()> {
    let parcel = open_parcel(&a.parcel)?;
    parcel.store().set_bwlimit(a.bwlimit, a.bwlimit);
    let mut options = fetcher::EngineOptions {
        host: host_name(),
        ..Default::default()
    };
    if let Some(dir) = &a.cache_dir {
        options.cache_root = dir.clone();
    }
    let json = a.json;
    let started = std::time::Instant::now();
    // The engine runs its own runtime and blocks: keep it off ours.
    let runtime = tokio::runtime::Handle::current();
    let ((filled, stats), report, dir, ram) = tokio::task::spawn_blocking(move || {
        let engine = fetcher::Engine::open(parcel.clone(), options.clone())?;
        let total = engine.geometry().disk_size();
        // What is cached already is verified first: a damaged or truncated
        // cache is repaired, never reported complete.
        let (bar, sink) = progress::bytes_bar(total, "verify cache", json);
        let (_, damaged) = engine.verify_cached(sink)?;
        bar.finish_and_clear();
        if !damaged.is_empty() {
            output::warn(format_args!(
                "{} cached chunks of parcel {} were damaged; fetching them again",
                damaged.len(),
                engine.parcel().name()
            ));
        }
        let before = engine.stats().cached_chunks;
        let (bar, sink) = progress::bytes_bar(total, "hoard", json);
        let stats = engine.hoard(sink);
        bar.finish_and_clear();
        let report = engine.open_report().clone();
        let dir = engine.cache_dir();
        let stats = stats?;
        // Chunks this hoard made local: more than the objects it fetched
        // where one object fills several chunks (repeated content).
        let filled = stats.cached_chunks.saturating_sub(before);
        engine.close()?;
        // The VM's RAM, where the version keeps it as an image of its own.
        let manifest = runtime.block_on(parcel.manifest(report.base_version))?;
        let ram = match manifest.ram {
            Some(r) => {
                let ram = fetcher::Engine::open(
                    parcel,
                    fetcher::EngineOptions {
                        ram: Some(r.size),
                        ..options
                    },
                )?;
                let (bar, sink) = progress::bytes_bar(r.size, "hoard RAM", json);
                let verified = ram.verify_cached(fetcher::no_progress());
                let before = ram.stats().cached_chunks;
                let stats = verified.and_then(|_| ram.hoard(sink));
                bar.finish_and_clear();
                let stats = stats?;
                ram.close()?;
                Some((stats.cached_chunks.saturating_sub(before), stats))
            }
            None => None,
        };
        Ok::<_, fetcher::Error>(((filled, stats), report, dir, ram))
    })
    .await?
    .map_err(|e| explain(e, &a.parcel))?;
    for w in &report.warnings {
        output::warn(w);
    }
    let seconds = started.elapsed().as_secs_f64();
    if a.json {
        output::line(json!({
            "parcel": a.parcel.parcel,
            "version": report.base_version,
            "cache": dir,
            "chunks": stats.chunks,
            "cached_chunks": stats.cached_chunks,
            "dirty_chunks": stats.dirty_chunks,
            "filled_chunks": filled,
            "fetched_chunks": stats.fetched_chunks,
            "bytes_fetched": stats.fetched_bytes,
            "ram": ram.as_ref().map(|(filled, r)| json!({
                "chunks": r.chunks,
                "filled_chunks": filled,
                "fetched_chunks": r.fetched_chunks,
                "bytes_fetched": r.fetched_bytes,
            })),
            "seconds": seconds,
        }))?;
    } else {
        output::line(format_args!(
            "hoarded version {} of parcel {} in {}: {}, {} of {} chunks cached{}, {:.2} s",
            report.base_version,
            a.parcel.parcel,
            dir.display(),
            filled_from(filled, stats.fetched_chunks, stats.fetched_bytes),
            stats.cached_chunks,
            stats.chunks,
            match &ram {
                Some((filled, r)) => format!(
                    "; the VM's RAM: {}, {} of {} cached",
                    filled_from(*filled, r.fetched_chunks, r.fetched_bytes),
                    r.cached_chunks,
                    r.chunks
                ),
                None => String::new(),
            },
            seconds
        ))?;
    }
    Ok(())
}
