//! The interaction kernels against their scalar twins: every feature count from 1 to 30,
//! widths on and off the lane width, empty and single-sample batches, padded strides, with and
//! without self-interaction; padding is never written; results are bit-identical for any
//! thread count.

mod common;

use common::{bits, fill, isas, on_1_2_3_threads};
use dlrm_kernels::interaction::{self, num_pairs};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::mat::{MatMut, MatRef};
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

const WIDTHS: [usize; 11] = [1, 3, 8, 15, 16, 17, 31, 32, 64, 100, 128];

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    f: usize,
    d: usize,
    self_interaction: bool,
    /// Extra floats per row of features, output, output gradient, feature gradient.
    pads: [usize; 4],
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![prop::sample::select(vec![0usize, 1, 2, 3]), 0usize..=40,],
        prop_oneof![prop::sample::select(vec![1usize, 2, 27]), 1usize..=30],
        prop::sample::select(WIDTHS.to_vec()),
        any::<bool>(),
        prop::array::uniform4(0usize..4),
        any::<u64>(),
    )
        .prop_map(|(batch, f, d, self_interaction, pads, seed)| Case {
            batch,
            f,
            d,
            self_interaction,
            pads,
            seed,
        })
}

/// Buffers of one case: outputs start as NaN, so a value not written shows.
struct Buffers {
    features: Vec<f32>,
    feature_stride: usize,
    out_width: usize,
    out_stride: usize,
    grad_out: Vec<f32>,
    grad_out_stride: usize,
    grad_feature_stride: usize,
}

impl Case {
    fn len(&self, stride: usize, width: usize) -> usize {
        // One extra row's worth of padding past the last row, to catch overruns.
        self.batch * stride + width
    }

    fn buffers(&self, dot: bool) -> Buffers {
        let fd = self.f * self.d;
        let out_width = if dot {
            self.d + num_pairs(self.f, self.self_interaction)
        } else {
            fd
        };
        let feature_stride = fd + self.pads[0];
        let out_stride = out_width + self.pads[1];
        let grad_out_stride = out_width + self.pads[2];
        Buffers {
            features: fill(self.len(feature_stride, 0), self.seed),
            feature_stride,
            out_width,
            out_stride,
            grad_out: fill(self.len(grad_out_stride, 0), self.seed ^ 1),
            grad_out_stride,
            grad_feature_stride: fd + self.pads[3],
        }
    }
}

/// Calls the scalar twin of an interaction kernel (`kernel` = None) or the kernel itself with
/// the given parallelism (its extra last argument).
/// Which implementation a helper runs: the scalar twin (None), or the kernel on an ISA.
type Kernel = Option<(Isa, Par)>;

macro_rules! call {
    ($kernel:expr, $name:ident / $with_isa:ident($($arg:expr),* $(,)?)) => {
        match $kernel {
            None => reference::$name($($arg),*),
            Some((isa, par)) => interaction::$with_isa(isa, $($arg),*, par),
        }
    };
    ($kernel:expr, $name:ident($($arg:expr),* $(,)?)) => {
        match $kernel {
            None => reference::$name($($arg),*),
            Some((_, par)) => interaction::$name($($arg),*, par),
        }
    };
}

impl Buffers {
    /// The features: batch rows of F * d values.
    fn features(&self, cs: &Case) -> MatRef<'_> {
        MatRef::with_row_stride(&self.features, cs.batch, cs.f * cs.d, self.feature_stride)
    }

    /// The output gradient: batch rows of the output's width.
    fn grad_out(&self, cs: &Case) -> MatRef<'_> {
        MatRef::with_row_stride(
            &self.grad_out,
            cs.batch,
            self.out_width,
            self.grad_out_stride,
        )
    }
}

fn dot_forward(cs: &Case, bf: &Buffers, kernel: Kernel) -> Vec<f32> {
    let mut out = vec![f32::NAN; cs.len(bf.out_stride, bf.out_width)];
    let out_view = MatMut::with_row_stride(&mut out, cs.batch, bf.out_width, bf.out_stride);
    let (f, si) = (cs.f, cs.self_interaction);
    call!(
        kernel,
        dot_interaction_forward
            / dot_interaction_forward_with_isa(bf.features(cs), f, si, out_view)
    );
    out
}

