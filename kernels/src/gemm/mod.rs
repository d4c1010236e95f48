//! Single-precision GEMM, BLIS-style: C = relu(alpha * op(A) . op(B) + beta * C + bias).
//!
//! One implementation serves every product of an MLP layer with the PyTorch weight layout
//! W (out x in): operands are strided views, so a transpose is a view, not a copy
//! ([`MatRef::t`]); see [`linear`] for the three layer products.
//!
//! Loop nest (Goto & van de Geijn 2008; Van Zee & van de Geijn, BLIS, 2015):
//! ```text
//! for jc in N step NC:                 B panel (KC x NC) packed once, shared by all threads
//!   for pc in K step KC:
//!     for ic in M step MC (threads):   A block (MC x KC) packed per thread, lives in L2
//!       for jr in NC step NR:          B micro-panel (KC x NR) stays in L1
//!         for ir in MC step MR:        microkernel: MR x NR tile in registers
//! ```
//! Threads split the M and N loops only, so each element of C is computed by the same
//! sequence of operations whatever the thread count. When M * N is too small to occupy the
//! threads and K is long (dW of a layer with one output), K is cut into chunks fixed by the
//! shape alone, and the partial products are added in chunk order: still bit-identical.
//!
//! Skinny shapes take cheaper paths, chosen by shape with the constants below (measured with
//! `cargo bench --bench gemm`, see README.md): no packing of a block that already fits in
//! cache or is read only once or twice, a dot-product path for C with a handful of columns.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod bf16;
mod blocking;
pub mod linear;
mod microkernel;
mod pack;
mod prepacked;

pub use crate::mat::{MatMut, MatRef};
pub use bf16::{Bf16Mat, PackedPairs, gemm_bf16, gemm_rounded_bf16, gemm_rounded_bf16_prepacked};
pub use blocking::{BlockSizes, CacheSizes};
pub use linear::{
    bias_grad, bias_grad_with_isa, linear_backward_input, linear_backward_input_prepacked,
    linear_backward_weight, linear_forward, linear_forward_prepacked,
};
pub use prepacked::{PackedB, gemm_prepacked, gemm_prepacked_with_isa};

use crate::isa::Isa;
use crate::parallel::{Par, should_split};
use crate::scratch::{PACK_A, PACK_B, PARTIALS, with_scratch};
use crate::simd::{SimdVec, dispatch};
use microkernel::{StoreOps, Tile, WIDE_NV};
use rayon::prelude::*;

/// B is not packed (when its rows are contiguous) if C has at most this many register tiles'
/// rows: each B micro-panel is then read by at most two tiles, too few to repay the copy.
pub const NOPACK_B_MAX_TILES: usize = 2;
/// C with at most this many columns, A rows and B columns contiguous (Y = X W^T with a
/// one-output layer), is computed as dot products along K instead of register tiles that
/// would be mostly padding.
pub const DOT_MAX_N: usize = 4;
/// K is split into chunks of this length when C is small (M * N <= SPLIT_K_MAX_MN) and
/// K >= 2 * SPLIT_K_CHUNK, so that the long reduction of a dW with few outputs runs in
/// parallel. Both are constants of the shape, never of the thread count.
pub const SPLIT_K_CHUNK: usize = 256;
/// See [`SPLIT_K_CHUNK`].
pub const SPLIT_K_MAX_MN: usize = 64 * 256;
/// Smallest product (in FLOPs) that is split across threads: below it a fork-join costs more
/// than it saves.
pub const MIN_PARALLEL_FLOPS: usize = 1 << 21;
/// Smallest B block (in floats: 512 KiB) packed by all threads in its own fork-join; a smaller
/// one (the B = X of every dW of the Kaggle MLPs at batch 128: at most 128 x 512) is packed
/// by the calling thread in tens of microseconds, less than a wake-up of the pool costs on a
/// busy machine. Packing is a copy: the bits do not depend on who packs.
pub const MIN_PARALLEL_PACK_FLOATS: usize = 1 << 17;

