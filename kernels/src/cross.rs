//! Cross networks of DCN, forward and backward over a batch.
//!
//! A cross network builds explicit feature crosses of bounded degree from the input row x0
//! (the concatenated dense features and embeddings), layer by layer, each layer keeping a
//! residual connection:
//! ```text
//! DCN (Wang et al. 2017, "Deep & Cross Network for Ad Click Predictions"), rank one:
//!     x_{l+1} = x0 * (x_l . w_l) + b_l + x_l           w_l, b_l: d-vectors
//! DCN-v2 (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network"), full rank:
//!     x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l             W_l: d x d (nn.Linear layout)
//! ```
//! for l = 0 .. L-1 from x_0 = x0; the output is x_L.
//!
//! The rank-one layer is a dot product and a scaled add per sample, far too little work for a
//! GEMM: it runs as one fused SIMD pass per sample through all L layers, forward and backward,
//! so x0 and the running gradient stay in L1 while the layers stream through. Its backward
//! ```text
//! c = g . x0;  dx0 += (x_l . w_l) g;  dw_l += c x_l;  db_l += g;  g <- g + c w_l
//! ```
//! (g the gradient of x_{l+1}, then of x_l) reduces dw and db over the batch; samples are
//! taken in chunks of [`CROSS_CHUNK`], fixed by the batch size alone, each chunk sums its own
//! partial gradients, and the partials are added in chunk order, so the bits never depend on
//! the thread count.
//!
//! The full-rank layer is a d x d product per sample: it runs on the GEMM
//! ([`crate::gemm::linear_forward`], bias fused), followed by one elementwise SIMD pass; its
//! backward is
//! ```text
//! du = g ⊙ x0;  dx0 += g ⊙ u_l;  dW_l = du^T x_l;  db_l = colsum(du);  g <- g + du W_l
//! ```
//! with u_l = W_l x_l + b_l kept from the forward: three GEMM products per layer (the last
//! accumulating into g) and one elementwise pass.

use crate::gemm::{GemmOps, MatMut, MatRef, bias_grad_with_isa, dot_lanes, gemm_with_isa};
use crate::isa::Isa;
use crate::mat::check_view;
use crate::parallel::{Par, join_ranges, should_split, split_rows, task_grain};
use crate::simd::{SimdVec, dispatch};
use core::ops::Range;

/// Samples per partial-sum chunk of the rank-one backward: the chunks are fixed by the batch
/// size, never by the thread count, so the reduction of dw and db has the same bits for any
/// number of threads. 64 rows of the Kaggle x0 (429 floats) are 110 KiB: a chunk's inputs
/// stay in L2 while its partial gradients (2 L d floats) stay in L1.
pub const CROSS_CHUNK: usize = 64;

/// Smallest pass (in floats touched) that is split across threads.
const MIN_PARALLEL_FLOATS: usize = 1 << 15;

/// Which cross layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrossKind {
    /// DCN: x_{l+1} = x0 * (x_l . w_l) + b_l + x_l.
    RankOne,
    /// DCN-v2: x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l.
    FullRank,
}

impl CrossKind {
    /// Floats of the weights of `layers` layers of width `dim`: L d (rank one) or L d² (full
    /// rank).
    pub fn weight_len(self, dim: usize, layers: usize) -> usize {
        match self {
            CrossKind::RankOne => layers * dim,
            CrossKind::FullRank => layers * dim * dim,
        }
    }

    /// Floats the forward keeps for the backward, for a batch of `batch` samples: x_1 ..
    /// x_{L-1}, and per layer the scalar x_l . w_l (rank one) or the vector u_l = W_l x_l + b_l
    /// (full rank).
    pub fn saved_len(self, dim: usize, layers: usize, batch: usize) -> usize {
        let hidden = layers.saturating_sub(1) * dim;
        batch
            * match self {
                CrossKind::RankOne => hidden + layers,
                CrossKind::FullRank => hidden + layers * dim,
            }
    }
}

/// A cross network's parameters.
#[derive(Clone, Copy, Debug)]
pub struct CrossNet<'a> {
    pub kind: CrossKind,
    /// Width d of x0 and of every layer.
    pub dim: usize,
    /// Number of layers L (0: the output is x0).
    pub layers: usize,
    /// Rank one: L x d, row l = w_l. Full rank: L x d x d, W_l = `w[l d² ..]` row-major in
    /// the nn.Linear layout (out x in).
    pub w: &'a [f32],
    /// L x d, row l = b_l.
    pub b: &'a [f32],
}

