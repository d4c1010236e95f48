//! Embedding-bag forward and the fused backward + sparse optimizer update, on tables far larger
//! than the caches: `embedding/<variant>[-<impl>]-t<threads>/<rows>x<dim>-p<pooling>-<ids>[-file]`.
//!
//! Variants:
//! - `fwd-sum-ours`: [`embedding_bag_forward`], sum pooling, into a 2048 x dim output.
//! - `fwd-plaingather`: the same rows copied with no arithmetic ([`gather_rows`]), the memory
//!   system's ceiling for the forward. Each batch is copied 2048 ids at a time into the same
//!   2048 x dim buffer, so it reads exactly the rows the forward reads and its output stays
//!   as small (and as cache-resident) as the forward's.
//! - `bwd-sgd`, `bwd-adagrad`, `bwd-rowwise-adagrad`: [`embedding_bag_backward_update`] with
//!   each optimizer on the same batches (gradient grouping by row, duplicate summing and the
//!   update of every distinct row, straight into the table and its optimizer state).
//!
//! Throughput is the bytes of rows read, lookups x dim x 4 (FBGEMM's metric), for every
//! variant, so criterion prints GB/s, and the GB/s of a backward over the forward's on the same
//! shape is the forward's time over the backward's. Lookups per second are GB/s / (4 dim).
//!
//! Batches are 2048 bags of `pooling` ids each, uniform or Zipf(1.05) over the rows (Zipf ranks
//! scattered over the whole table by [`RankScatter`], so hot rows are not neighbours). They
//! are drawn up front, enough of them that their lookups read [`COLD_BYTES`] of rows, far more
//! than the last-level cache, and every iteration takes the next one: lookups stay cold (only
//! Zipf's hot rows stay cached, as they do in training). Tables are anonymous maps with
//! transparent huge pages (the default storage) or, with `-file`, eagerly initialised table
//! files in the system temp dir (4 KiB pages), side by side.
//!
//! The default run is a representative subset (10M rows at d = 16, 64, 128; the other axes at
//! d = 64); `DLRM_BENCH_SWEEP=1` runs the full matrix (1M and 10M rows x d in {16, 64, 128} x
//! pooling {1, 32} x uniform and Zipf ids x anon and file storage x 1 and 2 threads; its largest
//! case, 10M x 128 with Adagrad, holds 10.2 GB of table and state, in RAM or in files).
//! One family: `cargo bench --bench embedding`; a subset: `cargo bench --bench embedding --
//! 'fwd-.*/10Mx64'`.

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use dlrm::kernels::embedding::{
    Bags, Pooling, SparseGradWorkspace, embedding_bag_forward, gather_rows,
};
use dlrm::kernels::mat::{MatMut, MatRef};
use dlrm::kernels::optim::{SparseOptimizer, TableMut, embedding_bag_backward_update};
use dlrm::kernels::parallel::Par;
use dlrm::model::embedding::{EmbeddingTable, OptimizerState};
use dlrm::rng::{RankScatter, SplitMix64, Zipf};
use dlrm::storage::StorageKind;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

/// Bags per batch.
const BATCH: usize = 2048;

/// Bytes of rows the pre-drawn batches of one shape read in total: 4x the largest last-level
/// cache of the machines this runs on (260 MiB), so a batch's rows are evicted long before it
/// comes round again.
const COLD_BYTES: usize = 1 << 30;

/// Zipf exponent of the skewed ids (Criteo-like popularity).
const ZIPF_S: f64 = 1.05;

