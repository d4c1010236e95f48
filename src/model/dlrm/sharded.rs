//! DLRM on N ranks, the hybrid parallelism of Naumov et al. (2019, section "Parallelism"):
//!
//! - the embedding tables are model-parallel: each rank owns whole tables ([`ShardPlan`]) and
//!   looks them up for the whole global batch;
//! - an all-to-all (the paper's "butterfly shuffle") sends each rank's pooled vectors of
//!   sample slice q to rank q, which places them in its feature rows;
//! - the MLPs and the interaction are data-parallel: rank q runs the dense step (the same row
//!   chunks as one process) on its slice, the loss still the mean over the global batch;
//! - backward, the reverse all-to-all returns each table's output gradients to its owner,
//!   which applies its fused sparse update; the dense gradients are reduced across ranks
//!   before the dense update.
//!
//! Each collective runs beside compute that does not need its result, so that a rank works
//! while it would otherwise wait for the slowest one: the forward all-to-all is in flight
//! during the slice's bottom MLP (after the lookups), the dense reduction during the backward
//! all-to-all and the sparse updates (as PyTorch's DDP overlaps its gradient all-reduce with
//! the backward). The overlapped pieces touch disjoint buffers and parameters, so the
//! results are the bits of running them one after the other.
//!
//! Tiny tables the plan replicates are data-parallel like the MLPs: each rank looks them up
//! for its slice; backward their pooled gradients are gathered in rank order (the global
//! batch's, in sample order) and every rank applies the whole batch's fused update, the very
//! update one process applies, so the replicas stay identical and exact.
//!
//! Tables too large for one rank are split row-wise ([`Placement::Rows`]): see [`row_shards`]
//! for how their ranges are looked up, pooled and updated, bit for bit as one process does.
//!
//! With [`DenseReduction::Ordered`] every chunk's gradients are gathered and added in global
//! chunk order, which is the single-process reduction (`reduce_grads`): N ranks then train
//! bit for bit the model one process trains on the same global batch.

use super::{
    DenseInput, Dlrm, bottom_forward, chunking, reduce_grads, sum_in_order, swap_grads,
    update_dense,
};
use crate::data::BatchView;
#[cfg(doc)]
use crate::distributed::Placement;
use crate::distributed::{Collectives, ShardPlan};
use crate::model::architecture::Architecture;
use crate::model::mlp::Linear;
use crate::model::parameters::{
    Named, Parameters, TableSource, Tensor, TensorMut, visit_mlp, visit_mlp_mut,
};
use crate::model::sparse::SparseTables;
use crate::model::{
    BatchError, OptimizerKind, PhaseTimer, Task, check_capacity, head_predict, validate_batch_rows,
};
use crate::storage::StorageKind;
use dlrm_kernels::embedding::Bags;
use row_shards::{RowShards, slices};
use serde::Serialize;
use std::mem::take;
use std::ops::Range;
use std::time::Instant;

mod row_shards;

/// How the dense gradients are reduced across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenseReduction {
    /// One MPI_Allreduce of each rank's summed gradients: the fewest bytes; the addition
    /// order is the MPI library's, so results agree with one process to rounding.
    AllReduce,
    /// Every chunk's gradients gathered (MPI_Allgatherv) and added in global chunk order:
    /// bit-identical to one process. Each rank's slice must be whole chunks.
    Ordered,
}

/// One collective's totals over a run, on this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CollectiveCost {
    pub calls: u64,
    pub seconds: f64,
    /// Bytes this rank sent to the other ranks.
    pub bytes: u64,
}

impl CollectiveCost {
    fn add(&mut self, since: Instant, bytes: usize) {
        self.add_beside(since, 0.0, bytes);
    }

    /// A collective started at `since` that ran beside `overlapped` seconds of other work:
    /// only the rest is the collective's (its start, and the wait after the work).
    fn add_beside(&mut self, since: Instant, overlapped: f64, bytes: usize) {
        self.calls += 1;
        self.seconds += (since.elapsed().as_secs_f64() - overlapped).max(0.0);
        self.bytes += bytes as u64;
    }
}

