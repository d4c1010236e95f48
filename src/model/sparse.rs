//! A set of embedding tables trained by the fused sparse optimizer: each table with its
//! optimizer state and its backward workspace, updated in parallel, one table per task.

use super::OptimizerKind;
use super::embedding::{EmbeddingTable, OptimizerState, TableLayout};
use super::parameters::{Named, TableSource, Tensor, TensorMut, named_table, named_table_mut};
use crate::data::BatchView;
use dlrm_kernels::bf16::Isa;
use dlrm_kernels::embedding::bf16::{
    SplitTable, SplitTableMut, embedding_bag_backward_update_split, embedding_bag_forward_split,
};
use dlrm_kernels::embedding::{Bags, Pooling, SparseGradWorkspace, embedding_bag_forward_tables};
use dlrm_kernels::gemm::{MatMut, MatRef};
use dlrm_kernels::optim::{SparseStep, TableMut, embedding_bag_backward_update};
use dlrm_kernels::parallel::Par;
use rayon::prelude::*;
use std::ops::Range;

/// Embedding tables (rows x dim each), their sparse optimizer state and workspaces.
pub struct SparseTables {
    pub tables: Vec<EmbeddingTable>,
    /// Per table: the optimizer state (empty for SGD).
    pub states: Vec<OptimizerState>,
    workspaces: Vec<SparseGradWorkspace>,
    optimizer: OptimizerKind,
}

impl SparseTables {
    /// Tables of `rows[t]` x `dim`, numbered `first_index + t` (the key of their initial
    /// values and the name of their files), with the state `optimizer` needs, from `source`.
    pub fn create(
        first_index: usize,
        rows: &[usize],
        dim: usize,
        optimizer: OptimizerKind,
        source: TableSource,
        seed: u64,
    ) -> anyhow::Result<SparseTables> {
        Self::from_runs([(first_index, rows)], dim, optimizer, source, seed)
    }

    /// The tables numbered `indices` (of `rows[index]` x `dim` each), in that order: a rank's
    /// share of a model's tables, each keyed and named by its index in the whole model.
    pub fn create_at(
        indices: &[usize],
        rows: &[usize],
        dim: usize,
        optimizer: OptimizerKind,
        source: TableSource,
        seed: u64,
    ) -> anyhow::Result<SparseTables> {
        let runs = indices
            .iter()
            .map(|&index| (index, std::slice::from_ref(&rows[index])));
        Self::from_runs(runs, dim, optimizer, source, seed)
    }

    /// The tables of `runs`, in order: each run `(first_index, rows)` is the tables numbered
    /// `first_index + t` of `rows[t]` x `dim`, taken from `source` in one call (which checks
    /// the room for the whole run and removes its files if one fails).
    fn from_runs<'r>(
        runs: impl IntoIterator<Item = (usize, &'r [usize])>,
        dim: usize,
        optimizer: OptimizerKind,
        source: TableSource,
        seed: u64,
    ) -> anyhow::Result<SparseTables> {
        let width = optimizer.sparse(0.0).state_width(dim);
        let (mut tables, mut states) = (Vec::new(), Vec::new());
        for (first_index, rows) in runs {
            let (run_tables, run_states) = source.tables(first_index, rows, dim, width, seed)?;
            tables.extend(run_tables);
            states.extend(run_states);
        }
        Ok(SparseTables::from_parts(tables, states, optimizer))
    }

    /// Row-wise shards: `shards[i] = (index, rows)` holds rows `rows` of table `index` (of
    /// `table_rows[index]` x `dim`), from `source` ([`TableSource::row_shard`]: new, initialised
    /// as the whole table's rows are, or those rows of a checkpoint's table), with the state
    /// `optimizer` needs. Shard row i is the table's row `rows.start + i`, so the shard takes
    /// ids rebased by `rows.start`.
    pub fn create_row_shards(
        shards: &[(usize, Range<usize>)],
        table_rows: &[usize],
        dim: usize,
        optimizer: OptimizerKind,
        source: TableSource,
        seed: u64,
    ) -> anyhow::Result<SparseTables> {
        let width = optimizer.sparse(0.0).state_width(dim);
        let (mut tables, mut states) = (Vec::new(), Vec::new());
        for (index, rows) in shards {
            let total = table_rows[*index];
            let (table, state) = source.row_shard(*index, total, rows.clone(), dim, width, seed)?;
            tables.push(table);
            states.push(state);
        }
        Ok(SparseTables::from_parts(tables, states, optimizer))
    }

    /// The set of `tables` with their `states` and a workspace each.
    fn from_parts(
        tables: Vec<EmbeddingTable>,
        states: Vec<OptimizerState>,
        optimizer: OptimizerKind,
    ) -> SparseTables {
        SparseTables {
            workspaces: (0..tables.len())
                .map(|_| SparseGradWorkspace::default())
                .collect(),
            tables,
            states,
            optimizer,
        }
    }

    /// Number of tables.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// Whether there are no tables.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Visits table t with its state as `name(t)`.
    pub fn visit<'a>(
        &'a self,
        name: impl Fn(usize) -> String,
        visit: &mut dyn FnMut(Named<Tensor<'a>>),
    ) {
        for (t, (table, state)) in self.tables.iter().zip(&self.states).enumerate() {
            visit(named_table(name(t), table, state));
        }
    }

    /// [`visit`](Self::visit), writable.
    pub fn visit_mut<'a>(
        &'a mut self,
        name: impl Fn(usize) -> String,
        visit: &mut dyn FnMut(Named<TensorMut<'a>>),
    ) {
        let tables = self.tables.iter_mut().zip(&mut self.states);
        for (t, (table, state)) in tables.enumerate() {
            visit(named_table_mut(name(t), table, state));
        }
    }

