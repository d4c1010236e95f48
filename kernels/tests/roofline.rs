//! The roofline loops against their scalar twins, on lengths around the lane count and the
//! parallel chunk, and bit-identical for any thread count.

mod common;

use common::{bits, fill, isas, on_1_2_3_threads};
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use dlrm_kernels::roofline::{
    LINE_FLOATS, fma_peak_flops_with_isa, fma_peak_with_isa, gather_lines, stream_copy,
    stream_triad,
};
use proptest::prelude::*;

/// Lengths: empty, one, primes, around the lane count, and past one parallel chunk (1 << 16).
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0usize, 1, 7, 15, 16, 17, 31, 33, 97, 65_537]),
        0usize..2000,
    ]
}

fn copy(src: &[f32], par: Par) -> Vec<f32> {
    let mut dst = vec![f32::NAN; src.len()];
    stream_copy(src, &mut dst, par);
    dst
}

fn triad(b: &[f32], c: &[f32], s: f32, par: Par) -> Vec<f32> {
    let mut a = vec![f32::NAN; b.len()];
    stream_triad(&mut a, b, c, s, par);
    a
}

/// A buffer of `count` lines and `n` line numbers into it (repeats included).
fn lines_case(count: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let buf = fill(count * LINE_FLOATS, seed);
    let lines = common::fill_range(n, seed ^ 9, 0.0, count as f32)
        .into_iter()
        .map(|x| (x as u32).min(count as u32 - 1))
        .collect();
    (buf, lines)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn copy_matches_reference(n in length(), seed in any::<u64>()) {
        let src = fill(n, seed);
        let mut expect = vec![f32::NAN; n];
        reference::stream_copy(&src, &mut expect);
        prop_assert_eq!(bits(&copy(&src, Par::Rayon)), bits(&expect));
    }

    #[test]
    fn triad_matches_reference(n in length(), seed in any::<u64>(), s in -2.0f32..2.0) {
        let (b, c) = (fill(n, seed), fill(n, seed ^ 1));
        let mut expect = vec![f32::NAN; n];
        reference::stream_triad(&mut expect, &b, &c, s);
        // One FMA against an f64 evaluation rounded to f32: within one ulp of |a| <= 3.
        for (i, (x, e)) in triad(&b, &c, s, Par::Rayon).iter().zip(&expect).enumerate() {
            prop_assert!((x - e).abs() <= 3.0 * f32::EPSILON, "a[{}] = {}, reference {}", i, x, e);
        }
    }

    #[test]
    fn gather_matches_reference(
        count in 1usize..300,
        n in length(),
        seed in any::<u64>(),
    ) {
        let (buf, lines) = lines_case(count, n, seed);
        prop_assert_eq!(gather_lines(&buf, &lines, Par::Rayon), reference::gather_lines(&buf, &lines));
    }

    #[test]
    fn loops_are_thread_count_invariant(n in length(), seed in any::<u64>()) {
        let (b, c) = (fill(n, seed), fill(n, seed ^ 1));
        let (buf, lines) = lines_case(97, n, seed);
        let [one, two, three] = on_1_2_3_threads(|par| {
            (bits(&copy(&b, par)), bits(&triad(&b, &c, 0.75, par)), gather_lines(&buf, &lines, par))
        });
        prop_assert_eq!(&one, &two);
        prop_assert_eq!(&one, &three);
    }
}

/// The FMA chains against f64 chains (close after a few thousand steps: a <- 0.999 a + 1e-3
/// contracts, so rounding errors do not grow).
#[test]
fn fma_peak_matches_reference() {
    for isa in isas() {
        let lanes = isa.simd_level().lanes();
        for iters in [0, 1, 5, 1000, 4096] {
            let got = f64::from(fma_peak_with_isa(isa, iters, 0.999, 1e-3));
            let expect = reference::fma_peak(iters, 0.999, 1e-3, lanes);
            assert!(
                (got - expect).abs() <= 1e-4 * expect.abs().max(1.0),
                "{isa:?}, {iters} steps: {got}, reference {expect}"
            );
        }
        assert_eq!(fma_peak_flops_with_isa(isa, 3), 3 * 16 * lanes * 2);
    }
}

/// A line past the end of the buffer is a programmer error caught at entry.
#[test]
#[should_panic(expected = "gather_lines: line 4 past the 4 whole lines")]
fn gather_rejects_a_line_past_the_end() {
    let buf = vec![0.0; 4 * LINE_FLOATS + 3];
    gather_lines(&buf, &[0, 4], Par::Rayon);
}
