//! The forward of embedding bags, one table ([`embedding_bag_forward`]) or several pooled into
//! shared output rows ([`embedding_bag_forward_tables`]), and the plain row gather
//! ([`gather_rows`]) it is measured against.

use super::{Bags, MIN_PARALLEL_FLOATS, PREFETCH_DISTANCE, Pooling, pool_rows};
use crate::isa::Isa;
use crate::mat::{MatMut, MatRef, check_view, table_rows, table_slice};
use crate::parallel::{Par, should_split, task_grain};
use crate::simd::{SimdVec, dispatch, prefetch_lines, prefetch_read};
use rayon::prelude::*;

/// Row b of `out` (bags x dim) = pooled rows of bag b of `table` (rows x dim, contiguous).
/// The ids are validated by the caller ([`Bags::check`]); an id >= rows panics when its row
/// is read (see [`Bags`]).
pub fn embedding_bag_forward(table: MatRef, bags: Bags, pooling: Pooling, out: MatMut, par: Par) {
    embedding_bag_forward_with_isa(Isa::selected(), table, bags, pooling, out, par);
}

/// [`embedding_bag_forward`] on `isa` (panics if the CPU lacks it).
pub fn embedding_bag_forward_with_isa(
    isa: Isa,
    table: MatRef,
    bags: Bags,
    pooling: Pooling,
    out: MatMut,
    par: Par,
) {
    embedding_bag_forward_tables_with_isa(isa, 1, |_| (table, bags), pooling, out, par);
}

/// Pools `num_tables` tables into shared output rows: `lookup(t)` gives table t (rows x dim,
/// contiguous) and its bags, and bag b of table t goes to columns `t * dim .. (t + 1) * dim`
/// of row b of `out` (bags x num_tables * dim: the model's feature rows, one slot per table).
/// Every table has the same number of bags. Threads split the bags (output rows), and each
/// task pools all tables for its rows, table by table, so every task owns whole rows. Runs on
/// the ISA [`Isa::selected`].
pub fn embedding_bag_forward_tables<'t>(
    num_tables: usize,
    lookup: impl Fn(usize) -> (MatRef<'t>, Bags<'t>) + Sync,
    pooling: Pooling,
    out: MatMut,
    par: Par,
) {
    embedding_bag_forward_tables_with_isa(Isa::selected(), num_tables, lookup, pooling, out, par)
}

/// [`embedding_bag_forward_tables`] on `isa` (panics if the CPU lacks it).
pub fn embedding_bag_forward_tables_with_isa<'t>(
    isa: Isa,
    num_tables: usize,
    lookup: impl Fn(usize) -> (MatRef<'t>, Bags<'t>) + Sync,
    pooling: Pooling,
    out: MatMut,
    par: Par,
) {
    dispatch!(isa, V => forward_tables::<V>(num_tables, &lookup, pooling, out, par))
}

