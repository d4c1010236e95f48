//! Mixed-precision GEMM: C (f32) = A (bf16) . B^T (bf16) + beta * C, with f32 accumulation.
//!
//! The shape is that of a layer's forward product Y = X W^T with PyTorch's W (out x in): A is
//! M x K and B is N x K, both row-major, so both are read along K.
//!
//! On AVX512-BF16 the microkernel is built on VDPBF16PS (Intel SDM pseudocode: for each f32
//! lane i, `dst[i] += a.bf16[2i+1] * b.bf16[2i+1]`, then `dst[i] += a.bf16[2i] * b.bf16[2i]`;
//! f32 arithmetic, round to nearest even, denormal inputs and outputs flushed to zero, MXCSR
//! not consulted). It consumes K in pairs, so B is packed into panels of NR columns in which each
//! 32-bit lane holds the pair (B[j, 2p], B[j, 2p+1]), and A into MR-row panels of the same
//! pairs, broadcast one row at a time; an odd K is padded with a zero. The MR x NR tile of f32
//! accumulators stays in registers (MR * NR / 16 = 24 of the 32 zmm registers).
//!
//! Throughput: VDPBF16PS does twice the FLOPs of an FMA per instruction, but on the Sapphire
//! Rapids-class core this was measured on it retires at about a quarter of the FMA rate (a
//! register-only loop of 24 independent accumulators: about 70 GFLOP/s against about 150 for
//! VFMADD231PS), so this path runs at about 0.6x the f32 GEMM on compute-bound shapes (see the
//! `gemm-bf16` benches). What it saves is operand memory and bandwidth (half of f32's); the
//! compute gain on Intel needs AMX (TDPBF16PS).
//!
//! Elsewhere (or with `DLRM_ISA=portable`), the operands are converted to f32, exactly, and
//! multiplied by the f32 [`gemm`](fn@super::gemm). The two paths differ in rounding
//! (VDPBF16PS's own intermediate rounding, and its flushing of denormals; the f32 GEMM's
//! summation order), not in what they compute; each is deterministic, and gives the same
//! bits for any thread count (threads split M only).

use super::{BlockSizes, GemmOps, MatMut, MatRef, Precision, gemm, gemm_with_blocks};
use crate::bf16::{Bf16, Isa, bf16_to_f32_slice};
use crate::parallel::{Par, should_split};
use rayon::prelude::*;

/// A row-major `rows x cols` matrix of bf16 values.
#[derive(Clone, Copy, Debug)]
pub struct Bf16Mat<'a> {
    data: &'a [Bf16],
    rows: usize,
    cols: usize,
}

impl<'a> Bf16Mat<'a> {
    /// Panics unless `data` holds exactly `rows * cols` values.
    pub fn new(data: &'a [Bf16], rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "bf16 matrix {rows}x{cols} needs {} values, slice has {}",
            rows * cols,
            data.len()
        );
        Bf16Mat { data, rows, cols }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &'a [Bf16] {
        self.data
    }

    /// Element (i, j).
    pub fn get(&self, i: usize, j: usize) -> Bf16 {
        assert!(i < self.rows && j < self.cols);
        self.data[i * self.cols + j]
    }
}

/// Rows of the AVX512-BF16 register tile.
pub const BF16_MR: usize = 12;
/// Columns of the register tile: two zmm vectors of 16 f32 lanes.
pub const BF16_NR: usize = 32;
/// K pairs per rank-KC update: a KC x NR micro-panel of B (256 pairs * 32 lanes * 4 bytes =
/// 32 KiB) stays in L1d while the MC rows of A stream past it.
const KC_PAIRS: usize = 256;
/// Rows of C per task (a multiple of MR): the packed A block (MC * KC_PAIRS * 4 bytes =
/// 96 KiB) lives in L2. A constant of the shape, so the split never depends on threads.
const MC: usize = 8 * BF16_MR;
/// Smallest product (in FLOPs) split across threads.
const MIN_PARALLEL_FLOPS: usize = 1 << 21;

