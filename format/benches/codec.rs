//! Chunk codec throughput (MB/s per core) at 64 KiB, 256 KiB and 1 MiB, on
//! compressible text and incompressible noise. `cargo bench -p format`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use format::Secret;
use format::chunk::{ChunkDecoder, ChunkEncoder};

fn text(len: usize) -> Vec<u8> {
    let words = [
        "disk ", "block ", "inode ", "suspend ", "resume ", "parcel ", "\n",
    ];
    let mut x = 1u32;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        out.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
    }
    out.truncate(len);
    out
}

fn noise(len: usize) -> Vec<u8> {
    format::noise(len, 0x9e37_79b9_7f4a_7c15)
}

fn codec(c: &mut Criterion) {
    let secret = Secret::new(&[5; 32]);
    for (name, make) in [("text", text as fn(usize) -> Vec<u8>), ("noise", noise)] {
        let mut group = c.benchmark_group(format!("chunk/{name}"));
        for size in [64 * 1024, 256 * 1024, 1024 * 1024] {
            let plain = make(size);
            group.throughput(Throughput::Bytes(size as u64));
            let mut enc = ChunkEncoder::new(secret.clone(), 1);
            group.bench_with_input(BenchmarkId::new("encode", size), &plain, |b, p| {
                b.iter(|| enc.encode(p).unwrap())
            });
            let encoded = enc.encode(&plain).unwrap();
            let mut dec = ChunkDecoder::new(secret.clone());
            let mut out = vec![0u8; size];
            group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, e| {
                b.iter(|| dec.decode_into(&e.key, &e.object, &mut out).unwrap())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
