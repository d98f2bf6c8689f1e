//! `isr gc`: removes old versions and the chunks no kept version names,
//! without ever breaking a version or a publish running at the same time.
//!
//! For each parcel gc keeps its last N versions (HEAD−N+1 … HEAD) and
//! removes the older ones; then it removes every chunk object
//! (`chunks/xx/<64 hex>`) that no kept version of any parcel names (in its
//! disk table or its memory image's). The rules that make this safe:
//!
//! * **One key, every manifest decoded.** gc reads every kept manifest of
//!   every parcel to know what is in use; one key is assumed to open every
//!   parcel of the store. If any of them cannot be read (another key,
//!   damaged, unreadable), gc removes nothing (no version, no chunk) and
//!   fails naming the parcel, the version and the cause
//!   ([`Error::GcBlocked`]).
//! * **Leased parcels keep every version.** A parcel whose lease is held
//!   (some host resumed it, or suspended it offline, or an import is
//!   publishing) keeps all its versions: its holder's cache may be based on
//!   an older one, and its next publish names that version's chunks. A
//!   lease taken after gc looked is harmless: the holder bases itself on
//!   HEAD then, which gc keeps.
//! * **HEAD stays findable.** Before it deletes any manifest of a parcel,
//!   gc raises the parcel's floor (`parcels/<name>/FLOOR`, the lowest kept
//!   version, only ever raised), from which [`Store::head`] probes; HEAD
//!   and the HEAD hint are never deleted, nor leases, nor `.isr/`. Old
//!   manifests go before any chunk.
//! * **Grace, and freshness at publish.** gc deletes only chunks whose
//!   `last_modified` is older than the grace G (default a day; plus one
//!   second, since some stores give whole seconds), and refuses a G not
//!   longer than the chunk refresh age R (default 6 h): a publisher reuses
//!   a chunk only while it is younger than R, else writes it again, which
//!   makes it young (see `Store::has_chunk` and `Store::put_chunk`). gc
//!   goes: (1) list the versions and read the kept manifests; (2) remove
//!   old versions; (3) list the chunks: candidates are unreferenced and
//!   older than G; (4) list the versions again and read every manifest that
//!   appeared since (1), dropping what they name from the candidates; (5)
//!   delete the candidates, each after looking once more that it is still
//!   older than G (a publisher may have refreshed it since the listing),
//!   re-doing (4) whenever [`GcOptions::recheck`] has passed. With δ the
//!   longest time from the start of a look at the versions to a delete
//!   (about the recheck interval, plus a look, plus a request), a publish
//!   whose check of a chunk and commit are less than G − R − δ apart (about
//!   18 h with the defaults) never has a chunk deleted under it: if the chunk
//!   was young at its check, gc cannot find it older than G before that
//!   publish committed, and then gc sees the new manifest; if the publisher
//!   wrote it, its age started again.
//!
//! Every publisher goes through those two `Store` functions, so the
//! engine's publish, import and the memory image's upload need nothing of
//! their own. What is left is the moment between gc's last look at a chunk
//! and its delete (one request): a publisher's refresh that lands inside
//! it is lost; `put_chunk` looks again after writing and writes once more
//! if it finds the chunk gone. Clocks: ages compare the store's
//! `last_modified` with this host's clock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use format::{ChunkEntry, ChunkId, Manifest, Secret};
use futures::{StreamExt, stream};
use tokio::task::JoinSet;

use super::listing::versions_by_parcel;
use crate::remote::lease::{Lease, LeaseInfo};
use crate::remote::store::age_of;
use crate::{Error, Parcel, Store};

/// Default grace: chunks younger than this are never deleted.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(86_400);
/// Default interval between looks at the versions while deleting.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(2);
/// The resolution of some stores' `last_modified` (HTTP dates: seconds).
const CLOCK_RESOLUTION: Duration = Duration::from_secs(1);