/// C = A . B^T + beta * C, where A is M x K, B is N x K (bf16) and C is M x N (f32); with
/// beta = 0, C is only written. Accumulates in f32 on `isa` (pass [`Isa::selected`]).
///
/// Panics on mismatched shapes, or if the CPU does not support `isa`.
pub fn gemm_bf16(a: Bf16Mat, b: Bf16Mat, beta: f32, c: MatMut, isa: Isa, par: Par) {
    let (m, k, n) = (a.rows, a.cols, b.rows);
    assert_eq!(b.cols, k, "gemm_bf16: A is {m}x{k} but B is {n}x{}", b.cols);
    assert_eq!(
        (c.rows, c.cols),
        (m, n),
        "gemm_bf16: C is {}x{}, the product is {m}x{n}",
        c.rows,
        c.cols
    );
    isa.assert_supported();
    if m == 0 || n == 0 {
        return;
    }
    match isa {
        // K = 0: the product is zero and C = beta * C, which the f32 GEMM's epilogue does.
        _ if k == 0 => gemm_bf16_portable(a, b, beta, c, par),
        Isa::Portable => gemm_bf16_portable(a, b, beta, c, par),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => gemm_bf16_avx512(a, b, beta, c, par),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512Bf16 => unreachable!("asserted unsupported"),
    }
}

/// The operands converted to f32 (exact) and multiplied by the f32 GEMM.
fn gemm_bf16_portable(a: Bf16Mat, b: Bf16Mat, beta: f32, c: MatMut, par: Par) {
    let widen = |x: Bf16Mat| {
        let mut out = vec![0.0f32; x.data.len()];
        bf16_to_f32_slice(x.data, &mut out, Isa::Portable);
        out
    };
    let (a32, b32) = (widen(a), widen(b));
    let ops = GemmOps {
        beta,
        ..GemmOps::default()
    };
    gemm(
        MatRef::new(&a32, a.rows, a.cols),
        MatRef::new(&b32, b.rows, b.cols).t(),
        c,
        &ops,
        par,
    );
}

/// [`Precision::Bf16`] for [`gemm_with_blocks`]: op(A) ⊙ [mask > 0] and op(B) rounded to bf16
/// (held exactly as f32), then multiplied by the f32 GEMM: a product of two bf16 values is
/// exact in f32, so this is bf16 operands with f32 accumulation.
pub(super) fn gemm_rounded(
    bs: &BlockSizes,
    a: MatRef,
    b: MatRef,
    c: MatMut,
    ops: &GemmOps,
    par: Par,
) {
    let (a_data, a_trans) = round_to_bf16(a, ops.a_relu_mask);
    let (b_data, b_trans) = round_to_bf16(b, None);
    fn view(data: &[f32], rows: usize, cols: usize, trans: bool) -> MatRef<'_> {
        if trans {
            MatRef::new(data, cols, rows).t()
        } else {
            MatRef::new(data, rows, cols)
        }
    }
    let f32_ops = GemmOps {
        a_relu_mask: None,
        precision: Precision::F32,
        ..*ops
    };
    gemm_with_blocks(
        bs,
        view(&a_data, a.rows, a.cols, a_trans),
        view(&b_data, b.rows, b.cols, b_trans),
        c,
        &f32_ops,
        par,
    );
}

/// `x ⊙ [mask > 0]` rounded to bf16 (as f32 values), dense, in the orientation of `x`'s unit
/// stride: row-major, or column-major (returned `true`) when `x` is a transposed view.
fn round_to_bf16(x: MatRef, mask: Option<MatRef>) -> (Vec<f32>, bool) {
    let trans = x.rs == 1 && x.cs != 1;
    let (lines, len) = if trans {
        (x.cols, x.rows)
    } else {
        (x.rows, x.cols)
    };
    let mut out = vec![0.0f32; lines * len];
    for (l, line) in out.chunks_exact_mut(len.max(1)).take(lines).enumerate() {
        for (e, o) in line.iter_mut().enumerate() {
            let (i, j) = if trans { (e, l) } else { (l, e) };
            let keep = mask.is_none_or(|mk| mk.get(i, j) > 0.0);
            *o = if keep {
                Bf16::from_f32(x.get(i, j)).to_f32()
            } else {
                0.0
            };
        }
    }
    (out, trans)
}

