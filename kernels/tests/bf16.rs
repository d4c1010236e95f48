//! BF16 conversions and the BF16 GEMM against their scalar twins, on every ISA this CPU
//! supports (the portable path always; AVX512-BF16 where the CPU has it).
//!
//! Conversions must agree bit for bit. The GEMM paths round differently (VDPBF16PS adds a
//! pair of products before the accumulator; the portable path is the f32 GEMM with its own
//! summation order), so they are compared with the f64 sum of the exact bf16 products within
//! the bound of an f32 summation of K terms: with u = 2^-24, each of at most K + 1 roundings
//! (K - 1 additions, the pair sums, the beta FMA) errs by at most u times the running sum of
//! magnitudes, so
//!   |C - C_ref| <= (K + 2) * 2u * (sum_p |A_ip B_jp| + |beta C_ij|) + f32::MIN_POSITIVE,
//! with a factor 2 of slack and an absolute floor for products that cancel to zero.

mod common;

use common::fill;
use dlrm_kernels::bf16::{Bf16, Isa, bf16_to_f32_slice, f32_to_bf16_slice};
use dlrm_kernels::gemm::{Bf16Mat, MatMut, gemm_bf16};
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

/// f32 bit patterns and the bf16 bits VCVTNEPS2BF16 gives them.
const SPECIAL_CASES: &[(u32, u16)] = &[
    (0x0000_0000, 0x0000), // +0
    (0x8000_0000, 0x8000), // -0
    (0x0000_0001, 0x0000), // smallest subnormal -> +0
    (0x8000_0001, 0x8000), // negative subnormal -> -0
    (0x007F_FFFF, 0x0000), // largest subnormal -> +0
    (0x0080_0000, 0x0080), // smallest normal
    (0x3F80_0000, 0x3F80), // 1.0
    (0xBF80_0000, 0xBF80), // -1.0
    (0x3F80_7FFF, 0x3F80), // just below a tie: down
    (0x3F80_8000, 0x3F80), // tie, even upper half: stays
    (0x3F80_8001, 0x3F81), // just above a tie: up
    (0x3F81_8000, 0x3F82), // tie, odd upper half: up to even
    (0xBF81_8000, 0xBF82), // negative tie, odd: away from zero to even
    (0x3FFF_8000, 0x4000), // tie carrying into the exponent
    (0x7F7F_7FFF, 0x7F7F), // rounds down to the largest bf16
    (0x7F7F_8000, 0x7F80), // tie above the largest bf16, odd: overflows to +inf
    (0x7F7F_FFFF, 0x7F80), // f32::MAX -> +inf
    (0xFF7F_FFFF, 0xFF80), // f32::MIN -> -inf
    (0x7F80_0000, 0x7F80), // +inf
    (0xFF80_0000, 0xFF80), // -inf
    (0x7FC0_0000, 0x7FC0), // quiet NaN
    (0xFFC0_0001, 0xFFC0), // negative quiet NaN, low payload dropped
    (0x7F80_0001, 0x7FC0), // signalling NaN, payload only in the dropped half: quieted
    (0x7FA0_0000, 0x7FE0), // signalling NaN with a high payload: kept, quieted
];

#[test]
fn conversion_special_values() {
    let src: Vec<f32> = SPECIAL_CASES
        .iter()
        .map(|&(x, _)| f32::from_bits(x))
        .collect();
    for &(x, want) in SPECIAL_CASES {
        let x = f32::from_bits(x);
        assert_eq!(Bf16::from_f32(x).to_bits(), want, "from_f32({x:e})");
        assert_eq!(
            reference::f32_to_bf16(x).to_bits(),
            want,
            "reference({x:e})"
        );
    }
    for isa in Isa::all_supported() {
        // Repeat the list so that both the 32-wide body and the masked tail see every case.
        let long: Vec<f32> = src.iter().cycle().take(3 * src.len()).copied().collect();
        let mut dst = vec![Bf16::from_bits(0x1234); long.len()];
        f32_to_bf16_slice(&long, &mut dst, isa);
        for (i, d) in dst.iter().enumerate() {
            let (x, want) = SPECIAL_CASES[i % SPECIAL_CASES.len()];
            assert_eq!(d.to_bits(), want, "{isa:?} at {i}: {x:#010x}");
        }
    }
}

#[test]
fn bf16_to_f32_is_exact_for_every_bit_pattern() {
    let all: Vec<Bf16> = (0..=u16::MAX).map(Bf16::from_bits).collect();
    for isa in Isa::all_supported() {
        let mut out = vec![0.0f32; all.len()];
        bf16_to_f32_slice(&all, &mut out, isa);
        for (x, y) in all.iter().zip(&out) {
            let want = u32::from(x.to_bits()) << 16;
            assert_eq!(y.to_bits(), want, "{isa:?}");
            assert_eq!(x.to_f32().to_bits(), want);
            assert_eq!(reference::bf16_to_f32(*x).to_bits(), want);
        }
    }
}

