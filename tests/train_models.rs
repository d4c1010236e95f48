//! DCN, DCN-v2, the factorization machine and matrix factorization trained end to end through
//! the library: each learns teacher data (or low-rank ratings), MF reaches RMSE < 1.0 on the
//! u1 split of MovieLens 100K when DLRM_MOVIELENS names its folder, training gives the same
//! bits on any thread count, and a training step of every model allocates nothing once warm.

mod common;

use common::alloc::{CountingAllocator, allocations};
use dlrm::config::Preset;
use dlrm::data::Batch;
use dlrm::data::movielens::{MovieLensSource, Ratings};
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::kernels::cross::CrossKind;
use dlrm::kernels::parallel::Par;
use dlrm::model::PhaseTimer;
use dlrm::model::dcn::{Dcn, DcnConfig};
use dlrm::model::fm::{Fm, FmConfig};
use dlrm::model::{Model, ModelKind, OptimizerKind, Task, mf};
use dlrm::rng::SplitMix64;
use dlrm::storage::StorageKind;
use dlrm::train::{DataSource, LrSchedule, Quiet, TrainOptions, TrainReport, train};
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const D: usize = 16;

fn teacher(seed: u64) -> SyntheticSource {
    let p = Preset::Tiny.values();
    let data = SyntheticData::new(SyntheticConfig {
        num_dense: 13,
        table_sizes: p.table_sizes,
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 2,
        fixed_bag_size: true,
        seed,
    });
    SyntheticSource::new(data, 60_000, 8_000)
}

fn model(kind: ModelKind, opt: OptimizerKind, seed: u64) -> Box<dyn Model> {
    let tables = Preset::Tiny.values().table_sizes;
    match kind {
        ModelKind::Dcn | ModelKind::DcnV2 => {
            let cfg = DcnConfig {
                kind: if kind == ModelKind::Dcn {
                    CrossKind::RankOne
                } else {
                    CrossKind::FullRank
                },
                embedding_dim: D,
                table_sizes: tables,
                num_dense: 13,
                cross_layers: 3,
                deep: vec![64, 32],
            };
            Box::new(Dcn::new(cfg, opt, &StorageKind::Anon, seed).unwrap())
        }
        ModelKind::Fm => {
            let cfg = FmConfig {
                model: ModelKind::Fm,
                task: Task::Classification,
                factors: D,
                table_sizes: tables,
                num_dense: 13,
                weight_decay: 0.0,
                initial_bias: 0.0,
            };
            Box::new(Fm::new(cfg, opt, &StorageKind::Anon, seed).unwrap())
        }
        other => panic!("no teacher-data model {other:?}"),
    }
}

fn options(batch_size: usize, lr: f32, nepochs: usize) -> TrainOptions {
    TrainOptions {
        nepochs,
        seed: 7,
        test_batch_size: 1024,
        ..TrainOptions::new(batch_size, LrSchedule::constant(lr))
    }
}

fn on_two_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(f)
}

fn run(m: &mut dyn Model, data: &dyn DataSource, opts: &TrainOptions) -> TrainReport {
    on_two_threads(|| train(m, data, opts, 2, &mut Quiet).unwrap())
}

#[test]
fn every_model_learns_teacher_data() {
    let data = teacher(3);
    let teacher_auc = data.ceiling_auc().unwrap();
    for kind in [ModelKind::Dcn, ModelKind::DcnV2, ModelKind::Fm] {
        for (opt, lr) in [(OptimizerKind::Sgd, 0.2), (OptimizerKind::Adagrad, 0.02)] {
            let mut m = model(kind, opt, 3);
            let r = run(m.as_mut(), &data, &options(128, lr, 2));
            eprintln!(
                "{kind:?} {opt:?}: AUC {:.4}, accuracy {:.4}, NE {:.4} (teacher {teacher_auc:.4})",
                r.test_auc, r.test_accuracy, r.test_ne
            );
            assert_eq!(r.model, kind.name());
            assert!(
                r.test_auc > 0.70 && r.test_auc > teacher_auc - 0.12,
                "{kind:?} {opt:?}: test AUC {} (teacher {teacher_auc})",
                r.test_auc
            );
            assert!(r.test_ne < 0.95, "{kind:?} {opt:?}: NE {}", r.test_ne);
            assert!(r.test_rmse.is_none());
        }
    }
}

