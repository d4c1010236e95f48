//! Split-BF16 embedding tables ("split SGD": Kalamkar et al., "Optimizing Deep Learning
//! Recommendation Systems' Training on CPU Cluster Architectures", SC20, section IV-C; Intel
//! Extension for PyTorch's `split_sgd`): each f32 master weight is kept as its upper 16 bits,
//! a bf16 table that the forward gathers (half the bytes of the f32 rows), and its lower 16
//! bits in a separate array. The update joins the halves into the exact f32 weight, applies
//! the optimizer in f32 (the same code as the f32 tables', [`crate::optim`]), and splits the
//! result again, so a split table trains bit for bit as an f32 table given the same gradients,
//! in the same memory, while the forward reads half of it.
//!
//! The upper half is the weight truncated to bf16 (towards zero), not rounded: it is the
//! master weight's own bits, so nothing is stored twice. The forward therefore sees each
//! weight with a relative error below 2^-7.
//!
//! Both kernels run on an [`Isa`]: from AVX-512 up (F/BW/VL are what they use: a masked
//! 16-lane load of bf16 bits widened by VPMOVZXWD and a shift, VPMOVDW to narrow; no BF16
//! instruction and no tile work), or the portable scalar path. The paths give the same bits:
//! pooling is one multiply for a bag's first row and one fused multiply-add per further row,
//! in bag order, on both.

use super::{Bags, MIN_PARALLEL_FLOATS, PREFETCH_DISTANCE, Pooling, RowGrads, SparseGradWorkspace};
use crate::bf16::Isa;
use crate::mat::{MatMut, MatRef, check_view};
use crate::optim::{SparseStep, UpdateRows, update_coalesced_rows};
use crate::parallel::{Par, should_split, task_grain};
use rayon::prelude::*;

/// The upper (bf16) half of an f32's bits.
#[inline(always)]
fn upper(x: f32) -> u16 {
    (x.to_bits() >> 16) as u16
}

/// The f32 value of a bf16 bit pattern.
#[inline(always)]
fn widen(hi: u16) -> f32 {
    f32::from_bits(u32::from(hi) << 16)
}

/// `hi[i]`, `lo[i]` = the upper and lower 16 bits of `src[i]`: an exact split.
pub fn split_f32_slice(src: &[f32], hi: &mut [u16], lo: &mut [u16], isa: Isa) {
    assert!(
        hi.len() == src.len() && lo.len() == src.len(),
        "split_f32_slice: {} values into {} + {} halves",
        src.len(),
        hi.len(),
        lo.len()
    );
    isa.assert_supported();
    split_row(src, hi, lo, isa);
}

/// `dst[i]` = the f32 whose upper and lower 16 bits are `hi[i]` and `lo[i]`.
pub fn join_f32_slice(hi: &[u16], lo: &[u16], dst: &mut [f32], isa: Isa) {
    assert!(
        hi.len() == dst.len() && lo.len() == dst.len(),
        "join_f32_slice: {} + {} halves into {} values",
        hi.len(),
        lo.len(),
        dst.len()
    );
    isa.assert_supported();
    join_row(hi, lo, dst, isa);
}

/// [`split_f32_slice`] on equal lengths and a supported `isa` (checked by the callers).
#[inline(always)]
fn split_row(src: &[f32], hi: &mut [u16], lo: &mut [u16], isa: Isa) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F/BW/VL (callers assert the ISA); equal lengths.
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { avx512::split(src, hi, lo) },
        _ => {
            for ((&x, h), l) in src.iter().zip(hi.iter_mut()).zip(lo.iter_mut()) {
                (*h, *l) = (upper(x), x.to_bits() as u16);
            }
        }
    }
}

/// [`join_f32_slice`] on equal lengths and a supported `isa` (checked by the callers).
#[inline(always)]
fn join_row(hi: &[u16], lo: &[u16], dst: &mut [f32], isa: Isa) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F/BW/VL (callers assert the ISA); equal lengths.
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { avx512::join(hi, lo, dst) },
        _ => {
            for ((&h, &l), d) in hi.iter().zip(lo).zip(dst.iter_mut()) {
                *d = f32::from_bits((u32::from(h) << 16) | u32::from(l));
            }
        }
    }
}

/// The bf16 (upper) halves of a split table: `rows x dim`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct SplitTable<'a> {
    hi: &'a [u16],
    dim: usize,
}