impl CrossNet<'_> {
    fn check(&self, who: &str) {
        let (d, l) = (self.dim, self.layers);
        assert_eq!(
            self.w.len(),
            self.kind.weight_len(d, l),
            "{who}: {:?} weights of {l} layers of width {d} are {} floats, not {}",
            self.kind,
            self.kind.weight_len(d, l),
            self.w.len()
        );
        assert_eq!(
            self.b.len(),
            l * d,
            "{who}: biases of {l} layers of width {d} are {} floats, not {}",
            l * d,
            self.b.len()
        );
    }

    fn saved_len(&self, batch: usize) -> usize {
        self.kind.saved_len(self.dim, self.layers, batch)
    }
}

/// Where the backward writes the gradients.
#[derive(Debug)]
pub struct CrossGrads<'a> {
    /// Gradient of x0 (batch x d).
    pub x0: MatMut<'a>,
    /// Add the gradient of x0 to what `x0` holds (its other consumers' gradient) instead of
    /// overwriting it.
    pub accumulate_x0: bool,
    /// Gradient of the weights (overwritten), shaped as [`CrossNet::w`].
    pub w: &'a mut [f32],
    /// Gradient of the biases (overwritten), L x d.
    pub b: &'a mut [f32],
}

/// Reusable buffers of the backward (grow once, then no allocation).
#[derive(Default)]
pub struct CrossWorkspace {
    buf: Vec<f32>,
}

impl CrossWorkspace {
    fn take(&mut self, len: usize) -> &mut [f32] {
        if self.buf.len() < len {
            self.buf.resize(len, 0.0);
        }
        &mut self.buf[..len]
    }
}

/// Runs `leaf(samples, part)` over sub-ranges of `0..batch`, in parallel when `work` floats
/// are worth it. `part` holds rows `stride` apart from the first sample of its range; the
/// result of a sample never depends on the split.
fn for_samples(
    par: Par,
    batch: usize,
    work: usize,
    rows: (&mut [f32], usize),
    leaf: &(impl Fn(Range<usize>, &mut [f32]) + Sync),
) {
    for_items(par, batch, work, rows, (&mut [], 0), &|r, (part, _)| {
        leaf(r, part)
    });
}

/// Runs `leaf(items, (a, b))` over sub-ranges of `0..n`, in parallel when `work` floats are
/// worth it. `a` and `b` hold `a.1` and `b.1` floats per item from the first item of the
/// range (a shorter tail is the last item's); the result of an item never depends on the
/// split.
fn for_items(
    par: Par,
    n: usize,
    work: usize,
    (a, a_stride): (&mut [f32], usize),
    (b, b_stride): (&mut [f32], usize),
    leaf: &(impl Fn(Range<usize>, (&mut [f32], &mut [f32])) + Sync),
) {
    if n == 0 {
        return;
    }
    let grain = task_grain(n, should_split(par, work, MIN_PARALLEL_FLOATS));
    join_ranges(
        0..n,
        grain,
        (a, b),
        &|(a, b): (&mut [f32], &mut [f32]), lo, mid| {
            let (a0, a1) = split_rows(a, a_stride, mid - lo);
            let (b0, b1) = split_rows(b, b_stride, mid - lo);
            ((a0, b0), (a1, b1))
        },
        leaf,
    );
}

/// y = x * s + (b + z), elementwise: the rank-one layer's output row.
#[inline(always)]
fn rank_one_row<V: SimdVec>(y: &mut [f32], x: &[f32], s: f32, b: &[f32], z: &[f32]) {
    let s = V::splat(s);
    for (((yc, xc), bc), zc) in y
        .chunks_mut(V::LANES)
        .zip(x.chunks(V::LANES))
        .zip(b.chunks(V::LANES))
        .zip(z.chunks(V::LANES))
    {
        let v = V::from_slice(xc).mul_add(s, V::from_slice(bc) + V::from_slice(zc));
        v.store_to(yc);
    }
}

/// y = x ⊙ u + z, elementwise: the full-rank layer's output row.
#[inline(always)]
fn full_rank_row<V: SimdVec>(y: &mut [f32], x: &[f32], u: &[f32], z: &[f32]) {
    for (((yc, xc), uc), zc) in y
        .chunks_mut(V::LANES)
        .zip(x.chunks(V::LANES))
        .zip(u.chunks(V::LANES))
        .zip(z.chunks(V::LANES))
    {
        let v = V::from_slice(xc).mul_add(V::from_slice(uc), V::from_slice(zc));
        v.store_to(yc);
    }
}

