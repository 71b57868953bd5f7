//! The hashing core: fastpull's streaming sha256 (`fastpull::bench_internals::Hasher`, backed by sha2)
//! against ring, over the chunk sizes the network hands us. Compare the GB/s with
//! `openssl speed -evp sha256` on the same machine (see perf/RESULTS.md).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

const TOTAL: usize = 64 << 20;

fn data() -> Vec<u8> {
    (0..TOTAL)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

fn hashing(c: &mut Criterion) {
    let buf = data();
    let mut g = c.benchmark_group("sha256");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.sample_size(20);
    for chunk in [16 << 10, 1 << 20] {
        g.bench_with_input(
            BenchmarkId::new("fastpull-sha2", chunk),
            &chunk,
            |b, &chunk| {
                b.iter(|| {
                    let mut h = fastpull::bench_internals::Hasher::new();
                    for part in buf.chunks(chunk) {
                        h.update(black_box(part));
                    }
                    h.finish()
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("ring", chunk), &chunk, |b, &chunk| {
            b.iter(|| {
                let mut h = ring::digest::Context::new(&ring::digest::SHA256);
                for part in buf.chunks(chunk) {
                    h.update(black_box(part));
                }
                h.finish()
            })
        });
    }
    g.finish();
}

/// Aggregate throughput with one blob per core hashed at once, as the hashing pool does.
fn parallel(c: &mut Criterion) {
    let buf = data();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("sha256-parallel");
    g.sample_size(10);
    for threads in [1, cores] {
        g.throughput(Throughput::Bytes((TOTAL * threads) as u64));
        g.bench_with_input(
            BenchmarkId::new("threads", threads),
            &threads,
            |b, &threads| {
                b.iter(|| {
                    std::thread::scope(|s| {
                        for _ in 0..threads {
                            s.spawn(|| {
                                let mut h = fastpull::bench_internals::Hasher::new();
                                for part in buf.chunks(1 << 20) {
                                    h.update(black_box(part));
                                }
                                h.finish()
                            });
                        }
                    })
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, hashing, parallel);
criterion_main!(benches);
