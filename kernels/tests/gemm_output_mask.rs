//! The GEMM's output mask (`GemmOps::c_relu_mask`, the ReLU backward of the layer below fused
//! into the store of dX) against the scalar reference, on awkward shapes, every transpose, the
//! epilogues and the paths that apply it after the product (dot, split K, a strided mask, bf16);
//! its bits equal the unmasked product's with the masked entries zeroed, with and without
//! prepacked B, on every ISA level.

mod common;

use common::gemm::{Case, Inputs, Operand, case, inputs, ops};
use common::{bits, fill, isas};
use dlrm_kernels::gemm::{self, GemmOps, MatMut, MatRef, PackedB, Precision};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

/// Dimensions biased towards the awkward: 1, primes, around lane and tile multiples.
fn dim() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 3, 4, 5, 11, 12, 13, 15, 16, 17, 31, 32, 33, 65, 97, 257, 300, 513]),
        2 => 1usize..=200,
    ]
}

/// A mask of C's shape (half its entries positive, some exactly 0), stored transposed
/// (`trans`: the product must then apply it after) or with a padded row stride.
fn mask_for(cs: &Case, trans: bool) -> Operand {
    let mut mask = Operand::new(cs.m, cs.n, trans, cs.pads.2, cs.seed ^ 5);
    for (i, v) in mask.data.iter_mut().enumerate() {
        if i % 7 == 0 {
            *v = 0.0;
        }
    }
    mask
}

/// C from the case's initial C after `product`.
fn run(cs: &Case, inp: &Inputs, product: impl FnOnce(MatMut)) -> Vec<f32> {
    let mut c = inp.c0.clone();
    product(MatMut::with_row_stride(&mut c, cs.m, cs.n, inp.ldc));
    c
}

fn check(isa: Isa, cs: &Case, mask_trans: bool, precision: Precision) -> Result<(), TestCaseError> {
    let inp = inputs(cs);
    let mask = mask_for(cs, mask_trans);
    let plain = GemmOps {
        precision,
        ..ops(cs, &inp)
    };
    let masked = GemmOps {
        c_relu_mask: Some(mask.view()),
        ..plain
    };
    let (a, b) = (inp.a.view(), inp.b.view());
    let ours = run(cs, &inp, |c| {
        gemm::gemm_with_isa(isa, a, b, c, &masked, Par::Rayon)
    });
    let mut packed = PackedB::new();
    packed.pack_for_with_isa(isa, b, precision);
    let prepacked = run(cs, &inp, |c| {
        gemm::gemm_prepacked_with_isa(isa, a, b, &packed, c, &masked, Par::Rayon)
    });
    // The unmasked product, then the masked entries zeroed: the same bits.
    let mut expect = run(cs, &inp, |c| {
        gemm::gemm_with_isa(isa, a, b, c, &plain, Par::Rayon)
    });
    for i in 0..cs.m {
        for j in 0..cs.n {
            if mask.view().get(i, j) <= 0.0 {
                expect[i * inp.ldc + j] = 0.0;
            }
        }
    }
    prop_assert_eq!(
        bits(&ours),
        bits(&expect),
        "{:?} mask_trans {}",
        isa,
        mask_trans
    );
    prop_assert_eq!(bits(&prepacked), bits(&expect), "prepacked, {:?}", isa);
    if precision == Precision::F32 {
        // And the scalar twin, within the f32 dot product's rounding.
        let reference = run(cs, &inp, |mut c| reference::gemm(a, b, &mut c, &masked));
        let tol = (cs.k as f32 + 4.0) * 2.0 * f32::EPSILON * (1.0 + cs.alpha.abs()) + 1e-6;
        for i in 0..cs.m {
            for j in 0..cs.n {
                let (o, e) = (ours[i * inp.ldc + j], reference[i * inp.ldc + j]);
                prop_assert!(
                    (o - e).abs() <= tol * (1.0 + e.abs()),
                    "{isa:?}: C[{i},{j}] = {o}, reference {e} in {cs:?}"
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn output_mask_matches_reference(cs in case(dim()), mask_trans in any::<bool>()) {
        for isa in isas() {
            check(isa, &cs, mask_trans, Precision::F32)?;
        }
    }

    /// The bf16 products apply the mask in their f32 epilogue (AMX, AVX512-BF16: several K
    /// blocks, the mask after the last) or after the product (a strided mask; the levels
    /// without a BF16 product).
    #[test]
    fn output_mask_of_bf16_products_zeroes_the_same_entries(
        cs in case(dim()),
        mask_trans in any::<bool>(),
    ) {
        for isa in Isa::all_supported() {
            check(isa, &cs, mask_trans, Precision::Bf16)?;
        }
    }
}

/// The layer products as the MLP's backward calls them: dX stored masked by the input equals
/// dX masked afterwards, on the chunk shapes of the Kaggle top MLP (tiled, prepacked W).
#[test]
fn backward_input_masked_by_the_input_relu() {
    let (rows, inp, out) = (256, 367, 512);
    let (dy, w, x) = (fill(rows * out, 1), fill(out * inp, 2), fill(rows * inp, 3));
    let y = fill(rows * out, 4);
    let (w_view, x_view) = (MatRef::new(&w, out, inp), MatRef::new(&x, rows, inp));
    let mut packed = PackedB::new();
    packed.pack(w_view);
    let product = |input_relu: Option<MatRef>| {
        let mut dx = vec![f32::NAN; rows * inp];
        gemm::linear_backward_input_prepacked(
            MatRef::new(&dy, rows, out),
            Some(MatRef::new(&y, rows, out)),
            w_view,
            Some(&packed),
            input_relu,
            MatMut::new(&mut dx, rows, inp),
            Precision::F32,
            Par::Seq,
        );
        dx
    };
    let masked = product(Some(x_view));
    let mut expect = product(None);
    for (e, xv) in expect.iter_mut().zip(&x) {
        if *xv <= 0.0 {
            *e = 0.0;
        }
    }
    assert_eq!(bits(&masked), bits(&expect));
    assert!(masked.contains(&0.0) && masked.iter().any(|v| *v != 0.0));
}
