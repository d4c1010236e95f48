//! The backward of embedding bags: the gradient of the per-sample weights, and the coalesced
//! sparse gradient of a table (rows grouped by a stable radix sort, each run pooled like a
//! forward bag); the fused optimizer update built on it lives in [`crate::optim`].

use super::{Bags, MIN_PARALLEL_FLOATS, PREFETCH_DISTANCE, Pooling, pool_rows};
use crate::isa::Isa;
use crate::mat::{MatRef, check_view, table_rows, table_slice};
use crate::parallel::{Par, join_ranges, should_split, task_grain};
use crate::simd::{SimdVec, dispatch, prefetch_lines, prefetch_read};
use core::ops::Range;
use rayon::prelude::*;

/// d loss / d per_sample_weights:
/// `grad_weights[p] = dot(grad_out[bag(p)], table[indices[p]])`, on [`Isa::selected`].
pub fn embedding_bag_weight_grad(
    table: MatRef,
    bags: Bags,
    grad_out: MatRef,
    grad_weights: &mut [f32],
    par: Par,
) {
    embedding_bag_weight_grad_with_isa(Isa::selected(), table, bags, grad_out, grad_weights, par)
}

/// [`embedding_bag_weight_grad`] on `isa` (panics if the CPU lacks it).
pub fn embedding_bag_weight_grad_with_isa(
    isa: Isa,
    table: MatRef,
    bags: Bags,
    grad_out: MatRef,
    grad_weights: &mut [f32],
    par: Par,
) {
    dispatch!(isa, V => weight_grad::<V>(table, bags, grad_out, grad_weights, par))
}

fn weight_grad<V: SimdVec>(
    table: MatRef,
    bags: Bags,
    grad_out: MatRef,
    grad_weights: &mut [f32],
    par: Par,
) {
    const WHO: &str = "embedding_bag_weight_grad";
    let dim = table.cols();
    let table = table_slice(table, dim, WHO);
    table_rows(table, dim, WHO);
    bags.check_shape(Pooling::Sum, WHO);
    check_view(grad_out, bags.len(), dim, "grad_out", WHO);
    let (grad_stride, grad_out) = (grad_out.row_stride(), grad_out.as_slice());
    let indices = bags.indices();
    assert_eq!(
        grad_weights.len(),
        indices.len(),
        "{WHO}: grad_weights has {} values for {} indices",
        grad_weights.len(),
        indices.len()
    );
    let leaf = |range: Range<usize>, gw: &mut [f32]| {
        V::vectorize(
            #[inline(always)]
            || weight_grad_leaf::<V>((table, dim), bags, grad_out, grad_stride, range, gw),
        )
    };
    let parallel = should_split(par, indices.len() * dim, MIN_PARALLEL_FLOATS);
    if !bags.is_empty() {
        join_ranges(
            0..bags.len(),
            task_grain(bags.len(), parallel),
            grad_weights,
            &|gw, lo, mid| gw.split_at_mut(bags.bag(mid).start - bags.bag(lo).start),
            &leaf,
        );
    }
}

/// grad_weights for the bags `range`, into `gw` (from the first position of the range).
#[inline(always)]
fn weight_grad_leaf<V: SimdVec>(
    (table, dim): (&[f32], usize),
    bags: Bags,
    grad_out: &[f32],
    grad_stride: usize,
    range: Range<usize>,
    gw: &mut [f32],
) {
    let indices = bags.indices();
    let p0 = bags.bag(range.start).start;
    for b in range {
        let g = &grad_out[b * grad_stride..b * grad_stride + dim];
        for p in bags.bag(b) {
            if let Some(&id) = indices.get(p + PREFETCH_DISTANCE) {
                prefetch_lines(
                    table.as_ptr().wrapping_add(id as usize * dim),
                    dim,
                    prefetch_read,
                );
            }
            let id = indices[p] as usize;
            gw[p - p0] = dot::<V>(g, &table[id * dim..(id + 1) * dim]);
        }
    }
}

/// Dot product of two equally long slices, in LANES-wide partial sums added up in a fixed order.
#[inline(always)]
fn dot<V: SimdVec>(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = V::splat(0.0);
    for (x, y) in a.chunks(V::LANES).zip(b.chunks(V::LANES)) {
        // SAFETY: both chunks hold x.len() <= LANES readable floats.
        let (xv, yv) = unsafe {
            (
                V::load_partial(x.as_ptr(), x.len()),
                V::load_partial(y.as_ptr(), y.len()),
            )
        };
        acc = xv.mul_add(yv, acc);
    }
    acc.reduce_add()
}

/// Reusable buffers for the backward (grows once, then no allocation).
#[derive(Default)]
pub struct SparseGradWorkspace {
    /// (row id << 32) | position, sorted by row id then position.
    keys: Vec<u64>,
    /// The radix sort's second buffer.
    tmp: Vec<u64>,
    /// The radix sort's bucket counters.
    hist: Vec<u32>,
    /// Bag of each position.
    pos_bag: Vec<u32>,
    /// Distinct row ids, ascending.
    rows: Vec<u32>,
    /// Where each distinct row's run starts in `keys` (one more entry: keys.len()).
    starts: Vec<u32>,
    /// Coalesced gradients, rows.len() x dim.
    grads: Vec<f32>,
}