/// Learning rate and epsilon of the updates: small, so the tables stay well scaled however many
/// iterations criterion runs.
const LR: f32 = 1e-3;
const EPS: f32 = 1e-8;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ids {
    Uniform,
    Zipf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Storage {
    Anon,
    File,
}

/// The batches of one shape: BATCH bags of `pooling` ids, the ids of all batches in one pool.
struct Batches {
    pooling: usize,
    ids: Vec<u32>,
    offsets: Vec<u32>,
    count: usize,
}

impl Batches {
    /// Enough batches over a `rows`-row table of width `dim` that they read COLD_BYTES of rows.
    fn draw(rows: usize, dim: usize, pooling: usize, ids: Ids, seed: u64) -> Batches {
        let per_batch = BATCH * pooling;
        let count = (COLD_BYTES / (per_batch * dim * 4)).max(1);
        let mut rng = SplitMix64::new(seed);
        let n = count * per_batch;
        let ids = match ids {
            Ids::Uniform => (0..n).map(|_| rng.below(rows as u64) as u32).collect(),
            Ids::Zipf => {
                let zipf = Zipf::new(rows as u64, ZIPF_S);
                let scatter = RankScatter::new(rows as u64, seed);
                (0..n)
                    .map(|_| scatter.map(zipf.sample(&mut rng) - 1) as u32)
                    .collect()
            }
        };
        let offsets = (0..BATCH).map(|b| (b * pooling) as u32).collect();
        Batches {
            pooling,
            ids,
            offsets,
            count,
        }
    }

    /// The ids of batch `k`.
    fn ids(&self, k: usize) -> &[u32] {
        let n = BATCH * self.pooling;
        &self.ids[k * n..(k + 1) * n]
    }

    fn bags(&self, k: usize) -> Bags<'_> {
        Bags::with_offsets(self.ids(k), &self.offsets)
    }
}

/// Thread counts of the forward and backward benchmarks of one shape.
struct Load {
    pooling: usize,
    ids: Ids,
    fwd_threads: &'static [usize],
    bwd_threads: &'static [usize],
}

/// One table and the loads run on it.
struct TablePlan {
    rows: usize,
    dim: usize,
    storage: Storage,
    loads: Vec<Load>,
}

const BOTH: &[usize] = &[1, 2];
const ONE: &[usize] = &[1];
const NONE: &[usize] = &[];

/// The shapes to run: everything with `sweep`, else the representative subset.
fn plan(sweep: bool) -> Vec<TablePlan> {
    let mut plans = Vec::new();
    for rows in [1_000_000, 10_000_000] {
        for dim in [16, 64, 128] {
            for storage in [Storage::Anon, Storage::File] {
                let mut loads = Vec::new();
                for pooling in [1, 32] {
                    for ids in [Ids::Uniform, Ids::Zipf] {
                        let (fwd_threads, bwd_threads) = if sweep {
                            (BOTH, BOTH)
                        } else {
                            default_threads(rows, dim, storage, ids)
                        };
                        if !fwd_threads.is_empty() || !bwd_threads.is_empty() {
                            loads.push(Load {
                                pooling,
                                ids,
                                fwd_threads,
                                bwd_threads,
                            });
                        }
                    }
                }
                if !loads.is_empty() {
                    plans.push(TablePlan {
                        rows,
                        dim,
                        storage,
                        loads,
                    });
                }
            }
        }
    }
    plans
}

/// The default subset (forward threads, backward threads): the cold 10M-row anonymous tables
/// at every width with uniform ids; Zipf ids, file storage and a 1M-row table at d = 64; the
/// backward at d = 16 and 64 (d = 128 with Adagrad state needs 10 GB), on 2 threads at d = 64.
fn default_threads(
    rows: usize,
    dim: usize,
    storage: Storage,
    ids: Ids,
) -> (&'static [usize], &'static [usize]) {
    let big = rows == 10_000_000;
    let uniform = ids == Ids::Uniform;
    match storage {
        Storage::Anon if big && (uniform || dim == 64) => {
            let bwd = match dim {
                64 if uniform => BOTH,
                16 if uniform => ONE,
                64 => ONE,
                _ => NONE,
            };
            (BOTH, bwd)
        }
        Storage::Anon if !big && dim == 64 && uniform => (BOTH, NONE),
        Storage::File if big && dim == 64 && uniform => (BOTH, NONE),
        _ => (NONE, NONE),
    }
}

