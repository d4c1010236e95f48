//! Hybrid-parallel DLRM (tables model-parallel, MLPs data-parallel) on N ranks run as threads
//! ([`LocalGroup`]): with the ordered dense reduction it trains bit for bit the model one
//! process trains on the same global batches, for SGD, Adagrad and row-wise Adagrad and for
//! N = 1 .. 4 (3 does not divide the tables evenly); with the all-reduce it agrees within
//! 1e-5; predictions over a held-out set equal the single-process ones. The same tests over
//! MPI are in cli/tests/distributed.rs.

mod common;

use common::ranks::{SingleRun, Tensors, table_costs, teacher_data, tensors, tiny_preset_arch};
use dlrm::data::Batch;
use dlrm::data::synthetic::SyntheticSource;
use dlrm::distributed::{
    Collectives, LocalGroup, Placement, PlanError, PlanOptions, ShardPlan, TableCost,
};
use dlrm::model::architecture::Architecture;
use dlrm::model::dlrm::{DenseReduction, ShardedDlrm};
use dlrm::model::parameters::TableSource;
use dlrm::model::{OptimizerKind, PhaseTimer};
use dlrm::storage::StorageKind;
use dlrm::train::DataSource;

const SEED: u64 = 5;
const LR: f32 = 0.05;

fn arch() -> Architecture {
    tiny_preset_arch()
}

fn data(arch: &Architecture) -> SyntheticSource {
    teacher_data(arch, 2, 11)
}

/// The plan of `arch`'s tables on `ranks`; `replicate_tiny`: the tables under 2,048 rows
/// (6 of the tiny preset's 8) on every rank.
fn plan(arch: &Architecture, ranks: usize, replicate_tiny: bool) -> ShardPlan {
    let tables = table_costs(arch, OptimizerKind::Sgd);
    let options = PlanOptions {
        budget: None,
        replicate_tiny,
    };
    ShardPlan::table_wise(&tables, ranks, options).unwrap()
}

/// One process on the same data and seed.
fn single(optimizer: OptimizerKind, batch: usize, steps: usize) -> (Tensors, Vec<f32>) {
    let arch = arch();
    let data = data(&arch);
    SingleRun {
        arch,
        data: &data,
        seed: SEED,
        learning_rate: LR,
    }
    .train(optimizer, batch, steps)
}

