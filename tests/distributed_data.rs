//! What each rank of hybrid-parallel training reads: its part of every global batch (its
//! slice's dense rows and labels, its tables' ids for all samples), never the whole batch.
//! A synthetic part is the whole batch's bits at those places; a recording source shows that
//! `train_sharded` asks each rank (run as threads, [`LocalGroup`]) for its part only, and that
//! the held-out metrics, whose labels the ranks gather, equal one rank's to the bit.

use dlrm::config::Preset;
use dlrm::data::synthetic::{Generation, Split, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::data::{Batch, RankPart};
use dlrm::distributed::{Collectives, LocalGroup, PlanOptions, ShardPlan, TableCost};
use dlrm::model::OptimizerKind;
use dlrm::model::architecture::{Architecture, InteractionOp};
use dlrm::model::dlrm::{DenseReduction, ShardedDlrm, slice_of};
use dlrm::model::parameters::TableSource;
use dlrm::storage::StorageKind;
use dlrm::train::{DataSource, LrSchedule, Quiet, ShardedReport, TrainOptions, train_sharded};
use std::ops::Range;
use std::sync::Mutex;

fn arch() -> Architecture {
    let p = Preset::Tiny.values();
    let (bottom, top) = (p.bottom.to_vec(), p.top.to_vec());
    Architecture::new(16, p.table_sizes, bottom, top, InteractionOp::Dot, false).unwrap()
}

fn generator(arch: &Architecture) -> SyntheticData {
    SyntheticData::new(SyntheticConfig {
        num_dense: arch.num_dense(),
        table_sizes: arch.table_sizes.clone(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 3,
        fixed_bag_size: false,
        seed: 7,
    })
}

#[test]
fn a_synthetic_part_holds_the_whole_batch_bits_at_its_rows_and_tables() {
    let arch = arch();
    let data = generator(&arch);
    let (first, size, nd) = (1000, 99, arch.num_dense());
    let mut whole = Batch::default();
    data.fill_batch(Split::Train, first, size, &mut whole);
    // Uneven slices (99 / 4) and tables in no particular order.
    for (rows, tables) in [
        (0..24, vec![0, 3]),
        (74..99, vec![7, 1, 2]),
        (24..49, vec![]),
    ] {
        let part = RankPart {
            rows: rows.clone(),
            tables: &tables,
        };
        let mut got = Batch::default();
        data.fill_part(Split::Train, first, size, &part, &mut got);
        assert_eq!(got.size(), size);
        for i in 0..size {
            let (dense, label) = if rows.contains(&i) {
                (whole.dense_row(i), whole.labels[i])
            } else {
                (&[0.0; 64][..nd], 0.0)
            };
            assert_eq!(got.dense_row(i), dense, "sample {i}");
            assert_eq!(got.labels[i], label, "sample {i}");
        }
        for t in 0..arch.num_tables() {
            if tables.contains(&t) {
                assert_eq!(got.indices[t], whole.indices[t], "table {t}");
                assert_eq!(got.offsets[t], whole.offsets[t], "table {t}");
            } else {
                assert_eq!(got.indices[t], vec![0; size], "table {t}");
                assert!(got.is_one_hot(t), "table {t}");
            }
        }
    }
}

/// The parts a rank asked for: its rows and tables, per request.
type Requests = Vec<(Range<usize>, Vec<usize>)>;

/// A source that records the parts it is asked for and refuses to give a whole batch.
struct Recording {
    inner: SyntheticSource,
    parts: Mutex<Requests>,
}

impl Recording {
    fn record(&self, part: &RankPart) {
        let entry = (part.rows.clone(), part.tables.to_vec());
        self.parts.lock().unwrap().push(entry);
    }
}

impl DataSource for Recording {
    fn train_len(&self) -> u64 {
        self.inner.train_len()
    }
    fn test_len(&self) -> u64 {
        self.inner.test_len()
    }
    fn fill_train(&self, _: u64, _: usize, _: &mut Batch) -> anyhow::Result<()> {
        panic!("a rank asked for a whole training batch")
    }
    fn fill_test(&self, _: u64, _: usize, _: &mut Batch) -> anyhow::Result<()> {
        panic!("a rank asked for a whole held-out batch")
    }
    fn fill_part(
        &self,
        split: Split,
        first: u64,
        size: usize,
        part: &RankPart,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        self.record(part);
        self.inner.fill_part(split, first, size, part, batch)
    }
}

/// Trains on `ranks` threads (batch 768, whole 128-row chunks per rank: 4 steps; 1000 held-out
/// samples: a last batch of 232, split unevenly),
/// each reading from its own recording source. Returns rank 0's report, and per rank the
/// tables it reads (its own and the replicated) and the parts it asked for.
fn run(ranks: usize) -> (ShardedReport, Vec<(Vec<usize>, Requests)>) {
    let arch = arch();
    let tables: Vec<TableCost> = (arch.table_sizes.iter())
        .map(|&rows| TableCost {
            rows,
            bytes: (rows * arch.embedding_dim * 4) as u64,
            lookup_bytes: 3 * arch.embedding_dim as u64 * 4,
        })
        .collect();
    // The tiny tables replicated: every rank reads their ids for the whole batch too.
    let options = PlanOptions {
        budget: None,
        replicate_tiny: true,
    };
    let plan = ShardPlan::table_wise(&tables, ranks, options).unwrap();
    let opts = TrainOptions {
        test_batch_size: 768,
        ..TrainOptions::new(768, LrSchedule::constant(0.05))
    };
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (LocalGroup::ranks(ranks).into_iter())
            .map(|comm| {
                let (arch, plan, opts) = (arch.clone(), plan.clone(), &opts);
                s.spawn(move || {
                    let source = Recording {
                        inner: SyntheticSource::on_the_fly(generator(&arch), 3072, 1000),
                        parts: Mutex::new(Vec::new()),
                    };
                    let storage = StorageKind::Anon;
                    let mut model = ShardedDlrm::new(
                        arch,
                        OptimizerKind::Sgd,
                        3,
                        TableSource::Init(&storage),
                        plan,
                        comm.rank(),
                        DenseReduction::Ordered,
                    )
                    .unwrap();
                    let report =
                        train_sharded(&comm, &mut model, &source, opts, 1, &mut Quiet).unwrap();
                    let parts = source.parts.into_inner().unwrap();
                    (report, (model.tables_read().to_vec(), parts))
                })
            })
            .collect();
        let all: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        all
    });
    let mut results = results.into_iter();
    let (report, first) = results.next().unwrap();
    (
        report,
        [first].into_iter().chain(results.map(|r| r.1)).collect(),
    )
}

