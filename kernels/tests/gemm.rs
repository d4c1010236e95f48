//! The GEMM against the scalar reference: random shapes (0, 1, primes, sizes off the lane
//! width and the register tile), every transpose combination, strided operands, every
//! epilogue; and bit-identical results for any thread count.

use dlrm_kernels::gemm::{self, GemmOps, MatMut, MatRef};
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

/// Dimensions biased towards the awkward: 0, 1, primes, around lane and tile multiples.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![0usize, 1, 2, 3, 5, 7, 8, 13, 15, 16, 17, 23, 24, 25, 31, 32, 33, 47, 48, 49, 64, 97, 127, 128, 129, 193, 255, 256, 257, 300]),
        2 => 0usize..=300,
    ]
}

/// Deterministic pseudo-random values in [-1, 1].
fn fill(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A matrix of logical shape rows x cols, stored transposed or not, with padded leading
/// dimension.
struct Operand {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    trans: bool,
    ld: usize,
}

impl Operand {
    fn new(rows: usize, cols: usize, trans: bool, pad: usize, seed: u64) -> Self {
        let (sr, sc) = if trans { (cols, rows) } else { (rows, cols) };
        let ld = sc + pad;
        Operand {
            data: fill(sr * ld, seed),
            rows,
            cols,
            trans,
            ld,
        }
    }
    fn view(&self) -> MatRef<'_> {
        if self.trans {
            MatRef::with_row_stride(&self.data, self.cols, self.rows, self.ld).t()
        } else {
            MatRef::with_row_stride(&self.data, self.rows, self.cols, self.ld)
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    pads: (usize, usize, usize),
    alpha: f32,
    beta: f32,
    bias: bool,
    relu: bool,
    mask: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (dim(), dim(), dim()),
        (any::<bool>(), any::<bool>()),
        (0usize..3, 0usize..3, 0usize..3),
        prop::sample::select(vec![1.0f32, -0.5, 2.0]),
        prop::sample::select(vec![0.0f32, 1.0, 0.25]),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |((m, n, k), (ta, tb), pads, alpha, beta, (bias, relu, mask), seed)| Case {
                m,
                n,
                k,
                ta,
                tb,
                pads,
                alpha,
                beta,
                bias,
                relu,
                mask,
                seed,
            },
        )
}

struct Inputs {
    a: Operand,
    b: Operand,
    mask: Option<Operand>,
    bias: Option<Vec<f32>>,
    c0: Vec<f32>,
    ldc: usize,
}

fn inputs(cs: &Case) -> Inputs {
    let a = Operand::new(cs.m, cs.k, cs.ta, cs.pads.0, cs.seed);
    let b = Operand::new(cs.k, cs.n, cs.tb, cs.pads.1, cs.seed ^ 1);
    let mask = cs
        .mask
        .then(|| Operand::new(cs.m, cs.k, cs.ta, cs.pads.0, cs.seed ^ 2));
    let bias = cs.bias.then(|| fill(cs.n, cs.seed ^ 3));
    let ldc = cs.n + cs.pads.2;
    // NaN in C must not leak out when beta = 0 (C is then write-only).
    let c0 = if cs.beta == 0.0 {
        vec![f32::NAN; cs.m * ldc]
    } else {
        fill(cs.m * ldc, cs.seed ^ 4)
    };
    Inputs {
        a,
        b,
        mask,
        bias,
        c0,
        ldc,
    }
}

fn run_ours(cs: &Case, inp: &Inputs, par: Par) -> Vec<f32> {
    let mut c = inp.c0.clone();
    let ops = GemmOps {
        alpha: cs.alpha,
        beta: cs.beta,
        bias: inp.bias.as_deref(),
        relu: cs.relu,
        a_relu_mask: inp.mask.as_ref().map(|m| m.view()),
        ..GemmOps::default()
    };
    gemm::gemm(
        inp.a.view(),
        inp.b.view(),
        MatMut::with_row_stride(&mut c, cs.m, cs.n, inp.ldc),
        &ops,
        par,
    );
    c
}

fn check_against_reference(cs: &Case) -> Result<(), TestCaseError> {
    let inp = inputs(cs);
    let ours = run_ours(cs, &inp, Par::Rayon);
    let mut expect = inp.c0.clone();
    let ops = GemmOps {
        alpha: cs.alpha,
        beta: cs.beta,
        bias: inp.bias.as_deref(),
        relu: cs.relu,
        a_relu_mask: inp.mask.as_ref().map(|m| m.view()),
        ..GemmOps::default()
    };
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
                "C[{i},{j}] = {o}, reference {e} (tol {tol}) in {cs:?}"
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
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn gemm_matches_reference(cs in case()) {
        check_against_reference(&cs)?;
    }

    #[test]
    fn gemm_is_thread_count_invariant(cs in case()) {
        let inp = inputs(&cs);
        let pool = |t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
        let split = Par::AlwaysSplit;
        let one = pool(1).install(|| run_ours(&cs, &inp, split));
        let two = pool(2).install(|| run_ours(&cs, &inp, split));
        let three = pool(3).install(|| run_ours(&cs, &inp, split));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&one), bits(&two));
        prop_assert_eq!(bits(&one), bits(&three));
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
            let run = |threads: usize, par: Par| {
                let mut db = fill(n, 13);
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| gemm::bias_grad(MatRef::new(&dy, m, n), mask, &mut db, true, par));
                db
            };
            let (one, two) = (run(1, Par::AlwaysSplit), run(2, Par::AlwaysSplit));
            assert_eq!(one, two);
            assert_eq!(one, run(2, Par::Seq));
            for (o, e) in one.iter().zip(&expect) {
                assert!((o - e).abs() <= 1e-4 * (1.0 + e.abs()), "{o} vs {e}");
            }
        }
    }
}
