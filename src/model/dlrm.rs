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
//!
//! The dense part runs data-parallel inside the process: a batch is cut into row chunks (by
//! [`chunking`], a function of the batch size alone), and each chunk runs the whole chain
//! (bottom MLP, interaction, top MLP, loss and their backward) on one thread with serial
//! kernels, its weight gradients into its own buffers. One reduction then adds the chunks'
//! gradients in chunk order, so the bits never depend on the thread count. A step has three
//! parallel regions: the embedding forward beside the chunks' bottom MLP forward, the chunks'
//! chain, and the sparse update beside the dense reduction and update.

use super::architecture::{Architecture, InteractionOp};
use super::embedding::TableLayout;
use super::mlp::{LayerGrads, Linear, Mlp, MlpBuffers, PackedWeights, swap_grads};
use super::parameters::{
    Named, Parameters, TableSource, Tensor, TensorMut, visit_mlp, visit_mlp_mut,
};
use super::sparse::SparseTables;
use super::{
    BatchError, ClickLoss, DenseOptimizer, Model, ModelConfig, OptimizerKind, PhaseTimer,
    Precision, Task, check_capacity, head_predict, mlp_floats_per_sample, validate_batch,
};
use crate::data::BatchView;
use crate::names::FieldError;
use crate::rng::{SplitMix64, derive_key};
use crate::storage::StorageKind;
use dlrm_kernels::gemm::{MatMut, MatRef, Precision as GemmPrecision};
use dlrm_kernels::interaction::{
    cat_interaction_backward, cat_interaction_forward, dot_interaction_backward,
    dot_interaction_forward,
};
use dlrm_kernels::parallel::{Par, should_split};
use rayon::prelude::*;
use std::ops::Range;

mod sharded;
pub use sharded::{CollectiveCost, CommStats, DenseReduction, ShardedDlrm, slice_of};

/// Fewest rows of a chunk of the dense step: below it a chunk's weight-gradient products (K =
/// its rows) are too short to pay for the extra gradient buffer they write and the reduction
/// reads. Chunks of 128 to 256 rows keep a chunk's activations in L2: on one thread, 8 chunks
/// of 256 rows ran the Kaggle step faster than the whole batch of 2048 at once.
pub const MIN_CHUNK_ROWS: usize = 128;
/// Most chunks a batch is cut into (each adds one gradient buffer to the reduction).
pub const MAX_CHUNKS: usize = 8;

/// How a batch of `b` samples is cut into chunks of the dense step: (chunk count, rows per
/// chunk; the last may be shorter). A function of the batch size only, never of the threads.
pub fn chunking(b: usize) -> (usize, usize) {
    let rows = b.div_ceil((b / MIN_CHUNK_ROWS).clamp(1, MAX_CHUNKS)).max(1);
    (b.div_ceil(rows), rows)
}

/// Rows chunk `c` holds at most over batches of 1 ..= `batch` samples.
fn chunk_capacity(batch: usize, c: usize) -> usize {
    (1..=batch)
        .filter_map(|b| {
            let (n, rows) = chunking(b);
            (c < n).then(|| rows.min(b - c * rows))
        })
        .max()
        .unwrap_or(0)
}

/// One chunk's buffers: its MLP activations, its gradients of every dense parameter and of
/// the rows it owns alone.
struct DenseChunk {
    /// The batch rows of the current step.
    rows: Range<usize>,
    bottom: MlpBuffers,
    top: MlpBuffers,
    bottom_grads: Vec<LayerGrads>,
    top_grads: Vec<LayerGrads>,
    grad_logits: Vec<f32>,
    grad_top_in: Vec<f32>,
    /// The chunk's sum of per-sample losses.
    loss_sum: f64,
}

/// A chunk with its rows of the batch-wide buffers, for one parallel region.
struct ChunkJob<'a> {
    chunk: &'a mut DenseChunk,
    features: &'a mut [f32],
    top_in: &'a mut [f32],
    logits: &'a mut [f32],
    probs: &'a mut [f32],
    /// Empty in inference.
    grad_features: &'a mut [f32],
}

/// The rows the dense step runs on (the whole batch, or a rank's slice of it).
#[derive(Clone, Copy)]
struct DenseInput<'a> {
    /// rows x num_dense.
    dense: &'a [f32],
    num_dense: usize,
    labels: &'a [f32],
    /// 1 / the global batch size: the loss is the mean over the whole batch on every rank.
    loss_scale: f32,
}

