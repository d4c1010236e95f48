//! The GEMM with [`Precision::Bf16`] against its scalar twin: op(A) ⊙ [mask > 0] and op(B)
//! rounded to bf16 by `Bf16::from_f32`, multiplied exactly (f64), the epilogue in f64.
//!
//! The kernel accumulates the exact bf16 products in f32, so it may differ from the twin by the
//! rounding of an f32 summation only: with u = 2^-24 and at most K + 3 roundings (the K - 1
//! additions, pair sums inside the BF16 instructions, alpha, beta, bias), each erring by at most
//! u times the running sum of magnitudes,
//!   |C - C_ref| <= (K + 4) * 2u * (|alpha| sum_p |A_ip B_pj| + |beta C_ij| + |bias_j|) + tiny,
//! with a factor 2 of slack. That is far tighter than the effect of the bf16 rounding itself
//! (about 2^-9 relative per operand), which [`f32_operands_fail_the_bf16_bound`] checks, so a
//! kernel that skipped the rounding would fail.
//!
//! `gemm` runs the path `Isa::selected` picks; every path this CPU supports (portable,
//! AVX512-BF16, AMX tiles) is also checked directly through `gemm_rounded_bf16`.

mod common;

use common::gemm::{Case, Inputs, case, inputs};
use common::{bits, fill};
use dlrm_kernels::bf16::{Bf16, Isa};
use dlrm_kernels::gemm::{self, GemmOps, MatMut, MatRef, Precision};
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

/// Dimensions biased towards the awkward: 1, tile and pair edges (15, 16, 17, 31, 32, 33), odd.
fn dim() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 3, 7, 12, 13, 15, 16, 17, 24, 31, 32, 33, 47, 48, 63, 64, 65, 97, 128, 129, 255, 257]),
        1 => 1usize..=300,
    ]
}

fn ops<'a>(cs: &Case, inp: &'a Inputs, precision: Precision) -> GemmOps<'a> {
    GemmOps {
        precision,
        ..common::gemm::ops(cs, inp)
    }
}

fn run(cs: &Case, inp: &Inputs, precision: Precision, par: Par) -> Vec<f32> {
    let mut c = inp.c0.clone();
    gemm::gemm(
        inp.a.view(),
        inp.b.view(),
        MatMut::with_row_stride(&mut c, cs.m, cs.n, inp.ldc),
        &ops(cs, inp, precision),
        par,
    );
    c
}

/// The product on one ISA's path.
fn run_on(cs: &Case, inp: &Inputs, isa: Isa, par: Par) -> Vec<f32> {
    let mut c = inp.c0.clone();
    gemm::gemm_rounded_bf16(
        inp.a.view(),
        inp.b.view(),
        MatMut::with_row_stride(&mut c, cs.m, cs.n, inp.ldc),
        &ops(cs, inp, Precision::Bf16),
        isa,
        par,
    );
    c
}

fn round(x: f32) -> f32 {
    Bf16::from_f32(x).to_f32()
}

/// The scalar twin: dense row-major op(A) ⊙ [mask > 0] and op(B), rounded to bf16.
fn rounded_operands(cs: &Case, inp: &Inputs) -> (Vec<f32>, Vec<f32>) {
    let (a, b) = (inp.a.view(), inp.b.view());
    let mask = inp.mask.as_ref().map(|m| m.view());
    let mut ar = vec![0.0f32; cs.m * cs.k];
    for i in 0..cs.m {
        for p in 0..cs.k {
            if mask.is_none_or(|mk| mk.get(i, p) > 0.0) {
                ar[i * cs.k + p] = round(a.get(i, p));
            }
        }
    }
    let mut br = vec![0.0f32; cs.k * cs.n];
    for p in 0..cs.k {
        for j in 0..cs.n {
            br[p * cs.n + j] = round(b.get(p, j));
        }
    }
    (ar, br)
}

/// Checks `ours` against the twin; `Err` names the first element off by more than the bound.
fn check(cs: &Case, inp: &Inputs, ours: &[f32]) -> Result<(), String> {
    Twin::new(cs, inp).check(ours)
}

/// The twin's result and the error bound of each element.
struct Twin<'a> {
    cs: &'a Case,
    inp: &'a Inputs,
    expect: Vec<f32>,
    tol: Vec<f32>,
}