/// What is applied around the product:
/// C = relu(alpha * (A ⊙ mask) . B + beta * C + bias) ⊙ [c_mask > 0].
#[derive(Clone, Copy, Debug)]
pub struct GemmOps<'a> {
    pub alpha: f32,
    /// With beta = 0, C is only written (it may hold anything beforehand, NaN included).
    pub beta: f32,
    /// Added to every row of C (length N).
    pub bias: Option<&'a [f32]>,
    /// C = max(C, 0) after the bias.
    pub relu: bool,
    /// If set (same shape as A), A is read as A ⊙ [mask > 0]: the ReLU backward, with the
    /// layer's output as the mask, fused into the read of dY.
    pub a_relu_mask: Option<MatRef<'a>>,
    /// If set (same shape as C), C is stored as C ⊙ [mask > 0] after the rest of the epilogue:
    /// with a layer's input X as the mask, dX of that layer comes out as the gradient of the
    /// ReLU below it, already masked, so the products of the layer below read it without a mask
    /// (one read of X while the tile is stored, instead of a read of the mask in each of them).
    pub c_relu_mask: Option<MatRef<'a>>,
    /// The precision of the operands in the product (the accumulation and the epilogue are
    /// f32 either way).
    pub precision: Precision,
}

/// The precision the operands of [`gemm`] are multiplied in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands, f32 accumulation.
    #[default]
    F32,
    /// Mixed precision (Micikevicius et al., "Mixed Precision Training", ICLR 2018; Kalamkar
    /// et al., "A Study of BFLOAT16 for Deep Learning Training", 2019): op(A) (after the ReLU
    /// mask) and op(B) are rounded to bf16 with round-to-nearest-even
    /// ([`Bf16::from_f32`](crate::bf16::Bf16::from_f32)) as they are packed, their products
    /// are accumulated in f32, and the epilogue (alpha, beta, bias, ReLU) is f32.
    Bf16,
}

impl Default for GemmOps<'_> {
    fn default() -> Self {
        GemmOps {
            alpha: 1.0,
            beta: 0.0,
            bias: None,
            relu: false,
            a_relu_mask: None,
            c_relu_mask: None,
            precision: Precision::F32,
        }
    }
}

/// C = relu(alpha * op(A) . op(B) + beta * C + bias), on the ISA [`Isa::selected`] with this
/// machine's block sizes.
pub fn gemm(a: MatRef, b: MatRef, c: MatMut, ops: &GemmOps, par: Par) {
    gemm_with_isa(Isa::selected(), a, b, c, ops, par)
}

/// [`gemm`] on `isa` (panics if the CPU lacks it).
pub fn gemm_with_isa(isa: Isa, a: MatRef, b: MatRef, c: MatMut, ops: &GemmOps, par: Par) {
    gemm_with_blocks(isa, &BlockSizes::for_isa(isa), a, b, c, ops, par)
}

/// [`gemm`] on `isa` with explicit block sizes (of the f32 kernels: a [`Precision::Bf16`]
/// product runs on [`gemm_rounded_bf16`], whose kernels have their own blocking).
pub fn gemm_with_blocks(
    isa: Isa,
    bs: &BlockSizes,
    a: MatRef,
    b: MatRef,
    mut c: MatMut,
    ops: &GemmOps,
    par: Par,
) {
    check_operands(&a, &b, &c, ops);
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(bs.kc > 0 && bs.mc > 0 && bs.nc > 0, "gemm: zero block size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // The product is zero: only the scaling and the epilogue remain.
        for i in 0..m {
            epilogue_row(None, c.row_mut(i), ops);
        }
        return mask_after(c, ops.c_relu_mask);
    }
    let path = path(a, b, ops);
    if !fuses_c_mask(path, ops) {
        let unmasked = GemmOps {
            c_relu_mask: None,
            ..*ops
        };
        gemm_with_blocks(isa, bs, a, b, c.rb_mut(), &unmasked, par);
        return mask_after(c, ops.c_relu_mask);
    }
    match path {
        Path::Bf16 => gemm_rounded_bf16(a, b, c, ops, isa, par),
        Path::Dot => dispatch!(isa, V => gemm_dot::<V>(a, b, c, ops, par)),
        Path::SplitK => dispatch!(isa, V => gemm_split_k::<V>(isa, bs, a, b, c, ops, par)),
        Path::Tiled => dispatch!(isa, V => gemm_tiled::<V>(bs, a, b, c, ops, par, None)),
    }
}

