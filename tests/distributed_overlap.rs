//! A training step's collectives run beside compute that does not need their result
//! (src/model/dlrm/sharded.rs): the forward all-to-all beside the bottom MLP, the dense
//! reduction (all-reduce, or the ordered gather) beside the backward exchanges and the sparse
//! updates. MPI runs that compute while the collective is in flight; the threads of a
//! [`LocalGroup`] run it after the exchange. Here a group runs it before the exchange instead:
//! had the compute read or written what the collective moves, the two orders would give
//! different bits, so equal bits show the overlapped pieces are independent (and the ordered
//! reduction stays the single-process model, which tests/distributed.rs checks for the
//! default order).

mod common;

use common::ranks::{Tensors, table_costs, teacher_data, tensors, tiny_arch};
use dlrm::data::Batch;
use dlrm::distributed::{Collectives, LocalGroup, LocalRank, PlanOptions, ShardPlan};
use dlrm::model::architecture::Architecture;
use dlrm::model::dlrm::{DenseReduction, ShardedDlrm};
use dlrm::model::parameters::TableSource;
use dlrm::model::{OptimizerKind, PhaseTimer};
use dlrm::storage::StorageKind;
use dlrm::train::DataSource;
use std::cell::RefCell;

const SEED: u64 = 7;
const LR: f32 = 0.05;
const STEPS: usize = 3;
/// Slices of whole 128-row chunks on 2 and 3 ranks (the ordered reduction needs them).
const BATCH: usize = 768;

/// Tables of 3 to 5,000 rows: the ones under 2,048 rows are replicated when asked.
fn arch() -> Architecture {
    tiny_arch(vec![100, 400, 1000, 2000, 5000, 50, 3, 3000])
}

/// A rank that runs each collective's side work before the collective, logging the calls:
/// the name of each collective, and "(" / ")" around its side work.
struct WorkFirst {
    rank: LocalRank,
    log: RefCell<Vec<&'static str>>,
}

impl WorkFirst {
    fn beside(&self, name: &'static str, work: &mut dyn FnMut()) {
        self.log.borrow_mut().extend([name, "("]);
        work();
        self.log.borrow_mut().push(")");
    }
}

impl Collectives for WorkFirst {
    fn rank(&self) -> usize {
        self.rank.rank()
    }

    fn size(&self) -> usize {
        self.rank.size()
    }

    fn all_to_all_v_during(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
        work: &mut dyn FnMut(),
    ) {
        self.beside("all-to-all", work);
        self.rank.all_to_all_v(send, send_counts, recv, recv_counts);
    }

    fn all_gather_v_during(
        &self,
        send: &[f32],
        recv: &mut [f32],
        counts: &[usize],
        work: &mut dyn FnMut(),
    ) {
        self.beside("all-gather", work);
        self.rank.all_gather_v(send, recv, counts);
    }

    fn all_reduce_sum_during(&self, values: &mut [f32], work: &mut dyn FnMut()) {
        self.beside("all-reduce", work);
        self.rank.all_reduce_sum(values);
    }

    fn all_gather_f64(&self, value: f64) -> Vec<f64> {
        self.rank.all_gather_f64(value)
    }

    fn barrier(&self) {
        self.rank.barrier()
    }
}

