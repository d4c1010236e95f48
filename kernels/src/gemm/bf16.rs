//! Mixed-precision GEMM: bf16 operands, f32 accumulation, f32 epilogue. Two entry points share
//! one packing and the same kernels:
//! - [`gemm_bf16`]: C (f32) = A (bf16) . B^T (bf16) + beta * C, operands already in bf16, in the
//!   shape of a layer's forward product Y = X W^T with PyTorch's W (out x in): A is M x K and B
//!   is N x K, both row-major, so both are read along K;
//! - [`gemm_rounded_bf16`] (what [`gemm`](fn@super::gemm) runs for [`Precision::Bf16`]): f32
//!   strided views, any transpose, the ReLU mask applied first, rounded to bf16 with
//!   round-to-nearest-even ([`Bf16::from_f32`]) as they are packed, and the full epilogue
//!   (alpha, beta, bias, ReLU).
//!
//! Both see their operands as [`Operand`]s: `lines x K` (the rows of A, the columns of B), and
//! pack them into K *pairs*: one 32-bit lane holds (x[l, 2p], x[l, 2p+1]), the even-k element in
//! the low half, an odd K padded with a zero. That is the operand layout of both BF16 dot
//! product instructions.
//!
//! Paths, chosen at run time ([`Isa::selected`], `DLRM_ISA` forces one):
//! - AMX ([`super::amx`]): TDPBF16PS on 16 x 16 f32 tiles, 32 K values per instruction.
//! - AVX512-BF16: a 12 x 32 register tile built on VDPBF16PS (Intel SDM pseudocode: for each f32
//!   lane i, `dst[i] += a.bf16[2i+1] * b.bf16[2i+1]`, then `dst[i] += a.bf16[2i] * b.bf16[2i]`;
//!   f32 arithmetic, round to nearest even, denormal inputs and outputs flushed to zero, MXCSR
//!   not consulted). B is packed into panels of NR columns of pairs, A into MR-row panels of
//!   pairs, broadcast one row at a time; the MR x NR tile of f32 accumulators stays in registers
//!   (MR * NR / 16 = 24 of the 32 zmm registers). On the Sapphire Rapids-class core this was
//!   measured on VDPBF16PS retires at about a quarter of the FMA rate (a register-only loop of
//!   24 independent accumulators: about 70 GFLOP/s against about 150 for VFMADD231PS), so this
//!   path runs at about 0.6x the f32 GEMM there; on AMD Zen 4 it runs at twice the FMA rate.
//! - Portable: the operands rounded into dense f32 copies (a product of two bf16 values is
//!   exact in f32) and multiplied by the f32 GEMM.
//!
//! The paths differ in rounding (the BF16 instructions' own intermediate rounding and flushing
//! of denormals; the f32 GEMM's summation order), not in what they compute; each is
//! deterministic, and gives the same bits for any thread count (threads split M and N, never K).

use super::{GemmOps, MatMut, MatRef, Precision, gemm_with_isa};
use crate::bf16::{Bf16, Isa, f32_to_bf16_slice};
use crate::parallel::{Par, should_split};
use crate::simd::prefetch_write;
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

/// Smallest product (in FLOPs) split across threads.
pub(super) const MIN_PARALLEL_FLOPS: usize = 1 << 21;

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
    let epi = Epilogue {
        beta,
        ..Epilogue::default()
    };
    product(isa, Operand::Bf16(a), Operand::Bf16(b), c, &epi, par);
}

/// The [`Precision::Bf16`] product of [`gemm`](fn@super::gemm) on `isa`:
/// C = relu(alpha * bf16(op(A) ⊙ [mask > 0]) . bf16(op(B)) + beta * C + bias), accumulated
/// in f32 (`ops.precision` is ignored). [`gemm`](fn@super::gemm) runs it on
/// [`Isa::selected`]; other ISAs are for tests and benches.
///
/// Panics on mismatched shapes, or if the CPU does not support `isa`.
pub fn gemm_rounded_bf16(a: MatRef, b: MatRef, c: MatMut, ops: &GemmOps, isa: Isa, par: Par) {
    let (a, b_op, epi) = rounded_operands(a, b, &c, ops);
    product(isa, a, b_op, c, &epi, par);
}

