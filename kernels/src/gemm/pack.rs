//! Packing: copying a block of A or B into the order in which the microkernel reads it, so the
//! k loop walks two contiguous streams (Goto & van de Geijn 2008). Edges are zero-padded to a
//! full MR / NR, which lets the microkernel use full-width loads everywhere.

use super::MatRef;

/// Packs `a` (mc x kc) into `dst` as ceil(mc / MR) micro-panels of MR x kc, each stored k-major
/// (MR consecutive values per k step). Elements where `mask` is not positive are packed as 0:
/// this is how the ReLU backward mask dY * [Y > 0] is fused into the read of dY.
pub fn pack_a<const MR: usize>(a: MatRef, mask: Option<MatRef>, dst: &mut [f32]) {
    let (mc, kc) = (a.rows(), a.cols());
    let panels = mc.div_ceil(MR);
    assert!(dst.len() >= panels * MR * kc);
    if let Some(m) = &mask {
        assert_eq!((m.rows(), m.cols()), (mc, kc));
    }
    for (q, panel) in dst.chunks_exact_mut(MR * kc).take(panels).enumerate() {
        let i0 = q * MR;
        let rows = MR.min(mc - i0);
        if rows < MR {
            panel.fill(0.0);
        }
        for i in 0..rows {
            let src = a.row_iter(i0 + i);
            match &mask {
                None => {
                    for (p, x) in src.enumerate() {
                        panel[p * MR + i] = x;
                    }
                }
                Some(m) => {
                    for (p, (x, y)) in src.zip(m.row_iter(i0 + i)).enumerate() {
                        panel[p * MR + i] = if y > 0.0 { x } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// Packs `b` (kc x nc) into `dst` as ceil(nc / nr) micro-panels of kc x nr, each stored
/// row-major (nr consecutive values per k step), zero-padded on the right edge.
pub fn pack_b(b: MatRef, nr: usize, dst: &mut [f32]) {
    let (kc, nc) = (b.rows(), b.cols());
    let panels = nc.div_ceil(nr);
    assert!(dst.len() >= panels * nr * kc);
    for (q, panel) in dst.chunks_exact_mut(nr * kc).take(panels).enumerate() {
        pack_b_panel(b, q * nr, nr, panel);
    }
}

/// Packs the `nr` columns of `b` starting at `j0` into one micro-panel (kc x nr).
pub fn pack_b_panel(b: MatRef, j0: usize, nr: usize, panel: &mut [f32]) {
    let kc = b.rows();
    let cols = nr.min(b.cols() - j0);
    if cols < nr {
        panel.fill(0.0);
    }
    if b.col_stride() == 1 {
        // Rows of B are contiguous: copy a row segment per k step.
        for (p, dst) in panel.chunks_exact_mut(nr).take(kc).enumerate() {
            dst[..cols].copy_from_slice(b.row_slice(p, j0, cols));
        }
    } else {
        // B is a transposed view (e.g. W^T): walk each column, which is contiguous in memory.
        for j in 0..cols {
            for (p, x) in b.col_iter(j0 + j).enumerate() {
                panel[p * nr + j] = x;
            }
        }
    }
}
