//! The models and their parameters, and what the trainer needs from a model.

pub mod architecture;
pub mod dcn;
pub mod dlrm;
pub mod embedding;
pub mod fm;
pub mod loss;
pub mod mf;
pub mod mlp;
pub mod parameters;
pub mod precision;
pub mod sparse;

use crate::data::BatchView;
use crate::names::{Choice, choice_names};
use dlrm_kernels::activation::{sigmoid, squared_error};
use dlrm_kernels::embedding::BagError;
use dlrm_kernels::optim::{SparseOptimizer, adagrad_update, sgd_update};
use dlrm_kernels::parallel::Par;
use embedding::EmbeddingTable;
pub use loss::{ClickLoss, LossFunction};
pub use parameters::{ModelConfig, Parameters, TableSource, Tensor, TensorKind, TensorMut};
pub use precision::Precision;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use thiserror::Error;

/// The optimizer, named as `--optimizer` names it. Embedding tables use the named one; dense
/// parameters use SGD for `sgd` and element-wise Adagrad otherwise, as the reference does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    Sgd,
    Adagrad,
    RowwiseAdagrad,
}

impl Choice for OptimizerKind {
    const ALL: &'static [OptimizerKind] = &[
        OptimizerKind::Sgd,
        OptimizerKind::Adagrad,
        OptimizerKind::RowwiseAdagrad,
    ];
    fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adagrad => "adagrad",
            OptimizerKind::RowwiseAdagrad => "rowwise-adagrad",
        }
    }
    fn aliases(self) -> &'static [&'static str] {
        match self {
            OptimizerKind::RowwiseAdagrad => &["rwsadagrad"],
            _ => &[],
        }
    }
}

choice_names!(OptimizerKind);

/// PyTorch's Adagrad epsilon (torch.optim.Adagrad default).
pub const ADAGRAD_EPS: f32 = 1e-10;

impl OptimizerKind {
    pub fn sparse(self, lr: f32) -> SparseOptimizer {
        match self {
            OptimizerKind::Sgd => SparseOptimizer::Sgd { lr },
            OptimizerKind::Adagrad => SparseOptimizer::Adagrad {
                lr,
                eps: ADAGRAD_EPS,
            },
            OptimizerKind::RowwiseAdagrad => SparseOptimizer::RowwiseAdagrad {
                lr,
                eps: ADAGRAD_EPS,
            },
        }
    }

    /// Whether dense parameters keep Adagrad state.
    pub fn dense_adagrad(self) -> bool {
        self != OptimizerKind::Sgd
    }
}

/// The models `dlrm train --model` trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// DLRM (Naumov et al. 2019): bottom MLP, embeddings, pairwise-dot interaction, top MLP.
    Dlrm,
    /// DCN (Wang et al. 2017): a rank-one cross network beside a deep network.
    Dcn,
    /// DCN-v2 (Wang et al. 2021): a full-rank cross network beside a deep network.
    DcnV2,
    /// Factorization machine (Rendle 2010) over the dense and categorical features.
    Fm,
    /// Biased matrix factorization of ratings (users x items, from --train/--test files).
    Mf,
}

impl ModelKind {
    /// The name the report and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Dlrm => "dlrm",
            ModelKind::Dcn => "dcn",
            ModelKind::DcnV2 => "dcn-v2",
            ModelKind::Fm => "fm",
            ModelKind::Mf => "mf",
        }
    }
}

impl Choice for ModelKind {
    const ALL: &'static [ModelKind] = &[
        ModelKind::Dlrm,
        ModelKind::Dcn,
        ModelKind::DcnV2,
        ModelKind::Fm,
        ModelKind::Mf,
    ];
    fn name(self) -> &'static str {
        ModelKind::name(self)
    }
    fn help(self) -> &'static str {
        match self {
            ModelKind::Dlrm => {
                "DLRM (Naumov et al. 2019): bottom MLP, embeddings, pairwise-dot interaction, top MLP"
            }
            ModelKind::Dcn => {
                "DCN (Wang et al. 2017): a rank-one cross network beside a deep network"
            }
            ModelKind::DcnV2 => {
                "DCN-v2 (Wang et al. 2021): a full-rank cross network beside a deep network"
            }
            ModelKind::Fm => {
                "Factorization machine (Rendle 2010) over the dense and categorical features"
            }
            ModelKind::Mf => {
                "Biased matrix factorization of ratings (users x items, from --train/--test files)"
            }
        }
    }
}

choice_names!(ModelKind);