/// Whether the product applies `ops.c_relu_mask` in its own store (or has none): the tiled
/// store and the bf16 products' store do, reading the mask's rows as vectors.
fn fuses_c_mask(path: Path, ops: &GemmOps) -> bool {
    ops.c_relu_mask
        .is_none_or(|mk| matches!(path, Path::Tiled | Path::Bf16) && mk.cs == 1)
}

/// C = C ⊙ [mask > 0] where `mask` is given (the products that do not fuse it into their store).
pub(crate) fn mask_after(mut c: MatMut, mask: Option<MatRef>) {
    let Some(mask) = mask else { return };
    let cols = c.cols;
    for i in 0..c.rows {
        let row = c.row_mut(i);
        // `> 0` is false for NaN, as in the tiled store. Rows of a unit-stride mask are read
        // as slices, a select loop without index arithmetic or bounds checks per element.
        if mask.col_stride() == 1 {
            for (cj, &mj) in row.iter_mut().zip(mask.row_slice(i, 0, cols)) {
                *cj = if mj > 0.0 { *cj } else { 0.0 };
            }
        } else {
            for (cj, mj) in row.iter_mut().zip(mask.row_iter(i)) {
                *cj = if mj > 0.0 { *cj } else { 0.0 };
            }
        }
    }
}

/// Panics unless A (m x k), B (k x n), C (m x n), the bias (n) and the mask (m x k) agree.
fn check_operands(a: &MatRef, b: &MatRef, c: &MatMut, ops: &GemmOps) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: A is {m}x{k} but B is {}x{n}", b.rows);
    assert_eq!(
        (c.rows, c.cols),
        (m, n),
        "gemm: C is {}x{}, the product is {m}x{n}",
        c.rows,
        c.cols
    );
    if let Some(bias) = ops.bias {
        assert_eq!(
            bias.len(),
            n,
            "gemm: bias has {} values for {n} columns",
            bias.len()
        );
    }
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
    }
}

/// The algorithm a product of these shapes and options runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Operands rounded to bf16 ([`gemm_rounded_bf16`]).
    Bf16,
    /// At most [`DOT_MAX_N`] columns, both operands contiguous along K: dot products.
    Dot,
    /// Few outputs and a long K ([`SPLIT_K_CHUNK`]).
    SplitK,
    /// The register-tiled, cache-blocked GEMM.
    Tiled,
}

fn path(a: MatRef, b: MatRef, ops: &GemmOps) -> Path {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if ops.precision == Precision::Bf16 {
        Path::Bf16
    } else if n <= DOT_MAX_N && a.cs == 1 && b.rs == 1 && ops.a_relu_mask.is_none() {
        Path::Dot
    } else if m * n <= SPLIT_K_MAX_MN && k >= 2 * SPLIT_K_CHUNK {
        Path::SplitK
    } else {
        Path::Tiled
    }
}

/// The micro-panel width of the tiled GEMM for B with `n` columns: one vector when C has at
/// most LANES columns, else [`WIDE_NV`] vectors (as [`gemm_tiled`] chooses its microkernel).
fn tile_nr<V: SimdVec>(n: usize) -> usize {
    if n <= V::LANES {
        V::LANES
    } else {
        WIDE_NV * V::LANES
    }
}

