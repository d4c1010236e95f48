//! Feature interaction of DLRM: the fused pairwise dot products, and concatenation.
//!
//! Layout (Naumov et al. 2019, "Deep Learning Recommendation Model for Personalization and
//! Recommendation Systems", section 2.1): per sample, the F = 1 + tables feature vectors of
//! width d lie contiguous in row b of `features` (element i * d + k); vector 0 is the bottom
//! MLP's output, vector t + 1 the pooled embedding of table t. The dot interaction writes the
//! top MLP's input row `[f_0 | <f_i, f_j> for the pairs]`, the pairs in the order of the
//! PyTorch reference, row-major lower triangle: `for i in 0..F { for j in 0..i }` (`0..=i`
//! with self-interaction), see [`pairs`].
//!
//! Forward: SIMD runs across d (one vector holds d = 16 under AVX-512; longer vectors take
//! several, a tail of d is a masked load). The lower triangle is covered by register tiles of
//! TILE_I x TILE_J pairs (4 x 4 under AVX-512): per chunk of d, TILE_I + TILE_J loads feed
//! LANES FMAs into LANES accumulators, one per pair. The horizontal sums of the LANES
//! accumulators are then done together by a transposing reduction
//! (`SimdVec::transpose_sum`: log2(LANES) rounds of shuffle + add leave the LANES sums in
//! one vector), and each tile row
//! is copied straight into its place in the output row: neither the F x F Gram matrix nor a
//! concatenation buffer exists in memory.
//!
//! Backward: with G the pair gradients scattered into an F x F matrix (zero where no pair),
//! dF = (G + G^T) F per sample, plus the pass-through of the bottom output's gradient into
//! dF_0. It is computed as a register-tiled product with SIMD across d: a tile of R rows of dF
//! by V vectors of d accumulates `coef(i, j) * F_j` over j, one loaded vector of F_j feeding
//! R FMAs whose coefficient is a broadcast memory operand read straight from the pair
//! gradients: left of the tile's diagonal block each row reads its own row of G, right of it
//! the R coefficients are consecutive in row j of G, and only the R x R diagonal block is
//! gathered into a small array. G + G^T is never materialised.
//!
//! Samples are independent: large batches are split over the current rayon pool in fixed
//! chunks of samples, and every output element is computed by the same operations whatever
//! the thread count.

use crate::isa::Isa;
use crate::mat::{MatMut, MatRef};
use crate::parallel::{Par, should_split};
use crate::simd::{SimdVec, dispatch};
use rayon::prelude::*;

/// Samples per parallel task.
pub const SAMPLES_PER_TASK: usize = 32;
/// Smallest work (multiply-adds, or floats copied) that is split across threads.
pub const MIN_PARALLEL_WORK: usize = 1 << 18;
/// Rows of dF per register tile of the backward.
const TILE_ROWS: usize = 4;
/// Rows of dF per register tile of the backward when d fits one vector.
const TILE_ROWS_ONE_VEC: usize = 8;
/// Vectors of d per register tile of the backward: TILE_ROWS x TILE_VECS accumulators plus
/// TILE_VECS loaded vectors must fit the register file (32 vector registers with AVX-512,
/// 16 with AVX2).
const fn tile_vecs(lanes: usize) -> usize {
    if lanes >= 16 { 4 } else { 2 }
}

/// Number of pairwise products of `f` feature vectors: F(F-1)/2, or F(F+1)/2 with
/// self-interaction.
pub fn num_pairs(f: usize, self_interaction: bool) -> usize {
    if self_interaction {
        f * (f + 1) / 2
    } else {
        f * f.saturating_sub(1) / 2
    }
}

/// The pairs (i, j) in output order: `for i in 0..f { for j in 0..i }`, or `0..=i` with
/// self-interaction (facebookresearch/dlrm, `interact_features`).
pub fn pairs(f: usize, self_interaction: bool) -> Pairs {
    Pairs {
        f,
        diag: usize::from(self_interaction),
        i: 0,
        j: 0,
    }
}