impl<'a> DenseInput<'a> {
    /// A whole batch.
    fn whole(batch: &BatchView<'a>) -> DenseInput<'a> {
        Self::rows(batch, 0..batch.size())
    }

    /// Rows `rows` of `batch`, the loss averaged over the whole batch.
    fn rows(batch: &BatchView<'a>, rows: Range<usize>) -> DenseInput<'a> {
        let nd = batch.num_dense;
        DenseInput {
            dense: &batch.dense[rows.start * nd..rows.end * nd],
            num_dense: nd,
            labels: &batch.labels[rows],
            loss_scale: 1.0 / batch.size() as f32,
        }
    }

    fn size(&self) -> usize {
        self.labels.len()
    }

    /// Rows `rows` of the dense features.
    fn dense_rows(&self, rows: Range<usize>) -> MatRef<'a> {
        MatRef::new(self.dense, self.size(), self.num_dense).sub(
            rows.start,
            0,
            rows.len(),
            self.num_dense,
        )
    }
}

/// What every chunk reads: the layers, the shapes and the rows.
struct StepShared<'a> {
    arch: &'a Architecture,
    bottom: &'a [Linear],
    top: &'a [Linear],
    input: DenseInput<'a>,
    /// The click loss and its gradient.
    loss: &'a ClickLoss,
    /// The operands of the MLP products (f32, or rounded to bf16 in the GEMM).
    precision: GemmPrecision,
    /// The layers' weights packed once for all chunks (None: each product packs its own).
    bottom_packed: Option<&'a [PackedWeights]>,
    top_packed: Option<&'a [PackedWeights]>,
    /// The kernels' parallelism inside a chunk: serial when several chunks share the threads.
    par: Par,
}

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
    /// The dense step's chunks ([`MAX_CHUNKS`], the unused ones without buffers).
    chunks: Vec<DenseChunk>,
    /// The MLPs' weights packed at the start of each multi-chunk pass, for all its chunks.
    bottom_packed: Vec<PackedWeights>,
    top_packed: Vec<PackedWeights>,
    /// Whether the packings hold this pass's weights (set by `place_chunks`).
    weights_packed: bool,
    features: Vec<f32>,
    top_in: Vec<f32>,
    logits: Vec<f32>,
    grad_features: Vec<f32>,
    probs: Vec<f32>,
    /// The click loss trained with (set with [`Model::set_click_loss`]).
    loss: ClickLoss,
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
        let embeddings = SparseTables::create(
            0,
            &arch.table_sizes,
            arch.embedding_dim,
            optimizer,
            source,
            seed,
        )?;
        Ok(Self::with_tables(arch, optimizer, seed, embeddings))
    }

    /// A model whose MLPs are initialised from `seed`, over `embeddings` (all the tables, or
    /// a rank's share of them).
    fn with_tables(
        arch: Architecture,
        optimizer: OptimizerKind,
        seed: u64,
        embeddings: SparseTables,
    ) -> Dlrm {
        let mut rng = SplitMix64::new(derive_key(seed, &[0x0d15_e0de]));
        let bottom = Mlp::new(&arch.bottom, true, &mut rng);
        let top = Mlp::new(&arch.top, false, &mut rng);
        let dense_opt = DenseOptimizer::new(
            optimizer,
            bottom
                .layers
                .iter()
                .chain(&top.layers)
                .flat_map(|l| [l.weight.len(), l.bias.len()]),
        );
        let chunks = (0..MAX_CHUNKS)
            .map(|_| DenseChunk {
                rows: 0..0,
                bottom: MlpBuffers::new(&bottom.layers),
                top: MlpBuffers::new(&top.layers),
                bottom_grads: Vec::new(),
                top_grads: Vec::new(),
                grad_logits: Vec::new(),
                grad_top_in: Vec::new(),
                loss_sum: 0.0,
            })
            .collect();
        Dlrm {
            arch,
            optimizer,
            bottom_packed: PackedWeights::for_layers(&bottom.layers),
            top_packed: PackedWeights::for_layers(&top.layers),
            weights_packed: false,
            bottom,
            top,
            embeddings,
            dense_opt,
            capacity: 0,
            train_capacity: 0,
            chunks,
            features: Vec::new(),
            top_in: Vec::new(),
            logits: Vec::new(),
            grad_features: Vec::new(),
            probs: Vec::new(),
            loss: ClickLoss::default(),
            par: Par::default(),
        }
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
        let (bottom, top, w) = (&self.bottom.layers, &self.top.layers, self.arch.top[0]);
        for (c, chunk) in self.chunks.iter_mut().enumerate() {
            let rows = chunk_capacity(batch, c);
            if rows == 0 {
                continue;
            }
            chunk.bottom.reserve(bottom, rows);
            chunk.top.reserve(top, rows);
            if chunk.bottom_grads.is_empty() {
                chunk.bottom_grads = LayerGrads::for_layers(bottom);
                chunk.top_grads = LayerGrads::for_layers(top);
            }
            chunk.grad_logits.resize(rows, 0.0);
            chunk.grad_top_in.resize(rows * w, 0.0);
        }
        self.grad_features
            .resize(batch * self.feature_stride(), 0.0);
        self.train_capacity = batch;
    }

    /// Sizes only the forward buffers, for inference (no gradient memory).
    pub fn reserve_inference(&mut self, batch: usize) {
        if batch <= self.capacity {
            return;
        }
        let fd = self.feature_stride();
        let w = self.arch.top[0];
        for (c, chunk) in self.chunks.iter_mut().enumerate() {
            let rows = chunk_capacity(batch, c);
            chunk.bottom.reserve_forward(&self.bottom.layers, rows);
            chunk.top.reserve_forward(&self.top.layers, rows);
        }
        self.features.resize(batch * fd, 0.0);
        self.top_in.resize(batch * w, 0.0);
        self.logits.resize(batch, 0.0);
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

    /// The forward to the logits, and in training the loss and the backward of everything but
    /// the embeddings (the chunks' weight gradients not yet reduced). The batch must be valid.
    /// Returns the batch's summed loss (0 in inference).
    fn dense_pass(&mut self, batch: &BatchView, training: bool, timer: &mut PhaseTimer) -> f64 {
        let (b, d, fd, par) = (
            batch.size(),
            self.arch.embedding_dim,
            self.feature_stride(),
            self.par,
        );
        let input = DenseInput::whole(batch);
        let n = self.place_chunks(b, chunking(b).1, training);
        let precision = self.bottom.precision;
        let bottom_packed = self.weights_packed.then_some(&self.bottom_packed[..]);
        // The embedding lookups (memory-bound) beside the bottom MLP (compute-bound).
        let slots = MatMut::new(&mut self.features[..b * fd], b, fd)
            .into_cols(d, self.embeddings.len() * d);
        let embeddings = &mut self.embeddings;
        let (chunks, bottom) = (&mut self.chunks[..n], &self.bottom.layers);
        join(
            par,
            || embeddings.forward(batch, slots, par),
            || bottom_forward(chunks, bottom, bottom_packed, &input, precision, par),
        );
        timer.lap(|p| &mut p.emb_fwd);
        self.chunk_chain(input, n, training, timer)
    }

    /// Cuts `b` rows into chunks of `rows` (the last may be shorter); returns their count.
    /// Several chunks share one packing of each weight matrix, made here (for bf16 products
    /// rounded once, in their own layout). So does a training step of one chunk: its products
    /// then skip their own packing (a fork-join each when they run on the pool), which is most
    /// of a small batch's fixed cost.
    fn place_chunks(&mut self, b: usize, rows: usize, training: bool) -> usize {
        let n = b.div_ceil(rows);
        for (c, chunk) in self.chunks[..n].iter_mut().enumerate() {
            chunk.rows = c * rows..((c + 1) * rows).min(b);
        }
        self.weights_packed = n > 1 || training;
        if self.weights_packed {
            let (bottom, top) = (&self.bottom.layers, &self.top.layers);
            let (bottom_packed, top_packed) = (&mut self.bottom_packed, &mut self.top_packed);
            let precision = self.bottom.precision;
            join(
                self.par,
                || pack_weights(bottom, bottom_packed, precision, self.par),
                || pack_weights(top, top_packed, precision, self.par),
            );
        }
        n
    }

    /// After the bottom MLP and with the embedding slots of `features` filled: each of the
    /// `n` chunks' interaction, top MLP and (in training) loss and backward. Returns the summed
    /// loss of the input's rows.
    fn chunk_chain(
        &mut self,
        input: DenseInput,
        n: usize,
        training: bool,
        timer: &mut PhaseTimer,
    ) -> f64 {
        let (b, fd) = (input.size(), self.feature_stride());
        let chunks = &mut self.chunks[..n];
        let shared = StepShared {
            arch: &self.arch,
            bottom: &self.bottom.layers,
            top: &self.top.layers,
            input,
            loss: &self.loss,
            precision: self.bottom.precision,
            bottom_packed: self.weights_packed.then_some(&self.bottom_packed[..]),
            top_packed: self.weights_packed.then_some(&self.top_packed[..]),
            par: if n == 1 { self.par } else { Par::Seq },
        };
        let (w, grad_fd) = (self.arch.top[0], if training { fd } else { 0 });
        let mut rest = (
            &mut self.features[..b * fd],
            &mut self.top_in[..b * w],
            &mut self.logits[..b],
            &mut self.probs[..b],
            &mut self.grad_features[..b * grad_fd],
        );
        let mut jobs: [Option<ChunkJob>; MAX_CHUNKS] = Default::default();
        for (job, chunk) in jobs.iter_mut().zip(chunks) {
            let r = chunk.rows.len();
            *job = Some(ChunkJob {
                chunk,
                features: take_rows(&mut rest.0, r * fd),
                top_in: take_rows(&mut rest.1, r * w),
                logits: take_rows(&mut rest.2, r),
                probs: take_rows(&mut rest.3, r),
                grad_features: take_rows(&mut rest.4, r * grad_fd),
            });
        }
        for_each_chunk(self.par, &mut jobs[..n], |job| {
            let job = job.as_mut().expect("one job per chunk");
            chunk_forward(&shared, job);
            job.chunk.loss_sum = if training {
                chunk_backward(&shared, job)
            } else {
                0.0
            };
        });
        timer.lap(|p| &mut p.top_bwd);
        self.chunks[..n].iter().map(|c| c.loss_sum).sum()
    }

    /// Click probabilities for a batch (inference: no gradient work).
    pub fn predict(&mut self, batch: &BatchView, probs: &mut Vec<f32>) -> Result<(), BatchError> {
        check_capacity(batch, self.capacity)?;
        self.validate(batch)?;
        self.dense_pass(batch, false, &mut PhaseTimer::default());
        let b = batch.size();
        probs.resize(b, 0.0);
        head_predict(Task::Classification, &self.logits[..b], probs);
        Ok(())
    }

    /// One training step: forward, mean BCE loss, backward, and the updates (embeddings fused
    /// into their backward, dense parameters after the reduction of the chunks' gradients).
    /// Returns the batch's mean loss. The timer books each parallel region to one phase:
    /// `emb_fwd` (the embedding forward beside the bottom MLP forward), `top_bwd` (the chunks'
    /// interaction, top MLP, loss and backward), `emb_update` (the sparse update beside the
    /// reduction and the dense update); `other` is the batch check.
    pub fn train_step(
        &mut self,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) -> Result<f64, BatchError> {
        check_capacity(batch, self.train_capacity)?;
        self.validate(batch)?;
        timer.lap(|p| &mut p.other);
        let loss_sum = self.dense_pass(batch, true, timer);

        // The sparse updates (fused with the embeddings' backward, tables in parallel, each
        // reading its slot of the feature gradients) beside the dense ones.
        let (d, fd, par) = (self.arch.embedding_dim, self.feature_stride(), self.par);
        let n = chunking(batch.size()).0;
        let grads = &self.grad_features;
        let embeddings = &mut self.embeddings;
        let (bottom, top) = (&mut self.bottom.layers, &mut self.top.layers);
        let (chunks, dense_opt) = (&mut self.chunks[..n], &mut self.dense_opt);
        join(
            par,
            || embeddings.update_batch(batch, |t| (&grads[(t + 1) * d..], fd), lr, 0.0, par),
            || {
                if let [only] = chunks {
                    // One chunk's gradients are the batch's: moved, not copied.
                    swap_grads(bottom, &mut only.bottom_grads);
                    swap_grads(top, &mut only.top_grads);
                } else {
                    reduce_grads(bottom, chunks, |c| &c.bottom_grads, par);
                    reduce_grads(top, chunks, |c| &c.top_grads, par);
                }
                update_dense(dense_opt, bottom, top, lr, par);
            },
        );
        timer.lap(|p| &mut p.emb_update);
        Ok(loss_sum / batch.size() as f64)
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
        &self.logits[..batch_size]
    }

    /// The last batch's probabilities (valid after `train_step`).
    pub fn last_probabilities(&self, batch_size: usize) -> &[f32] {
        &self.probs[..batch_size]
    }
}

