//! The BF16 product on Intel AMX tiles (Advanced Matrix Extensions: Intel SDM vol. 1 ch. 18,
//! "Intel AMX"; Intel Architecture Instruction Set Extensions Programming Reference ch. 3).
//!
//! Eight tile registers of up to 16 rows x 64 bytes. TDPBF16PS tC, tA, tB computes, for
//! m, n < 16 and k pairs p < 16,
//! `tC[m].f32[n] += tA[m].bf16[2p] * tB[p].bf16[2n] + tA[m].bf16[2p+1] * tB[p].bf16[2n+1]`:
//! a 16 x 16 f32 tile += a 16 x 32 bf16 A tile . a 32 x 16 B tile, 16K FLOPs per instruction.
//! A's rows are K pairs of one row of A; B's rows hold, for each of 16 columns, the pair
//! (B[2p, n], B[2p+1, n]) (the "VNNI" layout). Both are exactly [`pack_pairs`] layouts: A tile =
//! 16 lines x 16 pairs (line stride 16 lanes), B tile = 16 pairs x 16 lines (pair stride 16).
//!
//! Blocking: a 32 x 32 block of C in four accumulator tiles (tmm0..3), fed by two A tiles
//! (tmm4, tmm5) and two B tiles (tmm6, tmm7): four tile loads per four TDPBF16PS. Each tile is
//! packed contiguous (1 KiB, 64-byte rows), K padded with zeros to a multiple of 32 and the
//! lines to a multiple of 32, so every tile is full and one configuration serves all shapes.
//! B is packed once per product (shared by the threads), A per task of [`MC`] rows, with the
//! bf16 rounding and the ReLU mask fused into the packing. A C block runs over the whole of K
//! in the tiles and is then stored through the f32 epilogue, so the K order is fixed by the
//! shape alone and threads (splitting M only) never change the bits.
//!
//! Linux only hands the tile data state to a process that asks for it:
//! `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` (Documentation/arch/x86/xstate.rst);
//! [`tiles_usable`] asks once, after checking CPUID and XCR0.

use super::bf16::{Contiguity, Epilogue, MIN_PARALLEL_FLOPS, Operand, SharedC, pack_pairs};
use crate::bf16::Isa;
use crate::mat::MatRef;
use crate::parallel::{Par, should_split};
use crate::scratch::{PACK_A, PACK_B, with_scratch};
use core::arch::asm;
use core::arch::x86_64::*;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows (and columns) of a tile of C; pairs of K per tile of A or B.
const TILE: usize = 16;
/// 32-bit lanes in one packed tile (16 rows of 64 bytes).
const TILE_LANES: usize = TILE * TILE;
/// Rows of C per task: two 32-row blocks, their A tiles (64 rows x K x 2 bytes, 48 KiB for
/// K = 367) stay in L2 while the task walks N. A constant of the shape only.
const MC: usize = 64;