#[test]
fn each_rank_reads_only_its_part_and_the_metrics_equal_one_ranks() {
    let (one, _) = run(1);
    let (three, parts) = run(3);
    for (rank, (tables, asked)) in parts.iter().enumerate() {
        assert_eq!(
            asked.len(),
            4 + 2,
            "rank {rank}: 4 steps, 2 held-out batches"
        );
        for (i, (rows, got_tables)) in asked.iter().enumerate() {
            let size = if i == 5 { 232 } else { 768 };
            assert_eq!(*rows, slice_of(rank, 3, size), "rank {rank}, request {i}");
            assert_eq!(got_tables, tables, "rank {rank}, request {i}");
        }
    }
    let mut read: Vec<usize> = parts.iter().flat_map(|(t, _)| t.clone()).collect();
    read.sort_unstable();
    read.dedup();
    assert_eq!(read, (0..arch().num_tables()).collect::<Vec<_>>());
    for (rank, (tables, _)) in parts.iter().enumerate() {
        assert!(
            tables.len() < arch().num_tables(),
            "rank {rank} reads {tables:?}"
        );
    }
    for (a, b) in [
        (one.test_loss, three.test_loss),
        (one.test_auc, three.test_auc),
        (one.test_accuracy, three.test_accuracy),
    ] {
        assert_eq!(a.to_bits(), b.to_bits(), "{one:?}\nvs\n{three:?}");
    }
}