/// Iterator over the interaction pairs; see [`pairs`].
#[derive(Clone, Debug)]
pub struct Pairs {
    f: usize,
    /// 1 if pair (i, i) is included.
    diag: usize,
    i: usize,
    j: usize,
}

impl Iterator for Pairs {
    type Item = (usize, usize);

    #[inline(always)]
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.i >= self.f {
            return None;
        }
        while self.j >= self.i + self.diag {
            self.i += 1;
            self.j = 0;
            if self.i >= self.f {
                return None;
            }
        }
        let p = (self.i, self.j);
        self.j += 1;
        Some(p)
    }
}

/// Position of pair (i, 0) in the pair list.
#[inline(always)]
fn row_offset(i: usize, self_interaction: bool) -> usize {
    num_pairs(i, self_interaction)
}

/// Calls `body(b, row)` for each row of `dst`, splitting the rows over the current pool in
/// fixed chunks when `rows * work_per_row` is large under `par`; each chunk runs compiled for
/// `V`'s level.
fn for_each_row<V: SimdVec>(
    par: Par,
    dst: MatMut,
    work_per_row: usize,
    body: impl Fn(usize, &mut [f32]) + Sync,
) {
    let (rows, width, stride) = (dst.rows(), dst.cols(), dst.row_stride());
    if rows == 0 || width == 0 {
        return;
    }
    let dst = dst.into_slice();
    let run = |r0: usize, chunk: &mut [f32]| {
        V::vectorize(
            #[inline(always)]
            || {
                for (q, row) in chunk.chunks_mut(stride).enumerate() {
                    body(r0 + q, &mut row[..width]);
                }
            },
        )
    };
    if should_split(par, rows.saturating_mul(work_per_row), MIN_PARALLEL_WORK) {
        dst.par_chunks_mut(SAMPLES_PER_TASK * stride)
            .enumerate()
            .for_each(|(t, chunk)| run(t * SAMPLES_PER_TASK, chunk));
    } else {
        run(0, dst);
    }
}

/// Fused dot interaction: per sample, the lower triangle of the F x F Gram matrix computed in
/// registers and written straight after the copied bottom output; no F x F matrix in memory,
/// no separate concatenation. Parallel over samples when large.
///
/// `features` is batch x F d (F = `f` vectors of width d per row), `out` batch x
/// (d + num_pairs(f, self_interaction)); padding between `out`'s rows is left untouched.
/// Runs on [`Isa::selected`].
pub fn dot_interaction_forward(
    features: MatRef,
    f: usize,
    self_interaction: bool,
    out: MatMut,
    par: Par,
) {
    dot_interaction_forward_with_isa(Isa::selected(), features, f, self_interaction, out, par)
}

/// [`dot_interaction_forward`] on `isa` (panics if the CPU lacks it).
pub fn dot_interaction_forward_with_isa(
    isa: Isa,
    features: MatRef,
    f: usize,
    self_interaction: bool,
    out: MatMut,
    par: Par,
) {
    const K: &str = "dot_interaction_forward";
    let (batch, d) = feature_shape(K, features, f);
    let np = num_pairs(f, self_interaction);
    check_rows(K, "out", out.as_ref(), batch, d + np);
    let (x, xs) = (features.as_slice(), features.row_stride());
    dispatch!(isa, V => for_each_row::<V>(par, out, np * d, #[inline(always)] |b, row| {
        let x = &x[b * xs..][..f * d];
        let (bottom, dots) = row.split_at_mut(d);
        bottom.copy_from_slice(&x[..d]);
        // The tile height is a constant of V; the match makes it a const parameter.
        match V::LANES / TILE_J {
            4 => forward_sample::<V, 4>(x, f, d, self_interaction, dots),
            2 => forward_sample::<V, 2>(x, f, d, self_interaction, dots),
            1 => forward_sample::<V, 1>(x, f, d, self_interaction, dots),
            rows => unreachable!("no forward tile of {rows} rows"),
        }
    }));
}