/// y (+)= x: copies a row, or adds it when `add`.
#[inline(always)]
fn copy_or_add<V: SimdVec>(y: &mut [f32], x: &[f32], add: bool) {
    if add {
        for (yc, xc) in y.chunks_mut(V::LANES).zip(x.chunks(V::LANES)) {
            (V::from_slice(yc) + V::from_slice(xc)).store_to(yc);
        }
    } else {
        y.copy_from_slice(x);
    }
}

/// Forward of the cross network: `out` (batch x d) = x_L for the rows of `x0` (batch x d).
/// `saved` (`kind.saved_len(dim, layers, batch)` floats, laid out as the backward reads it)
/// receives what the backward needs. Padding between output rows is left untouched. Runs on
/// [`Isa::selected`].
pub fn cross_forward(net: &CrossNet, x0: MatRef, saved: &mut [f32], out: MatMut, par: Par) {
    cross_forward_with_isa(Isa::selected(), net, x0, saved, out, par)
}

/// [`cross_forward`] on `isa` (panics if the CPU lacks it).
pub fn cross_forward_with_isa(
    isa: Isa,
    net: &CrossNet,
    x0: MatRef,
    saved: &mut [f32],
    out: MatMut,
    par: Par,
) {
    const WHO: &str = "cross_forward";
    net.check(WHO);
    let (d, batch) = (net.dim, x0.rows());
    check_view(x0, batch, d, "x0", WHO);
    check_view(out.as_ref(), batch, d, "out", WHO);
    let need = net.saved_len(batch);
    assert!(
        saved.len() >= need,
        "{WHO}: saved has {} floats, the backward needs {need}",
        saved.len()
    );
    let saved = &mut saved[..need];
    if net.layers == 0 {
        let (x0_stride, x0) = (x0.row_stride(), x0.as_slice());
        let (out_stride, out) = (out.row_stride(), out.into_slice());
        for_samples(
            par,
            batch,
            2 * batch * d,
            (out, out_stride),
            &|r, o: &mut [f32]| {
                let lo = r.start;
                for b in r {
                    o[(b - lo) * out_stride..][..d].copy_from_slice(&x0[b * x0_stride..][..d]);
                }
            },
        );
        return;
    }
    match net.kind {
        CrossKind::RankOne => rank_one_forward(isa, net, x0, saved, out, par),
        CrossKind::FullRank => full_rank_forward(isa, net, x0, saved, out, par),
    }
}

/// Rank-one forward, one sample at a time through all layers. `saved` holds per sample
/// `[x_1 .. x_{L-1} | s_0 .. s_{L-1}]`, s_l = x_l . w_l.
fn rank_one_forward(
    isa: Isa,
    net: &CrossNet,
    x0: MatRef,
    saved: &mut [f32],
    out: MatMut,
    par: Par,
) {
    let (batch, x0_stride, x0) = (x0.rows(), x0.row_stride(), x0.as_slice());
    let (out_stride, out) = (out.row_stride(), out.into_slice());
    let (d, layers) = (net.dim, net.layers);
    let width = net.saved_len(1);
    let hidden_len = (layers - 1) * d;
    let leaf = |r: Range<usize>, (sv, o): (&mut [f32], &mut [f32])| {
        dispatch!(isa, V => for (i, b) in r.enumerate() {
            let x0_row = &x0[b * x0_stride..][..d];
            let (hidden, dots) = sv[i * width..][..width].split_at_mut(hidden_len);
            let out_row = &mut o[i * out_stride..][..d];
            for l in 0..layers {
                let (done, rest) = hidden.split_at_mut(l * d);
                let xl = if l == 0 { x0_row } else { &done[(l - 1) * d..] };
                let s = dot_lanes::<V>(xl, &net.w[l * d..(l + 1) * d]);
                dots[l] = s;
                let dst = if l + 1 == layers {
                    &mut *out_row
                } else {
                    &mut rest[..d]
                };
                rank_one_row::<V>(dst, x0_row, s, &net.b[l * d..(l + 1) * d], xl);
            }
        })
    };
    let work = batch * layers * d * 3;
    for_items(par, batch, work, (saved, width), (out, out_stride), &leaf);
}

