//! The GEMM on the products of one training chunk (the Kaggle MLPs' forward, dX and dW at 256,
//! 128 and awkward row counts) and on the paths those shapes take: the dot-product path that
//! runs several rows at once (one-output layers), tiny K (k = 1: dX of a one-output layer),
//! and K cut into balanced blocks. Every case against the scalar reference, on every ISA
//! level this CPU has.

mod common;

use common::{fill, isas};
use dlrm_kernels::gemm::{self, BlockSizes, GemmOps, MatMut, MatRef, PackedB};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

/// Awkward sizes: 1, around the lane widths (16) and the dot path's row group (4).
const AWKWARD: [usize; 12] = [1, 2, 3, 4, 5, 7, 13, 15, 16, 17, 33, 65];

fn tolerance(k: usize) -> f32 {
    (k as f32 + 4.0) * 4.0 * f32::EPSILON + 1e-6
}

fn assert_close(ours: &[f32], expect: &[f32], k: usize, what: &str) {
    let tol = tolerance(k);
    for (i, (o, e)) in ours.iter().zip(expect).enumerate() {
        assert!(
            (o - e).abs() <= tol * (1.0 + e.abs()),
            "{what}: C[{i}] = {o}, reference {e}"
        );
    }
}

/// C = a . b under `ops` by the reference, from `c0`.
fn reference_product(a: MatRef, b: MatRef, c0: &[f32], ops: &GemmOps) -> Vec<f32> {
    let mut c = c0.to_vec();
    reference::gemm(a, b, &mut MatMut::new(&mut c, a.rows(), b.cols()), ops);
    c
}

/// One layer `inp -> out` of a chunk of `rows` rows: the forward (bias, ReLU, W^T prepacked),
/// dX (ReLU mask, W prepacked) and dW (mask) as the training step runs them, on `isa`,
/// against the reference.
fn check_layer(isa: Isa, rows: usize, inp: usize, out: usize, relu: bool) {
    let seed = (rows * 1000 + inp * 10 + out) as u64;
    let (x, w, bias) = (
        fill(rows * inp, seed),
        fill(out * inp, seed ^ 1),
        fill(out, seed ^ 2),
    );
    let (dy, y) = (fill(rows * out, seed ^ 3), fill(rows * out, seed ^ 4));
    let (x, w) = (MatRef::new(&x, rows, inp), MatRef::new(&w, out, inp));
    let (dy, y) = (MatRef::new(&dy, rows, out), MatRef::new(&y, rows, out));
    let mask = relu.then_some(y);
    let what = |form: &str| format!("{isa:?} {form} rows {rows}, layer {inp}-{out}");
    let seq = Par::Seq;

    let fwd = GemmOps {
        bias: Some(&bias),
        relu,
        ..GemmOps::default()
    };
    let mut packed = PackedB::new();
    packed.pack_with_isa(isa, w.t());
    let mut c = vec![f32::NAN; rows * out];
    let cm = MatMut::new(&mut c, rows, out);
    gemm::gemm_prepacked_with_isa(isa, x, w.t(), &packed, cm, &fwd, seq);
    let expect = reference_product(x, w.t(), &vec![0.0; rows * out], &fwd);
    assert_close(&c, &expect, inp, &what("forward"));

    let dx_ops = GemmOps {
        a_relu_mask: mask,
        ..GemmOps::default()
    };
    packed.pack_with_isa(isa, w);
    let mut c = vec![f32::NAN; rows * inp];
    let cm = MatMut::new(&mut c, rows, inp);
    gemm::gemm_prepacked_with_isa(isa, dy, w, &packed, cm, &dx_ops, seq);
    let expect = reference_product(dy, w, &vec![0.0; rows * inp], &dx_ops);
    assert_close(&c, &expect, out, &what("dX"));

    let dw_ops = GemmOps {
        a_relu_mask: mask.map(|m| m.t()),
        ..GemmOps::default()
    };
    let mut c = vec![f32::NAN; out * inp];
    gemm::gemm_with_isa(isa, dy.t(), x, MatMut::new(&mut c, out, inp), &dw_ops, seq);
    let expect = reference_product(dy.t(), x, &vec![0.0; out * inp], &dw_ops);
    assert_close(&c, &expect, rows, &what("dW"));
}

/// The Kaggle preset's layers (bottom 13-512-256-64-16, top 367-512-256-1) at the chunk sizes
/// of batch 2048 (256 rows) and 128, and at awkward row counts.
#[test]
fn kaggle_chunk_products_match_the_reference() {
    let layers = [
        (13, 512, true),
        (512, 256, true),
        (256, 64, true),
        (64, 16, true),
        (367, 512, true),
        (256, 1, false),
    ];
    for isa in isas() {
        for rows in [256, 128, 1, 13, 17] {
            for (inp, out, relu) in layers {
                check_layer(isa, rows, inp, out, relu);
            }
        }
    }
}

