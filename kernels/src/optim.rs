//! Optimizer updates: fused sparse SGD / Adagrad / row-wise Adagrad for embedding tables, and
//! the dense versions for MLP parameters.
//!
//! Update rules (as PyTorch's `torch.optim.SGD` / `Adagrad` with lr_decay = 0,
//! initial_accumulator_value = 0, and FBGEMM's row-wise Adagrad; Duchi, Hazan & Singer,
//! "Adaptive Subgradient Methods", JMLR 2011):
//! - SGD: `p -= lr * g`;
//! - Adagrad: `s += g * g; p -= lr * g / (sqrt(s) + eps)`, one accumulator per parameter;
//! - row-wise Adagrad: `a[r] += mean_k g[r, k]^2; p[r] -= lr * g[r] / (sqrt(a[r]) + eps)`, one
//!   accumulator per embedding row (dim times less state, the DLRM default at scale).
//!
//! The sparse update never builds a dense gradient: the batch's positions are grouped by row
//! ([`crate::embedding`]), each distinct row's gradient is summed in a small per-thread buffer
//! and applied at once, straight into the table, so a row looked up twice is updated once with
//! its summed gradient (PyTorch's coalesced sparse gradient). Distinct rows are sorted, so a
//! contiguous run of them covers a contiguous, disjoint slice of the table: each task owns its
//! slice (no locks or atomics), and every row's update is the same sequence of operations
//! whatever the thread count.

use crate::embedding::{Bags, Pooling, RowGrads, SparseGradWorkspace, with_width};
use crate::isa::Isa;
use crate::mat::{MatMut, MatRef, table_rows};
use crate::parallel::{Par, join_ranges, should_split};
use crate::scratch::{EMB_ROW, with_scratch};
use crate::simd::{SimdVec, dispatch, prefetch_lines, prefetch_write};
use core::ops::Range;
use rayon::prelude::*;

/// Optimizer of an embedding table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SparseOptimizer {
    Sgd { lr: f32 },
    Adagrad { lr: f32, eps: f32 },
    RowwiseAdagrad { lr: f32, eps: f32 },
}

impl SparseOptimizer {
    /// Optimizer state per table row: 0 (SGD), dim (Adagrad) or 1 (row-wise Adagrad).
    pub fn state_width(&self, dim: usize) -> usize {
        match self {
            SparseOptimizer::Sgd { .. } => 0,
            SparseOptimizer::Adagrad { .. } => dim,
            SparseOptimizer::RowwiseAdagrad { .. } => 1,
        }
    }

    /// Applies the update of one row `p` with gradient `g` and its state `s`
    /// (state_width(p.len()) floats).
    #[inline(always)]
    fn apply<V: SimdVec>(&self, p: &mut [f32], s: &mut [f32], g: &[f32]) {
        match *self {
            SparseOptimizer::Sgd { lr } => sgd_lanes::<V>(p, g, lr),
            SparseOptimizer::Adagrad { lr, eps } => adagrad_lanes::<V>(p, g, s, lr, eps),
            SparseOptimizer::RowwiseAdagrad { lr, eps } => {
                let mut sq = V::splat(0.0);
                for_each_lane_block::<V>(
                    g.len(),
                    #[inline(always)]
                    |r| {
                        let gv = load_at::<V>(g, r);
                        sq = gv.mul_add(gv, sq);
                    },
                );
                s[0] += sq.reduce_add() / g.len() as f32;
                sgd_lanes::<V>(p, g, lr / (s[0].sqrt() + eps));
            }
        }
    }
}

/// Calls `f` on consecutive ranges of at most LANES elements covering 0..len.
#[inline(always)]
fn for_each_lane_block<V: SimdVec>(len: usize, mut f: impl FnMut(Range<usize>)) {
    let mut i = 0;
    while i < len {
        let end = (i + V::LANES).min(len);
        f(i..end);
        i = end;
    }
}

/// The elements `r` (at most LANES) of `x`, zero-filled.
#[inline(always)]
fn load_at<V: SimdVec>(x: &[f32], r: Range<usize>) -> V {
    V::from_slice(&x[r])
}

/// Stores the first r.len() lanes of `v` to the elements `r` (at most LANES) of `x`.
#[inline(always)]
fn store_at<V: SimdVec>(x: &mut [f32], r: Range<usize>, v: V) {
    v.store_to(&mut x[r]);
}

