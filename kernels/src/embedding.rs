//! Embedding bags: forward (sum / mean / weighted pooling), the gradient of the per-sample
//! weights, and the coalesced sparse gradient of a table (whose fused optimizer update lives in
//! [`crate::optim`]); and a plain row gather ([`gather_rows`]), the forward without its
//! arithmetic, which measures how close the forward comes to the memory system.
//!
//! Bags follow PyTorch's `EmbeddingBag` (include_last_offset = false): bag b is
//! `indices[offsets[b] .. offsets[b + 1]]`, the last bag runs to `indices.len()`.
//!
//! A lookup reads one random row of a table that is usually far larger than the caches, so the
//! forward is bound by memory latency, not arithmetic (Naumov et al. 2019, section 5; Acun et
//! al., "Understanding Training Efficiency of Deep Learning Recommendation Models at Scale",
//! HPCA 2021). Two things matter: the pooled vector stays in registers while a bag's rows
//! stream through (`pool_block`, specialised at compile time for the common widths), and the
//! row `PREFETCH_DISTANCE` ids ahead is requested early so that several misses overlap.
//!
//! Backward: bag b's output gradient is scattered to every row its bag looked up. The
//! positions are sorted by row id with a stable LSD radix sort (only the id digits that vary
//! are sorted, so the cost is O(nnz) and independent of the table's row count), so duplicates
//! form runs in batch order; each run is then pooled like a forward bag, whose "table" is the
//! output gradient. Distinct rows are independent, so threads take contiguous runs of them.

use crate::mat::MatRef;
use crate::parallel::{Par, join_ranges, should_split, task_grain};
use crate::simd::{F32s, LANES, load, load_partial, prefetch_read, store, store_partial};
use core::ops::Range;
use rayon::prelude::*;

/// How the rows of a bag are reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Sum of the rows (times the per-sample weights, if any).
    Sum,
    /// Sum divided by the bag's size; an empty bag gives zeros.
    Mean,
}

/// Bags in the PyTorch EmbeddingBag convention (include_last_offset = false): bag b is
/// `indices[offsets[b] .. offsets[b+1]]`, the last bag runs to `indices.len()`;
/// `offsets[0] == 0` when there is at least one bag; an empty bag pools to zeros. `weights`
/// (per index) are PyTorch's per_sample_weights (only with Pooling::Sum, like PyTorch).
#[derive(Clone, Copy, Debug)]
pub struct Bags<'a> {
    pub indices: &'a [u32],
    pub offsets: &'a [u32],
    pub weights: Option<&'a [f32]>,
}

impl Bags<'_> {
    /// Number of bags.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether there are no bags.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The positions (in `indices`) of bag `b`.
    #[inline]
    pub fn bag(&self, b: usize) -> Range<usize> {
        let start = self.offsets[b] as usize;
        let end = self
            .offsets
            .get(b + 1)
            .map_or(self.indices.len(), |&e| e as usize);
        start..end
    }

    /// Checks the bag structure (programmer errors) and that every id is below `rows`, once at
    /// entry, so the hot loops can trust them. Returns the largest id (None without ids).
    pub(crate) fn check(&self, rows: usize, pooling: Pooling, who: &str) -> Option<u32> {
        let nnz = self.indices.len();
        assert!(
            u32::try_from(nnz).is_ok(),
            "{who}: {nnz} indices do not fit u32 positions"
        );
        match self.offsets.first() {
            None => assert!(nnz == 0, "{who}: {nnz} indices but no bags"),
            Some(&first) => assert!(first == 0, "{who}: offsets[0] = {first}, must be 0"),
        }
        assert!(
            self.offsets.windows(2).all(|w| w[0] <= w[1]),
            "{who}: offsets are not non-decreasing"
        );
        if let Some(&last) = self.offsets.last() {
            assert!(
                last as usize <= nnz,
                "{who}: last offset {last} is past the {nnz} indices"
            );
        }
        if let Some(w) = self.weights {
            assert!(
                pooling == Pooling::Sum,
                "{who}: per-sample weights need Pooling::Sum (as in PyTorch)"
            );
            assert_eq!(
                w.len(),
                nnz,
                "{who}: {} per-sample weights for {nnz} indices",
                w.len()
            );
        }
        check_ids(self.indices, rows, who)
    }

    /// The factor applied to the row looked up at position `p` of bag `b`.
    #[inline(always)]
    fn scale(&self, pooling: Pooling, p: usize, b: usize) -> f32 {
        match (pooling, self.weights) {
            (Pooling::Mean, _) => 1.0 / self.bag(b).len() as f32,
            (Pooling::Sum, Some(w)) => w[p],
            (Pooling::Sum, None) => 1.0,
        }
    }
}

