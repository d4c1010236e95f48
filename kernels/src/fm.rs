//! Factorization machine (Rendle 2010, "Factorization Machines"), second order, forward and
//! backward over a batch, reading the latent vectors straight from embedding tables.
//!
//! The features are grouped in *fields*: a field is an embedding table of latent vectors v
//! (rows x k), a table of first-order weights w (rows), and bags of row ids in the
//! [`Bags`] convention, position p of a sample's bag being one feature of value x_p (its
//! per-sample weight, 1 for a one-hot id). A categorical feature is one field; the dense
//! features are another, whose bag is every row with the feature values as weights. Per
//! sample, in the O(k n) form of Rendle's Lemma 3.1:
//! ```text
//! S = sum_p x_p v_p                                  (k-vector, kept for the backward)
//! y = bias + sum_p x_p w_p + 1/2 sum_f (S_f^2 - sum_p (x_p v_pf)^2)
//!   = bias + sum_p x_p w_p + sum_{p < q} <v_p, v_q> x_p x_q
//! ```
//! over the positions p of all fields. With r_p = S - x_p v_p (the sum over the *other*
//! features), the backward is
//! ```text
//! dy/dv_p = x_p r_p;   dy/dw_p = x_p;   dy/dx_p = w_p + <v_p, r_p>
//! ```
//! The gradient of a latent row depends on the row itself, so it is not a pooled output
//! gradient scattered to the bag's rows: [`fm_backward`] writes one gradient row per position,
//! which the fused sparse update applies as bags of one position each
//! ([`crate::optim::embedding_bag_backward_update`], duplicates coalesced). The first-order
//! weights' gradient, x_p times the sample's gradient, is a weighted bag gradient and needs
//! no kernel of its own.
//!
//! Forward: per sample, S and the sum of squares stay in registers (k/LANES vectors each) while
//! the rows of every field stream through, the row [`PREFETCH_DISTANCE`] positions ahead in the
//! same field requested early (as in the embedding bag). Samples are independent and split
//! over the current pool; the backward splits positions by bag. No result depends on the split.

use crate::embedding::{Bags, PREFETCH_DISTANCE, Pooling};
use crate::gemm::dot_lanes;
use crate::isa::Isa;
use crate::mat::MatRef;
use crate::mat::{check_view, table_rows};
use crate::parallel::{Par, join_ranges, should_split, split_rows, task_grain};
use crate::simd::{SimdVec, dispatch, prefetch_lines, prefetch_read};
use core::ops::Range;

/// Widest block of k the forward holds in registers at once (twice: S and the squares); wider
/// latent vectors are processed in column blocks of this many vectors.
const MAX_NV: usize = 4;

/// Smallest forward / backward (in floats touched) that is split across threads.
const MIN_PARALLEL_FLOATS: usize = 1 << 15;

/// One field of a factorization machine.
#[derive(Clone, Copy, Debug)]
pub struct FmField<'a> {
    /// Latent vectors, rows x k, row-major.
    pub factors: &'a [f32],
    /// First-order weights, one per row.
    pub linear: &'a [f32],
    /// The features of each sample: row ids, and their values as per-sample weights (1 when
    /// absent).
    pub bags: Bags<'a>,
}

impl FmField<'_> {
    /// Checks the field once (programmer errors: shapes, ids out of range).
    fn check(&self, k: usize, who: &str) {
        let rows = table_rows(self.factors, k, who);
        assert_eq!(
            self.linear.len(),
            rows,
            "{who}: {} first-order weights for {rows} latent rows",
            self.linear.len()
        );
        self.bags.assert_valid(rows, Pooling::Sum, who);
    }
}

/// Forward over `batch` samples of `num_fields` fields (`field(t)`, each with `batch` bags):
/// `out[b] = bias + first-order + second-order term` of sample b, and `sums[b * k ..][..k]` =
/// S of sample b (for [`fm_backward`]). Runs on [`Isa::selected`].
pub fn fm_forward<'t>(
    num_fields: usize,
    k: usize,
    field: impl Fn(usize) -> FmField<'t> + Sync,
    bias: f32,
    sums: &mut [f32],
    out: &mut [f32],
    par: Par,
) {
    let isa = Isa::selected();
    fm_forward_with_isa(isa, num_fields, k, field, bias, sums, out, par)
}

