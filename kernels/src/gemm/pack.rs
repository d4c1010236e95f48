//! Packing: copying a block of A or B into the order in which the microkernel reads it, so the
//! k loop walks two contiguous streams (Goto & van de Geijn 2008). Edges are zero-padded to a
//! full MR / NR, which lets the microkernel use full-width loads everywhere.
//!
//! Both operands pack the same way: a micro-panel is `width` lines (rows of A, columns of B)
//! interleaved k step by k step, `panel[p * width + r] = line r at step p`. Depending on which
//! stride of the source is 1, that is a vector copy per k step (lines contiguous across r) or
//! a LANES x LANES in-register transpose (lines contiguous along p).

use super::MatRef;
use crate::simd::{MAX_LANES, SimdVec};

/// Packs `a` (mc x kc) into `dst` as ceil(mc / MR) micro-panels of MR x kc. Elements where
/// `mask` is not positive are packed as 0: this is how the ReLU backward mask dY * [Y > 0] is
/// fused into the read of dY.
pub fn pack_a<V: SimdVec, const MR: usize>(a: MatRef, mask: Option<MatRef>, dst: &mut [f32]) {
    let (mc, kc) = (a.rows(), a.cols());
    if let Some(m) = &mask {
        assert_eq!((m.rows(), m.cols()), (mc, kc));
    }
    let panels = mc.div_ceil(MR);
    assert!(dst.len() >= panels * MR * kc);
    for (q, panel) in dst.chunks_exact_mut(MR * kc).take(panels).enumerate() {
        let i0 = q * MR;
        let rows = MR.min(mc - i0);
        pack_panel::<V>(
            a.sub(i0, 0, rows, kc),
            mask.map(|m| m.sub(i0, 0, rows, kc)),
            panel,
            MR,
        );
    }
}

/// Packs `b` (kc x nc) into `dst` as ceil(nc / nr) micro-panels of kc x nr.
pub fn pack_b<V: SimdVec>(b: MatRef, nr: usize, dst: &mut [f32]) {
    let panels = b.cols().div_ceil(nr);
    assert!(dst.len() >= panels * nr * b.rows());
    for (q, panel) in dst.chunks_exact_mut(nr * b.rows()).take(panels).enumerate() {
        pack_b_panel::<V>(b, q * nr, nr, panel);
    }
}

/// Packs the `nr` columns of `b` starting at `j0` into one micro-panel (kc x nr).
pub fn pack_b_panel<V: SimdVec>(b: MatRef, j0: usize, nr: usize, panel: &mut [f32]) {
    let cols = nr.min(b.cols() - j0);
    pack_panel::<V>(b.sub(0, j0, b.rows(), cols).t(), None, panel, nr);
}

/// `panel[p * width + r] = src(r, p)` (0 where `mask(r, p) <= 0`) for the `src.rows() <= width`
/// lines, zero for the padding lines up to `width`. Compiled for `V`'s level (a parallel task
/// runs it).
fn pack_panel<V: SimdVec>(src: MatRef, mask: Option<MatRef>, panel: &mut [f32], width: usize) {
    V::vectorize(
        #[inline(always)]
        || pack_panel_body::<V>(src, mask, panel, width),
    )
}

/// The body of [`pack_panel`].
#[inline(always)]
fn pack_panel_body<V: SimdVec>(src: MatRef, mask: Option<MatRef>, panel: &mut [f32], width: usize) {
    let (lines, kc) = (src.rows(), src.cols());
    let panel = &mut panel[..width * kc];
    if lines < width {
        panel.fill(0.0);
    }
    let unit = |rs: bool| {
        let s = |m: &MatRef| if rs { m.row_stride() } else { m.col_stride() };
        s(&src) == 1 && mask.is_none_or(|m| s(&m) == 1)
    };
    if unit(true) {
        pack_by_copy::<V>(src, mask, panel, width);
    } else if unit(false) {
        pack_by_transpose::<V>(src, mask, panel, width);
    } else {
        for p in 0..kc {
            for r in 0..lines {
                let keep = mask.is_none_or(|m| m.get(r, p) > 0.0);
                panel[p * width + r] = if keep { src.get(r, p) } else { 0.0 };
            }
        }
    }
}

/// `src` lines are contiguous across r (a transposed view): one vector copy per k step. The
/// step's source (and mask) row is sliced once and walked a vector at a time: this is the
/// packing of both operands of every dW (dY^T and X), where per-vector indexing cost as much
/// as the copy.
#[inline(always)]
fn pack_by_copy<V: SimdVec>(src: MatRef, mask: Option<MatRef>, panel: &mut [f32], width: usize) {
    let lines = src.rows();
    let (st, mt) = (src.t(), mask.map(|m| m.t()));
    let zero = V::splat(0.0);
    for (p, out) in panel.chunks_exact_mut(width).enumerate() {
        let (x_row, out) = (st.row_slice(p, 0, lines), &mut out[..lines]);
        let pieces = x_row.chunks(V::LANES).zip(out.chunks_mut(V::LANES));
        match &mt {
            None => pieces.for_each(|(x, o)| V::from_slice(x).store_to(o)),
            Some(m) => {
                let m_row = m.row_slice(p, 0, lines).chunks(V::LANES);
                for ((x, o), y) in pieces.zip(m_row) {
                    keep_positive(V::from_slice(y), V::from_slice(x), zero).store_to(o);
                }
            }
        }
    }
}

/// `src` lines are contiguous along p (row-major A, or W for B = W^T): LANES x LANES blocks are
/// loaded a line per vector, transposed in registers and stored a k step per vector.
#[inline(always)]
fn pack_by_transpose<V: SimdVec>(
    src: MatRef,
    mask: Option<MatRef>,
    panel: &mut [f32],
    width: usize,
) {
    let (lines, kc) = (src.rows(), src.cols());
    let zero = V::splat(0.0);
    let lanes = V::LANES;
    for p0 in (0..kc).step_by(lanes) {
        let w = lanes.min(kc - p0);
        for r0 in (0..lines).step_by(lanes) {
            let n = lanes.min(lines - r0);
            let mut blk = [zero; MAX_LANES];
            let blk = &mut blk[..lanes];
            for (r, v) in blk.iter_mut().enumerate().take(n) {
                let x = V::from_slice(src.row_slice(r0 + r, p0, w));
                *v = match &mask {
                    None => x,
                    Some(m) => keep_positive(V::from_slice(m.row_slice(r0 + r, p0, w)), x, zero),
                };
            }
            V::transpose(blk);
            for (l, v) in blk.iter().enumerate().take(w) {
                let at = (p0 + l) * width + r0;
                v.store_to(&mut panel[at..at + n]);
            }
        }
    }
}

/// x where y > 0, else 0 (the compare gives all-ones lanes, so AND selects).
#[inline(always)]
fn keep_positive<V: SimdVec>(y: V, x: V, zero: V) -> V {
    y.simd_gt(zero) & x
}