/// The coalesced (duplicate-summed) sparse gradient of a table: distinct rows ascending, and
/// their summed gradients (rows.len() x dim), duplicates summed in batch (position) order.
pub struct CoalescedGrad<'a> {
    pub rows: &'a [u32],
    pub grads: &'a [f32],
}

/// What the gradient of one distinct row is made of: after [`RowGrads::prepare`], row i is
/// `rows[i]`, and its gradient sums, in position order, scale(p) * grad_out[bag(p)] over the
/// positions p of `keys[starts[i] .. starts[i + 1]]`.
pub(crate) struct RowGrads<'w, 'a> {
    pub(crate) rows: &'w [u32],
    keys: &'w [u64],
    starts: &'w [u32],
    pos_bag: &'w [u32],
    bags: Bags<'a>,
    pooling: Pooling,
    grad_out: &'a [f32],
    grad_stride: usize,
    pub(crate) dim: usize,
}

impl<'w, 'a> RowGrads<'w, 'a> {
    /// Checks the arguments (`grad_out`: one row of the table's width per bag), groups the
    /// positions by row (stable radix sort) in `ws`, and returns the grouping with the
    /// workspace's (not yet sized) gradient buffer.
    pub(crate) fn prepare(
        rows: usize,
        bags: Bags<'a>,
        pooling: Pooling,
        grad_out: MatRef<'a>,
        ws: &'w mut SparseGradWorkspace,
        who: &str,
    ) -> (Self, &'w mut Vec<f32>) {
        let dim = grad_out.cols();
        assert!(dim > 0, "{who}: dim is 0");
        bags.check_shape(pooling, who);
        check_view(grad_out, bags.len(), dim, "grad_out", who);
        let (grad_stride, grad_out) = (grad_out.row_stride(), grad_out.as_slice());
        let SparseGradWorkspace {
            keys,
            tmp,
            hist,
            pos_bag,
            rows: distinct,
            starts,
            grads,
        } = ws;
        // Every buffer is sized for the worst case of this many lookups (all distinct) at once,
        // so that a run of batches of the same size allocates only on its first call.
        let nnz = bags.indices().len();
        for v in [&mut *pos_bag, &mut *distinct, &mut *starts] {
            v.clear();
            v.reserve(nnz + 1);
        }
        keys.clear();
        keys.reserve(nnz);
        for b in 0..bags.len() {
            pos_bag.extend(core::iter::repeat_n(b as u32, bags.bag(b).len()));
        }
        // Bags that do not tile the positions (a first offset past 0) would attribute
        // positions to the wrong bags: refused at no cost, as the bags' own ranges are.
        assert_eq!(
            pos_bag.len(),
            nnz,
            "{who}: the bags hold {} of the {nnz} indices",
            pos_bag.len()
        );
        // The sort needs the largest id, taken in the pass that makes the keys: the ids were
        // validated by the caller, and this is the one place the backward sees an id that
        // does not index a row (an update would panic on it, a coalesced gradient would not).
        let mut max_id = 0;
        keys.extend(bags.indices().iter().enumerate().map(|(p, &id)| {
            max_id = max_id.max(id);
            (u64::from(id) << 32) | p as u64
        }));
        assert!(
            nnz == 0 || (max_id as usize) < rows,
            "{who}: row id {max_id} out of range for a table of {rows} rows"
        );
        sort_by_row(keys, tmp, hist, max_id);
        distinct.clear();
        starts.clear();
        for (j, &k) in keys.iter().enumerate() {
            let id = (k >> 32) as u32;
            if distinct.last() != Some(&id) {
                distinct.push(id);
                starts.push(j as u32);
            }
        }
        starts.push(keys.len() as u32);
        let rg = RowGrads {
            rows: distinct,
            keys,
            starts,
            pos_bag,
            bags,
            pooling,
            grad_out,
            grad_stride,
            dim,
        };
        (rg, grads)
    }

    /// out = the summed gradient of distinct row i (`out` holds dim floats). Always inlined,
    /// so that a caller passing a slice of literal length gets the pooling loop of that width.
    #[inline(always)]
    pub(crate) fn sum_into<V: SimdVec>(&self, i: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.dim);
        let run = self.starts[i] as usize..self.starts[i + 1] as usize;
        let stride = self.grad_stride;
        let row = |k: usize| {
            let p = self.keys[run.start + k] as u32 as usize;
            let b = self.pos_bag[p] as usize;
            (
                &self.grad_out[b * stride..],
                self.bags.scale(self.pooling, p, b),
            )
        };
        let prefetch = |k: usize| {
            if let Some(&key) = self.keys.get(run.start + k + PREFETCH_DISTANCE) {
                let b = self.pos_bag[key as u32 as usize] as usize;
                prefetch_lines(
                    self.grad_out.as_ptr().wrapping_add(b * stride),
                    self.dim,
                    prefetch_read,
                );
            }
        };
        pool_rows::<V>(out.len(), run.len(), &row, &prefetch, None, out);
    }

    /// Floats read and written by the backward (the measure for going parallel).
    pub(crate) fn work(&self) -> usize {
        (self.keys.len() + self.rows.len()) * self.dim
    }

    /// Distinct rows per parallel task, or everything in one task when `par` keeps the work
    /// serial.
    pub(crate) fn grain(&self, par: Par) -> usize {
        task_grain(
            self.rows.len(),
            should_split(par, self.work(), MIN_PARALLEL_FLOATS),
        )
    }
}

