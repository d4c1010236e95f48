//! The BF16 product with B rounded and packed ahead (`PackedPairs`, `PackedB::pack_for`)
//! against the BF16 product that packs B itself: the same bits on every ISA the CPU has, for
//! any thread count, on awkward shapes with every transpose, padding and epilogue; and the
//! fallbacks when the packing does not fit the product.

mod common;

use common::gemm::{Case, Inputs, case, inputs, ops};
use dlrm_kernels::gemm::{
    self, GemmOps, MatMut, PackedB, PackedPairs, Precision, gemm_rounded_bf16,
    gemm_rounded_bf16_prepacked,
};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::parallel::Par;
use proptest::prelude::*;

/// Dimensions biased towards the awkward: 1, odd K, around the AMX tile (16, 32) and the
/// AVX512-BF16 register tile (12 x 32) and K blocks (512 values).
fn dim() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 3, 11, 12, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 367, 513]),
        2 => 1usize..=200,
    ]
}

fn bf16_ops<'a>(cs: &Case, inp: &'a Inputs) -> GemmOps<'a> {
    GemmOps {
        precision: Precision::Bf16,
        ..ops(cs, inp)
    }
}

/// C after `product` wrote it, from the case's initial C.
fn run(cs: &Case, inp: &Inputs, product: impl FnOnce(MatMut)) -> Vec<f32> {
    let mut c = inp.c0.clone();
    product(MatMut::with_row_stride(&mut c, cs.m, cs.n, inp.ldc));
    c
}

fn same_bits(x: &[f32], y: &[f32]) -> Result<(), TestCaseError> {
    let differ = x
        .iter()
        .zip(y)
        .position(|(p, q)| p.to_bits() != q.to_bits());
    match differ {
        None => Ok(()),
        Some(i) => Err(TestCaseError::fail(format!(
            "element {i}: {} (prepacked) vs {} (packed in the product)",
            x[i], y[i]
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prepacked_pairs_give_the_bits_of_packing_in_the_product(cs in case(dim())) {
        let inp = inputs(&cs);
        let ops = bf16_ops(&cs, &inp);
        let (a, b) = (inp.a.view(), inp.b.view());
        for isa in Isa::all_supported() {
            let mut packed = PackedPairs::new();
            packed.pack_with_isa(isa, b);
            let expected = run(&cs, &inp, |c| gemm_rounded_bf16(a, b, c, &ops, isa, Par::Seq));
            for par in [Par::Seq, Par::Rayon] {
                let ours = run(&cs, &inp, |c| {
                    gemm_rounded_bf16_prepacked(a, b, &packed, c, &ops, isa, par)
                });
                same_bits(&ours, &expected)
                    .map_err(|e| TestCaseError::fail(format!("{isa:?} {par:?}: {e}")))?;
            }
        }
    }

    #[test]
    fn gemm_prepacked_runs_bf16_products_on_pairs_packed_for_them(cs in case(dim())) {
        let inp = inputs(&cs);
        let ops = bf16_ops(&cs, &inp);
        let (a, b) = (inp.a.view(), inp.b.view());
        for isa in Isa::all_supported() {
            let mut packed = PackedB::new();
            // Packed for f32 first: the bf16 packing must replace it, not be confused with it.
            packed.pack_for_with_isa(isa, b, Precision::F32);
            packed.pack_for_with_isa(isa, b, Precision::Bf16);
            let expected = run(&cs, &inp, |c| gemm::gemm_with_isa(isa, a, b, c, &ops, Par::Seq));
            let ours = run(&cs, &inp, |c| {
                gemm::gemm_prepacked_with_isa(isa, a, b, &packed, c, &ops, Par::Rayon)
            });
            same_bits(&ours, &expected)
                .map_err(|e| TestCaseError::fail(format!("{isa:?}: {e}")))?;
        }
    }
}

/// Pairs packed for one shape or ISA, or not packed at all, are not used for another: the
/// product packs B itself and gives its own bits.
#[test]
fn pairs_that_do_not_fit_fall_back_to_packing_in_the_product() {
    let cs = Case {
        m: 37,
        n: 45,
        k: 67,
        ta: false,
        tb: true,
        pads: (1, 2, 0),
        alpha: 1.0,
        beta: 0.0,
        bias: true,
        relu: true,
        mask: false,
        seed: 7,
    };
    let inp = inputs(&cs);
    let ops = bf16_ops(&cs, &inp);
    let (a, b) = (inp.a.view(), inp.b.view());
    let other = inputs(&Case {
        k: 66,
        ..cs.clone()
    });
    for isa in Isa::all_supported() {
        let expected = run(&cs, &inp, |c| {
            gemm_rounded_bf16(a, b, c, &ops, isa, Par::Seq)
        });
        let mut other_shape = PackedPairs::new();
        other_shape.pack_with_isa(isa, other.b.view());
        let mut stale = PackedB::new();
        stale.pack_for_with_isa(isa, b, Precision::Bf16);
        stale.pack_for_with_isa(isa, b, Precision::F32);
        for packed in [&PackedPairs::new(), &other_shape] {
            let ours = run(&cs, &inp, |c| {
                gemm_rounded_bf16_prepacked(a, b, packed, c, &ops, isa, Par::Seq)
            });
            same_bits(&ours, &expected).unwrap();
        }
        let ours = run(&cs, &inp, |c| {
            gemm::gemm_prepacked_with_isa(isa, a, b, &stale, c, &ops, Par::Seq)
        });
        same_bits(&ours, &expected).unwrap();
    }
    for isa in Isa::all_supported() {
        for other_isa in Isa::all_supported().into_iter().filter(|&o| o != isa) {
            let mut packed = PackedPairs::new();
            packed.pack_with_isa(other_isa, b);
            let expected = run(&cs, &inp, |c| {
                gemm_rounded_bf16(a, b, c, &ops, isa, Par::Seq)
            });
            let ours = run(&cs, &inp, |c| {
                gemm_rounded_bf16_prepacked(a, b, &packed, c, &ops, isa, Par::Seq)
            });
            same_bits(&ours, &expected).unwrap();
        }
    }
}