/// K cut by [`BlockSizes::kc_for`]: never deeper than KC, never more blocks than KC needs, and
/// balanced (the blocks differ by less than 8 plus the rounding to 8).
#[test]
fn kc_for_balances_the_k_blocks() {
    for kc in [8, 16, 128, 384, 512] {
        let bs = BlockSizes {
            kc,
            mc: 96,
            nc: 256,
        };
        for k in 1..=2100 {
            let cut = bs.kc_for(k);
            assert!(cut > 0 && cut <= kc, "k {k}, kc {kc}: cut {cut}");
            assert_eq!(k.div_ceil(cut), k.div_ceil(kc), "k {k}, kc {kc}: cut {cut}");
            let last = k - (k.div_ceil(cut) - 1) * cut;
            if k > kc && kc >= 128 {
                assert!(
                    cut - last < 8 * k.div_ceil(kc),
                    "k {k}, kc {kc}: {cut} .. {last}"
                );
            }
        }
    }
    let host = BlockSizes::host();
    assert_eq!(host.kc_for(host.kc), host.kc);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The dot-product path (C with at most 4 columns, A's rows and B's columns contiguous:
    /// Y = X W^T of a layer with few outputs), every row count around its row group, with
    /// each epilogue.
    #[test]
    fn dot_path_matches_the_reference(
        m in prop::sample::select(AWKWARD.to_vec()),
        n in 1usize..=4,
        k in prop_oneof![prop::sample::select(AWKWARD.to_vec()), 1usize..300],
        (beta, bias, relu) in (prop::sample::select(vec![0.0f32, 1.0]), any::<bool>(), any::<bool>()),
        seed in any::<u64>(),
    ) {
        let (a, w, b_bias, c0) = (fill(m * k, seed), fill(n * k, seed ^ 1), fill(n, seed ^ 2), fill(m * n, seed ^ 3));
        let (a, wt) = (MatRef::new(&a, m, k), MatRef::new(&w, n, k).t());
        let ops = GemmOps { beta, bias: bias.then_some(&b_bias[..]), relu, ..GemmOps::default() };
        let expect = reference_product(a, wt, &c0, &ops);
        for isa in isas() {
            let mut c = c0.clone();
            gemm::gemm_with_isa(isa, a, wt, MatMut::new(&mut c, m, n), &ops, Par::Seq);
            assert_close(&c, &expect, k, &format!("{isa:?} dot path {m}x{n}x{k}"));
        }
        // Rows grouped or alone give the same bits: each element is `gemm::dot` of its row and
        // column (no epilogue).
        let mut c = vec![0.0; m * n];
        gemm::gemm(a, wt, MatMut::new(&mut c, m, n), &GemmOps::default(), Par::Seq);
        for i in 0..m {
            for j in 0..n {
                let alone = gemm::dot(a.row_slice(i, 0, k), &w[j * k..(j + 1) * k]);
                prop_assert_eq!(c[i * n + j].to_bits(), alone.to_bits(), "C[{}][{}]", i, j);
            }
        }
    }

    /// Tiny K on the tiled path (k = 1 is dX of a one-output layer: an outer product), with
    /// every epilogue, prepacked or not, against the reference.
    #[test]
    fn tiny_k_tiles_match_the_reference(
        m in prop::sample::select(AWKWARD.to_vec()),
        n in prop::sample::select(vec![5usize, 16, 17, 33, 64, 256]),
        k in prop::sample::select(vec![1usize, 2, 13, 15, 16, 17, 31]),
        (alpha, beta, bias, relu, mask) in (prop::sample::select(vec![1.0f32, -0.5]), prop::sample::select(vec![0.0f32, 1.0]), any::<bool>(), any::<bool>(), any::<bool>()),
        seed in any::<u64>(),
    ) {
        let (a, b, msk) = (fill(m * k, seed), fill(k * n, seed ^ 1), fill(m * k, seed ^ 2));
        let (b_bias, c0) = (fill(n, seed ^ 3), fill(m * n, seed ^ 4));
        let (a, b) = (MatRef::new(&a, m, k), MatRef::new(&b, k, n));
        let ops = GemmOps {
            alpha,
            beta,
            bias: bias.then_some(&b_bias[..]),
            relu,
            a_relu_mask: mask.then(|| MatRef::new(&msk, m, k)),
            ..GemmOps::default()
        };
        let expect = reference_product(a, b, &c0, &ops);
        for isa in isas() {
            let mut packed = PackedB::new();
            packed.pack_with_isa(isa, b);
            let mut c = c0.clone();
            gemm::gemm_prepacked_with_isa(isa, a, b, &packed, MatMut::new(&mut c, m, n), &ops, Par::Seq);
            assert_close(&c, &expect, k, &format!("{isa:?} prepacked {m}x{n}x{k}"));
            let mut c = c0.clone();
            gemm::gemm_with_isa(isa, a, b, MatMut::new(&mut c, m, n), &ops, Par::Seq);
            assert_close(&c, &expect, k, &format!("{isa:?} {m}x{n}x{k}"));
        }
    }

    /// K longer than KC, cut into balanced blocks, with explicit small block sizes (so short
    /// K values take several blocks), against the reference.
    #[test]
    fn balanced_k_blocks_match_the_reference(
        m in prop::sample::select(AWKWARD.to_vec()),
        n in prop::sample::select(AWKWARD.to_vec()),
        k in prop_oneof![prop::sample::select(vec![17usize, 33, 65, 129, 513]), 1usize..600],
        kc in prop::sample::select(vec![8usize, 16, 24, 128]),
        (beta, relu) in (prop::sample::select(vec![0.0f32, 1.0]), any::<bool>()),
        seed in any::<u64>(),
    ) {
        let (a, b, c0) = (fill(m * k, seed), fill(k * n, seed ^ 1), fill(m * n, seed ^ 2));
        let (a, b) = (MatRef::new(&a, m, k), MatRef::new(&b, k, n));
        let ops = GemmOps { beta, relu, ..GemmOps::default() };
        let expect = reference_product(a, b, &c0, &ops);
        let bs = BlockSizes { kc, mc: 48, nc: 256 };
        for isa in isas() {
            let mut c = c0.clone();
            gemm::gemm_with_blocks(isa, &bs, a, b, MatMut::new(&mut c, m, n), &ops, Par::Seq);
            assert_close(&c, &expect, k, &format!("{isa:?} {m}x{n}x{k}, kc {kc}"));
        }
    }
}