/// The batch and the width d of `features` (one row of `f` vectors of d values per sample,
/// contiguous): panics unless its rows split into `f` equal vectors.
fn feature_shape(kernel: &str, features: MatRef, f: usize) -> (usize, usize) {
    assert!(f >= 1, "{kernel}: no feature vectors (f = 0)");
    assert!(
        features.cols().is_multiple_of(f) && features.col_stride() == 1,
        "{kernel}: feature rows of {} values (column stride {}) are not {f} contiguous vectors",
        features.cols(),
        features.col_stride()
    );
    (features.rows(), features.cols() / f)
}

/// Panics unless the view `name` is `rows x cols`.
fn check_rows(kernel: &str, name: &str, view: MatRef, rows: usize, cols: usize) {
    assert!(
        view.rows() == rows && view.cols() == cols,
        "{kernel}: {name} is {}x{}, needs {rows}x{cols}",
        view.rows(),
        view.cols()
    );
}

/// The pair dot products of one sample (`x` holds its F x d features), written to `dots` in
/// pair order, one TILE_I x TILE_J block of the lower triangle at a time (TILE_I = LANES /
/// TILE_J, so that the block's dot products fill one vector).
#[inline(always)]
fn forward_sample<V: SimdVec, const TILE_I: usize>(
    x: &[f32],
    f: usize,
    d: usize,
    self_interaction: bool,
    dots: &mut [f32],
) {
    let row_len = |i: usize| i + usize::from(self_interaction);
    // Rows and columns past the last vector (in the last blocks) read vector f - 1 instead;
    // their results are not stored.
    let vector = |i: usize| x.as_ptr().wrapping_add(i.min(f - 1) * d);
    for i0 in (0..f).step_by(TILE_I) {
        let rows = TILE_I.min(f - i0);
        for j0 in (0..row_len(i0 + rows - 1)).step_by(TILE_J) {
            let vi: [*const f32; TILE_I] = core::array::from_fn(|r| vector(i0 + r));
            let vj: [*const f32; TILE_J] = core::array::from_fn(|c| vector(j0 + c));
            // SAFETY: every pointer is one of the f vectors of d floats in x.
            let sums = unsafe { tile_dots::<V, TILE_I>(vi, vj, d) }.to_lanes();
            for r in 0..rows {
                let len = row_len(i0 + r);
                if len <= j0 {
                    continue;
                }
                let src = &sums[r * TILE_J..][..TILE_J];
                let dst = &mut dots[row_offset(i0 + r, self_interaction) + j0..];
                // Copies of constant length compile to a move or two (a variable-length copy
                // would be a call to memcpy).
                match len - j0 {
                    1 => dst[..1].copy_from_slice(&src[..1]),
                    2 => dst[..2].copy_from_slice(&src[..2]),
                    3 => dst[..3].copy_from_slice(&src[..3]),
                    _ => dst[..TILE_J].copy_from_slice(src),
                }
            }
        }
    }
}

/// Columns (j) of a forward register tile.
const TILE_J: usize = 4;

/// The TILE_I x TILE_J dot products <vi[r], vj[c]> of d-vectors, lane r * TILE_J + c. The
/// elementwise products accumulate across the chunks of d in LANES registers (TILE_I + TILE_J
/// loads feed LANES FMAs per chunk; the tail chunk is a masked load), then one transposing
/// reduction sums each register.
///
/// # Safety
/// `p .. p + d` must be readable for every pointer p of `vi` and `vj`.
#[inline(always)]
unsafe fn tile_dots<V: SimdVec, const TILE_I: usize>(
    vi: [*const f32; TILE_I],
    vj: [*const f32; TILE_J],
    d: usize,
) -> V {
    debug_assert_eq!(TILE_I * TILE_J, V::LANES);
    let lanes = V::LANES;
    let mut acc = [[V::splat(0.0); TILE_J]; TILE_I];
    let mut fma = |a: [V; TILE_I], b: [V; TILE_J]| {
        for (acc_r, a) in acc.iter_mut().zip(a) {
            for (acc_rc, b) in acc_r.iter_mut().zip(b) {
                *acc_rc = a.mul_add(b, *acc_rc);
            }
        }
    };
    let mut k = 0;
    // SAFETY: (all loads) k + LANES <= d, or the d - k < LANES tail, lies inside each vector.
    unsafe {
        while k + lanes <= d {
            fma(
                core::array::from_fn(|r| V::load(vi[r].add(k))),
                core::array::from_fn(|c| V::load(vj[c].add(k))),
            );
            k += lanes;
        }
        if k < d {
            fma(
                core::array::from_fn(|r| V::load_partial(vi[r].add(k), d - k)),
                core::array::from_fn(|c| V::load_partial(vj[c].add(k), d - k)),
            );
        }
    }
    // Lane r * TILE_J + c sums acc[r][c].
    V::transpose_sum(acc.as_flattened())
}

