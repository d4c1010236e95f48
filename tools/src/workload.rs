//! What a scaling point runs: DLRM training steps, or one kernel family on the same model's
//! shapes (a GEMM layer, the embedding-bag forward, the fused sparse update).
//!
//! Everything a workload owns (tables, optimizer state, MLP weights, buffers) is created by
//! [`build`], which the study calls inside the point's thread pool: the parallel table
//! initialisation then first-touches every page from the pool's own (pinned) threads, so on a
//! NUMA machine the pages land on the sockets that use them rather than on the socket of the
//! main thread.

use anyhow::{Context, Result, ensure};
use dlrm::data::Batch;
use dlrm::model::architecture::Architecture;
use dlrm::model::dlrm::Dlrm;
use dlrm::model::sparse::SparseTables;
use dlrm::model::{Model, OptimizerKind, PhaseSeconds, PhaseTimer, TableSource};
use dlrm::rng::{SplitMix64, derive_key};
use dlrm::storage::StorageKind;
use dlrm::train::DataSource;
use dlrm_kernels::gemm::{MatMut, MatRef, Precision, linear_forward};
use dlrm_kernels::parallel::Par;

/// Distinct batches a kernel workload cycles through (their ids spread over the tables, so the
/// lookups stay as cold as in training).
pub const KERNEL_BATCHES: usize = 8;

/// Which workload a study times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    /// Full training steps (data, forward, backward, fused updates), as `dlrm train` runs them.
    Train,
    /// One MLP layer's forward GEMM, Y = X W^T (M = batch rows).
    Gemm,
    /// The embedding-bag forward of every table into the feature rows.
    Embedding,
    /// The fused sparse backward + optimizer update of every table.
    SparseUpdate,
}

impl WorkloadKind {
    /// The name used in reports and file columns.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Train => "train",
            WorkloadKind::Gemm => "gemm",
            WorkloadKind::Embedding => "embedding",
            WorkloadKind::SparseUpdate => "sparse-update",
        }
    }

    /// Whether the workload reads batches of the synthetic data set.
    pub fn needs_data(self) -> bool {
        self != WorkloadKind::Gemm
    }
}

/// What every point of a study runs; only the batch (weak scaling) changes between points.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub kind: WorkloadKind,
    pub arch: Architecture,
    pub optimizer: OptimizerKind,
    pub learning_rate: f32,
    /// Input and output width of the GEMM workload's layer.
    pub gemm_in_out: (usize, usize),
    pub seed: u64,
}

/// One timed unit of work, repeated by the measurement.
pub trait Workload {
    /// Samples (batch rows) one step processes.
    fn samples_per_step(&self) -> usize;
    /// Runs one step.
    fn step(&mut self) -> Result<()>;
    /// Time per phase accumulated by all steps so far (training only).
    fn phases(&self) -> Option<PhaseSeconds>;
    /// Floating-point operations per sample, where the workload has a meaningful count.
    fn flops_per_sample(&self) -> Option<f64>;
}

/// Builds the workload for batches of `batch` samples, on the current rayon pool. `data` (the
/// training split is used) must be given for workloads that [need it](WorkloadKind::needs_data)
/// and hold at least one batch.
pub fn build<'a>(
    spec: &WorkloadSpec,
    data: Option<&'a dyn DataSource>,
    batch: usize,
) -> Result<Box<dyn Workload + 'a>> {
    ensure!(batch > 0, "the batch must hold at least one sample");
    let data = || {
        let d = data.context("this workload reads the synthetic data set")?;
        ensure!(
            d.train_len() >= batch as u64,
            "the data set ({} samples) is smaller than one batch of {batch}",
            d.train_len()
        );
        Ok(d)
    };
    Ok(match spec.kind {
        WorkloadKind::Train => Box::new(Train::new(spec, data()?, batch)?),
        WorkloadKind::Gemm => Box::new(Gemm::new(spec, batch)),
        WorkloadKind::Embedding => Box::new(EmbeddingForward::new(spec, data()?, batch)?),
        WorkloadKind::SparseUpdate => Box::new(SparseUpdate::new(spec, data()?, batch)?),
    })
}