/// The first `len` floats of `rest`, which keeps the others.
fn take_rows<'a>(rest: &mut &'a mut [f32], len: usize) -> &'a mut [f32] {
    let (head, tail) = std::mem::take(rest).split_at_mut(len);
    *rest = tail;
    head
}

/// `a` and `b`, side by side on the pool unless `par` is serial.
fn join(par: Par, a: impl FnOnce() + Send, b: impl FnOnce() + Send) {
    if par == Par::Seq {
        a();
        b();
    } else {
        rayon::join(a, b);
    }
}

/// Packs each layer's weights into its [`PackedWeights`] for `precision`, layers in parallel
/// unless `par` is serial.
fn pack_weights(
    layers: &[Linear],
    packed: &mut [PackedWeights],
    precision: GemmPrecision,
    par: Par,
) {
    let pack = |(p, l): (&mut PackedWeights, &Linear)| p.pack_for(l, precision);
    if par == Par::Seq {
        packed.iter_mut().zip(layers).for_each(pack);
    } else {
        packed.par_iter_mut().zip(layers).for_each(pack);
    }
}

/// `f` on every item, one pool task each unless `par` is serial.
fn for_each_chunk<T: Send>(par: Par, items: &mut [T], f: impl Fn(&mut T) + Sync + Send) {
    if par == Par::Seq || items.len() == 1 {
        items.iter_mut().for_each(f);
    } else {
        items.par_iter_mut().for_each(f);
    }
}

