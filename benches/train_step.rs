//! One full training step (forward, loss, backward, fused sparse and dense updates) of the
//! Kaggle-preset DLRM on synthetic batches: `train_step/kaggle-<optimizer>-t<threads>/b<batch>`
//! (f32), `train_step/kaggle-bf16-t<threads>/b2048` (SGD in BF16 mixed precision),
//! and beside it DCN (6 rank-one cross layers, deep 512-256) and the factorization machine on
//! the same tables and batches: `train_step/<dcn|fm>-<optimizer>-t<threads>/b2048`.
//! Beside them, the inference-only forward pass of the same Kaggle model (no gradient buffers):
//! `inference/kaggle-t<threads>/b<batch>`. Throughput is in samples, so criterion's elem/s is
//! samples/s. Each DLRM benchmark also prints its dense compute rate in GFLOP/s and its
//! fraction of the FMA peak of the same threads (`cargo bench --bench roofline`'s `fma-peak`
//! loop, measured right after).
//!
//! The tables are the real Kaggle sizes (2 GiB, anonymous huge-page maps); batches rotate
//! through pre-generated Zipf-distributed ids so that lookups stay cold.

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use dlrm::config::Preset;
use dlrm::data::Batch;
use dlrm::data::synthetic::{Generation, Split, SyntheticConfig, SyntheticData};
use dlrm::kernels::cross::CrossKind;
use dlrm::model::PhaseTimer;
use dlrm::model::architecture::Architecture;
use dlrm::model::dcn::{Dcn, DcnConfig};
use dlrm::model::dlrm::Dlrm;
use dlrm::model::fm::{Fm, FmConfig};
use dlrm::model::{Model, ModelKind, OptimizerKind, Precision, Task};
use dlrm::storage::StorageKind;
use dlrm::train::measure_fma_peak;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Seconds of the FMA-peak probe after each benchmark.
const FMA_PROBE_SECONDS: f64 = 0.2;

/// Distinct batches cycled through (their ids far exceed the caches).
const BATCHES: usize = 8;

fn kaggle_architecture() -> Architecture {
    Preset::Kaggle.values().architecture()
}

/// `BATCHES` Zipf-distributed batches of `batch_size` samples for `arch`.
fn zipf_batches(arch: &Architecture, batch_size: usize) -> Vec<Batch> {
    let data = SyntheticData::new(SyntheticConfig {
        num_dense: arch.num_dense(),
        table_sizes: arch.table_sizes.clone(),
        generation: Generation::Zipf,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 1,
        fixed_bag_size: true,
        seed: 1,
    });
    (0..BATCHES)
        .map(|i| {
            let mut b = Batch::default();
            data.fill_batch(Split::Train, (i * batch_size) as u64, batch_size, &mut b);
            b
        })
        .collect()
}

/// 1 and all physical cores.
fn thread_counts() -> Vec<usize> {
    let max_threads = num_cpus::get_physical().max(1);
    let mut counts = vec![1];
    if max_threads > 1 {
        counts.push(max_threads);
    }
    counts
}

fn configure(group: &mut BenchmarkGroup<WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
}

fn bench_train_step(c: &mut Criterion) {
    let arch = kaggle_architecture();
    let mut group = c.benchmark_group("train_step");
    configure(&mut group);
    let thread_counts = thread_counts();
    let batches = |batch_size: usize| zipf_batches(&arch, batch_size);
    for opt in [OptimizerKind::Sgd, OptimizerKind::Adagrad] {
        let mut model = Dlrm::new(arch.clone(), opt, &StorageKind::Anon, 1).expect("kaggle model");
        for batch_size in [128usize, 2048] {
            let variant = format!("kaggle-{}", opt_name(opt));
            let b = batches(batch_size);
            bench_steps(&mut group, &mut model, &variant, &b, &thread_counts);
        }
    }
    // BF16 mixed precision (bf16 MLP operands, split-SGD tables) beside kaggle-sgd.
    let mut bf16 =
        Dlrm::new(arch.clone(), OptimizerKind::Sgd, &StorageKind::Anon, 1).expect("kaggle model");
    bf16.set_precision(Precision::Bf16)
        .expect("anonymous tables split");
    bench_steps(
        &mut group,
        &mut bf16,
        "kaggle-bf16",
        &batches(2048),
        &thread_counts,
    );
    drop(bf16);
    // The other models on the same tables and batches, at the batch size of the comparison.
    let b = batches(2048);
    for kind in [ModelKind::Dcn, ModelKind::Fm] {
        let mut model: Box<dyn Model> = match kind {
            ModelKind::Dcn => Box::new(
                Dcn::new(
                    DcnConfig {
                        kind: CrossKind::RankOne,
                        embedding_dim: arch.embedding_dim,
                        table_sizes: arch.table_sizes.clone(),
                        num_dense: arch.num_dense(),
                        cross_layers: 6,
                        deep: vec![512, 256],
                    },
                    OptimizerKind::Sgd,
                    &StorageKind::Anon,
                    1,
                )
                .expect("kaggle DCN"),
            ),
            _ => Box::new(
                Fm::new(
                    FmConfig {
                        model: ModelKind::Fm,
                        task: Task::Classification,
                        factors: arch.embedding_dim,
                        table_sizes: arch.table_sizes.clone(),
                        num_dense: arch.num_dense(),
                        weight_decay: 0.0,
                        initial_bias: 0.0,
                    },
                    OptimizerKind::Sgd,
                    &StorageKind::Anon,
                    1,
                )
                .expect("kaggle FM"),
            ),
        };
        let variant = format!("{}-{}", kind.name(), opt_name(OptimizerKind::Sgd));
        bench_steps(&mut group, model.as_mut(), &variant, &b, &thread_counts);
    }
    group.finish();
}

