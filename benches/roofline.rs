//! The machine's limits, to read every kernel figure against.
//!
//! `roofline/fma-peak-t<threads>/regs`: vector FMAs on registers only; elem/s reads as FLOP/s.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dlrm_kernels::roofline::{fma_peak, fma_peak_flops};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;

fn bench_fma_peak(c: &mut Criterion) {
    let mut group = c.benchmark_group("roofline");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let iters = 1 << 20;
    let max_threads = num_cpus::get();
    let mut counts = vec![1];
    if max_threads > 1 {
        counts.push(max_threads);
    }
    for threads in counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
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
    group.finish();
}

criterion_group!(benches, bench_fma_peak);
criterion_main!(benches);