/// Each chunk's bottom MLP forward on its rows of `input` (chunks in parallel unless one).
fn bottom_forward(
    chunks: &mut [DenseChunk],
    layers: &[Linear],
    packed: Option<&[PackedWeights]>,
    input: &DenseInput,
    precision: GemmPrecision,
    par: Par,
) {
    let chunk_par = if chunks.len() == 1 { par } else { Par::Seq };
    for_each_chunk(par, chunks, |chunk| {
        let x = input.dense_rows(chunk.rows.clone());
        chunk
            .bottom
            .forward(layers, packed, x, None, precision, chunk_par);
    });
}

/// A chunk's forward after its bottom MLP: its bottom output into slot 0 of its feature rows,
/// the interaction, and the top MLP into its logits.
fn chunk_forward(s: &StepShared, job: &mut ChunkJob) {
    let (r, d, f) = (
        job.logits.len(),
        s.arch.embedding_dim,
        s.arch.num_features(),
    );
    let (fd, w) = (f * d, s.arch.top[0]);
    let bottom_out = job.chunk.bottom.output(r);
    for (i, row) in job.features.chunks_exact_mut(fd).enumerate() {
        row[..d].copy_from_slice(bottom_out.row_slice(i, 0, d));
    }
    let features = MatRef::new(job.features, r, fd);
    let top_in = MatMut::new(job.top_in, r, w);
    match s.arch.interaction {
        InteractionOp::Dot => {
            dot_interaction_forward(features, f, s.arch.self_interaction, top_in, s.par)
        }
        InteractionOp::Cat => cat_interaction_forward(features, top_in, s.par),
    }
    let logits = MatMut::new(job.logits, r, 1);
    let top_in = MatRef::new(job.top_in, r, w);
    job.chunk.top.forward(
        s.top,
        s.top_packed,
        top_in,
        Some(logits),
        s.precision,
        s.par,
    );
}