/// Widest digit of the radix sort, in bits: 2^12 buckets, whose counters (16 KiB) stay in L1
/// and whose open output lines (256 KiB) stay in L2 during a scatter pass.
const MAX_RADIX_BITS: u32 = 12;

/// Stable LSD radix sort of `keys` by their high 32 bits (the row id), over the bits of ids up
/// to `max_id` only, in as few passes as digits of at most MAX_RADIX_BITS allow (two for
/// tables up to 2^24 rows), the digits of equal width; a digit of at most log2(n) bits (but
/// at least 8), so that the per-pass cost of the buckets stays below that of the keys; a pass
/// whose digit is the same for all keys is skipped. Keys start in position order, so within a
/// row they stay in position (batch) order, and the result (the unique stable order) does not
/// depend on the digits chosen. O(nnz) time whatever the table's row count (Knuth, TAOCP
/// vol. 3, 5.2.5).
fn sort_by_row(keys: &mut Vec<u64>, tmp: &mut Vec<u64>, hist: &mut Vec<u32>, max_id: u32) {
    let n = keys.len();
    let id_bits = u32::BITS - max_id.leading_zeros();
    if id_bits == 0 || n < 2 {
        return;
    }
    let max_digit = n.ilog2().clamp(8, MAX_RADIX_BITS);
    let passes = id_bits.div_ceil(max_digit);
    let bits = id_bits.div_ceil(passes);
    let mask = (1usize << bits) - 1;
    let digit = |k: u64, d: u32| ((k >> (32 + d * bits)) as usize) & mask;
    // One histogram of mask + 1 counters per pass, all counted in one sweep over the keys.
    hist.clear();
    hist.resize(passes as usize * (mask + 1), 0);
    for &k in keys.iter() {
        for (d, h) in hist.chunks_exact_mut(mask + 1).enumerate() {
            h[digit(k, d as u32)] += 1;
        }
    }
    tmp.resize(n, 0);
    for (d, h) in hist.chunks_exact_mut(mask + 1).enumerate() {
        if h.contains(&(n as u32)) {
            continue;
        }
        // Counts -> first slot of each bucket.
        let mut sum = 0;
        for c in h.iter_mut() {
            (*c, sum) = (sum, sum + *c);
        }
        for &k in keys.iter() {
            let slot = &mut h[digit(k, d as u32)];
            tmp[*slot as usize] = k;
            *slot += 1;
        }
        core::mem::swap(keys, tmp);
    }
}

/// The coalesced (duplicate-summed) sparse gradient of a table of `rows` rows from the
/// gradient of its pooled output (`grad_out`: one row of the table's width per bag): distinct
/// rows ascending, and their summed gradients (rows.len() x dim), duplicates summed in batch
/// (position) order. Runs on [`Isa::selected`].
pub fn embedding_bag_backward_coalesce<'w>(
    rows: usize,
    bags: Bags,
    pooling: Pooling,
    grad_out: MatRef,
    ws: &'w mut SparseGradWorkspace,
    par: Par,
) -> CoalescedGrad<'w> {
    let isa = Isa::selected();
    embedding_bag_backward_coalesce_with_isa(isa, rows, bags, pooling, grad_out, ws, par)
}

/// [`embedding_bag_backward_coalesce`] on `isa` (panics if the CPU lacks it).
pub fn embedding_bag_backward_coalesce_with_isa<'w>(
    isa: Isa,
    rows: usize,
    bags: Bags,
    pooling: Pooling,
    grad_out: MatRef,
    ws: &'w mut SparseGradWorkspace,
    par: Par,
) -> CoalescedGrad<'w> {
    let dim = grad_out.cols();
    let (rg, grads) = RowGrads::prepare(
        rows,
        bags,
        pooling,
        grad_out,
        ws,
        "embedding_bag_backward_coalesce",
    );
    let n = rg.rows.len();
    if grads.len() < n * dim {
        grads.resize(n * dim, 0.0);
    }
    let grads = &mut grads[..n * dim];
    let grain = rg.grain(par);
    let chunk = |t: usize, g: &mut [f32]| {
        dispatch!(isa, V => with_width!(
            dim,
            |width| for (i, out) in g.chunks_exact_mut(width).enumerate() {
                rg.sum_into::<V>(t * grain + i, out);
            }
        ))
    };
    if grain >= n {
        chunk(0, grads);
    } else {
        grads
            .par_chunks_mut(grain * dim)
            .enumerate()
            .for_each(|(t, g)| chunk(t, g));
    }
    CoalescedGrad {
        rows: rg.rows,
        grads,
    }
}