/// A fresh directory for table files, removed with its contents on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("dlrm-bench-embedding-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the table directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rows_name(rows: usize) -> String {
    if rows.is_multiple_of(1_000_000) {
        format!("{}M", rows / 1_000_000)
    } else {
        rows.to_string()
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn optimizers() -> [(&'static str, SparseOptimizer); 3] {
    [
        ("sgd", SparseOptimizer::Sgd { lr: LR }),
        ("adagrad", SparseOptimizer::Adagrad { lr: LR, eps: EPS }),
        (
            "rowwise-adagrad",
            SparseOptimizer::RowwiseAdagrad { lr: LR, eps: EPS },
        ),
    ]
}

fn bench_embedding(c: &mut Criterion) {
    let sweep = std::env::var_os("DLRM_BENCH_SWEEP").is_some();
    let mut group = c.benchmark_group("embedding");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        // Up to tens of milliseconds per iteration: the same iteration count in every sample.
        .sampling_mode(SamplingMode::Flat);
    let pools = [(1, pool(1)), (2, pool(2))];
    let pool_of = |t: usize| &pools.iter().find(|(n, _)| *n == t).expect("pool").1;
    for plan in plan(sweep) {
        let (rows, dim) = (plan.rows, plan.dim);
        let dir = TempDir::new();
        let storage = match plan.storage {
            Storage::Anon => StorageKind::Anon,
            Storage::File => StorageKind::File {
                dir: dir.0.clone(),
                lazy_init: false,
            },
        };
        let mut table = EmbeddingTable::create(0, rows, dim, 1, &storage).expect("table");
        let mut out = vec![0.0f32; BATCH * dim];
        let grad_out: Vec<f32> = (0..BATCH * dim)
            .map(|i| ((i % 23) as f32 - 11.0) * 1e-3)
            .collect();
        for load in &plan.loads {
            let batches = Batches::draw(rows, dim, load.pooling, load.ids, 7 + dim as u64);
            let shape = format!(
                "{}x{dim}-p{}-{}{}",
                rows_name(rows),
                load.pooling,
                match load.ids {
                    Ids::Uniform => "uniform",
                    Ids::Zipf => "zipf",
                },
                match plan.storage {
                    Storage::Anon => "",
                    Storage::File => "-file",
                }
            );
            group.throughput(Throughput::BytesDecimal(
                (BATCH * load.pooling * dim * 4) as u64,
            ));
            let mut next = 0;
            let mut take = || {
                next = (next + 1) % batches.count;
                next
            };
            for &t in load.fwd_threads {
                let weights = table.weights();
                let id = BenchmarkId::new(format!("fwd-sum-ours-t{t}"), &shape);
                group.bench_function(id, |b| {
                    pool_of(t).install(|| {
                        b.iter(|| {
                            let bags = batches.bags(take());
                            embedding_bag_forward(
                                MatRef::from_rows(weights, dim),
                                bags,
                                Pooling::Sum,
                                MatMut::new(&mut out, bags.len(), dim),
                                Par::Rayon,
                            );
                        })
                    })
                });
                let id = BenchmarkId::new(format!("fwd-plaingather-t{t}"), &shape);
                group.bench_function(id, |b| {
                    pool_of(t).install(|| {
                        b.iter(|| {
                            for ids in batches.ids(take()).chunks(BATCH) {
                                gather_rows(
                                    MatRef::from_rows(weights, dim),
                                    ids,
                                    MatMut::new(&mut out, ids.len(), dim),
                                    Par::Rayon,
                                );
                            }
                        })
                    })
                });
                black_box(&out);
            }
            if load.bwd_threads.is_empty() {
                continue;
            }
            let mut ws = SparseGradWorkspace::default();
            for (name, opt) in optimizers() {
                let mut state =
                    OptimizerState::create_for(&table, opt.state_width(dim)).expect("state");
                for &t in load.bwd_threads {
                    let id = BenchmarkId::new(format!("bwd-{name}-t{t}"), &shape);
                    group.bench_function(id, |b| {
                        pool_of(t).install(|| {
                            b.iter(|| {
                                embedding_bag_backward_update(
                                    TableMut {
                                        weights: MatMut::from_rows(table.weights_mut(), dim),
                                        state: state.as_mut_slice(),
                                    },
                                    batches.bags(take()),
                                    Pooling::Sum,
                                    MatRef::new(&grad_out, batches.bags(take()).len(), dim),
                                    opt.into(),
                                    &mut ws,
                                    Par::Rayon,
                                )
                            })
                        })
                    });
                }
                // A file table's state is a file next to it: remove it for the next optimizer.
                let file = state.file_path().map(PathBuf::from);
                drop(state);
                if let Some(f) = file {
                    std::fs::remove_file(&f).expect("remove the state file");
                }
            }
        }
        // The table's map goes before its directory.
        drop(table);
        drop(dir);
    }
    group.finish();
}

criterion_group!(benches, bench_embedding);
criterion_main!(benches);
