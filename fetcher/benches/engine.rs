//! The engine's hot paths against references measured in the same run:
//! cached reads (4 KiB random, 128 KiB sequential) against plain `pread`
//! of the same cache file, and the miss path (demand fetch from an
//! in-memory store, decode, write into the cache, mark present) against a
//! bare get + decode of the same chunk objects. `cargo bench -p fetcher`.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fetcher::ops::{ImportOptions, import};
use fetcher::{Engine, EngineOptions, Parcel, Store, no_progress};
use format::chunk::ChunkDecoder;
use format::{ChunkEntry, Secret};

const MIB: u64 = 1 << 20;

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn parcel(dir: &std::path::Path, size: u64) -> Parcel {
    let image = dir.join("image");
    let f = std::fs::File::create(&image).unwrap();
    let mut rng = Xorshift(7);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..size / MIB {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all_at(&buf, i * MIB).unwrap();
    }
    let store = Store::open("memory://", &Default::default()).unwrap();
    let parcel = Parcel::new(store, "bench", Secret::new(&[1; 32])).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(import(
            &parcel,
            &image,
            &ImportOptions::default(),
            no_progress(),
        ))
        .unwrap();
    parcel
}

fn options(root: &std::path::Path) -> EngineOptions {
    EngineOptions {
        cache_root: root.to_owned(),
        prefetch: false,
        // Like for like with the reference, `pread` through the page cache
        // (the device path in direct mode is scripts/bench-ublk's).
        cache_io: Some(fetcher::CacheIo::Buffered),
        ..Default::default()
    }
}

fn cached(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let engine = Engine::open(parcel(dir.path(), size), options(dir.path())).unwrap();
    engine.hoard(no_progress()).unwrap();
    let file = std::fs::File::open(engine.cache_dir().join("image")).unwrap();

    let mut g = c.benchmark_group("cached_read");
    g.measurement_time(Duration::from_secs(3));
    for (name, len, random) in [
        ("4k_random", 4096usize, true),
        ("128k_seq", 128 << 10, false),
    ] {
        g.throughput(Throughput::Bytes(len as u64));
        let mut buf = vec![0u8; len];
        let blocks = size / len as u64;
        let mut rng = Xorshift(3);
        let mut pos = 0u64;
        let mut next = move || {
            pos = if random {
                rng.next() % blocks
            } else {
                (pos + 1) % blocks
            };
            pos * len as u64
        };
        g.bench_function(format!("{name}/engine"), |b| {
            b.iter(|| engine.read(next(), &mut buf).unwrap())
        });
        g.bench_function(format!("{name}/pread"), |b| {
            b.iter(|| file.read_exact_at(&mut buf, next()).unwrap())
        });
    }
    g.finish();
}

fn miss(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let parcel = parcel(dir.path(), size);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let manifest = rt.block_on(parcel.manifest(1)).unwrap();
    let chunk = manifest.chunk_size as u64;
    let count = size / chunk;

    let mut g = c.benchmark_group("miss");
    g.throughput(Throughput::Bytes(chunk));
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    // Each sample opens a fresh cache and reads `iters` distinct chunks.
    let mut round = 0u64;
    g.bench_function("engine_demand_fetch", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                round += 1;
                let root = dir.path().join(format!("cache-{round}"));
                let engine = Engine::open(parcel.clone(), options(&root)).unwrap();
                let n = left.min(count);
                let mut buf = vec![0u8; chunk as usize];
                let start = Instant::now();
                for i in 0..n {
                    engine.read(i * chunk, &mut buf).unwrap();
                }
                total += start.elapsed();
                left -= n;
                drop(engine);
                let _ = std::fs::remove_dir_all(&root);
            }
            total
        })
    });
    let keys: Vec<_> = manifest
        .chunks
        .iter()
        .filter_map(|e| match e {
            ChunkEntry::Data(k) => Some(*k),
            ChunkEntry::Zero => None,
        })
        .collect();
    let mut i = 0;
    let mut decoder = ChunkDecoder::new(parcel.secret().clone());
    g.bench_function("get_and_decode_reference", |b| {
        b.iter(|| {
            let key = keys[i % keys.len()];
            i += 1;
            let object = rt.block_on(parcel.store().get_chunk(&key.id())).unwrap();
            decoder.decode(&key, &object, chunk as usize).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, cached, miss);
criterion_main!(benches);