    /// Table t's weights (f32 tables).
    pub fn weights(&self, t: usize) -> &[f32] {
        self.tables[t].weights()
    }

    /// The layout of the tables (all share it, see [`set_layout`](Self::set_layout); f32 when
    /// there are none).
    pub fn layout(&self) -> TableLayout {
        self.tables
            .first()
            .map_or(TableLayout::Fp32, EmbeddingTable::layout)
    }

    /// Stores every table in `layout`, one table at a time, values unchanged. Split-BF16
    /// tables live in anonymous memory: tables in files are refused.
    pub fn set_layout(&mut self, layout: TableLayout) -> anyhow::Result<()> {
        if layout == TableLayout::SplitBf16
            && let Some(path) = self.tables.iter().find_map(|t| t.file_path())
        {
            anyhow::bail!(
                "split-BF16 embedding tables (precision bf16) live in anonymous memory, but table file {} is memory-mapped: train in bf16 with anonymous table storage, or in fp32",
                path.display()
            );
        }
        // One table at a time (each is briefly held twice); on a failure the tables already
        // converted go back, so that all tables keep one layout.
        let old = self.layout();
        for t in 0..self.tables.len() {
            if self.tables[t].layout() == layout {
                continue;
            }
            match self.tables[t].with_layout(layout) {
                Ok(table) => self.tables[t] = table,
                Err(e) => {
                    for table in &mut self.tables[..t] {
                        *table = table.with_layout(old)?;
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// The forward of every table for `batch`: the rows it looks up in lazily initialised
    /// tables get their initial values, then each sample's pooled (summed) vector of table t
    /// is written to columns t·dim .. (t + 1)·dim of its row of `out`.
    pub fn forward(&mut self, batch: &BatchView, out: MatMut, par: Par) {
        self.forward_bags(|t| batch.bags(t), out, par);
    }

    /// [`forward`](Self::forward) with table t's bags `bags(t)`.
    pub fn forward_bags<'a>(
        &mut self,
        bags: impl Fn(usize) -> Bags<'a> + Sync,
        out: MatMut,
        par: Par,
    ) {
        self.materialize(|t| bags(t).indices());
        let tables = &self.tables;
        if self.layout() == TableLayout::SplitBf16 {
            let lookup = |t: usize| {
                let (hi, _) = tables[t].split_halves();
                (SplitTable::new(hi, tables[t].dim()), bags(t))
            };
            let isa = Isa::selected();
            embedding_bag_forward_split(tables.len(), lookup, Pooling::Sum, out, isa, par);
            return;
        }
        embedding_bag_forward_tables(
            tables.len(),
            |t| {
                let table = &tables[t];
                let weights = MatRef::from_rows(table.weights(), table.dim());
                (weights, bags(t))
            },
            Pooling::Sum,
            out,
            par,
        );
    }

    /// Gives the rows `ids(t)` of every lazily initialised table their initial values, tables
    /// in parallel (ids must be in range).
    pub fn materialize<'a>(&mut self, ids: impl Fn(usize) -> &'a [u32] + Sync) {
        self.tables
            .par_iter_mut()
            .enumerate()
            .for_each(|(t, table)| table.materialize(ids(t)));
    }

    /// [`update`](Self::update) for the bags of `batch`: table t's output gradient is the rows
    /// `grads(t)` = (slice, stride), one per sample.
    pub fn update_batch<'a>(
        &mut self,
        batch: &'a BatchView,
        grads: impl Fn(usize) -> (&'a [f32], usize) + Sync,
        lr: f32,
        weight_decay: f32,
        par: Par,
    ) {
        self.update(|t| batch.bags(t), grads, lr, weight_decay, par);
    }

    /// Backward and fused update of every table, tables in parallel: table t's bags are
    /// `bags(t)` (sum pooling) and its output gradient the rows `grads(t)` = (slice, stride),
    /// one per bag; `weight_decay` regularises the looked-up rows (0: none).
    pub fn update<'a>(
        &mut self,
        bags: impl Fn(usize) -> Bags<'a> + Sync,
        grads: impl Fn(usize) -> (&'a [f32], usize) + Sync,
        lr: f32,
        weight_decay: f32,
        par: Par,
    ) {
        let opt = self.optimizer.sparse(lr);
        self.tables
            .par_iter_mut()
            .zip(self.states.par_iter_mut())
            .zip(self.workspaces.par_iter_mut())
            .enumerate()
            .for_each(|(t, ((table, state), ws))| {
                let dim = table.dim();
                let (g, stride) = grads(t);
                let grad_out = MatRef::with_row_stride(g, bags(t).len(), dim, stride);
                let step = SparseStep { opt, weight_decay };
                let state = state.as_mut_slice();
                match table.layout() {
                    TableLayout::Fp32 => embedding_bag_backward_update(
                        TableMut {
                            weights: MatMut::from_rows(table.weights_mut(), dim),
                            state,
                        },
                        bags(t),
                        Pooling::Sum,
                        grad_out,
                        step,
                        ws,
                        par,
                    ),
                    TableLayout::SplitBf16 => {
                        let (hi, lo) = table.split_halves_mut();
                        let split = SplitTableMut { hi, lo, dim, state };
                        let isa = Isa::selected();
                        embedding_bag_backward_update_split(
                            split,
                            bags(t),
                            Pooling::Sum,
                            grad_out,
                            step,
                            ws,
                            isa,
                            par,
                        );
                    }
                }
            });
    }
}