/// The register-tiled GEMM with `V`'s microkernel: one vector wide when C has at most LANES
/// columns, else two. `prepacked`: B's blocks as [`PackedB`] lays them out (None: packed here
/// when worth it).
fn gemm_tiled<V: SimdVec>(
    bs: &BlockSizes,
    a: MatRef,
    b: MatRef,
    c: MatMut,
    ops: &GemmOps,
    par: Par,
    prepacked: Option<&[f32]>,
) {
    // The tile heights are constants of V; the match turns them into const parameters.
    if b.cols <= V::LANES {
        match V::GEMM_NARROW_MR {
            24 => gemm_blocked::<V, 24, 1>(bs, a, b, c, ops, par, prepacked),
            12 => gemm_blocked::<V, 12, 1>(bs, a, b, c, ops, par, prepacked),
            mr => unreachable!("no narrow microkernel of {mr} rows"),
        }
    } else {
        match V::GEMM_MR {
            12 => gemm_blocked::<V, 12, WIDE_NV>(bs, a, b, c, ops, par, prepacked),
            6 => gemm_blocked::<V, 6, WIDE_NV>(bs, a, b, c, ops, par, prepacked),
            mr => unreachable!("no wide microkernel of {mr} rows"),
        }
    }
}

/// C row = relu(alpha * acc + beta * C + bias) for one row; `acc = None` means a zero product.
fn epilogue_row(acc: Option<&[f32]>, c: &mut [f32], ops: &GemmOps) {
    for (j, cj) in c.iter_mut().enumerate() {
        let mut r = acc.map_or(0.0, |a| a[j] * ops.alpha);
        if ops.beta != 0.0 {
            r = cj.mul_add(ops.beta, r);
        }
        if let Some(bias) = ops.bias {
            r += bias[j];
        }
        if ops.relu {
            r = r.max(0.0);
        }
        *cj = r;
    }
}

/// A raw pointer to C that may cross threads: each task writes a disjoint set of tiles.
#[derive(Clone, Copy)]
struct SharedC(*mut f32);
// SAFETY: tasks write disjoint elements of C (distinct tiles), and the fork-join ends before
// the exclusive borrow of C that produced the pointer does.
unsafe impl Send for SharedC {}
// SAFETY: as above: concurrent use never touches the same element.
unsafe impl Sync for SharedC {}

/// Splits a grid of `mt x nt` tiles into about `4 * threads` tasks of whole tiles, M first
/// (each M task packs its own A block; N tasks would repack it).
fn task_grid(m_tiles: usize, n_tiles: usize, threads: usize) -> (usize, usize) {
    let want = 4 * threads;
    let tm = m_tiles.min(want).max(1);
    let tn = (want / tm).clamp(1, n_tiles.max(1));
    (tm, tn)
}