/// The communication of a run, per collective, on this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CommStats {
    pub forward_all_to_all: CollectiveCost,
    pub backward_all_to_all: CollectiveCost,
    pub dense_all_reduce: CollectiveCost,
    /// The replicated tables' pooled gradients, gathered from every rank.
    pub replica_all_gather: CollectiveCost,
    /// The rows looked up in row-wise shards, sent to the ranks owning each sample.
    pub row_shard_all_to_all: CollectiveCost,
    /// The row-wise shards' pooled gradients, gathered from every rank.
    pub row_shard_all_gather: CollectiveCost,
}

impl CommStats {
    pub fn seconds(&self) -> f64 {
        self.forward_all_to_all.seconds
            + self.backward_all_to_all.seconds
            + self.dense_all_reduce.seconds
            + self.replica_all_gather.seconds
            + self.row_shard_all_to_all.seconds
            + self.row_shard_all_gather.seconds
    }
}

/// Rows `q` of `n` equal (to one row) slices of `b`: rank q's samples of a global batch.
pub fn slice_of(q: usize, n: usize, b: usize) -> Range<usize> {
    q * b / n..(q + 1) * b / n
}

/// One rank's share of a DLRM: its tables, all the MLPs, and the exchange buffers.
pub struct ShardedDlrm {
    model: Dlrm,
    plan: ShardPlan,
    rank: usize,
    /// Per rank: the tables it owns, in table order.
    owned: Vec<Vec<usize>>,
    /// The tables every rank holds (in table order) and this rank's replicas of them.
    replicated: Vec<usize>,
    replicas: SparseTables,
    /// This rank's ranges of the tables split row-wise.
    rows: RowShards,
    /// The tables whose ids this rank reads for the whole global batch, in table order.
    read: Vec<usize>,
    /// Per replica: its bags' offsets for this rank's slice, rebased to start at 0.
    slice_offsets: Vec<Vec<u32>>,
    /// This rank's slice x replicas x d: their pooled vectors, then their gradients.
    replica_pooled: Vec<f32>,
    /// Global batch x replicas x d: every rank's replica gradients, in sample order.
    replica_grads: Vec<f32>,
    reduction: DenseReduction,
    /// Global batch x this rank's tables x d: the pooled lookups, then their gradients.
    pooled: Vec<f32>,
    /// This rank's slice x all tables x d, blocks by owner: the pooled vectors received, then
    /// the gradients sent back.
    exchange: Vec<f32>,
    /// The dense gradients, flattened (bottom then top; weight then bias).
    flat: Vec<f32>,
    /// Every rank's chunk gradients ([`DenseReduction::Ordered`]).
    gathered: Vec<f32>,
    stats: CommStats,
}