/// Panics unless every id is below `rows`; returns the largest id (None without ids).
fn check_ids(indices: &[u32], rows: usize, who: &str) -> Option<u32> {
    let max = indices.iter().copied().max();
    if let Some(m) = max {
        assert!(
            (m as usize) < rows,
            "{who}: row id {m} out of range for a table of {rows} rows"
        );
    }
    max
}

/// Ids between the row being accumulated and the row being prefetched. Measured with the
/// forward on a 1 GiB table (4 Mi rows at dim 64, 2 Mi at dim 128; no huge pages), 40 batches
/// of 2048 bags of 20 and of 1 uniform random ids, one thread, on a shared 2-core AVX-512
/// Xeon VM: best of 8 x 9 runs, ns per lookup (distance 0 requests the row being read, i.e. no
/// look-ahead):
///
/// | distance | dim 64, bag 20 | dim 64, bag 1 | dim 128, bag 20 | dim 128, bag 1 |
/// |----------|----------------|---------------|-----------------|----------------|
/// | 0        | 51.7           | 35.6          | 80.2            | 93.2           |
/// | 2        | 51.7           | 58.3          | 73.5            | 57.5           |
/// | 4        | 50.7           | 31.2          | 72.7            | 55.8           |
/// | 6        | 49.5           | 29.3          | 69.3            | 55.1           |
/// | 8        | 49.9           | 29.2          | 68.6            | 55.1           |
/// | 12       | 50.9           | 29.9          | 70.9            | 78.6           |
///
/// Long bags gain little (the loads within a bag are independent, and out-of-order execution
/// already overlaps their misses); one-id bags gain up to 40%. 6 and 8 tie on the minima; 6
/// had the better median (69 vs 81 ns at dim 128, bag 1), and a shorter distance wastes fewer
/// prefetches at the end of a batch.
pub const PREFETCH_DISTANCE: usize = 6;

/// Widest block of vectors the generic path accumulates in registers at once; wider rows are
/// pooled in column blocks of this many vectors, the bag's rows then being in cache for every
/// block but the first.
const GENERIC_NV: usize = 8;

/// Smallest forward / backward (in floats touched) that is split across threads.
const MIN_PARALLEL_FLOATS: usize = 1 << 15;

/// Calls the prefetch `hint` on every cache line of the `len` floats from `p`. Any address is
/// allowed (a prefetch never faults), so rows can be requested before their id is checked
/// against anything.
#[inline(always)]
pub(crate) fn prefetch_lines(p: *const f32, len: usize, hint: impl Fn(*const f32)) {
    if len == 0 {
        return;
    }
    let end = p.wrapping_add(len) as usize;
    let mut line = p.wrapping_byte_sub(p as usize % 64);
    while (line as usize) < end {
        hint(line);
        line = line.wrapping_byte_add(64);
    }
}