fn gemm_blocked<V: SimdVec, const MR: usize, const NV: usize>(
    bs: &BlockSizes,
    a: MatRef,
    b: MatRef,
    c: MatMut,
    ops: &GemmOps,
    par: Par,
    prepacked: Option<&[f32]>,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let nr = NV * V::LANES;
    let mc_max = (bs.mc / MR).max(1) * MR;
    // A is read in place when it has a unit stride and fits in one MC block (half of L2, as
    // the packed block would): then packing only copies what is already cache-resident, as
    // a row chunk's activations and gradients are, written by the product before. The
    // microkernel broadcasts the same values in the same order either way (same bits).
    // Reading in place measured 1.065-1.073x on the Kaggle training step (b2048 and b128).
    let a_unit_stride = a.rs == 1 || a.cs == 1;
    let pack_a = ops.a_relu_mask.is_some() || !a_unit_stride || (m > mc_max && n > nr);
    let pack_b = prepacked.is_some() || b.cs != 1 || m > NOPACK_B_MAX_TILES * V::GEMM_MR;
    let kc_max = bs.kc_for(k);
    let nc_max = (bs.nc / nr).max(1) * nr;
    let parallel = should_split(par, 2 * m * n * k, MIN_PARALLEL_FLOPS);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let c_rs = c.rs;
    let c_ptr = SharedC(c.data.as_mut_ptr());
    let b_len = if pack_b && prepacked.is_none() {
        kc_max.min(k) * n.min(nc_max).div_ceil(nr) * nr
    } else {
        0
    };
    with_scratch(&PACK_B, b_len, |b_buf| {
        let mut packed_at = 0;
        for jc in (0..n).step_by(nc_max) {
            let nc = nc_max.min(n - jc);
            for pc in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - pc);
                let last = pc + kc == k;
                let b_blk = b.sub(pc, jc, kc, nc);
                let blk_len = kc * nc.div_ceil(nr) * nr;
                let b_panels: &[f32] = if let Some(pre) = prepacked {
                    packed_at += blk_len;
                    &pre[packed_at - blk_len..packed_at]
                } else if pack_b {
                    let panels = &mut b_buf[..blk_len];
                    if threads > 1 && blk_len >= MIN_PARALLEL_PACK_FLOATS {
                        panels
                            .par_chunks_mut(kc * nr)
                            .enumerate()
                            .for_each(|(q, p)| pack::pack_b_panel::<V>(b_blk, q * nr, nr, p));
                    } else {
                        pack::pack_b::<V>(b_blk, nr, panels);
                    }
                    panels
                } else {
                    &[]
                };
                let m_tiles = m.div_ceil(MR);
                let n_tiles = nc.div_ceil(nr);
                let (tm, tn) = task_grid(m_tiles, n_tiles, threads);
                let task = |t: usize| {
                    let (ti, tj) = (t / tn, t % tn);
                    let i0 = (m_tiles * ti / tm) * MR;
                    let i1 = ((m_tiles * (ti + 1) / tm) * MR).min(m);
                    let j0 = (n_tiles * tj / tn) * nr;
                    let j1 = ((n_tiles * (tj + 1) / tn) * nr).min(nc);
                    let blk = Block {
                        a,
                        b: b_blk,
                        b_panels,
                        pc,
                        kc,
                        jc,
                        pack_a,
                        pack_b,
                        c: c_ptr,
                        c_rs,
                        bias: ops.bias.filter(|_| last),
                        mask: ops.a_relu_mask,
                        c_mask: ops.c_relu_mask.filter(|_| last),
                        alpha: ops.alpha,
                        beta: if pc == 0 { ops.beta } else { 1.0 },
                        relu: last && ops.relu,
                        mc_max,
                    };
                    blk.run::<V, MR, NV>(i0..i1, j0..j1);
                };
                if tm * tn > 1 {
                    (0..tm * tn).into_par_iter().for_each(task);
                } else {
                    task(0);
                }
            }
        }
    });
}

/// One rank-KC update of the rows/columns a task owns.
struct Block<'a> {
    a: MatRef<'a>,
    /// The kc x nc block of B (unpacked view).
    b: MatRef<'a>,
    /// The packed micro-panels of `b`, or empty when B is read in place.
    b_panels: &'a [f32],
    pc: usize,
    kc: usize,
    jc: usize,
    pack_a: bool,
    pack_b: bool,
    c: SharedC,
    c_rs: usize,
    bias: Option<&'a [f32]>,
    mask: Option<MatRef<'a>>,
    /// The output mask (C's shape), after the last K block only.
    c_mask: Option<MatRef<'a>>,
    alpha: f32,
    /// beta for this K block: the caller's for the first, 1 for the others.
    beta: f32,
    /// ReLU only after the last K block.
    relu: bool,
    mc_max: usize,
}