impl ShardedDlrm {
    /// Rank `rank`'s share under `plan`: the tables it owns from `source` (keyed and named by
    /// their index in the whole model) and the MLPs initialised from `seed` as one process
    /// initialises them.
    pub fn new(
        arch: Architecture,
        optimizer: OptimizerKind,
        seed: u64,
        source: TableSource,
        plan: ShardPlan,
        rank: usize,
        reduction: DenseReduction,
    ) -> anyhow::Result<ShardedDlrm> {
        // Checked before any table is made, so that a refusal leaves no table file behind.
        if !plan.row_split().is_empty()
            && matches!(source, TableSource::Init(StorageKind::File { .. }))
        {
            anyhow::bail!(
                "tables split row-wise (--sharding row, or auto with a table larger than \
                 --rank-memory-gib) are made in anonymous memory: new file-backed tables are \
                 not supported for them (a checkpoint's tables load into either storage)"
            );
        }
        let owned: Vec<Vec<usize>> = (0..plan.ranks()).map(|q| plan.tables_of(q)).collect();
        let replicated = plan.replicated();
        let create = |indices: &[usize]| {
            let (rows, d) = (&arch.table_sizes, arch.embedding_dim);
            SparseTables::create_at(indices, rows, d, optimizer, source, seed)
        };
        let (tables, replicas) = (create(&owned[rank])?, create(&replicated)?);
        let (d, sizes) = (arch.embedding_dim, &arch.table_sizes);
        let rows = RowShards::new(&plan, rank, sizes, d, optimizer, source, seed)?;
        let mut read = [&owned[rank][..], &replicated[..], rows.tables()].concat();
        read.sort_unstable();
        Ok(ShardedDlrm {
            read,
            model: Dlrm::with_tables(arch, optimizer, seed, tables),
            plan,
            rank,
            owned,
            slice_offsets: vec![Vec::new(); replicated.len()],
            replicated,
            replicas,
            rows,
            replica_pooled: Vec::new(),
            replica_grads: Vec::new(),
            reduction,
            pooled: Vec::new(),
            exchange: Vec::new(),
            flat: Vec::new(),
            gathered: Vec::new(),
            stats: CommStats::default(),
        })
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The tables this rank owns, in table order.
    pub fn tables(&self) -> &[usize] {
        &self.owned[self.rank]
    }

    /// The tables whose ids this rank reads for the whole global batch, in table order: those
    /// it owns, the replicated ones (every rank applies a replica's whole-batch update) and
    /// those split row-wise (every rank pools its slice from them, and updates its range).
    pub fn tables_read(&self) -> &[usize] {
        &self.read
    }

    /// This rank's model: its tables (`embeddings`, in the order of [`tables`](Self::tables))
    /// and every dense parameter.
    pub fn local(&self) -> &Dlrm {
        &self.model
    }

    pub fn reduction(&self) -> DenseReduction {
        self.reduction
    }

    /// The communication so far.
    pub fn comm_stats(&self) -> CommStats {
        self.stats
    }

    pub fn set_parallelism(&mut self, par: dlrm_kernels::parallel::Par) {
        self.model.par = par;
    }

    /// Why a global training batch of `b` samples cannot run on these ranks, if it cannot.
    pub fn batch_size_error(&self, b: usize) -> Option<String> {
        let n = self.plan.ranks();
        if !b.is_multiple_of(n) {
            return Some(format!(
                "--mini-batch-size {b} is not divisible by the {n} ranks (each rank trains an \
                 equal slice of the global batch)"
            ));
        }
        let rows = chunking(b).1;
        if self.reduction == DenseReduction::Ordered && !(b / n).is_multiple_of(rows) {
            return Some(format!(
                "--deterministic needs each rank's {} samples to be whole chunks of the dense \
                 step ({rows} rows at --mini-batch-size {b}); pick a batch size whose slices are",
                b / n
            ));
        }
        None
    }

    /// Sizes the buffers for training on global batches of up to `batch` samples.
    pub fn reserve(&mut self, batch: usize) {
        self.model.reserve(batch);
        self.reserve_exchange(batch);
    }

    /// Sizes the buffers for inference on global batches of up to `batch` samples.
    pub fn reserve_inference(&mut self, batch: usize) {
        self.model.reserve_inference(batch);
        self.reserve_exchange(batch);
    }

    fn reserve_exchange(&mut self, batch: usize) {
        let d = self.model.arch.embedding_dim;
        let slice = batch.div_ceil(self.plan.ranks());
        let pooled = batch * self.tables().len() * d;
        if self.pooled.len() < pooled {
            self.pooled.resize(pooled, 0.0);
        }
        let exchange = slice * self.sharded_tables() * d;
        if self.exchange.len() < exchange {
            self.exchange.resize(exchange, 0.0);
        }
        self.rows.reserve(batch, self.plan.ranks());
        let r = self.replicated.len();
        if self.replica_grads.len() < batch * r * d {
            self.replica_pooled.resize(slice * r * d, 0.0);
            self.replica_grads.resize(batch * r * d, 0.0);
        }
    }

    /// The number of tables the ranks own (the ones the all-to-alls carry).
    fn sharded_tables(&self) -> usize {
        self.owned.iter().map(Vec::len).sum()
    }

    /// Rank `q`'s rows of a global batch of `b`.
    fn slice(&self, q: usize, b: usize) -> Range<usize> {
        slice_of(q, self.plan.ranks(), b)
    }

    /// The lookups of this rank's tables for the whole batch, then the forward all-to-all
    /// into its feature rows with its slice's bottom MLP running while the exchange is in
    /// flight (the MLP hides the wait for the other ranks' lookups). Returns the slice's
    /// dense input and its chunk count. `training`: the pass of a training step (see
    /// `Dlrm::place_chunks`).
    fn forward<'a>(
        &mut self,
        comm: &dyn Collectives,
        batch: &BatchView<'a>,
        training: bool,
        timer: &mut PhaseTimer,
    ) -> (DenseInput<'a>, usize) {
        let (big_b, d, par) = (batch.size(), self.model.arch.embedding_dim, self.model.par);
        let mine = self.slice(self.rank, big_b);
        let input = DenseInput::rows(batch, mine.clone());
        let b = input.size();
        // The chunks of the global batch, as one process cuts it: 4 x 256 rows per rank of 2 at
        // batch 2048 rather than 8 x 128 (longer weight-gradient products, half the chunk
        // gradients to reduce).
        let n = self.model.place_chunks(b, chunking(big_b).1, training);
        let precision = self.model.bottom.precision;
        let owned = &self.owned[self.rank];
        let (k, r) = (owned.len(), self.replicated.len());
        let pooled =
            dlrm_kernels::gemm::MatMut::new(&mut self.pooled[..big_b * k * d], big_b, k * d);
        for (offsets, &t) in self.slice_offsets.iter_mut().zip(&self.replicated) {
            rebase_offsets(batch.offsets(t), mine.clone(), offsets);
        }
        let (replicated, slice_offsets) = (&self.replicated, &self.slice_offsets);
        let replica_bags =
            |i: usize| slice_bags(batch, replicated[i], mine.clone(), &slice_offsets[i]);
        let replica_pooled =
            dlrm_kernels::gemm::MatMut::new(&mut self.replica_pooled[..b * r * d], b, r * d);
        (self.model.embeddings).forward_bags(|t| batch.bags(owned[t]), pooled, par);
        (self.replicas).forward_bags(replica_bags, replica_pooled, par);

        let send: Vec<usize> = (0..self.plan.ranks())
            .map(|q| self.slice(q, big_b).len() * k * d)
            .collect();
        let recv: Vec<usize> = self.owned.iter().map(|o| b * o.len() * d).collect();
        let exchanged = b * self.sharded_tables() * d;
        let (chunks, bottom) = (&mut self.model.chunks[..n], &self.model.bottom.layers);
        let bottom_packed = (self.model.weights_packed).then_some(&self.model.bottom_packed[..]);
        let mut bottom_seconds = 0.0;
        let start = Instant::now();
        comm.all_to_all_v_during(
            &self.pooled[..big_b * k * d],
            &send,
            &mut self.exchange[..exchanged],
            &recv,
            &mut || {
                let t = Instant::now();
                bottom_forward(chunks, bottom, bottom_packed, &input, precision, par);
                bottom_seconds += t.elapsed().as_secs_f64();
            },
        );
        let fd = self.model.feature_stride();
        let features = &mut self.model.features;
        for_each_slot(&self.owned, b, d, fd, |at, slot| {
            features[slot..slot + d].copy_from_slice(&self.exchange[at..at + d]);
        });
        for_each_slot(
            std::slice::from_ref(&self.replicated),
            b,
            d,
            fd,
            |at, slot| {
                features[slot..slot + d].copy_from_slice(&self.replica_pooled[at..at + d]);
            },
        );
        self.stats.forward_all_to_all.add_beside(
            start,
            bottom_seconds,
            4 * (send.iter().sum::<usize>() - send[self.rank]),
        );
        let start = Instant::now();
        let slices = slices(self.plan.ranks(), big_b);
        let sent = (self.rows).forward(comm, batch, &slices, features, fd, par);
        if !self.rows.tables().is_empty() {
            self.stats.row_shard_all_to_all.add(start, sent);
        }
        timer.lap(|p| &mut p.emb_fwd);
        (input, n)
    }