/// Backward of [`dot_interaction_forward`]:
/// ```text
/// grad_features[b, i, :] = [i == 0] * grad_out[b, 0..d]
///   + sum over pairs p = (i, j): i != j: dF_i += g_p F_j, dF_j += g_p F_i;
///                                i == j: dF_i += 2 g_p F_i
/// ```
/// i.e. (G + G^T) F per sample with G the pair gradients scattered to F x F, computed without
/// materialising G. `grad_features` is overwritten (padding between rows is left untouched);
/// it has the layout of `features`, with its own stride. Runs on [`Isa::selected`].
pub fn dot_interaction_backward(
    features: MatRef,
    f: usize,
    self_interaction: bool,
    grad_out: MatRef,
    grad_features: MatMut,
    par: Par,
) {
    let isa = Isa::selected();
    dot_interaction_backward_with_isa(
        isa,
        features,
        f,
        self_interaction,
        grad_out,
        grad_features,
        par,
    )
}

/// [`dot_interaction_backward`] on `isa` (panics if the CPU lacks it).
pub fn dot_interaction_backward_with_isa(
    isa: Isa,
    features: MatRef,
    f: usize,
    self_interaction: bool,
    grad_out: MatRef,
    grad_features: MatMut,
    par: Par,
) {
    const K: &str = "dot_interaction_backward";
    let (batch, d) = feature_shape(K, features, f);
    let np = num_pairs(f, self_interaction);
    check_rows(K, "grad_out", grad_out, batch, d + np);
    check_rows(K, "grad_features", grad_features.as_ref(), batch, f * d);
    assert_eq!(
        grad_out.col_stride(),
        1,
        "{K}: grad_out columns are not contiguous"
    );
    let (x, xs) = (features.as_slice(), features.row_stride());
    let (g, gs) = (grad_out.as_slice(), grad_out.row_stride());
    dispatch!(isa, V => for_each_row::<V>(par, grad_features, f * f * d, #[inline(always)] |b, row| {
        let s = Sample {
            x: &x[b * xs..][..f * d],
            g: &g[b * gs..][..d + np],
            f,
            d,
            self_interaction,
        };
        s.backward::<V>(row);
    }));
}

/// One sample of the backward: its features `x` (F x d) and its output gradient `g`
/// (`[d pass-through values | one per pair]`).
struct Sample<'a> {
    x: &'a [f32],
    g: &'a [f32],
    f: usize,
    d: usize,
    self_interaction: bool,
}

