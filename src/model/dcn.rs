//! DCN (Wang et al. 2017, "Deep & Cross Network for Ad Click Predictions") and DCN-v2 (Wang
//! et al. 2021, "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale
//! Learning to Rank Systems"), in their parallel form: the input row
//! x0 = [dense features | pooled embedding of each table] feeds a cross network (rank-one
//! layers for DCN, full-rank for DCN-v2, see [`dlrm_kernels::cross`]) and a deep network (ReLU
//! MLP) side by side; their outputs, concatenated, go through one linear layer to the logit.
//!
//! Memory layout, as in DLRM, so that no step copies between phases: the tables pool straight
//! into their slots of the x0 rows; the cross network writes x_L and the deep network's last
//! layer writes its output into the two halves of the head's input rows; backward, the head's
//! input gradient holds the gradients of both outputs side by side, the deep network writes the
//! gradient of x0 and the cross network adds its own, and each table's slot of that gradient
//! feeds the fused sparse update.
//!
//! Phases, in the DLRM names of [`PhaseSeconds`]: `interaction_*` is the cross network,
//! `bot_*` the deep network, `top_*` the final layer.

use super::mlp::Mlp;
use super::sparse::SparseTables;
use super::{
    BatchError, DenseOptimizer, Model, OptimizerKind, PhaseSeconds, Stopwatch,
    mlp_floats_per_sample, mlp_parameters, validate_batch,
};
use crate::data::BatchView;
use crate::model::embedding_tables::StorageKind;
use crate::rng::{SplitMix64, derive_key};
use dlrm_kernels::activation::{bce_with_logits, sigmoid};
use dlrm_kernels::cross::{
    CrossGrads, CrossKind, CrossNet, CrossWorkspace, cross_backward, cross_forward,
};
use dlrm_kernels::embedding::{Pooling, embedding_bag_forward_tables};
use dlrm_kernels::gemm::{MatMut, MatRef};
use dlrm_kernels::parallel::Par;
use std::time::Instant;

/// The shape of a DCN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DcnConfig {
    /// Rank-one (DCN) or full-rank (DCN-v2) cross layers.
    pub kind: CrossKind,
    pub embedding_dim: usize,
    pub table_sizes: Vec<usize>,
    pub num_dense: usize,
    pub cross_layers: usize,
    /// Widths of the deep network's layers (its input is x0), at least one.
    pub deep: Vec<usize>,
}

impl DcnConfig {
    /// Width of x0: the dense features and one embedding per table.
    pub fn input_width(&self) -> usize {
        self.num_dense + self.table_sizes.len() * self.embedding_dim
    }

    /// Width of the final layer's input: x_L and the deep network's output.
    fn head_width(&self) -> usize {
        self.input_width() + self.deep.last().copied().unwrap_or(0)
    }
}

/// The cross network of `cfg` with parameters `w` and `b`.
fn cross_net<'a>(cfg: &DcnConfig, w: &'a [f32], b: &'a [f32]) -> CrossNet<'a> {
    CrossNet {
        kind: cfg.kind,
        dim: cfg.input_width(),
        layers: cfg.cross_layers,
        w,
        b,
    }
}

/// The model: parameters, optimizer state and the step's buffers.
pub struct Dcn {
    cfg: DcnConfig,
    optimizer: OptimizerKind,
    pub embeddings: SparseTables,
    /// Cross weights (see [`CrossNet::w`]) and biases (layers x width).
    pub cross_w: Vec<f32>,
    pub cross_b: Vec<f32>,
    grad_cross_w: Vec<f32>,
    grad_cross_b: Vec<f32>,
    /// x0 -> the deep widths, ReLU after every layer.
    pub deep: Mlp,
    /// [x_L | deep output] -> the logit.
    pub head: Mlp,
    dense_opt: DenseOptimizer,
    cross_ws: CrossWorkspace,
    capacity: usize,
    x0: Vec<f32>,
    saved: Vec<f32>,
    head_in: Vec<f32>,
    grad_head_in: Vec<f32>,
    grad_x0: Vec<f32>,
    probs: Vec<f32>,
    grad_logits: Vec<f32>,
    phases: PhaseSeconds,
    /// How the kernels may use threads (set with [`Model::set_parallelism`]).
    par: Par,
}