/// Whether this process can run AMX-BF16 tile instructions: the CPU has AMX-TILE and AMX-BF16
/// (CPUID.(EAX=7,ECX=0):EDX bits 24 and 22), the OS enabled the tile state in XCR0 (bits 17
/// TILECFG and 18 TILEDATA) and Linux granted the permission to use it. Checked once.
pub fn tiles_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use core::arch::x86_64::__cpuid_count;
    if __cpuid_count(0, 0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 || !osxsave {
        return false;
    }
    let (xcr0_lo, _xcr0_hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0; it is available because CPUID reported OSXSAVE.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") xcr0_lo, out("edx") _xcr0_hi,
             options(nomem, nostack, preserves_flags));
    }
    if xcr0_lo & (3 << 17) != 3 << 17 {
        return false;
    }
    // arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18), syscall 158 on x86_64.
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: a plain Linux system call: it only changes the process's permitted xstate
    // features; the kernel clobbers rcx and r11, declared here; no memory is passed.
    unsafe {
        asm!("syscall",
             inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
             in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The 64-byte tile configuration of LDTILECFG, palette 1 (SDM vol. 1, 18.2.2).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile.
    colsb: [u16; 16],
    /// Rows of each tile.
    rows: [u8; 16],
}

/// The tiles configured for this thread (tmm0..7: 16 rows x 64 bytes); released on drop.
struct Tiles(());

impl Tiles {
    /// # Safety
    /// [`tiles_usable`] returned true.
    unsafe fn configure() -> Tiles {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = TILE as u8;
        }
        // SAFETY: AMX is usable (caller); the configuration is valid for palette 1 (8 tiles of
        // at most 16 rows x 64 bytes, the rest zero) and 64 readable bytes.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly, preserves_flags));
        }
        Tiles(())
    }

    /// A 32 x 32 f32 block = A . B over all of K, stored at `c` (row r at `c + r * rs` floats):
    /// `a` are the runs of A tiles of its two 16-row halves, `b` those of B's two 16-column
    /// halves, each `k_tiles` contiguous packed tiles (16 K pairs each).
    ///
    /// # Safety
    /// `a[0]`, `a[1]`, `b[0]`, `b[1]` each point to `k_tiles >= 1` readable tiles of
    /// TILE_LANES lanes; `c` is writable for 32 rows of 32 floats at row stride `rs`, and no
    /// other thread accesses them meanwhile.
    unsafe fn block(
        &self,
        a: [*const u32; 2],
        b: [*const u32; 2],
        k_tiles: usize,
        (c, rs): (*mut f32, usize),
    ) {
        debug_assert!(k_tiles >= 1);
        // SAFETY: the tiles are configured (self exists); the loads read k_tiles tiles of
        // 1 KiB (16 rows of 64 bytes) at each of the four pointers, in bounds (caller); the
        // stores write four 16 x 64-byte tiles inside the 32 x 32 block at `c` (caller).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {s64}*1]",
                "tileloadd tmm5, [{a1} + {s64}*1]",
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tileloadd tmm7, [{b1} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 1024",
                "add {a1}, 1024",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c0} + {cs}*1], tmm0",
                "tilestored [{c0} + {cs}*1 + 64], tmm1",
                "tilestored [{c1} + {cs}*1], tmm2",
                "tilestored [{c1} + {cs}*1 + 64], tmm3",
                a0 = inout(reg) a[0] => _,
                a1 = inout(reg) a[1] => _,
                b0 = inout(reg) b[0] => _,
                b1 = inout(reg) b[1] => _,
                n = inout(reg) k_tiles => _,
                s64 = in(reg) 64usize,
                cs = in(reg) 4 * rs,
                c0 = in(reg) c,
                c1 = in(reg) c.wrapping_add(TILE * rs),
                options(nostack),
            );
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure`; TILERELEASE returns them to the
        // init state, touching no memory.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    }
}

/// A 32 x 32 f32 block of C as the tiles store it.
#[repr(C, align(64))]
struct Block([f32; 4 * TILE_LANES]);

/// Packs the lines of `x` from `line0` on into `out` as runs of tiles, one run per 16 lines:
/// its `k_tiles` tiles of 16 K pairs, as A tiles (a line per tile row) or B tiles (a pair per
/// tile row).
fn pack_tiles(x: &Operand, line0: usize, k_tiles: usize, b_tiles: bool, out: &mut [u32]) {
    for (t, run) in out.chunks_exact_mut(k_tiles * TILE_LANES).enumerate() {
        for (q, tile) in run.chunks_exact_mut(TILE_LANES).enumerate() {
            pack_tile(x, line0 + t * TILE, q * TILE, b_tiles, tile);
        }
    }
}

/// One tile of 16 lines from `line0` x 16 K pairs from `p0`: `out[r * 16 + q]` (A tile) or
/// `out[q * 16 + r]` (B tile) = the pair (x[line, 2p], x[line, 2p + 1]), zero past the operand.
fn pack_tile(x: &Operand, line0: usize, p0: usize, b_tile: bool, out: &mut [u32]) {
    let tile: &mut PairBlock = out.try_into().expect("a tile is 16 x 16 lanes");
    if !pair_block(x, (line0, TILE), p0, b_tile, tile) {
        let layout = if b_tile { (1, TILE) } else { (TILE, 1) };
        pack_pairs(x, (line0, TILE), (p0, TILE), layout, out, Isa::Amx);
    }
}

/// 16 x 16 pairs, row r at `[16 r..]`.
pub(super) type PairBlock = [u32; TILE_LANES];

/// Writes the pairs (x[line0 + r, 2(p0 + q)], x[line0 + r, 2(p0 + q) + 1]) for r < 16,
/// q < 16 into `t`, at `t[16 q + r]` (`pair_major`) or `t[16 r + q]`; only the first
/// `width <= 16` lines are read, the others and everything past the operand are zero. Vector
/// loads along the contiguous direction give the block in one orientation, a 16 x 16
/// transpose of the 32-bit pairs the other. Returns false (and writes nothing) when the
/// operand is contiguous in neither direction.
pub(super) fn pair_block(
    x: &Operand,
    (line0, width): (usize, usize),
    p0: usize,
    pair_major: bool,
    t: &mut PairBlock,
) -> bool {
    debug_assert!(width <= TILE);
    let across = match x.contiguity() {
        Contiguity::Along => false,
        Contiguity::Across => true,
        Contiguity::Neither => return false,
    };
    let k0 = 2 * p0;
    if let Operand::Rounded { x, mask } = *x
        && width == TILE
        && line0 + TILE <= x.rows()
        && k0 + 2 * TILE <= x.cols()
    {
        // SAFETY: as below; the block lies wholly inside `x` (and its mask, of the same shape).
        unsafe { full_block(x, mask, (line0, k0), across, pair_major, t) };
        return true;
    }
    t.fill(0);
    // SAFETY: the BF16 paths that pack pairs (AMX, AVX512-BF16) require AVX512-BF16, F and BW
    // (`Isa::is_supported`).
    unsafe {
        if across {
            pairs_across(x, (line0, width), k0, t);
        } else {
            pairs_along(x, (line0, width), k0, t);
        }
        // `t` is line-major (t[r][q]) when read along K, pair-major (t[q][r]) when read across.
        if across != pair_major {
            transpose16(t);
        }
    }
    true
}

/// [`pair_block`] for a block of 16 lines x 32 K values wholly inside `x` (and `mask`): the
/// 16 vectors of pairs are built and, when the orientation asks, transposed in registers, then
/// stored once. Without the edge cases' zero fill, lane masks and round trip through `t`, the
/// Kaggle layers' weights pack 2-2.8x faster along K and 1.4x across lines (one thread,
/// in cache); the training step packs every layer's weights both ways each step.
///
/// # Safety
/// AVX512-BF16, F and BW; `x` (and `mask`) is contiguous along K (`across` false) or across
/// lines (`across` true), and holds lines `line0 .. line0 + 16` and depth `k0 .. k0 + 32`.
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
unsafe fn full_block(
    x: MatRef,
    mask: Option<MatRef>,
    (line0, k0): (usize, usize),
    across: bool,
    pair_major: bool,
    t: &mut PairBlock,
) {
    // 16 f32 values at (i, j) and onwards along the contiguous direction, zeroed where the
    // mask is not positive (as `masked_f32`).
    let load = |i: usize, j: usize| {
        // SAFETY: 16 values from (i, j) lie inside x and mask along the contiguous direction
        // (caller).
        unsafe {
            let keep = match mask {
                None => u16::MAX,
                Some(mk) => {
                    let m = _mm512_loadu_ps(mk.ptr_at(i, j));
                    _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, _mm512_setzero_ps())
                }
            };
            _mm512_maskz_loadu_ps(keep, x.ptr_at(i, j))
        }
    };
    // Lane 2i <- lane i (even K step), lane 2i + 1 <- lane 16 + i (odd).
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let rows: [__m512i; TILE] = if across {
        // Row q: the pairs of K steps k0 + 2q, k0 + 2q + 1 across the 16 lines.
        core::array::from_fn(|q| {
            let (k, l) = (k0 + 2 * q, line0);
            let bf = _mm512_cvtne2ps_pbh(load(l, k + 1), load(l, k));
            // SAFETY: a 512-bit vector reinterpreted as another; all bit patterns valid.
            let halves = unsafe { core::mem::transmute::<__m512bh, __m512i>(bf) };
            _mm512_permutexvar_epi16(interleave, halves)
        })
    } else {
        // Row r: line line0 + r's 32 K values as 16 pairs.
        core::array::from_fn(|r| {
            let (l, k) = (line0 + r, k0);
            // VCVTNE2PS2BF16: the second source fills the low 16 bf16 lanes, in K order.
            let bf = _mm512_cvtne2ps_pbh(load(l, k + 16), load(l, k));
            // SAFETY: a 512-bit vector reinterpreted as another; all bit patterns valid.
            unsafe { core::mem::transmute::<__m512bh, __m512i>(bf) }
        })
    };
    let rows = if across != pair_major {
        transpose16_regs(rows)
    } else {
        rows
    };
    for (row, v) in t.chunks_exact_mut(TILE).zip(rows) {
        // SAFETY: a row of t is 64 bytes.
        unsafe { _mm512_storeu_si512(row.as_mut_ptr().cast(), v) };
    }
}

/// Transposes a 16 x 16 block of 32-bit lanes held in `t`.
///
/// # Safety
/// AVX512F.
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(t: &mut PairBlock) {
    // SAFETY: row i of t is the 64 bytes at 16 i.
    let r: [__m512i; TILE] =
        core::array::from_fn(|i| unsafe { _mm512_loadu_si512(t[TILE * i..].as_ptr().cast()) });
    for (i, v) in transpose16_regs(r).into_iter().enumerate() {
        // SAFETY: row i of t is the 64 bytes at 16 i.
        unsafe { _mm512_storeu_si512(t[TILE * i..].as_mut_ptr().cast(), v) };
    }
}

/// Transposes a 16 x 16 block of 32-bit lanes in registers: 32-bit and 64-bit unpacks within
/// the 128-bit lanes, then a 4 x 4 transpose of the 128-bit lanes (the usual AVX-512 16 x 16
/// transpose; Intel optimization manual, "matrix transposition").
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16_regs(r: [__m512i; TILE]) -> [__m512i; TILE] {
    let mut out = [_mm512_setzero_si512(); TILE];
    // Rows 2i, 2i + 1 interleaved: per 128-bit lane L, columns 4L, 4L + 1 (even) and
    // 4L + 2, 4L + 3 (odd) of the two rows.
    let mut pairs = [_mm512_setzero_si512(); TILE];
    for i in 0..TILE / 2 {
        pairs[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        pairs[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // quads[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 4.
    let mut quads = [_mm512_setzero_si512(); TILE];
    for i in 0..TILE / 4 {
        let (e0, o0, e1, o1) = (
            pairs[4 * i],
            pairs[4 * i + 1],
            pairs[4 * i + 2],
            pairs[4 * i + 3],
        );
        quads[4 * i] = _mm512_unpacklo_epi64(e0, e1);
        quads[4 * i + 1] = _mm512_unpackhi_epi64(e0, e1);
        quads[4 * i + 2] = _mm512_unpacklo_epi64(o0, o1);
        quads[4 * i + 3] = _mm512_unpackhi_epi64(o0, o1);
    }
    // Column 4L + c: lane L of quads[c], quads[4 + c], quads[8 + c], quads[12 + c].
    for c in 0..4 {
        let (q0, q1, q2, q3) = (quads[c], quads[4 + c], quads[8 + c], quads[12 + c]);
        let low01 = _mm512_shuffle_i32x4::<0x44>(q0, q1);
        let high01 = _mm512_shuffle_i32x4::<0xEE>(q0, q1);
        let low23 = _mm512_shuffle_i32x4::<0x44>(q2, q3);
        let high23 = _mm512_shuffle_i32x4::<0xEE>(q2, q3);
        let cols = [
            _mm512_shuffle_i32x4::<0x88>(low01, low23),
            _mm512_shuffle_i32x4::<0xDD>(low01, low23),
            _mm512_shuffle_i32x4::<0x88>(high01, high23),
            _mm512_shuffle_i32x4::<0xDD>(high01, high23),
        ];
        for (l, v) in cols.into_iter().enumerate() {
            out[4 * l + c] = v;
        }
    }
    out
}

/// The first `n <= 16` lanes.
fn lanes16(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// 16 f32 values at `p` (the first `n`), zeroed where the mask at `mp` is not positive,
/// rounded to bf16 (VCVTNEPS2BF16, as `Bf16::from_f32`).
///
/// # Safety
/// AVX512-BF16 and F; `n` floats readable at `p` and at `mp` (when given).
#[inline]
#[target_feature(enable = "avx512bf16,avx512f")]
unsafe fn masked_f32(p: *const f32, mp: Option<*const f32>, n: usize) -> __m512 {
    let lanes = lanes16(n);
    // SAFETY: only the first n lanes are read (caller).
    unsafe {
        let keep = match mp {
            None => lanes,
            Some(mp) => {
                let m = _mm512_maskz_loadu_ps(lanes, mp);
                _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(lanes, m, _mm512_setzero_ps())
            }
        };
        _mm512_maskz_loadu_ps(keep, p)
    }
}

/// Line-major pairs: `t[r][q]` = (x[line0 + r, k0 + 2q], x[line0 + r, k0 + 2q + 1]) for
/// r < width, x read along K (32 values per line, masked at the operand's edges).
///
/// # Safety
/// AVX512-BF16, F and BW; `x` is [`Contiguity::Along`].
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
unsafe fn pairs_along(x: &Operand, (line0, width): (usize, usize), k0: usize, t: &mut PairBlock) {
    let valid = x.depth().saturating_sub(k0).min(2 * TILE);
    let lines = x.lines().saturating_sub(line0).min(width);
    if valid == 0 {
        return;
    }
    for (r, row) in t.chunks_exact_mut(TILE).enumerate().take(lines) {
        let v = match x {
            Operand::Rounded { x, mask } => {
                let xs = x.row_slice(line0 + r, k0, valid);
                let ms = mask.map(|mk| mk.row_slice(line0 + r, k0, valid));
                let half = |h: usize| {
                    let n = valid.saturating_sub(16 * h);
                    let at = |s: &[f32]| s.as_ptr().wrapping_add(16 * h);
                    // SAFETY: n <= 16 floats from 16 h are inside the slices (len = valid).
                    unsafe { masked_f32(at(xs), ms.map(at), n) }
                };
                let (lo, hi) = (half(0), half(1));
                // VCVTNE2PS2BF16: the second source fills the low 16 bf16 lanes, in K order.
                let bf = _mm512_cvtne2ps_pbh(hi, lo);
                // SAFETY: a 512-bit vector reinterpreted as another; all bit patterns valid.
                unsafe { core::mem::transmute::<__m512bh, __m512i>(bf) }
            }
            Operand::Bf16(b) => {
                let row = &b.data()[(line0 + r) * b.cols() + k0..][..valid];
                let lanes = ((1u64 << valid) - 1) as u32;
                // SAFETY: the first `valid` u16 lanes are inside `row`.
                unsafe { _mm512_maskz_loadu_epi16(lanes, row.as_ptr().cast()) }
            }
        };
        // SAFETY: a row of t is 64 bytes.
        unsafe { _mm512_storeu_si512(row.as_mut_ptr().cast(), v) };
    }
}

/// Pair-major pairs: `t[q][r]` = (x[line0 + r, k0 + 2q], x[line0 + r, k0 + 2q + 1]) for
/// r < width, x read across lines (16 values per K step, masked at the operand's edges).
///
/// # Safety
/// AVX512-BF16 and F; `x` is [`Contiguity::Across`] (so f32 values).
#[target_feature(enable = "avx512bf16,avx512f")]
unsafe fn pairs_across(x: &Operand, (line0, width): (usize, usize), k0: usize, t: &mut PairBlock) {
    let Operand::Rounded { x, mask } = x else {
        unreachable!("bf16 operands are read along K");
    };
    let n = x.rows().saturating_sub(line0).min(width);
    if n == 0 {
        return;
    }
    let (xt, mt) = (x.t(), mask.map(|mk| mk.t()));
    // One K step across the lines, rounded, zero-extended to 32-bit lanes.
    let step = |k: usize| {
        if k >= xt.rows() {
            return _mm512_setzero_si512();
        }
        let xs = xt.row_slice(k, line0, n);
        let ms = mt.map(|mk| mk.row_slice(k, line0, n).as_ptr());
        // SAFETY: n floats readable in both slices.
        let v = unsafe { masked_f32(xs.as_ptr(), ms, n) };
        let bf = _mm512_cvtneps_pbh(v);
        // SAFETY: a 256-bit vector reinterpreted as another; all bit patterns valid.
        let h = unsafe { core::mem::transmute::<__m256bh, __m256i>(bf) };
        _mm512_cvtepu16_epi32(h)
    };
    for (q, row) in t.chunks_exact_mut(TILE).enumerate() {
        let (even, odd) = (step(k0 + 2 * q), step(k0 + 2 * q + 1));
        let pairs = _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd));
        // SAFETY: a row of t is 64 bytes.
        unsafe { _mm512_storeu_si512(row.as_mut_ptr().cast(), pairs) };
    }
}

/// `f32` scratch viewed as 32-bit lanes.
fn as_lanes(buf: &mut [f32]) -> &mut [u32] {
    // SAFETY: f32 and u32 have the same size and alignment and every bit pattern is valid
    // in both; the exclusive borrow moves to the result.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u32>(), buf.len()) }
}

/// Lanes of B (N lines x K) packed as AMX tiles: N and K each padded to multiples of 32.
pub(super) fn packed_b_len(k: usize, n: usize) -> usize {
    n.div_ceil(2 * TILE) * 2 * k.div_ceil(2 * TILE) * TILE_LANES
}

/// B packed whole as runs of B tiles, one run of all K per 16 lines ([`packed_b_len`]
/// lanes); runs in parallel when `parallel`.
pub(super) fn pack_b(b: &Operand, out: &mut [u32], parallel: bool) {
    let k_tiles = b.depth().div_ceil(2 * TILE);
    let run = k_tiles * TILE_LANES;
    debug_assert_eq!(out.len(), packed_b_len(b.depth(), b.lines()));
    let pack_run = |(t, out): (usize, &mut [u32])| pack_tiles(b, t * TILE, k_tiles, true, out);
    if parallel {
        out.par_chunks_mut(run).enumerate().for_each(pack_run);
    } else {
        out.chunks_mut(run).enumerate().for_each(pack_run);
    }
}

/// C = epilogue(A . B^T) on AMX tiles.
pub(super) fn product(a: Operand, b: Operand, c: super::MatMut, epi: &Epilogue, par: Par) {
    let (m, k, n) = (a.lines(), a.depth(), b.lines());
    let parallel = should_split(par, 2 * m * n * k, MIN_PARALLEL_FLOPS);
    with_scratch(&PACK_B, packed_b_len(k, n), |b_buf| {
        let b_packed = as_lanes(b_buf);
        pack_b(&b, b_packed, parallel);
        product_packed(a, b_packed, c, epi, par);
    });
}

/// C = epilogue(A . B^T) on AMX tiles, B packed by [`pack_b`] (N = C's columns): threads
/// split C into MC-row tasks.
pub(super) fn product_packed(
    a: Operand,
    b_packed: &[u32],
    c: super::MatMut,
    epi: &Epilogue,
    par: Par,
) {
    let (m, k, n) = (a.lines(), a.depth(), c.cols);
    assert!(tiles_usable(), "AMX kernels without the tile permission");
    assert_eq!(b_packed.len(), packed_b_len(k, n), "packed B's shape");
    let k_tiles = k.div_ceil(2 * TILE);
    let parallel = should_split(par, 2 * m * n * k, MIN_PARALLEL_FLOPS);
    let c = SharedC::new(c);
    let task = |t: usize| rows_task(&a, b_packed, (t * MC, k_tiles), c, epi);
    let tasks = m.div_ceil(MC);
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Rows i0 .. i0 + MC of C: packs their A tiles, then every 32 x 32 block over all of K.
fn rows_task(
    a: &Operand,
    b_packed: &[u32],
    (i0, k_tiles): (usize, usize),
    c: SharedC,
    epi: &Epilogue,
) {
    let run = k_tiles * TILE_LANES;
    let n_tiles = b_packed.len() / run;
    let m_tiles = MC.min(a.lines() - i0).div_ceil(2 * TILE) * 2;
    with_scratch(&PACK_A, m_tiles * run, |a_buf| {
        let a_packed = as_lanes(a_buf);
        pack_tiles(a, i0, k_tiles, false, a_packed);
        let mut block = Block([0.0; 4 * TILE_LANES]);
        // SAFETY: `product` asserted `tiles_usable`.
        let tiles = unsafe { Tiles::configure() };
        for jt in (0..n_tiles).step_by(2) {
            let b_runs = [
                b_packed[jt * run..].as_ptr(),
                b_packed[(jt + 1) * run..].as_ptr(),
            ];
            for it in (0..m_tiles).step_by(2) {
                let a_runs = [
                    a_packed[it * run..].as_ptr(),
                    a_packed[(it + 1) * run..].as_ptr(),
                ];
                // C's lines are requested for writing while the tiles multiply (hundreds of
                // cycles for the DLRM layers' K), so the store below finds them in cache
                // instead of waiting on each read-for-ownership: 1.08-1.12x on the bf16
                // training step (Kaggle, batch 2048).
                let at = (i0 + it * TILE, jt * TILE);
                c.prefetch(at, (2 * TILE, 2 * TILE));
                // A plain product's block inside C (a weight gradient's, all but its edges)
                // goes from the tiles straight to C: the epilogue would copy it unchanged.
                if let Some(whole) = c.whole_block(at, 2 * TILE).filter(|_| epi.is_identity()) {
                    // SAFETY: as below; the 32 x 32 block at `whole` lies inside C, in the rows
                    // this task alone owns.
                    unsafe { tiles.block(a_runs, b_runs, k_tiles, whole) };
                    continue;
                }
                // SAFETY: tiles it, it + 1 < m_tiles and jt, jt + 1 < n_tiles each start a run
                // of k_tiles >= 1 (K > 0 here) full tiles in the packed buffers; `block` holds
                // 32 x 32 floats at row stride 32.
                unsafe { tiles.block(a_runs, b_runs, k_tiles, (block.0.as_mut_ptr(), 2 * TILE)) };
                // SAFETY: the CPU has AVX512F (Isa::Amx requires AVX512-BF16); this task alone
                // owns rows i0 .. i0 + MC of C; the block holds 32 x 32 floats.
                unsafe { c.store(&block.0, 2 * TILE, at, epi) };
            }
        }
    });
}