impl Sample<'_> {
    /// Writes dF (F x d) into `out`, one register tile at a time: up to TILE_VECS vectors of
    /// d by up to TILE_ROWS rows (TILE_ROWS_ONE_VEC when d fits one vector, so that the tile
    /// still runs 8 independent FMA chains: FMA latency 4 x 2 FMA ports). When the rows do
    /// not divide F, the last tile overlaps the one before: each row is computed by the same
    /// operations in the same order (j = 0, 1, ...) whatever its tile, so rewriting one
    /// changes no bit.
    #[inline(always)]
    fn backward<V: SimdVec>(&self, out: &mut [f32]) {
        let (f, d) = (self.f, self.d);
        let mut k0 = 0;
        while k0 < d {
            let len = (tile_vecs(V::LANES) * V::LANES).min(d - k0);
            let nv = len.div_ceil(V::LANES);
            let want = if nv == 1 {
                TILE_ROWS_ONE_VEC
            } else {
                TILE_ROWS
            };
            let rows = [8, 4, 2, 1]
                .into_iter()
                .find(|&r| r <= want && r <= f)
                .expect("f >= 1");
            for i0 in (0..f).step_by(rows) {
                let i0 = i0.min(f - rows);
                macro_rules! tile_shapes {
                    ($(($r:literal, $v:literal))*) => {
                        match (rows, nv) {
                            $(($r, $v) => self.tile::<V, $r, $v>(i0, k0, len, out),)*
                            _ => unreachable!("no tile of {rows} rows x {nv} vectors"),
                        }
                    };
                }
                tile_shapes!(
                    (8, 1)(4, 1)(4, 2)(4, 3)(4, 4)(2, 1)(2, 2)(2, 3)(2, 4)(1, 1)(1, 2)(1, 3)(1, 4)
                );
            }
            k0 += len;
        }
    }

    /// dF rows i0 .. i0 + R, columns k0 .. k0 + len (NV = ceil(len / LANES) vectors):
    /// sum over j of coef(i, j) F_j[k0 ..], plus the pass-through on row 0.
    #[inline(always)]
    fn tile<V: SimdVec, const R: usize, const NV: usize>(
        &self,
        i0: usize,
        k0: usize,
        len: usize,
        out: &mut [f32],
    ) {
        let (f, d, si) = (self.f, self.d, self.self_interaction);
        assert!(i0 + R <= f && k0 + len <= d && len.div_ceil(V::LANES) == NV);
        let np = num_pairs(f, si);
        assert!(out.len() >= f * d && self.x.len() >= f * d && self.g.len() >= d + np);
        let tail = len - (NV - 1) * V::LANES;
        let x = self.x.as_ptr().wrapping_add(k0);
        let g = self.g.as_ptr();
        let mut acc = [[V::splat(0.0); NV]; R];
        if i0 == 0 {
            // SAFETY: g holds d >= k0 + len floats (asserted above).
            acc[0] = unsafe { load_vecs::<V, NV>(g.add(k0), tail) };
        }
        // Columns left of the tile: coef(i, j) = g_pair(i, j), contiguous along each row i.
        let row: [*const f32; R] =
            core::array::from_fn(|r| g.wrapping_add(d + row_offset(i0 + r, si)));
        for j in 0..i0 {
            // SAFETY: j < i0 <= i, so pair (i, j) is one of the g.len() - d pairs; j < f, so
            // F_j[k0 .. k0 + len] lies inside x (asserted above).
            unsafe { fma_rows::<V, R, NV>(&mut acc, |r| *row[r].add(j), x.add(j * d), tail) };
        }
        // The diagonal block: its R x R coefficients gathered once (column-major: block[c][r]
        // is coef(i0 + r, i0 + c)), then read like the others.
        let mut block = [[0.0f32; R]; R];
        for a in 0..R {
            let row = &self.g[d + row_offset(i0 + a, si) + i0..];
            for b in 0..a {
                block[a][b] = row[b];
                block[b][a] = row[b];
            }
            if si {
                block[a][a] = 2.0 * row[a];
            }
        }
        for (c, coefs) in block.iter().enumerate() {
            // SAFETY: as above, i0 + c < i0 + R <= f.
            unsafe { fma_rows::<V, R, NV>(&mut acc, |r| coefs[r], x.add((i0 + c) * d), tail) };
        }
        // Columns right of the tile: coef(i, j) = g_pair(j, i), R consecutive values.
        for j in i0 + R..f {
            let col = g.wrapping_add(d + row_offset(j, si) + i0);
            // SAFETY: i0 + r < i0 + R <= j < f, so pair (j, i0 + r) is one of the pairs in g;
            // F_j lies inside x as above.
            unsafe { fma_rows::<V, R, NV>(&mut acc, |r| *col.add(r), x.add(j * d), tail) };
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let dst = &mut out[(i0 + r) * d + k0..][..len];
            // SAFETY: dst holds len = (NV - 1) * LANES + tail writable floats.
            unsafe { store_vecs(dst.as_mut_ptr(), acc_r, tail) };
        }
    }
}