/// Training steps exactly as `dlrm train`'s loop runs them: the batch is filled from the data
/// set (counted as the `other` phase), then `train_step` at the preset's learning rate.
struct Train<'a> {
    model: Dlrm,
    timer: PhaseTimer,
    data: &'a dyn DataSource,
    batch: Batch,
    size: usize,
    batches: u64,
    next: u64,
    lr: f32,
    flops_per_sample: f64,
}

impl<'a> Train<'a> {
    fn new(spec: &WorkloadSpec, data: &'a dyn DataSource, size: usize) -> Result<Train<'a>> {
        let mut model = Dlrm::new(
            spec.arch.clone(),
            spec.optimizer,
            &StorageKind::Anon,
            spec.seed,
        )?;
        model.reserve(size);
        Ok(Train {
            batch: Batch::new(model.num_dense(), model.num_tables()),
            timer: PhaseTimer::default(),
            model,
            data,
            size,
            batches: data.train_len() / size as u64,
            next: 0,
            lr: spec.learning_rate,
            flops_per_sample: spec.arch.flops_per_sample(),
        })
    }
}

impl Workload for Train<'_> {
    fn samples_per_step(&self) -> usize {
        self.size
    }

    fn step(&mut self) -> Result<()> {
        let first = (self.next % self.batches) * self.size as u64;
        self.next += 1;
        self.timer.restart();
        let batch = self.data.train_view(first, self.size, &mut self.batch)?;
        self.timer.lap(|p| &mut p.other);
        let loss = self.model.train_step(&batch, self.lr, &mut self.timer)?;
        ensure!(
            loss.is_finite(),
            "the loss diverged to {loss}; lower the learning rate"
        );
        Ok(())
    }

    fn phases(&self) -> Option<PhaseSeconds> {
        Some(self.timer.seconds())
    }

    fn flops_per_sample(&self) -> Option<f64> {
        Some(self.flops_per_sample)
    }
}

/// Deterministic values in [-scale, scale) for weights and gradients of the kernel workloads.
fn random_values(len: usize, seed: u64, stream: u64, scale: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(derive_key(seed, &[0x5ca1_ab1e, stream]));
    (0..len).map(|_| rng.uniform(-scale, scale)).collect()
}

/// Y = X W^T for one layer (`gemm_in_out`), M = batch rows.
struct Gemm {
    x: Vec<f32>,
    w: Vec<f32>,
    y: Vec<f32>,
    rows: usize,
    inputs: usize,
    outputs: usize,
}

impl Gemm {
    fn new(spec: &WorkloadSpec, rows: usize) -> Gemm {
        let (inputs, outputs) = spec.gemm_in_out;
        Gemm {
            x: random_values(rows * inputs, spec.seed, 0, 1.0),
            w: random_values(outputs * inputs, spec.seed, 1, 1.0),
            y: vec![0.0; rows * outputs],
            rows,
            inputs,
            outputs,
        }
    }
}

impl Workload for Gemm {
    fn samples_per_step(&self) -> usize {
        self.rows
    }

    fn step(&mut self) -> Result<()> {
        linear_forward(
            MatRef::new(&self.x, self.rows, self.inputs),
            MatRef::new(&self.w, self.outputs, self.inputs),
            None,
            false,
            MatMut::new(&mut self.y, self.rows, self.outputs),
            Precision::F32,
            Par::Rayon,
        );
        Ok(())
    }

    fn phases(&self) -> Option<PhaseSeconds> {
        None
    }

    fn flops_per_sample(&self) -> Option<f64> {
        Some(2.0 * self.inputs as f64 * self.outputs as f64)
    }
}

