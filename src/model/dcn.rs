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
//! Phases, in the DLRM names of [`super::PhaseSeconds`]: `interaction_*` is the cross network,
//! `bot_*` the deep network, `top_*` the final layer.

use super::mlp::Mlp;
use super::parameters::{
    Named, Parameters, TableSource, Tensor, TensorMut, mlp_shapes, visit_mlp, visit_mlp_mut,
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
use dlrm_kernels::cross::{
    CrossGrads, CrossKind, CrossNet, CrossWorkspace, cross_backward, cross_forward,
};
use dlrm_kernels::gemm::{MatMut, MatRef};
use dlrm_kernels::parallel::Par;
use serde::{Deserialize, Serialize};

/// The shape of a DCN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DcnConfig {
    /// Rank-one (DCN) or full-rank (DCN-v2) cross layers.
    #[serde(with = "cross_kind_name")]
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

    /// Shape of the cross weights: a vector (rank one) or a matrix (full rank) per layer.
    fn cross_weight_shape(&self) -> Vec<usize> {
        let w0 = self.input_width();
        match self.kind {
            CrossKind::RankOne => vec![self.cross_layers, w0],
            CrossKind::FullRank => vec![self.cross_layers, w0, w0],
        }
    }

    /// Widths of the deep network, its input first.
    fn deep_widths(&self) -> Vec<usize> {
        std::iter::once(self.input_width())
            .chain(self.deep.iter().copied())
            .collect()
    }

    /// (name, shape) of the dense tensors, in the order [`Dcn`] visits them.
    pub fn dense_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut s = vec![
            (CROSS_WEIGHT.to_string(), self.cross_weight_shape()),
            (
                CROSS_BIAS.to_string(),
                vec![self.cross_layers, self.input_width()],
            ),
        ];
        s.extend(mlp_shapes(DEEP, &self.deep_widths()));
        s.extend(mlp_shapes(HEAD, &[self.head_width(), 1]));
        s
    }
}

const CROSS_WEIGHT: &str = "cross_l.weight";
const CROSS_BIAS: &str = "cross_l.bias";
const DEEP: &str = "deep_l";
const HEAD: &str = "head_l";

/// [`CrossKind`] by name in a saved configuration (the kernels know nothing of serde).
mod cross_kind_name {
    use dlrm_kernels::cross::CrossKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(kind: &CrossKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match kind {
            CrossKind::RankOne => "rank-one",
            CrossKind::FullRank => "full-rank",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CrossKind, D::Error> {
        match String::deserialize(d)?.as_str() {
            "rank-one" => Ok(CrossKind::RankOne),
            "full-rank" => Ok(CrossKind::FullRank),
            other => Err(serde::de::Error::custom(format!(
                "unknown cross kind '{other}' (rank-one or full-rank)"
            ))),
        }
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
    /// The click loss trained with (set with [`Model::set_click_loss`]).
    loss: ClickLoss,
    grad_logits: Vec<f32>,
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
        Self::build(cfg, optimizer, seed, TableSource::Init(storage))
    }

    /// A model whose dense parameters are initialised from `seed` and whose tables come from
    /// `source`.
    pub fn build(
        cfg: DcnConfig,
        optimizer: OptimizerKind,
        seed: u64,
        source: TableSource,
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
        let deep = Mlp::new(&cfg.deep_widths(), true, &mut rng);
        let head = Mlp::new(&[cfg.head_width(), 1], false, &mut rng);
        let embeddings = SparseTables::create(
            0,
            &cfg.table_sizes,
            cfg.embedding_dim,
            optimizer,
            source,
            seed,
        )?;
        let dense_opt = DenseOptimizer::new(
            optimizer,
            cfg.dense_shapes()
                .iter()
                .map(|(_, shape)| shape.iter().product()),
        );
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
            dense_opt,
            cross_ws: CrossWorkspace::default(),
            capacity: 0,
            x0: Vec::new(),
            saved: Vec::new(),
            head_in: Vec::new(),
            grad_head_in: Vec::new(),
            grad_x0: Vec::new(),
            probs: Vec::new(),
            loss: ClickLoss::default(),
            grad_logits: Vec::new(),
            par: Par::default(),
        })
    }

    pub fn config(&self) -> &DcnConfig {
        &self.cfg
    }

    /// Forward to the logits (in the head's output buffer). The batch must be valid.
    fn forward_logits(&mut self, batch: &BatchView, timer: &mut PhaseTimer) {
        let par = self.par;
        let b = batch.size();
        let (nd, d) = (self.cfg.num_dense, self.cfg.embedding_dim);
        let w0 = self.cfg.input_width();
        let hw = self.cfg.head_width();
        let x0 = &mut self.x0[..b * w0];
        for (row, dense) in x0.chunks_mut(w0).zip(batch.dense.chunks(nd.max(1))) {
            row[..nd].copy_from_slice(&dense[..nd]);
        }
        let slots = MatMut::new(x0, b, w0).into_cols(nd, self.embeddings.len() * d);
        self.embeddings.forward(batch, slots, par);
        timer.lap(|p| &mut p.emb_fwd);

        let need = self.cfg.kind.saved_len(w0, self.cfg.cross_layers, b);
        cross_forward(
            &cross_net(&self.cfg, &self.cross_w, &self.cross_b),
            MatRef::new(&self.x0, b, w0),
            &mut self.saved[..need],
            MatMut::with_row_stride(&mut self.head_in, b, w0, hw),
            par,
        );
        timer.lap(|p| &mut p.interaction_fwd);

        let deep_out = MatMut::with_row_stride(&mut self.head_in[w0..], b, hw - w0, hw);
        self.deep
            .forward(MatRef::new(&self.x0[..b * w0], b, w0), Some(deep_out), par);
        timer.lap(|p| &mut p.bot_fwd);

        self.head
            .forward(MatRef::new(&self.head_in[..b * hw], b, hw), None, par);
        timer.lap(|p| &mut p.top_fwd);
    }