impl Block<'_> {
    /// Rows `rows` of C (absolute), columns `cols` (relative to jc, multiples of NR but the end).
    fn run<V: SimdVec, const MR: usize, const NV: usize>(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        let nr = NV * V::LANES;
        let kc = self.kc;
        let a_len = if self.pack_a {
            self.mc_max.min(rows.len()).div_ceil(MR) * MR * kc
        } else {
            0
        };
        with_scratch(&PACK_A, a_len, |a_buf| {
            for ic in rows.clone().step_by(self.mc_max) {
                let mc = self.mc_max.min(rows.end - ic);
                if self.pack_a {
                    let mask = self.mask.map(|mk| mk.sub(ic, self.pc, mc, kc));
                    pack::pack_a::<V, MR>(self.a.sub(ic, self.pc, mc, kc), mask, a_buf);
                }
                for jr in cols.clone().step_by(nr) {
                    let nv = nr.min(cols.end - jr);
                    let (b_ptr, b_rs) = if self.pack_b {
                        (self.b_panels[(jr / nr) * kc * nr..].as_ptr(), nr)
                    } else {
                        (self.b.ptr_at(0, jr), self.b.rs)
                    };
                    let st = StoreOps {
                        alpha: self.alpha,
                        beta: self.beta,
                        bias: self
                            .bias
                            .map_or(std::ptr::null(), |b| b[self.jc + jr..].as_ptr()),
                        relu: self.relu,
                    };
                    for ir in (0..mc).step_by(MR) {
                        let mv = MR.min(mc - ir);
                        let (a_ptr, a_rs, a_cs) = if self.pack_a {
                            (a_buf[(ir / MR) * MR * kc..].as_ptr(), 1, MR)
                        } else {
                            (self.a.ptr_at(ic + ir, self.pc), self.a.rs, self.a.cs)
                        };
                        let (c_mask, c_mask_rs) = self.c_mask.map_or((std::ptr::null(), 0), |mk| {
                            (mk.ptr_at(ic + ir, self.jc + jr), mk.rs)
                        });
                        let t = Tile {
                            k: kc,
                            a: a_ptr,
                            a_rs,
                            a_cs,
                            b: b_ptr,
                            b_rs,
                            c: self.c.0.wrapping_add((ic + ir) * self.c_rs + self.jc + jr),
                            c_rs: self.c_rs,
                            m: mv,
                            n: nv,
                            c_mask,
                            c_mask_rs,
                        };
                        // SAFETY: the tile lies inside A, B and C as validated at entry: rows
                        // ic+ir .. ic+ir+mv < m, columns jc+jr .. +nv <= n, k steps pc .. pc+kc;
                        // packed buffers hold full MR/NR panels; this task alone writes it.
                        unsafe {
                            run_tile::<V, MR, NV>(&t, &st, self.pack_a, self.pack_b || nv == nr)
                        };
                    }
                }
            }
        });
    }
}

/// Dispatches a tile to the microkernel instance for its operand layout. A tile of fewer than
/// MR rows whose A is read in place is cut into sub-tiles of 8, 4, 2 and 1 rows (the rows past
/// `m` do not exist to be read); a packed A is zero-padded and runs the full tile.
///
/// # Safety
/// As for [`microkernel::tile`].
unsafe fn run_tile<V: SimdVec, const MR: usize, const NV: usize>(
    t: &Tile,
    st: &StoreOps,
    a_packed: bool,
    b_full: bool,
) {
    use microkernel::tile;
    // SAFETY: (all calls) forwarded from the caller; sub-tiles only shrink the row range.
    unsafe {
        match (a_packed, b_full) {
            (true, true) => tile::<V, MR, NV, true, true>(t, st),
            (true, false) => tile::<V, MR, NV, true, false>(t, st),
            (false, _) if t.m == MR => {
                if b_full {
                    tile::<V, MR, NV, false, true>(t, st)
                } else {
                    tile::<V, MR, NV, false, false>(t, st)
                }
            }
            (false, _) => {
                let mut done = 0;
                macro_rules! sub_tile {
                    ($rows:literal) => {
                        if $rows < MR && t.m - done >= $rows {
                            let s = Tile {
                                a: t.a.wrapping_add(done * t.a_rs),
                                c: t.c.wrapping_add(done * t.c_rs),
                                m: $rows,
                                c_mask: if t.c_mask.is_null() {
                                    t.c_mask
                                } else {
                                    t.c_mask.wrapping_add(done * t.c_mask_rs)
                                },
                                ..*t
                            };
                            if b_full {
                                tile::<V, $rows, NV, false, true>(&s, st)
                            } else {
                                tile::<V, $rows, NV, false, false>(&s, st)
                            }
                            done += $rows;
                        }
                    };
                }
                sub_tile!(16);
                sub_tile!(8);
                sub_tile!(4);
                sub_tile!(2);
                sub_tile!(1);
                debug_assert_eq!(done, t.m);
            }
        }
    }
}