/// `acc[r][v] += coef(r) * x[v]` for the NV vectors at `x` (the last one `tail` floats long).
/// The coefficients are read after the vectors are loaded, so that each read folds into its
/// FMA as a broadcast operand.
///
/// # Safety
/// `x .. x + (NV - 1) * LANES + tail` must be readable, and `coef` safe to call for r < R.
#[inline(always)]
unsafe fn fma_rows<V: SimdVec, const R: usize, const NV: usize>(
    acc: &mut [[V; NV]; R],
    coef: impl Fn(usize) -> f32,
    x: *const f32,
    tail: usize,
) {
    // SAFETY: forwarded from the caller.
    let xv = unsafe { load_vecs::<V, NV>(x, tail) };
    for (r, acc_r) in acc.iter_mut().enumerate() {
        let c = V::splat(coef(r));
        for (a, &xv) in acc_r.iter_mut().zip(&xv) {
            *a = c.mul_add(xv, *a);
        }
    }
}

/// NV vectors from `p`, the last one `tail <= LANES` floats long (zero-filled).
///
/// # Safety
/// `p .. p + (NV - 1) * LANES + tail` must be readable.
#[inline(always)]
unsafe fn load_vecs<V: SimdVec, const NV: usize>(p: *const f32, tail: usize) -> [V; NV] {
    let lanes = V::LANES;
    // SAFETY: vector v < NV - 1 lies below the last one; the last reads `tail` floats.
    core::array::from_fn(|v| unsafe {
        if v + 1 < NV || tail == lanes {
            V::load(p.add(v * lanes))
        } else {
            V::load_partial(p.add(v * lanes), tail)
        }
    })
}

/// Stores NV vectors to `p`, the last one `tail <= LANES` floats long.
///
/// # Safety
/// `p .. p + (NV - 1) * LANES + tail` must be writable.
#[inline(always)]
unsafe fn store_vecs<V: SimdVec, const NV: usize>(p: *mut f32, v: &[V; NV], tail: usize) {
    let lanes = V::LANES;
    for (q, &x) in v.iter().enumerate() {
        // SAFETY: vector q < NV - 1 lies below the last one; the last writes `tail` floats.
        unsafe {
            if q + 1 < NV || tail == lanes {
                V::store(p.add(q * lanes), x);
            } else {
                V::store_partial(p.add(q * lanes), tail, x);
            }
        }
    }
}

/// "cat" interaction: the top MLP's input row is the F * d feature values of the sample
/// (`out` has the shape of `features`).
pub fn cat_interaction_forward(features: MatRef, out: MatMut, par: Par) {
    copy_rows("cat_interaction_forward", features, out, par);
}

/// Backward of [`cat_interaction_forward`]: the gradient rows are copied back to the feature
/// layout (`grad_features` is overwritten).
pub fn cat_interaction_backward(grad_out: MatRef, grad_features: MatMut, par: Par) {
    copy_rows("cat_interaction_backward", grad_out, grad_features, par);
}

/// dst row b = src row b, rows split over threads when large.
fn copy_rows(kernel: &str, src: MatRef, dst: MatMut, par: Par) {
    check_rows(kernel, "destination", dst.as_ref(), src.rows(), src.cols());
    assert_eq!(
        src.col_stride(),
        1,
        "{kernel}: source columns are not contiguous"
    );
    let (s, ss, width) = (src.as_slice(), src.row_stride(), src.cols());
    dispatch!(Isa::selected(), V => for_each_row::<V>(par, dst, width, |b, row| {
        row.copy_from_slice(&s[b * ss..][..width]);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_follow_the_reference_order_and_count() {
        for f in 0..8 {
            for si in [false, true] {
                let mut want = Vec::new();
                for i in 0..f {
                    for j in 0..i + usize::from(si) {
                        want.push((i, j));
                    }
                }
                let got: Vec<_> = pairs(f, si).collect();
                assert_eq!(got, want);
                assert_eq!(num_pairs(f, si), want.len());
                for (p, &(i, j)) in want.iter().enumerate() {
                    assert_eq!(row_offset(i, si) + j, p);
                }
            }
        }
    }
}