/// The optimizer of a model's dense parameters (everything but the embedding tables): SGD for
/// `sgd`, element-wise Adagrad otherwise (as [`OptimizerKind`] says), with zeroed accumulators
/// for each parameter tensor (none for SGD).
#[derive(Clone, Debug)]
pub struct DenseOptimizer {
    kind: OptimizerKind,
    state: Vec<Vec<f32>>,
}

impl DenseOptimizer {
    /// The optimizer of parameter tensors of `lens` values each, in the order `step` takes them.
    pub fn new(kind: OptimizerKind, lens: impl IntoIterator<Item = usize>) -> DenseOptimizer {
        let adagrad = kind.dense_adagrad();
        DenseOptimizer {
            kind,
            state: lens
                .into_iter()
                .map(|n| vec![0.0; if adagrad { n } else { 0 }])
                .collect(),
        }
    }

    /// One step of every (parameter, gradient) pair, in the order of `new`.
    pub fn step<'p>(
        &mut self,
        params: impl IntoIterator<Item = (&'p mut [f32], &'p [f32])>,
        lr: f32,
        par: Par,
    ) {
        for ((p, g), s) in params.into_iter().zip(&mut self.state) {
            if self.kind.dense_adagrad() {
                adagrad_update(p, g, s, lr, ADAGRAD_EPS, par);
            } else {
                sgd_update(p, g, lr, par);
            }
        }
    }

    /// Each parameter tensor's accumulators, in the order of `new` (empty for SGD).
    pub fn states(&self) -> impl Iterator<Item = &[f32]> {
        self.state.iter().map(Vec::as_slice)
    }

    pub fn states_mut(&mut self) -> impl Iterator<Item = &mut [f32]> {
        self.state.iter_mut().map(Vec::as_mut_slice)
    }
}

/// Checks a batch against a model whose tables are `tables` and that takes `num_dense` dense
/// features: table count, dense width, offsets, every id in range. This is the one check of
/// the ids: the embedding kernels trust it (see `Bags`).
pub fn validate_batch(
    batch: &BatchView,
    num_dense: usize,
    tables: &[EmbeddingTable],
) -> Result<(), BatchError> {
    validate_batch_rows(batch, num_dense, tables.len(), |t| tables[t].rows())
}

