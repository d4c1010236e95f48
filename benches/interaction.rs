//! The fused dot interaction alone: `interaction/dot-<fwd|bwd>-t<threads>/F<f>xd<d>-b<batch>`
//! (F = 27 features as in the Kaggle model). Throughput is 2·F²·d/2 FLOPs per sample for the
//! forward (the lower triangle of the Gram matrix) and twice that for the backward, so elem/s
//! reads as FLOP/s.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dlrm_kernels::interaction::{dot_interaction_backward, dot_interaction_forward, num_pairs};
use dlrm_kernels::mat::{MatMut, MatRef};
use dlrm_kernels::parallel::Par;
use std::time::Duration;

fn bench_interaction(c: &mut Criterion) {
    let mut group = c.benchmark_group("interaction");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let (f, batch) = (27usize, 2048usize);
    for d in [16usize, 128] {
        let stride = f * d;
        let features: Vec<f32> = (0..batch * stride)
            .map(|i| ((i % 17) as f32 - 8.0) * 0.05)
            .collect();
        let width = d + num_pairs(f, false);
        let mut out = vec![0.0f32; batch * width];
        let grad_out: Vec<f32> = (0..batch * width)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
            .collect();
        let mut grad_features = vec![0.0f32; batch * stride];
        let pair_flops = (2 * num_pairs(f, false) * d * batch) as u64;
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let shape = format!("F{f}xd{d}-b{batch}");
            group.throughput(Throughput::Elements(pair_flops));
            group.bench_function(
                BenchmarkId::new(format!("dot-fwd-t{threads}"), &shape),
                |b| {
                    pool.install(|| {
                        b.iter(|| {
                            dot_interaction_forward(
                                MatRef::with_row_stride(&features, batch, f * d, stride),
                                f,
                                false,
                                MatMut::new(&mut out, batch, width),
                                Par::Rayon,
                            )
                        })
                    })
                },
            );
            group.throughput(Throughput::Elements(2 * pair_flops));
            group.bench_function(
                BenchmarkId::new(format!("dot-bwd-t{threads}"), &shape),
                |b| {
                    pool.install(|| {
                        b.iter(|| {
                            dot_interaction_backward(
                                MatRef::with_row_stride(&features, batch, f * d, stride),
                                f,
                                false,
                                MatRef::new(&grad_out, batch, width),
                                MatMut::with_row_stride(&mut grad_features, batch, f * d, stride),
                                Par::Rayon,
                            )
                        })
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_interaction);
criterion_main!(benches);
