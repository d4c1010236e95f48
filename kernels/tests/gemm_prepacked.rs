//! The GEMM with B packed ahead (`gemm_prepacked`) against the ordinary GEMM (the same bits:
//! only where B's panels come from differs) and the scalar reference, on awkward shapes,
//! strided and transposed operands, every epilogue, on every ISA; and its fallback when the
//! panels do not fit the product.

mod common;

use common::{fill, isas};
use dlrm_kernels::gemm::{self, GemmOps, MatMut, MatRef, PackedB};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

/// Dimensions biased towards the awkward: 1, primes, around lane and tile multiples.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![1usize, 2, 7, 13, 16, 17, 24, 25, 31, 32, 33, 64, 97, 255, 256, 300, 367, 513]),
        2 => 1usize..=300,
    ]
}

#[derive(Debug, Clone)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    /// B stored transposed (as a layer's W^T in the forward).
    tb: bool,
    pad: usize,
    beta: f32,
    bias: bool,
    relu: bool,
    mask: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (dim(), dim(), dim()),
        (any::<bool>(), 0usize..3),
        prop::sample::select(vec![0.0f32, 1.0]),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |((m, n, k), (tb, pad), beta, (bias, relu, mask), seed)| Case {
                m,
                n,
                k,
                tb,
                pad,
                beta,
                bias,
                relu,
                mask,
                seed,
            },
        )
}

struct Inputs {
    a: Vec<f32>,
    mask: Vec<f32>,
    /// B's storage: k x (n + pad), or n x (k + pad) when transposed.
    b: Vec<f32>,
    bias: Vec<f32>,
    c0: Vec<f32>,
}

impl Inputs {
    fn new(cs: &Case) -> Inputs {
        let b_len = if cs.tb {
            cs.n * (cs.k + cs.pad)
        } else {
            cs.k * (cs.n + cs.pad)
        };
        Inputs {
            a: fill(cs.m * cs.k, cs.seed),
            mask: fill(cs.m * cs.k, cs.seed ^ 1),
            b: fill(b_len, cs.seed ^ 2),
            bias: fill(cs.n, cs.seed ^ 3),
            c0: fill(cs.m * cs.n, cs.seed ^ 4),
        }
    }

    fn b(&self, cs: &Case) -> MatRef<'_> {
        if cs.tb {
            MatRef::with_row_stride(&self.b, cs.n, cs.k, cs.k + cs.pad).t()
        } else {
            MatRef::with_row_stride(&self.b, cs.k, cs.n, cs.n + cs.pad)
        }
    }

    fn ops(&self, cs: &Case) -> GemmOps<'_> {
        GemmOps {
            beta: cs.beta,
            bias: cs.bias.then_some(&self.bias[..]),
            relu: cs.relu,
            a_relu_mask: cs.mask.then(|| MatRef::new(&self.mask, cs.m, cs.k)),
            ..GemmOps::default()
        }
    }
}

/// C by `gemm_prepacked_with_isa` with panels of `packed_b` (packed on `pack_isa`).
fn prepacked(isa: Isa, pack_isa: Isa, cs: &Case, inp: &Inputs, packed_b: MatRef) -> Vec<f32> {
    let mut packed = PackedB::new();
    packed.pack_with_isa(pack_isa, packed_b);
    let mut c = inp.c0.clone();
    let a = MatRef::new(&inp.a, cs.m, cs.k);
    let out = MatMut::new(&mut c, cs.m, cs.n);
    gemm::gemm_prepacked_with_isa(isa, a, inp.b(cs), &packed, out, &inp.ops(cs), Par::Rayon);
    c
}

fn ordinary(isa: Isa, cs: &Case, inp: &Inputs) -> Vec<f32> {
    let mut c = inp.c0.clone();
    let a = MatRef::new(&inp.a, cs.m, cs.k);
    let out = MatMut::new(&mut c, cs.m, cs.n);
    gemm::gemm_with_isa(isa, a, inp.b(cs), out, &inp.ops(cs), Par::Rayon);
    c
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn check(cs: &Case) -> Result<(), TestCaseError> {
    let inp = Inputs::new(cs);
    let mut expect = inp.c0.clone();
    reference::gemm(
        MatRef::new(&inp.a, cs.m, cs.k),
        inp.b(cs),
        &mut MatMut::new(&mut expect, cs.m, cs.n),
        &inp.ops(cs),
    );
    let tol = (cs.k as f32 + 4.0) * 4.0 * f32::EPSILON + 1e-6;
    for isa in isas() {
        let ours = prepacked(isa, isa, cs, &inp, inp.b(cs));
        prop_assert_eq!(
            bits(&ours),
            bits(&ordinary(isa, cs, &inp)),
            "{:?} {:?}",
            isa,
            cs
        );
        for (i, (o, e)) in ours.iter().zip(&expect).enumerate() {
            prop_assert!(
                (o - e).abs() <= tol * (1.0 + e.abs()),
                "{isa:?}: C[{i}] = {o}, reference {e} in {cs:?}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn prepacked_gemm_matches_gemm_and_reference(cs in case()) {
        check(&cs)?;
    }

    /// Panels of another shape (B with one more column) are not used: the product falls back
    /// to packing `b` itself.
    #[test]
    fn prepacked_gemm_ignores_panels_of_another_shape(cs in case()) {
        let inp = Inputs::new(&cs);
        let other = fill(cs.k * (cs.n + 1), cs.seed ^ 9);
        let other = MatRef::new(&other, cs.k, cs.n + 1);
        for isa in isas() {
            let ours = prepacked(isa, isa, &cs, &inp, other);
            prop_assert_eq!(bits(&ours), bits(&ordinary(isa, &cs, &inp)));
        }
    }
}
