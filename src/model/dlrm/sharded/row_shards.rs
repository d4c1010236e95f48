//! Row-wise shards (Naumov et al. 2019, section "Parallelism"; [`Placement::Rows`]): a table
//! too large for one rank is split into contiguous row ranges, one per rank, each range
//! looked up and updated by its rank for the whole global batch.
//!
//! Forward, the ranges must be pooled into each sample's one vector. Adding partial pooled
//! sums (a reduce-scatter) changes the order of the additions: one process pools a bag's rows
//! in id order (`pool_block`: the first row, then one FMA per row), and a bag whose ids fall
//! in several ranges, interleaved, cannot be rebuilt from per-range partial sums. So each range
//! owner instead sends the rows themselves: for every id of slice q's bags in its range, in
//! batch order, its row, to rank q (one all-to-all); rank q then pools its bags from the rows
//! received in their original order, with the same kernel one process uses, and gets the same
//! bits, for any bag length, with or without `--deterministic`. The bytes are those of the
//! lookups: with p ids per bag spread evenly, a rank sends about p·B·d·(N − 1)/N² floats a
//! table and step, against B·d·(N − 1)/N for a reduce-scatter of partial sums: fewer while
//! p < N, which holds for Criteo's one-hot features.
//!
//! Backward, every range owner needs the pooled gradient of every sample: the slices'
//! gradients are gathered in rank order (the global batch's, in sample order) and each owner
//! applies the fused sparse update to its rows with the ids in its range. The update sorts a
//! table's lookups by row stably, so a row's gradients are added in batch order, as one
//! process adds them: the updated rows are bit-identical.

use super::{for_each_slot, slice_of};
use crate::data::BatchView;
use crate::distributed::{Collectives, Placement, ShardPlan, displacements};
use crate::model::OptimizerKind;
use crate::model::parameters::{Named, TableSource, Tensor, TensorMut};
use crate::model::sparse::SparseTables;
use dlrm_kernels::embedding::{Bags, Pooling, embedding_bag_forward_tables};
use dlrm_kernels::gemm::{MatMut, MatRef};
use dlrm_kernels::parallel::Par;
use std::ops::Range;

/// One table's ids of the whole batch that fall in this rank's range, rebased to it.
#[derive(Default)]
struct LocalBags {
    /// In batch order.
    ids: Vec<u32>,
    /// Per sample of the batch: where its ids start in `ids`.
    offsets: Vec<u32>,
}

impl LocalBags {
    /// The positions in `ids` of the samples `rows`.
    fn of(&self, rows: Range<usize>) -> Range<usize> {
        let end = self
            .offsets
            .get(rows.end)
            .map_or(self.ids.len(), |&e| e as usize);
        self.offsets.get(rows.start).map_or(end, |&s| s as usize)..end
    }
}

/// This rank's ranges of the tables split row-wise, and the buffers of their exchanges.
pub(super) struct RowShards {
    /// The tables split row-wise, in table order.
    tables: Vec<usize>,
    /// Per split table: rank r owns rows `bounds[r] .. bounds[r + 1]`.
    bounds: Vec<Vec<usize>>,
    rank: usize,
    /// This rank's non-empty ranges (row i = the table's row `bounds[rank] + i`): shard k is
    /// of split table `held[k]`.
    shards: SparseTables,
    held: Vec<usize>,
    /// Per split table: the batch's ids in this rank's range.
    local: Vec<LocalBags>,
    /// Per split table: this rank's slice's ids as rows of `received`, and its bags' offsets.
    positions: Vec<Vec<u32>>,
    slice_offsets: Vec<Vec<u32>>,
    /// The rows sent (blocks by destination rank; in each, by table, in batch order).
    sent: Vec<f32>,
    /// The rows received (blocks by source rank, laid out as sent).
    received: Vec<f32>,
    /// Slice x split tables x d: the pooled vectors, then their gradients.
    pooled: Vec<f32>,
    /// Global batch x split tables x d: every slice's gradients, in sample order.
    grads: Vec<f32>,
    dim: usize,
}

