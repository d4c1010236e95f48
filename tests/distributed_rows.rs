//! Row-wise embedding shards on N ranks run as threads ([`LocalGroup`]): every table split
//! into contiguous row ranges (`--sharding row`), or only the tables too large for a rank's
//! budget (`--sharding auto`), train bit for bit the model one process trains on the same
//! global batches, for SGD, Adagrad and row-wise Adagrad, N = 1 .. 4, with bags of 1 to 3 ids
//! (a bag's ids fall in several ranges); and the plans: ranges cover every row once, are as
//! even as the budget allows, and a table that fits nowhere even split is refused. The run
//! over MPI is in cli/tests/distributed_rows.rs.

mod common;

use common::ranks::{
    SingleRun, Tensors, bits, merge_ranks, table_costs, teacher_data, tensors, tiny_arch,
};
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

const SEED: u64 = 7;
const LR: f32 = 0.05;
const STEPS: usize = 4;

/// A global batch whose slices are whole chunks of 128 rows on `ranks` ranks
/// (--deterministic).
fn batch_for(ranks: usize) -> usize {
    if ranks == 4 { 1024 } else { 768 }
}

/// The tiny preset's network over tables of 3 to 5,000 rows (3 rows leave a rank of 4 an
/// empty range).
fn arch() -> Architecture {
    tiny_arch(vec![100, 400, 1000, 2000, 5000, 50, 3, 3000])
}

/// Bags of 1 to 3 ids.
fn data(arch: &Architecture) -> SyntheticSource {
    teacher_data(arch, 3, 13)
}

fn costs_of(arch: &Architecture, optimizer: OptimizerKind) -> Vec<TableCost> {
    table_costs(arch, optimizer)
}

/// One process on the same data and seed.
fn single(optimizer: OptimizerKind, batch: usize) -> (Tensors, Vec<f32>) {
    let arch = arch();
    let data = data(&arch);
    SingleRun {
        arch,
        data: &data,
        seed: SEED,
        learning_rate: LR,
    }
    .train(optimizer, batch, STEPS)
}

