//! The cross-network kernels (DCN rank-one and DCN-v2 full-rank layers) against their f64
//! twins: 0 to 6 layers, widths on and off the lane width, empty batches, batches across the
//! partial-sum chunk, padded strides, gradients of x0 overwritten or accumulated; padding is
//! never written; results are bit-identical for any thread count.

mod common;

use common::{bits, fill, fill_range, isas, on_1_2_3_threads};
use dlrm_kernels::cross::{
    CROSS_CHUNK, CrossGrads, CrossKind, CrossNet, CrossWorkspace, cross_backward,
    cross_backward_with_isa, cross_forward, cross_forward_with_isa,
};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::mat::{MatMut, MatRef};
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

const WIDTHS: [usize; 10] = [1, 3, 7, 15, 16, 17, 33, 64, 100, 129];

#[derive(Clone, Debug)]
struct Case {
    kind: CrossKind,
    batch: usize,
    d: usize,
    layers: usize,
    /// Extra floats per row of x0, the output, the output gradient and the x0 gradient.
    pads: [usize; 4],
    accumulate: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(CrossKind::RankOne), Just(CrossKind::FullRank)],
        prop_oneof![
            prop::sample::select(vec![0usize, 1, 2, CROSS_CHUNK, CROSS_CHUNK + 1]),
            0usize..=150,
        ],
        prop::sample::select(WIDTHS.to_vec()),
        prop_oneof![Just(6usize), 0usize..=4],
        prop::array::uniform4(0usize..3),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(kind, batch, d, layers, pads, accumulate, seed)| Case {
            kind,
            batch,
            d,
            layers,
            pads,
            accumulate,
            seed,
        })
}

/// Inputs of a case: weights scaled by 1/d so that a layer at most about triples its input and
/// every value stays within a few powers of 3.
struct Inputs {
    x0: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    grad_out: Vec<f32>,
    /// What the x0 gradient holds before the backward (kept when accumulating).
    grad_x0: Vec<f32>,
}

impl Case {
    fn stride(&self, which: usize) -> usize {
        self.d + self.pads[which]
    }

    /// A buffer of `batch` rows `stride` apart plus one stride of padding.
    fn len(&self, which: usize) -> usize {
        (self.batch + 1) * self.stride(which)
    }

    fn inputs(&self) -> Inputs {
        let scale = 1.0 / self.d as f32;
        Inputs {
            x0: fill(self.len(0), self.seed),
            w: fill_range(
                self.kind.weight_len(self.d, self.layers),
                self.seed ^ 1,
                -scale,
                scale,
            ),
            b: fill(self.layers * self.d, self.seed ^ 2),
            grad_out: fill(self.len(2), self.seed ^ 3),
            grad_x0: fill(self.len(3), self.seed ^ 4),
        }
    }

    fn net<'a>(&self, inp: &'a Inputs) -> CrossNet<'a> {
        CrossNet {
            kind: self.kind,
            dim: self.d,
            layers: self.layers,
            w: &inp.w,
            b: &inp.b,
        }
    }
}

/// Forward and backward with the kernels: (output, dx0, dw, db); output padding starts NaN.
fn run(isa: Isa, cs: &Case, inp: &Inputs, par: Par) -> [Vec<f32>; 4] {
    let net = cs.net(inp);
    let mut saved = vec![f32::NAN; cs.kind.saved_len(cs.d, cs.layers, cs.batch)];
    let mut out = vec![f32::NAN; cs.len(1)];
    cross_forward_with_isa(
        isa,
        &net,
        MatRef::with_row_stride(&inp.x0, cs.batch, cs.d, cs.stride(0)),
        &mut saved,
        MatMut::with_row_stride(&mut out, cs.batch, cs.d, cs.stride(1)),
        par,
    );
    let mut gx = if cs.accumulate {
        inp.grad_x0.clone()
    } else {
        vec![f32::NAN; cs.len(3)]
    };
    // Keep the padding of an accumulated gradient recognisable.
    for (i, v) in gx.iter_mut().enumerate() {
        if i % cs.stride(3) >= cs.d || i / cs.stride(3) >= cs.batch {
            *v = f32::NAN;
        }
    }
    let (mut dw, mut db) = (vec![f32::NAN; inp.w.len()], vec![f32::NAN; inp.b.len()]);
    cross_backward_with_isa(
        isa,
        &net,
        MatRef::with_row_stride(&inp.x0, cs.batch, cs.d, cs.stride(0)),
        &saved,
        MatRef::with_row_stride(&inp.grad_out, cs.batch, cs.d, cs.stride(2)),
        CrossGrads {
            x0: MatMut::with_row_stride(&mut gx, cs.batch, cs.d, cs.stride(3)),
            accumulate_x0: cs.accumulate,
            w: &mut dw,
            b: &mut db,
        },
        &mut CrossWorkspace::default(),
        par,
    );
    [out, gx, dw, db]
}

