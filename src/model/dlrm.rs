//! DLRM (Naumov et al. 2019): embedding bags for the categorical features, a bottom MLP for
//! the dense ones, the pairwise-dot (or concatenation) interaction, a top MLP and a sigmoid.
//!
//! Memory layout, chosen so that no step copies between phases:
//! - `features` holds, per sample, the F = 1 + tables vectors of width d side by side: the
//!   bottom MLP's last layer writes slot 0 and each table's pooled vector is written to its
//!   slot, straight from the kernels (row stride F·d).
//! - The interaction writes the top MLP's input rows [bottom output | pair dots] directly.
//! - Backward mirrors this: the interaction's gradient lands in `grad_features`, whose slot 0
//!   is the bottom MLP's output gradient and whose other slots feed the fused sparse updates.
//!
//! Every buffer is sized once for the largest batch, so a step allocates nothing.

use super::architecture::{Architecture, InteractionOp};
use super::mlp::Mlp;
use super::parameters::{
    Named, Parameters, TableSource, Tensor, TensorMut, visit_mlp, visit_mlp_mut,
};
use super::sparse::SparseTables;
use super::{
    BatchError, ClickLoss, DenseOptimizer, Model, ModelConfig, OptimizerKind, PhaseTimer, Task,
    check_capacity, head_loss, head_predict, mlp_floats_per_sample, validate_batch,
};
use crate::data::BatchView;
use crate::names::FieldError;
use crate::rng::{SplitMix64, derive_key};
use crate::storage::StorageKind;
use dlrm_kernels::gemm::{MatMut, MatRef};
use dlrm_kernels::interaction::{
    cat_interaction_backward, cat_interaction_forward, dot_interaction_backward,
    dot_interaction_forward,
};
use dlrm_kernels::parallel::Par;

/// The model: parameters, optimizer state and the step's buffers.
pub struct Dlrm {
    arch: Architecture,
    optimizer: OptimizerKind,
    pub bottom: Mlp,
    pub top: Mlp,
    /// The embedding tables with their sparse optimizer state.
    pub embeddings: SparseTables,
    /// The MLPs' optimizer: per layer (bottom then top), weight then bias.
    dense_opt: DenseOptimizer,
    /// Batch sizes the forward and the training buffers are sized for.
    capacity: usize,
    train_capacity: usize,
    features: Vec<f32>,
    top_in: Vec<f32>,
    grad_top_in: Vec<f32>,
    grad_features: Vec<f32>,
    probs: Vec<f32>,
    /// The click loss trained with (set with [`Model::set_click_loss`]).
    loss: ClickLoss,
    grad_logits: Vec<f32>,
    /// How the kernels may use threads (set with [`Model::set_parallelism`]).
    par: Par,
}

impl Dlrm {
    /// A freshly initialised model: MLPs as the reference initialises them, embedding rows
    /// uniform(±sqrt(1/rows)) keyed by (seed, table, row), in the given storage.
    pub fn new(
        arch: Architecture,
        optimizer: OptimizerKind,
        storage: &StorageKind,
        seed: u64,
    ) -> anyhow::Result<Dlrm> {
        Self::build(arch, optimizer, seed, TableSource::Init(storage))
    }

    /// A model whose MLPs are initialised from `seed` and whose tables come from `source`.
    pub fn build(
        arch: Architecture,
        optimizer: OptimizerKind,
        seed: u64,
        source: TableSource,
    ) -> anyhow::Result<Dlrm> {
        let mut rng = SplitMix64::new(derive_key(seed, &[0x0d15_e0de]));
        let bottom = Mlp::new(&arch.bottom, true, &mut rng);
        let top = Mlp::new(&arch.top, false, &mut rng);
        let embeddings = SparseTables::create(
            0,
            &arch.table_sizes,
            arch.embedding_dim,
            optimizer,
            source,
            seed,
        )?;
        let dense_opt = DenseOptimizer::new(
            optimizer,
            bottom
                .layers
                .iter()
                .chain(&top.layers)
                .flat_map(|l| [l.weight.len(), l.bias.len()]),
        );
        Ok(Dlrm {
            arch,
            optimizer,
            bottom,
            top,
            embeddings,
            dense_opt,
            capacity: 0,
            train_capacity: 0,
            features: Vec::new(),
            top_in: Vec::new(),
            grad_top_in: Vec::new(),
            grad_features: Vec::new(),
            probs: Vec::new(),
            loss: ClickLoss::default(),
            grad_logits: Vec::new(),
            par: Par::default(),
        })
    }

    pub fn arch(&self) -> &Architecture {
        &self.arch
    }

    pub fn optimizer(&self) -> OptimizerKind {
        self.optimizer
    }

    /// Dense Adagrad accumulators per layer (bottom then top): (weight, bias); empty for SGD.
    pub fn dense_state(&self) -> Vec<(&[f32], &[f32])> {
        let mut states = self.dense_opt.states();
        std::iter::from_fn(|| Some((states.next()?, states.next()?))).collect()
    }