/// out = (sum over k < n of w_k * `row_k[col .. col + width]`) / div, the NV vectors of the sum
/// held in registers, where `row(k)` gives row k (from its column 0) and w_k, and
/// width = (NV - 1) * LANES + tail, 0 < tail <= LANES. `prefetch(k)` is called before row k is
/// read (to request a row further ahead). Rows are added in k order, with one FMA per
/// element and row after the first, so the bits depend only on the rows and their order.
#[inline(always)]
fn pool_block<'r, const NV: usize>(
    n: usize,
    row: &impl Fn(usize) -> (&'r [f32], f32),
    prefetch: &impl Fn(usize),
    col: usize,
    tail: usize,
    div: Option<f32>,
    out: &mut [f32],
) {
    let width = (NV - 1) * LANES + tail;
    assert!(tail > 0 && tail <= LANES && out.len() == width);
    let mut acc = [F32s::splat(0.0); NV];
    for k in 0..n {
        prefetch(k);
        let (r, w) = row(k);
        let r = &r[col..col + width];
        let w = F32s::splat(w);
        for (v, a) in acc.iter_mut().enumerate() {
            // SAFETY: r holds width floats: LANES at v * LANES for v < NV - 1, tail for the
            // last vector.
            let x = unsafe {
                if v + 1 < NV || tail == LANES {
                    load(r.as_ptr().add(v * LANES))
                } else {
                    load_partial(r.as_ptr().add(v * LANES), tail)
                }
            };
            // The first row is multiplied rather than added to zero, so a bag of one row pools
            // to exactly that row (-0.0 included), as the copy of one-id bags gives it.
            *a = if k == 0 { x * w } else { x.mul_add(w, *a) };
        }
    }
    if let Some(d) = div {
        let d = F32s::splat(d);
        for a in acc.iter_mut() {
            *a /= d;
        }
    }
    for (v, a) in acc.iter().enumerate() {
        // SAFETY: out holds width floats, laid out as for the loads above.
        unsafe {
            if v + 1 < NV || tail == LANES {
                store(out.as_mut_ptr().add(v * LANES), *a)
            } else {
                store_partial(out.as_mut_ptr().add(v * LANES), tail, *a)
            }
        }
    }
}

/// Evaluates `$body` with `$width` bound to `$dim`, as a literal for each specialised width
/// (16, 32, 64, 128) and as the runtime value otherwise, so that an always-inlined helper in
/// `$body` is compiled once per specialised width with its loops unrolled.
macro_rules! with_width {
    ($dim:expr, |$width:ident| $body:expr) => {
        match $dim {
            16 => {
                let $width = 16;
                $body
            }
            32 => {
                let $width = 32;
                $body
            }
            64 => {
                let $width = 64;
                $body
            }
            128 => {
                let $width = 128;
                $body
            }
            $width => $body,
        }
    };
}
pub(crate) use with_width;

/// Calls `pool_block::<N>` for the runtime vector count `$nv` in 1..=GENERIC_NV.
macro_rules! pool_block_nv {
    ($nv:expr, ($($arg:expr),*)) => {
        match $nv {
            1 => pool_block::<1>($($arg),*),
            2 => pool_block::<2>($($arg),*),
            3 => pool_block::<3>($($arg),*),
            4 => pool_block::<4>($($arg),*),
            5 => pool_block::<5>($($arg),*),
            6 => pool_block::<6>($($arg),*),
            7 => pool_block::<7>($($arg),*),
            8 => pool_block::<8>($($arg),*),
            nv => unreachable!("{nv} vectors in a block of at most {GENERIC_NV}"),
        }
    };
}

/// out[..width] = (sum over k < n of w_k * row_k[..width]) / div, for rows given by `row(k)`
/// (see [`pool_block`]). The common widths (16, 32, 64, 128) are compiled with their vector
/// count as a constant and no tail; any other width is pooled in column blocks of up to
/// GENERIC_NV vectors, the last one masked. `prefetch` runs during the first block only.
#[inline(always)]
fn pool_rows<'r>(
    width: usize,
    n: usize,
    row: &impl Fn(usize) -> (&'r [f32], f32),
    prefetch: &impl Fn(usize),
    div: Option<f32>,
    out: &mut [f32],
) {
    let out = &mut out[..width];
    match width {
        16 => pool_block::<{ 16 / LANES }>(n, row, prefetch, 0, LANES, div, out),
        32 => pool_block::<{ 32 / LANES }>(n, row, prefetch, 0, LANES, div, out),
        64 => pool_block::<{ 64 / LANES }>(n, row, prefetch, 0, LANES, div, out),
        128 => pool_block::<{ 128 / LANES }>(n, row, prefetch, 0, LANES, div, out),
        _ => {
            for (blk, out) in out.chunks_mut(GENERIC_NV * LANES).enumerate() {
                let col = blk * GENERIC_NV * LANES;
                let nv = out.len().div_ceil(LANES);
                let tail = out.len() - (nv - 1) * LANES;
                if blk == 0 {
                    pool_block_nv!(nv, (n, row, prefetch, col, tail, div, out));
                } else {
                    pool_block_nv!(nv, (n, row, &|_| {}, col, tail, div, out));
                }
            }
        }
    }
}