/// Rows of A that [`gemm_dot`] runs through one [`dot_rows`] call: 4 rows x 2 accumulators
/// keep 8 independent FMA chains in flight, enough to cover the FMA latency (4 cycles, 2 per
/// cycle), where one row's 2 chains left three quarters of the FMA slots idle.
const DOT_ROWS: usize = 4;

/// C = epilogue(A . B) for C with few columns, as dot products along K: A's rows and B's
/// columns are contiguous, so each element is one vectorised dot product, [`DOT_ROWS`] rows
/// at a time.
fn gemm_dot<V: SimdVec>(a: MatRef, b: MatRef, c: MatMut, ops: &GemmOps, par: Par) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let c_rs = c.rs;
    let rows_per_task = 64;
    let run = |i0: usize, c_rows: &mut [f32]| {
        V::vectorize(
            #[inline(always)]
            || {
                let rows = c_rows.len().div_ceil(c_rs);
                let mut acc = [[0.0f32; DOT_MAX_N]; DOT_ROWS];
                for r0 in (0..rows).step_by(DOT_ROWS) {
                    let a_row = |r: usize| a.row_slice(i0 + (r0 + r).min(rows - 1), 0, k);
                    let a_rows: [&[f32]; DOT_ROWS] = std::array::from_fn(a_row);
                    for j in 0..n {
                        let dots = dot_rows::<V, DOT_ROWS>(a_rows, &b.data[j * b.cs..][..k]);
                        for (acc_r, d) in acc.iter_mut().zip(dots) {
                            acc_r[j] = d;
                        }
                    }
                    for (r, acc_r) in acc.iter().enumerate().take(rows - r0) {
                        let c_row = &mut c_rows[(r0 + r) * c_rs..][..n];
                        epilogue_row(Some(&acc_r[..n]), c_row, ops);
                    }
                }
            },
        )
    };
    let data = &mut c.data[..];
    if should_split(par, 2 * m * n * k, MIN_PARALLEL_FLOPS) {
        data.par_chunks_mut(rows_per_task * c_rs)
            .enumerate()
            .for_each(|(t, rows)| run(t * rows_per_task, rows));
    } else {
        run(0, data);
    }
}

/// Dot product of two equal-length slices on the ISA [`Isa::selected`]; see [`dot_lanes`].
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    dispatch!(Isa::selected(), V => dot_lanes::<V>(x, y))
}

/// Dot product of two equal-length slices with two vector accumulators (to cover FMA
/// latency) and a masked tail; a fixed order, so the same inputs give the same bits.
#[inline(always)]
pub(crate) fn dot_lanes<V: SimdVec>(x: &[f32], y: &[f32]) -> f32 {
    dot_rows::<V, 1>([x], y)[0]
}