/// Full-rank forward, layer by layer: u_l = x_l W_l^T + b_l on the GEMM, then x_{l+1} =
/// x0 ⊙ u_l + x_l elementwise. `saved` holds `[x_1 | .. | x_{L-1} | u_0 | .. | u_{L-1}]`,
/// each a contiguous batch x d matrix.
fn full_rank_forward(
    isa: Isa,
    net: &CrossNet,
    x0: MatRef,
    saved: &mut [f32],
    out: MatMut,
    par: Par,
) {
    let (batch, x0_stride, x0) = (x0.rows(), x0.row_stride(), x0.as_slice());
    let (out_stride, out) = (out.row_stride(), out.into_slice());
    let (d, layers) = (net.dim, net.layers);
    let bd = batch * d;
    let (hidden, us) = saved.split_at_mut((layers - 1) * bd);
    for l in 0..layers {
        let (done, rest) = hidden.split_at_mut(l * bd);
        let (xl, xl_stride) = if l == 0 {
            (x0, x0_stride)
        } else {
            (&done[(l - 1) * bd..], d)
        };
        let u = &mut us[l * bd..(l + 1) * bd];
        // u = x_l W_l^T + b_l, the layer's forward product.
        let ops = GemmOps {
            bias: Some(&net.b[l * d..(l + 1) * d]),
            ..GemmOps::default()
        };
        gemm_with_isa(
            isa,
            MatRef::with_row_stride(xl, batch, d, xl_stride),
            MatRef::new(&net.w[l * d * d..(l + 1) * d * d], d, d).t(),
            MatMut::new(u, batch, d),
            &ops,
            par,
        );
        let u: &[f32] = u;
        let (dst, dst_stride) = if l + 1 == layers {
            (&mut *out, out_stride)
        } else {
            (&mut rest[..bd], d)
        };
        for_samples(
            par,
            batch,
            4 * bd,
            (dst, dst_stride),
            &|r, y: &mut [f32]| {
                let lo = r.start;
                dispatch!(isa, V => for b in r {
                    full_rank_row::<V>(
                        &mut y[(b - lo) * dst_stride..][..d],
                        &x0[b * x0_stride..][..d],
                        &u[b * d..][..d],
                        &xl[b * xl_stride..][..d],
                    );
                })
            },
        );
    }
}

/// Backward of [`cross_forward`] from the gradient of its output (`grad_out`, batch x d),
/// with the `saved` values of that forward: the gradients of x0, of the weights and of the
/// biases (see [`CrossGrads`]). Parameter gradients are sums over the batch, added in an order
/// fixed by the batch size alone. Runs on [`Isa::selected`].
pub fn cross_backward(
    net: &CrossNet,
    x0: MatRef,
    saved: &[f32],
    grad_out: MatRef,
    grads: CrossGrads,
    ws: &mut CrossWorkspace,
    par: Par,
) {
    let isa = Isa::selected();
    cross_backward_with_isa(isa, net, x0, saved, grad_out, grads, ws, par)
}

/// [`cross_backward`] on `isa` (panics if the CPU lacks it).
#[allow(clippy::too_many_arguments)]
pub fn cross_backward_with_isa(
    isa: Isa,
    net: &CrossNet,
    x0: MatRef,
    saved: &[f32],
    grad_out: MatRef,
    grads: CrossGrads,
    ws: &mut CrossWorkspace,
    par: Par,
) {
    const WHO: &str = "cross_backward";
    net.check(WHO);
    let (d, batch) = (net.dim, x0.rows());
    check_view(x0, batch, d, "x0", WHO);
    check_view(grad_out, batch, d, "grad_out", WHO);
    check_view(grads.x0.as_ref(), batch, d, "grad x0", WHO);
    let need = net.saved_len(batch);
    assert!(
        saved.len() >= need,
        "{WHO}: saved has {} floats, the forward wrote {need}",
        saved.len()
    );
    assert_eq!(
        grads.w.len(),
        net.w.len(),
        "{WHO}: weight gradient has {} floats for {} weights",
        grads.w.len(),
        net.w.len()
    );
    assert_eq!(
        grads.b.len(),
        net.b.len(),
        "{WHO}: bias gradient has {} floats for {} biases",
        grads.b.len(),
        net.b.len()
    );
    let saved = &saved[..need];
    if net.layers == 0 {
        let (gs, acc) = (grads.x0.row_stride(), grads.accumulate_x0);
        let (grad_out_stride, grad_out) = (grad_out.row_stride(), grad_out.as_slice());
        for_samples(
            par,
            batch,
            2 * batch * d,
            (grads.x0.into_slice(), gs),
            &|r, gx: &mut [f32]| {
                let lo = r.start;
                dispatch!(isa, V => for b in r {
                    let src = &grad_out[b * grad_out_stride..][..d];
                    copy_or_add::<V>(&mut gx[(b - lo) * gs..][..d], src, acc);
                })
            },
        );
        return;
    }
    match net.kind {
        CrossKind::RankOne => rank_one_backward(isa, net, x0, saved, grad_out, grads, ws, par),
        CrossKind::FullRank => full_rank_backward(isa, net, x0, saved, grad_out, grads, ws, par),
    }
}