impl Dcn {
    /// A freshly initialised model: embedding rows as in DLRM, the MLPs as the DLRM reference
    /// initialises them, cross weights N(0, 2 / (fan_in + fan_out)) (Glorot, as the DCN
    /// references) and zero cross biases.
    pub fn new(
        cfg: DcnConfig,
        optimizer: OptimizerKind,
        storage: &StorageKind,
        seed: u64,
    ) -> anyhow::Result<Dcn> {
        anyhow::ensure!(
            !cfg.deep.is_empty(),
            "the deep network needs at least one layer"
        );
        anyhow::ensure!(
            cfg.embedding_dim > 0,
            "the embedding width must be at least 1"
        );
        let w0 = cfg.input_width();
        let mut rng = SplitMix64::new(derive_key(seed, &[0x0dc0_0dc0]));
        let fan_out = match cfg.kind {
            CrossKind::RankOne => 1,
            CrossKind::FullRank => w0,
        };
        let std = (2.0 / (w0 + fan_out) as f32).sqrt();
        let cross_w: Vec<f32> = (0..cfg.kind.weight_len(w0, cfg.cross_layers))
            .map(|_| rng.normal() * std)
            .collect();
        let deep_widths: Vec<usize> = std::iter::once(w0).chain(cfg.deep.clone()).collect();
        let deep = Mlp::new(&deep_widths, true, &mut rng);
        let head = Mlp::new(&[cfg.head_width(), 1], false, &mut rng);
        let embeddings = SparseTables::create(
            0,
            &cfg.table_sizes,
            cfg.embedding_dim,
            optimizer,
            storage,
            seed,
        )?;
        Ok(Dcn {
            grad_cross_w: vec![0.0; cross_w.len()],
            cross_b: vec![0.0; cfg.cross_layers * w0],
            grad_cross_b: vec![0.0; cfg.cross_layers * w0],
            cross_w,
            cfg,
            optimizer,
            embeddings,
            deep,
            head,
            dense_opt: DenseOptimizer::new(optimizer),
            cross_ws: CrossWorkspace::default(),
            capacity: 0,
            x0: Vec::new(),
            saved: Vec::new(),
            head_in: Vec::new(),
            grad_head_in: Vec::new(),
            grad_x0: Vec::new(),
            probs: Vec::new(),
            grad_logits: Vec::new(),
            phases: PhaseSeconds::default(),
            par: Par::default(),
        })
    }

    pub fn config(&self) -> &DcnConfig {
        &self.cfg
    }

