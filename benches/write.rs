//! The writer and the in-order hasher: fastpull's mmap writer against plain `pwrite`, each
//! writing a preallocated blob out of order and making it durable under its final name, and
//! the in-order hasher fed chunks out of order (as range requests complete), on one blob and
//! on several blobs at once (aggregate scaling across cores). `perf/write.py` runs it and
//! records the numbers for perf/RESULTS.md.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use fastpull::bench_internals::{BlobFile, HashPool, InOrderHasher, SpanWriter};

const SIZE: usize = 128 << 20;
const CHUNK: u64 = 8 << 20;
/// hyper hands body data over in pieces of about this size.
const FRAME: usize = 16 << 10;

fn data() -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// Chunk order as a pull sees it: interleaved, the first chunk not first.
fn shuffled(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

/// The blob cut into CHUNK-sized spans, as a fanned-out pull leaves it: one writer each.
fn cut(blob: &Arc<BlobFile>) -> Vec<SpanWriter> {
    let first = blob.writer().expect("writer");
    let mut upper: Vec<SpanWriter> = (1..SIZE as u64 / CHUNK)
        .rev()
        .map(|i| blob.split(&first.span(), i * CHUNK).expect("split"))
        .collect();
    upper.push(first);
    upper.reverse();
    upper
}

/// One blob written both ways, doing the same work: create the partial file, preallocate it,
/// write the chunks out of order in hyper-sized frames, flush it (fsync), rename it to its
/// final name and fsync the directory. The final file is kept until the next iteration's
/// setup (untimed) deletes it, on both sides.
fn writers(c: &mut Criterion) {
    let buf = data();
    let dir = tempfile::tempdir().expect("temp dir");
    let ranges: Vec<std::ops::Range<u64>> = (0..SIZE as u64 / CHUNK)
        .map(|i| i * CHUNK..(i + 1) * CHUNK)
        .collect();
    let order = shuffled(ranges.len());
    let mut g = c.benchmark_group("write");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    let (m_partial, m_final) = (dir.path().join("m.partial"), dir.path().join("m"));
    g.bench_function("mmap-chunks", |b| {
        b.iter_batched(
            || remove(&m_final),
            |()| {
                let blob = BlobFile::create(&m_partial, &m_final, SIZE as u64).expect("create");
                let mut spans: Vec<Option<SpanWriter>> = cut(&blob).into_iter().map(Some).collect();
                for &i in &order {
                    let mut w = spans[i].take().expect("span");
                    let r = w.range();
                    for frame in buf[r.start as usize..r.end as usize].chunks(FRAME) {
                        w.append(frame).expect("append");
                    }
                }
                blob.persist().expect("fsync + rename");
            },
            BatchSize::PerIteration,
        )
    });
    let (p_partial, p_final) = (dir.path().join("p.partial"), dir.path().join("p"));
    g.bench_function("pwrite-chunks", |b| {
        b.iter_batched(
            || remove(&p_final),
            |()| {
                let f = std::fs::File::create(&p_partial).expect("create");
                rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, SIZE as u64)
                    .expect("fallocate");
                for &i in &order {
                    let r = &ranges[i];
                    let mut off = r.start;
                    for frame in buf[r.start as usize..r.end as usize].chunks(FRAME) {
                        f.write_all_at(frame, off).expect("pwrite");
                        off += frame.len() as u64;
                    }
                }
                f.sync_all().expect("fsync");
                drop(f);
                std::fs::rename(&p_partial, &p_final).expect("rename");
                std::fs::File::open(dir.path())
                    .and_then(|d| d.sync_all())
                    .expect("fsync dir");
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Deletes `path` if it exists (the previous iteration's final file).
fn remove(path: &std::path::Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", path.display()),
    }
}

fn in_order_hasher(c: &mut Criterion) {
    let buf = data();
    let dir = tempfile::tempdir().expect("temp dir");
    let order = shuffled(SIZE / CHUNK as usize);
    let mut g = c.benchmark_group("in-order-hasher");
    g.sample_size(10);
    for blobs in [1usize, 2, 4] {
        let pool = Arc::new(HashPool::new(0).expect("pool"));
        g.throughput(Throughput::Bytes((SIZE * blobs) as u64));
        g.bench_with_input(
            BenchmarkId::new("write+hash, blobs", blobs),
            &blobs,
            |b, &blobs| {
                b.iter(|| {
                    let files: Vec<_> = (0..blobs)
                        .map(|k| {
                            let blob = BlobFile::create(
                                &dir.path().join(format!("{k}.partial")),
                                &dir.path().join(format!("{k}")),
                                SIZE as u64,
                            )
                            .expect("create");
                            let (h, rx) = InOrderHasher::new(blob.clone(), pool.clone());
                            let spans: Vec<Option<SpanWriter>> =
                                cut(&blob).into_iter().map(Some).collect();
                            (std::cell::RefCell::new(spans), h, rx)
                        })
                        .collect();
                    // Interleave the blobs' chunks, out of order, as concurrent downloads would.
                    for &i in &order {
                        for (spans, h, _) in &files {
                            let mut w = spans.borrow_mut()[i].take().expect("span");
                            let r = w.range();
                            for frame in buf[r.start as usize..r.end as usize].chunks(FRAME) {
                                w.append(frame).expect("append");
                            }
                            h.poke();
                        }
                    }
                    for (_, _, rx) in files {
                        futures::executor::block_on(rx)
                            .expect("hasher")
                            .expect("digest");
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, writers, in_order_hasher);
criterion_main!(benches);
