//! Checkpoints of row-split tables on N ranks run as threads ([`LocalGroup`]): each range's
//! owner writes its rows at their offset in the one file of the whole table (and of its
//! optimizer state), so a version saved with every table split row-wise is, file for file and
//! byte for byte (meta.json aside), the version one process writes. Hence, with the ordered
//! dense reduction (`--deterministic`), for SGD, Adagrad and row-wise Adagrad:
//!
//! - a version saved row-wise on 2 and on 3 ranks resumes on 1 .. 4 ranks, row-wise and
//!   table-wise, and in one process, training bit for bit the uninterrupted single-process run;
//! - each rank reads only its rows, from anonymous or copy-on-write file storage, and rows a
//!   lazily initialised single-process table never touched get their initial values;
//! - a save failing on one rank leaves `LATEST` on the previous version and nothing behind.
//!
//! The same over MPI (`--sharding row --save-model`, export, a crash mid-save) is in
//! cli/tests/distributed_row_checkpoint.rs.

mod common;

use common::ranks::{Tensors, bits, merge_ranks, table_costs, teacher_data, tensors, tiny_arch};
use dlrm::cancel::Cancel;
use dlrm::checkpoint::{self, LoadOptions, TrainState};
use dlrm::data::synthetic::SyntheticSource;
use dlrm::distributed::{Collectives, LocalGroup, PlanOptions, ShardPlan};
use dlrm::model::OptimizerKind;
use dlrm::model::architecture::Architecture;
use dlrm::model::dlrm::{DenseReduction, Dlrm, ShardedDlrm};
use dlrm::model::parameters::TableSource;
use dlrm::storage::StorageKind;
use dlrm::train::{CheckpointPolicy, LrSchedule, Quiet, TrainOptions, train, train_sharded};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

const SEED: u64 = 9;

const OPTIMIZERS: [OptimizerKind; 3] = [
    OptimizerKind::Sgd,
    OptimizerKind::Adagrad,
    OptimizerKind::RowwiseAdagrad,
];

/// The tiny preset's network over tables of 3 to 5,000 rows (3 rows leave a rank of 4 an
/// empty range; 1,001 rows split unevenly).
fn arch() -> Architecture {
    tiny_arch(vec![100, 1001, 2000, 5000, 50, 3])
}

/// Bags of 1 to 3 ids: a bag's ids fall in several ranges.
fn data() -> SyntheticSource {
    teacher_data(&arch(), 3, 17)
}

/// How a run places the tables on its ranks.
#[derive(Clone, Copy, Debug)]
enum Sharding {
    /// Every table split row-wise.
    Row,
    /// Whole tables, the small ones replicated.
    Table,
}

fn plan(sharding: Sharding, optimizer: OptimizerKind, ranks: usize) -> ShardPlan {
    let tables = table_costs(&arch(), optimizer);
    match sharding {
        Sharding::Row => ShardPlan::row_wise(&tables, ranks, PlanOptions::default()),
        Sharding::Table => ShardPlan::table_wise(
            &tables,
            ranks,
            PlanOptions {
                budget: None,
                replicate_tiny: true,
            },
        ),
    }
    .unwrap()
}

/// Two epochs of 3 steps of `batch` samples; checkpoints every 2 steps (and at the end) into
/// `save` (all kept).
fn options(batch: usize, save: &Path, resume: Option<TrainState>) -> TrainOptions {
    TrainOptions {
        num_batches: 3,
        nepochs: 2,
        test_batch_size: 1_000,
        keep_last_batch: false,
        seed: SEED,
        checkpoint: Some(CheckpointPolicy {
            dir: save.to_path_buf(),
            every: 2,
            keep: 10,
            dataset_files: None,
        }),
        resume,
        ..TrainOptions::new(batch, LrSchedule::constant(0.05))
    }
}

/// One process trains `opts` (from `load`'s version when given) with tables in `storage`.
fn single(
    optimizer: OptimizerKind,
    opts: &TrainOptions,
    load: Option<&Path>,
    storage: &StorageKind,
) -> Tensors {
    let mut model = match load {
        Some(v) => checkpoint::load_dlrm(v, &StorageKind::Anon).unwrap().0,
        None => Dlrm::new(arch(), optimizer, storage, SEED).unwrap(),
    };
    train(&mut model, &data(), opts, 1, &mut Quiet).unwrap();
    tensors(&model)
}