/// The dot products of `R` slices with one `y`, interleaved so that their 2 R accumulator
/// chains overlap. Each product is summed exactly as [`dot_lanes`] sums it alone (two vector
/// accumulators, alternate vectors, a masked tail into the second, then one horizontal sum),
/// so its bits do not depend on R.
#[inline(always)]
fn dot_rows<V: SimdVec, const R: usize>(xs: [&[f32]; R], y: &[f32]) -> [f32; R] {
    let (len, lanes) = (y.len(), V::LANES);
    assert!(xs.iter().all(|x| x.len() == len));
    let mut s0 = [V::splat(0.0); R];
    let mut s1 = [V::splat(0.0); R];
    let mut p = 0;
    // SAFETY: (all loads) p + LANES <= len (or the partial count) floats are in bounds of y
    // and of every x (all of length len).
    unsafe {
        let yp = y.as_ptr();
        while p + 2 * lanes <= len {
            let (y0, y1) = (V::load(yp.add(p)), V::load(yp.add(p + lanes)));
            for r in 0..R {
                let xp = xs[r].as_ptr();
                s0[r] = V::load(xp.add(p)).mul_add(y0, s0[r]);
                s1[r] = V::load(xp.add(p + lanes)).mul_add(y1, s1[r]);
            }
            p += 2 * lanes;
        }
        if p + lanes <= len {
            let y0 = V::load(yp.add(p));
            for r in 0..R {
                s0[r] = V::load(xs[r].as_ptr().add(p)).mul_add(y0, s0[r]);
            }
            p += lanes;
        }
        if p < len {
            let rest = len - p;
            let y1 = V::load_partial(yp.add(p), rest);
            for r in 0..R {
                s1[r] = V::load_partial(xs[r].as_ptr().add(p), rest).mul_add(y1, s1[r]);
            }
        }
    }
    std::array::from_fn(|r| (s0[r] + s1[r]).reduce_add())
}

/// C = epilogue(sum over fixed K chunks of A_chunk . B_chunk), partial products added in
/// chunk order. The chunks run in parallel; each is an ordinary serial-or-parallel GEMM.
fn gemm_split_k<V: SimdVec>(
    isa: Isa,
    bs: &BlockSizes,
    a: MatRef,
    b: MatRef,
    mut c: MatMut,
    ops: &GemmOps,
    par: Par,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let chunks = k.div_ceil(SPLIT_K_CHUNK);
    let mn = m * n;
    with_scratch(&PARTIALS, chunks * mn, |partials| {
        let chunk_product = |q: usize, part: &mut [f32]| {
            let p0 = q * SPLIT_K_CHUNK;
            let kq = SPLIT_K_CHUNK.min(k - p0);
            let chunk_ops = GemmOps {
                a_relu_mask: ops.a_relu_mask.map(|mk| mk.sub(0, p0, m, kq)),
                ..GemmOps::default()
            };
            gemm_with_blocks(
                isa,
                bs,
                a.sub(0, p0, m, kq),
                b.sub(p0, 0, kq, n),
                MatMut::new(part, m, n),
                &chunk_ops,
                par,
            );
        };
        if should_split(par, 2 * m * n * k, MIN_PARALLEL_FLOPS) {
            partials
                .par_chunks_mut(mn)
                .enumerate()
                .for_each(|(q, part)| chunk_product(q, part));
        } else {
            for (q, part) in partials.chunks_mut(mn).enumerate() {
                chunk_product(q, part);
            }
        }
        // Sum the partials in chunk order, into the first one, vectorised along the rows.
        let (first, rest) = partials.split_at_mut(mn);
        V::vectorize(
            #[inline(always)]
            || {
                for part in rest.chunks(mn) {
                    add_assign::<V>(first, part);
                }
            },
        );
        for i in 0..m {
            epilogue_row(Some(&first[i * n..(i + 1) * n]), c.row_mut(i), ops);
        }
    });
}

/// x += y elementwise.
#[inline(always)]
fn add_assign<V: SimdVec>(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    let mut xc = x.chunks_exact_mut(V::LANES);
    let mut yc = y.chunks_exact(V::LANES);
    for (xv, yv) in (&mut xc).zip(&mut yc) {
        // SAFETY: both chunks hold exactly LANES floats.
        unsafe { V::store(xv.as_mut_ptr(), V::load(xv.as_ptr()) + V::load(yv.as_ptr())) };
    }
    for (xi, yi) in xc.into_remainder().iter_mut().zip(yc.remainder()) {
        *xi += yi;
    }
}