/// How to collect garbage.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Versions kept per parcel (at least 1: HEAD).
    pub keep: u64,
    /// Only chunks older than this are deleted; must exceed the store's
    /// chunk refresh age.
    pub grace: Duration,
    /// Report what would be removed; remove nothing.
    pub dry_run: bool,
    /// Longest time between two looks at the versions while deleting.
    pub recheck: Duration,
    /// Store requests in flight.
    pub concurrency: usize,
}

impl GcOptions {
    /// Keep `keep` versions per parcel, with the default grace.
    pub fn new(keep: u64) -> GcOptions {
        GcOptions {
            keep,
            grace: DEFAULT_GRACE,
            dry_run: false,
            recheck: DEFAULT_RECHECK,
            concurrency: crate::transfer::DEFAULT_CONCURRENCY,
        }
    }
}

/// What gc did (or, dry, would do) to one parcel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParcelGc {
    /// The parcel.
    pub parcel: String,
    /// Its HEAD when gc looked.
    pub head: u64,
    /// The oldest version kept.
    pub oldest_kept: u64,
    /// The versions removed, ascending.
    pub removed_versions: Vec<u64>,
    /// The lease's holder, if held: then every version is kept.
    pub lease: Option<LeaseInfo>,
}

/// What gc did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Nothing was removed: the counts say what would have been.
    pub dry_run: bool,
    /// Per parcel, by name.
    pub parcels: Vec<ParcelGc>,
    /// Chunk objects in the store, and their bytes.
    pub chunks: u64,
    /// Bytes of those chunk objects.
    pub chunk_bytes: u64,
    /// Chunk objects named by a kept version.
    pub referenced_chunks: u64,
    /// Unreferenced chunk objects younger than the grace (kept).
    pub young_chunks: u64,
    /// Chunk objects removed.
    pub removed_chunks: u64,
    /// Bytes of the chunk objects removed.
    pub removed_bytes: u64,
    /// Candidates kept after all: named by a version published during the
    /// run, or refreshed by a publisher since they were listed.
    pub spared_chunks: u64,
    /// Versions that appeared while gc ran (their chunks were kept).
    pub new_versions: u64,
}

/// The steps, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcPhase {
    /// Reading the kept manifests.
    ReadManifests,
    /// Deleting chunks.
    DeleteChunks,
}

/// A progress sink: (phase, done, total).
pub type GcProgress = Arc<dyn Fn(GcPhase, u64, u64) + Send + Sync>;

/// What gc knows is in use.
#[derive(Default)]
struct Refs {
    chunks: HashSet<ChunkId>,
    /// Versions read (or deliberately not: those this run removes).
    known: HashSet<(String, u64)>,
}

impl Refs {
    fn add(&mut self, m: &Manifest) {
        for e in crate::Image::all_entries(m) {
            if let ChunkEntry::Data(k) = e {
                self.chunks.insert(k.id());
            }
        }
    }
}

