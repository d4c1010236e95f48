//! Training end to end through the library: the model learns teacher data, a seed fixes the
//! run bit for bit, and a training step allocates nothing once warm.

mod common;

use common::alloc::{CountingAllocator, allocations};
use dlrm::config::Preset;
use dlrm::data::Batch;
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::model::OptimizerKind;
use dlrm::model::PhaseTimer;
use dlrm::model::dlrm::Dlrm;
use dlrm::storage::StorageKind;
use dlrm::train::{DataSource, LrSchedule, Quiet, TrainOptions, TrainReport, train};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn tiny(seed: u64, optimizer: OptimizerKind) -> (Dlrm, SyntheticSource) {
    let arch = Preset::Tiny.values().architecture();
    let data = SyntheticData::new(SyntheticConfig {
        num_dense: arch.num_dense(),
        table_sizes: arch.table_sizes.clone(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 2,
        fixed_bag_size: true,
        seed,
    });
    let source = SyntheticSource::new(data, 60_000, 8_000);
    let model = Dlrm::new(arch, optimizer, &StorageKind::Anon, seed).unwrap();
    (model, source)
}

fn options(lr: f32, nepochs: usize) -> TrainOptions {
    TrainOptions {
        nepochs,
        seed: 7,
        ..TrainOptions::new(128, LrSchedule::constant(lr))
    }
}

fn run(
    threads: usize,
    seed: u64,
    optimizer: OptimizerKind,
    lr: f32,
    nepochs: usize,
) -> (TrainReport, Dlrm) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let (mut model, source) = tiny(seed, optimizer);
        let report = train(
            &mut model,
            &source,
            &options(lr, nepochs),
            threads,
            &mut Quiet,
        )
        .unwrap();
        (report, model)
    })
}

#[test]
fn learns_teacher_data_with_sgd_and_adagrad() {
    for (opt, lr) in [
        (OptimizerKind::Sgd, 0.5),
        (OptimizerKind::RowwiseAdagrad, 0.05),
    ] {
        let (r, _) = run(2, 3, opt, lr, 2);
        let teacher = r.teacher_auc.expect("teacher data reports its AUC");
        assert!(
            r.test_auc > 0.70 && r.test_auc > teacher - 0.12,
            "{opt:?}: test AUC {} (teacher {teacher})",
            r.test_auc
        );
        assert!(
            r.test_ne < 0.95,
            "{opt:?}: normalized entropy {}",
            r.test_ne
        );
        assert_eq!(r.evals.len(), 1);
    }
}

#[test]
fn same_seed_same_threads_is_bit_identical() {
    let digest = |m: &Dlrm| -> Vec<u32> {
        let mut v: Vec<u32> = Vec::new();
        for l in m.bottom.layers.iter().chain(&m.top.layers) {
            v.extend(l.weight.iter().chain(&l.bias).map(|x| x.to_bits()));
        }
        for t in &m.embeddings.tables {
            v.extend(t.weights().iter().map(|x| x.to_bits()));
        }
        v
    };
    let (a, ma) = run(2, 11, OptimizerKind::Adagrad, 0.05, 1);
    let (b, mb) = run(2, 11, OptimizerKind::Adagrad, 0.05, 1);
    assert_eq!(digest(&ma), digest(&mb));
    assert_eq!(a.test_auc.to_bits(), b.test_auc.to_bits());
    assert_eq!(a.train_loss.to_bits(), b.train_loss.to_bits());
    let (_, mc) = run(2, 12, OptimizerKind::Adagrad, 0.05, 1);
    assert_ne!(digest(&ma), digest(&mc), "another seed gives another model");
}

#[test]
fn a_training_step_allocates_nothing_once_warm() {
    for opt in [
        OptimizerKind::Sgd,
        OptimizerKind::Adagrad,
        OptimizerKind::RowwiseAdagrad,
    ] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            let (mut model, source) = tiny(5, opt);
            model.reserve(256);
            let mut batch = Batch::default();
            // Counts only the steps: the data buffers may still grow to a larger batch.
            let mut in_steps = 0;
            for i in 0..13 {
                source.fill_train(i * 256, 256, &mut batch).unwrap();
                let before = allocations();
                model
                    .train_step(&batch.view(), 0.05, &mut PhaseTimer::default())
                    .unwrap();
                if i >= 3 {
                    in_steps += allocations() - before;
                }
            }
            assert_eq!(in_steps, 0, "{opt:?}: allocations in 10 warm steps");
        });
    }
}