/// N ranks as threads: every rank's tensors merged (dense ones must agree across ranks) and
/// rank 0's predictions for the held-out set.
fn sharded(
    optimizer: OptimizerKind,
    plan: &ShardPlan,
    reduction: DenseReduction,
    batch: usize,
    steps: usize,
) -> (Tensors, Vec<f32>) {
    let (arch, data) = (arch(), data(&arch()));
    let ranks = plan.ranks();
    let results: Vec<(Tensors, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::ranks(ranks)
            .into_iter()
            .map(|comm| {
                let (arch, plan, data) = (arch.clone(), plan.clone(), &data);
                s.spawn(move || {
                    let source = TableSource::Init(&StorageKind::Anon);
                    let mut m = ShardedDlrm::new(
                        arch,
                        optimizer,
                        SEED,
                        source,
                        plan,
                        comm.rank(),
                        reduction,
                    )
                    .unwrap();
                    assert_eq!(m.batch_size_error(batch), None);
                    m.reserve(batch.max(1_000));
                    let mut b = Batch::default();
                    for s in 0..steps {
                        data.fill_train(((s * batch) % 15_360) as u64, batch, &mut b)
                            .unwrap();
                        m.train_step(&comm, &b.view(), LR, &mut PhaseTimer::default())
                            .unwrap();
                    }
                    data.fill_test(0, 1_000, &mut b).unwrap();
                    let mut probs = Vec::new();
                    m.predict(&comm, &b.view(), &mut probs).unwrap();
                    (tensors(&m), probs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut merged = Tensors::new();
    for (tensors, probs) in &results {
        assert_eq!(
            probs, &results[0].1,
            "every rank gathers the same predictions"
        );
        for (name, values) in tensors {
            if let Some(other) = merged.insert(name.clone(), values.clone()) {
                assert_eq!(bits(&other), bits(values), "{name} differs between ranks");
            }
        }
    }
    (merged, results.into_iter().next().unwrap().1)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A global batch whose slices are whole chunks on `ranks` ranks (chunks of 128 rows).
fn batch_for(ranks: usize) -> usize {
    if ranks == 4 { 1024 } else { 768 }
}

#[test]
fn ordered_reduction_is_bit_identical_to_one_process_on_1_to_4_ranks() {
    for optimizer in [
        OptimizerKind::Sgd,
        OptimizerKind::Adagrad,
        OptimizerKind::RowwiseAdagrad,
    ] {
        for ranks in 1..=4 {
            let batch = batch_for(ranks);
            let (want, want_probs) = single(optimizer, batch, 4);
            for replicate_tiny in [false, true] {
                let plan = plan(&arch(), ranks, replicate_tiny);
                let case = format!("{optimizer:?} N={ranks} replicas {replicate_tiny}");
                let (got, got_probs) = sharded(optimizer, &plan, DenseReduction::Ordered, batch, 4);
                assert_eq!(
                    want.keys().collect::<Vec<_>>(),
                    got.keys().collect::<Vec<_>>()
                );
                for (name, w) in &want {
                    assert_eq!(bits(w), bits(&got[name]), "{case}: {name}");
                }
                assert_eq!(bits(&want_probs), bits(&got_probs), "{case}");
            }
        }
    }
}

#[test]
fn all_reduce_agrees_with_one_process_within_1e_5() {
    let (ranks, batch, steps) = (3, 768, 100);
    let (want, _) = single(OptimizerKind::Adagrad, batch, steps);
    let (got, _) = sharded(
        OptimizerKind::Adagrad,
        &plan(&arch(), ranks, true),
        DenseReduction::AllReduce,
        batch,
        steps,
    );
    for (name, w) in &want {
        let g = &got[name];
        // Norm-wise relative difference, ||g - w|| / ||w||.
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let diff = norm(&mut w.iter().zip(g).map(|(a, b)| f64::from(a - b)));
        let scale = norm(&mut w.iter().map(|&a| f64::from(a))).max(1e-30);
        assert!(
            diff / scale <= 1e-5,
            "{name}: relative difference {}",
            diff / scale
        );
    }
}

/// Tables of `rows`, each row and each lookup 1 byte ([`TableCost`]s for plan tests).
fn costs(tables: &[(usize, u64)]) -> Vec<TableCost> {
    (tables.iter())
        .map(|&(rows, lookup_bytes)| TableCost {
            rows,
            bytes: rows as u64,
            lookup_bytes,
        })
        .collect()
}

#[test]
fn the_plan_packs_largest_tables_first_balancing_bytes_and_lookups() {
    let opts = PlanOptions::default();
    // Equal lookups, so bytes decide: 40 -> 0, 30 -> 1, 20 -> 1 (a share of 50/105 beats
    // 60/105), 10 -> 0 (50/105 beats 60/105), 5 -> 0 (both shares tie: the lower rank).
    let tables = costs(&[(10, 1), (40, 1), (30, 1), (20, 1), (5, 1)]);
    let plan = ShardPlan::table_wise(&tables, 2, opts).unwrap();
    let owner = Placement::Owner;
    assert_eq!(
        plan.placement,
        [owner(0), owner(0), owner(1), owner(1), owner(0)]
    );
    assert_eq!(
        (plan.rank_bytes.clone(), plan.rank_lookup_bytes.clone()),
        (vec![55, 50], vec![3, 2])
    );
    assert_eq!(plan.tables_of(1), [2, 3]);
    // Table 0 is read 6 times a sample: by bytes alone rank 0 would also get table 2 (7 of the
    // 9 lookups); balancing both leaves rank 0 the one table and at most 70% of either.
    let tables = costs(&[(30, 6), (30, 1), (30, 1), (10, 1)]);
    let plan = ShardPlan::table_wise(&tables, 2, opts).unwrap();
    assert_eq!(plan.tables_of(0), [0]);
    assert_eq!(plan.tables_of(1), [1, 2, 3]);
}

#[test]
fn tiny_tables_are_replicated_on_every_rank_and_count_against_every_budget() {
    let tables = costs(&[(100_000, 1), (2_047, 1), (2_048, 1), (50_000, 1), (10, 1)]);
    let options = PlanOptions {
        budget: None,
        replicate_tiny: true,
    };
    let plan = ShardPlan::table_wise(&tables, 2, options).unwrap();
    assert_eq!(plan.replicated(), [1, 4]);
    assert_eq!(plan.tables_of(0), [0]);
    assert_eq!(plan.tables_of(1), [2, 3]);
    assert_eq!(plan.rank_bytes, [100_000 + 2_057, 52_048 + 2_057]);
    let text = plan.to_string();
    assert!(
        text.contains("every rank: tables [1,4] replicated"),
        "{text}"
    );
}

#[test]
fn a_plan_that_does_not_fit_is_refused_naming_the_table_and_its_bytes() {
    let tables = costs(&[(10, 1), (40, 1), (30, 1)]);
    let budget = |b| PlanOptions {
        budget: Some(b),
        replicate_tiny: false,
    };
    let err = ShardPlan::table_wise(&tables, 2, budget(35)).unwrap_err();
    assert_eq!(
        err,
        PlanError::DoesNotFit {
            table: 1,
            bytes: 40,
            used: 0,
            budget: 35
        }
    );
    assert!(err.to_string().contains("table 1 (40 bytes"), "{err}");
    // Replicas fill every rank first: 10 + 40 + 30 replicated leave no room past 70.
    let replicate = PlanOptions {
        replicate_tiny: true,
        ..budget(70)
    };
    let err = ShardPlan::table_wise(&tables, 2, replicate).unwrap_err();
    assert!(err.to_string().contains("table 2 (30 bytes"), "{err}");
    // The budget steers a table off the rank balance picks (rank 0: 60 + 20 > 75).
    let tables = costs(&[(60, 1), (50, 5), (20, 1)]);
    let unlimited = ShardPlan::table_wise(&tables, 2, PlanOptions::default()).unwrap();
    assert_eq!(unlimited.tables_of(0), [0, 2]);
    let plan = ShardPlan::table_wise(&tables, 2, budget(75)).unwrap();
    assert_eq!(plan.tables_of(0), [0]);
    assert_eq!(plan.tables_of(1), [1, 2]);
}

#[test]
fn a_batch_the_ranks_cannot_split_is_refused_with_the_reason() {
    let arch = arch();
    let source = TableSource::Init(&StorageKind::Anon);
    let m = ShardedDlrm::new(
        arch.clone(),
        OptimizerKind::Sgd,
        SEED,
        source,
        plan(&arch, 3, false),
        0,
        DenseReduction::Ordered,
    )
    .unwrap();
    let err = m.batch_size_error(1024).unwrap();
    assert!(err.contains("not divisible by the 3 ranks"), "{err}");
    // 3 x 256 rows, but a batch of 768 runs in chunks of 128: fine; 3 x 200 is not.
    assert_eq!(m.batch_size_error(768), None);
    let err = m.batch_size_error(600).unwrap();
    assert!(err.contains("whole chunks"), "{err}");
}