impl<'a> Twin<'a> {
    fn new(cs: &'a Case, inp: &'a Inputs) -> Self {
        let (ar, br) = rounded_operands(cs, inp);
        let mut expect = inp.c0.clone();
        let twin_ops = GemmOps {
            alpha: cs.alpha,
            beta: cs.beta,
            bias: inp.bias.as_deref(),
            relu: cs.relu,
            ..GemmOps::default()
        };
        reference::gemm(
            MatRef::new(&ar, cs.m, cs.k),
            MatRef::new(&br, cs.k, cs.n),
            &mut MatMut::with_row_stride(&mut expect, cs.m, cs.n, inp.ldc),
            &twin_ops,
        );
        let u = f32::EPSILON / 2.0;
        let mut tol = vec![0.0f32; expect.len()];
        for i in 0..cs.m {
            for j in 0..cs.n {
                let idx = i * inp.ldc + j;
                let products: f32 = (0..cs.k)
                    .map(|p| (ar[i * cs.k + p] * br[p * cs.n + j]).abs())
                    .sum();
                let c_term = if cs.beta != 0.0 {
                    (cs.beta * inp.c0[idx]).abs()
                } else {
                    0.0
                };
                let bias_term = inp.bias.as_ref().map_or(0.0, |b| b[j].abs());
                let magnitude = products * cs.alpha.abs() + c_term + bias_term;
                tol[idx] = (cs.k as f32 + 4.0) * 2.0 * u * 2.0 * magnitude + 1e-30;
            }
        }
        Twin {
            cs,
            inp,
            expect,
            tol,
        }
    }