/// [`gemm_rounded_bf16`] with B read from `packed`, which must hold `b`'s values packed by
/// [`PackedPairs::pack_with_isa`] for `isa`: the same bits, without packing B again. Panels
/// packed for another ISA or shape (or none: the ISA has no BF16 product) fall back to
/// [`gemm_rounded_bf16`] on `b`.
pub fn gemm_rounded_bf16_prepacked(
    a: MatRef,
    b: MatRef,
    packed: &PackedPairs,
    c: MatMut,
    ops: &GemmOps,
    isa: Isa,
    par: Par,
) {
    if !packed.fits(isa, &b) || a.rows == 0 {
        return gemm_rounded_bf16(a, b, c, ops, isa, par);
    }
    isa.assert_supported();
    let (a, _, epi) = rounded_operands(a, b, &c, ops);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => super::amx::product_packed(a, &packed.lanes, c, &epi, par),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => product_avx512_packed(a, &packed.lanes, c, &epi, par),
        _ => unreachable!("PackedPairs holds panels only for the BF16 product paths"),
    }
}

/// The operands (A's lines its rows, B's its columns) and epilogue of a rounded product;
/// panics on mismatched shapes.
fn rounded_operands<'a>(
    a: MatRef<'a>,
    b: MatRef<'a>,
    c: &MatMut,
    ops: &GemmOps<'a>,
) -> (Operand<'a>, Operand<'a>, Epilogue<'a>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: A is {m}x{k} but B is {}x{n}", b.rows);
    assert_eq!(
        (c.rows, c.cols),
        (m, n),
        "gemm: C is {}x{}, the product is {m}x{n}",
        c.rows,
        c.cols
    );
    if let Some(mask) = &ops.a_relu_mask {
        assert_eq!(
            (mask.rows, mask.cols),
            (m, k),
            "gemm: mask shape differs from A"
        );
    }
    if let Some(mask) = &ops.c_relu_mask {
        assert_eq!(
            (mask.rows, mask.cols),
            (m, n),
            "gemm: output mask shape differs from C"
        );
        assert_eq!(
            mask.cs, 1,
            "gemm: the bf16 output mask has unit column stride"
        );
    }
    let epi = Epilogue {
        alpha: ops.alpha,
        beta: ops.beta,
        bias: ops.bias,
        relu: ops.relu,
        c_mask: ops.c_relu_mask,
    };
    if let Some(bias) = epi.bias {
        assert_eq!(
            bias.len(),
            n,
            "gemm: bias has {} values for {n} columns",
            bias.len()
        );
    }
    let a = Operand::Rounded {
        x: a,
        mask: ops.a_relu_mask,
    };
    let b = Operand::Rounded {
        x: b.t(),
        mask: None,
    };
    (a, b, epi)
}

/// A GEMM's B operand (K x N) rounded to bf16 and packed once in the pair layout that the
/// BF16 product of one ISA reads: AMX tiles ([`super::amx`]) or AVX512-BF16 NR-column panels.
/// Products that share B (a layer's weights, read by every row chunk of a batch) then skip
/// its rounding and packing; the bits are those of packing it in each product. Reused across
/// steps: repacking allocates only when B grows.
#[derive(Clone, Debug, Default)]
pub struct PackedPairs {
    /// The path the lanes are laid out for; None when nothing is packed (empty B, K = 0, or
    /// an ISA without a BF16 product, whose products round dense copies instead).
    isa: Option<Isa>,
    k: usize,
    n: usize,
    lanes: Vec<u32>,
}

impl PackedPairs {
    pub fn new() -> PackedPairs {
        PackedPairs::default()
    }