/// A chunk's loss and backward down to its feature gradients and its dense gradients.
/// Returns the chunk's summed loss.
fn chunk_backward(s: &StepShared, job: &mut ChunkJob) -> f64 {
    let (r, d, f) = (
        job.logits.len(),
        s.arch.embedding_dim,
        s.arch.num_features(),
    );
    let (fd, w, rows) = (f * d, s.arch.top[0], job.chunk.rows.clone());
    let chunk = &mut *job.chunk;
    // The mean over the whole (global) batch: each sample's gradient is scaled by 1 / its size.
    let grad_logits = &mut chunk.grad_logits[..r];
    let loss_sum = s.loss.apply(
        job.logits,
        &s.input.labels[rows.clone()],
        job.probs,
        grad_logits,
        s.input.loss_scale,
    );
    let (top_in, logits) = (MatRef::new(job.top_in, r, w), MatRef::new(job.logits, r, 1));
    let grad_top_in = &mut chunk.grad_top_in[..r * w];
    chunk.top.backward(
        s.top,
        s.top_packed,
        top_in,
        Some(logits),
        MatRef::new(grad_logits, r, 1),
        Some(MatMut::new(grad_top_in, r, w)),
        &mut chunk.top_grads,
        s.precision,
        s.par,
    );
    let features = MatRef::new(job.features, r, fd);
    let grad_top_in = MatRef::new(grad_top_in, r, w);
    let grad_features = MatMut::new(job.grad_features, r, fd);
    match s.arch.interaction {
        InteractionOp::Dot => dot_interaction_backward(
            features,
            f,
            s.arch.self_interaction,
            grad_top_in,
            grad_features,
            s.par,
        ),
        InteractionOp::Cat => cat_interaction_backward(grad_top_in, grad_features, s.par),
    }
    let x = s.input.dense_rows(rows);
    let d_bottom_out = MatRef::with_row_stride(job.grad_features, r, d, fd);
    chunk.bottom.backward(
        s.bottom,
        s.bottom_packed,
        x,
        None,
        d_bottom_out,
        None,
        &mut chunk.bottom_grads,
        s.precision,
        s.par,
    );
    loss_sum
}