#[test]
fn f32_to_bf16_matches_reference_on_a_sweep_of_bit_patterns() {
    // Every 4093rd pattern over the whole u32 range (a prime stride, so every dropped-half
    // residue and every exponent is visited), plus each pattern's neighbours.
    let src: Vec<f32> = (0..=u32::MAX)
        .step_by(4093)
        .flat_map(|x| [x, x.wrapping_add(1), x.wrapping_sub(1)])
        .map(f32::from_bits)
        .collect();
    let want: Vec<u16> = src
        .iter()
        .map(|&x| reference::f32_to_bf16(x).to_bits())
        .collect();
    for (x, w) in src.iter().zip(&want) {
        assert_eq!(Bf16::from_f32(*x).to_bits(), *w, "{:#010x}", x.to_bits());
    }
    for isa in Isa::all_supported() {
        let mut dst = vec![Bf16::default(); src.len()];
        f32_to_bf16_slice(&src, &mut dst, isa);
        for ((x, d), w) in src.iter().zip(&dst).zip(&want) {
            assert_eq!(d.to_bits(), *w, "{isa:?} {:#010x}", x.to_bits());
        }
    }
}

/// Deterministic pseudo-random values in [-scale, scale], rounded to bf16.
fn bf16_values(len: usize, seed: u64, scale: f32) -> Vec<Bf16> {
    fill(len, seed)
        .into_iter()
        .map(|unit| Bf16::from_f32(unit * scale))
        .collect()
}

/// Dimensions biased towards the awkward: 0, 1, primes, odd, around the tile sizes (12, 32).
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![0usize, 1, 2, 3, 5, 7, 11, 12, 13, 16, 17, 23, 24, 25, 31, 32, 33, 37, 47, 48, 53, 64, 67, 70]),
        2 => 0usize..=70,
    ]
}

#[derive(Debug, Clone)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    /// Extra floats between rows of C (left untouched).
    c_pad: usize,
    beta: f32,
    /// Magnitude of B's entries (A's are within 1).
    scale: f32,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (dim(), dim(), dim()),
        0usize..3,
        prop::sample::select(vec![0.0f32, 1.0, -0.5]),
        prop::sample::select(vec![1.0f32, 1e-3, 300.0]),
        any::<u64>(),
    )
        .prop_map(|((m, n, k), c_pad, beta, scale, seed)| Case {
            m,
            n,
            k,
            c_pad,
            beta,
            scale,
            seed,
        })
}

/// Sentinel in C's padding, and in C itself when beta = 0 (it must then be only written).
const UNTOUCHED: f32 = f32::NAN;

struct Inputs {
    a: Vec<Bf16>,
    b: Vec<Bf16>,
    c: Vec<f32>,
    rs: usize,
}

fn inputs(cs: &Case) -> Inputs {
    let rs = cs.n + cs.c_pad;
    let mut c = vec![UNTOUCHED; cs.m * rs];
    if cs.beta != 0.0 {
        let init = bf16_values(cs.m * rs, cs.seed ^ 3, 2.0);
        for i in 0..cs.m {
            for j in 0..cs.n {
                c[i * rs + j] = init[i * rs + j].to_f32();
            }
        }
    }
    Inputs {
        a: bf16_values(cs.m * cs.k, cs.seed ^ 1, 1.0),
        b: bf16_values(cs.n * cs.k, cs.seed ^ 2, cs.scale),
        c,
        rs,
    }
}

fn run(cs: &Case, inp: &Inputs, isa: Isa, par: Par) -> Vec<f32> {
    let mut c = inp.c.clone();
    gemm_bf16(
        Bf16Mat::new(&inp.a, cs.m, cs.k),
        Bf16Mat::new(&inp.b, cs.n, cs.k),
        cs.beta,
        MatMut::with_row_stride(&mut c, cs.m, cs.n, inp.rs),
        isa,
        par,
    );
    c
}