/// Rank-one backward: fixed chunks of CROSS_CHUNK samples, each through all layers one sample
/// at a time, with its own partial dw and db; the partials are then added in chunk order.
#[allow(clippy::too_many_arguments)]
fn rank_one_backward(
    isa: Isa,
    net: &CrossNet,
    x0: MatRef,
    saved: &[f32],
    grad_out: MatRef,
    grads: CrossGrads,
    ws: &mut CrossWorkspace,
    par: Par,
) {
    let (batch, x0_stride, x0) = (x0.rows(), x0.row_stride(), x0.as_slice());
    let (grad_out_stride, grad_out) = (grad_out.row_stride(), grad_out.as_slice());
    let (d, layers) = (net.dim, net.layers);
    let ld = layers * d;
    let width = net.saved_len(1);
    let hidden_len = (layers - 1) * d;
    let CrossGrads {
        x0: gx0,
        accumulate_x0: acc,
        w: dw,
        b: db,
    } = grads;
    let (gs, gx0) = (gx0.row_stride(), gx0.into_slice());
    let chunks = batch.div_ceil(CROSS_CHUNK);
    // Per chunk: partial dw (L x d), partial db (L x d), and the running gradient g (d).
    let part_len = 2 * ld + d;
    let partials = ws.take(chunks * part_len);
    // A leaf's parts start at the first chunk of its range (partials) and at that chunk's
    // first sample (dx0).
    let leaf = |chunk_range: Range<usize>, (parts, gx): (&mut [f32], &mut [f32])| {
        let k0 = chunk_range.start;
        let s0 = k0 * CROSS_CHUNK;
        dispatch!(isa, V => for k in chunk_range {
            let (pw, rest) = parts[(k - k0) * part_len..][..part_len].split_at_mut(ld);
            let (pb, g) = rest.split_at_mut(ld);
            pw.fill(0.0);
            pb.fill(0.0);
            for b in k * CROSS_CHUNK..((k + 1) * CROSS_CHUNK).min(batch) {
                let x0_row = &x0[b * x0_stride..][..d];
                let (hidden, dots) = saved[b * width..][..width].split_at(hidden_len);
                let gx0 = &mut gx[(b - s0) * gs..][..d];
                if !acc {
                    gx0.fill(0.0);
                }
                g.copy_from_slice(&grad_out[b * grad_out_stride..][..d]);
                for l in (0..layers).rev() {
                    let xl = if l == 0 {
                        x0_row
                    } else {
                        &hidden[(l - 1) * d..l * d]
                    };
                    let c = V::splat(dot_lanes::<V>(g, x0_row));
                    let s = V::splat(dots[l]);
                    let w = &net.w[l * d..(l + 1) * d];
                    let (dw, db) = (&mut pw[l * d..(l + 1) * d], &mut pb[l * d..(l + 1) * d]);
                    let n = V::LANES;
                    for (((((gc, xc), wc), dwc), dbc), gxc) in g
                        .chunks_mut(n)
                        .zip(xl.chunks(n))
                        .zip(w.chunks(n))
                        .zip(dw.chunks_mut(n))
                        .zip(db.chunks_mut(n))
                        .zip(gx0.chunks_mut(n))
                    {
                        let gv = V::from_slice(gc);
                        gv.mul_add(s, V::from_slice(gxc)).store_to(gxc);
                        V::from_slice(xc).mul_add(c, V::from_slice(dwc)).store_to(dwc);
                        (V::from_slice(dbc) + gv).store_to(dbc);
                        V::from_slice(wc).mul_add(c, gv).store_to(gc);
                    }
                }
                copy_or_add::<V>(gx0, g, true);
            }
        })
    };
    // Items are chunks: CROSS_CHUNK rows of dx0 each.
    let work = batch * layers * d * 6;
    let (partial_rows, gx0_rows) = ((&mut *partials, part_len), (gx0, gs * CROSS_CHUNK));
    for_items(par, chunks, work, partial_rows, gx0_rows, &leaf);
    // dw, db: the chunks' partials added in chunk order.
    dw.fill(0.0);
    db.fill(0.0);
    dispatch!(isa, V => for part in partials.chunks(part_len) {
        copy_or_add::<V>(dw, &part[..ld], true);
        copy_or_add::<V>(db, &part[ld..2 * ld], true);
    });
}