/// Ratings from a rank-3 model with user and item biases, plus noise (standard deviation 0.3):
/// MF learns them to well below the error of predicting the mean rating.
#[test]
fn mf_learns_low_rank_ratings() {
    let (users, items, rank) = (300, 200, 3);
    let mut rng = SplitMix64::new(11);
    let mut vectors =
        |n: usize| -> Vec<f32> { (0..n * rank).map(|_| rng.normal() * 0.6).collect() };
    let (u, v) = (vectors(users), vectors(items));
    let mut rng = SplitMix64::new(12);
    let bu: Vec<f32> = (0..users).map(|_| rng.normal() * 0.4).collect();
    let bi: Vec<f32> = (0..items).map(|_| rng.normal() * 0.4).collect();
    let mut ratings = |n: usize| {
        let mut r = Ratings::default();
        for _ in 0..n {
            let (a, b) = (
                rng.below(users as u64) as usize,
                rng.below(items as u64) as usize,
            );
            let dot: f32 = (0..rank).map(|f| u[a * rank + f] * v[b * rank + f]).sum();
            r.users.push(a as u32);
            r.items.push(b as u32);
            r.ratings
                .push(3.5 + bu[a] + bi[b] + dot + 0.3 * rng.normal());
        }
        r
    };
    let (train_r, test_r) = (ratings(40_000), ratings(5_000));
    let data = MovieLensSource::new(&train_r, &test_r, 1);
    let mean = data.mean_rating;
    let spread = (test_r
        .ratings
        .iter()
        .map(|r| (r - mean).powi(2))
        .sum::<f32>()
        / test_r.len() as f32)
        .sqrt();
    let cfg = mf::MfConfig {
        users: data.users,
        items: data.items,
        factors: 8,
        global_mean: mean,
        weight_decay: 0.0005,
    };
    let mut m = mf::new(cfg, OptimizerKind::Adagrad, &StorageKind::Anon, 1).unwrap();
    let r = run(&mut m, &data, &options(256, 0.05, 20));
    let rmse = r.test_rmse.expect("regression reports RMSE");
    eprintln!("MF on rank-3 ratings: test RMSE {rmse:.4} (predicting the mean: {spread:.4})");
    assert_eq!(r.model, "mf");
    assert!(r.test_auc.is_nan() && r.train_rmse.is_some());
    assert!(rmse < 0.5 * spread as f64, "RMSE {rmse}, spread {spread}");
}

/// The u1 split of MovieLens 100K (80 000 training and 20 000 test ratings of 943 users and
/// 1682 movies): RMSE below 1.0 (the mean rating alone gives about 1.15).
#[test]
#[ignore = "needs the licensed MovieLens 100K: DLRM_MOVIELENS (.ci/run sets it and runs --ignored)"]
fn mf_reaches_rmse_below_one_on_movielens_u1() {
    let dir = std::env::var_os("DLRM_MOVIELENS")
        .map(PathBuf::from)
        .expect("DLRM_MOVIELENS must name the ml-100k folder");
    let data = MovieLensSource::load(&dir.join("u1.base"), &dir.join("u1.test"), 1).unwrap();
    let cfg = mf::MfConfig {
        users: data.users,
        items: data.items,
        factors: 16,
        global_mean: data.mean_rating,
        weight_decay: 0.001,
    };
    let mut m = mf::new(cfg, OptimizerKind::Adagrad, &StorageKind::Anon, 1).unwrap();
    let r = run(&mut m, &data, &options(256, 0.05, 20));
    let rmse = r.test_rmse.unwrap();
    eprintln!(
        "MF on MovieLens 100K u1: test RMSE {rmse:.4}, train RMSE {:.4}",
        r.train_rmse.unwrap()
    );
    assert!(rmse < 1.0, "test RMSE {rmse}");
}

/// The kernels split their work by shape alone, so 1 and 3 threads (every kernel of the model
/// on its parallel path, `Par::AlwaysSplit`) train the same model, bit for bit.
#[test]
fn every_model_trains_bit_identically_on_any_thread_count() {
    let data = teacher(9);
    let mut test = Batch::default();
    data.fill_test(0, 512, &mut test).unwrap();
    for kind in [ModelKind::Dcn, ModelKind::DcnV2, ModelKind::Fm] {
        let predictions = |threads: usize| -> Vec<u32> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut m = model(kind, OptimizerKind::Adagrad, 9);
                m.set_parallelism(Par::AlwaysSplit);
                m.reserve(512);
                let mut batch = Batch::default();
                for i in 0..8 {
                    data.fill_train(i * 256, 256, &mut batch).unwrap();
                    m.train_step(&batch.view(), 0.05, &mut PhaseTimer::default())
                        .unwrap();
                }
                let mut p = Vec::new();
                m.predict(&test.view(), &mut p).unwrap();
                p.iter().map(|x| x.to_bits()).collect()
            })
        };
        assert_eq!(predictions(1), predictions(3), "{kind:?}");
    }
}

#[test]
fn a_training_step_of_every_model_allocates_nothing_once_warm() {
    let data = teacher(5);
    for kind in [ModelKind::Dcn, ModelKind::DcnV2, ModelKind::Fm] {
        for opt in [OptimizerKind::Sgd, OptimizerKind::RowwiseAdagrad] {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| {
                    let mut m = model(kind, opt, 5);
                    m.reserve(256);
                    let mut batch = Batch::default();
                    let mut in_steps = 0;
                    for i in 0..13 {
                        data.fill_train(i * 256, 256, &mut batch).unwrap();
                        let before = allocations();
                        m.train_step(&batch.view(), 0.05, &mut PhaseTimer::default())
                            .unwrap();
                        if i >= 3 {
                            in_steps += allocations() - before;
                        }
                    }
                    assert_eq!(
                        in_steps, 0,
                        "{kind:?} {opt:?}: allocations in 10 warm steps"
                    );
                });
        }
    }
}