/// `out[b*out_stride .. b*out_stride + dim]` = pooled rows of bag b. `table` is rows x dim
/// row-major (rows = table.len() / dim). Panics if an index >= rows (ids are validated by the
/// caller; the check must still exist so a bad id can never read out of bounds).
pub fn embedding_bag_forward(
    table: &[f32],
    dim: usize,
    bags: Bags,
    pooling: Pooling,
    out: &mut [f32],
    out_stride: usize,
    par: Par,
) {
    embedding_bag_forward_tables(
        1,
        dim,
        |_| table,
        |_| bags,
        pooling,
        out,
        out_stride,
        0,
        par,
    );
}

/// Pools `num_tables` tables into shared output rows: bag b of table t goes to
/// `out[b * out_stride + first_col + t * dim ..][..dim]` (the model's feature rows, one slot
/// per table). Every table has the same number of bags. Threads split the bags (output rows),
/// and each task pools all tables for its rows, table by table, so every task owns whole rows.
#[allow(clippy::too_many_arguments)]
pub fn embedding_bag_forward_tables<'t>(
    num_tables: usize,
    dim: usize,
    table: impl Fn(usize) -> &'t [f32] + Sync,
    bags: impl Fn(usize) -> Bags<'t> + Sync,
    pooling: Pooling,
    out: &mut [f32],
    out_stride: usize,
    first_col: usize,
    par: Par,
) {
    const WHO: &str = "embedding_bag_forward";
    if num_tables == 0 {
        return;
    }
    let n = bags(0).len();
    let mut work = 0;
    for t in 0..num_tables {
        let b = bags(t);
        assert_eq!(
            b.len(),
            n,
            "{WHO}: table {t} has {} bags, table 0 has {n}",
            b.len()
        );
        b.check(table_rows(table(t), dim, WHO), pooling, WHO);
        work += (b.indices.len() + n) * dim;
    }
    let span = first_col + num_tables * dim;
    check_strided(out.len(), n, span, out_stride, "out", WHO);
    if n == 0 {
        return;
    }
    let rows_from = |b0: usize, out: &mut [f32]| {
        for t in 0..num_tables {
            pool_bags(
                table(t),
                dim,
                bags(t),
                pooling,
                b0,
                out,
                out_stride,
                first_col + t * dim,
            );
        }
    };
    let out = &mut out[..(n - 1) * out_stride + span];
    if should_split(par, work, MIN_PARALLEL_FLOATS) {
        let grain = task_grain(n, true);
        out.par_chunks_mut(grain * out_stride)
            .enumerate()
            .for_each(|(t, o)| rows_from(t * grain, o));
    } else {
        rows_from(0, out);
    }
}

/// Pools the bags from `b0` on, one per `out_stride` row of `out`, into columns
/// `col .. col + dim` (as many bags as `out` has rows). The bags are checked by the caller.
#[allow(clippy::too_many_arguments)]
fn pool_bags(
    table: &[f32],
    dim: usize,
    bags: Bags,
    pooling: Pooling,
    b0: usize,
    out: &mut [f32],
    out_stride: usize,
    col: usize,
) {
    let indices = bags.indices;
    let count = out.len().div_ceil(out_stride);
    if bags.weights.is_none() && one_id_per_bag(bags, b0..b0 + count) {
        // Every bag is one row (Criteo's one-hot features): the pooled row is the row itself,
        // so it is copied, without the per-bag accumulator set-up, FMA pass and bookkeeping.
        let ids = &indices[b0..b0 + count];
        return with_width!(dim, |width| copy_rows(
            table,
            width,
            ids,
            &mut out[col..],
            out_stride
        ));
    }
    for (i, o) in out.chunks_mut(out_stride).enumerate() {
        let pos = bags.bag(b0 + i);
        let row = |k: usize| {
            let p = pos.start + k;
            let id = indices[p] as usize;
            (&table[id * dim..], bags.weights.map_or(1.0, |w| w[p]))
        };
        let prefetch = |k: usize| {
            if let Some(&id) = indices.get(pos.start + k + PREFETCH_DISTANCE) {
                prefetch_lines(
                    table.as_ptr().wrapping_add(id as usize * dim),
                    dim,
                    prefetch_read,
                );
            }
        };
        let div = (pooling == Pooling::Mean && !pos.is_empty()).then(|| pos.len() as f32);
        pool_rows(dim, pos.len(), &row, &prefetch, div, &mut o[col..col + dim]);
    }
}