/// N ranks as threads under `plan`: the whole model (a split table's ranges joined in rank
/// order; every other tensor must agree across the ranks that hold it) and rank 0's
/// predictions for the held-out set.
fn sharded(
    optimizer: OptimizerKind,
    plan: &ShardPlan,
    reduction: DenseReduction,
    batch: usize,
) -> (Tensors, Vec<f32>) {
    let (arch, data) = (arch(), data(&arch()));
    let results: Vec<(Tensors, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::ranks(plan.ranks())
            .into_iter()
            .map(|comm| {
                let (arch, plan, data) = (arch.clone(), plan.clone(), &data);
                s.spawn(move || {
                    let source = TableSource::Init(&StorageKind::Anon);
                    let rank = comm.rank();
                    let mut m =
                        ShardedDlrm::new(arch, optimizer, SEED, source, plan, rank, reduction)
                            .unwrap();
                    assert_eq!(m.batch_size_error(batch), None);
                    m.reserve(batch.max(1_000));
                    let mut b = Batch::default();
                    for s in 0..STEPS {
                        data.fill_train((s * batch) as u64, batch, &mut b).unwrap();
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
    for (_, probs) in &results {
        assert_eq!(
            bits(probs),
            bits(&results[0].1),
            "every rank gathers the same predictions"
        );
    }
    let merged = merge_ranks(plan, results.iter().map(|(tensors, _)| tensors));
    (merged, results.into_iter().next().unwrap().1)
}

fn assert_same(want: &(Tensors, Vec<f32>), got: &(Tensors, Vec<f32>), case: &str) {
    assert_eq!(
        want.0.keys().collect::<Vec<_>>(),
        got.0.keys().collect::<Vec<_>>(),
        "{case}"
    );
    for (name, w) in &want.0 {
        assert_eq!(bits(w), bits(&got.0[name]), "{case}: {name}");
    }
    assert_eq!(bits(&want.1), bits(&got.1), "{case}: predictions");
}

const OPTIMIZERS: [OptimizerKind; 3] = [
    OptimizerKind::Sgd,
    OptimizerKind::Adagrad,
    OptimizerKind::RowwiseAdagrad,
];

#[test]
fn row_wise_shards_are_bit_identical_to_one_process_on_1_to_4_ranks() {
    for optimizer in OPTIMIZERS {
        for ranks in 1..=4 {
            let batch = batch_for(ranks);
            let want = single(optimizer, batch);
            let plan =
                ShardPlan::row_wise(&costs_of(&arch(), optimizer), ranks, PlanOptions::default())
                    .unwrap();
            assert_eq!(plan.row_split().len(), 8, "every table is split");
            let got = sharded(optimizer, &plan, DenseReduction::Ordered, batch);
            assert_same(&want, &got, &format!("{optimizer:?} N={ranks}"));
        }
    }
}

#[test]
fn auto_splits_only_the_tables_no_rank_can_hold_and_stays_bit_identical() {
    for optimizer in OPTIMIZERS {
        for ranks in [3, 4] {
            let batch = batch_for(ranks);
            let want = single(optimizer, batch);
            let costs = costs_of(&arch(), optimizer);
            // Every rank holds the 6 tables under 2,048 rows (3,553 rows) and room for 4,800
            // rows more: the 5,000-row table fits no rank whole and is split, the 3,000-row
            // one then fits beside a range.
            let row_bytes = costs[0].bytes / costs[0].rows as u64;
            let budget = (3_553 + 4_800) * row_bytes;
            let options = PlanOptions {
                budget: Some(budget),
                replicate_tiny: true,
            };
            let plan = ShardPlan::auto(&costs, ranks, options).unwrap();
            let case = format!("{optimizer:?} N={ranks} budget {budget}:\n{plan}");
            assert_eq!(plan.row_split(), [4], "{case}");
            assert!(matches!(plan.placement[7], Placement::Owner(_)), "{case}");
            assert_eq!(plan.replicated(), [0, 1, 2, 3, 5, 6], "{case}");
            assert!(plan.rank_bytes.iter().all(|&b| b <= budget), "{case}");
            assert!(
                matches!(
                    ShardPlan::table_wise(&costs, ranks, options),
                    Err(PlanError::DoesNotFit { .. })
                ),
                "{case}"
            );
            let got = sharded(optimizer, &plan, DenseReduction::Ordered, batch);
            assert_same(&want, &got, &case);
        }
    }
}

#[test]
fn row_shards_with_the_all_reduce_agree_with_one_process_within_1e_5() {
    let optimizer = OptimizerKind::Adagrad;
    let (want, _) = single(optimizer, 768);
    let plan =
        ShardPlan::row_wise(&costs_of(&arch(), optimizer), 3, PlanOptions::default()).unwrap();
    let (got, _) = sharded(optimizer, &plan, DenseReduction::AllReduce, 768);
    for (name, w) in &want {
        let g = &got[name];
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

/// Tables of `rows` rows of 1 byte, 1 lookup byte each.
fn costs(rows: &[usize]) -> Vec<TableCost> {
    (rows.iter())
        .map(|&rows| TableCost {
            rows,
            bytes: rows as u64,
            lookup_bytes: 1,
        })
        .collect()
}

/// Every table's rows are held exactly once: by its owner, by every rank (a replica), or by
/// the ranks of its ranges, which are contiguous in rank order.
fn assert_covers_every_row_once(plan: &ShardPlan) {
    for (t, placement) in plan.placement.iter().enumerate() {
        let rows = plan.rows[t];
        let held: Vec<_> = (0..plan.ranks())
            .filter_map(|r| plan.rows_of(t, r))
            .collect();
        match placement {
            Placement::Owner(_) => assert_eq!(held, vec![0..rows; 1], "table {t}"),
            Placement::Replicated => assert_eq!(held, vec![0..rows; plan.ranks()], "table {t}"),
            Placement::Rows(bounds) => {
                assert_eq!(
                    (bounds.len(), bounds[0]),
                    (plan.ranks() + 1, 0),
                    "table {t}"
                );
                assert_eq!(bounds[plan.ranks()], rows, "table {t}");
                assert!(
                    bounds.windows(2).all(|w| w[0] <= w[1]),
                    "table {t}: {bounds:?}"
                );
                let mut next = 0;
                for range in held {
                    assert_eq!(range.start, next, "table {t}");
                    next = range.end;
                }
                assert_eq!(next, rows, "table {t}");
            }
        }
    }
}

#[test]
fn row_wise_ranges_cover_every_row_once_and_are_even() {
    for ranks in 1..=5 {
        for rows in [0, 1, 3, 4, 7, 100, 2_047, 10_001] {
            let plan =
                ShardPlan::row_wise(&costs(&[rows, 5]), ranks, PlanOptions::default()).unwrap();
            assert_covers_every_row_once(&plan);
            let Placement::Rows(bounds) = &plan.placement[0] else {
                panic!("table 0 is not split: {plan}");
            };
            let sizes: Vec<usize> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
            let even: Vec<usize> = (0..ranks)
                .map(|r| rows / ranks + usize::from(r < rows % ranks))
                .collect();
            assert_eq!(sizes, even, "{rows} rows on {ranks} ranks");
        }
    }
    let plan = ShardPlan::row_wise(&costs(&[10, 7]), 3, PlanOptions::default()).unwrap();
    assert_eq!(plan.rows_of(0, 1), Some(4..7));
    assert_eq!(plan.rank_bytes, [4 + 3, 3 + 2, 3 + 2]);
    let text = plan.to_string();
    assert!(
        text.contains("rank 1: tables [], rows 0[4..7] 1[3..5]"),
        "{text}"
    );
}

#[test]
fn a_budget_bends_the_ranges_and_only_unfit_tables_are_split_by_auto() {
    let budget = |b| PlanOptions {
        budget: Some(b),
        replicate_tiny: false,
    };
    // The 60-row table fits no rank (40 a rank): split evenly first. The others go whole
    // where room is, until the 13-row one fits nowhere (room 4, 5 and 5): its ranges bend.
    let plan = ShardPlan::auto(&costs(&[60, 16, 15, 15, 13]), 3, budget(40)).unwrap();
    assert_covers_every_row_once(&plan);
    let (owner, rows) = (Placement::Owner, Placement::Rows);
    assert_eq!(
        plan.placement,
        [
            rows(vec![0, 20, 40, 60]),
            owner(0),
            owner(1),
            owner(2),
            rows(vec![0, 4, 9, 13])
        ]
    );
    assert_eq!(plan.rank_bytes, [40, 40, 39]);
    assert_eq!(plan.rows_of(4, 1), Some(4..9));
    assert_eq!(plan.rows_of(1, 1), None);
    assert_eq!(plan.rows_of(1, 0), Some(0..16));
    // Every table row-wise under a tight budget: the ranks' room bends the ranges.
    let plan = ShardPlan::row_wise(&costs(&[30, 60]), 3, budget(31)).unwrap();
    assert_covers_every_row_once(&plan);
    assert!(plan.rank_bytes.iter().all(|&b| b <= 31), "{plan}");
    let text = plan.to_string();
    assert!(text.contains("rows 0[0..10] 1["), "{text}");
}

#[test]
fn a_table_whose_rows_fit_nowhere_is_refused_naming_it() {
    let budget = PlanOptions {
        budget: Some(40),
        replicate_tiny: false,
    };
    let err = ShardPlan::auto(&costs(&[50, 60]), 2, budget).unwrap_err();
    // 60 rows split 30 / 30, leaving 10 a rank: the 50-row table does not fit in 20.
    assert_eq!(
        err,
        PlanError::RowsDoNotFit {
            table: 0,
            bytes: 50,
            free: 20
        }
    );
    assert!(err.to_string().contains("table 0 (50 bytes"), "{err}");
    assert!(err.to_string().contains("--rank-memory-gib"), "{err}");
    let err = ShardPlan::row_wise(&costs(&[81]), 2, budget).unwrap_err();
    assert_eq!(
        err,
        PlanError::RowsDoNotFit {
            table: 0,
            bytes: 81,
            free: 80
        }
    );
    assert!(ShardPlan::row_wise(&costs(&[80]), 2, budget).is_ok());
}

#[test]
fn split_tables_in_file_storage_are_refused_before_any_table_file_is_made() {
    let arch = arch();
    // Table 4 split, the others whole on their owners or replicated: none may reach a file.
    let costs = costs_of(&arch, OptimizerKind::Sgd);
    let budget = (3_553 + 4_800) * costs[0].bytes / costs[0].rows as u64;
    let options = PlanOptions {
        budget: Some(budget),
        replicate_tiny: true,
    };
    let plan = ShardPlan::auto(&costs, 3, options).unwrap();
    assert_eq!(plan.row_split(), [4]);
    let dir = std::env::temp_dir().join(format!("dlrm-rows-{}", std::process::id()));
    let storage = StorageKind::File {
        dir: dir.clone(),
        lazy_init: false,
    };
    let err = ShardedDlrm::new(
        arch,
        OptimizerKind::Sgd,
        SEED,
        TableSource::Init(&storage),
        plan,
        0,
        DenseReduction::Ordered,
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("anonymous memory"), "{err}");
    assert!(!dir.exists(), "nothing is left behind");
}