/// p -= lr * g, as one FMA per element.
#[inline(always)]
fn sgd_lanes<V: SimdVec>(p: &mut [f32], g: &[f32], lr: f32) {
    assert_eq!(p.len(), g.len());
    let neg_lr = V::splat(-lr);
    for_each_lane_block::<V>(
        p.len(),
        #[inline(always)]
        |r| {
            let v = load_at::<V>(g, r.clone()).mul_add(neg_lr, load_at(p, r.clone()));
            store_at(p, r, v);
        },
    );
}

/// s += g * g; p -= lr * g / (sqrt(s) + eps).
#[inline(always)]
fn adagrad_lanes<V: SimdVec>(p: &mut [f32], g: &[f32], s: &mut [f32], lr: f32, eps: f32) {
    assert!(p.len() == g.len() && s.len() == g.len());
    let (neg_lr, eps) = (V::splat(-lr), V::splat(eps));
    for_each_lane_block::<V>(
        p.len(),
        #[inline(always)]
        |r| {
            let gv = load_at::<V>(g, r.clone());
            let sv = gv.mul_add(gv, load_at(s, r.clone()));
            let pv = (gv / (sv.sqrt() + eps)).mul_add(neg_lr, load_at(p, r.clone()));
            store_at(s, r.clone(), sv);
            store_at(p, r, pv);
        },
    );
}

/// Distinct rows between the row being updated and the row whose table (and state) lines are
/// requested for writing. Longer than the forward's [`crate::embedding::PREFETCH_DISTANCE`]:
/// a row costs more work between two requests (grouping, summing, the update), so a request
/// must be issued more rows ahead to cover the same miss latency. Measured on anonymous
/// huge-page tables of 10M rows, batches of 2048 bags of uniform ids, one thread, on a shared
/// 2-core AVX-512 Xeon VM: best of 3 medians of 300 (bag 32) or 1500 (bag 1) batches, ms per
/// batch:
///
/// | distance | SGD, dim 16, bag 32 | SGD, dim 64, bag 1 | Adagrad, dim 128, bag 1 |
/// |----------|---------------------|--------------------|-------------------------|
/// | 4        | 2.59                | 0.161              | 0.481                   |
/// | 6        | 2.29                | 0.139              | 0.491                   |
/// | 8        | 2.16                | 0.179              | 0.493                   |
/// | 12       | 2.58                | 0.174              | 0.651                   |
/// | 16       | 2.07                | 0.147              | 0.494                   |
/// | 24       | 2.00                | 0.202              | 0.532                   |
/// | 32       | 2.01                | 0.170              | 0.521                   |
///
/// Long batches (bag 32) gain 20% from 4 to 16 and nothing beyond; short ones (bag 1, 2048
/// rows) are within the machine's noise at every distance. 16 is the shortest distance on the
/// plateau.
pub const UPDATE_PREFETCH_DISTANCE: usize = 16;

/// An embedding table (rows x dim, contiguous) with its optimizer state (rows x dim for
/// Adagrad, rows for row-wise Adagrad, empty for SGD), updated in place.
#[derive(Debug)]
pub struct TableMut<'a> {
    pub weights: MatMut<'a>,
    pub state: &'a mut [f32],
}

/// One sparse optimizer step: the optimizer, and the L2 regularisation of the looked-up rows
/// (PyTorch's `weight_decay`, applied lazily: a row the batch does not look up is neither
/// updated nor decayed, as in the regularised SGD of latent factor models, Koren, Bell &
/// Volinsky, "Matrix Factorization Techniques for Recommender Systems", 2009). With
/// `weight_decay` = 0 the update is bit for bit the unregularised one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseStep {
    pub opt: SparseOptimizer,
    pub weight_decay: f32,
}

impl From<SparseOptimizer> for SparseStep {
    /// The optimizer's step without regularisation.
    fn from(opt: SparseOptimizer) -> SparseStep {
        SparseStep {
            opt,
            weight_decay: 0.0,
        }
    }
}

/// Backward of the bag + fused optimizer update, straight into the table and its state, from
/// the gradient of the pooled output (`grad_out`: one row of the table's width per bag). Never
/// builds a dense gradient; each distinct row is updated once per call with the sum of its
/// gradients (plus `step.weight_decay` times the row). Runs on [`Isa::selected`].
pub fn embedding_bag_backward_update(
    table: TableMut,
    bags: Bags,
    pooling: Pooling,
    grad_out: MatRef,
    step: SparseStep,
    ws: &mut SparseGradWorkspace,
    par: Par,
) {
    let isa = Isa::selected();
    embedding_bag_backward_update_with_isa(isa, table, bags, pooling, grad_out, step, ws, par)
}