/// Whether each bag in `range` holds exactly one id, bag b being `indices[b]`.
fn one_id_per_bag(bags: Bags, range: Range<usize>) -> bool {
    let end = bags
        .offsets
        .get(range.end)
        .map_or(bags.indices.len(), |&e| e as usize);
    end == range.end
        && bags.offsets[range.clone()]
            .iter()
            .zip(range)
            .all(|(&o, b)| o as usize == b)
}

/// `out[i * out_stride ..][..dim] = table[indices[i] * dim ..][..dim]`: the looked-up rows
/// copied with no arithmetic (PyTorch's `index_select` along rows). The row loads, stores and
/// prefetches are the forward's, minus its FMAs and bag bookkeeping, so on the same ids this
/// runs at the speed of the memory system: the ceiling the forward is benchmarked against.
/// Threads split the output rows. Panics if an index >= rows.
pub fn gather_rows(
    table: &[f32],
    dim: usize,
    indices: &[u32],
    out: &mut [f32],
    out_stride: usize,
    par: Par,
) {
    const WHO: &str = "gather_rows";
    let rows = table_rows(table, dim, WHO);
    check_ids(indices, rows, WHO);
    let n = indices.len();
    check_strided(out.len(), n, dim, out_stride, "out", WHO);
    if n == 0 {
        return;
    }
    let rows_from = |i0: usize, out: &mut [f32]| {
        let ids = &indices[i0..];
        with_width!(dim, |width| copy_rows(table, width, ids, out, out_stride))
    };
    let out = &mut out[..(n - 1) * out_stride + dim];
    if should_split(par, 2 * n * dim, MIN_PARALLEL_FLOATS) {
        let grain = task_grain(n, true);
        out.par_chunks_mut(grain * out_stride)
            .enumerate()
            .for_each(|(t, o)| rows_from(t * grain, o));
    } else {
        rows_from(0, out);
    }
}

/// Copies row `ids[i]` of a `width`-wide table into the i-th `out_stride` row of `out`, for
/// as many rows as `out` holds, one vector at a time (a masked vector for the tail), the row
/// `PREFETCH_DISTANCE` ids ahead requested first. Inlined into each call with a literal width,
/// so the specialised widths copy in a fixed number of full vectors. Ids are checked by the
/// caller.
#[inline(always)]
fn copy_rows(table: &[f32], width: usize, ids: &[u32], out: &mut [f32], out_stride: usize) {
    for (i, o) in out.chunks_mut(out_stride).enumerate() {
        if let Some(&ahead) = ids.get(i + PREFETCH_DISTANCE) {
            prefetch_lines(
                table.as_ptr().wrapping_add(ahead as usize * width),
                width,
                prefetch_read,
            );
        }
        let id = ids[i] as usize;
        let (src, dst) = (&table[id * width..(id + 1) * width], &mut o[..width]);
        let full = width - width % LANES;
        for k in (0..full).step_by(LANES) {
            // SAFETY: k + LANES <= width floats are readable in src and writable in dst.
            unsafe { store(dst.as_mut_ptr().add(k), load(src.as_ptr().add(k))) }
        }
        if full < width {
            let tail = width - full;
            // SAFETY: the tail floats from `full` are readable in src and writable in dst.
            unsafe {
                store_partial(
                    dst.as_mut_ptr().add(full),
                    tail,
                    load_partial(src.as_ptr().add(full), tail),
                )
            }
        }
    }
}

