//! The register-tile microkernel: C[MR x NR] (op)= A[MR x k] . B[k x NR], NR = NV vectors.
//!
//! Per step of k: NV vector loads of one B row, MR broadcasts of one A column, MR * NV FMAs
//! into accumulators that never leave registers (MR * NV of them: 24 of the 32 zmm registers
//! on AVX-512 with a 12 x 32 tile, 12 of the 16 ymm on AVX2 with BLIS's Haswell 6 x 16 tile;
//! [`SimdVec::GEMM_MR`]). That is 2 + 12 loads per 24 FMAs, inside the two-loads-per-cycle
//! budget that feeds two FMA ports.
//!
//! A is either packed (MR values per k step, contiguous) or read in place through strides; B is
//! either packed (NR values per k step, zero-padded, so full-width loads are always safe) or
//! read in place from rows of the caller's matrix, with masked loads on a right-edge tile.
//! The epilogue (alpha, beta, bias, ReLU, output mask) is applied as the tile is stored; rows past `m` and
//! columns past `n` are never written.

use crate::simd::{SimdVec, prefetch_read, prefetch_write};

/// Vectors per row of the wide microkernel's tile (NR = WIDE_NV * LANES columns).
pub const WIDE_NV: usize = 2;

/// How many k steps ahead the microkernel prefetches its operands.
const PREFETCH_STEPS: usize = 8;

/// Fewest k steps for which the tile prefetches its C rows before the k loop: a shorter loop
/// ends before the lines arrive, and the MR * NV prefetches then only add to the tile's fixed
/// cost (dX of a one-output layer has k = 1, the 13-input layer's forward k = 13).
const PREFETCH_C_MIN_K: usize = 32;

/// One tile's operands. Pointers are already offset to the tile's first element.
pub struct Tile {
    pub k: usize,
    pub a: *const f32,
    /// Stride between rows of A (unused when A is packed).
    pub a_rs: usize,
    /// Stride between k steps of A (unused when A is packed).
    pub a_cs: usize,
    pub b: *const f32,
    /// Stride between k steps (rows) of B: NR when packed.
    pub b_rs: usize,
    pub c: *mut f32,
    pub c_rs: usize,
    /// Valid rows of C in this tile (<= MR).
    pub m: usize,
    /// Valid columns of C in this tile (<= NR).
    pub n: usize,
    /// The output mask's element at the tile's first row and column, or null: C is stored as
    /// C ⊙ [mask > 0] (see [`super::GemmOps::c_relu_mask`]).
    pub c_mask: *const f32,
    pub c_mask_rs: usize,
}

/// How the accumulated tile is merged into C: C = relu(alpha * acc + beta * C + bias).
#[derive(Clone, Copy)]
pub struct StoreOps {
    pub alpha: f32,
    /// 0 means C is not read at all (it may hold garbage, as in BLAS).
    pub beta: f32,
    /// Bias for the tile's first column, or null.
    pub bias: *const f32,
    pub relu: bool,
}

/// Computes one MR x (NV * LANES) tile, in a function compiled for `V`'s level.
///
/// # Safety
/// - A: when `A_PACKED`, `MR * k` readable floats at `t.a`; otherwise element (i, p) at
///   `t.a + i * a_rs + p * a_cs` readable for i < MR, p < k.
/// - B: row p at `t.b + p * b_rs`, `NV * LANES` readable floats when `B_FULL`, else `t.n`.
/// - C: row i at `t.c + i * c_rs`, `t.n` writable (and readable if beta != 0) floats, i < t.m.
/// - bias: null or `t.n` readable floats.
/// - c_mask: null, or row i at `t.c_mask + i * c_mask_rs` with `t.n` readable floats, i < t.m.
#[inline(never)]
pub unsafe fn tile<
    V: SimdVec,
    const MR: usize,
    const NV: usize,
    const A_PACKED: bool,
    const B_FULL: bool,
>(
    t: &Tile,
    s: &StoreOps,
) {
    // SAFETY: forwarded from the caller.
    V::vectorize(
        #[inline(always)]
        || unsafe { tile_body::<V, MR, NV, A_PACKED, B_FULL>(t, s) },
    )
}