    /// Click probabilities for a batch (no gradient work).
    pub fn predict(&mut self, batch: &BatchView, probs: &mut Vec<f32>) -> Result<(), BatchError> {
        check_capacity(batch, self.capacity)?;
        validate_batch(batch, self.cfg.num_dense, &self.embeddings.tables)?;
        self.forward_logits(batch, &mut PhaseTimer::default());
        let b = batch.size();
        probs.resize(b, 0.0);
        head_predict(Task::Classification, self.head.output(b).as_slice(), probs);
        Ok(())
    }

    /// One training step: forward, mean BCE loss, backward, updates. Returns the mean loss.
    pub fn train_step(
        &mut self,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) -> Result<f64, BatchError> {
        let par = self.par;
        check_capacity(batch, self.capacity)?;
        validate_batch(batch, self.cfg.num_dense, &self.embeddings.tables)?;
        timer.lap(|p| &mut p.other);
        self.forward_logits(batch, timer);

        let b = batch.size();
        let (nd, d) = (self.cfg.num_dense, self.cfg.embedding_dim);
        let w0 = self.cfg.input_width();
        let hw = self.cfg.head_width();
        let loss_sum = head_loss(
            Task::Classification,
            &self.loss,
            self.head.output(b).as_slice(),
            batch.labels,
            &mut self.probs[..b],
            &mut self.grad_logits[..b],
        );
        timer.lap(|p| &mut p.loss);

        self.head.backward(
            MatRef::new(&self.head_in[..b * hw], b, hw),
            None,
            MatRef::new(&self.grad_logits[..b], b, 1),
            Some(MatMut::new(&mut self.grad_head_in[..b * hw], b, hw)),
            par,
        );
        timer.lap(|p| &mut p.top_bwd);

        let x0 = MatRef::new(&self.x0[..b * w0], b, w0);
        self.deep.backward(
            x0,
            Some(MatRef::with_row_stride(&self.head_in[w0..], b, hw - w0, hw)),
            MatRef::with_row_stride(&self.grad_head_in[w0..], b, hw - w0, hw),
            Some(MatMut::new(&mut self.grad_x0[..b * w0], b, w0)),
            par,
        );
        timer.lap(|p| &mut p.bot_bwd);

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
        timer.lap(|p| &mut p.interaction_bwd);

        let grads = &self.grad_x0;
        self.embeddings
            .update_batch(batch, |t| (&grads[nd + t * d..], w0), lr, 0.0, par);
        timer.lap(|p| &mut p.emb_update);

        self.update_dense(lr);
        timer.lap(|p| &mut p.dense_update);
        Ok(loss_sum / b as f64)
    }

    /// The dense optimizer's step over the cross layers, then the deep network and the head,
    /// in that fixed order (the order of the optimizer state).
    fn update_dense(&mut self, lr: f32) {
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
            .step(cross.into_iter().chain(layers), lr, self.par);
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
    fn train_step(
        &mut self,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) -> Result<f64, BatchError> {
        Dcn::train_step(self, batch, lr, timer)
    }
    fn predict(&mut self, batch: &BatchView, out: &mut Vec<f32>) -> Result<(), BatchError> {
        Dcn::predict(self, batch, out)
    }
    fn config(&self) -> ModelConfig {
        ModelConfig::Dcn(self.cfg.clone())
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
    fn set_click_loss(&mut self, loss: ClickLoss) -> Result<(), FieldError> {
        loss.check()?;
        self.loss = loss;
        Ok(())
    }
}

impl Parameters for Dcn {
    fn parameters<'a>(&'a self, visit: &mut dyn FnMut(Named<Tensor<'a>>)) {
        self.embeddings
            .visit(|t| format!("emb_l.{t}.weight"), visit);
        let mut states = self.dense_opt.states();
        let mut shapes = self.cfg.dense_shapes().into_iter();
        for values in [&self.cross_w[..], &self.cross_b[..]] {
            let (name, shape) = shapes.next().expect("the cross tensors' shapes");
            let state = states.next().unwrap_or(&[]);
            visit((name, shape, Tensor::dense(values, state)));
        }
        visit_mlp(DEEP, &self.deep, &mut states, visit);
        visit_mlp(HEAD, &self.head, &mut states, visit);
    }

    fn parameters_mut<'a>(&'a mut self, visit: &mut dyn FnMut(Named<TensorMut<'a>>)) {
        self.embeddings
            .visit_mut(|t| format!("emb_l.{t}.weight"), visit);
        let mut states = self.dense_opt.states_mut();
        let mut shapes = self.cfg.dense_shapes().into_iter();
        for values in [&mut self.cross_w[..], &mut self.cross_b[..]] {
            let (name, shape) = shapes.next().expect("the cross tensors' shapes");
            let state = states.next().unwrap_or(&mut []);
            visit((name, shape, TensorMut::Dense { values, state }));
        }
        visit_mlp_mut(DEEP, &mut self.deep, &mut states, visit);
        visit_mlp_mut(HEAD, &mut self.head, &mut states, visit);
    }
}