impl<'a> SplitTable<'a> {
    /// Panics unless `hi` is a whole number of rows of `dim > 0` values.
    pub fn new(hi: &'a [u16], dim: usize) -> SplitTable<'a> {
        assert!(
            dim > 0 && hi.len().is_multiple_of(dim),
            "split table: {} values are not rows of {dim}",
            hi.len()
        );
        SplitTable { hi, dim }
    }

    pub fn rows(&self) -> usize {
        self.hi.len() / self.dim
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
}

/// A split table being trained: the upper halves (`rows x dim` bf16 bits), the lower halves
/// (the same shape), and the optimizer state (rows x dim, rows, or empty, as for
/// [`crate::optim::TableMut`]).
#[derive(Debug)]
pub struct SplitTableMut<'a> {
    pub hi: &'a mut [u16],
    pub lo: &'a mut [u16],
    pub dim: usize,
    pub state: &'a mut [f32],
}

/// [`embedding_bag_forward_tables`](super::embedding_bag_forward_tables) on split tables: the
/// bf16 rows are widened to f32 and pooled in f32, bag b of table t into columns
/// `t * dim .. (t + 1) * dim` of row b of `out`. Threads split the bags. Ids are checked by
/// the caller ([`Bags::check`]); an id out of range panics when its row is read.
pub fn embedding_bag_forward_split<'t>(
    num_tables: usize,
    lookup: impl Fn(usize) -> (SplitTable<'t>, Bags<'t>) + Sync,
    pooling: Pooling,
    out: MatMut,
    isa: Isa,
    par: Par,
) {
    const WHO: &str = "embedding_bag_forward_split";
    isa.assert_supported();
    if num_tables == 0 {
        return;
    }
    let dim = lookup(0).0.dim;
    assert_eq!(
        out.cols(),
        num_tables * dim,
        "{WHO}: out rows of {} values for {num_tables} tables of width {dim}",
        out.cols()
    );
    let n = lookup(0).1.len();
    let mut work = 0;
    for t in 0..num_tables {
        let (table, bags) = lookup(t);
        assert!(
            table.dim == dim && bags.len() == n,
            "{WHO}: table {t} is {} wide with {} bags, table 0 is {dim} wide with {n}",
            table.dim,
            bags.len()
        );
        bags.check_shape(pooling, WHO);
        work += (bags.indices().len() + n) * dim;
    }
    assert_eq!(
        out.rows(),
        n,
        "{WHO}: out has {} rows for {n} bags",
        out.rows()
    );
    if n == 0 {
        return;
    }
    let out_stride = out.row_stride();
    let out = out.into_slice();
    let rows_from = |b0: usize, out: &mut [f32]| {
        for (i, o) in out.chunks_mut(out_stride).enumerate() {
            for t in 0..num_tables {
                let (table, bags) = lookup(t);
                pool_bag(
                    table,
                    bags,
                    b0 + i,
                    pooling,
                    &mut o[t * dim..(t + 1) * dim],
                    isa,
                );
            }
        }
    };
    if should_split(par, work, MIN_PARALLEL_FLOATS) {
        let grain = task_grain(n, true);
        out.par_chunks_mut(grain * out_stride)
            .enumerate()
            .for_each(|(t, o)| rows_from(t * grain, o));
    } else {
        rows_from(0, out);
    }
}

/// out (dim floats) = pooled bag `b` of `table`, on `isa` (supported: checked by the caller).
#[inline(always)]
fn pool_bag(table: SplitTable, bags: Bags, b: usize, pooling: Pooling, out: &mut [f32], isa: Isa) {
    let pos = bags.bag(b);
    let div = (pooling == Pooling::Mean && !pos.is_empty()).then(|| pos.len() as f32);
    let bag = BagRows {
        hi: table.hi,
        dim: table.dim,
        indices: bags.indices(),
        weights: bags.weights(),
        pos,
        div,
    };
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F/BW/VL (the caller asserted the ISA).
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { avx512::pool(&bag, out) },
        _ => bag.pool_portable(out),
    }
}

/// One bag of a split table: its positions in `indices`, their weights, and the divisor of
/// mean pooling.
struct BagRows<'a> {
    hi: &'a [u16],
    dim: usize,
    indices: &'a [u32],
    weights: Option<&'a [f32]>,
    pos: core::ops::Range<usize>,
    div: Option<f32>,
}

impl BagRows<'_> {
    /// The bf16 row looked up at position p (a bounds-checked slice: a bad id panics), and
    /// its weight.
    #[inline(always)]
    fn row(&self, p: usize) -> (&[u16], f32) {
        let id = self.indices[p] as usize;
        let row = &self.hi[id * self.dim..(id + 1) * self.dim];
        (row, self.weights.map_or(1.0, |w| w[p]))
    }

    /// The scalar pooling: first row multiplied, further rows fused multiply-adds, in bag
    /// order (as the vector path, lane by lane).
    fn pool_portable(&self, out: &mut [f32]) {
        out.fill(0.0);
        for (k, p) in self.pos.clone().enumerate() {
            let (row, w) = self.row(p);
            for (o, &h) in out.iter_mut().zip(row) {
                *o = if k == 0 {
                    widen(h) * w
                } else {
                    widen(h).mul_add(w, *o)
                };
            }
        }
        if let Some(d) = self.div {
            out.iter_mut().for_each(|o| *o /= d);
        }
    }
}