/// Full-rank backward, layer by layer from the last: per layer one elementwise pass
/// (du = g ⊙ x0, dx0 += g ⊙ u_l) and three GEMM products (dW_l, db_l, g += du W_l).
#[allow(clippy::too_many_arguments)]
fn full_rank_backward(
    isa: Isa,
    net: &CrossNet,
    x0: MatRef,
    saved: &[f32],
    grad_out: MatRef,
    grads: CrossGrads,
    ws: &mut CrossWorkspace,
    par: Par,
) {
    let (batch, x0_stride, x0) = (x0.rows(), x0.row_stride(), x0.as_slice());
    let (grad_out_stride, grad_out) = (grad_out.row_stride(), grad_out.as_slice());
    let (d, layers) = (net.dim, net.layers);
    let bd = batch * d;
    let (hidden, us) = saved.split_at((layers - 1) * bd);
    let CrossGrads {
        x0: gx0,
        accumulate_x0: acc,
        w: dw,
        b: db,
    } = grads;
    let (gs, gx0) = (gx0.row_stride(), gx0.into_slice());
    let (g, du) = ws.take(2 * bd).split_at_mut(bd);
    for_samples(par, batch, 2 * bd, (&mut *g, d), &|r, gv: &mut [f32]| {
        let lo = r.start;
        for b in r {
            gv[(b - lo) * d..][..d].copy_from_slice(&grad_out[b * grad_out_stride..][..d]);
        }
    });
    for l in (0..layers).rev() {
        let (xl, xl_stride) = if l == 0 {
            (x0, x0_stride)
        } else {
            (&hidden[(l - 1) * bd..l * bd], d)
        };
        let u = &us[l * bd..(l + 1) * bd];
        // The first pass (the last layer) overwrites dx0 unless accumulating.
        let add = acc || l + 1 < layers;
        let gr: &[f32] = g;
        let leaf = |r: Range<usize>, (dur, gxr): (&mut [f32], &mut [f32])| {
            let lo = r.start;
            dispatch!(isa, V => for b in r {
                let gb = &gr[b * d..][..d];
                let ub = &u[b * d..][..d];
                let xb = &x0[b * x0_stride..][..d];
                let dub = &mut dur[(b - lo) * d..][..d];
                let gxb = &mut gxr[(b - lo) * gs..][..d];
                let n = V::LANES;
                for ((((gc, uc), xc), duc), gxc) in gb
                    .chunks(n)
                    .zip(ub.chunks(n))
                    .zip(xb.chunks(n))
                    .zip(dub.chunks_mut(n))
                    .zip(gxb.chunks_mut(n))
                {
                    let gv = V::from_slice(gc);
                    (gv * V::from_slice(xc)).store_to(duc);
                    let base = if add {
                        V::from_slice(gxc)
                    } else {
                        V::splat(0.0)
                    };
                    gv.mul_add(V::from_slice(uc), base).store_to(gxc);
                }
            })
        };
        for_items(par, batch, 5 * bd, (&mut *du, d), (&mut *gx0, gs), &leaf);
        let du_m = MatRef::new(du, batch, d);
        // dW_l = du^T x_l, the layer's weight product.
        gemm_with_isa(
            isa,
            du_m.t(),
            MatRef::with_row_stride(xl, batch, d, xl_stride),
            MatMut::new(&mut dw[l * d * d..(l + 1) * d * d], d, d),
            &GemmOps::default(),
            par,
        );
        bias_grad_with_isa(isa, du_m, None, &mut db[l * d..(l + 1) * d], false, par);
        let ops = GemmOps {
            beta: 1.0,
            ..GemmOps::default()
        };
        gemm_with_isa(
            isa,
            du_m,
            MatRef::new(&net.w[l * d * d..(l + 1) * d * d], d, d),
            MatMut::new(g, batch, d),
            &ops,
            par,
        );
    }
    // x_0 is x0 itself: the gradient that reached it joins dx0.
    let gr: &[f32] = g;
    for_samples(par, batch, 2 * bd, (gx0, gs), &|r, gx: &mut [f32]| {
        let lo = r.start;
        dispatch!(isa, V => for b in r {
            copy_or_add::<V>(&mut gx[(b - lo) * gs..][..d], &gr[b * d..][..d], true);
        })
    });
}