    /// Rounds and packs `b` (K x N, any strides) for [`gemm_rounded_bf16_prepacked`] on `isa`
    /// (panics if the CPU lacks it).
    pub fn pack_with_isa(&mut self, isa: Isa, b: MatRef) {
        isa.assert_supported();
        let (k, n) = (b.rows, b.cols);
        let op = Operand::Rounded {
            x: b.t(),
            mask: None,
        };
        (self.k, self.n, self.isa) = (k, n, None);
        if k == 0 || n == 0 {
            return;
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => {
                self.lanes.resize(super::amx::packed_b_len(k, n), 0);
                super::amx::pack_b(&op, &mut self.lanes, false);
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => {
                self.lanes.resize(avx512_packed_b_len(k, n), 0);
                pack_b_panels(&op, &mut self.lanes, false);
            }
            _ => return,
        }
        self.isa = Some(isa);
    }

    /// Marks the lanes stale (kept for the next packing).
    pub(super) fn invalidate(&mut self) {
        self.isa = None;
    }

    /// Whether these lanes are `b`'s shape packed for `isa` (the values are the caller's
    /// promise).
    fn fits(&self, isa: Isa, b: &MatRef) -> bool {
        self.isa == Some(isa) && (self.k, self.n) == (b.rows, b.cols)
    }
}

/// C = epilogue(A . B^T) with A (M lines) and B (N lines) of the same depth K.
fn product(isa: Isa, a: Operand, b: Operand, c: MatMut, epi: &Epilogue, par: Par) {
    isa.assert_supported();
    if a.lines() == 0 || b.lines() == 0 {
        return;
    }
    match isa {
        // K = 0: the product is zero; the f32 GEMM applies the epilogue alone.
        _ if a.depth() == 0 => product_portable(isa, a, b, c, epi, par),
        Isa::Portable | Isa::Avx2 | Isa::Avx512 => product_portable(isa, a, b, c, epi, par),
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => super::amx::product(a, b, c, epi, par),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => product_avx512(a, b, c, epi, par),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Amx | Isa::Avx512Bf16 => unreachable!("asserted unsupported"),
    }
}

/// What is applied as a tile of the product is stored:
/// C = relu(alpha * acc + beta * C + bias) ⊙ [c_mask > 0], in f32, in this order (that of the
/// f32 GEMM).
#[derive(Clone, Copy, Debug)]
pub(super) struct Epilogue<'a> {
    pub alpha: f32,
    /// 0: C is only written.
    pub beta: f32,
    /// Length N.
    pub bias: Option<&'a [f32]>,
    pub relu: bool,
    /// C's shape, unit column stride ([`GemmOps::c_relu_mask`]).
    pub c_mask: Option<MatRef<'a>>,
}

impl Default for Epilogue<'_> {
    fn default() -> Self {
        Epilogue {
            alpha: 1.0,
            beta: 0.0,
            bias: None,
            relu: false,
            c_mask: None,
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Epilogue<'_> {
    /// C = acc: the epilogue leaves every value (-0.0 and NaN included) as the product gave it.
    pub fn is_identity(&self) -> bool {
        self.alpha == 1.0
            && self.beta == 0.0
            && self.bias.is_none()
            && !self.relu
            && self.c_mask.is_none()
    }
}

/// An operand of a BF16 product seen as `lines x depth` (depth = K): the rows of A, or the
/// columns of B.
#[derive(Clone, Copy, Debug)]
pub(super) enum Operand<'a> {
    /// f32 values, line l = row l of `x`, read as `x ⊙ [mask > 0]` rounded to bf16.
    Rounded {
        x: MatRef<'a>,
        mask: Option<MatRef<'a>>,
    },
    /// bf16 values, line l = row l.
    Bf16(Bf16Mat<'a>),
}

/// Which direction of an [`Operand`] is contiguous in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Contiguity {
    /// Each line along K (row-major A, or B = W^T).
    Along,
    /// One K step across consecutive lines (a transposed view: B = W, or A = dY^T).
    Across,
    /// Neither (both strides above 1).
    Neither,
}

/// Values read per call of [`Operand::read`] (a stack buffer).
const READ_CHUNK: usize = 64;

impl<'a> Operand<'a> {
    pub fn lines(&self) -> usize {
        match self {
            Operand::Rounded { x, .. } => x.rows,
            Operand::Bf16(x) => x.rows,
        }
    }

    pub fn depth(&self) -> usize {
        match self {
            Operand::Rounded { x, .. } => x.cols,
            Operand::Bf16(x) => x.cols,
        }
    }

    /// Which direction of the operand (and its mask) is contiguous in memory.
    pub fn contiguity(&self) -> Contiguity {
        match self {
            Operand::Rounded { x, mask } => {
                if x.cs == 1 && mask.is_none_or(|mk| mk.cs == 1) {
                    Contiguity::Along
                } else if x.rs == 1 && mask.is_none_or(|mk| mk.rs == 1) {
                    Contiguity::Across
                } else {
                    Contiguity::Neither
                }
            }
            Operand::Bf16(_) => Contiguity::Along,
        }
    }