/// A split table's rows (halves and state) from some first row on, for the fused update.
struct SplitRows<'a> {
    hi: &'a mut [u16],
    lo: &'a mut [u16],
    state: &'a mut [f32],
    dim: usize,
    sw: usize,
    isa: Isa,
}

impl UpdateRows for SplitRows<'_> {
    fn split_rows(self, rows: usize) -> (Self, Self) {
        let SplitRows {
            hi,
            lo,
            state,
            dim,
            sw,
            isa,
        } = self;
        let (h0, h1) = hi.split_at_mut(rows * dim);
        let (l0, l1) = lo.split_at_mut(rows * dim);
        let (s0, s1) = state.split_at_mut(rows * sw);
        let part = |hi, lo, state| SplitRows {
            hi,
            lo,
            state,
            dim,
            sw,
            isa,
        };
        (part(h0, l0, s0), part(h1, l1, s1))
    }

    #[inline(always)]
    fn prefetch_row(&self, r: usize) {
        let (dim, sw) = (self.dim, self.sw);
        prefetch_write(self.hi.as_ptr().wrapping_add(r * dim).cast(), 2 * dim);
        prefetch_write(self.lo.as_ptr().wrapping_add(r * dim).cast(), 2 * dim);
        prefetch_write(self.state.as_ptr().wrapping_add(r * sw).cast(), 4 * sw);
    }

    /// The row joined into `scratch`, updated there, and split back.
    #[inline(always)]
    fn update_row(
        &mut self,
        r: usize,
        width: usize,
        scratch: &mut [f32],
        update: impl FnOnce(&mut [f32], &mut [f32]),
    ) {
        let (sw, isa) = (self.sw, self.isa);
        let hi = &mut self.hi[r * width..(r + 1) * width];
        let lo = &mut self.lo[r * width..(r + 1) * width];
        join_row(hi, lo, scratch, isa);
        update(scratch, &mut self.state[r * sw..(r + 1) * sw]);
        split_row(scratch, hi, lo, isa);
    }
}

/// Requests the cache lines of `bytes` bytes from `ptr` for writing (a hint: no fault, any
/// address).
#[inline(always)]
fn prefetch_write(ptr: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_ET0 }>(
                ptr.wrapping_add(line).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, bytes);
}

/// [`embedding_bag_backward_update`](crate::optim::embedding_bag_backward_update) on a split
/// table: the same coalesced gradient and the same f32 optimizer step of each distinct row,
/// on the row joined from its halves and split again, so the halves afterwards are exactly
/// those of the f32 table's update.
#[allow(clippy::too_many_arguments)]
pub fn embedding_bag_backward_update_split(
    table: SplitTableMut,
    bags: Bags,
    pooling: Pooling,
    grad_out: MatRef,
    step: SparseStep,
    ws: &mut SparseGradWorkspace,
    isa: Isa,
    par: Par,
) {
    const WHO: &str = "embedding_bag_backward_update_split";
    isa.assert_supported();
    let SplitTableMut { hi, lo, dim, state } = table;
    assert!(
        dim > 0 && hi.len().is_multiple_of(dim) && lo.len() == hi.len(),
        "{WHO}: halves of {} and {} values are not the same rows of {dim}",
        hi.len(),
        lo.len()
    );
    let rows = hi.len() / dim;
    let sw = step.opt.state_width(dim);
    assert_eq!(
        state.len(),
        rows * sw,
        "{WHO}: state has {} floats, {:?} needs {sw} per row for {rows} rows",
        state.len(),
        step.opt
    );
    check_view(grad_out, bags.len(), dim, "grad_out", WHO);
    let (rg, _) = RowGrads::prepare(rows, bags, pooling, grad_out, ws, WHO);
    let Some(&first) = rg.rows.first() else {
        return;
    };
    let first = first as usize;
    let part = SplitRows {
        hi: &mut hi[first * dim..],
        lo: &mut lo[first * dim..],
        state: &mut state[first * sw..],
        dim,
        sw,
        isa,
    };
    update_coalesced_rows(isa, &rg, part, step, par);
}