/// Runs gc on `store`, whose parcels `secret` opens (see the module docs).
pub async fn gc(
    store: &Store,
    secret: &Secret,
    options: &GcOptions,
    progress: GcProgress,
) -> Result<GcReport, Error> {
    check_options(store, options)?;
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..Default::default()
    };
    let mut refs = Refs::default();

    // (1) The versions, the leases, the kept manifests.
    let mut reads: Vec<(Parcel, u64)> = Vec::new();
    for (name, versions) in versions_by_parcel(&store.list("parcels").await?) {
        let Some(&head) = versions.last() else {
            continue; // no version yet (a first import under way)
        };
        let parcel = Parcel::new(store.clone(), &name, secret.clone())
            .map_err(|e| blocked(&name, head, 0, e))?;
        let lease = Lease::holder_of(store, &name).await?;
        let oldest_kept = match lease {
            Some(_) => versions[0],
            // (never below the oldest version there is: an earlier gc
            // may have removed those before it)
            None => (head + 1).saturating_sub(options.keep).max(versions[0]),
        };
        let mut removed_versions = Vec::new();
        for &v in &versions {
            if v < oldest_kept {
                removed_versions.push(v);
                refs.known.insert((name.clone(), v));
            } else {
                reads.push((parcel.clone(), v));
            }
        }
        report.parcels.push(ParcelGc {
            parcel: name,
            head,
            oldest_kept,
            removed_versions,
            lease,
        });
    }
    read_manifests(reads, &mut refs, options, &progress, 0).await?;

    // (2) Old versions: the floor first, so that HEAD stays findable.
    if !options.dry_run {
        for p in report
            .parcels
            .iter()
            .filter(|p| !p.removed_versions.is_empty())
        {
            store.raise_floor(&p.parcel, p.oldest_kept).await?;
            for &v in &p.removed_versions {
                store
                    .delete("remove old version", &Store::manifest_path(&p.parcel, v))
                    .await?;
            }
        }
    }

    // (3) Candidates: unreferenced chunks older than the grace.
    let grace = options.grace + CLOCK_RESOLUTION;
    let mut candidates: HashMap<ChunkId, u64> = HashMap::new();
    for o in store.list("chunks").await? {
        let Some(id) = chunk_id_of(&o.path) else {
            continue; // not a chunk isr wrote: never touched
        };
        report.chunks += 1;
        report.chunk_bytes += o.size;
        if refs.chunks.contains(&id) {
            report.referenced_chunks += 1;
        } else if age_of(o.last_modified) > grace {
            candidates.insert(id, o.size);
        } else {
            report.young_chunks += 1;
        }
    }

    // (4) Versions published meanwhile.
    let mut looked = Instant::now();
    recheck(
        store,
        secret,
        &mut refs,
        &mut candidates,
        &mut report,
        options,
        0,
    )
    .await?;

    // (5) Delete, looking again at the versions every `recheck`.
    let mut order: Vec<(ChunkId, u64)> = candidates.iter().map(|(&id, &s)| (id, s)).collect();
    order.sort_unstable();
    let total = order.len() as u64;
    if options.dry_run {
        report.removed_chunks = total;
        report.removed_bytes = order.iter().map(|(_, s)| s).sum();
        return Ok(report);
    }
    let mut tasks: JoinSet<(u64, Result<bool, Error>)> = JoinSet::new();
    let mut failure: Option<Error> = None;
    let mut done = 0u64;
    for (id, size) in order {
        if failure.is_some() {
            break;
        }
        if looked.elapsed() >= options.recheck {
            looked = Instant::now();
            let removed = report.removed_chunks;
            if let Err(e) = recheck(
                store,
                secret,
                &mut refs,
                &mut candidates,
                &mut report,
                options,
                removed,
            )
            .await
            {
                failure = Some(e);
                break;
            }
        }
        done += 1;
        progress(GcPhase::DeleteChunks, done, total);
        if !candidates.contains_key(&id) {
            continue; // spared by the recheck (counted there)
        }
        while tasks.len() >= options.concurrency.max(1) {
            let r = tasks.join_next().await.expect("tasks are running");
            settle(r, &mut report, &mut failure);
        }
        let store = store.clone();
        tasks.spawn(async move { (size, store.delete_chunk_if_older(&id, grace).await) });
    }
    while let Some(r) = tasks.join_next().await {
        settle(r, &mut report, &mut failure);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

fn check_options(store: &Store, options: &GcOptions) -> Result<(), Error> {
    if options.keep == 0 {
        return Err(Error::Invalid(
            "--keep must be at least 1 (HEAD is always kept)".into(),
        ));
    }
    let refresh = store.chunk_refresh();
    if options.grace <= refresh {
        return Err(Error::Invalid(format!(
            "a grace of {} s is not longer than the chunk refresh age of {} s: a publisher may reuse a chunk that old without writing it, so gc could delete it under a publish; give a longer --grace (the refresh age is set by ISR_CHUNK_REFRESH_SECS, default 6 h)",
            options.grace.as_secs(),
            refresh.as_secs()
        )));
    }
    if !options.dry_run && !store.is_writable() {
        return Err(Error::ReadOnly {
            store: store.url().to_owned(),
        });
    }
    Ok(())
}

/// Counts one finished delete.
fn settle(
    r: Result<(u64, Result<bool, Error>), tokio::task::JoinError>,
    report: &mut GcReport,
    failure: &mut Option<Error>,
) {
    match r.expect("deletes do not panic") {
        (size, Ok(true)) => {
            report.removed_chunks += 1;
            report.removed_bytes += size;
        }
        (_, Ok(false)) => report.spared_chunks += 1,
        (_, Err(e)) => {
            failure.get_or_insert(e);
        }
    }
}

/// Reads the manifests `reads` and adds what they name to `refs`; any that
/// cannot be read blocks the run (`removed`: chunks deleted so far).
async fn read_manifests(
    reads: Vec<(Parcel, u64)>,
    refs: &mut Refs,
    options: &GcOptions,
    progress: &GcProgress,
    removed: u64,
) -> Result<(), Error> {
    let total = reads.len() as u64;
    let mut results = stream::iter(reads)
        .map(|(parcel, v)| async move {
            let m = parcel.manifest(v).await;
            (parcel.name().to_owned(), v, m)
        })
        .buffer_unordered(options.concurrency.max(1));
    let mut done = 0;
    while let Some((name, v, m)) = results.next().await {
        done += 1;
        progress(GcPhase::ReadManifests, done, total);
        match m {
            Ok(m) => refs.add(&m),
            // Gone since the listing (another gc): it names nothing now.
            Err(Error::VersionRemoved { .. } | Error::NotFound { .. }) => {}
            Err(e) => return Err(blocked(&name, v, removed, e)),
        }
        refs.known.insert((name, v));
    }
    Ok(())
}

/// Lists the versions again and reads those that appeared since gc last
/// looked, dropping what they name from the candidates.
async fn recheck(
    store: &Store,
    secret: &Secret,
    refs: &mut Refs,
    candidates: &mut HashMap<ChunkId, u64>,
    report: &mut GcReport,
    options: &GcOptions,
    removed: u64,
) -> Result<(), Error> {
    let mut reads = Vec::new();
    for (name, versions) in versions_by_parcel(&store.list("parcels").await?) {
        for v in versions {
            if refs.known.contains(&(name.clone(), v)) {
                continue;
            }
            let parcel = Parcel::new(store.clone(), &name, secret.clone())
                .map_err(|e| blocked(&name, v, removed, e))?;
            reads.push((parcel, v));
        }
    }
    if reads.is_empty() {
        return Ok(());
    }
    report.new_versions += reads.len() as u64;
    let quiet: GcProgress = Arc::new(|_, _, _| {});
    read_manifests(reads, refs, options, &quiet, removed).await?;
    let before = candidates.len();
    candidates.retain(|id, _| !refs.chunks.contains(id));
    report.spared_chunks += (before - candidates.len()) as u64;
    Ok(())
}

fn blocked(parcel: &str, version: u64, removed: u64, source: Error) -> Error {
    Error::GcBlocked {
        parcel: parcel.to_owned(),
        version,
        removed,
        source: Box::new(source),
    }
}

/// The chunk a `chunks/xx/<64 hex>` object holds.
fn chunk_id_of(path: &str) -> Option<ChunkId> {
    let (dir, hex) = path.strip_prefix("chunks/")?.split_once('/')?;
    let id = ChunkId::parse(hex)?;
    (hex.len() == 64 && hex.get(..2) == Some(dir)).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_names_parse() {
        let id = ChunkId([0xab; 32]);
        assert_eq!(chunk_id_of(&Store::chunk_path(&id)), Some(id));
        let hex = id.to_string();
        assert_eq!(chunk_id_of(&format!("chunks/cd/{hex}")), None);
        assert_eq!(chunk_id_of(&format!("chunks/ab/{hex}.tmp")), None);
        assert_eq!(chunk_id_of("chunks/ab"), None);
        assert_eq!(chunk_id_of(&format!("parcels/ab/{hex}")), None);
    }
}