    /// bf16 values of the elements (l + e, k) (`across`) or (l, k + e) for e < out.len() <=
    /// READ_CHUNK, zero past the lines or the depth.
    fn read(&self, l: usize, k: usize, across: bool, out: &mut [Bf16], isa: Isa) {
        debug_assert!(out.len() <= READ_CHUNK);
        let (limit, from) = if across {
            (self.lines(), l)
        } else {
            (self.depth(), k)
        };
        let valid = limit.saturating_sub(from).min(out.len());
        if l >= self.lines() || k >= self.depth() {
            out.fill(Bf16::default());
            return;
        }
        match self {
            Operand::Rounded { x, mask } => {
                // The run as a slice where it is contiguous in memory.
                let run = |v: MatRef<'a>| -> Option<&'a [f32]> {
                    let (v, i, j) = if across { (v.t(), k, l) } else { (v, l, k) };
                    (v.cs == 1).then(move || v.row_slice(i, j, valid))
                };
                let mut vals = [0.0f32; READ_CHUNK];
                let vals = &mut vals[..valid];
                match (run(*x), mask.map(run)) {
                    (Some(xs), None) => vals.copy_from_slice(xs),
                    (Some(xs), Some(Some(ms))) => {
                        for ((v, &xv), &mv) in vals.iter_mut().zip(xs).zip(ms) {
                            *v = if mv > 0.0 { xv } else { 0.0 };
                        }
                    }
                    _ => {
                        for (e, v) in vals.iter_mut().enumerate() {
                            let (i, j) = if across { (l + e, k) } else { (l, k + e) };
                            let keep = mask.is_none_or(|mk| mk.get(i, j) > 0.0);
                            *v = if keep { x.get(i, j) } else { 0.0 };
                        }
                    }
                }
                f32_to_bf16_slice(vals, &mut out[..valid], isa);
            }
            Operand::Bf16(x) if !across => {
                out[..valid].copy_from_slice(&x.data[l * x.cols + k..][..valid]);
            }
            Operand::Bf16(x) => {
                for (e, o) in out[..valid].iter_mut().enumerate() {
                    *o = x.data[(l + e) * x.cols + k];
                }
            }
        }
        out[valid..].fill(Bf16::default());
    }
}

/// One 32-bit lane of a K pair: the even-k value in the low half (the `bf16[2i]` of VDPBF16PS
/// and TDPBF16PS).
#[inline(always)]
fn pair(even: Bf16, odd: Bf16) -> u32 {
    u32::from(even.to_bits()) | (u32::from(odd.to_bits()) << 16)
}

/// Packs `out[r * line_stride + q * pair_stride]` = the pair (x[line0 + r, 2(p0 + q)],
/// x[line0 + r, 2(p0 + q) + 1]) for r < width, q < pairs; lines past the operand and K past
/// its depth are zero. The operand is read along whichever direction is contiguous: on the
/// BF16 paths 16 x 16 blocks of pairs at a time in vectors ([`super::amx::pair_block`]),
/// else value by value.
pub(super) fn pack_pairs(
    x: &Operand,
    (line0, width): (usize, usize),
    (p0, pairs): (usize, usize),
    (line_stride, pair_stride): (usize, usize),
    out: &mut [u32],
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512Bf16 | Isa::Amx)
        && (line_stride == 1 || pair_stride == 1)
        && x.contiguity() != Contiguity::Neither
    {
        let strides = (line_stride, pair_stride);
        return pack_pair_blocks(x, (line0, width), (p0, pairs), strides, out);
    }
    let strides = (line_stride, pair_stride);
    pack_pairs_scalar(x, (line0, width), (p0, pairs), strides, out, isa)
}

/// [`pack_pairs`] value by value (the twin of [`pack_pair_blocks`]); `isa` converts runs.
fn pack_pairs_scalar(
    x: &Operand,
    (line0, width): (usize, usize),
    (p0, pairs): (usize, usize),
    (line_stride, pair_stride): (usize, usize),
    out: &mut [u32],
    isa: Isa,
) {
    let (mut even, mut odd) = ([Bf16::default(); READ_CHUNK], [Bf16::default(); READ_CHUNK]);
    if x.contiguity() == Contiguity::Across {
        for q in 0..pairs {
            let k = 2 * (p0 + q);
            for r0 in (0..width).step_by(READ_CHUNK) {
                let n = READ_CHUNK.min(width - r0);
                x.read(line0 + r0, k, true, &mut even[..n], isa);
                x.read(line0 + r0, k + 1, true, &mut odd[..n], isa);
                for r in 0..n {
                    out[(r0 + r) * line_stride + q * pair_stride] = pair(even[r], odd[r]);
                }
            }
        }
    } else {
        let buf = &mut even;
        for r in 0..width {
            for q0 in (0..pairs).step_by(READ_CHUNK / 2) {
                let n = (READ_CHUNK / 2).min(pairs - q0);
                x.read(line0 + r, 2 * (p0 + q0), false, &mut buf[..2 * n], isa);
                for q in 0..n {
                    out[r * line_stride + (q0 + q) * pair_stride] =
                        pair(buf[2 * q], buf[2 * q + 1]);
                }
            }
        }
    }
}