    /// One training step on a global batch (every rank passes the same batch; each reads its
    /// slice's dense rows and labels and its tables' ids). Returns the global batch's mean loss.
    pub fn train_step(
        &mut self,
        comm: &dyn Collectives,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) -> Result<f64, BatchError> {
        check_capacity(batch, self.model.train_capacity)?;
        if self.batch_size_error(batch.size()).is_some() {
            return Err(BatchError::Shape(
                "a global batch the ranks cannot split into equal slices of whole chunks",
            ));
        }
        let arch = &self.model.arch;
        validate_batch_rows(batch, arch.num_dense(), arch.num_tables(), |t| {
            arch.table_sizes[t]
        })?;
        timer.lap(|p| &mut p.other);
        let (input, n) = self.forward(comm, batch, true, timer);
        let loss = self.model.chunk_chain(input, n, true, timer);
        // The dense reduction is in flight while the embeddings' gradients are exchanged and
        // applied (the overlap of PyTorch's DDP): the two touch disjoint parameters, so the
        // bits are those of running one after the other.
        self.reduce_dense_during(comm, n, |s| s.sparse_backward(comm, batch, lr, timer));
        let m = &mut self.model;
        let (bottom, top) = (&mut m.bottom.layers, &mut m.top.layers);
        update_dense(&mut m.dense_opt, bottom, top, lr, m.par);
        timer.lap(|p| &mut p.dense_update);
        Ok(comm.all_gather_f64(loss).iter().sum::<f64>() / batch.size() as f64)
    }

