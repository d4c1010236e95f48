//! The GEMM against the scalar reference: random shapes (0, 1, primes, sizes off the lane
//! width and the register tile), every transpose combination, strided operands, every
//! epilogue; and bit-identical results for any thread count and whether A is packed or not.

mod common;

use common::gemm::{Case, Inputs, case, inputs, ops};
use common::{bits, fill, isas};
use dlrm_kernels::gemm::{self, MatMut, MatRef};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

/// Dimensions biased towards the awkward: 0, 1, primes, around lane and tile multiples.
fn dim() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![
        3 => prop::sample::select(vec![0usize, 1, 2, 3, 5, 7, 8, 13, 15, 16, 17, 23, 24, 25, 31, 32, 33, 47, 48, 49, 64, 97, 127, 128, 129, 193, 255, 256, 257, 300]),
        2 => 0usize..=300,
    ]
}

fn run_ours(isa: Isa, cs: &Case, inp: &Inputs, par: Par) -> Vec<f32> {
    let mut c = inp.c0.clone();
    let ops = ops(cs, inp);
    gemm::gemm_with_isa(
        isa,
        inp.a.view(),
        inp.b.view(),
        MatMut::with_row_stride(&mut c, cs.m, cs.n, inp.ldc),
        &ops,
        par,
    );
    c
}

fn check_against_reference(cs: &Case) -> Result<(), TestCaseError> {
    for isa in isas() {
        check_isa_against_reference(isa, cs)?;
    }
    Ok(())
}

fn check_isa_against_reference(isa: Isa, cs: &Case) -> Result<(), TestCaseError> {
    let inp = inputs(cs);
    let ours = run_ours(isa, cs, &inp, Par::Rayon);
    let mut expect = inp.c0.clone();
    let ops = ops(cs, &inp);
    reference::gemm(
        inp.a.view(),
        inp.b.view(),
        &mut MatMut::with_row_stride(&mut expect, cs.m, cs.n, inp.ldc),
        &ops,
    );
    // Error bound of a length-k f32 dot product with |a|, |b| <= 1: about k * eps * sum|ab|.
    let tol = (cs.k as f32 + 4.0) * 2.0 * f32::EPSILON * (1.0 + cs.alpha.abs()) + 1e-6;
    for i in 0..cs.m {
        for j in 0..cs.n {
            let (o, e) = (ours[i * inp.ldc + j], expect[i * inp.ldc + j]);
            prop_assert!(
                (o - e).abs() <= tol * (1.0 + e.abs()),
                "{isa:?}: C[{i},{j}] = {o}, reference {e} (tol {tol}) in {cs:?}"
            );
        }
        // Padding between rows is never written.
        for j in cs.n..inp.ldc {
            if i + 1 < cs.m {
                let idx = i * inp.ldc + j;
                prop_assert!(
                    ours[idx].to_bits() == inp.c0[idx].to_bits(),
                    "padding written"
                );
            }
        }
    }
    Ok(())
}

proptest! {
    // Half the cases of a single path: every case runs on each ISA of `isas()`.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn gemm_matches_reference(cs in case(dim())) {
        check_against_reference(&cs)?;
    }

    #[test]
    fn gemm_is_thread_count_invariant(cs in case(dim())) {
        let inp = inputs(&cs);
        let pool = |t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
        let split = Par::AlwaysSplit;
        for isa in isas() {
            let one = pool(1).install(|| run_ours(isa, &cs, &inp, split));
            let two = pool(2).install(|| run_ours(isa, &cs, &inp, split));
            let three = pool(3).install(|| run_ours(isa, &cs, &inp, split));
            prop_assert_eq!(bits(&one), bits(&two));
            prop_assert_eq!(bits(&one), bits(&three));
        }
    }

    /// A read in place (it fits in one MC block) and A packed (MC cut to two register tiles'
    /// rows) give the same bits: only KC decides the arithmetic.
    #[test]
    fn gemm_packed_and_in_place_a_agree(cs in case(dim())) {
        let inp = inputs(&cs);
        for isa in isas() {
            let host = gemm::BlockSizes::for_isa(isa);
            let run = |mc: usize| {
                let mut c = inp.c0.clone();
                let blocks = gemm::BlockSizes { mc, ..host };
                let out = MatMut::with_row_stride(&mut c, cs.m, cs.n, inp.ldc);
                let (a, b) = (inp.a.view(), inp.b.view());
                gemm::gemm_with_blocks(isa, &blocks, a, b, out, &ops(&cs, &inp), Par::Rayon);
                c
            };
            prop_assert_eq!(bits(&run(24)), bits(&run(host.mc.max(cs.m))), "{:?} {:?}", isa, cs);
        }
    }
}

/// Shapes of the DLRM layers and the special paths (split K, dot path, narrow kernel).
#[test]
fn gemm_special_shapes_match_reference() {
    let shapes = [
        (1, 256, 2048, true, false),  // dW of a 256 -> 1 layer: split K
        (3, 64, 1031, true, false),   // split K with a prime tail
        (2048, 1, 256, false, true),  // Y = X w^T with one output: dot path
        (100, 3, 77, false, true),    // dot path, three outputs
        (512, 13, 600, true, false),  // dW of the 13 -> 512 layer (narrow kernel)
        (600, 16, 64, false, true),   // forward of 64 -> 16 (narrow kernel)
        (40, 300, 200, false, false), // small M: A and B read in place
    ];
    for (m, n, k, ta, tb) in shapes {
        for (beta, relu, mask) in [(0.0, false, false), (1.0, true, true)] {
            let cs = Case {
                m,
                n,
                k,
                ta,
                tb,
                pads: (1, 0, 2),
                alpha: 1.0,
                beta,
                bias: true,
                relu,
                mask,
                seed: (m * 31 + n * 7 + k) as u64,
            };
            check_against_reference(&cs).unwrap();
        }
    }
}

#[test]
fn bias_grad_matches_reference_and_is_thread_invariant() {
    for (m, n) in [(0, 5), (1, 1), (7, 33), (2048, 1), (129, 512)] {
        for masked in [false, true] {
            let dy = fill(m * n, 11);
            let y = fill(m * n, 12);
            let mask = masked.then(|| MatRef::new(&y, m, n));
            let mut expect = fill(n, 13);
            reference::bias_grad(MatRef::new(&dy, m, n), mask, &mut expect, true);
            for isa in isas() {
                let run = |threads: usize, par: Par| {
                    let mut db = fill(n, 13);
                    let dy = MatRef::new(&dy, m, n);
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap()
                        .install(|| gemm::bias_grad_with_isa(isa, dy, mask, &mut db, true, par));
                    db
                };
                let (one, two) = (run(1, Par::AlwaysSplit), run(2, Par::AlwaysSplit));
                assert_eq!(one, two);
                assert_eq!(one, run(2, Par::Seq));
                for (o, e) in one.iter().zip(&expect) {
                    assert!(
                        (o - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{isa:?}: {o} vs {e}"
                    );
                }
            }
        }
    }
}
