//! Distributed checkpoints on N ranks run as threads ([`LocalGroup`]): every rank writes its
//! own tables, rank 0 the dense parameters, meta.json and `LATEST` once all parts are durable.
//! A version saved on N ranks is a single-process version (same files), so:
//!
//! - resuming on the same N continues bit for bit as the uninterrupted run;
//! - resuming on another N (1 .. 4, the tables re-placed by the new plan) or in one process
//!   trains bit for bit what one process trains resuming the same version (ordered dense
//!   reduction), and a distributed run resumes a single-process version;
//! - a save that fails on one rank leaves `LATEST` on the previous version, and no
//!   temporary folder behind.
//!
//! The same over MPI, with a rank crashing mid-save, is in cli/tests/distributed_checkpoint.rs.

mod common;

use common::ranks::{table_costs, teacher_data, tiny_preset_arch};
use dlrm::cancel::Cancel;
use dlrm::checkpoint::{self, LoadOptions, TrainState};
use dlrm::data::synthetic::SyntheticSource;
use dlrm::distributed::{Collectives, LocalGroup, PlanOptions, ShardPlan};
use dlrm::model::OptimizerKind;
use dlrm::model::architecture::Architecture;
use dlrm::model::dlrm::{DenseReduction, Dlrm, ShardedDlrm};
use dlrm::model::parameters::{Parameters, TableSource};
use dlrm::storage::StorageKind;
use dlrm::train::{CheckpointPolicy, LrSchedule, Quiet, TrainOptions, train, train_sharded};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

const SEED: u64 = 5;
const OPTIMIZER: OptimizerKind = OptimizerKind::Adagrad;

fn arch() -> Architecture {
    tiny_preset_arch()
}

fn data() -> SyntheticSource {
    teacher_data(&arch(), 2, 11)
}

/// Two epochs of 3 steps of `batch` samples; checkpoints every 2 steps into `save` (all kept).
fn options(batch: usize, save: Option<&Path>, resume: Option<TrainState>) -> TrainOptions {
    TrainOptions {
        num_batches: 3,
        nepochs: 2,
        test_batch_size: 1_000,
        keep_last_batch: false,
        seed: SEED,
        checkpoint: save.map(|dir| CheckpointPolicy {
            dir: dir.to_path_buf(),
            every: 2,
            keep: 10,
            dataset_files: None,
        }),
        resume,
        ..TrainOptions::new(batch, LrSchedule::constant(0.05))
    }
}

/// Every named tensor's values and optimizer state, as bits.
type Tensors = BTreeMap<String, Vec<u32>>;

fn tensors(model: &dyn Parameters) -> Tensors {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect();
    let mut out = Tensors::new();
    model.parameters(&mut |(name, _, tensor)| {
        out.insert(format!("{name} state"), bits(tensor.state));
        out.insert(name, bits(&tensor.values()));
    });
    out
}

/// The plan of the tiny preset's tables on `ranks`, the small ones replicated.
fn plan(ranks: usize) -> ShardPlan {
    let tables = table_costs(&arch(), OPTIMIZER);
    let options = PlanOptions {
        budget: None,
        replicate_tiny: true,
    };
    ShardPlan::table_wise(&tables, ranks, options).unwrap()
}

/// One process trains `opts` (from `load`'s version when given): its tensors.
fn single(opts: &TrainOptions, load: Option<&Path>) -> Tensors {
    let mut model = match load {
        Some(v) => checkpoint::load_dlrm(v, &StorageKind::Anon).unwrap().0,
        None => Dlrm::new(arch(), OPTIMIZER, &StorageKind::Anon, SEED).unwrap(),
    };
    train(&mut model, &data(), opts, 1, &mut Quiet).unwrap();
    tensors(&model)
}