/// [`fm_forward`] on `isa` (panics if the CPU lacks it).
#[allow(clippy::too_many_arguments)]
pub fn fm_forward_with_isa<'t>(
    isa: Isa,
    num_fields: usize,
    k: usize,
    field: impl Fn(usize) -> FmField<'t> + Sync,
    bias: f32,
    sums: &mut [f32],
    out: &mut [f32],
    par: Par,
) {
    const WHO: &str = "fm_forward";
    let batch = out.len();
    let mut work = 0;
    for t in 0..num_fields {
        let f = field(t);
        assert_eq!(
            f.bags.len(),
            batch,
            "{WHO}: field {t} has {} bags for {batch} outputs",
            f.bags.len()
        );
        f.check(k, WHO);
        work += f.bags.indices().len() * (k + 1);
    }
    assert_eq!(
        sums.len(),
        batch * k,
        "{WHO}: sums has {} floats for {batch} samples of {k}",
        sums.len()
    );
    if batch == 0 {
        return;
    }
    let leaf = |r: Range<usize>, (s, o): (&mut [f32], &mut [f32])| {
        let lo = r.start;
        dispatch!(isa, V => for b in r {
            let s = &mut s[(b - lo) * k..][..k];
            o[b - lo] = bias + sample::<V>(num_fields, k, &field, b, s);
        })
    };
    join_ranges(
        0..batch,
        task_grain(batch, should_split(par, work, MIN_PARALLEL_FLOATS)),
        (sums, out),
        &|(s, o): (&mut [f32], &mut [f32]), lo, mid| {
            let (s0, s1) = split_rows(s, k, mid - lo);
            let (o0, o1) = split_rows(o, 1, mid - lo);
            ((s0, o0), (s1, o1))
        },
        &leaf,
    );
}

/// First- plus second-order term of sample `b`, and its S in `s` (k floats): column blocks of
/// up to MAX_NV vectors, each a pass over the sample's features with its accumulators in
/// registers. The blocks' terms are added in block order.
#[inline(always)]
fn sample<'t, V: SimdVec>(
    num_fields: usize,
    k: usize,
    field: &impl Fn(usize) -> FmField<'t>,
    b: usize,
    s: &mut [f32],
) -> f32 {
    let mut term = 0.0;
    let lanes = V::LANES;
    for (blk, s) in s.chunks_mut(MAX_NV * lanes).enumerate() {
        let col = blk * MAX_NV * lanes;
        let nv = s.len().div_ceil(lanes);
        let tail = s.len() - (nv - 1) * lanes;
        let first = blk == 0;
        term += match nv {
            1 => block::<V, 1>(num_fields, k, field, b, (col, tail), first, s),
            2 => block::<V, 2>(num_fields, k, field, b, (col, tail), first, s),
            3 => block::<V, 3>(num_fields, k, field, b, (col, tail), first, s),
            4 => block::<V, 4>(num_fields, k, field, b, (col, tail), first, s),
            nv => unreachable!("{nv} vectors in a block of at most {MAX_NV}"),
        };
    }
    term
}

/// Columns `col .. col + (NV - 1) LANES + tail` of sample b (the block `(col, tail)`): S of
/// those columns into `s`, and their part of 1/2 sum_f (S_f^2 - sum_p (x_p v_pf)^2), plus the
/// first-order term when `first` (the first block).
#[inline(always)]
fn block<'t, V: SimdVec, const NV: usize>(
    num_fields: usize,
    k: usize,
    field: &impl Fn(usize) -> FmField<'t>,
    b: usize,
    (col, tail): (usize, usize),
    first: bool,
    s: &mut [f32],
) -> f32 {
    let lanes = V::LANES;
    let width = (NV - 1) * lanes + tail;
    let mut sum = [V::splat(0.0); NV];
    let mut sq = [V::splat(0.0); NV];
    let mut linear = 0.0f32;
    for t in 0..num_fields {
        let f = field(t);
        let ids = f.bags.indices();
        for p in f.bags.bag(b) {
            if let Some(&ahead) = ids.get(p + PREFETCH_DISTANCE) {
                prefetch_lines(
                    f.factors.as_ptr().wrapping_add(ahead as usize * k + col),
                    width,
                    prefetch_read,
                );
            }
            let id = ids[p] as usize;
            let x = f.bags.weights().map_or(1.0, |w| w[p]);
            let row = &f.factors[id * k + col..][..width];
            let xv = V::splat(x);
            for v in 0..NV {
                // SAFETY: row holds width floats: LANES at v * LANES for v < NV - 1, tail
                // for the last vector.
                let r = unsafe {
                    if v + 1 < NV || tail == lanes {
                        V::load(row.as_ptr().add(v * lanes))
                    } else {
                        V::load_partial(row.as_ptr().add(v * lanes), tail)
                    }
                };
                let e = r * xv;
                sum[v] += e;
                sq[v] = e.mul_add(e, sq[v]);
            }
            if first {
                linear += x * f.linear[id];
            }
        }
    }
    let mut second = V::splat(0.0);
    for (v, (sv, qv)) in sum.iter().zip(&sq).enumerate() {
        second += sv.mul_sub(*sv, *qv);
        sv.store_to(&mut s[v * lanes..width]);
    }
    linear + 0.5 * second.reduce_add()
}