    /// The embeddings' backward: each table's output gradients exchanged back to its owner
    /// (gathered on every rank for the replicas and the row shards; booked to `dense_update`
    /// as before the overlap), then every sparse update (`emb_update`).
    fn sparse_backward(
        &mut self,
        comm: &dyn Collectives,
        batch: &BatchView,
        lr: f32,
        timer: &mut PhaseTimer,
    ) {
        let big_b = batch.size();
        let b = self.slice(self.rank, big_b).len();
        self.backward_all_to_all(comm, big_b, b);
        self.gather_replica_grads(comm, big_b, b);
        let (start, fd) = (Instant::now(), self.model.feature_stride());
        let slices = slices(self.plan.ranks(), big_b);
        let grads = &self.model.grad_features;
        let sent = self.rows.gather_grads(comm, &slices, grads, fd);
        if !self.rows.tables().is_empty() {
            self.stats.row_shard_all_gather.add(start, sent);
        }
        timer.lap(|p| &mut p.dense_update);

        let (d, k, r, par) = (
            self.model.arch.embedding_dim,
            self.tables().len(),
            self.replicated.len(),
            self.model.par,
        );
        let (owned, grads) = (&self.owned[self.rank], &self.pooled);
        (self.model.embeddings).update(
            |t| batch.bags(owned[t]),
            |t| (&grads[t * d..], k * d),
            lr,
            0.0,
            par,
        );
        let (replicated, replica_grads) = (&self.replicated, &self.replica_grads);
        self.replicas.update(
            |t| batch.bags(replicated[t]),
            |t| (&replica_grads[t * d..], r * d),
            lr,
            0.0,
            par,
        );
        self.rows.update(lr, par);
        timer.lap(|p| &mut p.emb_update);
    }

    /// Sends each owner its tables' output gradients of this rank's slice; receives this
    /// rank's tables' gradients for the whole batch into `pooled`.
    fn backward_all_to_all(&mut self, comm: &dyn Collectives, big_b: usize, b: usize) {
        let (d, fd) = (self.model.arch.embedding_dim, self.model.feature_stride());
        let grads = &self.model.grad_features;
        let exchange = &mut self.exchange;
        for_each_slot(&self.owned, b, d, fd, |at, slot| {
            exchange[at..at + d].copy_from_slice(&grads[slot..slot + d]);
        });
        let k = self.tables().len();
        let send: Vec<usize> = self.owned.iter().map(|o| b * o.len() * d).collect();
        let recv: Vec<usize> = (0..self.plan.ranks())
            .map(|q| self.slice(q, big_b).len() * k * d)
            .collect();
        let exchanged = b * self.sharded_tables() * d;
        let start = Instant::now();
        comm.all_to_all_v(
            &self.exchange[..exchanged],
            &send,
            &mut self.pooled[..big_b * k * d],
            &recv,
        );
        self.stats
            .backward_all_to_all
            .add(start, 4 * (send.iter().sum::<usize>() - send[self.rank]));
    }

