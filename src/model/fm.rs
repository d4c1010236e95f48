//! Factorization machine (Rendle 2010, "Factorization Machines") over DLRM's features:
//! ```text
//! y = w0 + sum_i w_i x_i + 1/2 sum_f [(sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2]
//! ```
//! in the O(k n) form, computed by [`dlrm_kernels::fm`]. Each categorical feature is a field
//! whose one-hot (or multi-hot) ids look up their latent vectors v_i straight in an embedding
//! table (rows x k) and their first-order weights w_i in a rows x 1 table beside it; the dense
//! features are one more field, a num_dense x k table and a num_dense x 1 table, whose bag in
//! every sample is all of its rows with the feature values x_i as weights. Every table, dense
//! field included, is trained by the same fused sparse optimizer as DLRM's embeddings (the
//! latent rows from one gradient row per looked-up position, the first-order rows from the
//! output gradient pooled with the feature values); w0 is a dense parameter.
//!
//! The same model with two one-hot fields (users, items), no dense features and a squared loss
//! is biased matrix factorization ([`super::mf`]): `Task::Regression` switches the loss and
//! the predictions from probabilities to raw values.
//!
//! Phases, in the DLRM names of [`super::PhaseSeconds`]: `emb_fwd` is the materialisation of lazily
//! initialised rows, `interaction_*` the FM kernels, `emb_update` the fused updates and
//! `dense_update` w0.

use super::parameters::{Named, Parameters, TableSource, Tensor, TensorMut};
use super::sparse::SparseTables;
use super::{
    BatchError, ClickLoss, DenseOptimizer, Model, ModelConfig, ModelKind, OptimizerKind,
    PhaseTimer, Task, check_capacity, head_loss, head_predict, validate_batch,
};
use crate::data::BatchView;
use crate::names::{Field, FieldError, ensure_field};
use crate::storage::StorageKind;
use dlrm_kernels::embedding::Bags;
use dlrm_kernels::fm::{FmField, fm_backward, fm_forward};
use dlrm_kernels::gemm::MatRef;
use dlrm_kernels::parallel::Par;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The shape and objective of a factorization machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FmConfig {
    /// Which model this is (`fm`, or `mf` for matrix factorization), for the reports.
    pub model: ModelKind,
    /// Classification (BCE on sigmoid(y)) or regression (squared error on y).
    pub task: Task,
    /// Width k of the latent vectors.
    pub factors: usize,
    /// Rows of each categorical field's tables.
    pub table_sizes: Vec<usize>,
    /// Dense (real-valued) features, one field together; 0 for none.
    pub num_dense: usize,
    /// L2 regularisation of the looked-up rows of every table (0: none).
    pub weight_decay: f32,
    /// Initial value of the global bias w0.
    pub initial_bias: f32,
}

impl FmConfig {
    /// Fields: the categorical ones, then the dense one when there are dense features.
    fn num_fields(&self) -> usize {
        self.table_sizes.len() + usize::from(self.num_dense > 0)
    }
}

/// The model: parameters, optimizer state and the step's buffers.
pub struct Fm {
    cfg: FmConfig,
    optimizer: OptimizerKind,
    /// Latent vectors of each field (rows x k).
    pub factors: SparseTables,
    /// First-order weights of each field (rows x 1).
    pub linear: SparseTables,
    /// The global bias w0.
    pub bias: f32,
    dense_opt: DenseOptimizer,
    capacity: usize,
    /// The dense field's bags: every sample looks up rows 0 .. num_dense.
    dense_ids: Vec<u32>,
    dense_offsets: Vec<u32>,
    sums: Vec<f32>,
    outputs: Vec<f32>,
    probs: Vec<f32>,
    /// The click loss trained with (set with [`Model::set_click_loss`]).
    loss: ClickLoss,
    grad_out: Vec<f32>,
    /// Per field: the latent gradient of each looked-up position (positions x k).
    grad_rows: Vec<Vec<f32>>,
    /// How the kernels may use threads (set with [`Model::set_parallelism`]).
    par: Par,
}

/// Field t's bags for `batch`: a categorical field's ids, or every dense feature with its value.
fn field_bags<'a>(
    batch: &'a BatchView,
    dense_ids: &'a [u32],
    dense_offsets: &'a [u32],
    t: usize,
) -> Bags<'a> {
    if t < batch.num_tables() {
        batch.bags(t)
    } else {
        let b = batch.size();
        Bags::with_offsets(&dense_ids[..b * batch.num_dense], &dense_offsets[..b])
            .with_weights(Some(batch.dense))
    }
}

impl Fm {
    /// A freshly initialised model: latent and first-order rows uniform(±sqrt(1/rows)) keyed
    /// by (seed, table, row), as DLRM's embeddings, w0 = `cfg.initial_bias`.
    pub fn new(
        cfg: FmConfig,
        optimizer: OptimizerKind,
        storage: &StorageKind,
        seed: u64,
    ) -> anyhow::Result<Fm> {
        Self::build(cfg, optimizer, seed, TableSource::Init(storage))
    }

