//! The factorization-machine kernels against their f64 twins (Rendle's pairwise form): 0 to 4
//! fields, empty and multi-id bags, one-hot and real-valued features, latent widths on and off
//! the lane width and past one register block, empty batches; results are bit-identical for any
//! thread count.

mod common;

use common::{bits, fill, fill_range, isas, on_1_2_3_threads};
use dlrm_kernels::embedding::Bags;
use dlrm_kernels::fm::{
    FmField, fm_backward, fm_backward_with_isa, fm_forward, fm_forward_with_isa,
};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::mat::MatRef;
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

const FACTORS: [usize; 12] = [1, 4, 5, 15, 16, 17, 31, 32, 33, 64, 65, 100];

#[derive(Clone, Debug)]
struct Field {
    factors: Vec<f32>,
    linear: Vec<f32>,
    offsets: Vec<u32>,
    indices: Vec<u32>,
    /// Feature values (None: one-hot ids of value 1).
    weights: Option<Vec<f32>>,
}

impl Field {
    fn view(&self) -> FmField<'_> {
        FmField {
            factors: &self.factors,
            linear: &self.linear,
            bags: Bags::with_offsets(&self.indices, &self.offsets)
                .with_weights(self.weights.as_deref()),
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    k: usize,
    batch: usize,
    fields: Vec<Field>,
    bias: f32,
    grad_out: Vec<f32>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(FACTORS.to_vec()),
        prop_oneof![prop::sample::select(vec![0usize, 1, 2]), 0usize..=40],
        prop::collection::vec(
            (
                prop::sample::select(vec![1usize, 2, 7, 50, 300]),
                any::<bool>(),
            ),
            0..=4,
        ),
        any::<u64>(),
    )
        .prop_map(|(k, batch, specs, seed)| {
            let fields = specs
                .iter()
                .enumerate()
                .map(|(t, &(rows, valued))| {
                    let s = seed ^ (t as u64 + 1) << 8;
                    // Bag sizes 0 to 5 (a field may be absent from a sample, or multi-hot).
                    let sizes = fill_range(batch, s, 0.0, 6.0);
                    let mut offsets = Vec::with_capacity(batch);
                    let mut nnz = 0u32;
                    for x in sizes {
                        offsets.push(nnz);
                        nnz += (x as u32).min(5);
                    }
                    let indices = fill_range(nnz as usize, s ^ 1, 0.0, rows as f32)
                        .into_iter()
                        .map(|x| (x as usize).min(rows - 1) as u32)
                        .collect();
                    Field {
                        factors: fill(rows * k, s ^ 2),
                        linear: fill(rows, s ^ 3),
                        offsets,
                        indices,
                        weights: valued.then(|| fill(nnz as usize, s ^ 4)),
                    }
                })
                .collect();
            Case {
                k,
                batch,
                fields,
                bias: 0.25,
                grad_out: fill(batch, seed ^ 5),
            }
        })
}

impl Case {
    fn views(&self) -> Vec<FmField<'_>> {
        self.fields.iter().map(Field::view).collect()
    }

    /// Per sample: the number of its features, and the size of the terms of its output
    /// (sum over f of (sum_p |x_p v_pf|)^2 plus the first-order terms): the rounding of every
    /// result of the sample is a few ulps of that, per term added.
    fn magnitudes(&self) -> Vec<(usize, f32)> {
        let k = self.k;
        (0..self.batch)
            .map(|b| {
                let mut abs_sum = vec![0.0f32; k];
                let (mut n, mut first) = (0, self.bias.abs());
                for f in &self.fields {
                    let v = f.view();
                    for p in v.bags.bag(b) {
                        let id = f.indices[p] as usize;
                        let x = f.weights.as_ref().map_or(1.0, |w| w[p]).abs();
                        for (a, r) in abs_sum.iter_mut().zip(&f.factors[id * k..(id + 1) * k]) {
                            *a += x * r.abs();
                        }
                        first += x * f.linear[id].abs();
                        n += 1;
                    }
                }
                (n, first + abs_sum.iter().map(|a| a * a).sum::<f32>())
            })
            .collect()
    }

    fn tol(&self, (n, mag): (usize, f32)) -> f32 {
        4.0 * f32::EPSILON * (n + self.k + 2) as f32 * (1.0 + mag)
    }
}

/// Kernel forward: (outputs, sums).
fn forward(isa: Isa, cs: &Case, par: Par) -> (Vec<f32>, Vec<f32>) {
    let views = cs.views();
    let mut out = vec![f32::NAN; cs.batch];
    let mut sums = vec![f32::NAN; cs.batch * cs.k];
    fm_forward_with_isa(
        isa,
        views.len(),
        cs.k,
        |t| views[t],
        cs.bias,
        &mut sums,
        &mut out,
        par,
    );
    (out, sums)
}

