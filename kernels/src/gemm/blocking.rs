//! Cache blocking: KC, MC and NC from the cache sizes (Goto & van de Geijn, "Anatomy of
//! High-Performance Matrix Multiplication", 2008; the BLIS analytical model of Low et al., 2016).
//!
//! - The KC x NR micro-panel of B is reused by every MR-row tile of the A block, so it should
//!   stay in L1: KC = L1d / (NR * 4 bytes). (Half of L1, leaving room for the streaming A
//!   micro-panel, measured 5-10% slower on 1024^3 here: a longer K loop amortises the C tile's
//!   load and store better than a lower L1 miss rate helps, and A streams well from L2.)
//! - The MC x KC block of A is reused by every B micro-panel, so it lives in (half of) L2.
//! - The KC x NC panel of B is shared by all MC blocks and lives in L3.
//!
//! Virtual machines report odd cache sizes (a 480 MiB L3, or none at all), so every value is
//! clamped to a sane range. Only KC changes the arithmetic (it decides where the K loop is cut
//! and C re-read); MC and NC only reorder independent work.

use crate::isa::Isa;
use crate::simd::MAX_LANES;

/// Cache sizes in bytes, per core for L1d and L2; L3 as reported (shared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSizes {
    pub l1d: usize,
    pub l2: usize,
    pub l3: usize,
}

impl CacheSizes {
    /// Sizes typical of a current x86 server core, used when cpuid reports nothing usable.
    pub const FALLBACK: CacheSizes = CacheSizes {
        l1d: 32 << 10,
        l2: 1 << 20,
        l3: 16 << 20,
    };

    /// Reads the data and unified cache sizes with cpuid (Intel leaf 4, AMD leaf 0x8000001D).
    /// Falls back to [`CacheSizes::FALLBACK`] for any level that is not reported.
    pub fn detect() -> CacheSizes {
        let mut found = CacheSizes {
            l1d: 0,
            l2: 0,
            l3: 0,
        };
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::__cpuid_count;
            let max_leaf = __cpuid_count(0, 0).eax;
            let max_ext = __cpuid_count(0x8000_0000, 0).eax;
            let leaf = if max_leaf >= 4 {
                Some(4)
            } else if max_ext >= 0x8000_001D {
                Some(0x8000_001D)
            } else {
                None
            };
            if let Some(leaf) = leaf {
                for sub in 0..16 {
                    let r = __cpuid_count(leaf, sub);
                    let kind = r.eax & 0x1f; // 0 none, 1 data, 2 instruction, 3 unified
                    if kind == 0 {
                        break;
                    }
                    if kind == 2 {
                        continue;
                    }
                    let level = (r.eax >> 5) & 0x7;
                    let ways = ((r.ebx >> 22) & 0x3ff) as usize + 1;
                    let partitions = ((r.ebx >> 12) & 0x3ff) as usize + 1;
                    let line = (r.ebx & 0xfff) as usize + 1;
                    let sets = r.ecx as usize + 1;
                    let size = ways * partitions * line * sets;
                    match level {
                        1 => found.l1d = size,
                        2 => found.l2 = size,
                        3 => found.l3 = size,
                        _ => {}
                    }
                }
            }
        }
        CacheSizes {
            l1d: if found.l1d > 0 {
                found.l1d
            } else {
                Self::FALLBACK.l1d
            },
            l2: if found.l2 > 0 {
                found.l2
            } else {
                Self::FALLBACK.l2
            },
            l3: if found.l3 > 0 {
                found.l3
            } else {
                Self::FALLBACK.l3
            },
        }
    }
}

/// The three blocking parameters of the GEMM loop nest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Depth of one rank-KC update (the K-loop cut).
    pub kc: usize,
    /// Rows of A packed per block (a multiple of every MR).
    pub mc: usize,
    /// Columns of B packed per panel (a multiple of every NR).
    pub nc: usize,
}

/// Multiple that MC is rounded to: a common multiple of the microkernels' MR (6, 12, 24).
const MC_QUANTUM: usize = 24;
/// Multiple that NC is rounded to: a multiple of every level's NR.
const NC_QUANTUM: usize = 4 * MAX_LANES;

impl BlockSizes {
    /// Derives the block sizes from cache sizes for a microkernel whose B micro-panel is
    /// `nr` floats wide, with clamps against implausible reports.
    pub fn from_caches(c: CacheSizes, nr: usize) -> BlockSizes {
        let f = core::mem::size_of::<f32>();
        // B micro-panel (kc x nr) in L1d.
        let kc = (c.l1d / (nr * f)).clamp(128, 512) / 8 * 8;
        // A block (mc x kc) in half of L2.
        let mc = (c.l2 / 2 / (kc * f)).clamp(MC_QUANTUM * 4, 1536) / MC_QUANTUM * MC_QUANTUM;
        // B panel (kc x nc) in a quarter of L3, never wider than the layers we meet need.
        let nc = (c.l3 / 4 / (kc * f)).clamp(NC_QUANTUM * 8, 8192) / NC_QUANTUM * NC_QUANTUM;
        BlockSizes { kc, mc, nc }
    }

    /// The depth of the K-loop cut for a product of depth `k`: K in as few blocks as `self.kc`
    /// allows, of equal depth (rounded up to a multiple of 8, at most `self.kc`). A short last
    /// block re-reads and re-writes C for a few k steps: K = 512 with KC = 384 would run
    /// 384 + 128, balanced it runs 256 + 256 (dX and the forward of the Kaggle MLP's 512-wide
    /// layers). A function of K and KC alone, so the bits never depend on the thread count.
    pub fn kc_for(&self, k: usize) -> usize {
        let blocks = k.div_ceil(self.kc).max(1);
        k.div_ceil(blocks).next_multiple_of(8).min(self.kc)
    }

    /// Block sizes for this machine (cpuid) and the ISA [`Isa::selected`], computed once.
    pub fn host() -> BlockSizes {
        BlockSizes::for_isa(Isa::selected())
    }

    /// Block sizes for this machine's caches (cpuid, read once) and the microkernel of `isa`
    /// (its NR sets KC).
    pub fn for_isa(isa: Isa) -> BlockSizes {
        static CACHES: std::sync::OnceLock<CacheSizes> = std::sync::OnceLock::new();
        let caches = *CACHES.get_or_init(CacheSizes::detect);
        let nr = super::microkernel::WIDE_NV * isa.simd_level().lanes();
        BlockSizes::from_caches(caches, nr)
    }
}