    /// A model whose tables come from `source` (initialised from `seed` when new).
    pub fn build(
        cfg: FmConfig,
        optimizer: OptimizerKind,
        seed: u64,
        source: TableSource,
    ) -> anyhow::Result<Fm> {
        anyhow::ensure!(cfg.factors > 0, "the latent width must be at least 1");
        ensure_field(
            cfg.weight_decay >= 0.0 && cfg.weight_decay.is_finite(),
            |n| format!("{} must be a non-negative number", n(Field::WeightDecay)),
        )?;
        let mut rows = cfg.table_sizes.clone();
        if cfg.num_dense > 0 {
            rows.push(cfg.num_dense);
        }
        let fields = rows.len();
        let factors = SparseTables::create(0, &rows, cfg.factors, optimizer, source, seed)?;
        let linear = SparseTables::create(fields, &rows, 1, optimizer, source, seed)?;
        Ok(Fm {
            bias: cfg.initial_bias,
            cfg,
            optimizer,
            factors,
            linear,
            dense_opt: DenseOptimizer::new(optimizer, [1]),
            capacity: 0,
            dense_ids: Vec::new(),
            dense_offsets: Vec::new(),
            sums: Vec::new(),
            outputs: Vec::new(),
            probs: Vec::new(),
            loss: ClickLoss::default(),
            grad_out: Vec::new(),
            grad_rows: vec![Vec::new(); fields],
            par: Par::default(),
        })
    }

    pub fn config(&self) -> &FmConfig {
        &self.cfg
    }

    fn check(&self, batch: &BatchView) -> Result<(), BatchError> {
        check_capacity(batch, self.capacity)?;
        let categorical = self.cfg.table_sizes.len();
        validate_batch(
            batch,
            self.cfg.num_dense,
            &self.factors.tables[..categorical],
        )
    }

    /// Forward: y of every sample into `outputs` (and S into `sums`). The batch must be valid.
    fn forward(&mut self, batch: &BatchView, timer: &mut PhaseTimer) {
        let par = self.par;
        let b = batch.size();
        let k = self.cfg.factors;
        let (ids, offs) = (&self.dense_ids, &self.dense_offsets);
        let bags = |t| field_bags(batch, ids, offs, t);
        self.factors.materialize(|t| bags(t).indices());
        self.linear.materialize(|t| bags(t).indices());
        timer.lap(|p| &mut p.emb_fwd);
        let (factors, linear) = (&self.factors, &self.linear);
        fm_forward(
            self.cfg.num_fields(),
            k,
            |t| FmField {
                factors: factors.weights(t),
                linear: linear.weights(t),
                bags: bags(t),
            },
            self.bias,
            &mut self.sums[..b * k],
            &mut self.outputs[..b],
            par,
        );
        timer.lap(|p| &mut p.interaction_fwd);
    }

    /// Predictions for a batch: click probabilities, or values for regression.
    pub fn predict(&mut self, batch: &BatchView, out: &mut Vec<f32>) -> Result<(), BatchError> {
        self.check(batch)?;
        self.forward(batch, &mut PhaseTimer::default());
        let b = batch.size();
        out.resize(b, 0.0);
        head_predict(self.cfg.task, &self.outputs[..b], out);
        Ok(())
    }

    /// One training step: forward, the mean loss (BCE, or squared error for regression),
    /// backward and updates. Returns the mean loss.
    pub fn train_step(
        &mut self,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) -> Result<f64, BatchError> {
        let par = self.par;
        self.check(batch)?;
        timer.lap(|p| &mut p.other);
        self.forward(batch, timer);

        let b = batch.size();
        let k = self.cfg.factors;
        let loss_sum = head_loss(
            self.cfg.task,
            &self.loss,
            &self.outputs[..b],
            batch.labels,
            &mut self.probs[..b],
            &mut self.grad_out[..b],
        );
        timer.lap(|p| &mut p.loss);

        let (ids, offs) = (&self.dense_ids, &self.dense_offsets);
        let bags = |t| field_bags(batch, ids, offs, t);
        let (factors, linear, grad) = (&self.factors, &self.linear, &self.grad_out[..b]);
        let sums = &self.sums[..b * k];
        self.grad_rows
            .par_iter_mut()
            .enumerate()
            .for_each(|(t, rows)| {
                let field = FmField {
                    factors: factors.weights(t),
                    linear: linear.weights(t),
                    bags: bags(t),
                };
                let n = field.bags.indices().len() * k;
                if rows.len() < n {
                    rows.resize(n, 0.0);
                }
                fm_backward(
                    field,
                    MatRef::new(sums, field.bags.len(), k),
                    grad,
                    &mut rows[..n],
                    None,
                    par,
                );
            });
        timer.lap(|p| &mut p.interaction_bwd);

        // One gradient row per looked-up id: each id is its own bag.
        let (rows, wd) = (&self.grad_rows, self.cfg.weight_decay);
        self.factors.update(
            |t| Bags::one_hot(bags(t).indices()),
            |t| (&rows[t][..], k),
            lr,
            wd,
            par,
        );
        self.linear.update(bags, |_| (grad, 1), lr, wd, par);
        timer.lap(|p| &mut p.emb_update);

        let grad_bias = [grad.iter().map(|&x| f64::from(x)).sum::<f64>() as f32];
        self.dense_opt.step(
            [(std::slice::from_mut(&mut self.bias), &grad_bias[..])],
            lr,
            par,
        );
        timer.lap(|p| &mut p.dense_update);
        Ok(loss_sum / b as f64)
    }
}