/// d loss / d per_sample_weights:
/// `grad_weights[p] = dot(grad_out[bag(p)], table[indices[p]])`.
pub fn embedding_bag_weight_grad(
    table: &[f32],
    dim: usize,
    bags: Bags,
    grad_out: &[f32],
    grad_stride: usize,
    grad_weights: &mut [f32],
    par: Par,
) {
    const WHO: &str = "embedding_bag_weight_grad";
    let rows = table_rows(table, dim, WHO);
    bags.check(rows, Pooling::Sum, WHO);
    check_strided(
        grad_out.len(),
        bags.len(),
        dim,
        grad_stride,
        "grad_out",
        WHO,
    );
    let indices = bags.indices;
    assert_eq!(
        grad_weights.len(),
        indices.len(),
        "{WHO}: grad_weights has {} values for {} indices",
        grad_weights.len(),
        indices.len()
    );
    let leaf = |range: Range<usize>, gw: &mut [f32]| {
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
                gw[p - p0] = dot(g, &table[id * dim..(id + 1) * dim]);
            }
        }
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

/// Dot product of two equally long slices, in LANES-wide partial sums added up in a fixed order.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = F32s::splat(0.0);
    for (x, y) in a.chunks(LANES).zip(b.chunks(LANES)) {
        // SAFETY: both chunks hold x.len() <= LANES readable floats.
        let (xv, yv) = unsafe {
            (
                load_partial(x.as_ptr(), x.len()),
                load_partial(y.as_ptr(), y.len()),
            )
        };
        acc = xv.mul_add(yv, acc);
    }
    acc.reduce_add()
}

/// Rows of a `dim`-wide row-major table (panics on a ragged table or dim = 0).
pub(crate) fn table_rows(table: &[f32], dim: usize, who: &str) -> usize {
    assert!(dim > 0, "{who}: dim is 0");
    assert!(
        table.len().is_multiple_of(dim),
        "{who}: table of {} floats is not a whole number of {dim}-wide rows",
        table.len()
    );
    table.len() / dim
}

/// Checks that a buffer of `len` floats holds `n` rows of `dim` floats, `stride` apart.
pub(crate) fn check_strided(
    len: usize,
    n: usize,
    dim: usize,
    stride: usize,
    what: &str,
    who: &str,
) {
    assert!(stride >= dim, "{who}: {what} stride {stride} < dim {dim}");
    let need = if n == 0 { 0 } else { (n - 1) * stride + dim };
    assert!(
        len >= need,
        "{who}: {what} has {len} floats, {n} rows of {dim} with stride {stride} need {need}"
    );
}

/// Checks that the view `what` is `n` rows of `dim` floats with contiguous columns.
pub(crate) fn check_view(view: MatRef, n: usize, dim: usize, what: &str, who: &str) {
    assert!(
        view.rows() == n && view.cols() == dim && view.col_stride() == 1,
        "{who}: {what} is {}x{} (column stride {}), needs {n}x{dim} with contiguous rows",
        view.rows(),
        view.cols(),
        view.col_stride()
    );
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
        let max_id = bags.check(rows, pooling, who);
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
        let nnz = bags.indices.len();
        for v in [&mut *pos_bag, &mut *distinct, &mut *starts] {
            v.clear();
            v.reserve(nnz + 1);
        }
        keys.clear();
        keys.reserve(nnz);
        for b in 0..bags.len() {
            pos_bag.extend(core::iter::repeat_n(b as u32, bags.bag(b).len()));
        }
        keys.clear();
        keys.extend(
            bags.indices
                .iter()
                .enumerate()
                .map(|(p, &id)| (u64::from(id) << 32) | p as u64),
        );
        sort_by_row(keys, tmp, hist, max_id.unwrap_or(0));
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
    pub(crate) fn sum_into(&self, i: usize, out: &mut [f32]) {
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
        pool_rows(out.len(), run.len(), &row, &prefetch, None, out);
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
/// (position) order.
pub fn embedding_bag_backward_coalesce<'w>(
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
        with_width!(
            dim,
            |width| for (i, out) in g.chunks_exact_mut(width).enumerate() {
                rg.sum_into(t * grain + i, out);
            }
        )
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