impl RowShards {
    /// Rank `rank`'s ranges of the tables `plan` splits row-wise (of `table_rows` x `dim`),
    /// from `source` (new, or read from a checkpoint's whole tables).
    pub(super) fn new(
        plan: &ShardPlan,
        rank: usize,
        table_rows: &[usize],
        dim: usize,
        optimizer: OptimizerKind,
        source: TableSource,
        seed: u64,
    ) -> anyhow::Result<RowShards> {
        let tables = plan.row_split();
        let bounds: Vec<Vec<usize>> = (tables.iter())
            .map(|&t| match &plan.placement[t] {
                Placement::Rows(bounds) => bounds.clone(),
                _ => unreachable!("row_split lists the tables split row-wise"),
            })
            .collect();
        // A table of fewer rows than ranks leaves some ranks an empty range: no shard there.
        let held: Vec<usize> = (0..tables.len())
            .filter(|&j| bounds[j][rank] < bounds[j][rank + 1])
            .collect();
        let ranges: Vec<(usize, Range<usize>)> = (held.iter())
            .map(|&j| (tables[j], bounds[j][rank]..bounds[j][rank + 1]))
            .collect();
        let shards =
            SparseTables::create_row_shards(&ranges, table_rows, dim, optimizer, source, seed)?;
        let s = tables.len();
        Ok(RowShards {
            tables,
            bounds,
            rank,
            shards,
            held,
            local: (0..s).map(|_| LocalBags::default()).collect(),
            positions: vec![Vec::new(); s],
            slice_offsets: vec![Vec::new(); s],
            sent: Vec::new(),
            received: Vec::new(),
            pooled: Vec::new(),
            grads: Vec::new(),
            dim,
        })
    }

    /// The tables split row-wise, in table order.
    pub(super) fn tables(&self) -> &[usize] {
        &self.tables
    }

    /// Sizes the buffers for global batches of up to `batch` samples on `ranks` ranks (never
    /// shrinking them: training and inference reserve for their own batch sizes).
    pub(super) fn reserve(&mut self, batch: usize, ranks: usize) {
        let sd = self.tables.len() * self.dim;
        let (pooled, grads) = (batch.div_ceil(ranks) * sd, batch * sd);
        if self.pooled.len() < pooled {
            self.pooled.resize(pooled, 0.0);
        }
        if self.grads.len() < grads {
            self.grads.resize(grads, 0.0);
        }
    }

    /// The lookups of this rank's ranges for the whole `batch`, sent to the ranks owning each
    /// slice, and this rank's slice (`slices[rank]`) pooled from the rows received into the
    /// feature rows `features` (stride `fd`; table t in slot t + 1). Returns the bytes sent.
    pub(super) fn forward(
        &mut self,
        comm: &dyn Collectives,
        batch: &BatchView,
        slices: &[Range<usize>],
        features: &mut [f32],
        fd: usize,
        par: Par,
    ) -> usize {
        if self.tables.is_empty() {
            return 0;
        }
        let (d, mine) = (self.dim, slices[self.rank].clone());
        self.select(batch);
        let send = self.gather_sent(slices);
        let recv = self.place_received(batch, mine.clone());
        self.received.resize(recv.iter().sum(), 0.0);
        comm.all_to_all_v(&self.sent, &send, &mut self.received, &recv);
        let (s, b) = (self.tables.len(), mine.len());
        let table = MatRef::from_rows(&self.received, d);
        let (positions, offsets) = (&self.positions, &self.slice_offsets);
        embedding_bag_forward_tables(
            s,
            |j| (table, Bags::with_offsets(&positions[j], &offsets[j])),
            Pooling::Sum,
            MatMut::new(&mut self.pooled[..b * s * d], b, s * d),
            par,
        );
        let pooled = &self.pooled;
        for_each_slot(std::slice::from_ref(&self.tables), b, d, fd, |at, slot| {
            features[slot..slot + d].copy_from_slice(&pooled[at..at + d]);
        });
        4 * (send.iter().sum::<usize>() - send[self.rank])
    }

    /// Each split table's ids of `batch` in this rank's range, rebased to it, in batch order.
    fn select(&mut self, batch: &BatchView) {
        for ((local, &t), bounds) in self.local.iter_mut().zip(&self.tables).zip(&self.bounds) {
            let (lo, hi) = (bounds[self.rank] as u32, bounds[self.rank + 1] as u32);
            let (bags, ids) = (batch.bags(t), batch.ids(t));
            local.ids.clear();
            local.offsets.clear();
            for i in 0..bags.len() {
                local.offsets.push(local.ids.len() as u32);
                let mine = ids[bags.bag(i)].iter().filter(|&&id| lo <= id && id < hi);
                local.ids.extend(mine.map(|&id| id - lo));
            }
        }
    }

    /// Fills `sent` with this rank's rows for every slice (blocks by destination rank; in
    /// each, by table, the slice's ids in batch order). Returns the count per destination.
    fn gather_sent(&mut self, slices: &[Range<usize>]) -> Vec<usize> {
        let d = self.dim;
        self.sent.clear();
        let mut counts = Vec::with_capacity(slices.len());
        for rows in slices {
            let start = self.sent.len();
            for (k, &j) in self.held.iter().enumerate() {
                let (local, weights) = (&self.local[j], self.shards.weights(k));
                for &id in &local.ids[local.of(rows.clone())] {
                    let id = id as usize;
                    self.sent.extend_from_slice(&weights[id * d..(id + 1) * d]);
                }
            }
            counts.push(self.sent.len() - start);
        }
        counts
    }