    /// Sizes every buffer for training on batches of up to `batch` samples (allocates only
    /// when growing).
    pub fn reserve(&mut self, batch: usize) {
        self.reserve_inference(batch);
        if batch <= self.train_capacity {
            return;
        }
        let fd = self.feature_stride();
        let w = self.arch.top[0];
        self.bottom.reserve(batch);
        self.top.reserve(batch);
        self.grad_features.resize(batch * fd, 0.0);
        self.grad_top_in.resize(batch * w, 0.0);
        self.grad_logits.resize(batch, 0.0);
        self.train_capacity = batch;
    }

    /// Sizes only the forward buffers, for inference (no gradient memory).
    pub fn reserve_inference(&mut self, batch: usize) {
        if batch <= self.capacity {
            return;
        }
        let fd = self.feature_stride();
        let w = self.arch.top[0];
        self.bottom.reserve_forward(batch);
        self.top.reserve_forward(batch);
        self.features.resize(batch * fd, 0.0);
        self.top_in.resize(batch * w, 0.0);
        self.probs.resize(batch, 0.0);
        self.capacity = batch;
    }

    fn feature_stride(&self) -> usize {
        self.arch.num_features() * self.arch.embedding_dim
    }

    /// Checks a batch against the model: table count, dense width, offsets, every id in range.
    pub fn validate(&self, batch: &BatchView) -> Result<(), BatchError> {
        validate_batch(batch, self.arch.num_dense(), &self.embeddings.tables)
    }

    /// Forward to the logits (in the top MLP's output buffer). The batch must be valid.
    fn forward_logits(&mut self, batch: &BatchView, timer: &mut PhaseTimer) {
        let par = self.par;
        let b = batch.size();
        let d = self.arch.embedding_dim;
        let fd = self.feature_stride();
        let f = self.arch.num_features();
        // Every table pooled into its slot of the feature rows.
        let slots = MatMut::new(&mut self.features[..b * fd], b, fd)
            .into_cols(d, self.embeddings.len() * d);
        self.embeddings.forward(batch, slots, par);
        timer.lap(|p| &mut p.emb_fwd);

        let dense = MatRef::new(batch.dense, b, batch.num_dense);
        let slot0 = MatMut::with_row_stride(&mut self.features, b, d, fd);
        self.bottom.forward(dense, Some(slot0), par);
        timer.lap(|p| &mut p.bot_fwd);

        let w = self.arch.top[0];
        let features = MatRef::new(&self.features[..b * fd], b, fd);
        let top_in = MatMut::new(&mut self.top_in[..b * w], b, w);
        match self.arch.interaction {
            InteractionOp::Dot => {
                dot_interaction_forward(features, f, self.arch.self_interaction, top_in, par)
            }
            InteractionOp::Cat => cat_interaction_forward(features, top_in, par),
        }
        timer.lap(|p| &mut p.interaction_fwd);

        self.top
            .forward(MatRef::new(&self.top_in[..b * w], b, w), None, par);
        timer.lap(|p| &mut p.top_fwd);
    }

    /// Click probabilities for a batch (inference: no gradient work).
    pub fn predict(&mut self, batch: &BatchView, probs: &mut Vec<f32>) -> Result<(), BatchError> {
        check_capacity(batch, self.capacity)?;
        self.validate(batch)?;
        self.forward_logits(batch, &mut PhaseTimer::default());
        let b = batch.size();
        probs.resize(b, 0.0);
        head_predict(Task::Classification, self.top.output(b).as_slice(), probs);
        Ok(())
    }

    /// One training step: forward, mean BCE loss, backward, and the updates (embeddings fused
    /// into their backward, dense parameters after). Returns the batch's mean loss.
    pub fn train_step(
        &mut self,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) -> Result<f64, BatchError> {
        let par = self.par;
        check_capacity(batch, self.train_capacity)?;
        self.validate(batch)?;
        timer.lap(|p| &mut p.other);
        self.forward_logits(batch, timer);

        let b = batch.size();
        let d = self.arch.embedding_dim;
        let fd = self.feature_stride();
        let f = self.arch.num_features();
        let w = self.arch.top[0];
        let loss_sum = head_loss(
            Task::Classification,
            &self.loss,
            self.top.output(b).as_slice(),
            batch.labels,
            &mut self.probs[..b],
            &mut self.grad_logits[..b],
        );
        timer.lap(|p| &mut p.loss);

        // Top MLP backward, into the gradient of the interaction output.
        let top_input = MatRef::new(&self.top_in[..b * w], b, w);
        let d_logits = MatRef::new(&self.grad_logits[..b], b, 1);
        self.top.backward(
            top_input,
            None,
            d_logits,
            Some(MatMut::new(&mut self.grad_top_in[..b * w], b, w)),
            par,
        );
        timer.lap(|p| &mut p.top_bwd);

        let features = MatRef::new(&self.features[..b * fd], b, fd);
        let grad_top_in = MatRef::new(&self.grad_top_in[..b * w], b, w);
        let grad_features = MatMut::new(&mut self.grad_features[..b * fd], b, fd);
        match self.arch.interaction {
            InteractionOp::Dot => dot_interaction_backward(
                features,
                f,
                self.arch.self_interaction,
                grad_top_in,
                grad_features,
                par,
            ),
            InteractionOp::Cat => cat_interaction_backward(grad_top_in, grad_features, par),
        }
        timer.lap(|p| &mut p.interaction_bwd);

        let dense = MatRef::new(batch.dense, b, batch.num_dense);
        let bottom_out = MatRef::with_row_stride(&self.features, b, d, fd);
        let d_bottom_out = MatRef::with_row_stride(&self.grad_features, b, d, fd);
        self.bottom
            .backward(dense, Some(bottom_out), d_bottom_out, None, par);
        timer.lap(|p| &mut p.bot_bwd);

        // Sparse updates, fused with the embeddings' backward: tables in parallel, each
        // reading its slot of the feature gradients.
        let grads = &self.grad_features;
        self.embeddings
            .update_batch(batch, |t| (&grads[(t + 1) * d..], fd), lr, 0.0, par);
        timer.lap(|p| &mut p.emb_update);

        self.update_dense(lr);
        timer.lap(|p| &mut p.dense_update);
        Ok(loss_sum / b as f64)
    }