/// [`embedding_bag_backward_update`] on `isa` (panics if the CPU lacks it).
#[allow(clippy::too_many_arguments)]
pub fn embedding_bag_backward_update_with_isa(
    isa: Isa,
    table: TableMut,
    bags: Bags,
    pooling: Pooling,
    grad_out: MatRef,
    step: SparseStep,
    ws: &mut SparseGradWorkspace,
    par: Par,
) {
    const WHO: &str = "embedding_bag_backward_update";
    let opt = step.opt;
    let dim = table.weights.cols();
    let TableMut { weights, state } = table;
    assert!(
        weights.row_stride() == dim || weights.rows() <= 1,
        "{WHO}: table rows are not contiguous"
    );
    let table = weights.into_slice();
    let rows = table_rows(table, dim, WHO);
    let sw = opt.state_width(dim);
    assert_eq!(
        state.len(),
        rows * sw,
        "{WHO}: state has {} floats, {opt:?} needs {sw} per row for {rows} rows",
        state.len()
    );
    let (rg, _) = RowGrads::prepare(rows, bags, pooling, grad_out, ws, WHO);
    let Some(&first) = rg.rows.first() else {
        return;
    };
    let first = first as usize;
    let part = Fp32Rows {
        table: &mut table[first * dim..],
        state: &mut state[first * sw..],
        dim,
        sw,
    };
    update_coalesced_rows(isa, &rg, part, step, par);
}

/// The rows of a table (and their optimizer state) from some first row on, as the fused
/// update sees them: it cuts them between tasks, requests a row ahead, and updates a row
/// through its f32 values. Plain f32 tables ([`Fp32Rows`]) and split-BF16 tables
/// ([`crate::embedding::bf16`]) implement it, so both run the same update, bit for bit.
pub(crate) trait UpdateRows: Send + Sized {
    /// The first `rows` rows, and the rest.
    fn split_rows(self, rows: usize) -> (Self, Self);
    /// Requests the lines of row `r` (and of its state) for writing.
    fn prefetch_row(&self, r: usize);
    /// Runs `update(p, s)` on row `r`'s `width` f32 values and its state, and keeps what it
    /// leaves in `p`; `scratch` (`width` floats) may hold the values meanwhile. Always
    /// inlined, so that a literal `width` unrolls the row's loops.
    fn update_row(
        &mut self,
        r: usize,
        width: usize,
        scratch: &mut [f32],
        update: impl FnOnce(&mut [f32], &mut [f32]),
    );
}

/// A plain f32 table's rows (rows x dim) with their state (rows x sw), from the same first row.
struct Fp32Rows<'a> {
    table: &'a mut [f32],
    state: &'a mut [f32],
    dim: usize,
    sw: usize,
}

impl UpdateRows for Fp32Rows<'_> {
    fn split_rows(self, rows: usize) -> (Self, Self) {
        let Fp32Rows {
            table,
            state,
            dim,
            sw,
        } = self;
        let (t0, t1) = table.split_at_mut(rows * dim);
        let (s0, s1) = state.split_at_mut(rows * sw);
        let part = |table, state| Fp32Rows {
            table,
            state,
            dim,
            sw,
        };
        (part(t0, s0), part(t1, s1))
    }

    #[inline(always)]
    fn prefetch_row(&self, r: usize) {
        let (dim, sw) = (self.dim, self.sw);
        prefetch_lines(
            self.table.as_ptr().wrapping_add(r * dim),
            dim,
            prefetch_write,
        );
        prefetch_lines(self.state.as_ptr().wrapping_add(r * sw), sw, prefetch_write);
    }

    #[inline(always)]
    fn update_row(
        &mut self,
        r: usize,
        width: usize,
        _scratch: &mut [f32],
        update: impl FnOnce(&mut [f32], &mut [f32]),
    ) {
        let sw = self.sw;
        update(
            &mut self.table[r * width..(r + 1) * width],
            &mut self.state[r * sw..(r + 1) * sw],
        );
    }
}