/// The body of [`tile`], inlined into its `#[target_feature]` wrapper.
///
/// # Safety
/// As for [`tile`].
#[inline(always)]
unsafe fn tile_body<
    V: SimdVec,
    const MR: usize,
    const NV: usize,
    const A_PACKED: bool,
    const B_FULL: bool,
>(
    t: &Tile,
    s: &StoreOps,
) {
    let lanes = V::LANES;
    let mut cnt = [lanes; NV];
    for (v, c) in cnt.iter_mut().enumerate() {
        *c = t.n.saturating_sub(v * lanes).min(lanes);
    }
    if t.k >= PREFETCH_C_MIN_K {
        for i in 0..MR.min(t.m) {
            // Warm the C rows for the store while the k loop runs.
            prefetch_write(t.c.wrapping_add(i * t.c_rs));
            prefetch_write(t.c.wrapping_add(i * t.c_rs + NV * lanes - 1));
        }
    }

    let zero = V::splat(0.0);
    let mut acc = [[zero; NV]; MR];
    let mut a = t.a;
    let mut b = t.b;
    let a_step = if A_PACKED { MR } else { t.a_cs };
    for _ in 0..t.k {
        // Request the operands PREFETCH_STEPS k steps ahead: B's row (NV vectors, one line
        // each on AVX-512) and A's column. Measured +2-7% on the DLRM layer shapes and 1024^3
        // (interleaved A/B runs, one thread), as the B micro-panel does not stay in L1 whole.
        for v in 0..NV {
            prefetch_read(b.wrapping_add(PREFETCH_STEPS * t.b_rs + v * lanes));
        }
        prefetch_read(a.wrapping_add(PREFETCH_STEPS * a_step));
        let mut bv = [zero; NV];
        for v in 0..NV {
            // SAFETY: row p of B has NV*LANES (B_FULL) or cnt[v] readable floats at offset v*LANES.
            bv[v] = unsafe {
                if B_FULL {
                    V::load(b.add(v * lanes))
                } else {
                    V::load_partial(b.add(v * lanes), cnt[v])
                }
            };
        }
        for (i, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: element (i, p) of A is readable (packed: MR per step; else via strides).
            let ai = unsafe {
                if A_PACKED {
                    *a.add(i)
                } else {
                    *a.add(i * t.a_rs)
                }
            };
            let av = V::splat(ai);
            for v in 0..NV {
                acc_row[v] = av.mul_add(bv[v], acc_row[v]);
            }
        }
        a = a.wrapping_add(a_step);
        b = b.wrapping_add(t.b_rs);
    }

    let alpha = V::splat(s.alpha);
    let beta = V::splat(s.beta);
    for (i, acc_row) in acc.iter().enumerate() {
        if i >= t.m {
            break;
        }
        let crow = t.c.wrapping_add(i * t.c_rs);
        for v in 0..NV {
            let n = cnt[v];
            if n == 0 {
                continue;
            }
            let cp = crow.wrapping_add(v * lanes);
            // alpha = 1 (every product of a layer) leaves the accumulator as it is.
            let mut r = if s.alpha == 1.0 {
                acc_row[v]
            } else {
                acc_row[v] * alpha
            };
            // SAFETY: n floats of C row i (and of bias and the mask) at offset v*LANES are valid.
            unsafe {
                if s.beta != 0.0 {
                    let old = if n == lanes {
                        V::load(cp)
                    } else {
                        V::load_partial(cp, n)
                    };
                    r = old.mul_add(beta, r);
                }
                if !s.bias.is_null() {
                    let bp = s.bias.add(v * lanes);
                    r += if n == lanes {
                        V::load(bp)
                    } else {
                        V::load_partial(bp, n)
                    };
                }
                if s.relu {
                    r = r.max(zero);
                }
                if !t.c_mask.is_null() {
                    let mp = t.c_mask.add(i * t.c_mask_rs + v * lanes);
                    let mask = if n == lanes {
                        V::load(mp)
                    } else {
                        V::load_partial(mp, n)
                    };
                    // All-ones lanes where mask > 0: AND keeps r there, zero elsewhere.
                    r = mask.simd_gt(zero) & r;
                }
                if n == lanes {
                    V::store(cp, r)
                } else {
                    V::store_partial(cp, n, r)
                }
            }
        }
    }
}