impl Model for Fm {
    fn name(&self) -> &'static str {
        self.cfg.model.name()
    }
    fn task(&self) -> Task {
        self.cfg.task
    }
    fn num_dense(&self) -> usize {
        self.cfg.num_dense
    }
    fn num_tables(&self) -> usize {
        self.cfg.table_sizes.len()
    }
    fn optimizer(&self) -> OptimizerKind {
        self.optimizer
    }
    fn reserve(&mut self, batch: usize) {
        if batch <= self.capacity {
            return;
        }
        let (nd, k) = (self.cfg.num_dense, self.cfg.factors);
        self.dense_ids = (0..batch).flat_map(|_| 0..nd as u32).collect();
        self.dense_offsets = (0..batch).map(|s| (s * nd) as u32).collect();
        self.sums.resize(batch * k, 0.0);
        self.outputs.resize(batch, 0.0);
        self.probs.resize(batch, 0.0);
        self.grad_out.resize(batch, 0.0);
        self.capacity = batch;
    }
    fn train_step(
        &mut self,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) -> Result<f64, BatchError> {
        Fm::train_step(self, batch, lr, timer)
    }
    fn predict(&mut self, batch: &BatchView, out: &mut Vec<f32>) -> Result<(), BatchError> {
        Fm::predict(self, batch, out)
    }
    fn config(&self) -> ModelConfig {
        ModelConfig::Fm(self.cfg.clone())
    }
    fn buffer_floats_per_sample(&self, _training: bool) -> usize {
        // `reserve` sizes everything for inference too: the dense field's ids and offsets
        // (u32, the size of an f32), the latent sums, outputs, probabilities, output gradients.
        self.cfg.num_dense + 1 + self.cfg.factors + 3
    }

    fn set_parallelism(&mut self, par: Par) {
        self.par = par;
    }
    fn set_click_loss(&mut self, loss: ClickLoss) -> Result<(), FieldError> {
        loss.check()?;
        ensure_field(
            self.cfg.task == Task::Classification || loss == ClickLoss::default(),
            |n| {
                format!(
                    "{} applies to click models, not a regression",
                    n(Field::Named("--loss-function"))
                )
            },
        )?;
        self.loss = loss;
        Ok(())
    }
}

/// Name of the bias w0.
pub(crate) const BIAS: &str = "bias";

impl Fm {
    /// Field t's name for `kind` (`emb` latent vectors, `lin` first-order weights): the dense
    /// field (last, when there are dense features) is named apart from the categorical ones.
    fn field_name(&self, kind: &str) -> impl Fn(usize) -> String + use<> {
        let categorical = self.cfg.table_sizes.len();
        let kind = kind.to_string();
        move |t| {
            if t < categorical {
                format!("{kind}_l.{t}.weight")
            } else {
                format!("dense_{kind}.weight")
            }
        }
    }
}

impl Parameters for Fm {
    fn parameters<'a>(&'a self, visit: &mut dyn FnMut(Named<Tensor<'a>>)) {
        self.factors.visit(self.field_name("emb"), visit);
        self.linear.visit(self.field_name("lin"), visit);
        let state = self.dense_opt.states().next().unwrap_or(&[]);
        let bias = Tensor::dense(std::slice::from_ref(&self.bias), state);
        visit((BIAS.to_string(), vec![1], bias));
    }

    fn parameters_mut<'a>(&'a mut self, visit: &mut dyn FnMut(Named<TensorMut<'a>>)) {
        let (emb, lin) = (self.field_name("emb"), self.field_name("lin"));
        self.factors.visit_mut(emb, visit);
        self.linear.visit_mut(lin, visit);
        let state = self.dense_opt.states_mut().next().unwrap_or(&mut []);
        let values = std::slice::from_mut(&mut self.bias);
        visit((
            BIAS.to_string(),
            vec![1],
            TensorMut::Dense { values, state },
        ));
    }
}