/// The model's tables (anonymous maps, initialised on the current pool) with the state of
/// `optimizer`, and [`KERNEL_BATCHES`] batches of the data set to cycle through.
struct TablesAndBatches {
    tables: SparseTables,
    batches: Vec<Batch>,
    next: usize,
}

impl TablesAndBatches {
    fn new(
        spec: &WorkloadSpec,
        optimizer: OptimizerKind,
        data: &dyn DataSource,
        size: usize,
    ) -> Result<TablesAndBatches> {
        let tables = SparseTables::create(
            0,
            &spec.arch.table_sizes,
            spec.arch.embedding_dim,
            optimizer,
            TableSource::Init(&StorageKind::Anon),
            spec.seed,
        )?;
        let available = (data.train_len() / size as u64) as usize;
        let batches = (0..KERNEL_BATCHES.min(available))
            .map(|i| {
                let mut b = Batch::default();
                data.fill_train((i * size) as u64, size, &mut b)?;
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TablesAndBatches {
            tables,
            batches,
            next: 0,
        })
    }

    /// The next batch of the cycle, with the tables.
    fn next(&mut self) -> (&mut SparseTables, &Batch) {
        let i = self.next;
        self.next = (i + 1) % self.batches.len();
        (&mut self.tables, &self.batches[i])
    }

    fn samples(&self) -> usize {
        self.batches[0].size()
    }
}

/// Sum-pooled embedding bags of every table into feature rows of width tables x d.
struct EmbeddingForward {
    src: TablesAndBatches,
    out: Vec<f32>,
    dim: usize,
}

impl EmbeddingForward {
    fn new(spec: &WorkloadSpec, data: &dyn DataSource, size: usize) -> Result<EmbeddingForward> {
        let dim = spec.arch.embedding_dim;
        Ok(EmbeddingForward {
            // The forward reads no optimizer state: none is allocated.
            src: TablesAndBatches::new(spec, OptimizerKind::Sgd, data, size)?,
            out: vec![0.0; size * spec.arch.num_tables() * dim],
            dim,
        })
    }
}

impl Workload for EmbeddingForward {
    fn samples_per_step(&self) -> usize {
        self.src.samples()
    }

    fn step(&mut self) -> Result<()> {
        let (tables, batch) = self.src.next();
        let (nt, d) = (tables.len(), self.dim);
        let out = MatMut::new(&mut self.out, batch.size(), nt * d);
        tables.forward(&batch.view(), out, Par::Rayon);
        Ok(())
    }

    fn phases(&self) -> Option<PhaseSeconds> {
        None
    }

    fn flops_per_sample(&self) -> Option<f64> {
        None
    }
}

/// The fused sparse backward and optimizer update of every table (tables in parallel, as the
/// model runs it), from a fixed output gradient.
struct SparseUpdate {
    src: TablesAndBatches,
    grad: Vec<f32>,
    dim: usize,
    lr: f32,
}

impl SparseUpdate {
    fn new(spec: &WorkloadSpec, data: &dyn DataSource, size: usize) -> Result<SparseUpdate> {
        let src = TablesAndBatches::new(spec, spec.optimizer, data, size)?;
        let dim = spec.arch.embedding_dim;
        Ok(SparseUpdate {
            grad: random_values(size * src.tables.len() * dim, spec.seed, 2, 1e-3),
            src,
            dim,
            lr: spec.learning_rate,
        })
    }
}

impl Workload for SparseUpdate {
    fn samples_per_step(&self) -> usize {
        self.src.samples()
    }

    fn step(&mut self) -> Result<()> {
        let (tables, batch) = self.src.next();
        let (d, stride, grad) = (self.dim, tables.len() * self.dim, &self.grad);
        tables.update_batch(
            &batch.view(),
            |t| (&grad[t * d..], stride),
            self.lr,
            0.0,
            Par::Rayon,
        );
        Ok(())
    }

    fn phases(&self) -> Option<PhaseSeconds> {
        None
    }

    fn flops_per_sample(&self) -> Option<f64> {
        None
    }
}
