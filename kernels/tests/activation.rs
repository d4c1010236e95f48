//! The activation and loss kernels (BCE with logits, squared error) against their f64 twins: lengths on and off the lane width
//! (0 and 1 included), logits over the whole range the losses meet, the extremes (±30, ±100,
//! 0) at every position of a vector and in the masked tail.

mod common;

use common::isas;
use dlrm_kernels::isa::Isa;
use dlrm_kernels::{activation, reference};
use proptest::prelude::*;

/// Logits: ordinary values, the extremes, and values around where exp over/underflows.
fn logit() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => -20.0f32..20.0,
        1 => prop::sample::select(vec![0.0f32, -0.0, 30.0, -30.0, 100.0, -100.0, 88.7, -88.7, 103.9, -103.9, 1e-8, -1e-8]),
        1 => -200.0f32..200.0,
    ]
}

fn label() -> impl Strategy<Value = f32> {
    prop::sample::select(vec![0.0f32, 1.0])
}

/// |a - e| <= abs + rel |e|.
fn close(a: f32, e: f32, abs: f32, rel: f32) -> bool {
    (a - e).abs() <= abs + rel * e.abs()
}

/// Relative accuracy expected of the vectorised exp/ln_1p in f32.
const REL: f32 = 4.0 * f32::EPSILON;

/// The kernel on `isa`, or its scalar twin when `isa` is None.
fn run_bce(z: &[f32], y: &[f32], scale: f32, isa: Option<Isa>) -> (Vec<f32>, Vec<f32>, f64) {
    let (mut p, mut g) = (vec![f32::NAN; z.len()], vec![f32::NAN; z.len()]);
    let sum = match isa {
        None => reference::bce_with_logits(z, y, &mut p, &mut g, scale),
        Some(isa) => activation::bce_with_logits_with_isa(isa, z, y, &mut p, &mut g, scale),
    };
    (p, g, sum)
}

fn check_bce(z: &[f32], y: &[f32]) -> Result<(), TestCaseError> {
    for isa in isas() {
        check_bce_on(isa, z, y)?;
    }
    Ok(())
}

fn check_bce_on(isa: Isa, z: &[f32], y: &[f32]) -> Result<(), TestCaseError> {
    let scale = 1.0 / z.len().max(1) as f32;
    let (p, g, sum) = run_bce(z, y, scale, Some(isa));
    let (pe, ge, sume) = run_bce(z, y, scale, None);
    for i in 0..z.len() {
        prop_assert!(
            p[i].is_finite() && g[i].is_finite(),
            "z = {}: p {} g {}",
            z[i],
            p[i],
            g[i]
        );
        prop_assert!(
            close(p[i], pe[i], 1e-30, REL),
            "sigmoid({}) = {}, twin {}",
            z[i],
            p[i],
            pe[i]
        );
        prop_assert!(
            close(g[i], ge[i], 1e-30, REL + scale * REL),
            "grad at z = {}, y = {}: {}, twin {}",
            z[i],
            y[i],
            g[i],
            ge[i]
        );
    }
    // Each loss term is accurate to a few ulps of itself.
    let bound: f64 = z
        .iter()
        .zip(y)
        .map(|(&z, &y)| {
            let z = z as f64;
            (z.max(0.0) - z * y as f64 + (-z.abs()).exp().ln_1p()).abs()
        })
        .sum::<f64>()
        * 8.0
        * f32::EPSILON as f64;
    prop_assert!(sum.is_finite());
    prop_assert!(
        (sum - sume).abs() <= bound + 1e-30,
        "loss sum {sum}, twin {sume}"
    );
    Ok(())
}

