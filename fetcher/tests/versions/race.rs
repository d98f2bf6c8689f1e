//! gc racing publishes (part of the `versions` test binary).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fetcher::ops::{GcReport, gc};
use fetcher::{Lease, Parcel, Store};
use format::ChunkId;

use super::common::Rng;
use super::{
    chunk_id, file_backend, gc_options, import_blocks, named, quiet, refs, secret,
    verify_everything, vocabulary,
};

/// gc racing publishes, many rounds. Each round, three writers each
/// import a version (holding the parcel's lease, as `isr import` does)
/// whose content reuses chunks that only removed versions named (orphans,
/// older than the grace, still in the store), while gc runs over and
/// over with a short grace. After each round every existing version must
/// verify: every chunk it names is there. (With chunk reuse that ignores
/// age, this fails within a few rounds.)
#[test]
fn gc_racing_publishes_never_breaks_a_version() {
    const ROUNDS: usize = 30;
    const GRACE: u64 = 3;
    let b = file_backend();
    let refresh = Duration::from_secs(1);
    let store = b.store.clone().with_chunk_refresh(refresh);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let v = Arc::new(vocabulary(160, 31));
    let names = ["r0", "r1", "r2"];
    let mut rng = Rng(77);
    // Versions whose chunks become orphans once gc removes them.
    for (i, name) in names.iter().enumerate() {
        let parcel = Parcel::new(store.clone(), name, secret()).unwrap();
        for k in 0..3 {
            let from = (i * 3 + k) * 8 % 88;
            rt.block_on(import_blocks(&parcel, &refs(&v, from..from + 8)));
        }
    }
    let mut options = gc_options(1, GRACE);
    options.recheck = Duration::from_millis(100);
    let started = Instant::now();
    // The first orphans: the setup's replaced versions, once old.
    rt.block_on(gc(&store, &secret(), &options, quiet()))
        .unwrap();
    std::thread::sleep(Duration::from_secs(GRACE + 2));
    let (mut deleted, mut reused, mut removed_versions, mut spared) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..ROUNDS {
        // Orphans older than the grace: in the store, named by no version.
        let orphans = rt.block_on(old_orphans(&store, GRACE + 1));
        let mut picks = Vec::new();
        for _ in &names {
            let mut blocks: Vec<usize> = Vec::new();
            for _ in 0..8 {
                let pick = if !orphans.is_empty() && rng.below(4) != 0 {
                    let id = orphans[rng.below(orphans.len() as u64) as usize];
                    v.iter().position(|b| chunk_id(b) == id).unwrap()
                } else {
                    rng.below(v.len() as u64) as usize
                };
                if !blocks.contains(&pick) {
                    blocks.push(pick);
                }
            }
            reused += blocks
                .iter()
                .filter(|&&i| orphans.contains(&chunk_id(&v[i])))
                .count() as u64;
            picks.push(blocks);
        }
        let writers_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut writers = Vec::new();
        for (name, blocks) in names.iter().zip(picks) {
            let (store, v, done) = (store.clone(), v.clone(), writers_done.clone());
            let name = name.to_string();
            writers.push(rt.spawn(async move {
                let parcel = Parcel::new(store.clone(), &name, secret()).unwrap();
                let lease = Lease::acquire(&store, &name, "writer", 1, None, false)
                    .await
                    .unwrap();
                let image: Vec<&[u8]> = blocks.iter().map(|&i| v[i].as_slice()).collect();
                import_blocks(&parcel, &image).await;
                lease.release().await.unwrap();
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        let (gc_store, gc_options, done) = (store.clone(), options.clone(), writers_done.clone());
        let collector = rt.spawn(async move {
            let mut runs: Vec<GcReport> = Vec::new();
            // Until the writers are done, then once more (it removes the
            // versions they replaced, making new orphans).
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst) == 3;
                runs.push(
                    gc(&gc_store, &secret(), &gc_options, quiet())
                        .await
                        .unwrap(),
                );
                if finished {
                    return runs;
                }
            }
        });
        for w in writers {
            rt.block_on(w).unwrap();
        }
        let runs = rt.block_on(collector).unwrap();
        for r in &runs {
            deleted += r.removed_chunks;
            spared += r.spared_chunks;
            removed_versions += r
                .parcels
                .iter()
                .map(|p| p.removed_versions.len() as u64)
                .sum::<u64>();
        }
        let checked = rt.block_on(verify_everything(&store, &secret()));
        assert!(checked >= 3, "round {round}: {checked} versions");
        // Let this round's new orphans age towards the grace.
        std::thread::sleep(Duration::from_millis(800));
    }
    println!(
        "gc racing publishes: {ROUNDS} rounds in {:.1} s: {reused} orphan chunks reused by publishes, {deleted} chunks and {removed_versions} versions removed by gc, {spared} candidates spared; every version verified after each round",
        started.elapsed().as_secs_f64()
    );
    assert!(deleted > 0 && reused > 0, "the race was exercised");
}

/// The chunks in the store older than `secs` that no existing version names.
async fn old_orphans(store: &Store, secs: u64) -> Vec<ChunkId> {
    let mut named_now = HashSet::new();
    for name in store.parcels().await.unwrap() {
        let parcel = Parcel::new(store.clone(), &name, secret()).unwrap();
        for v in store.versions(&name).await.unwrap() {
            if let Ok(m) = parcel.manifest(v).await {
                named_now.extend(named(&m));
            }
        }
    }
    let now = SystemTime::now();
    let mut out: Vec<ChunkId> = store
        .list("chunks")
        .await
        .unwrap()
        .iter()
        .filter(|o| {
            now.duration_since(o.last_modified).unwrap_or_default() > Duration::from_secs(secs)
        })
        .filter_map(|o| ChunkId::parse(o.path.rsplit('/').next()?))
        .filter(|id| !named_now.contains(id))
        .collect();
    out.sort();
    out
}