/// `ranks` ranks as threads train `opts` (each loading its share of `load`'s version when
/// given) with the ordered dense reduction: every rank's tensors merged (the dense ones and
/// the replicas checked equal on every rank).
fn sharded(ranks: usize, opts: &TrainOptions, load: Option<&Path>) -> Tensors {
    let data = data();
    let per_rank: Vec<Tensors> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::ranks(ranks)
            .into_iter()
            .map(|comm| {
                let data = &data;
                s.spawn(move || {
                    let (plan, rank) = (plan(ranks), comm.rank());
                    let reduction = DenseReduction::Ordered;
                    let mut m = match load {
                        Some(v) => {
                            let anon = &StorageKind::Anon;
                            let opts = LoadOptions::default();
                            checkpoint::load_sharded(v, anon, opts, plan, rank, reduction)
                                .unwrap()
                                .0
                        }
                        None => {
                            let source = TableSource::Init(&StorageKind::Anon);
                            ShardedDlrm::new(arch(), OPTIMIZER, SEED, source, plan, rank, reduction)
                                .unwrap()
                        }
                    };
                    train_sharded(&comm, &mut m, data, opts, 1, &mut Quiet).unwrap();
                    tensors(&m)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut merged = Tensors::new();
    for t in per_rank {
        for (name, bits) in t {
            if let Some(seen) = merged.get(&name) {
                assert!(*seen == bits, "{name} differs between ranks");
            }
            merged.insert(name, bits);
        }
    }
    merged
}

/// The version of `dir` saved at `step`.
fn version_at(dir: &Path, step: u64) -> PathBuf {
    let v = dir.join(format!("ckpt-{step:012}-000"));
    assert!(v.is_dir(), "no version {}", v.display());
    v
}

fn file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn resume_state(version: &Path) -> TrainState {
    checkpoint::read_meta(version).unwrap().train_state
}

/// Saves on `ranks` ranks at batch `batch`; resumes the step-4 version (the second epoch's
/// first step done) on each of `resume_on` and in one process.
fn check_save_and_resume(ranks: usize, batch: usize, resume_on: &[usize]) {
    let saved = tempfile::tempdir().unwrap();
    let whole = sharded(ranks, &options(batch, Some(saved.path()), None), None);
    // The final version holds the trained model, and loads as one process's checkpoint.
    let last = checkpoint::resolve(saved.path()).unwrap();
    assert_eq!(last, version_at(saved.path(), 6));
    let loaded = checkpoint::load_dlrm(&last, &StorageKind::Anon).unwrap().0;
    assert!(tensors(&loaded) == whole, "the final checkpoint differs");
    let meta = checkpoint::read_meta(&last).unwrap();
    assert_eq!(meta.sharding.as_ref().map(|s| s.ranks), Some(ranks));
    // The same files as a single-process version at the same step.
    let alone = tempfile::tempdir().unwrap();
    let single_whole = single(&options(batch, Some(alone.path()), None), None);
    assert!(single_whole == whole, "{ranks} ranks train another model");
    let single_files = file_names(&version_at(alone.path(), 4));
    assert_eq!(file_names(&version_at(saved.path(), 4)), single_files);

    let v4 = version_at(saved.path(), 4);
    let opts = options(batch, None, Some(resume_state(&v4)));
    let want = single(&opts, Some(&v4));
    assert!(want == whole, "one process resuming continues otherwise");
    for &n in resume_on {
        let got = sharded(n, &opts, Some(&v4));
        assert!(
            got == want,
            "saved on {ranks}, resumed on {n} ranks: differs"
        );
    }
    // A single-process version resumes on the ranks as well.
    let single_v4 = version_at(alone.path(), 4);
    let got = sharded(ranks, &opts, Some(&single_v4));
    assert!(
        got == want,
        "a single-process checkpoint resumed on {ranks} ranks"
    );
}

#[test]
fn saved_on_two_ranks_resumes_exactly_on_1_2_and_4_ranks_and_in_one_process() {
    // 512 samples: 4 chunks of 128 rows, whole chunks on 1, 2 and 4 ranks.
    check_save_and_resume(2, 512, &[2, 1, 4]);
}

#[test]
fn saved_on_three_ranks_resumes_exactly_on_3_1_and_2_ranks_and_in_one_process() {
    // 768 samples: 6 chunks of 128 rows, whole chunks on 1, 2 and 3 ranks.
    check_save_and_resume(3, 768, &[3, 1, 2]);
}

#[test]
fn a_save_failing_on_one_rank_leaves_latest_on_the_previous_version() {
    let (ranks, batch) = (2, 512);
    let dir = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        nepochs: 1,
        ..options(batch, Some(dir.path()), None)
    };
    sharded(ranks, &opts, None);
    let before = checkpoint::resolve(dir.path()).unwrap();
    assert_eq!(before, version_at(dir.path(), 3));
    let state = TrainState {
        step: 5,
        ..resume_state(&before)
    };
    // Rank 1 is interrupted once it has written its tables; rank 0 writes all of its part.
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::ranks(ranks)
            .into_iter()
            .map(|comm| {
                let (state, dir, before) = (&state, dir.path(), &before);
                s.spawn(move || {
                    let rank = comm.rank();
                    let anon = &StorageKind::Anon;
                    let reduction = DenseReduction::Ordered;
                    let m = checkpoint::load_sharded(
                        before,
                        anon,
                        LoadOptions::default(),
                        plan(ranks),
                        rank,
                        reduction,
                    )
                    .unwrap()
                    .0;
                    let cancel = Cancel::new(Arc::new(AtomicUsize::new(rank)));
                    let e = checkpoint::save_sharded(dir, &comm, &m, state, None, 10, &cancel)
                        .unwrap_err();
                    format!("{e:#}")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        errors[0].contains("rank 1 could not write"),
        "{}",
        errors[0]
    );
    assert_eq!(checkpoint::resolve(dir.path()).unwrap(), before);
    let left: Vec<String> = file_names(dir.path())
        .into_iter()
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!dir.path().join("ckpt-000000000005-000").exists());
    checkpoint::load_dlrm(&before, &StorageKind::Anon).unwrap();
}