fn forward_tables<'t, V: SimdVec>(
    num_tables: usize,
    lookup: &(impl Fn(usize) -> (MatRef<'t>, Bags<'t>) + Sync),
    pooling: Pooling,
    out: MatMut,
    par: Par,
) {
    const WHO: &str = "embedding_bag_forward";
    if num_tables == 0 {
        return;
    }
    assert!(
        out.cols().is_multiple_of(num_tables),
        "{WHO}: out rows of {} values do not split into {num_tables} tables",
        out.cols()
    );
    let dim = out.cols() / num_tables;
    let table = |t: usize| table_slice(lookup(t).0, dim, WHO);
    let bags = |t: usize| lookup(t).1;
    let out_stride = out.row_stride();
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
        table_rows(table(t), dim, WHO);
        b.check_shape(pooling, WHO);
        work += (b.indices().len() + n) * dim;
    }
    assert_eq!(
        out.rows(),
        n,
        "{WHO}: out has {} rows for {n} bags",
        out.rows()
    );
    if n == 0 {
        return;
    }
    let out = out.into_slice();
    let rows_from = |b0: usize, out: &mut [f32]| {
        V::vectorize(
            #[inline(always)]
            || {
                for t in 0..num_tables {
                    pool_bags::<V>(
                        (table(t), dim),
                        bags(t),
                        pooling,
                        b0,
                        out,
                        out_stride,
                        t * dim,
                    );
                }
            },
        )
    };
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
/// `col .. col + dim` (as many bags as `out` has rows), `table` being rows of dim floats. The
/// ids are not scanned: each row is a bounds-checked slice of `table`.
#[inline(always)]
fn pool_bags<V: SimdVec>(
    (table, dim): (&[f32], usize),
    bags: Bags,
    pooling: Pooling,
    b0: usize,
    out: &mut [f32],
    out_stride: usize,
    col: usize,
) {
    let indices = bags.indices();
    let count = out.len().div_ceil(out_stride);
    if bags.is_one_hot() && bags.weights().is_none() {
        // Every bag is one row (Criteo's one-hot features): the pooled row is the row itself,
        // so it is copied, without the per-bag accumulator set-up, FMA pass and bookkeeping.
        let ids = &indices[b0..b0 + count];
        return with_width!(dim, |width| copy_rows::<V>(
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
            (&table[id * dim..], bags.weights().map_or(1.0, |w| w[p]))
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
        pool_rows::<V>(dim, pos.len(), &row, &prefetch, div, &mut o[col..col + dim]);
    }
}

/// Row i of `out` (indices x dim) = row `indices[i]` of `table`: the looked-up rows
/// copied with no arithmetic (PyTorch's `index_select` along rows). The row loads, stores and
/// prefetches are the forward's, minus its FMAs and bag bookkeeping, so on the same ids this
/// runs at the speed of the memory system: the ceiling the forward is benchmarked against.
/// Threads split the output rows. Panics if an index >= rows. Runs on [`Isa::selected`].
pub fn gather_rows(table: MatRef, indices: &[u32], out: MatMut, par: Par) {
    gather_rows_with_isa(Isa::selected(), table, indices, out, par)
}

/// [`gather_rows`] on `isa` (panics if the CPU lacks it).
pub fn gather_rows_with_isa(isa: Isa, table: MatRef, indices: &[u32], out: MatMut, par: Par) {
    dispatch!(isa, V => gather_rows_lanes::<V>(table, indices, out, par))
}

fn gather_rows_lanes<V: SimdVec>(table: MatRef, indices: &[u32], out: MatMut, par: Par) {
    const WHO: &str = "gather_rows";
    let dim = table.cols();
    let table = table_slice(table, dim, WHO);
    let rows = table_rows(table, dim, WHO);
    if let Err(e) = Bags::one_hot(indices).check(rows) {
        panic!("{WHO}: {e}");
    }
    let n = indices.len();
    check_view(out.as_ref(), n, dim, "out", WHO);
    let out_stride = out.row_stride();
    if n == 0 {
        return;
    }
    let out = out.into_slice();
    let rows_from = |i0: usize, out: &mut [f32]| {
        let ids = &indices[i0..];
        V::vectorize(
            #[inline(always)]
            || {
                with_width!(dim, |width| copy_rows::<V>(
                    table, width, ids, out, out_stride
                ))
            },
        )
    };
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
fn copy_rows<V: SimdVec>(
    table: &[f32],
    width: usize,
    ids: &[u32],
    out: &mut [f32],
    out_stride: usize,
) {
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
        let full = width - width % V::LANES;
        for k in (0..full).step_by(V::LANES) {
            // SAFETY: k + LANES <= width floats are readable in src and writable in dst.
            unsafe { V::store(dst.as_mut_ptr().add(k), V::load(src.as_ptr().add(k))) }
        }
        if full < width {
            let tail = width - full;
            // SAFETY: the tail floats from `full` are readable in src and writable in dst.
            unsafe {
                V::store_partial(
                    dst.as_mut_ptr().add(full),
                    tail,
                    V::load_partial(src.as_ptr().add(full), tail),
                )
            }
        }
    }
}
