//! The element-wise kernels of a training step: `activation/<variant>-t<threads>/<shape>`.
//!
//! - `bce-with-logits`, `sigmoid`: the loss (with its gradient) and the click probabilities, on
//!   a batch of logits (`n2048`) and on a long vector (`n1Mi`); serial kernels, one thread.
//! - `bias-grad-relu`: the bias gradient of a Linear + ReLU layer (column sums of
//!   dY ⊙ [Y > 0]) at batch 2048, `<batch>x<out>` for the Kaggle MLPs' widest layers.
//! - `sgd-update`, `adagrad-update`: the dense optimizer updates of one layer's weights,
//!   `<out>x<in>` (the Kaggle top MLP's 367 -> 512 layer, the largest, and 512 -> 256).
//!
//! Throughput is the bytes each kernel reads plus the bytes it writes, so criterion's GB/s
//! compares directly with the streaming bandwidth of `roofline/stream-*`.
//! `DLRM_BENCH_SWEEP=1` adds 64 Mi-element dense updates (out of every cache: DRAM-bound).

use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use dlrm::kernels::activation::{bce_with_logits, sigmoid};
use dlrm::kernels::gemm::{MatRef, bias_grad};
use dlrm::kernels::optim::{adagrad_update, sgd_update};
use dlrm::kernels::parallel::Par;
use std::hint::black_box;
use std::time::Duration;

fn values(len: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            (h as f32 / (1u32 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// Runs `f` as `activation/<variant>-t<threads>/<shape>` on a pool of `threads`, counting
/// `bytes` per call.
fn run(
    group: &mut BenchmarkGroup<WallTime>,
    variant: &str,
    threads: usize,
    shape: &str,
    bytes: usize,
    mut f: impl FnMut() + Send,
) {
    let pool = pool(threads);
    group.throughput(Throughput::BytesDecimal(bytes as u64));
    let id = BenchmarkId::new(format!("{variant}-t{threads}"), shape);
    group.bench_function(id, |b| pool.install(|| b.iter(&mut f)));
}

fn bench_activation(c: &mut Criterion) {
    let sweep = std::env::var_os("DLRM_BENCH_SWEEP").is_some();
    let mut group = c.benchmark_group("activation");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));

    for (n, shape) in [(2048, "n2048"), (1 << 20, "n1Mi")] {
        let logits = values(n, 1, 20.0);
        let labels: Vec<f32> = (0..n).map(|i| (i % 3 == 0) as u8 as f32).collect();
        let mut probs = vec![0.0f32; n];
        let mut grad = vec![0.0f32; n];
        let scale = 1.0 / n as f32;
        run(&mut group, "bce-with-logits", 1, shape, 16 * n, || {
            black_box(bce_with_logits(
                &logits, &labels, &mut probs, &mut grad, scale,
            ));
        });
        run(&mut group, "sigmoid", 1, shape, 8 * n, || {
            sigmoid(&logits, &mut probs)
        });
    }

    for (m, n) in [(2048, 512), (2048, 256)] {
        let dy = values(m * n, 2, 1.0);
        let y = values(m * n, 3, 1.0);
        let mut db = vec![0.0f32; n];
        for t in [1, 2] {
            run(
                &mut group,
                "bias-grad-relu",
                t,
                &format!("{m}x{n}"),
                (2 * m * n + n) * 4,
                || {
                    let (dy, y) = (MatRef::new(&dy, m, n), MatRef::new(&y, m, n));
                    bias_grad(dy, Some(y), &mut db, false, Par::Rayon)
                },
            );
        }
    }

    let mut shapes = vec![
        (512, 367, "512x367".to_string()),
        (256, 512, "256x512".into()),
    ];
    if sweep {
        shapes.push((1 << 26, 1, "n64Mi".into()));
    }
    for (out, inp, shape) in shapes {
        let len = out * inp;
        let mut param = values(len, 4, 0.1);
        let grad = values(len, 5, 1e-3);
        let mut state = vec![0.0f32; len];
        for t in [1, 2] {
            run(&mut group, "sgd-update", t, &shape, 12 * len, || {
                sgd_update(&mut param, &grad, 1e-6, Par::Rayon)
            });
            run(&mut group, "adagrad-update", t, &shape, 20 * len, || {
                adagrad_update(&mut param, &grad, &mut state, 1e-6, 1e-8, Par::Rayon)
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_activation);
criterion_main!(benches);