    /// Every rank's pooled gradients of the replicated tables for its slice, gathered in rank
    /// order into `replica_grads`: the whole batch's, in sample order.
    fn gather_replica_grads(&mut self, comm: &dyn Collectives, big_b: usize, b: usize) {
        let r = self.replicated.len();
        if r == 0 {
            return;
        }
        let (d, fd) = (self.model.arch.embedding_dim, self.model.feature_stride());
        let (grads, mine) = (&self.model.grad_features, &mut self.replica_pooled);
        for_each_slot(
            std::slice::from_ref(&self.replicated),
            b,
            d,
            fd,
            |at, slot| {
                mine[at..at + d].copy_from_slice(&grads[slot..slot + d]);
            },
        );
        let counts: Vec<usize> = (0..self.plan.ranks())
            .map(|q| self.slice(q, big_b).len() * r * d)
            .collect();
        let start = Instant::now();
        comm.all_gather_v(
            &self.replica_pooled[..b * r * d],
            &mut self.replica_grads[..big_b * r * d],
            &counts,
        );
        self.stats.replica_all_gather.add(start, b * r * d * 4);
    }

    /// The layers' gradients = the global batch's: this rank's `n` chunks' gradients reduced
    /// with every other rank's, with `work` running while the reduction is in flight.
    fn reduce_dense_during(
        &mut self,
        comm: &dyn Collectives,
        n: usize,
        mut work: impl FnMut(&mut Self),
    ) {
        let (mut flat, mut gathered) = (take(&mut self.flat), take(&mut self.gathered));
        self.flatten_dense_grads(n, &mut flat);
        let (ranks, reduction) = (self.plan.ranks(), self.reduction);
        let mut overlapped = 0.0;
        let start = Instant::now();
        let mut beside = || {
            let t = Instant::now();
            work(self);
            overlapped += t.elapsed().as_secs_f64();
        };
        match reduction {
            DenseReduction::AllReduce => comm.all_reduce_sum_during(&mut flat, &mut beside),
            DenseReduction::Ordered => {
                gathered.resize(ranks * flat.len(), 0.0);
                let counts = vec![flat.len(); ranks];
                comm.all_gather_v_during(&flat, &mut gathered, &counts, &mut beside);
            }
        }
        let sent = flat.len() * 4;
        self.stats
            .dense_all_reduce
            .add_beside(start, overlapped, sent);
        let m = &mut self.model;
        if reduction == DenseReduction::Ordered {
            // Every chunk's gradients added in global chunk order: the single-process sum.
            let per_chunk = flat.len() / n;
            flat.truncate(per_chunk);
            let part = |c: usize| &gathered[c * per_chunk..(c + 1) * per_chunk];
            sum_in_order(&mut flat, part, ranks * n, m.par);
        }
        unflatten_grads(&flat, &mut m.bottom.layers, &mut m.top.layers);
        (self.flat, self.gathered) = (flat, gathered);
    }

    /// This rank's dense gradients, flattened into `flat` (bottom then top; weight then bias)
    /// for the reduction: the sum of its `n` chunks' (all-reduce), or every chunk's in turn
    /// (ordered).
    fn flatten_dense_grads(&mut self, n: usize, flat: &mut Vec<f32>) {
        let m = &mut self.model;
        let (bottom, top, chunks) = (&mut m.bottom.layers, &mut m.top.layers, &mut m.chunks[..n]);
        flat.clear();
        match self.reduction {
            DenseReduction::AllReduce => {
                if let [only] = chunks {
                    swap_grads(bottom, &mut only.bottom_grads);
                    swap_grads(top, &mut only.top_grads);
                } else {
                    reduce_grads(bottom, chunks, |c| &c.bottom_grads, m.par);
                    reduce_grads(top, chunks, |c| &c.top_grads, m.par);
                }
                for layer in bottom.iter().chain(top.iter()) {
                    flat.extend_from_slice(&layer.grad_weight);
                    flat.extend_from_slice(&layer.grad_bias);
                }
            }
            DenseReduction::Ordered => {
                for chunk in chunks.iter() {
                    for g in chunk.bottom_grads.iter().chain(&chunk.top_grads) {
                        flat.extend_from_slice(&g.weight);
                        flat.extend_from_slice(&g.bias);
                    }
                }
            }
        }
    }

