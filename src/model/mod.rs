//! The models and their parameters, and what the trainer needs from a model.

pub mod architecture;
pub mod dcn;
pub mod dlrm;
pub mod embedding_tables;
pub mod fm;
pub mod mf;
pub mod mlp;
pub mod sparse;

use crate::data::Batch;
use crate::names::{Choice, choice_names};
use dlrm_kernels::optim::{SparseOptimizer, adagrad_update, sgd_update};
use dlrm_kernels::parallel::Par;
use embedding_tables::EmbeddingTable;
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
/// `sgd`, element-wise Adagrad otherwise (as [`OptimizerKind`] says), with the accumulators of
/// each parameter tensor created, zeroed, at its first step.
#[derive(Clone, Debug)]
pub struct DenseOptimizer {
    kind: OptimizerKind,
    state: Vec<Vec<f32>>,
}

impl DenseOptimizer {
    pub fn new(kind: OptimizerKind) -> DenseOptimizer {
        DenseOptimizer {
            kind,
            state: Vec::new(),
        }
    }

    /// One step of every (parameter, gradient) pair, given in the same order at every step.
    pub fn step<'p>(
        &mut self,
        params: impl IntoIterator<Item = (&'p mut [f32], &'p [f32])>,
        lr: f32,
        par: Par,
    ) {
        for (i, (p, g)) in params.into_iter().enumerate() {
            if !self.kind.dense_adagrad() {
                sgd_update(p, g, lr, par);
                continue;
            }
            if self.state.len() <= i {
                self.state.push(vec![0.0; p.len()]);
            }
            adagrad_update(p, g, &mut self.state[i], lr, ADAGRAD_EPS, par);
        }
    }
}

/// Checks a batch against a model whose tables are `tables` and that takes `num_dense` dense
/// features: table count, dense width, offsets, every id in range.
pub fn validate_batch(
    batch: &Batch,
    num_dense: usize,
    tables: &[EmbeddingTable],
) -> Result<(), BatchError> {
    let b = batch.size();
    if batch.indices.len() != tables.len() || batch.offsets.len() != tables.len() {
        return Err(BatchError::TableCount {
            got: batch.indices.len(),
            expected: tables.len(),
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
    for (t, (ids, offs)) in batch.indices.iter().zip(&batch.offsets).enumerate() {
        if offs.len() != b {
            return Err(BatchError::Offsets {
                table: t,
                sample: offs.len().min(b),
                why: "one offset per sample expected",
            });
        }
        let mut prev = 0u32;
        for (i, &o) in offs.iter().enumerate() {
            let why = if i == 0 && o != 0 {
                "the first offset must be 0"
            } else if o < prev {
                "offsets decrease"
            } else if o as usize > ids.len() {
                "offset past the end of the ids"
            } else {
                prev = o;
                continue;
            };
            return Err(BatchError::Offsets {
                table: t,
                sample: i,
                why,
            });
        }
        if let Err((position, value)) = tables[t].check_ids(ids) {
            return Err(BatchError::IdOutOfRange {
                table: t,
                position,
                value,
                rows: tables[t].rows(),
            });
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

/// Accumulates the time since the last mark into a phase.
pub(crate) struct Stopwatch(pub(crate) Instant);

impl Stopwatch {
    pub(crate) fn lap(&mut self, phase: &mut f64) {
        let now = Instant::now();
        *phase += (now - self.0).as_secs_f64();
        self.0 = now;
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

/// An MLP's tensors under their PyTorch-style names ([`mlp::layer_names`]).
pub fn mlp_parameters<'a>(prefix: &str, mlp: &'a mlp::Mlp) -> Vec<(String, &'a [f32])> {
    let names = mlp::layer_names(prefix, mlp.layers.len());
    mlp.layers
        .iter()
        .zip(names)
        .flat_map(|(l, (w, b))| [(w, &l.weight[..]), (b, &l.bias[..])])
        .collect()
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
pub trait Model: Send {
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
    /// One step: forward, loss, backward, updates. Returns the batch's mean loss.
    fn train_step(&mut self, batch: &Batch, lr: f32) -> Result<f64, BatchError>;
    /// Predictions for a batch (probabilities, or ratings for regression), no gradients.
    fn predict(&mut self, batch: &Batch, out: &mut Vec<f32>) -> Result<(), BatchError>;
    /// Time per phase accumulated by the steps so far.
    fn phases(&self) -> PhaseSeconds;
    /// Adds time to the `other` phase (data loading, done by the trainer).
    fn add_other_seconds(&mut self, seconds: f64);
    /// Every parameter tensor but the embedding tables (MLP layers, cross layers, biases),
    /// with its PyTorch-style name (`bot_l.0.weight`), in a fixed order.
    fn dense_parameters(&self) -> Vec<(String, &[f32])>;
    /// Every embedding table's weights with its PyTorch-style name (`emb_l.3.weight`).
    fn table_parameters(&self) -> Vec<(String, &[f32])>;
    /// f32 values of the step's buffers per sample of a batch (forward only, or with the
    /// gradients for `training`): what `reserve` allocates per sample, for memory checks.
    fn buffer_floats_per_sample(&self, training: bool) -> usize;
    /// The first parameter value that is NaN or infinite, among the dense parameters or, with
    /// `ParameterScope::All`, the embedding tables too (each tensor scanned in parallel).
    fn first_non_finite(&self, scope: ParameterScope) -> Option<NonFinite> {
        let tables = match scope {
            ParameterScope::Dense => Vec::new(),
            ParameterScope::All => self.table_parameters(),
        };
        self.dense_parameters()
            .into_iter()
            .chain(tables)
            .find_map(|(name, values)| {
                first_non_finite_index(values).map(|index| NonFinite {
                    name,
                    index,
                    value: values[index],
                })
            })
    }
    /// How the kernels may use threads from now on (default [`Par::Rayon`]: split over the
    /// current rayon pool when the work pays for it).
    fn set_parallelism(&mut self, par: Par);
    /// Writes every parameter and optimizer state into `dir` (a fresh checkpoint folder) and
    /// returns the model's description for the checkpoint (see [`crate::checkpoint`]).
    fn save_parameters(&self, dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
        let _ = dir;
        anyhow::bail!("saving {} models is not supported", self.name())
    }
}