    fn check_capacity(&self, batch: &BatchView) -> Result<(), BatchError> {
        if batch.size() > self.capacity {
            return Err(BatchError::TooLarge {
                got: batch.size(),
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Forward to the logits (in the head's output buffer). The batch must be valid.
    fn forward_logits(&mut self, batch: &BatchView, sw: &mut Stopwatch) {
        let par = self.par;
        let b = batch.size();
        let (nd, d) = (self.cfg.num_dense, self.cfg.embedding_dim);
        let w0 = self.cfg.input_width();
        let hw = self.cfg.head_width();
        self.embeddings.materialize(|t| batch.ids(t));
        let x0 = &mut self.x0[..b * w0];
        for (row, dense) in x0.chunks_mut(w0).zip(batch.dense.chunks(nd.max(1))) {
            row[..nd].copy_from_slice(&dense[..nd]);
        }
        let tables = &self.embeddings;
        let slots = MatMut::new(x0, b, w0).into_cols(nd, tables.len() * d);
        embedding_bag_forward_tables(
            tables.len(),
            |t| (MatRef::from_rows(tables.weights(t), d), batch.bags(t)),
            Pooling::Sum,
            slots,
            par,
        );
        sw.lap(&mut self.phases.emb_fwd);

        let need = self.cfg.kind.saved_len(w0, self.cfg.cross_layers, b);
        cross_forward(
            &cross_net(&self.cfg, &self.cross_w, &self.cross_b),
            MatRef::new(&self.x0, b, w0),
            &mut self.saved[..need],
            MatMut::with_row_stride(&mut self.head_in, b, w0, hw),
            par,
        );
        sw.lap(&mut self.phases.interaction_fwd);

        let deep_out = MatMut::with_row_stride(&mut self.head_in[w0..], b, hw - w0, hw);
        self.deep
            .forward(MatRef::new(&self.x0[..b * w0], b, w0), Some(deep_out), par);
        sw.lap(&mut self.phases.bot_fwd);

        self.head
            .forward(MatRef::new(&self.head_in[..b * hw], b, hw), None, par);
        sw.lap(&mut self.phases.top_fwd);
    }

    /// Click probabilities for a batch (no gradient work).
    pub fn predict(&mut self, batch: &BatchView, probs: &mut Vec<f32>) -> Result<(), BatchError> {
        self.check_capacity(batch)?;
        validate_batch(batch, self.cfg.num_dense, &self.embeddings.tables)?;
        let mut sw = Stopwatch(Instant::now());
        self.forward_logits(batch, &mut sw);
        let b = batch.size();
        probs.resize(b, 0.0);
        sigmoid(self.head.output(b).as_slice(), probs);
        Ok(())
    }

    /// One training step: forward, mean BCE loss, backward, updates. Returns the mean loss.
    pub fn train_step(&mut self, batch: &BatchView, lr: f32) -> Result<f64, BatchError> {
        let par = self.par;
        self.check_capacity(batch)?;
        let mut sw = Stopwatch(Instant::now());
        validate_batch(batch, self.cfg.num_dense, &self.embeddings.tables)?;
        sw.lap(&mut self.phases.other);
        self.forward_logits(batch, &mut sw);

        let b = batch.size();
        let (nd, d) = (self.cfg.num_dense, self.cfg.embedding_dim);
        let w0 = self.cfg.input_width();
        let hw = self.cfg.head_width();
        let loss_sum = bce_with_logits(
            self.head.output(b).as_slice(),
            batch.labels,
            &mut self.probs[..b],
            &mut self.grad_logits[..b],
            1.0 / b as f32,
        );
        sw.lap(&mut self.phases.loss);

        self.head.backward(
            MatRef::new(&self.head_in[..b * hw], b, hw),
            None,
            MatRef::new(&self.grad_logits[..b], b, 1),
            Some(MatMut::new(&mut self.grad_head_in[..b * hw], b, hw)),
            par,
        );
        sw.lap(&mut self.phases.top_bwd);

        let x0 = MatRef::new(&self.x0[..b * w0], b, w0);
        self.deep.backward(
            x0,
            Some(MatRef::with_row_stride(&self.head_in[w0..], b, hw - w0, hw)),
            MatRef::with_row_stride(&self.grad_head_in[w0..], b, hw - w0, hw),
            Some(MatMut::new(&mut self.grad_x0[..b * w0], b, w0)),
            par,
        );
        sw.lap(&mut self.phases.bot_bwd);

        let need = self.cfg.kind.saved_len(w0, self.cfg.cross_layers, b);
        cross_backward(
            &cross_net(&self.cfg, &self.cross_w, &self.cross_b),
            MatRef::new(&self.x0, b, w0),
            &self.saved[..need],
            MatRef::with_row_stride(&self.grad_head_in, b, w0, hw),
            CrossGrads {
                x0: MatMut::new(&mut self.grad_x0, b, w0),
                accumulate_x0: true,
                w: &mut self.grad_cross_w,
                b: &mut self.grad_cross_b,
            },
            &mut self.cross_ws,
            par,
        );
        sw.lap(&mut self.phases.interaction_bwd);

        let grads = &self.grad_x0;
        self.embeddings.update(
            |t| batch.bags(t),
            |t| (&grads[nd + t * d..], w0),
            lr,
            0.0,
            par,
        );
        sw.lap(&mut self.phases.emb_update);

        let cross = [
            (&mut self.cross_w[..], &self.grad_cross_w[..]),
            (&mut self.cross_b[..], &self.grad_cross_b[..]),
        ];
        let layers = self
            .deep
            .layers
            .iter_mut()
            .chain(self.head.layers.iter_mut())
            .flat_map(|l| {
                [
                    (&mut l.weight[..], &l.grad_weight[..]),
                    (&mut l.bias[..], &l.grad_bias[..]),
                ]
            });
        self.dense_opt
            .step(cross.into_iter().chain(layers), lr, par);
        sw.lap(&mut self.phases.dense_update);
        Ok(loss_sum / b as f64)
    }
}

impl Model for Dcn {
    fn name(&self) -> &'static str {
        match self.cfg.kind {
            CrossKind::RankOne => "dcn",
            CrossKind::FullRank => "dcn-v2",
        }
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
        let w0 = self.cfg.input_width();
        let hw = self.cfg.head_width();
        self.deep.reserve(batch);
        self.head.reserve(batch);
        self.x0.resize(batch * w0, 0.0);
        self.grad_x0.resize(batch * w0, 0.0);
        self.saved.resize(
            self.cfg.kind.saved_len(w0, self.cfg.cross_layers, batch),
            0.0,
        );
        self.head_in.resize(batch * hw, 0.0);
        self.grad_head_in.resize(batch * hw, 0.0);
        self.probs.resize(batch, 0.0);
        self.grad_logits.resize(batch, 0.0);
        self.capacity = batch;
    }
    fn train_step(&mut self, batch: &BatchView, lr: f32) -> Result<f64, BatchError> {
        Dcn::train_step(self, batch, lr)
    }
    fn predict(&mut self, batch: &BatchView, out: &mut Vec<f32>) -> Result<(), BatchError> {
        Dcn::predict(self, batch, out)
    }
    fn phases(&self) -> PhaseSeconds {
        self.phases
    }
    fn add_other_seconds(&mut self, seconds: f64) {
        self.phases.other += seconds;
    }
    fn dense_parameters(&self) -> Vec<(String, &[f32])> {
        let mut p = vec![
            ("cross_l.weight".to_string(), &self.cross_w[..]),
            ("cross_l.bias".to_string(), &self.cross_b[..]),
        ];
        p.extend(mlp_parameters("deep_l", &self.deep));
        p.extend(mlp_parameters("head_l", &self.head));
        p
    }
    fn table_parameters(&self) -> Vec<(String, &[f32])> {
        (0..self.embeddings.len())
            .map(|t| (format!("emb_l.{t}.weight"), self.embeddings.weights(t)))
            .collect()
    }
    fn buffer_floats_per_sample(&self, _training: bool) -> usize {
        // `reserve` sizes the gradients for inference too: x0, the head's input, their
        // gradients, the cross network's saved activations, probabilities, logit gradients.
        let w0 = self.cfg.input_width();
        mlp_floats_per_sample(&self.deep, true)
            + mlp_floats_per_sample(&self.head, true)
            + 2 * (w0 + self.cfg.head_width() + 1)
            + self.cfg.kind.saved_len(w0, self.cfg.cross_layers, 1)
    }

    fn set_parallelism(&mut self, par: Par) {
        self.par = par;
    }
}