type Run = (Vec<Tensors>, Vec<f32>, Vec<&'static str>);

/// Every rank's tensors (a row-split table's range under the table's name), rank 0's
/// held-out predictions and rank 0's log of its first training step (empty with `work_first`
/// off).
fn train(plan: &ShardPlan, reduction: DenseReduction, work_first: bool) -> Run {
    let (arch, data) = (arch(), teacher_data(&arch(), 3, 13));
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (LocalGroup::ranks(plan.ranks()).into_iter())
            .map(|rank| {
                let (arch, plan, data) = (arch.clone(), plan.clone(), &data);
                s.spawn(move || {
                    let logged = WorkFirst {
                        rank,
                        log: RefCell::new(Vec::new()),
                    };
                    let comm: &dyn Collectives = if work_first { &logged } else { &logged.rank };
                    let source = TableSource::Init(&StorageKind::Anon);
                    let optimizer = OptimizerKind::Adagrad;
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
                    m.reserve(BATCH.max(1_000));
                    let (mut b, mut first_step) = (Batch::default(), None);
                    for s in 0..STEPS {
                        data.fill_train((s * BATCH) as u64, BATCH, &mut b).unwrap();
                        m.train_step(comm, &b.view(), LR, &mut PhaseTimer::default())
                            .unwrap();
                        first_step.get_or_insert_with(|| logged.log.take());
                    }
                    data.fill_test(0, 1_000, &mut b).unwrap();
                    let mut probs = Vec::new();
                    m.predict(comm, &b.view(), &mut probs).unwrap();
                    (tensors(&m), probs, first_step.unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ranks_tensors = results.iter().map(|r| r.0.clone()).collect();
    let (_, probs, log) = results.into_iter().next().unwrap();
    (ranks_tensors, probs, log)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_same_bits(want: &Run, got: &Run) {
    assert_eq!(want.0.len(), got.0.len());
    for (rank, (want, got)) in want.0.iter().zip(&got.0).enumerate() {
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        for (name, values) in want {
            assert_eq!(bits(values), bits(&got[name]), "rank {rank}: {name}");
        }
    }
    assert_eq!(bits(&want.1), bits(&got.1), "held-out predictions");
}

/// The plans the overlap must hold under: whole tables with the tiny ones replicated
/// (replica gradients gathered inside the dense reduction's window), and every table split
/// row-wise (the row shards' exchanges inside it).
fn plans(ranks: usize) -> Vec<ShardPlan> {
    let costs = table_costs(&arch(), OptimizerKind::Adagrad);
    let options = PlanOptions {
        budget: None,
        replicate_tiny: true,
    };
    vec![
        ShardPlan::table_wise(&costs, ranks, options).unwrap(),
        ShardPlan::row_wise(&costs, ranks, options).unwrap(),
    ]
}

#[test]
fn compute_before_or_after_each_collective_gives_the_same_bits() {
    for ranks in [2, 3] {
        for plan in plans(ranks) {
            for reduction in [DenseReduction::AllReduce, DenseReduction::Ordered] {
                let after = train(&plan, reduction, false);
                let before = train(&plan, reduction, true);
                assert_same_bits(&after, &before);
            }
        }
    }
}

/// The calls between the dense reduction's "(" and its matching ")" in `log`.
fn reduction_window<'a>(log: &[&'a str], reduction: &str) -> Vec<&'a str> {
    let at = log
        .iter()
        .position(|&c| c == reduction)
        .unwrap_or_else(|| panic!("no {reduction} in {log:?}"));
    let mut depth = 0;
    let mut window = Vec::new();
    for &call in &log[at + 1..] {
        depth += match call {
            "(" => 1,
            ")" => -1,
            _ => 0,
        };
        if depth == 0 {
            return window;
        }
        window.push(call);
    }
    panic!("unclosed window in {log:?}")
}

#[test]
fn the_dense_reduction_is_in_flight_during_the_embedding_backward() {
    let plan = &plans(2)[0];
    // The all-reduce's window holds the backward all-to-all and the replicas' gather.
    let log = train(plan, DenseReduction::AllReduce, true).2;
    assert_eq!(
        reduction_window(&log, "all-reduce"),
        ["(", "all-to-all", "(", ")", "all-gather", "(", ")"],
        "{log:?}"
    );
    // The ordered reduction's gather (the step's first all-gather) holds the same.
    let log = train(plan, DenseReduction::Ordered, true).2;
    assert_eq!(
        reduction_window(&log, "all-gather"),
        ["(", "all-to-all", "(", ")", "all-gather", "(", ")"],
        "{log:?}"
    );
    // The forward all-to-all comes first, and nothing else precedes the reduction.
    assert_eq!(log[..4], ["all-to-all", "(", ")", "all-gather"], "{log:?}");
}