/// [`pack_pairs`] by 16 x 16 blocks of pairs in vectors: `x` is contiguous along K or across
/// lines, and one of the strides is 1 (the block is built with that direction contiguous).
#[cfg(target_arch = "x86_64")]
fn pack_pair_blocks(
    x: &Operand,
    (line0, width): (usize, usize),
    (p0, pairs): (usize, usize),
    (line_stride, pair_stride): (usize, usize),
    out: &mut [u32],
) {
    const BLOCK: usize = 16;
    let pair_major = line_stride == 1;
    let mut t = [0u32; BLOCK * BLOCK];
    for r0 in (0..width).step_by(BLOCK) {
        let lines = BLOCK.min(width - r0);
        for q0 in (0..pairs).step_by(BLOCK) {
            let steps = BLOCK.min(pairs - q0);
            let packed =
                super::amx::pair_block(x, (line0 + r0, lines), p0 + q0, pair_major, &mut t);
            assert!(packed, "the operand is contiguous in one direction");
            if pair_major {
                for (q, t_row) in t.chunks_exact(BLOCK).enumerate().take(steps) {
                    let at = (q0 + q) * pair_stride + r0;
                    out[at..at + lines].copy_from_slice(&t_row[..lines]);
                }
            } else {
                for (r, t_row) in t.chunks_exact(BLOCK).enumerate().take(lines) {
                    let at = (r0 + r) * line_stride + q0;
                    out[at..at + steps].copy_from_slice(&t_row[..steps]);
                }
            }
        }
    }
}

/// The operands rounded into dense f32 copies (exact) and multiplied by the f32 GEMM on `isa`.
fn product_portable(isa: Isa, a: Operand, b: Operand, c: MatMut, epi: &Epilogue, par: Par) {
    let dense = |x: &Operand| {
        let (lines, depth) = (x.lines(), x.depth());
        let mut out = vec![0.0f32; lines * depth];
        let mut buf = [Bf16::default(); READ_CHUNK];
        for (l, line) in out.chunks_exact_mut(depth.max(1)).take(lines).enumerate() {
            for (k0, vals) in line.chunks_mut(READ_CHUNK).enumerate() {
                let n = vals.len();
                x.read(l, k0 * READ_CHUNK, false, &mut buf[..n], Isa::Portable);
                for (v, h) in vals.iter_mut().zip(&buf[..n]) {
                    *v = h.to_f32();
                }
            }
        }
        out
    };
    let (a32, b32) = (dense(&a), dense(&b));
    let (m, k, n) = (a.lines(), a.depth(), b.lines());
    let ops = GemmOps {
        alpha: epi.alpha,
        beta: epi.beta,
        bias: epi.bias,
        relu: epi.relu,
        a_relu_mask: None,
        c_relu_mask: epi.c_mask,
        precision: Precision::F32,
    };
    gemm_with_isa(
        isa,
        MatRef::new(&a32, m, k),
        MatRef::new(&b32, n, k).t(),
        c,
        &ops,
        par,
    );
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

/// A raw pointer to C for tasks that write disjoint tiles of it.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct SharedC {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
}
// SAFETY: tasks write disjoint tiles of C, and the fork-join ends before the exclusive borrow
// of C that produced the pointer does.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SharedC {}
// SAFETY: as above: concurrent use never touches the same element.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SharedC {}

#[cfg(target_arch = "x86_64")]
impl SharedC {
    pub fn new(c: MatMut) -> SharedC {
        let (rows, cols, rs) = (c.rows, c.cols, c.rs);
        SharedC {
            ptr: c.into_slice().as_mut_ptr(),
            rows,
            cols,
            rs,
        }
    }