/// Kernel backward of every field: (latent row gradients, feature value gradients) per field.
fn backward(isa: Isa, cs: &Case, sums: &[f32], par: Par) -> Vec<(Vec<f32>, Vec<f32>)> {
    cs.views()
        .into_iter()
        .map(|f| {
            let nnz = f.bags.indices().len();
            let mut rows = vec![f32::NAN; nnz * cs.k];
            let mut gw = vec![f32::NAN; nnz];
            fm_backward_with_isa(
                isa,
                f,
                MatRef::new(sums, f.bags.len(), cs.k),
                &cs.grad_out,
                &mut rows,
                Some(&mut gw),
                par,
            );
            (rows, gw)
        })
        .collect()
}

fn check_case(cs: &Case) -> Result<(), TestCaseError> {
    for isa in isas() {
        check_case_on(isa, cs)?;
    }
    Ok(())
}

fn check_case_on(isa: Isa, cs: &Case) -> Result<(), TestCaseError> {
    let k = cs.k;
    let mags = cs.magnitudes();
    let (out, sums) = forward(isa, cs, Par::Rayon);
    let views = cs.views();
    let (mut eout, mut esums) = (vec![0.0; cs.batch], vec![0.0; cs.batch * k]);
    reference::fm_forward(&views, k, cs.bias, &mut esums, &mut eout);
    for b in 0..cs.batch {
        let tol = cs.tol(mags[b]);
        prop_assert!(
            (out[b] - eout[b]).abs() <= tol,
            "y[{b}] = {}, reference {} (tol {tol})",
            out[b],
            eout[b]
        );
        for f in 0..k {
            let (s, e) = (sums[b * k + f], esums[b * k + f]);
            prop_assert!((s - e).abs() <= tol, "S[{b}, {f}] = {s}, reference {e}");
        }
    }
    for (t, (rows, gw)) in backward(isa, cs, &sums, Par::Rayon).into_iter().enumerate() {
        let (erows, egw) = reference::fm_backward(&views, t, k, &cs.grad_out);
        let bags = views[t].bags;
        for (b, &mag) in mags.iter().enumerate() {
            let tol = cs.tol(mag);
            for p in bags.bag(b) {
                prop_assert!(
                    (gw[p] - egw[p]).abs() <= tol,
                    "field {t}: dx[{p}] = {}, reference {}",
                    gw[p],
                    egw[p]
                );
                for f in 0..k {
                    let (o, e) = (rows[p * k + f], erows[p * k + f]);
                    prop_assert!(
                        (o - e).abs() <= tol,
                        "field {t}: dv[{p}, {f}] = {o}, reference {e}"
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    // Half the cases of a single path: every case runs on each ISA of `isas()`.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fm_matches_reference(cs in case()) {
        check_case(&cs)?;
    }

    #[test]
    fn fm_is_thread_count_invariant(cs in case()) {
        for isa in isas() {
            let runs = on_1_2_3_threads(|par| {
                let (out, sums) = forward(isa, &cs, par);
                let grads: Vec<(Vec<u32>, Vec<u32>)> = backward(isa, &cs, &sums, par)
                    .iter()
                    .map(|(r, w)| (bits(r), bits(w)))
                    .collect();
                (bits(&out), bits(&sums), grads)
            });
            prop_assert_eq!(&runs[0], &runs[1]);
            prop_assert_eq!(&runs[0], &runs[2]);
        }
    }
}

/// Two one-hot fields (a user and an item) are biased matrix factorization: y = bias + w_u +
/// w_i + <v_u, v_i>, and each latent gradient is g times the other vector.
#[test]
fn two_one_hot_fields_are_matrix_factorization() {
    let k = 3;
    let users = Field {
        factors: vec![1.0, 2.0, 3.0, 0.5, 0.5, 0.5],
        linear: vec![0.1, -0.2],
        offsets: vec![0],
        indices: vec![1],
        weights: None,
    };
    let items = Field {
        factors: vec![-1.0, 0.0, 2.0],
        linear: vec![0.3],
        offsets: vec![0],
        indices: vec![0],
        weights: None,
    };
    let views = [users.view(), items.view()];
    let (mut sums, mut out) = (vec![0.0; k], vec![0.0; 1]);
    fm_forward(2, k, |t| views[t], 3.5, &mut sums, &mut out, Par::Rayon);
    // 3.5 - 0.2 + 0.3 + (-0.5 + 0 + 1).
    assert!((out[0] - 4.1).abs() < 1e-6, "{}", out[0]);
    let mut rows = vec![0.0; k];
    fm_backward(
        views[0],
        MatRef::new(&sums, 1, k),
        &[2.0],
        &mut rows,
        None,
        Par::Rayon,
    );
    assert_eq!(rows, [-2.0, 0.0, 4.0]);
}

#[test]
#[should_panic(expected = "first-order weights")]
fn first_order_table_must_match_the_factors() {
    let f = FmField {
        factors: &[0.0; 8],
        linear: &[0.0; 3],
        bags: Bags::with_offsets(&[0], &[0]),
    };
    fm_forward(1, 2, |_| f, 0.0, &mut [0.0; 2], &mut [0.0; 1], Par::Rayon);
}