/// The fused update of every distinct row of `rg`: its summed gradient (plus the weight
/// decay times the row), then the optimizer, applied through `rows` (which starts at the
/// first distinct row). Tasks own disjoint runs of distinct rows.
pub(crate) fn update_coalesced_rows<R: UpdateRows>(
    isa: Isa,
    rg: &RowGrads,
    rows: R,
    step: SparseStep,
    par: Par,
) {
    let SparseStep { opt, weight_decay } = step;
    let (ids, dim) = (rg.rows, rg.dim);
    let leaf = |range: Range<usize>, mut part: R| {
        let base = ids[range.start] as usize;
        // The row's gradient, and the scratch row of `update_row`.
        with_scratch(&EMB_ROW, 2 * dim, |buf| {
            let (g, scratch) = buf.split_at_mut(dim);
            dispatch!(isa, V => with_width!(dim, |width| for i in range.clone() {
                if let Some(&ahead) = ids[..range.end].get(i + UPDATE_PREFETCH_DISTANCE) {
                    part.prefetch_row(ahead as usize - base);
                }
                let g = &mut g[..width];
                rg.sum_into::<V>(i, g);
                let r = ids[i] as usize - base;
                part.update_row(r, width, &mut scratch[..width], |p, s| {
                    if weight_decay != 0.0 {
                        // g += weight_decay * p: an axpy, i.e. an SGD step with the negated
                        // rate.
                        sgd_lanes::<V>(g, p, -weight_decay);
                    }
                    opt.apply::<V>(p, s, g);
                });
            }))
        });
    };
    join_ranges(
        0..ids.len(),
        rg.grain(par),
        rows,
        &|part: R, lo, mid| part.split_rows((ids[mid] - ids[lo]) as usize),
        &leaf,
    );
}

/// Elements per parallel task of the dense updates (a fixed split: elementwise, so the bits
/// never depend on it anyway).
const DENSE_CHUNK: usize = 1 << 14;
/// Smallest dense update (in elements) that is split across threads.
const MIN_PARALLEL_DENSE: usize = 1 << 16;

/// Dense parameter updates (MLP weights/biases), SIMD, parallel when large, bit-identical.
/// SGD: param -= lr * grad, on [`Isa::selected`].
pub fn sgd_update(param: &mut [f32], grad: &[f32], lr: f32, par: Par) {
    sgd_update_with_isa(Isa::selected(), param, grad, lr, par)
}

/// [`sgd_update`] on `isa` (panics if the CPU lacks it).
pub fn sgd_update_with_isa(isa: Isa, param: &mut [f32], grad: &[f32], lr: f32, par: Par) {
    assert_eq!(
        param.len(),
        grad.len(),
        "sgd_update: {} parameters, {} gradients",
        param.len(),
        grad.len()
    );
    if should_split(par, param.len(), MIN_PARALLEL_DENSE) {
        param
            .par_chunks_mut(DENSE_CHUNK)
            .zip(grad.par_chunks(DENSE_CHUNK))
            .for_each(|(p, g)| dispatch!(isa, V => sgd_lanes::<V>(p, g, lr)));
    } else {
        dispatch!(isa, V => sgd_lanes::<V>(param, grad, lr));
    }
}

/// Dense Adagrad: state += grad^2; param -= lr * grad / (sqrt(state) + eps), on
/// [`Isa::selected`].
pub fn adagrad_update(
    param: &mut [f32],
    grad: &[f32],
    state: &mut [f32],
    lr: f32,
    eps: f32,
    par: Par,
) {
    adagrad_update_with_isa(Isa::selected(), param, grad, state, lr, eps, par)
}

/// [`adagrad_update`] on `isa` (panics if the CPU lacks it).
pub fn adagrad_update_with_isa(
    isa: Isa,
    param: &mut [f32],
    grad: &[f32],
    state: &mut [f32],
    lr: f32,
    eps: f32,
    par: Par,
) {
    assert!(
        param.len() == grad.len() && state.len() == grad.len(),
        "adagrad_update: {} parameters, {} gradients, {} state values",
        param.len(),
        grad.len(),
        state.len()
    );
    if should_split(par, param.len(), MIN_PARALLEL_DENSE) {
        param
            .par_chunks_mut(DENSE_CHUNK)
            .zip(grad.par_chunks(DENSE_CHUNK))
            .zip(state.par_chunks_mut(DENSE_CHUNK))
            .for_each(|((p, g), s)| dispatch!(isa, V => adagrad_lanes::<V>(p, g, s, lr, eps)));
    } else {
        dispatch!(isa, V => adagrad_lanes::<V>(param, grad, state, lr, eps));
    }
}
