//! B packed once for many products that share it: a layer's weights are the B operand of the
//! forward (W^T) and of dX (W) in every row chunk of a batch, so packing them once per step
//! instead of once per chunk saves the repeated copies (Goto & van de Geijn 2008 pack B per
//! kc x nc block; here all blocks are kept, in the order the tiled GEMM walks them).

use super::bf16::{PackedPairs, gemm_rounded_bf16_prepacked};
use super::{
    BlockSizes, GemmOps, MatMut, MatRef, Path, Precision, check_operands, fuses_c_mask, gemm_tiled,
    gemm_with_isa, mask_after, pack, path, tile_nr,
};
use crate::isa::Isa;
use crate::parallel::Par;
use crate::simd::{SimdVec, dispatch};

/// A B operand (k x n) packed for the tiled GEMM of one ISA: for each nc-wide column block,
/// for each kc-deep block, its kc x nr micro-panels. Reused across steps: repacking allocates
/// only when B grows.
#[derive(Clone, Debug, Default)]
pub struct PackedB {
    /// The level the panels are laid out for (its register tile and block sizes).
    isa: Option<Isa>,
    rows: usize,
    cols: usize,
    panels: Vec<f32>,
    /// B rounded to bf16 for the [`Precision::Bf16`] products.
    pairs: PackedPairs,
}

impl PackedB {
    pub fn new() -> PackedB {
        PackedB::default()
    }

    /// Packs `b` for [`gemm_prepacked`] on [`Isa::selected`].
    pub fn pack(&mut self, b: MatRef) {
        self.pack_with_isa(Isa::selected(), b)
    }

    /// Packs `b` for [`gemm_prepacked`] on `isa` (panics if the CPU lacks it).
    pub fn pack_with_isa(&mut self, isa: Isa, b: MatRef) {
        let bs = BlockSizes::for_isa(isa);
        dispatch!(isa, V => self.pack_blocks::<V>(&bs, b));
        (self.isa, self.rows, self.cols) = (Some(isa), b.rows(), b.cols());
    }

    /// Packs `b` for the [`gemm_prepacked`] products of `precision` on [`Isa::selected`]: f32
    /// panels, or for [`Precision::Bf16`] its values rounded to bf16 in the pair layout of the
    /// BF16 product ([`PackedPairs`]). Only that packing is current afterwards.
    pub fn pack_for(&mut self, b: MatRef, precision: Precision) {
        self.pack_for_with_isa(Isa::selected(), b, precision)
    }

    /// [`PackedB::pack_for`] on `isa` (panics if the CPU lacks it).
    pub fn pack_for_with_isa(&mut self, isa: Isa, b: MatRef, precision: Precision) {
        match precision {
            Precision::F32 => {
                self.pairs.invalidate();
                self.pack_with_isa(isa, b)
            }
            Precision::Bf16 => {
                self.isa = None;
                self.pairs.pack_with_isa(isa, b)
            }
        }
    }

    fn pack_blocks<V: SimdVec>(&mut self, bs: &BlockSizes, b: MatRef) {
        let (k, n, nr) = (b.rows(), b.cols(), tile_nr::<V>(b.cols()));
        let (kc_max, nc_max) = (bs.kc_for(k), (bs.nc / nr).max(1) * nr);
        self.panels.resize(k * n.div_ceil(nr) * nr, 0.0);
        let mut at = 0;
        for jc in (0..n).step_by(nc_max) {
            let nc = nc_max.min(n - jc);
            for pc in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - pc);
                let len = kc * nc.div_ceil(nr) * nr;
                pack::pack_b::<V>(b.sub(pc, jc, kc, nc), nr, &mut self.panels[at..at + len]);
                at += len;
            }
        }
    }

    /// Whether these panels are `b`'s shape for `isa` (the values are the caller's promise).
    fn fits(&self, isa: Isa, b: &MatRef) -> bool {
        self.isa == Some(isa) && (self.rows, self.cols) == (b.rows(), b.cols())
    }
}

/// C = epilogue(A . B) as [`super::gemm`] computes it (the same bits), with B read from
/// `packed`, which must hold `b`'s values packed by [`PackedB::pack`] (or [`PackedB::pack_for`]
/// the product's precision). Products that do not run on the tiled GEMM or the BF16 product
/// (dot products, split K) or panels packed for another shape, precision or ISA fall back to
/// [`super::gemm`] on `b`.
pub fn gemm_prepacked(a: MatRef, b: MatRef, packed: &PackedB, c: MatMut, ops: &GemmOps, par: Par) {
    gemm_prepacked_with_isa(Isa::selected(), a, b, packed, c, ops, par)
}

/// [`gemm_prepacked`] on `isa` (panics if the CPU lacks it).
pub fn gemm_prepacked_with_isa(
    isa: Isa,
    a: MatRef,
    b: MatRef,
    packed: &PackedB,
    mut c: MatMut,
    ops: &GemmOps,
    par: Par,
) {
    let path = path(a, b, ops);
    if !fuses_c_mask(path, ops) {
        let unmasked = GemmOps {
            c_relu_mask: None,
            ..*ops
        };
        gemm_prepacked_with_isa(isa, a, b, packed, c.rb_mut(), &unmasked, par);
        return mask_after(c, ops.c_relu_mask);
    }
    if ops.precision == Precision::Bf16 {
        return gemm_rounded_bf16_prepacked(a, b, &packed.pairs, c, ops, isa, par);
    }
    let tiled = path == Path::Tiled;
    if !tiled || !packed.fits(isa, &b) || a.rows() == 0 || b.cols() == 0 || b.rows() == 0 {
        return gemm_with_isa(isa, a, b, c, ops, par);
    }
    check_operands(&a, &b, &c, ops);
    let bs = BlockSizes::for_isa(isa);
    let panels = &packed.panels[..];
    dispatch!(isa, V => gemm_tiled::<V>(&bs, a, b, c, ops, par, Some(panels)))
}