/// `ranks` ranks as threads under `sharding` train `opts` with the ordered dense reduction,
/// each loading its share of `load`'s version into `storage` when given: the whole model (a
/// split table's ranges joined in rank order; every other tensor must agree across the ranks
/// holding it).
fn sharded(
    optimizer: OptimizerKind,
    sharding: Sharding,
    ranks: usize,
    opts: &TrainOptions,
    load: Option<(&Path, &StorageKind)>,
) -> Tensors {
    let (data, plan) = (data(), plan(sharding, optimizer, ranks));
    let per_rank: Vec<Tensors> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::ranks(ranks)
            .into_iter()
            .map(|comm| {
                let (data, plan) = (&data, plan.clone());
                s.spawn(move || {
                    let (rank, reduction) = (comm.rank(), DenseReduction::Ordered);
                    let mut m = match load {
                        Some((v, storage)) => {
                            let opts = LoadOptions::default();
                            checkpoint::load_sharded(v, storage, opts, plan, rank, reduction)
                                .unwrap()
                                .0
                        }
                        None => {
                            let source = TableSource::Init(&StorageKind::Anon);
                            ShardedDlrm::new(arch(), optimizer, SEED, source, plan, rank, reduction)
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
    merge_ranks(&plan, &per_rank)
}

fn assert_same(want: &Tensors, got: &Tensors, case: &str) {
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "{case}"
    );
    for (name, w) in want {
        assert_eq!(bits(w), bits(&got[name]), "{case}: {name}");
    }
}

/// The version of `dir` saved at `step`.
fn version_at(dir: &Path, step: u64) -> PathBuf {
    let v = dir.join(format!("ckpt-{step:012}-000"));
    assert!(v.is_dir(), "no version {}", v.display());
    v
}

/// Every file of a version but meta.json (which records the ranks and the run), with its bytes.
fn files(version: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(version)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().into_string().unwrap(), e.path()))
        .filter(|(name, _)| name != "meta.json")
        .map(|(name, path)| (name, std::fs::read(path).unwrap()))
        .collect()
}

fn resume_state(version: &Path) -> TrainState {
    checkpoint::read_meta(version).unwrap().train_state
}

/// Saves with every table split row-wise on `ranks` ranks at batch `batch`: the versions are
/// the single-process ones byte for byte, and the step-4 version (the second epoch's first
/// step done) resumes on each of `resume_on`, row-wise and table-wise, and in one process,
/// training the uninterrupted single-process run.
fn check_save_and_resume(
    optimizer: OptimizerKind,
    ranks: usize,
    batch: usize,
    resume_on: &[usize],
) {
    let case = format!("{optimizer:?} saved on {ranks} ranks");
    let (alone, saved) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let anon = StorageKind::Anon;
    let want = single(optimizer, &options(batch, alone.path(), None), None, &anon);
    let whole = sharded(
        optimizer,
        Sharding::Row,
        ranks,
        &options(batch, saved.path(), None),
        None,
    );
    assert_same(&want, &whole, &case);
    for step in [2, 4, 6] {
        let (got, single_files) = (
            version_at(saved.path(), step),
            version_at(alone.path(), step),
        );
        let (got, single_files) = (files(&got), files(&single_files));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            single_files.keys().collect::<Vec<_>>(),
            "{case}: the files of step {step}"
        );
        for (name, bytes) in &single_files {
            assert!(got[name] == *bytes, "{case}: step {step}'s {name} differs");
        }
    }
    let last = checkpoint::resolve(saved.path()).unwrap();
    let loaded = checkpoint::load_dlrm(&last, &anon).unwrap().0;
    assert_same(
        &want,
        &tensors(&loaded),
        &format!("{case}: the last version"),
    );

    let v4 = version_at(saved.path(), 4);
    let resumed = tempfile::tempdir().unwrap();
    let opts = options(batch, resumed.path(), Some(resume_state(&v4)));
    let got = single(optimizer, &opts, Some(&v4), &anon);
    assert_same(&want, &got, &format!("{case}, resumed in one process"));
    let file_storage = StorageKind::File {
        dir: resumed.path().join("tables"),
        lazy_init: false,
    };
    for &n in resume_on {
        for sharding in [Sharding::Row, Sharding::Table] {
            // Copy-on-write maps of the version's files on 3 ranks, reads into memory else.
            let storage = if n == 3 { &file_storage } else { &anon };
            let resumed = tempfile::tempdir().unwrap();
            let opts = options(batch, resumed.path(), Some(resume_state(&v4)));
            let got = sharded(optimizer, sharding, n, &opts, Some((&v4, storage)));
            assert_same(&want, &got, &format!("{case}, resumed on {n} {sharding:?}"));
        }
    }
}

#[test]
fn saved_row_wise_on_two_ranks_resumes_exactly_on_1_2_and_4_ranks_and_in_one_process() {
    // 1,024 samples: 8 chunks of 128 rows, whole chunks on 1, 2 and 4 ranks.
    for optimizer in OPTIMIZERS {
        check_save_and_resume(optimizer, 2, 1024, &[2, 1, 4]);
    }
}

#[test]
fn saved_row_wise_on_three_ranks_resumes_exactly_on_3_1_and_2_ranks_and_in_one_process() {
    // 768 samples: 6 chunks of 128 rows, whole chunks on 1, 2 and 3 ranks.
    for optimizer in OPTIMIZERS {
        check_save_and_resume(optimizer, 3, 768, &[3, 1, 2]);
    }
}

#[test]
fn a_lazily_initialised_single_process_version_resumes_row_wise() {
    // A lazy file table saved after 2 steps keeps the rows never looked up pending (the
    // version's bitmap says which): each rank gives its range's pending rows their values.
    let (optimizer, batch) = (OptimizerKind::Adagrad, 768);
    let (alone, tables) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let lazy = StorageKind::File {
        dir: tables.path().to_path_buf(),
        lazy_init: true,
    };
    single(optimizer, &options(batch, alone.path(), None), None, &lazy);
    // The lazy run's tensors hold zeros for the rows it never touched: the eager run's are
    // their values.
    let eager = tempfile::tempdir().unwrap();
    let want = single(
        optimizer,
        &options(batch, eager.path(), None),
        None,
        &StorageKind::Anon,
    );
    let v2 = version_at(alone.path(), 2);
    let resumed = tempfile::tempdir().unwrap();
    let opts = options(batch, resumed.path(), Some(resume_state(&v2)));
    let got = sharded(
        optimizer,
        Sharding::Row,
        3,
        &opts,
        Some((&v2, &StorageKind::Anon)),
    );
    assert_same(&want, &got, "a lazy version resumed row-wise on 3 ranks");
}

#[test]
fn a_row_wise_save_failing_on_one_rank_leaves_latest_on_the_previous_version() {
    let (optimizer, ranks, batch) = (OptimizerKind::RowwiseAdagrad, 2, 1024);
    let dir = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        nepochs: 1,
        ..options(batch, dir.path(), None)
    };
    sharded(optimizer, Sharding::Row, ranks, &opts, None);
    let before = checkpoint::resolve(dir.path()).unwrap();
    assert_eq!(before, version_at(dir.path(), 3));
    let state = TrainState {
        step: 5,
        ..resume_state(&before)
    };
    // Rank 1 is interrupted once it has written its rows; rank 0 writes all of its part.
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::ranks(ranks)
            .into_iter()
            .map(|comm| {
                let (state, dir, before) = (&state, dir.path(), &before);
                s.spawn(move || {
                    let rank = comm.rank();
                    let plan = plan(Sharding::Row, optimizer, ranks);
                    let (anon, reduction) = (&StorageKind::Anon, DenseReduction::Ordered);
                    let opts = LoadOptions::default();
                    let m = checkpoint::load_sharded(before, anon, opts, plan, rank, reduction)
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
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".tmp") || n.starts_with("ckpt-000000000005"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    checkpoint::load_dlrm(&before, &StorageKind::Anon).unwrap();
}
