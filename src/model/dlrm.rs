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
use super::embedding_tables::{EmbeddingTable, OptimizerState, StorageKind, create_tables};
use super::mlp::Mlp;
use super::{
    ADAGRAD_EPS, BatchError, Model, OptimizerKind, PhaseSeconds, Stopwatch, Task,
    mlp_floats_per_sample, mlp_parameters, validate_batch,
};
use crate::data::Batch;
use crate::rng::{SplitMix64, derive_key};
use dlrm_kernels::activation::{bce_with_logits, sigmoid};
use dlrm_kernels::embedding::{Bags, Pooling, SparseGradWorkspace, embedding_bag_forward_tables};
use dlrm_kernels::gemm::{MatMut, MatRef};
use dlrm_kernels::interaction::{
    cat_interaction_backward, cat_interaction_forward, dot_interaction_backward,
    dot_interaction_forward,
};
use dlrm_kernels::optim::{TableMut, adagrad_update, embedding_bag_backward_update, sgd_update};
use dlrm_kernels::parallel::Par;
use rayon::prelude::*;
use std::time::Instant;

/// The model: parameters, optimizer state and the step's buffers.
pub struct Dlrm {
    arch: Architecture,
    optimizer: OptimizerKind,
    pub bottom: Mlp,
    pub top: Mlp,
    pub tables: Vec<EmbeddingTable>,
    /// Per-table sparse optimizer state (empty for SGD).
    pub table_states: Vec<OptimizerState>,
    /// Dense Adagrad accumulators: per MLP layer (bottom then top), weight then bias.
    dense_state: Vec<(Vec<f32>, Vec<f32>)>,
    workspaces: Vec<SparseGradWorkspace>,
    /// Batch sizes the forward and the training buffers are sized for.
    capacity: usize,
    train_capacity: usize,
    features: Vec<f32>,
    top_in: Vec<f32>,
    grad_top_in: Vec<f32>,
    grad_features: Vec<f32>,
    probs: Vec<f32>,
    grad_logits: Vec<f32>,
    /// Time per phase, accumulated over every step since the last reset.
    pub phases: PhaseSeconds,
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
        let mut rng = SplitMix64::new(derive_key(seed, &[0x0d15_e0de]));
        let bottom = Mlp::new(&arch.bottom, true, &mut rng);
        let top = Mlp::new(&arch.top, false, &mut rng);
        let d = arch.embedding_dim;
        let width = optimizer.sparse(0.0).state_width(d);
        let (tables, table_states) = create_tables(0, &arch.table_sizes, d, width, seed, storage)?;
        Ok(Self::assemble(
            arch,
            optimizer,
            bottom,
            top,
            tables,
            table_states,
        ))
    }

    /// A model from existing parts (loaded parameters).
    pub fn assemble(
        arch: Architecture,
        optimizer: OptimizerKind,
        bottom: Mlp,
        top: Mlp,
        tables: Vec<EmbeddingTable>,
        table_states: Vec<OptimizerState>,
    ) -> Dlrm {
        let dense_state = bottom
            .layers
            .iter()
            .chain(&top.layers)
            .map(|l| {
                if optimizer.dense_adagrad() {
                    (vec![0.0; l.weight.len()], vec![0.0; l.bias.len()])
                } else {
                    (Vec::new(), Vec::new())
                }
            })
            .collect();
        let workspaces = (0..tables.len())
            .map(|_| SparseGradWorkspace::default())
            .collect();
        Dlrm {
            arch,
            optimizer,
            bottom,
            top,
            tables,
            table_states,
            dense_state,
            workspaces,
            capacity: 0,
            train_capacity: 0,
            features: Vec::new(),
            top_in: Vec::new(),
            grad_top_in: Vec::new(),
            grad_features: Vec::new(),
            probs: Vec::new(),
            grad_logits: Vec::new(),
            phases: PhaseSeconds::default(),
            par: Par::default(),
        }
    }

    pub fn arch(&self) -> &Architecture {
        &self.arch
    }

    pub fn optimizer(&self) -> OptimizerKind {
        self.optimizer
    }

    /// Dense Adagrad accumulators per layer (bottom then top): (weight, bias).
    pub fn dense_state(&self) -> &[(Vec<f32>, Vec<f32>)] {
        &self.dense_state
    }

    pub fn dense_state_mut(&mut self) -> &mut [(Vec<f32>, Vec<f32>)] {
        &mut self.dense_state
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
    pub fn validate(&self, batch: &Batch) -> Result<(), BatchError> {
        validate_batch(batch, self.arch.num_dense(), &self.tables)
    }

    fn bags(batch: &Batch, t: usize) -> Bags<'_> {
        Bags {
            indices: &batch.indices[t],
            offsets: &batch.offsets[t],
            weights: None,
        }
    }

    /// Forward to the logits (in the top MLP's output buffer). The batch must be valid.
    fn forward_logits(&mut self, batch: &Batch, sw: &mut Stopwatch) {
        let par = self.par;
        let b = batch.size();
        let d = self.arch.embedding_dim;
        let fd = self.feature_stride();
        let f = self.arch.num_features();
        // Embeddings: lazily initialised rows are materialised, then every table pooled into
        // its slot of the feature rows.
        self.tables
            .par_iter_mut()
            .zip(&batch.indices)
            .for_each(|(t, ids)| t.materialize(ids));
        let tables = &self.tables;
        let slots = MatMut::new(&mut self.features[..b * fd], b, fd).into_cols(d, tables.len() * d);
        embedding_bag_forward_tables(
            tables.len(),
            |t| {
                (
                    MatRef::from_rows(tables[t].weights(), d),
                    Self::bags(batch, t),
                )
            },
            Pooling::Sum,
            slots,
            par,
        );
        sw.lap(&mut self.phases.emb_fwd);

        let dense = MatRef::new(&batch.dense, b, batch.num_dense);
        let slot0 = MatMut::with_row_stride(&mut self.features, b, d, fd);
        self.bottom.forward(dense, Some(slot0), par);
        sw.lap(&mut self.phases.bot_fwd);

        let w = self.arch.top[0];
        let features = MatRef::new(&self.features[..b * fd], b, fd);
        let top_in = MatMut::new(&mut self.top_in[..b * w], b, w);
        match self.arch.interaction {
            InteractionOp::Dot => {
                dot_interaction_forward(features, f, self.arch.self_interaction, top_in, par)
            }
            InteractionOp::Cat => cat_interaction_forward(features, top_in, par),
        }
        sw.lap(&mut self.phases.interaction_fwd);

        self.top
            .forward(MatRef::new(&self.top_in[..b * w], b, w), None, par);
        sw.lap(&mut self.phases.top_fwd);
    }

    /// Click probabilities for a batch (inference: no gradient work).
    pub fn predict(&mut self, batch: &Batch, probs: &mut Vec<f32>) -> Result<(), BatchError> {
        self.check_capacity(batch, self.capacity)?;
        self.validate(batch)?;
        let mut sw = Stopwatch(Instant::now());
        self.forward_logits(batch, &mut sw);
        let b = batch.size();
        probs.resize(b, 0.0);
        sigmoid(self.top.output(b).as_slice(), probs);
        Ok(())
    }

    fn check_capacity(&self, batch: &Batch, capacity: usize) -> Result<(), BatchError> {
        if batch.size() > capacity {
            return Err(BatchError::TooLarge {
                got: batch.size(),
                capacity,
            });
        }
        Ok(())
    }

    /// One training step: forward, mean BCE loss, backward, and the updates (embeddings fused
    /// into their backward, dense parameters after). Returns the batch's mean loss.
    pub fn train_step(&mut self, batch: &Batch, lr: f32) -> Result<f64, BatchError> {
        let par = self.par;
        self.check_capacity(batch, self.train_capacity)?;
        let mut sw = Stopwatch(Instant::now());
        self.validate(batch)?;
        sw.lap(&mut self.phases.other);
        self.forward_logits(batch, &mut sw);

        let b = batch.size();
        let d = self.arch.embedding_dim;
        let fd = self.feature_stride();
        let f = self.arch.num_features();
        let w = self.arch.top[0];
        let loss_sum = bce_with_logits(
            self.top.output(b).as_slice(),
            &batch.labels,
            &mut self.probs[..b],
            &mut self.grad_logits[..b],
            1.0 / b as f32,
        );
        sw.lap(&mut self.phases.loss);

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
        sw.lap(&mut self.phases.top_bwd);

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
        sw.lap(&mut self.phases.interaction_bwd);

        let dense = MatRef::new(&batch.dense, b, batch.num_dense);
        let bottom_out = MatRef::with_row_stride(&self.features, b, d, fd);
        let d_bottom_out = MatRef::with_row_stride(&self.grad_features, b, d, fd);
        self.bottom
            .backward(dense, Some(bottom_out), d_bottom_out, None, par);
        sw.lap(&mut self.phases.bot_bwd);

        // Sparse updates, fused with the embeddings' backward: tables in parallel, each
        // reading its slot of the feature gradients.
        let opt = self.optimizer.sparse(lr);
        let grads = &self.grad_features;
        self.tables
            .par_iter_mut()
            .zip(self.table_states.par_iter_mut())
            .zip(self.workspaces.par_iter_mut())
            .enumerate()
            .for_each(|(t, ((table, state), ws))| {
                embedding_bag_backward_update(
                    TableMut {
                        weights: MatMut::from_rows(table.weights_mut(), d),
                        state: state.as_mut_slice(),
                    },
                    Self::bags(batch, t),
                    Pooling::Sum,
                    MatRef::with_row_stride(
                        &grads[(t + 1) * d..],
                        Self::bags(batch, t).len(),
                        d,
                        fd,
                    ),
                    opt.into(),
                    ws,
                    par,
                );
            });
        sw.lap(&mut self.phases.emb_update);

        self.update_dense(lr);
        sw.lap(&mut self.phases.dense_update);
        Ok(loss_sum / b as f64)
    }

    fn update_dense(&mut self, lr: f32) {
        let par = self.par;
        let adagrad = self.optimizer.dense_adagrad();
        let layers = self
            .bottom
            .layers
            .iter_mut()
            .chain(self.top.layers.iter_mut());
        for (layer, (sw, sb)) in layers.zip(self.dense_state.iter_mut()) {
            if adagrad {
                adagrad_update(
                    &mut layer.weight,
                    &layer.grad_weight,
                    sw,
                    lr,
                    ADAGRAD_EPS,
                    par,
                );
                adagrad_update(&mut layer.bias, &layer.grad_bias, sb, lr, ADAGRAD_EPS, par);
            } else {
                sgd_update(&mut layer.weight, &layer.grad_weight, lr, par);
                sgd_update(&mut layer.bias, &layer.grad_bias, lr, par);
            }
        }
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
    fn train_step(&mut self, batch: &Batch, lr: f32) -> Result<f64, BatchError> {
        Dlrm::train_step(self, batch, lr)
    }
    fn predict(&mut self, batch: &Batch, out: &mut Vec<f32>) -> Result<(), BatchError> {
        Dlrm::predict(self, batch, out)
    }
    fn phases(&self) -> PhaseSeconds {
        self.phases
    }
    fn add_other_seconds(&mut self, seconds: f64) {
        self.phases.other += seconds;
    }
    fn set_parallelism(&mut self, par: Par) {
        self.par = par;
    }
    fn save_parameters(&self, dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
        crate::checkpoint::save_dlrm_parameters(self, dir)
    }
    fn dense_parameters(&self) -> Vec<(String, &[f32])> {
        let mut p = mlp_parameters("bot_l", &self.bottom);
        p.extend(mlp_parameters("top_l", &self.top));
        p
    }
    fn table_parameters(&self) -> Vec<(String, &[f32])> {
        self.tables
            .iter()
            .enumerate()
            .map(|(t, table)| (format!("emb_l.{t}.weight"), table.weights()))
            .collect()
    }
    fn buffer_floats_per_sample(&self, training: bool) -> usize {
        // features and top_in, their gradients in training, probabilities and logit gradients.
        let per_pass = self.feature_stride() + self.arch.top[0] + 1;
        mlp_floats_per_sample(&self.bottom, training)
            + mlp_floats_per_sample(&self.top, training)
            + per_pass * (1 + usize::from(training))
    }
}