    fn update_dense(&mut self, lr: f32) {
        let layers = self
            .bottom
            .layers
            .iter_mut()
            .chain(self.top.layers.iter_mut())
            .flat_map(|l| {
                [
                    (&mut l.weight[..], &l.grad_weight[..]),
                    (&mut l.bias[..], &l.grad_bias[..]),
                ]
            });
        self.dense_opt.step(layers, lr, self.par);
    }

    /// The feature rows of the last forward: per sample [bottom output | pooled table 0 | ...].
    pub fn features(&self, batch_size: usize) -> &[f32] {
        &self.features[..batch_size * self.feature_stride()]
    }

    /// The top MLP's input rows of the last forward (the interaction's output).
    pub fn interaction_output(&self, batch_size: usize) -> &[f32] {
        &self.top_in[..batch_size * self.arch.top[0]]
    }

    /// The logits of the last forward.
    pub fn logits(&self, batch_size: usize) -> &[f32] {
        self.top.output(batch_size).as_slice()
    }

    /// The last batch's probabilities (valid after `train_step`).
    pub fn last_probabilities(&self, batch_size: usize) -> &[f32] {
        &self.probs[..batch_size]
    }
}

impl Model for Dlrm {
    fn name(&self) -> &'static str {
        "dlrm"
    }
    fn task(&self) -> Task {
        Task::Classification
    }
    fn num_dense(&self) -> usize {
        self.arch.num_dense()
    }
    fn num_tables(&self) -> usize {
        self.arch.num_tables()
    }
    fn optimizer(&self) -> OptimizerKind {
        self.optimizer
    }
    fn reserve(&mut self, batch: usize) {
        Dlrm::reserve(self, batch)
    }
    fn reserve_inference(&mut self, batch: usize) {
        Dlrm::reserve_inference(self, batch)
    }
    fn train_step(
        &mut self,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) -> Result<f64, BatchError> {
        Dlrm::train_step(self, batch, lr, timer)
    }
    fn predict(&mut self, batch: &BatchView, out: &mut Vec<f32>) -> Result<(), BatchError> {
        Dlrm::predict(self, batch, out)
    }
    fn set_parallelism(&mut self, par: Par) {
        self.par = par;
    }
    fn set_click_loss(&mut self, loss: ClickLoss) -> Result<(), FieldError> {
        loss.check()?;
        self.loss = loss;
        Ok(())
    }
    fn config(&self) -> ModelConfig {
        ModelConfig::Dlrm(self.arch.clone())
    }
    fn flops_per_sample(&self) -> Option<f64> {
        Some(self.arch.flops_per_sample())
    }
    fn buffer_floats_per_sample(&self, training: bool) -> usize {
        // features and top_in, their gradients in training, probabilities and logit gradients.
        let per_pass = self.feature_stride() + self.arch.top[0] + 1;
        mlp_floats_per_sample(&self.bottom, training)
            + mlp_floats_per_sample(&self.top, training)
            + per_pass * (1 + usize::from(training))
    }
}

impl Parameters for Dlrm {
    fn parameters<'a>(&'a self, visit: &mut dyn FnMut(Named<Tensor<'a>>)) {
        self.embeddings
            .visit(|t| format!("emb_l.{t}.weight"), visit);
        let mut states = self.dense_opt.states();
        visit_mlp("bot_l", &self.bottom, &mut states, visit);
        visit_mlp("top_l", &self.top, &mut states, visit);
    }

    fn parameters_mut<'a>(&'a mut self, visit: &mut dyn FnMut(Named<TensorMut<'a>>)) {
        self.embeddings
            .visit_mut(|t| format!("emb_l.{t}.weight"), visit);
        let mut states = self.dense_opt.states_mut();
        visit_mlp_mut("bot_l", &mut self.bottom, &mut states, visit);
        visit_mlp_mut("top_l", &mut self.top, &mut states, visit);
    }
}