/// The AVX-512 paths: 16 lanes at a time, masked tails.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BagRows, PREFETCH_DISTANCE};
    use core::arch::x86_64::*;

    /// Lane mask of lanes `i .. min(i + 16, len)`, counted from i.
    #[inline(always)]
    fn lanes_from(i: usize, len: usize) -> u16 {
        let n = (len - i).min(16);
        ((1u32 << n) - 1) as u16
    }

    /// 16 (masked) bf16 values at `p`, widened to f32: VPMOVZXWD, then a 16-bit shift.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; the masked lanes are readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_widened(p: *const u16, mask: u16) -> __m512 {
        // SAFETY: only the masked lanes are read (caller).
        let h = unsafe { _mm256_maskz_loadu_epi16(mask, p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// # Safety
    /// AVX-512 F/BW/VL; `hi`, `lo` and `dst` have the same length.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn join(hi: &[u16], lo: &[u16], dst: &mut [f32]) {
        let len = dst.len();
        for i in (0..len).step_by(16) {
            let mask = lanes_from(i, len);
            // SAFETY: the masked lanes from i are in bounds of all three slices.
            unsafe {
                let h = _mm256_maskz_loadu_epi16(mask, hi.as_ptr().add(i).cast());
                let l = _mm256_maskz_loadu_epi16(mask, lo.as_ptr().add(i).cast());
                let bits = _mm512_or_si512(
                    _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)),
                    _mm512_cvtepu16_epi32(l),
                );
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), mask, _mm512_castsi512_ps(bits));
            }
        }
    }

    /// # Safety
    /// AVX-512 F/BW/VL; `src`, `hi` and `lo` have the same length.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn split(src: &[f32], hi: &mut [u16], lo: &mut [u16]) {
        let len = src.len();
        for i in (0..len).step_by(16) {
            let mask = lanes_from(i, len);
            // SAFETY: the masked lanes from i are in bounds of all three slices.
            unsafe {
                let bits = _mm512_maskz_loadu_epi32(mask, src.as_ptr().add(i).cast());
                // VPMOVDW keeps each lane's low 16 bits.
                let upper = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(bits));
                let lower = _mm512_cvtepi32_epi16(bits);
                _mm256_mask_storeu_epi16(hi.as_mut_ptr().add(i).cast(), mask, upper);
                _mm256_mask_storeu_epi16(lo.as_mut_ptr().add(i).cast(), mask, lower);
            }
        }
    }

    /// Columns pooled with their accumulators in registers at once: 4 vectors (64 floats).
    const BLOCK_VECTORS: usize = 4;

    /// out = the pooled bag (see [`BagRows::pool_portable`], the same operations lane by
    /// lane), in blocks of up to BLOCK_VECTORS vectors; the row PREFETCH_DISTANCE positions
    /// ahead is requested during the first block.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `out` holds `bag.dim` floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pool(bag: &BagRows, out: &mut [f32]) {
        let dim = bag.dim;
        assert_eq!(out.len(), dim);
        for c0 in (0..dim).step_by(16 * BLOCK_VECTORS) {
            let nv = (dim - c0).div_ceil(16).min(BLOCK_VECTORS);
            // SAFETY: same contract; the block c0 .. c0 + 16 nv (masked) lies in the rows.
            unsafe {
                match nv {
                    1 => pool_block::<1>(bag, c0, out),
                    2 => pool_block::<2>(bag, c0, out),
                    3 => pool_block::<3>(bag, c0, out),
                    _ => pool_block::<4>(bag, c0, out),
                }
            }
        }
    }

    /// Columns c0 .. min(c0 + 16 NV, dim) of the pooled bag, NV accumulators in registers.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `out` holds `bag.dim` floats and c0 < dim.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pool_block<const NV: usize>(bag: &BagRows, c0: usize, out: &mut [f32]) {
        let dim = bag.dim;
        let mut acc = [_mm512_setzero_ps(); NV];
        for (k, p) in bag.pos.clone().enumerate() {
            if c0 == 0
                && let Some(&ahead) = bag.indices.get(p + PREFETCH_DISTANCE)
            {
                let row = bag.hi.as_ptr().wrapping_add(ahead as usize * dim);
                for line in (0..2 * dim).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(row.cast::<i8>().wrapping_add(line));
                }
            }
            let (row, w) = bag.row(p);
            let w = _mm512_set1_ps(w);
            for (v, a) in acc.iter_mut().enumerate() {
                let c = c0 + 16 * v;
                // SAFETY: the masked lanes c .. min(c + 16, dim) are inside the row.
                let x = unsafe { load_widened(row.as_ptr().add(c), lanes_from(c, dim)) };
                // The first row is multiplied rather than added to zero (as the f32 forward
                // does), so a one-row bag pools to exactly that row, -0.0 included.
                *a = if k == 0 {
                    _mm512_mul_ps(x, w)
                } else {
                    _mm512_fmadd_ps(x, w, *a)
                };
            }
        }
        let div = bag.div.map(|d| _mm512_set1_ps(d));
        for (v, &a) in acc.iter().enumerate() {
            let c = c0 + 16 * v;
            let a = div.map_or(a, |d| _mm512_div_ps(a, d));
            // SAFETY: the masked lanes c .. min(c + 16, dim) are inside `out` (dim floats).
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(c), lanes_from(c, dim), a) };
        }
    }
}