/// [`validate_batch`] against `num_tables` tables, table t of `rows(t)` rows.
pub fn validate_batch_rows(
    batch: &BatchView,
    num_dense: usize,
    num_tables: usize,
    rows: impl Fn(usize) -> usize,
) -> Result<(), BatchError> {
    let b = batch.size();
    if batch.num_tables() != num_tables {
        return Err(BatchError::TableCount {
            got: batch.num_tables(),
            expected: num_tables,
        });
    }
    if batch.num_dense != num_dense {
        return Err(BatchError::DenseWidth {
            got: batch.num_dense,
            expected: num_dense,
        });
    }
    if batch.dense.len() != b * batch.num_dense {
        return Err(BatchError::Shape(
            "dense values != samples x dense features",
        ));
    }
    for t in 0..num_tables {
        let one_hot = batch.is_one_hot(t);
        let bags = batch.bags(t);
        if bags.len() != b {
            return Err(BatchError::Offsets {
                table: t,
                sample: bags.len().min(b),
                why: if one_hot {
                    "one id per sample expected (a table without offsets is one-hot)"
                } else {
                    "one offset per sample expected"
                },
            });
        }
        // The one scan of the ids (the kernels do not check them again).
        match bags.check(rows(t)) {
            Ok(()) => {}
            Err(BagError::IdOutOfRange { position, id, rows }) => {
                return Err(BatchError::IdOutOfRange {
                    table: t,
                    position,
                    value: id,
                    rows,
                });
            }
            Err(e) => {
                return Err(BatchError::Bags {
                    table: t,
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// Bad input data for the model: says what and where.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BatchError {
    #[error(
        "table {table}: id {value} at position {position} is out of range (the table has {rows} rows)"
    )]
    IdOutOfRange {
        table: usize,
        position: usize,
        value: u32,
        rows: usize,
    },
    #[error("batch has {got} tables of ids, the model has {expected}")]
    TableCount { got: usize, expected: usize },
    #[error("batch has {got} dense features per sample, the model takes {expected}")]
    DenseWidth { got: usize, expected: usize },
    #[error("table {table}: offsets are malformed at sample {sample} ({why})")]
    Offsets {
        table: usize,
        sample: usize,
        why: &'static str,
    },
    #[error("table {table}: {source}")]
    Bags { table: usize, source: BagError },
    #[error("batch of {got} samples exceeds the model's capacity of {capacity}")]
    TooLarge { got: usize, capacity: usize },
    #[error("batch buffers are inconsistent: {0}")]
    Shape(&'static str),
}

/// Seconds spent per phase of training, as the DLRM paper's CPU profile splits a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseSeconds {
    pub emb_fwd: f64,
    pub bot_fwd: f64,
    pub interaction_fwd: f64,
    pub top_fwd: f64,
    pub loss: f64,
    pub top_bwd: f64,
    pub interaction_bwd: f64,
    pub bot_bwd: f64,
    pub emb_update: f64,
    pub dense_update: f64,
    pub other: f64,
}

impl PhaseSeconds {
    pub fn total(&self) -> f64 {
        self.emb_fwd
            + self.bot_fwd
            + self.interaction_fwd
            + self.top_fwd
            + self.loss
            + self.top_bwd
            + self.interaction_bwd
            + self.bot_bwd
            + self.emb_update
            + self.dense_update
            + self.other
    }

    /// (name, seconds) in step order.
    pub fn entries(&self) -> [(&'static str, f64); 11] {
        [
            ("emb_fwd", self.emb_fwd),
            ("bot_fwd", self.bot_fwd),
            ("interaction_fwd", self.interaction_fwd),
            ("top_fwd", self.top_fwd),
            ("loss", self.loss),
            ("top_bwd", self.top_bwd),
            ("interaction_bwd", self.interaction_bwd),
            ("bot_bwd", self.bot_bwd),
            ("emb_update", self.emb_update),
            ("dense_update", self.dense_update),
            ("other", self.other),
        ]
    }
}

/// The time of each phase of training, owned by the training loop and passed to every step:
/// each lap adds the time since the previous mark to one phase.
#[derive(Clone, Debug)]
pub struct PhaseTimer {
    seconds: PhaseSeconds,
    mark: Instant,
}

impl Default for PhaseTimer {
    fn default() -> PhaseTimer {
        PhaseTimer {
            seconds: PhaseSeconds::default(),
            mark: Instant::now(),
        }
    }
}

impl PhaseTimer {
    /// Marks now: the time since the previous mark is not counted.
    pub fn restart(&mut self) {
        self.mark = Instant::now();
    }

    /// Adds the time since the previous mark to `phase` (e.g. `|p| &mut p.emb_fwd`) and marks
    /// now.
    pub fn lap(&mut self, phase: fn(&mut PhaseSeconds) -> &mut f64) {
        let now = Instant::now();
        *phase(&mut self.seconds) += (now - self.mark).as_secs_f64();
        self.mark = now;
    }

    /// The seconds counted so far.
    pub fn seconds(&self) -> PhaseSeconds {
        self.seconds
    }
}

/// Refuses a batch larger than the buffers a model reserved (`capacity` samples).
pub fn check_capacity(batch: &BatchView, capacity: usize) -> Result<(), BatchError> {
    if batch.size() > capacity {
        return Err(BatchError::TooLarge {
            got: batch.size(),
            capacity,
        });
    }
    Ok(())
}

/// The loss head every model ends in: the sum over the batch of the loss of outputs `y`
/// against `labels` (`click` on sigmoid(y) for classification, BCE by default; the squared
/// error for regression), with the gradient of the batch's mean loss with respect to each
/// output in `grad` (and, for classification, the probabilities in `probs`).
pub fn head_loss(
    task: Task,
    click: &ClickLoss,
    y: &[f32],
    labels: &[f32],
    probs: &mut [f32],
    grad: &mut [f32],
) -> f64 {
    let b = y.len();
    match task {
        Task::Classification => click.apply(y, labels, probs, grad, 1.0 / b as f32),
        Task::Regression => squared_error(y, labels, grad, 2.0 / b as f32),
    }
}

/// What the head predicts from outputs `y`: click probabilities, or the values for regression.
pub fn head_predict(task: Task, y: &[f32], out: &mut [f32]) {
    match task {
        Task::Classification => sigmoid(y, out),
        Task::Regression => out.copy_from_slice(y),
    }
}

/// Which parameters [`Model::first_non_finite`] scans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParameterScope {
    /// The dense parameters only (small: cheap enough for every report interval).
    Dense,
    /// The dense parameters and every embedding table.
    All,
}

/// A parameter value that is NaN or infinite: the tensor's name, the flat index and the value.
#[derive(Clone, Debug, PartialEq)]
pub struct NonFinite {
    pub name: String,
    pub index: usize,
    pub value: f32,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}] is {}", self.name, self.index, self.value)
    }
}