    fn check(&self, ours: &[f32]) -> Result<(), String> {
        let (cs, ldc) = (self.cs, self.inp.ldc);
        for i in 0..cs.m {
            for j in 0..cs.n {
                let idx = i * ldc + j;
                let (o, e, tol) = (ours[idx], self.expect[idx], self.tol[idx]);
                // Written so that a NaN fails.
                let within = (o - e).abs() <= tol;
                if !within {
                    return Err(format!("C[{i},{j}] = {o}, twin {e} (tol {tol}) in {cs:?}"));
                }
            }
            // Padding between rows is never written.
            if i + 1 < cs.m {
                let pad = i * ldc + cs.n..(i + 1) * ldc;
                if bits(&ours[pad.clone()]) != bits(&self.inp.c0[pad]) {
                    return Err(format!("padding of row {i} written in {cs:?}"));
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn bf16_gemm_matches_the_rounded_twin(cs in case(dim())) {
        let inp = inputs(&cs);
        let ours = run(&cs, &inp, Precision::Bf16, Par::Rayon);
        check(&cs, &inp, &ours).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn bf16_gemm_is_thread_count_invariant(cs in case(dim())) {
        let inp = inputs(&cs);
        let seq = run(&cs, &inp, Precision::Bf16, Par::Seq);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let split = pool.install(|| run(&cs, &inp, Precision::Bf16, Par::AlwaysSplit));
            prop_assert_eq!(bits(&seq), bits(&split), "{} threads", threads);
        }
    }

    #[test]
    fn every_isa_matches_the_rounded_twin_for_any_thread_count(cs in case(dim())) {
        let inp = inputs(&cs);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for isa in Isa::all_supported() {
            let seq = run_on(&cs, &inp, isa, Par::Seq);
            check(&cs, &inp, &seq).map_err(|e| TestCaseError::fail(format!("{isa:?}: {e}")))?;
            let split = pool.install(|| run_on(&cs, &inp, isa, Par::AlwaysSplit));
            prop_assert_eq!(bits(&seq), bits(&split), "{:?}", isa);
        }
    }
}

/// The layer shapes of the Kaggle preset (forward, dX, dW at batch 2048) and the special paths
/// of the f32 GEMM (dot products, split K, narrow tiles), with every epilogue.
#[test]
fn bf16_gemm_layer_shapes_match_the_twin() {
    let shapes = [
        (2048, 512, 367, false, true),  // top MLP forward: Y = X W^T
        (2048, 367, 512, false, false), // its dX = dY W
        (512, 367, 2048, true, false),  // its dW = dY^T X, K = batch
        (2048, 1, 256, false, true),    // one output
        (1, 256, 2048, true, false),    // dW of a one-output layer
        (512, 13, 600, true, false),    // dW of the 13 -> 512 layer
        (33, 17, 1, false, false),      // K = 1
    ];
    for (m, n, k, ta, tb) in shapes {
        // The plain product (a weight gradient's: AMX stores its whole blocks straight from
        // the tiles), bias alone, and everything.
        let epilogues = [
            (0.0, false, false, false),
            (0.0, false, false, true),
            (1.0, true, true, true),
        ];
        for (beta, relu, mask, bias) in epilogues {
            let cs = Case {
                m,
                n,
                k,
                ta,
                tb,
                pads: (1, 0, 2),
                alpha: 1.0,
                beta,
                bias,
                relu,
                mask,
                seed: (m * 31 + n * 7 + k) as u64,
            };
            let inp = inputs(&cs);
            let twin = Twin::new(&cs, &inp);
            twin.check(&run(&cs, &inp, Precision::Bf16, Par::Rayon))
                .unwrap();
            for isa in Isa::all_supported() {
                let ours = run_on(&cs, &inp, isa, Par::Rayon);
                twin.check(&ours).unwrap_or_else(|e| panic!("{isa:?}: {e}"));
            }
        }
    }
}

/// This CPU's paths are all exercised: print them (visible with --nocapture), and check
/// that `Isa::selected` is one of them.
#[test]
fn selected_isa_is_supported() {
    let all = Isa::all_supported();
    eprintln!(
        "BF16 paths on this CPU: {all:?}, selected {:?}",
        Isa::selected()
    );
    assert!(all.contains(&Isa::selected()));
}

/// The bound is tight enough to see the rounding: the f32 product of the same operands fails
/// it, so a BF16 path that forgot to round would too.
#[test]
fn f32_operands_fail_the_bf16_bound() {
    let cs = Case {
        m: 40,
        n: 40,
        k: 64,
        ta: false,
        tb: false,
        pads: (0, 0, 0),
        alpha: 1.0,
        beta: 0.0,
        bias: false,
        relu: false,
        mask: false,
        seed: 7,
    };
    let inp = inputs(&cs);
    let f32_result = run(&cs, &inp, Precision::F32, Par::Seq);
    assert!(check(&cs, &inp, &f32_result).is_err());
}

/// Values that are already bf16 give the f32 GEMM's result up to summation order.
#[test]
fn bf16_representable_operands_are_unchanged() {
    let (m, n, k) = (37, 45, 70);
    let a: Vec<f32> = fill(m * k, 3).into_iter().map(round).collect();
    let b: Vec<f32> = fill(k * n, 4).into_iter().map(round).collect();
    let product = |precision| {
        let mut c = vec![0.0f32; m * n];
        let ops = GemmOps {
            precision,
            ..GemmOps::default()
        };
        gemm::gemm(
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            MatMut::new(&mut c, m, n),
            &ops,
            Par::Seq,
        );
        c
    };
    let (f32_c, bf16_c) = (product(Precision::F32), product(Precision::Bf16));
    for (x, y) in f32_c.iter().zip(&bf16_c) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
    }
}

/// Operands with no unit stride, and a mask stored the other way round from A: the packing's
/// element-wise fallback, on every ISA.
#[test]
fn strided_operands_and_a_transposed_mask_match_the_twin() {
    let (m, n, k) = (37, 41, 53);
    let a_data = fill(m * (3 * k + 1), 21);
    let b_data = fill(n * (2 * k + 1), 22);
    let mask_data = fill(k * m, 23);
    // Element (i, p) of A at i (3k + 1) + 3p, of B at 2p + j (2k + 1): no stride is 1.
    let a = MatRef::strided(&a_data, m, k, 3 * k + 1, 3);
    let b = MatRef::strided(&b_data, k, n, 2, 2 * k + 1);
    let mask = MatRef::new(&mask_data, k, m).t();
    let mut ar = vec![0.0f32; m * k];
    let mut br = vec![0.0f32; k * n];
    for i in 0..m {
        for p in 0..k {
            if mask.get(i, p) > 0.0 {
                ar[i * k + p] = round(a.get(i, p));
            }
        }
    }
    for p in 0..k {
        for j in 0..n {
            br[p * n + j] = round(b.get(p, j));
        }
    }
    let mut expect = vec![0.0f32; m * n];
    reference::gemm(
        MatRef::new(&ar, m, k),
        MatRef::new(&br, k, n),
        &mut MatMut::new(&mut expect, m, n),
        &GemmOps::default(),
    );
    let ops = GemmOps {
        a_relu_mask: Some(mask),
        precision: Precision::Bf16,
        ..GemmOps::default()
    };
    for isa in Isa::all_supported() {
        let mut c = vec![f32::NAN; m * n];
        gemm::gemm_rounded_bf16(a, b, MatMut::new(&mut c, m, n), &ops, isa, Par::Seq);
        for (idx, (o, e)) in c.iter().zip(&expect).enumerate() {
            let tol = (k as f32 + 4.0) * 2.0 * f32::EPSILON * k as f32;
            assert!((o - e).abs() <= tol, "{isa:?}: C[{idx}] = {o}, twin {e}");
        }
    }
}