    /// Requests the lines of the tile at C[i0.., j0..] (`rows` x `cols`, clipped to C) for
    /// writing: a line per 16 floats, and the row's last float for a row that ends in the
    /// next line.
    pub fn prefetch(&self, (i0, j0): (usize, usize), (rows, cols): (usize, usize)) {
        let rows = self.rows.saturating_sub(i0).min(rows);
        let cols = self.cols.saturating_sub(j0).min(cols);
        if cols == 0 {
            return;
        }
        for r in 0..rows {
            let row = self.ptr.wrapping_add((i0 + r) * self.rs + j0);
            for j in (0..cols).step_by(16) {
                prefetch_write(row.wrapping_add(j));
            }
            prefetch_write(row.wrapping_add(cols - 1));
        }
    }

    /// Where the `size` x `size` block at C[i0.., j0..] starts, and C's row stride, when the
    /// block lies wholly inside C.
    pub fn whole_block(&self, (i0, j0): (usize, usize), size: usize) -> Option<(*mut f32, usize)> {
        (i0 + size <= self.rows && j0 + size <= self.cols)
            .then(|| (self.ptr.wrapping_add(i0 * self.rs + j0), self.rs))
    }

    /// Stores the tile `acc` (row r at `acc[r * acc_rs..]`) at C[i0.., j0..] with `epi`,
    /// clipped to C.
    ///
    /// # Safety
    /// The CPU supports AVX512F; no other thread accesses this tile of C meanwhile; `acc`
    /// holds the clipped tile.
    pub unsafe fn store(
        &self,
        acc: &[f32],
        acc_rs: usize,
        (i0, j0): (usize, usize),
        epi: &Epilogue,
    ) {
        let rows = self.rows.saturating_sub(i0).min(acc.len().div_ceil(acc_rs));
        let cols = self.cols.saturating_sub(j0).min(acc_rs);
        assert!(rows == 0 || (rows - 1) * acc_rs + cols <= acc.len());
        let bias = epi.bias.map(|b| &b[j0..j0 + cols]);
        for r in 0..rows {
            // SAFETY: row i0 + r < rows of C, columns j0 .. j0 + cols <= cols of C, so the
            // slice lies inside C's data (MatMut's invariant); this task owns the tile.
            let c_row = unsafe {
                std::slice::from_raw_parts_mut(self.ptr.add((i0 + r) * self.rs + j0), cols)
            };
            let mask = epi.c_mask.map(|mk| mk.row_slice(i0 + r, j0, cols));
            let acc_row = &acc[r * acc_rs..r * acc_rs + cols];
            // SAFETY: AVX512F (caller).
            unsafe { store_row(acc_row, c_row, bias, mask, epi) };
        }
    }
}

/// c = relu(alpha * acc + beta * c + bias) ⊙ [mask > 0], 16 lanes at a time, masked tail.
///
/// # Safety
/// The CPU supports AVX512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_row(
    acc: &[f32],
    c: &mut [f32],
    bias: Option<&[f32]>,
    out_mask: Option<&[f32]>,
    epi: &Epilogue,
) {
    use core::arch::x86_64::*;
    let (alpha, beta, zero) = (
        _mm512_set1_ps(epi.alpha),
        _mm512_set1_ps(epi.beta),
        _mm512_setzero_ps(),
    );
    for j in (0..c.len()).step_by(16) {
        let lanes = ((1u32 << (c.len() - j).min(16)) - 1) as u16;
        // SAFETY: the masked lanes are j .. min(j + 16, len) of acc, c, bias and the output
        // mask, which have (at least) c.len() elements.
        unsafe {
            let mut r = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, acc.as_ptr().add(j)), alpha);
            if epi.beta != 0.0 {
                r = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, c.as_ptr().add(j)), beta, r);
            }
            if let Some(b) = bias {
                r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(lanes, b.as_ptr().add(j)));
            }
            if epi.relu {
                r = _mm512_max_ps(r, zero);
            }
            if let Some(m) = out_mask {
                // Ordered compare: false for NaN, as `> 0` in the f32 store.
                let y = _mm512_maskz_loadu_ps(lanes, m.as_ptr().add(j));
                let keep = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(lanes, y, zero);
                r = _mm512_maskz_mov_ps(keep, r);
            }
            _mm512_mask_storeu_ps(c.as_mut_ptr().add(j), lanes, r);
        }
    }
}

/// Lanes of B (K x N) packed into NR-column panels of K pairs.
#[cfg(target_arch = "x86_64")]
fn avx512_packed_b_len(k: usize, n: usize) -> usize {
    n.div_ceil(BF16_NR) * k.div_ceil(2) * BF16_NR
}