/// The index of the first NaN or infinite value, scanning chunks in parallel (tables reach
/// gigabytes); the lowest index wins whatever the chunk order.
pub fn first_non_finite_index(values: &[f32]) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    values
        .par_chunks(CHUNK)
        .enumerate()
        .find_map_first(|(c, chunk)| {
            chunk
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| c * CHUNK + i)
        })
}

/// The first parameter value of `model` (any set of parameters: a model, or one rank's share
/// of one) that is NaN or infinite, among the dense parameters or, with
/// `ParameterScope::All`, the embedding tables too (each tensor scanned in parallel).
pub fn first_non_finite<P: Parameters + ?Sized>(
    model: &P,
    scope: ParameterScope,
) -> Option<NonFinite> {
    let all = parameters::tensors(model);
    let dense = all
        .iter()
        .filter(|(_, _, t)| matches!(t.kind, TensorKind::Dense));
    let tables = all
        .iter()
        .filter(|(_, _, t)| scope == ParameterScope::All && !matches!(t.kind, TensorKind::Dense));
    dense.chain(tables).find_map(|(name, _, t)| {
        let values = t.values();
        first_non_finite_index(&values).map(|index| NonFinite {
            name: name.clone(),
            index,
            value: values[index],
        })
    })
}

/// Floats per sample an MLP's buffers hold: each layer's output, and its gradient in training.
pub fn mlp_floats_per_sample(mlp: &mlp::Mlp, training: bool) -> usize {
    let outputs: usize = mlp.layers.iter().map(|l| l.outputs).sum();
    outputs * (1 + usize::from(training))
}

/// What a model predicts, which decides its loss and its evaluation metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Click probability: BCE loss; accuracy, ROC AUC and normalized entropy.
    Classification,
    /// A real-valued rating: squared loss; RMSE.
    Regression,
}

/// A trainable model, as the training loop drives it.
pub trait Model: Send + Parameters {
    /// The name reported (`dlrm`, `dcn`, ...).
    fn name(&self) -> &'static str;
    fn task(&self) -> Task {
        Task::Classification
    }
    /// Dense features per sample and embedding tables the batches must have.
    fn num_dense(&self) -> usize;
    fn num_tables(&self) -> usize;
    fn optimizer(&self) -> OptimizerKind;
    /// Sizes every buffer for batches of up to `batch` samples.
    fn reserve(&mut self, batch: usize);
    /// Sizes the buffers `predict` needs (models without a lighter inference path size all).
    fn reserve_inference(&mut self, batch: usize) {
        self.reserve(batch);
    }
    /// One step: forward, loss, backward, updates, each phase's time added to `timer`.
    /// Returns the batch's mean loss.
    fn train_step(
        &mut self,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) -> Result<f64, BatchError>;
    /// Predictions for a batch (probabilities, or ratings for regression), no gradients.
    fn predict(&mut self, batch: &BatchView, out: &mut Vec<f32>) -> Result<(), BatchError>;
    /// What the model is, enough to build it again (see [`ModelConfig::build`]).
    fn config(&self) -> ModelConfig;
    /// f32 values of the step's buffers per sample of a batch (forward only, or with the
    /// gradients for `training`): what `reserve` allocates per sample, for memory checks.
    fn buffer_floats_per_sample(&self, training: bool) -> usize;
    /// Floating-point operations per sample of one training step in the dense compute (each
    /// MLP product forward, input gradient and weight gradient; the interaction), for the
    /// report's GFLOP/s; `None` where the model does not count them.
    fn flops_per_sample(&self) -> Option<f64> {
        None
    }
    /// The first parameter value that is NaN or infinite, among the dense parameters or, with
    /// `ParameterScope::All`, the embedding tables too (each tensor scanned in parallel).
    fn first_non_finite(&self, scope: ParameterScope) -> Option<NonFinite> {
        first_non_finite(self, scope)
    }
    /// How the kernels may use threads from now on (default [`Par::Rayon`]: split over the
    /// current rayon pool when the work pays for it).
    fn set_parallelism(&mut self, par: Par);
    /// The precision the model trains in.
    fn precision(&self) -> Precision {
        Precision::Fp32
    }
    /// Trains in `precision` from now on (the parameters' values unchanged). Models without a
    /// BF16 path refuse [`Precision::Bf16`].
    fn set_precision(&mut self, precision: Precision) -> anyhow::Result<()> {
        anyhow::ensure!(
            precision == Precision::Fp32,
            "precision {precision} is implemented for the DLRM model only, not {}",
            self.name()
        );
        Ok(())
    }
    /// Trains with `loss` from now on (click models; a regression refuses any loss but the
    /// default, which it does not use).
    fn set_click_loss(&mut self, loss: ClickLoss) -> Result<(), crate::names::FieldError>;
}
