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

use super::bf16::{Epilogue, MIN_PARALLEL_FLOPS, Operand, SharedC, pack_pairs};
use crate::bf16::Isa;
use crate::parallel::{Par, should_split};
use core::arch::asm;
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

    /// C block (32 x 32 f32, row stride 32) = A . B over all of K: `a` are the runs of A tiles
    /// of its two 16-row halves, `b` those of B's two 16-column halves, each `k_tiles`
    /// contiguous packed tiles (16 K pairs each).
    ///
    /// # Safety
    /// `a[0]`, `a[1]`, `b[0]`, `b[1]` each point to `k_tiles >= 1` readable tiles of
    /// TILE_LANES lanes; `c` holds 32 x 32 floats.
    unsafe fn block(&self, a: [*const u32; 2], b: [*const u32; 2], k_tiles: usize, c: &mut Block) {
        debug_assert!(k_tiles >= 1);
        // SAFETY: the tiles are configured (self exists); the loads read k_tiles tiles of
        // 1 KiB (16 rows of 64 bytes) at each of the four pointers, in bounds (caller); the
        // stores write four 16 x 64-byte tiles inside the 4 KiB block (row stride 128).
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
                "tilestored [{c} + {s128}*1], tmm0",
                "tilestored [{c} + {s128}*1 + 64], tmm1",
                "tilestored [{c} + {s128}*1 + 2048], tmm2",
                "tilestored [{c} + {s128}*1 + 2112], tmm3",
                a0 = inout(reg) a[0] => _,
                a1 = inout(reg) a[1] => _,
                b0 = inout(reg) b[0] => _,
                b1 = inout(reg) b[1] => _,
                n = inout(reg) k_tiles => _,
                s64 = in(reg) 64usize,
                s128 = in(reg) 128usize,
                c = in(reg) c.0.as_mut_ptr(),
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
fn pack_tiles(x: &Operand, line0: usize, k_tiles: usize, a_layout: bool, out: &mut [u32]) {
    let layout = if a_layout { (TILE, 1) } else { (1, TILE) };
    for (t, run) in out.chunks_exact_mut(k_tiles * TILE_LANES).enumerate() {
        for (q, tile) in run.chunks_exact_mut(TILE_LANES).enumerate() {
            let lines = (line0 + t * TILE, TILE);
            pack_pairs(x, lines, (q * TILE, TILE), layout, tile, Isa::Amx);
        }
    }
}

/// C = epilogue(A . B^T) on AMX tiles.
pub(super) fn product(a: Operand, b: Operand, c: super::MatMut, epi: &Epilogue, par: Par) {
    let (m, k, n) = (a.lines(), a.depth(), b.lines());
    assert!(tiles_usable(), "AMX kernels without the tile permission");
    let k_tiles = k.div_ceil(2 * TILE);
    let run = k_tiles * TILE_LANES;
    let n_tiles = n.div_ceil(2 * TILE) * 2;
    let parallel = should_split(par, 2 * m * n * k, MIN_PARALLEL_FLOPS);
    let mut b_packed = vec![0u32; n_tiles * run];
    let pack_b = |(t, out): (usize, &mut [u32])| pack_tiles(&b, t * TILE, k_tiles, false, out);
    if parallel {
        b_packed.par_chunks_mut(run).enumerate().for_each(pack_b);
    } else {
        b_packed.chunks_mut(run).enumerate().for_each(pack_b);
    }
    let b_packed = &b_packed[..];
    let c = SharedC::new(c);
    let rows_task = |task: usize| {
        let i0 = task * MC;
        let m_tiles = MC.min(m - i0).div_ceil(2 * TILE) * 2;
        let mut a_packed = vec![0u32; m_tiles * run];
        pack_tiles(&a, i0, k_tiles, true, &mut a_packed);
        let mut block = Block([0.0; 4 * TILE_LANES]);
        // SAFETY: `tiles_usable` was asserted above.
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
                // SAFETY: tiles it, it + 1 < m_tiles and jt, jt + 1 < n_tiles each start a run
                // of k_tiles >= 1 (K > 0 here) full tiles in the packed buffers.
                unsafe { tiles.block(a_runs, b_runs, k_tiles, &mut block) };
                // SAFETY: the CPU has AVX512F (Isa::Amx requires AVX512-BF16); this task alone
                // owns rows i0 .. i0 + MC of C; the block holds 32 x 32 floats.
                unsafe { c.store(&block.0, 2 * TILE, (i0 + it * TILE, jt * TILE), epi) };
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
