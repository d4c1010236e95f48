//! One full training step (forward, loss, backward, fused sparse and dense updates) of the
//! Kaggle-preset DLRM on synthetic batches: `train_step/kaggle-<optimizer>-t<threads>/b<batch>`.
//! Throughput is in samples, so criterion's elem/s is samples/s.
//!
//! The tables are the real Kaggle sizes (2 GiB, anonymous huge-page maps); batches rotate
//! through pre-generated Zipf-distributed ids so that lookups stay cold.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dlrm::config::{Architecture, InteractionOp, Preset, join};
use dlrm::data::Batch;
use dlrm::data::synthetic::{Generation, Split, SyntheticConfig, SyntheticData};
use dlrm::model::OptimizerKind;
use dlrm::model::dlrm::Dlrm;
use dlrm::model::embedding_tables::StorageKind;
use std::time::Duration;

/// Distinct batches cycled through (their ids far exceed the caches).
const BATCHES: usize = 8;

fn bench_train_step(c: &mut Criterion) {
    let p = Preset::Kaggle.values();
    let arch = Architecture::from_flags(
        p.embedding_dim,
        &join(&p.table_sizes),
        p.bottom,
        p.top,
        InteractionOp::Dot,
        false,
    )
    .expect("kaggle preset");
    let data = SyntheticData::new(SyntheticConfig {
        num_dense: arch.num_dense(),
        table_sizes: arch.table_sizes.clone(),
        generation: Generation::Zipf,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 1,
        fixed_bag_size: true,
        seed: 1,
    });
    let mut group = c.benchmark_group("train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let max_threads = num_cpus::get_physical().max(1);
    let mut thread_counts = vec![1];
    if max_threads > 1 {
        thread_counts.push(max_threads);
    }
    for opt in [OptimizerKind::Sgd, OptimizerKind::Adagrad] {
        let mut model = Dlrm::new(arch.clone(), opt, &StorageKind::Anon, 1).expect("kaggle model");
        for batch_size in [128usize, 2048] {
            let batches: Vec<Batch> = (0..BATCHES)
                .map(|i| {
                    let mut b = Batch::default();
                    data.fill_batch(Split::Train, (i * batch_size) as u64, batch_size, &mut b);
                    b
                })
                .collect();
            model.reserve(batch_size);
            group.throughput(Throughput::Elements(batch_size as u64));
            let name = match opt {
                OptimizerKind::Sgd => "sgd",
                OptimizerKind::Adagrad => "adagrad",
                OptimizerKind::RowwiseAdagrad => "rowwise-adagrad",
            };
            for &threads in &thread_counts {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let id = BenchmarkId::new(
                    format!("kaggle-{name}-t{threads}"),
                    format!("b{batch_size}"),
                );
                let mut i = 0;
                group.bench_function(id, |b| {
                    pool.install(|| {
                        b.iter(|| {
                            i = (i + 1) % BATCHES;
                            model.train_step(&batches[i], 0.01).expect("valid batch")
                        })
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_train_step);
criterion_main!(benches);