/// Compares rows (`d` values `stride` apart, `rows` of them; everything else must be NaN)
/// within `tol * (1 + max |expected|)`.
fn check_rows(
    what: &str,
    ours: &[f32],
    twin: &[f32],
    rows: usize,
    stride: usize,
    d: usize,
    tol: f32,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(ours.len(), twin.len());
    let scale = 1.0
        + twin
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (&o, &e)) in ours.iter().zip(twin).enumerate() {
        if i / stride < rows && i % stride < d {
            prop_assert!(
                (o - e).abs() <= tol * scale,
                "{what}[{i}] = {o}, reference {e} (tolerance {tol} x {scale})"
            );
        } else {
            prop_assert!(o.is_nan(), "{what}: padding at {i} written: {o}");
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
    let inp = cs.inputs();
    let net = cs.net(&inp);
    let [out, gx, dw, db] = run(isa, cs, &inp, Par::Rayon);
    let (d, layers) = (cs.d, cs.layers);
    // Each layer adds a dot product (d terms) or a GEMM row (d terms) to the rounding of the
    // layer before; the backward also sums over the batch.
    let tol = 16.0 * f32::EPSILON * (d + 4) as f32 * (layers + 1) as f32;
    let mut eout = vec![f32::NAN; out.len()];
    reference::cross_forward(
        &net,
        &inp.x0,
        cs.stride(0),
        cs.batch,
        &mut eout,
        cs.stride(1),
    );
    check_rows("output", &out, &eout, cs.batch, cs.stride(1), d, tol)?;

    let (edx0, edw, edb) = reference::cross_backward(
        &net,
        &inp.x0,
        cs.stride(0),
        cs.batch,
        &inp.grad_out,
        cs.stride(2),
    );
    let mut egx = vec![f32::NAN; gx.len()];
    for b in 0..cs.batch {
        for k in 0..d {
            let base = if cs.accumulate {
                inp.grad_x0[b * cs.stride(3) + k]
            } else {
                0.0
            };
            egx[b * cs.stride(3) + k] = base + edx0[b * d + k];
        }
    }
    check_rows("grad x0", &gx, &egx, cs.batch, cs.stride(3), d, tol)?;
    let btol = tol * (cs.batch + 1) as f32;
    let rows = dw.len() / d.max(1);
    check_rows("grad w", &dw, &edw, rows, d, d, btol)?;
    check_rows("grad b", &db, &edb, layers, d, d, btol)?;
    Ok(())
}

fn check_thread_invariance(cs: &Case) -> Result<(), TestCaseError> {
    let inp = cs.inputs();
    for isa in isas() {
        let runs = on_1_2_3_threads(|par| run(isa, cs, &inp, par).map(|v| bits(&v)));
        for (k, one) in runs[0].iter().enumerate() {
            prop_assert_eq!(one, &runs[1][k], "{:?}: output {} on 2 threads", isa, k);
            prop_assert_eq!(one, &runs[2][k], "{:?}: output {} on 3 threads", isa, k);
        }
    }
    Ok(())
}

proptest! {
    // Half the cases of a single path: every case runs on each ISA of `isas()`.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn cross_matches_reference(cs in case()) {
        check_case(&cs)?;
    }

    #[test]
    fn cross_is_thread_count_invariant(cs in case()) {
        check_thread_invariance(&cs)?;
    }
}

/// The DCN shapes: the Kaggle x0 (13 dense + 26 x 16 = 429 wide), 6 layers, a batch of several
/// partial-sum chunks and a remainder.
#[test]
fn dcn_shapes_match_reference_and_are_thread_invariant() {
    for kind in [CrossKind::RankOne, CrossKind::FullRank] {
        let cs = Case {
            kind,
            batch: 3 * CROSS_CHUNK + 5,
            d: 429,
            layers: 6,
            pads: [0, 256, 0, 0],
            accumulate: true,
            seed: 429,
        };
        check_case(&cs).unwrap();
        check_thread_invariance(&cs).unwrap();
    }
}

/// One rank-one layer by hand: x0 = (1, 2), w = (3, -1), b = (0.5, 0): s = 1, x1 = x0 + b + x0.
#[test]
fn rank_one_layer_by_hand() {
    let (x0, w, b) = ([1.0f32, 2.0], [3.0f32, -1.0], [0.5f32, 0.0]);
    let net = CrossNet {
        kind: CrossKind::RankOne,
        dim: 2,
        layers: 1,
        w: &w,
        b: &b,
    };
    let mut saved = vec![0.0; CrossKind::RankOne.saved_len(2, 1, 1)];
    let mut out = [0.0f32; 2];
    cross_forward(
        &net,
        MatRef::new(&x0, 1, 2),
        &mut saved,
        MatMut::new(&mut out, 1, 2),
        Par::Rayon,
    );
    assert_eq!(out, [2.5, 4.0]);
    // g = (1, 0): c = g . x0 = 1; dx0 = s g + (g + c w) = (1, 0) + (4, -1); dw = c x0; db = g.
    let (mut gx, mut dw, mut db) = ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
    cross_backward(
        &net,
        MatRef::new(&x0, 1, 2),
        &saved,
        MatRef::new(&[1.0, 0.0], 1, 2),
        CrossGrads {
            x0: MatMut::new(&mut gx, 1, 2),
            accumulate_x0: false,
            w: &mut dw,
            b: &mut db,
        },
        &mut CrossWorkspace::default(),
        Par::Rayon,
    );
    assert_eq!((gx, dw, db), ([5.0, -1.0], [1.0, 2.0], [1.0, 0.0]));
}

#[test]
#[should_panic(expected = "weights of 2 layers of width 3")]
fn wrong_weight_count_is_rejected() {
    let net = CrossNet {
        kind: CrossKind::FullRank,
        dim: 3,
        layers: 2,
        w: &[0.0; 6],
        b: &[0.0; 6],
    };
    cross_forward(
        &net,
        MatRef::new(&[0.0; 3], 1, 3),
        &mut [0.0; 64],
        MatMut::new(&mut [0.0; 3], 1, 3),
        Par::Rayon,
    );
}