fn dot_backward(cs: &Case, bf: &Buffers, kernel: Kernel) -> Vec<f32> {
    let (fd, gs) = (cs.f * cs.d, bf.grad_feature_stride);
    let mut grad = vec![f32::NAN; cs.len(gs, fd)];
    let grad_view = MatMut::with_row_stride(&mut grad, cs.batch, fd, gs);
    let (f, si) = (cs.f, cs.self_interaction);
    call!(
        kernel,
        dot_interaction_backward
            / dot_interaction_backward_with_isa(bf.features(cs), f, si, bf.grad_out(cs), grad_view)
    );
    grad
}

fn cat_forward(cs: &Case, bf: &Buffers, kernel: Kernel) -> Vec<f32> {
    let mut out = vec![f32::NAN; cs.len(bf.out_stride, bf.out_width)];
    let out_view = MatMut::with_row_stride(&mut out, cs.batch, bf.out_width, bf.out_stride);
    call!(kernel, cat_interaction_forward(bf.features(cs), out_view));
    out
}

fn cat_backward(cs: &Case, bf: &Buffers, kernel: Kernel) -> Vec<f32> {
    let (fd, gs) = (cs.f * cs.d, bf.grad_feature_stride);
    let mut grad = vec![f32::NAN; cs.len(gs, fd)];
    let grad_view = MatMut::with_row_stride(&mut grad, cs.batch, fd, gs);
    call!(kernel, cat_interaction_backward(bf.grad_out(cs), grad_view));
    grad
}

/// Compares the rows (`width` values, `stride` apart) within `tol * (1 + |expected|)`, and
/// checks that everything outside them is still NaN.
fn check_rows(
    ours: &[f32],
    twin: &[f32],
    batch: usize,
    stride: usize,
    width: usize,
    tol: f32,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(ours.len(), twin.len());
    for (idx, (&o, &e)) in ours.iter().zip(twin).enumerate() {
        let (b, k) = (idx / stride, idx % stride);
        if b < batch && k < width {
            prop_assert!(
                (o - e).abs() <= tol * (1.0 + e.abs()),
                "sample {b}, element {k}: {o}, reference {e} (tol {tol})"
            );
        } else {
            prop_assert!(
                o.is_nan(),
                "padding at sample {b}, element {k} written: {o}"
            );
        }
    }
    Ok(())
}

fn check_case(cs: &Case) -> Result<(), TestCaseError> {
    for isa in isas() {
        check_case_on(isa, cs)?;
    }
    Ok(())
}

fn check_case_on(isa: Isa, cs: &Case) -> Result<(), TestCaseError> {
    let kernel = Some((isa, Par::Rayon));
    let eps = f32::EPSILON;
    let bf = cs.buffers(true);
    // A dot product of d terms of magnitude <= 1.
    let tol = (cs.d as f32 + 4.0) * 2.0 * eps;
    let (ours, twin) = (dot_forward(cs, &bf, kernel), dot_forward(cs, &bf, None));
    check_rows(&ours, &twin, cs.batch, bf.out_stride, bf.out_width, tol)?;
    // F terms of magnitude <= 2 per output, plus the pass-through.
    let tol = (cs.f as f32 + 4.0) * 4.0 * eps;
    let (ours, twin) = (dot_backward(cs, &bf, kernel), dot_backward(cs, &bf, None));
    check_rows(
        &ours,
        &twin,
        cs.batch,
        bf.grad_feature_stride,
        cs.f * cs.d,
        tol,
    )?;

    let bf = cs.buffers(false);
    let (ours, twin) = (cat_forward(cs, &bf, kernel), cat_forward(cs, &bf, None));
    prop_assert_eq!(bits(&ours), bits(&twin));
    let (ours, twin) = (cat_backward(cs, &bf, kernel), cat_backward(cs, &bf, None));
    prop_assert_eq!(bits(&ours), bits(&twin));
    Ok(())
}