    /// For this rank's slice `mine` of `batch`: each split table's ids as rows of `received`
    /// (laid out as [`gather_sent`](Self::gather_sent) sends them) in `positions`, and its
    /// bags' offsets. Returns the count received from each rank.
    fn place_received(&mut self, batch: &BatchView, mine: Range<usize>) -> Vec<usize> {
        let (ranks, s) = (
            self.bounds.first().map_or(1, |b| b.len() - 1),
            self.tables.len(),
        );
        // count[o][j]: the slice's ids of table j in rank o's range.
        let mut count = vec![vec![0u32; s]; ranks];
        let owner = |j: usize, id: u32| self.bounds[j].partition_point(|&b| b <= id as usize) - 1;
        for (j, &t) in self.tables.iter().enumerate() {
            let (bags, ids) = (batch.bags(t), batch.ids(t));
            for i in mine.clone() {
                for &id in &ids[bags.bag(i)] {
                    count[owner(j, id)][j] += 1;
                }
            }
        }
        let recv: Vec<usize> = (count.iter())
            .map(|c| c.iter().sum::<u32>() as usize * self.dim)
            .collect();
        let mut next: Vec<Vec<u32>> = (displacements(&recv).iter().zip(&count))
            .map(|(&at, c)| {
                let starts = c.iter().scan(at / self.dim, |row, &n| {
                    let first = *row as u32;
                    *row += n as usize;
                    Some(first)
                });
                starts.collect()
            })
            .collect();
        for (j, &t) in self.tables.iter().enumerate() {
            let bags = batch.bags(t);
            let (positions, offsets) = (&mut self.positions[j], &mut self.slice_offsets[j]);
            positions.clear();
            offsets.clear();
            for i in mine.clone() {
                offsets.push(positions.len() as u32);
                for &id in &batch.ids(t)[bags.bag(i)] {
                    let o = owner(j, id);
                    positions.push(next[o][j]);
                    next[o][j] += 1;
                }
            }
        }
        recv
    }

    /// Gathers every slice's gradients of the split tables (this rank's from `grad_features`,
    /// stride `fd`) in rank order into `grads`. Returns the bytes sent.
    pub(super) fn gather_grads(
        &mut self,
        comm: &dyn Collectives,
        slices: &[Range<usize>],
        grad_features: &[f32],
        fd: usize,
    ) -> usize {
        let (s, d) = (self.tables.len(), self.dim);
        if s == 0 {
            return 0;
        }
        let (b, big_b) = (slices[self.rank].len(), slices.last().map_or(0, |r| r.end));
        let mine = &mut self.pooled;
        for_each_slot(std::slice::from_ref(&self.tables), b, d, fd, |at, slot| {
            mine[at..at + d].copy_from_slice(&grad_features[slot..slot + d]);
        });
        let counts: Vec<usize> = slices.iter().map(|r| r.len() * s * d).collect();
        comm.all_gather_v(
            &self.pooled[..b * s * d],
            &mut self.grads[..big_b * s * d],
            &counts,
        );
        b * s * d * 4
    }

    /// The fused sparse update of this rank's ranges with the batch's gradients gathered by
    /// [`gather_grads`](Self::gather_grads).
    pub(super) fn update(&mut self, lr: f32, par: Par) {
        let (sd, d) = (self.tables.len() * self.dim, self.dim);
        let (local, grads, held) = (&self.local, &self.grads, &self.held);
        self.shards.update(
            |k| Bags::with_offsets(&local[held[k]].ids, &local[held[k]].offsets),
            |k| (&grads[held[k] * d..], sd),
            lr,
            0.0,
            par,
        );
    }

    /// Visits this rank's range of each split table as `emb_l.{t}.weight` (its rows
    /// `ShardPlan::rows_of(t, rank)` of the whole table; none for an empty range).
    pub(super) fn visit<'a>(&'a self, visit: &mut dyn FnMut(Named<Tensor<'a>>)) {
        let (tables, held) = (&self.tables, &self.held);
        (self.shards).visit(|k| format!("emb_l.{}.weight", tables[held[k]]), visit);
    }

    /// [`visit`](Self::visit), writable.
    pub(super) fn visit_mut<'a>(&'a mut self, visit: &mut dyn FnMut(Named<TensorMut<'a>>)) {
        let (tables, held) = (&self.tables, &self.held);
        (self.shards).visit_mut(|k| format!("emb_l.{}.weight", tables[held[k]]), visit);
    }
}

/// The slices of a global batch of `b` on `n` ranks, in rank order.
pub(super) fn slices(n: usize, b: usize) -> Vec<Range<usize>> {
    (0..n).map(|q| slice_of(q, n, b)).collect()
}