fn check_against_reference(cs: &Case, isa: Isa, par: Par) -> Result<(), TestCaseError> {
    let inp = inputs(cs);
    let (a, b) = (
        Bf16Mat::new(&inp.a, cs.m, cs.k),
        Bf16Mat::new(&inp.b, cs.n, cs.k),
    );
    let got = run(cs, &inp, isa, par);
    let mut want = inp.c.clone();
    reference::gemm_bf16(
        a,
        b,
        cs.beta,
        &mut MatMut::with_row_stride(&mut want, cs.m, cs.n, inp.rs),
    );
    let unit = f64::from(f32::EPSILON) / 2.0;
    for i in 0..cs.m {
        for j in 0..cs.n {
            let at = i * inp.rs + j;
            let magnitude: f64 = (0..cs.k)
                .map(|p| f64::from(a.get(i, p).to_f32() * b.get(j, p).to_f32()).abs())
                .sum::<f64>()
                + if cs.beta != 0.0 {
                    f64::from(cs.beta * inp.c[at]).abs()
                } else {
                    0.0
                };
            let tol = (cs.k + 2) as f64 * 2.0 * unit * magnitude + f64::from(f32::MIN_POSITIVE);
            let err = (f64::from(got[at]) - f64::from(want[at])).abs();
            prop_assert!(
                err <= tol,
                "{isa:?} C[{i}][{j}] = {} want {} (err {err:e} > tol {tol:e})",
                got[at],
                want[at]
            );
        }
        for p in cs.n..inp.rs {
            prop_assert!(got[i * inp.rs + p].is_nan(), "{isa:?} padding written");
        }
    }
    Ok(())
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

fn same_bits(x: &[f32], y: &[f32]) -> bool {
    x.len() == y.len() && x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn f32_to_bf16_simd_equals_scalar(bits in prop::collection::vec(any::<u32>(), 0..100)) {
        let src: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        for isa in Isa::all_supported() {
            let mut dst = vec![Bf16::default(); src.len()];
            f32_to_bf16_slice(&src, &mut dst, isa);
            for (x, d) in src.iter().zip(&dst) {
                prop_assert_eq!(d.to_bits(), reference::f32_to_bf16(*x).to_bits(), "{:?}", isa);
            }
        }
    }

    #[test]
    fn gemm_bf16_matches_reference(cs in case()) {
        for isa in Isa::all_supported() {
            check_against_reference(&cs, isa, Par::Seq)?;
        }
    }

    #[test]
    fn gemm_bf16_is_deterministic(cs in case()) {
        let inp = inputs(&cs);
        for isa in Isa::all_supported() {
            let first = run(&cs, &inp, isa, Par::Seq);
            prop_assert!(same_bits(&first, &run(&cs, &inp, isa, Par::Seq)));
            prop_assert!(same_bits(&first, &pool(3).install(|| run(&cs, &inp, isa, Par::Rayon))));
        }
    }
}

/// Shapes large enough to go parallel, and with K past one rank-KC block (512 values).
const LARGE_SHAPES: &[(usize, usize, usize)] = &[(300, 97, 131), (250, 33, 601), (97, 130, 1030)];

#[test]
fn gemm_bf16_large_shapes_match_reference() {
    for &(m, n, k) in LARGE_SHAPES {
        for beta in [0.0, 1.0] {
            let cs = Case {
                m,
                n,
                k,
                c_pad: 1,
                beta,
                scale: 1.0,
                seed: (m * n + k) as u64,
            };
            for isa in Isa::all_supported() {
                pool(3)
                    .install(|| check_against_reference(&cs, isa, Par::Rayon))
                    .unwrap();
            }
        }
    }
}

#[test]
fn gemm_bf16_is_thread_count_invariant() {
    for &(m, n, k) in LARGE_SHAPES {
        let cs = Case {
            m,
            n,
            k,
            c_pad: 0,
            beta: 1.0,
            scale: 1.0,
            seed: 7,
        };
        let inp = inputs(&cs);
        for isa in Isa::all_supported() {
            let serial = run(&cs, &inp, isa, Par::Seq);
            for threads in [1, 2, 5] {
                let par = pool(threads).install(|| run(&cs, &inp, isa, Par::Rayon));
                assert!(same_bits(&serial, &par), "{isa:?} {m}x{n}x{k} t{threads}");
            }
        }
    }
}

#[test]
fn gemm_bf16_paths_agree_within_tolerance() {
    // Both ISAs (where present) against each other, not only against the reference: a bug
    // common to a path and its oracle would show here.
    let isas = Isa::all_supported();
    let cs = Case {
        m: 37,
        n: 45,
        k: 67,
        c_pad: 0,
        beta: 0.0,
        scale: 1.0,
        seed: 11,
    };
    let inp = inputs(&cs);
    let outs: Vec<Vec<f32>> = isas
        .iter()
        .map(|&isa| run(&cs, &inp, isa, Par::Seq))
        .collect();
    // Entries within 1, so sum_p |A_ip B_jp| <= K: each path is within (K + 2) * 2u * K of
    // the exact product (see the file's doc), so within twice that of the other.
    let k = cs.k as f32;
    let tol = 2.0 * (k + 2.0) * f32::EPSILON * k;
    for out in &outs[1..] {
        for (x, y) in outs[0].iter().zip(out) {
            assert!((x - y).abs() <= tol, "{x} vs {y}");
        }
    }
}
