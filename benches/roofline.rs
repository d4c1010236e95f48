//! The machine's limits, to read every kernel figure against, on 1 thread and on all logical
//! CPUs (`-t<threads>`):
//!
//! - `roofline/fma-peak-t<threads>/regs`: vector FMAs on registers only; elem/s reads as
//!   FLOP/s.
//! - `roofline/stream-copy-t<threads>/2x512MiB`, `roofline/stream-triad-t<threads>/3x512MiB`:
//!   STREAM's copy (`a = b`) and triad (`a = b + s c`) over arrays of 512 MiB each (1 and
//!   1.5 GiB in all, far past the caches); bytes as STREAM counts them (each array read or
//!   written once), so criterion's GB/s is STREAM's figure.
//! - `roofline/gather-lines-t<threads>/1GiB-hugepage` and `/1GiB-4kpage`: random 64-byte lines
//!   of a 1 GiB buffer (a batch of 2^20 lines per iteration, rotating through 2^24 pre-drawn
//!   line numbers), each requested a few lines ahead as the embedding kernels request their
//!   rows. The buffer is an embedding table's anonymous map (transparent huge pages) or a plain
//!   heap allocation (4 KiB pages when THP is in `madvise` mode): the ceiling of embedding
//!   lookups of 64-byte rows (d = 16), and how much of it the TLB takes.

use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main, measurement::WallTime,
};
use dlrm::kernels::parallel::Par;
use dlrm::kernels::roofline::{
    LINE_FLOATS, fma_peak, fma_peak_flops, gather_lines, stream_copy, stream_triad,
};
use dlrm::model::embedding::EmbeddingTable;
use dlrm::rng::SplitMix64;
use dlrm::storage::StorageKind;
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;

/// Floats in each 512 MiB streaming array.
const STREAM_FLOATS: usize = 1 << 27;
/// Lines of the 1 GiB gather buffer.
const GATHER_LINES: usize = 1 << 24;
/// Lines read per gather iteration (64 MiB).
const LINES_PER_ITER: usize = 1 << 20;

/// 1 and all logical CPUs, with their pools.
fn pools() -> Vec<(usize, rayon::ThreadPool)> {
    let max_threads = num_cpus::get();
    let mut counts = vec![1];
    if max_threads > 1 {
        counts.push(max_threads);
    }
    counts
        .into_iter()
        .map(|t| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .expect("thread pool");
            (t, pool)
        })
        .collect()
}

fn bench_fma_peak(group: &mut BenchmarkGroup<WallTime>, pools: &[(usize, rayon::ThreadPool)]) {
    let iters = 1 << 20;
    for (threads, pool) in pools {
        let threads = *threads;
        group.throughput(Throughput::Elements(
            (fma_peak_flops(iters) * threads) as u64,
        ));
        group.bench_function(
            BenchmarkId::new(format!("fma-peak-t{threads}"), "regs"),
            |b| {
                pool.install(|| {
                    b.iter(|| {
                        (0..threads)
                            .into_par_iter()
                            .map(|_| fma_peak(iters, black_box(0.999_999), black_box(1e-7)))
                            .sum::<f32>()
                    })
                })
            },
        );
    }
}

fn bench_stream(group: &mut BenchmarkGroup<WallTime>, pools: &[(usize, rayon::ThreadPool)]) {
    let n = STREAM_FLOATS;
    {
        let src = vec![1.5f32; n];
        let mut dst = vec![0.5f32; n];
        group.throughput(Throughput::BytesDecimal((2 * 4 * n) as u64));
        for (t, pool) in pools {
            let id = BenchmarkId::new(format!("stream-copy-t{t}"), "2x512MiB");
            group.bench_function(id, |b| {
                pool.install(|| b.iter(|| stream_copy(&src, &mut dst, Par::Rayon)))
            });
        }
    }
    let (mut a, b_, c_) = (vec![0.5f32; n], vec![1.5f32; n], vec![2.5f32; n]);
    group.throughput(Throughput::BytesDecimal((3 * 4 * n) as u64));
    for (t, pool) in pools {
        let id = BenchmarkId::new(format!("stream-triad-t{t}"), "3x512MiB");
        group.bench_function(id, |b| {
            pool.install(|| b.iter(|| stream_triad(&mut a, &b_, &c_, black_box(0.25), Par::Rayon)))
        });
    }
}

fn bench_gather(group: &mut BenchmarkGroup<WallTime>, pools: &[(usize, rayon::ThreadPool)]) {
    let mut rng = SplitMix64::new(5);
    let lines: Vec<u32> = (0..GATHER_LINES)
        .map(|_| rng.below(GATHER_LINES as u64) as u32)
        .collect();
    let huge = EmbeddingTable::create(0, GATHER_LINES, LINE_FLOATS, 3, &StorageKind::Anon)
        .expect("1 GiB anonymous map");
    // A heap buffer, started on a 64-byte boundary so that every line is one cache line.
    let floats = GATHER_LINES * LINE_FLOATS;
    let heap = vec![0.5f32; floats + LINE_FLOATS];
    let start = heap.as_ptr().align_offset(64);
    let buffers = [
        ("1GiB-hugepage", huge.weights()),
        ("1GiB-4kpage", &heap[start..start + floats]),
    ];
    group.throughput(Throughput::BytesDecimal((LINES_PER_ITER * 64) as u64));
    for (shape, buf) in buffers {
        for (t, pool) in pools {
            let mut next = 0;
            let id = BenchmarkId::new(format!("gather-lines-t{t}"), shape);
            group.bench_function(id, |b| {
                pool.install(|| {
                    b.iter(|| {
                        next = (next + LINES_PER_ITER) % GATHER_LINES;
                        gather_lines(buf, &lines[next..next + LINES_PER_ITER], Par::Rayon)
                    })
                })
            });
        }
    }
}

fn bench_roofline(c: &mut Criterion) {
    let pools = pools();
    let mut group = c.benchmark_group("roofline");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    bench_fma_peak(&mut group, &pools);
    // Tens of milliseconds per iteration and more: the same iteration count in every sample.
    group.sampling_mode(SamplingMode::Flat);
    bench_gather(&mut group, &pools);
    bench_stream(&mut group, &pools);
    group.finish();
}

criterion_group!(benches, bench_roofline);
criterion_main!(benches);