/// B whole, panel by panel: panel j holds columns j*NR .. over all K pairs; panels in
/// parallel when `parallel`.
#[cfg(target_arch = "x86_64")]
fn pack_b_panels(b: &Operand, out: &mut [u32], parallel: bool) {
    let k_pairs = b.depth().div_ceil(2);
    debug_assert_eq!(out.len(), avx512_packed_b_len(b.depth(), b.lines()));
    let pack_b_panel = |(j, panel): (usize, &mut [u32])| {
        pack_pairs(
            b,
            (j * BF16_NR, BF16_NR),
            (0, k_pairs),
            (1, BF16_NR),
            panel,
            Isa::Avx512Bf16,
        )
    };
    if parallel {
        out.par_chunks_mut(k_pairs * BF16_NR)
            .enumerate()
            .for_each(pack_b_panel);
    } else {
        out.chunks_mut(k_pairs * BF16_NR)
            .enumerate()
            .for_each(pack_b_panel);
    }
}

/// The AVX512-BF16 product: B packed whole into NR-column panels of pairs, then
/// [`product_avx512_packed`].
#[cfg(target_arch = "x86_64")]
fn product_avx512(a: Operand, b: Operand, c: MatMut, epi: &Epilogue, par: Par) {
    let (m, k, n) = (a.lines(), a.depth(), b.lines());
    let parallel = should_split(par, 2 * m * n * k, MIN_PARALLEL_FLOPS);
    let mut b_packed = vec![0u32; avx512_packed_b_len(k, n)];
    pack_b_panels(&b, &mut b_packed, parallel);
    product_avx512_packed(a, &b_packed, c, epi, par);
}