fn opt_name(opt: OptimizerKind) -> &'static str {
    match opt {
        OptimizerKind::Sgd => "sgd",
        OptimizerKind::Adagrad => "adagrad",
        OptimizerKind::RowwiseAdagrad => "rowwise-adagrad",
    }
}

/// `train_step/<variant>-t<threads>/b<batch>` for each thread count, cycling through `batches`.
/// For a model that counts its FLOPs, each benchmark that ran also prints its dense compute
/// rate (over every step criterion timed, warm-up included) and that rate's fraction of the
/// FMA peak measured right after on the same threads.
fn bench_steps(
    group: &mut BenchmarkGroup<WallTime>,
    model: &mut dyn Model,
    variant: &str,
    batches: &[Batch],
    thread_counts: &[usize],
) {
    let batch_size = batches[0].size();
    model.reserve(batch_size);
    group.throughput(Throughput::Elements(batch_size as u64));
    for &threads in thread_counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let name = format!("{variant}-t{threads}");
        let id = BenchmarkId::new(&name, format!("b{batch_size}"));
        let mut i = 0;
        let (mut steps, mut seconds) = (0u64, 0.0f64);
        group.bench_function(id, |b| {
            pool.install(|| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    for _ in 0..iters {
                        i = (i + 1) % batches.len();
                        let view = batches[i].view();
                        let step = model.train_step(&view, 0.01, &mut PhaseTimer::default());
                        black_box(step.expect("valid batch"));
                    }
                    let elapsed = started.elapsed();
                    steps += iters;
                    seconds += elapsed.as_secs_f64();
                    elapsed
                })
            })
        });
        if let (Some(flops), true) = (model.flops_per_sample(), steps > 0) {
            let gflops = flops * (steps as usize * batch_size) as f64 / seconds * 1e-9;
            let peak = pool.install(|| measure_fma_peak(FMA_PROBE_SECONDS));
            println!(
                "train_step/{name}/b{batch_size}: dense compute {gflops:.1} GFLOP/s, {:.1}% of the {peak:.1} GFLOP/s FMA peak of {threads} threads",
                100.0 * gflops / peak
            );
        }
    }
}

/// The forward pass alone (`Model::predict`), sized by `reserve_inference`.
fn bench_inference(c: &mut Criterion) {
    let arch = kaggle_architecture();
    let mut group = c.benchmark_group("inference");
    configure(&mut group);
    let mut model =
        Dlrm::new(arch.clone(), OptimizerKind::Sgd, &StorageKind::Anon, 1).expect("kaggle model");
    let mut probs = Vec::new();
    for batch_size in [128usize, 2048] {
        let batches = zipf_batches(&arch, batch_size);
        model.reserve_inference(batch_size);
        group.throughput(Throughput::Elements(batch_size as u64));
        for threads in thread_counts() {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let id = BenchmarkId::new(format!("kaggle-t{threads}"), format!("b{batch_size}"));
            let mut i = 0;
            group.bench_function(id, |b| {
                pool.install(|| {
                    b.iter(|| {
                        i = (i + 1) % batches.len();
                        model
                            .predict(&batches[i].view(), &mut probs)
                            .expect("valid batch")
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_train_step, bench_inference);
criterion_main!(benches);