/// Packs the `width` lines (rows of A or of B) starting at `line0` over the K pairs
/// `p0 .. p0 + pairs` as `panel[q * width + r]` = the pair (x[line0 + r, 2(p0 + q)],
/// x[line0 + r, 2(p0 + q) + 1]) in one 32-bit lane, the even-k element in the low half
/// (VDPBF16PS's bf16[2i]). Lines past the matrix, and an odd K's missing last element, are
/// zero.
fn pack_pairs(x: Bf16Mat, line0: usize, width: usize, p0: usize, pairs: usize, panel: &mut [u32]) {
    let panel = &mut panel[..pairs * width];
    let k_end = x.cols.min(2 * (p0 + pairs));
    for r in 0..width {
        let i = line0 + r;
        let row = if i < x.rows {
            &x.data[i * x.cols + 2 * p0..i * x.cols + k_end]
        } else {
            &[]
        };
        let mut lanes = panel[r..].iter_mut().step_by(width);
        let mut two = row.chunks_exact(2);
        // `two` first: zip polls its left side first, and must not consume a lane it will
        // not fill.
        for (pair, lane) in (&mut two).zip(&mut lanes) {
            *lane = u32::from(pair[0].to_bits()) | (u32::from(pair[1].to_bits()) << 16);
        }
        let odd_last = two
            .remainder()
            .first()
            .map_or(0, |x| u32::from(x.to_bits()));
        for (q, lane) in lanes.enumerate() {
            *lane = if q == 0 { odd_last } else { 0 };
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn gemm_bf16_avx512(a: Bf16Mat, b: Bf16Mat, beta: f32, c: MatMut, par: Par) {
    let (m, k, n) = (a.rows, a.cols, b.rows);
    let c_rs = c.rs;
    let c_data = c.into_slice();
    let k_pairs = k.div_ceil(2);
    let n_panels = n.div_ceil(BF16_NR);
    let parallel = should_split(par, 2 * m * n * k, MIN_PARALLEL_FLOPS);
    // B whole, panel by panel: panel j holds columns j*NR .. over all K pairs.
    let mut b_packed = vec![0u32; n_panels * k_pairs * BF16_NR];
    let pack_b_panel =
        |(j, panel): (usize, &mut [u32])| pack_pairs(b, j * BF16_NR, BF16_NR, 0, k_pairs, panel);
    if parallel {
        b_packed
            .par_chunks_mut(k_pairs * BF16_NR)
            .enumerate()
            .for_each(pack_b_panel);
    } else {
        b_packed
            .chunks_mut(k_pairs * BF16_NR)
            .enumerate()
            .for_each(pack_b_panel);
    }
    let b_packed = &b_packed[..];
    // One task: rows i0 .. i0 + MC of C, whose slice starts at row i0.
    let rows_task = |(t, c_rows): (usize, &mut [f32])| {
        let i0 = t * MC;
        let rows = MC.min(m - i0);
        let tiles = rows.div_ceil(BF16_MR);
        let mut a_packed = vec![0u32; tiles * BF16_MR * KC_PAIRS.min(k_pairs)];
        for p0 in (0..k_pairs).step_by(KC_PAIRS) {
            let pairs = KC_PAIRS.min(k_pairs - p0);
            for (tile, panel) in a_packed
                .chunks_exact_mut(BF16_MR * pairs)
                .take(tiles)
                .enumerate()
            {
                pack_pairs(a, i0 + tile * BF16_MR, BF16_MR, p0, pairs, panel);
            }
            let tile_beta = if p0 == 0 { beta } else { 1.0 };
            for j in 0..n_panels {
                let b_panel = &b_packed[(j * k_pairs + p0) * BF16_NR..][..pairs * BF16_NR];
                let cols = BF16_NR.min(n - j * BF16_NR);
                for tile in 0..tiles {
                    let r0 = tile * BF16_MR;
                    let a_panel = &a_packed[tile * BF16_MR * pairs..][..pairs * BF16_MR];
                    let c_tile = &mut c_rows[r0 * c_rs + j * BF16_NR..];
                    let out = TileOut {
                        rows: BF16_MR.min(rows - r0),
                        cols,
                        rs: c_rs,
                        beta: tile_beta,
                    };
                    out.check(c_tile.len());
                    // SAFETY: the CPU has AVX512-BF16 and AVX512F (checked by the caller's
                    // assert_supported); the panels hold `pairs` full steps of MR and NR
                    // lanes; `check` verified that C's tile lies inside `c_tile`.
                    unsafe { avx512::tile(pairs, a_panel, b_panel, c_tile.as_mut_ptr(), &out) };
                }
            }
        }
    };
    if parallel {
        c_data
            .par_chunks_mut(MC * c_rs)
            .enumerate()
            .for_each(rows_task);
    } else {
        c_data.chunks_mut(MC * c_rs).enumerate().for_each(rows_task);
    }
}

#[cfg(target_arch = "x86_64")]
/// Where and how a register tile is stored: C[r][j] = acc[r][j] + beta * C[r][j] for
/// r < rows, j < cols, at `r * rs + j` from the tile's first element.
struct TileOut {
    rows: usize,
    cols: usize,
    rs: usize,
    beta: f32,
}

#[cfg(target_arch = "x86_64")]
impl TileOut {
    /// Panics unless a slice of `len` floats holds the tile.
    fn check(&self, len: usize) {
        assert!(self.rows <= BF16_MR && self.cols <= BF16_NR);
        assert!(self.rows == 0 || (self.rows - 1) * self.rs + self.cols <= len);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BF16_MR, BF16_NR, TileOut};
    use core::arch::x86_64::*;

    /// Vectors of 16 f32 lanes per tile row.
    const NV: usize = BF16_NR / 16;

    /// 512 bits of K pairs, reinterpreted as 32 bf16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn as_bf16x32(v: __m512i) -> __m512bh {
        // SAFETY: both are plain 512-bit vectors; every bit pattern is valid in each.
        unsafe { core::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// acc[MR x NR] = sum over `pairs` K pairs of A pair (broadcast) . B pairs (VDPBF16PS),
    /// then stored with the epilogue of `out`.
    ///
    /// # Safety
    /// The CPU supports AVX512-BF16 and AVX512F; `a` holds `pairs * MR` and `b`
    /// `pairs * NR` lanes; the tile described by `out` is writable (and readable if
    /// beta != 0) at `c`.
    #[target_feature(enable = "avx512bf16,avx512f")]
    pub unsafe fn tile(pairs: usize, a: &[u32], b: &[u32], c: *mut f32, out: &TileOut) {
        debug_assert!(a.len() >= pairs * BF16_MR && b.len() >= pairs * BF16_NR);
        let mut acc = [[_mm512_setzero_ps(); NV]; BF16_MR];
        let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
        for _ in 0..pairs {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, bv) in bv.iter_mut().enumerate() {
                // SAFETY: this step's NR lanes of B are in bounds (checked above).
                *bv = unsafe { _mm512_loadu_si512(bp.add(16 * v).cast()) };
            }
            for (r, acc_row) in acc.iter_mut().enumerate() {
                // SAFETY: this step's MR lanes of A are in bounds.
                let a_pair = unsafe { *ap.add(r) };
                let av = as_bf16x32(_mm512_set1_epi32(a_pair as i32));
                for v in 0..NV {
                    acc_row[v] = _mm512_dpbf16_ps(acc_row[v], av, as_bf16x32(bv[v]));
                }
            }
            ap = ap.wrapping_add(BF16_MR);
            bp = bp.wrapping_add(BF16_NR);
        }
        let beta = _mm512_set1_ps(out.beta);
        for (r, acc_row) in acc.iter().enumerate().take(out.rows) {
            for (v, &acc_v) in acc_row.iter().enumerate() {
                let lanes = out.cols.saturating_sub(16 * v).min(16);
                if lanes == 0 {
                    continue;
                }
                let mask = ((1u32 << lanes) - 1) as u16;
                let cp = c.wrapping_add(r * out.rs + 16 * v);
                // SAFETY: the `lanes` masked lanes of row r are inside the tile (caller).
                unsafe {
                    let result = if out.beta != 0.0 {
                        _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, cp), beta, acc_v)
                    } else {
                        acc_v
                    };
                    _mm512_mask_storeu_ps(cp, mask, result);
                }
            }
        }
    }
}