proptest! {
    // Half the cases of a single path: every case runs on each ISA of `isas()`.
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn bce_with_logits_matches_reference(zy in prop::collection::vec((logit(), label()), 0..80)) {
        let (z, y): (Vec<f32>, Vec<f32>) = zy.into_iter().unzip();
        check_bce(&z, &y)?;
    }

    #[test]
    fn sigmoid_matches_reference(x in prop::collection::vec(logit(), 0..80)) {
        let mut twin = vec![f32::NAN; x.len()];
        reference::sigmoid(&x, &mut twin);
        for isa in isas() {
            let mut ours = vec![f32::NAN; x.len()];
            activation::sigmoid_with_isa(isa, &x, &mut ours);
            for i in 0..x.len() {
                prop_assert!(close(ours[i], twin[i], 1e-30, REL), "{:?}: sigmoid({}) = {}, twin {}", isa, x[i], ours[i], twin[i]);
            }
        }
    }

    #[test]
    fn squared_error_matches_reference(
        pt in prop::collection::vec((-10.0f32..10.0, prop::sample::select(vec![1.0f32, 2.5, 3.0, 4.0, 5.0])), 0..80),
    ) {
        let (p, t): (Vec<f32>, Vec<f32>) = pt.into_iter().unzip();
        let scale = 2.0 / p.len().max(1) as f32;
        let mut twin = vec![f32::NAN; p.len()];
        let sume = reference::squared_error(&p, &t, &mut twin, scale);
        for isa in isas() {
            let mut ours = vec![f32::NAN; p.len()];
            let sum = activation::squared_error_with_isa(isa, &p, &t, &mut ours, scale);
            for i in 0..p.len() {
                // One rounding for the difference, one for the scaling.
                prop_assert!(close(ours[i], twin[i], 1e-30, 2.0 * f32::EPSILON), "{} vs {}", ours[i], twin[i]);
            }
            // Each square from an f32 difference (one rounding), summed in f64.
            prop_assert!((sum - sume).abs() <= sume * 2.0 * f32::EPSILON as f64 + 1e-30, "{sum} vs {sume}");
        }
    }

    #[test]
    fn sigmoid_backward_matches_reference(
        pg in prop::collection::vec((0.0f32..=1.0, -2.0f32..2.0), 0..80),
    ) {
        let (p, g): (Vec<f32>, Vec<f32>) = pg.into_iter().unzip();
        let mut twin = vec![f32::NAN; p.len()];
        reference::sigmoid_backward(&p, &g, &mut twin);
        for isa in isas() {
            let mut ours = vec![f32::NAN; p.len()];
            activation::sigmoid_backward_with_isa(isa, &p, &g, &mut ours);
            for i in 0..p.len() {
                prop_assert!(close(ours[i], twin[i], 1e-12, 4.0 * f32::EPSILON), "{} vs {}", ours[i], twin[i]);
            }
        }
    }
}

/// Each extreme logit with each label, alone (a masked tail) and filling whole vectors: the
/// loss is the exact textbook value, never inf or NaN.
#[test]
fn bce_is_stable_at_extreme_logits() {
    for z in [0.0f32, 30.0, -30.0, 100.0, -100.0] {
        for y in [0.0f32, 1.0] {
            let z64 = z as f64;
            let want = z64.max(0.0) - z64 * y as f64 + (-z64.abs()).exp().ln_1p();
            for (n, isa) in [1, 2 * dlrm_kernels::simd::MAX_LANES + 3]
                .into_iter()
                .flat_map(|n| isas().into_iter().map(move |isa| (n, isa)))
            {
                let (p, g, sum) = run_bce(&vec![z; n], &vec![y; n], 0.5, Some(isa));
                assert!(sum.is_finite() && p.iter().chain(&g).all(|v| v.is_finite()));
                let per = sum / n as f64;
                assert!(
                    (per - want).abs() <= 1e-6 * want.abs() + 1e-30,
                    "{isa:?}: loss(z = {z}, y = {y}) = {per}, want {want}"
                );
                let want_p = 1.0 / (1.0 + (-z64).exp());
                assert!(((p[0] as f64) - want_p).abs() <= 1e-7 * want_p + 1e-38);
                assert!(((g[0] as f64) - 0.5 * (want_p - y as f64)).abs() <= 1e-7);
            }
        }
    }
}

#[test]
#[should_panic(expected = "bce_with_logits: input 1 has 2 values")]
fn bce_rejects_mismatched_lengths() {
    let (mut p, mut g) = (vec![0.0; 3], vec![0.0; 3]);
    activation::bce_with_logits(&[0.0; 3], &[0.0; 2], &mut p, &mut g, 1.0);
}