/// Backward of one field: from the output gradient `grad_out` (one per sample) and the sums S
/// of the forward (`sums`: one row of k per sample), `grad_rows[p * k ..][..k]` = dL/dv of
/// position p (rows x k per position, in position order), and, when given,
/// `grad_weights[p]` = dL/dx_p (the gradient of the feature value). Runs on
/// [`Isa::selected`].
pub fn fm_backward(
    field: FmField,
    sums: MatRef,
    grad_out: &[f32],
    grad_rows: &mut [f32],
    grad_weights: Option<&mut [f32]>,
    par: Par,
) {
    let isa = Isa::selected();
    fm_backward_with_isa(isa, field, sums, grad_out, grad_rows, grad_weights, par)
}

/// [`fm_backward`] on `isa` (panics if the CPU lacks it).
pub fn fm_backward_with_isa(
    isa: Isa,
    field: FmField,
    sums: MatRef,
    grad_out: &[f32],
    grad_rows: &mut [f32],
    grad_weights: Option<&mut [f32]>,
    par: Par,
) {
    const WHO: &str = "fm_backward";
    let k = sums.cols();
    field.check(k, WHO);
    let bags = field.bags;
    let batch = bags.len();
    assert_eq!(
        grad_out.len(),
        batch,
        "{WHO}: {} output gradients for {batch} bags",
        grad_out.len()
    );
    check_view(sums, batch, k, "sums", WHO);
    let (sum_stride, sums) = (sums.row_stride(), sums.as_slice());
    let nnz = bags.indices().len();
    assert_eq!(
        grad_rows.len(),
        nnz * k,
        "{WHO}: grad_rows has {} floats for {nnz} positions of {k}",
        grad_rows.len()
    );
    if let Some(gw) = &grad_weights {
        assert_eq!(
            gw.len(),
            nnz,
            "{WHO}: grad_weights has {} values for {nnz} positions",
            gw.len()
        );
    }
    if batch == 0 {
        return;
    }
    let leaf = |r: Range<usize>, (rows, mut gw): (&mut [f32], Option<&mut [f32]>)| {
        let p0 = bags.bag(r.start).start;
        dispatch!(isa, V => for b in r {
            let s = &sums[b * sum_stride..][..k];
            let g = grad_out[b];
            for p in bags.bag(b) {
                let id = bags.indices()[p] as usize;
                let x = bags.weights().map_or(1.0, |w| w[p]);
                let v = &field.factors[id * k..][..k];
                let out = &mut rows[(p - p0) * k..][..k];
                // r = S - x v, stored in out first: it also gives <v, r> for dL/dx.
                let xv = V::splat(x);
                for ((oc, sc), vc) in out
                    .chunks_mut(V::LANES)
                    .zip(s.chunks(V::LANES))
                    .zip(v.chunks(V::LANES))
                {
                    V::from_slice(vc)
                        .mul_neg_add(xv, V::from_slice(sc))
                        .store_to(oc);
                }
                if let Some(gw) = gw.as_deref_mut() {
                    gw[p - p0] = g * (field.linear[id] + dot_lanes::<V>(v, out));
                }
                let gx = V::splat(g * x);
                for oc in out.chunks_mut(V::LANES) {
                    (V::from_slice(oc) * gx).store_to(oc);
                }
            }
        })
    };
    let parallel = should_split(par, nnz * k * 3, MIN_PARALLEL_FLOATS);
    join_ranges(
        0..batch,
        task_grain(batch, parallel),
        (grad_rows, grad_weights),
        &|(rows, gw): (&mut [f32], Option<&mut [f32]>), lo, mid| {
            let n = bags.bag(mid).start - bags.bag(lo).start;
            let (r0, r1) = split_rows(rows, k, n);
            let (w0, w1) = match gw {
                Some(w) => {
                    let (a, b) = split_rows(w, 1, n);
                    (Some(a), Some(b))
                }
                None => (None, None),
            };
            ((r0, w0), (r1, w1))
        },
        &leaf,
    );
}