fn check_thread_invariance(cs: &Case) -> Result<(), TestCaseError> {
    let dot = cs.buffers(true);
    let cat = cs.buffers(false);
    for isa in isas() {
        let runs = on_1_2_3_threads(|par| {
            let ours = Some((isa, par));
            [
                dot_forward(cs, &dot, ours),
                dot_backward(cs, &dot, ours),
                cat_forward(cs, &cat, ours),
                cat_backward(cs, &cat, ours),
            ]
        });
        for (k, one) in runs[0].iter().enumerate() {
            prop_assert_eq!(
                bits(one),
                bits(&runs[1][k]),
                "{:?}: output {} on 2 threads",
                isa,
                k
            );
            prop_assert_eq!(
                bits(one),
                bits(&runs[2][k]),
                "{:?}: output {} on 3 threads",
                isa,
                k
            );
        }
    }
    Ok(())
}

proptest! {
    // Half the cases of a single path: every case runs on each ISA of `isas()`.
    #![proptest_config(ProptestConfig::with_cases(80))]

    #[test]
    fn interaction_matches_reference(cs in case()) {
        check_case(&cs)?;
    }

    #[test]
    fn interaction_is_thread_count_invariant(cs in case()) {
        check_thread_invariance(&cs)?;
    }
}

/// The shapes that matter (Criteo Kaggle: 26 tables of width 16; width 128), with batches
/// large enough to take the parallel path on its own and a chunk of samples left over.
#[test]
fn dlrm_shapes_match_reference_and_are_thread_invariant() {
    for (f, d) in [(27, 16), (27, 128), (9, 64)] {
        for self_interaction in [false, true] {
            let cs = Case {
                batch: 70,
                f,
                d,
                self_interaction,
                pads: [0, 0, 1, 0],
                seed: (f * 1000 + d) as u64,
            };
            check_case(&cs).unwrap();
            check_thread_invariance(&cs).unwrap();
        }
    }
}

#[test]
fn pair_gradients_reach_both_vectors() {
    // F = 3, d = 2: F0 = (1, 2), F1 = (3, 4), F2 = (5, 6); only pair (2, 1) has a gradient.
    let features = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let x = MatRef::new(&features, 1, 6);
    let mut out = [0.0f32; 5];
    interaction::dot_interaction_forward(x, 3, false, MatMut::new(&mut out, 1, 5), Par::Rayon);
    // Pairs (1, 0), (2, 0), (2, 1).
    assert_eq!(out, [1.0, 2.0, 11.0, 17.0, 39.0]);
    let grad_out = [0.5, -1.0, 0.0, 0.0, 2.0];
    let mut grad = [f32::NAN; 6];
    let g = MatRef::new(&grad_out, 1, 5);
    interaction::dot_interaction_backward(x, 3, false, g, MatMut::new(&mut grad, 1, 6), Par::Rayon);
    assert_eq!(grad, [0.5, -1.0, 10.0, 12.0, 6.0, 8.0]);
    // With self-interaction (pairs (0, 0), (1, 0), (1, 1), ...), pair (1, 1) gives 2 g F1.
    let grad_out = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    let g = MatRef::new(&grad_out, 1, 8);
    interaction::dot_interaction_backward(x, 3, true, g, MatMut::new(&mut grad, 1, 6), Par::Rayon);
    assert_eq!(grad, [0.0, 0.0, 6.0, 8.0, 0.0, 0.0]);
}

/// An output view of the wrong width (one pair short) is refused by the kernel.
#[test]
#[should_panic(expected = "dot_interaction_forward: out is 2x13, needs 2x14")]
fn short_output_is_rejected() {
    let features = vec![0.0; 2 * 4 * 8];
    let mut out = vec![0.0; 2 * 13];
    interaction::dot_interaction_forward(
        MatRef::new(&features, 2, 32),
        4,
        false,
        MatMut::new(&mut out, 2, 13),
        Par::Rayon,
    );
}

/// A view never spans more than its slice: the shape check is the view's constructor.
#[test]
#[should_panic(expected = "needs 22 floats, slice has 21")]
fn view_past_its_slice_is_rejected() {
    let mut out = vec![0.0; 21];
    MatMut::with_row_stride(&mut out, 2, 8, 14);
}