/// Elements per task of the gradient reduction.
const REDUCE_BLOCK: usize = 1 << 14;

/// Each layer's gradients = the sum of the chunks' gradients `grads(chunk)`, added in chunk
/// order (so the bits do not depend on how the elements are split over threads).
fn reduce_grads(
    layers: &mut [Linear],
    chunks: &[DenseChunk],
    grads: fn(&DenseChunk) -> &[LayerGrads],
    par: Par,
) {
    for (l, layer) in layers.iter_mut().enumerate() {
        sum_in_order(
            &mut layer.grad_weight,
            |c| &grads(&chunks[c])[l].weight,
            chunks.len(),
            par,
        );
        sum_in_order(
            &mut layer.grad_bias,
            |c| &grads(&chunks[c])[l].bias,
            chunks.len(),
            par,
        );
    }
}

/// out = part(0) + part(1) + ... + part(n - 1), element by element in that order.
fn sum_in_order<'a>(out: &mut [f32], part: impl Fn(usize) -> &'a [f32] + Sync, n: usize, par: Par) {
    let block = |(k, out): (usize, &mut [f32])| {
        let at = k * REDUCE_BLOCK..k * REDUCE_BLOCK + out.len();
        out.copy_from_slice(&part(0)[at.clone()]);
        for c in 1..n {
            for (o, g) in out.iter_mut().zip(&part(c)[at.clone()]) {
                *o += g;
            }
        }
    };
    if should_split(par, out.len() * n, 4 * REDUCE_BLOCK) {
        out.par_chunks_mut(REDUCE_BLOCK).enumerate().for_each(block);
    } else {
        out.chunks_mut(REDUCE_BLOCK).enumerate().for_each(block);
    }
}

/// The optimizer step of every dense parameter (bottom then top, weight then bias).
fn update_dense(
    opt: &mut DenseOptimizer,
    bottom: &mut [Linear],
    top: &mut [Linear],
    lr: f32,
    par: Par,
) {
    let layers = bottom.iter_mut().chain(top.iter_mut()).flat_map(|l| {
        [
            (&mut l.weight[..], &l.grad_weight[..]),
            (&mut l.bias[..], &l.grad_bias[..]),
        ]
    });
    opt.step(layers, lr, par);
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
    fn precision(&self) -> Precision {
        match self.bottom.precision {
            GemmPrecision::F32 => Precision::Fp32,
            GemmPrecision::Bf16 => Precision::Bf16,
        }
    }
    /// BF16: the MLP products on bf16 operands, the tables split (see [`Precision`]).
    fn set_precision(&mut self, precision: Precision) -> anyhow::Result<()> {
        let (gemm, layout) = match precision {
            Precision::Fp32 => (GemmPrecision::F32, TableLayout::Fp32),
            Precision::Bf16 => (GemmPrecision::Bf16, TableLayout::SplitBf16),
        };
        self.embeddings.set_layout(layout)?;
        self.bottom.precision = gemm;
        self.top.precision = gemm;
        Ok(())
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