/// C = epilogue(A . B^T) with B packed by [`pack_b_panels`] (N = C's columns): threads split
/// C into MC-row blocks, each packs its A panels per rank-KC update.
#[cfg(target_arch = "x86_64")]
fn product_avx512_packed(a: Operand, b_packed: &[u32], c: MatMut, epi: &Epilogue, par: Par) {
    let (m, k, n) = (a.lines(), a.depth(), c.cols);
    let isa = Isa::Avx512Bf16;
    let k_pairs = k.div_ceil(2);
    let n_panels = n.div_ceil(BF16_NR);
    assert_eq!(
        b_packed.len(),
        avx512_packed_b_len(k, n),
        "packed B's shape"
    );
    let parallel = should_split(par, 2 * m * n * k, MIN_PARALLEL_FLOPS);
    let c = SharedC::new(c);
    // One task: rows i0 .. i0 + MC of C.
    let rows_task = |t: usize| {
        let i0 = t * MC;
        let tiles = MC.min(m - i0).div_ceil(BF16_MR);
        let mut a_packed = vec![0u32; tiles * BF16_MR * KC_PAIRS.min(k_pairs)];
        let mut acc = [0.0f32; BF16_MR * BF16_NR];
        for p0 in (0..k_pairs).step_by(KC_PAIRS) {
            let pairs = KC_PAIRS.min(k_pairs - p0);
            for (tile, panel) in a_packed
                .chunks_exact_mut(BF16_MR * pairs)
                .take(tiles)
                .enumerate()
            {
                let lines = (i0 + tile * BF16_MR, BF16_MR);
                pack_pairs(&a, lines, (p0, pairs), (1, BF16_MR), panel, isa);
            }
            let last = p0 + pairs == k_pairs;
            // Alpha on every rank-KC update, then beta = 1 to add the next: as the f32 GEMM.
            let block_epi = Epilogue {
                alpha: epi.alpha,
                beta: if p0 == 0 { epi.beta } else { 1.0 },
                bias: epi.bias.filter(|_| last),
                relu: epi.relu && last,
                c_mask: epi.c_mask.filter(|_| last),
            };
            for j in 0..n_panels {
                let b_panel = &b_packed[(j * k_pairs + p0) * BF16_NR..][..pairs * BF16_NR];
                for tile in 0..tiles {
                    let a_panel = &a_packed[tile * BF16_MR * pairs..][..pairs * BF16_MR];
                    // SAFETY: the CPU has AVX512-BF16 and AVX512F (`product` asserted it);
                    // the panels hold `pairs` full steps of MR and NR lanes; this task alone
                    // owns rows i0 .. i0 + MC of C.
                    unsafe {
                        avx512::tile(pairs, a_panel, b_panel, &mut acc);
                        c.store(
                            &acc,
                            BF16_NR,
                            (i0 + tile * BF16_MR, j * BF16_NR),
                            &block_epi,
                        );
                    }
                }
            }
        }
    };
    let tasks = m.div_ceil(MC);
    if parallel {
        (0..tasks).into_par_iter().for_each(rows_task);
    } else {
        (0..tasks).for_each(rows_task);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BF16_MR, BF16_NR};
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

    /// acc[MR x NR] = sum over `pairs` K pairs of A pair (broadcast) . B pairs (VDPBF16PS).
    ///
    /// # Safety
    /// The CPU supports AVX512-BF16 and AVX512F; `a` holds `pairs * MR` and `b`
    /// `pairs * NR` lanes.
    #[target_feature(enable = "avx512bf16,avx512f")]
    pub unsafe fn tile(pairs: usize, a: &[u32], b: &[u32], out: &mut [f32; BF16_MR * BF16_NR]) {
        assert!(a.len() >= pairs * BF16_MR && b.len() >= pairs * BF16_NR);
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
        for (r, acc_row) in acc.iter().enumerate() {
            for (v, &acc_v) in acc_row.iter().enumerate() {
                // SAFETY: 16 floats at (r, 16 v) are inside the MR x NR array.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * BF16_NR + 16 * v), acc_v) };
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::{Bf16Mat, MatRef, Operand, pack_pair_blocks, pack_pairs_scalar};
    use crate::bf16::{Bf16, Isa};
    use proptest::prelude::*;

    /// Values with the awkward ones mixed in: zeros of both signs, subnormals (flushed), NaN,
    /// infinities and exact rounding ties (odd and even kept part).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let special = [
            0.0f32,
            -0.0,
            1e-40,
            -1e-40,
            f32::NAN,
            f32::INFINITY,
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
        ];
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                match s % 8 {
                    0 => special[(s >> 8) as usize % special.len()],
                    _ => ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0,
                }
            })
            .collect()
    }

    /// Packs one way and the other into buffers that start with a sentinel; equal bits.
    #[allow(clippy::too_many_arguments)]
    fn check(
        x: &Operand,
        line0: usize,
        width: usize,
        p0: usize,
        pairs: usize,
        pair_major: bool,
        pad: usize,
    ) -> Result<(), TestCaseError> {
        let strides = if pair_major {
            (1, width + pad)
        } else {
            (pairs + pad, 1)
        };
        let len = (width - 1) * strides.0 + (pairs - 1) * strides.1 + 1 + pad;
        let (mut ours, mut twin) = (vec![0xDEAD_BEEFu32; len], vec![0xDEAD_BEEFu32; len]);
        pack_pair_blocks(x, (line0, width), (p0, pairs), strides, &mut ours);
        pack_pairs_scalar(
            x,
            (line0, width),
            (p0, pairs),
            strides,
            &mut twin,
            Isa::Portable,
        );
        prop_assert_eq!(ours, twin);
        Ok(())
    }

    proptest! {
        #[test]
        fn vector_packing_matches_the_scalar_twin(
            (lines, depth) in (1usize..40, 1usize..70),
            (line0, width) in (0usize..42, 1usize..40),
            (p0, pairs) in (0usize..37, 1usize..40),
            form in 0usize..5,
            (pair_major, pad) in (any::<bool>(), 0usize..3),
            seed in any::<u64>(),
        ) {
            if !Isa::Avx512Bf16.is_supported() {
                return Ok(());
            }
            let data = values(lines * depth, seed);
            let mask_data = values(lines * depth, seed ^ 1);
            let bits: Vec<Bf16> = data.iter().map(|&v| Bf16::from_f32(v)).collect();
            // Forms: along K without and with a mask, across lines without and with a mask,
            // bf16 values.
            let along = |d| MatRef::new(d, lines, depth);
            let across = |d| MatRef::new(d, depth, lines).t();
            let x = match form {
                0 => Operand::Rounded { x: along(&data), mask: None },
                1 => Operand::Rounded { x: along(&data), mask: Some(along(&mask_data)) },
                2 => Operand::Rounded { x: across(&data), mask: None },
                3 => Operand::Rounded { x: across(&data), mask: Some(across(&mask_data)) },
                _ => Operand::Bf16(Bf16Mat::new(&bits, lines, depth)),
            };
            check(&x, line0, width, p0, pairs, pair_major, pad)?;
        }
    }
}