    /// Click probabilities for a global batch, on every rank (each computes its slice's and
    /// they are gathered in rank order).
    pub fn predict(
        &mut self,
        comm: &dyn Collectives,
        batch: &BatchView,
        probs: &mut Vec<f32>,
    ) -> Result<(), BatchError> {
        check_capacity(batch, self.model.capacity)?;
        let arch = &self.model.arch;
        validate_batch_rows(batch, arch.num_dense(), arch.num_tables(), |t| {
            arch.table_sizes[t]
        })?;
        let mut timer = PhaseTimer::default();
        let (input, n) = self.forward(comm, batch, false, &mut timer);
        self.model.chunk_chain(input, n, false, &mut timer);
        let b = input.size();
        let mut mine = vec![0.0; b];
        head_predict(Task::Classification, &self.model.logits[..b], &mut mine);
        let counts: Vec<usize> = (0..self.plan.ranks())
            .map(|q| self.slice(q, batch.size()).len())
            .collect();
        probs.resize(batch.size(), 0.0);
        comm.all_gather_v(&mine, probs, &counts);
        Ok(())
    }
}

/// Calls `f(at, slot)` for every pooled vector of a slice of `b` samples: `at` its offset in
/// the exchange buffer (blocks by owner rank; per sample, the owner's tables in order) and
/// `slot` its offset in the feature rows (stride `fd`; table t in slot t + 1).
fn for_each_slot(
    owned: &[Vec<usize>],
    b: usize,
    d: usize,
    fd: usize,
    mut f: impl FnMut(usize, usize),
) {
    let mut at = 0;
    for tables in owned {
        for i in 0..b {
            for &t in tables {
                f(at, i * fd + (t + 1) * d);
                at += d;
            }
        }
    }
}

/// `offsets` (a table's bag offsets for a whole batch; empty when one-hot) of the bags in
/// `rows`, rebased to start at 0 (empty when one-hot).
fn rebase_offsets(offsets: &[u32], rows: Range<usize>, out: &mut Vec<u32>) {
    out.clear();
    if let Some(&first) = offsets.get(rows.start) {
        out.extend(offsets[rows].iter().map(|&o| o - first));
    }
}

/// Table `t`'s bags of the samples `rows` of `batch`, with `offsets` from [`rebase_offsets`].
fn slice_bags<'a>(
    batch: &BatchView<'a>,
    t: usize,
    rows: Range<usize>,
    offsets: &'a [u32],
) -> Bags<'a> {
    let ids = batch.ids(t);
    if batch.is_one_hot(t) {
        return Bags::one_hot(&ids[rows]);
    }
    let all = batch.offsets(t);
    let start = all[rows.start] as usize;
    let end = all.get(rows.end).map_or(ids.len(), |&e| e as usize);
    Bags::with_offsets(&ids[start..end], offsets)
}

/// The layers' gradients from `flat` (bottom then top; weight then bias).
fn unflatten_grads(flat: &[f32], bottom: &mut [Linear], top: &mut [Linear]) {
    let mut at = 0;
    for layer in bottom.iter_mut().chain(top.iter_mut()) {
        for g in [&mut layer.grad_weight, &mut layer.grad_bias] {
            let len = g.len();
            g.copy_from_slice(&flat[at..at + len]);
            at += len;
        }
    }
}

impl Parameters for ShardedDlrm {
    /// This rank's tables (named by their index in the whole model) and the dense parameters.
    fn parameters<'a>(&'a self, visit: &mut dyn FnMut(Named<Tensor<'a>>)) {
        let owned = &self.owned[self.rank];
        let m = &self.model;
        m.embeddings
            .visit(|t| format!("emb_l.{}.weight", owned[t]), visit);
        let replicated = &self.replicated;
        (self.replicas).visit(|t| format!("emb_l.{}.weight", replicated[t]), visit);
        self.rows.visit(visit);
        let mut states = m.dense_opt.states();
        visit_mlp("bot_l", &m.bottom, &mut states, visit);
        visit_mlp("top_l", &m.top, &mut states, visit);
    }

    fn parameters_mut<'a>(&'a mut self, visit: &mut dyn FnMut(Named<TensorMut<'a>>)) {
        let owned = &self.owned[self.rank];
        let m = &mut self.model;
        m.embeddings
            .visit_mut(|t| format!("emb_l.{}.weight", owned[t]), visit);
        let replicated = &self.replicated;
        (self.replicas).visit_mut(|t| format!("emb_l.{}.weight", replicated[t]), visit);
        self.rows.visit_mut(visit);
        let mut states = m.dense_opt.states_mut();
        visit_mlp_mut("bot_l", &mut m.bottom, &mut states, visit);
        visit_mlp_mut("top_l", &mut m.top, &mut states, visit);
    }
}
