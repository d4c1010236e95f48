//! Optimizer kernels against their scalar twins: the fused embedding backward + update for
//! each sparse optimizer, with and without L2 regularisation of the looked-up rows (duplicate
//! ids coalesced, rows never looked up left bit-identical), the dense SGD / Adagrad updates,
//! and bit-identical results for any thread count.

mod common;

use common::{
    BagCase, assert_close, bag_case, bits, fill, fill_range, isas, on_1_2_3_threads, sum_tol,
};
use dlrm_kernels::embedding::{
    SparseGradWorkspace, embedding_bag_backward_coalesce, embedding_bag_backward_coalesce_with_isa,
};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::mat::{MatMut, MatRef};
use dlrm_kernels::optim::{self, SparseOptimizer, SparseStep, TableMut};
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

fn optimizer() -> impl Strategy<Value = SparseOptimizer> {
    (0u8..3, prop::sample::select(vec![0.01f32, 0.1, 0.5])).prop_map(|(k, lr)| match k {
        0 => SparseOptimizer::Sgd { lr },
        1 => SparseOptimizer::Adagrad { lr, eps: 1e-10 },
        _ => SparseOptimizer::RowwiseAdagrad { lr, eps: 1e-8 },
    })
}

/// No regularisation (half the cases), or a weight decay.
fn weight_decay() -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0f32), prop::sample::select(vec![0.01f32, 0.3])]
}

/// Optimizer state of a table: accumulators in [0.1, 1.1), as after some steps (Adagrad's
/// step then changes by at most about 1 / sqrt(0.1) times the change of the gradient).
fn initial_state(c: &BagCase, opt: SparseOptimizer) -> Vec<f32> {
    fill_range(c.rows * opt.state_width(c.dim), c.seed ^ 11, 0.1, 1.1)
}

/// (table, state) after one fused backward + update from `state` (with L2 regularisation
/// when `wd` is not 0).
fn update_from(
    isa: Isa,
    c: &BagCase,
    opt: SparseOptimizer,
    wd: f32,
    mut state: Vec<f32>,
    ws: &mut SparseGradWorkspace,
    par: Par,
) -> (Vec<f32>, Vec<f32>) {
    let mut table = c.table.clone();
    let table_mut = TableMut {
        weights: MatMut::from_rows(&mut table, c.dim),
        state: &mut state,
    };
    let grad_out = MatRef::with_row_stride(&c.grad_out, c.num_bags(), c.dim, c.stride);
    let step = SparseStep {
        opt,
        weight_decay: wd,
    };
    let (bags, pooling) = (c.bags(), c.pooling);
    optim::embedding_bag_backward_update_with_isa(
        isa, table_mut, bags, pooling, grad_out, step, ws, par,
    );
    (table, state)
}

fn update(
    isa: Isa,
    c: &BagCase,
    opt: SparseOptimizer,
    wd: f32,
    ws: &mut SparseGradWorkspace,
    par: Par,
) -> (Vec<f32>, Vec<f32>) {
    update_from(isa, c, opt, wd, initial_state(c, opt), ws, par)
}

/// The fused update against the twin from `state0`: every looked-up row within the rounding
/// of its summed gradient, times `sensitivity` (the most a unit change of the gradient moves
/// the step); rows never looked up, and their state, bit-identical. On every ISA.
fn check_update_from(
    c: &BagCase,
    opt: SparseOptimizer,
    wd: f32,
    state0: Vec<f32>,
    sensitivity: f32,
) {
    for isa in isas() {
        check_update_on(isa, c, opt, wd, state0.clone(), sensitivity);
    }
}

fn check_update_on(
    isa: Isa,
    c: &BagCase,
    opt: SparseOptimizer,
    wd: f32,
    state0: Vec<f32>,
    sensitivity: f32,
) {
    let ws = &mut SparseGradWorkspace::default();
    let (table, state) = update_from(isa, c, opt, wd, state0.clone(), ws, Par::Rayon);
    let (mut etable, mut estate) = (c.table.clone(), state0.clone());
    reference::embedding_bag_backward_update(
        TableMut {
            weights: MatMut::from_rows(&mut etable, c.dim),
            state: &mut estate,
        },
        c.bags(),
        c.pooling,
        MatRef::with_row_stride(&c.grad_out, c.num_bags(), c.dim, c.stride),
        SparseStep {
            opt,
            weight_decay: wd,
        },
    );
    let lr = match opt {
        SparseOptimizer::Sgd { lr }
        | SparseOptimizer::Adagrad { lr, .. }
        | SparseOptimizer::RowwiseAdagrad { lr, .. } => lr,
    };
    let sw = opt.state_width(c.dim);
    for (r, k) in c.lookups().into_iter().enumerate() {
        let (row, srow) = (r * c.dim..(r + 1) * c.dim, r * sw..(r + 1) * sw);
        if k == 0 {
            assert_eq!(bits(&table[row.clone()]), bits(&c.table[row]), "row {r}");
            assert_eq!(bits(&state[srow.clone()]), bits(&state0[srow]), "state {r}");
        } else {
            // The decay term is one more (rounded) addend of the gradient.
            let g_tol = sum_tol(k + usize::from(wd != 0.0));
            let t_tol = lr * sensitivity * g_tol + 1e-6;
            assert_close("table", &table[row.clone()], &etable[row], t_tol, 1e-6);
            // |g| <= k, so the error of g^2 is at most about 2 k times that of g.
            let s_tol = 2.0 * k as f32 * g_tol;
            assert_close("state", &state[srow.clone()], &estate[srow], s_tol, 1e-6);
        }
    }
}

fn check_update(c: &BagCase, opt: SparseOptimizer, wd: f32) {
    check_update_from(c, opt, wd, initial_state(c, opt), 4.0);
}

/// Dense vector lengths: empty, tiny, around the lane widths, and past one parallel chunk.
fn dense_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![0usize, 1, 7, 8, 15, 16, 17, 31, 33, 100, 1000, 16_385]),
        1 => 0usize..40_000,
    ]
}

fn dense(isa: Isa, len: usize, seed: u64, adagrad: bool, par: Par) -> (Vec<f32>, Vec<f32>) {
    let (mut p, g) = (fill(len, seed), fill(len, seed ^ 1));
    let mut s = fill_range(len, seed ^ 2, 0.0, 1.0);
    if adagrad {
        optim::adagrad_update_with_isa(isa, &mut p, &g, &mut s, 0.1, 1e-10, par);
    } else {
        optim::sgd_update_with_isa(isa, &mut p, &g, 0.1, par);
    }
    (p, s)
}

proptest! {
    // Half the cases of a single path: every case runs on each ISA of `isas()`.
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn backward_update_matches_reference(c in bag_case(), opt in optimizer(), wd in weight_decay()) {
        check_update(&c, opt, wd);
    }

    #[test]
    fn backward_update_is_thread_count_invariant(
        c in bag_case(),
        opt in optimizer(),
        wd in weight_decay(),
    ) {
        for isa in isas() {
            let [one, two, three] = on_1_2_3_threads(|par| {
                let (t, s) = update(isa, &c, opt, wd, &mut SparseGradWorkspace::default(), par);
                (bits(&t), bits(&s))
            });
            prop_assert_eq!(&one, &two);
            prop_assert_eq!(&one, &three);
        }
    }

    /// The fused update is the coalesced gradient put through the dense update of each row.
    #[test]
    fn backward_update_applies_the_coalesced_gradient(c in bag_case(), adagrad in any::<bool>()) {
        let opt = if adagrad {
            SparseOptimizer::Adagrad { lr: 0.1, eps: 1e-10 }
        } else {
            SparseOptimizer::Sgd { lr: 0.1 }
        };
        for isa in isas() {
            let mut ws = SparseGradWorkspace::default();
            let (table, state) = update(isa, &c, opt, 0.0, &mut ws, Par::Rayon);
            let (mut etable, mut estate) = (c.table.clone(), initial_state(&c, opt));
            let grad_out = MatRef::with_row_stride(&c.grad_out, c.bags().len(), c.dim, c.stride);
            let g = embedding_bag_backward_coalesce_with_isa(
                isa, c.rows, c.bags(), c.pooling, grad_out, &mut ws, Par::Rayon);
            let d = c.dim;
            for (&r, g) in g.rows.iter().zip(g.grads.chunks(d)) {
                let row = r as usize * d..(r as usize + 1) * d;
                if adagrad {
                    let (p, s) = (&mut etable[row.clone()], &mut estate[row]);
                    optim::adagrad_update_with_isa(isa, p, g, s, 0.1, 1e-10, Par::Rayon);
                } else {
                    optim::sgd_update_with_isa(isa, &mut etable[row], g, 0.1, Par::Rayon);
                }
            }
            prop_assert_eq!(bits(&table), bits(&etable));
            prop_assert_eq!(bits(&state), bits(&estate));
        }
    }

    #[test]
    fn dense_updates_match_reference(
        len in dense_len(),
        seed in any::<u64>(),
        adagrad in any::<bool>(),
    ) {
        let (mut ep, eg) = (fill(len, seed), fill(len, seed ^ 1));
        let mut es = fill_range(len, seed ^ 2, 0.0, 1.0);
        if adagrad {
            reference::adagrad_update(&mut ep, &eg, &mut es, 0.1, 1e-10);
        } else {
            reference::sgd_update(&mut ep, &eg, 0.1);
        }
        for isa in isas() {
            let (p, s) = dense(isa, len, seed, adagrad, Par::Rayon);
            if adagrad {
                assert_close("state", &s, &es, 1e-6, 1e-6);
            }
            assert_close("param", &p, &ep, 1e-6, 1e-6);
        }
    }

    #[test]
    fn dense_updates_are_thread_count_invariant(
        len in dense_len(),
        seed in any::<u64>(),
        adagrad in any::<bool>(),
    ) {
        for isa in isas() {
            let [one, two, three] = on_1_2_3_threads(|par| {
                let (p, s) = dense(isa, len, seed, adagrad, par);
                (bits(&p), bits(&s))
            });
            prop_assert_eq!(&one, &two);
            prop_assert_eq!(&one, &three);
        }
    }
}

/// The first step from a zero state (Adagrad's step is then lr * g / |g|), on problems whose
/// summed gradients are all far from zero.
#[test]
fn first_step_from_zero_state_matches_reference() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut checked = 0;
    while checked < 16 {
        let c = bag_case().new_tree(&mut runner).unwrap().current();
        let mut ws = SparseGradWorkspace::default();
        let g = embedding_bag_backward_coalesce(
            c.rows,
            c.bags(),
            c.pooling,
            MatRef::with_row_stride(&c.grad_out, c.bags().len(), c.dim, c.stride),
            &mut ws,
            Par::Rayon,
        );
        if g.grads.is_empty() || g.grads.iter().any(|x| x.abs() < 1e-2) {
            continue;
        }
        checked += 1;
        for opt in [
            SparseOptimizer::Adagrad {
                lr: 0.1,
                eps: 1e-10,
            },
            SparseOptimizer::RowwiseAdagrad {
                lr: 0.1,
                eps: 1e-10,
            },
        ] {
            // The step moves by at most about 2 / |g| per unit of g (elementwise) or
            // 2 / sqrt(mean g^2) (row-wise): below 200 here.
            let state0 = vec![0.0; c.rows * opt.state_width(c.dim)];
            check_update_from(&c, opt, 0.0, state0, 200.0);
        }
    }
}

#[test]
fn state_widths() {
    let lr = 0.1;
    assert_eq!(SparseOptimizer::Sgd { lr }.state_width(7), 0);
    assert_eq!(SparseOptimizer::Adagrad { lr, eps: 0.0 }.state_width(7), 7);
    assert_eq!(
        SparseOptimizer::RowwiseAdagrad { lr, eps: 0.0 }.state_width(7),
        1
    );
}

/// Every distinct row is updated once per call: a row looked up k times in one call moves
/// like a row looked up once with k times the gradient, for every optimizer.
#[test]
fn duplicates_update_a_row_once() {
    let dim = 16;
    let grad_out = fill(dim, 3);
    let tripled: Vec<f32> = grad_out.iter().map(|g| 3.0 * g).collect();
    for opt in [
        SparseOptimizer::Sgd { lr: 0.5 },
        SparseOptimizer::Adagrad {
            lr: 0.5,
            eps: 1e-10,
        },
        SparseOptimizer::RowwiseAdagrad {
            lr: 0.5,
            eps: 1e-10,
        },
    ] {
        let run = |indices: &[u32], g: &[f32]| {
            let mut table = fill(4 * dim, 1);
            let mut state = vec![0.0; 4 * opt.state_width(dim)];
            let bags = dlrm_kernels::embedding::Bags::with_offsets(indices, &[0]);
            optim::embedding_bag_backward_update(
                TableMut {
                    weights: MatMut::from_rows(&mut table, dim),
                    state: &mut state,
                },
                bags,
                dlrm_kernels::embedding::Pooling::Sum,
                MatRef::new(g, bags.len(), dim),
                opt.into(),
                &mut SparseGradWorkspace::default(),
                Par::Rayon,
            );
            (table, state)
        };
        let (t3, s3) = run(&[2, 2, 2], &grad_out);
        let (t1, s1) = run(&[2], &tripled);
        assert_close("table", &t3, &t1, 1e-6, 1e-6);
        assert_close("state", &s3, &s1, 1e-6, 1e-6);
    }
}

#[test]
#[should_panic(expected = "state has")]
fn update_rejects_a_state_of_the_wrong_size() {
    let mut table = vec![0.0; 8];
    let bags = dlrm_kernels::embedding::Bags::with_offsets(&[0], &[0]);
    optim::embedding_bag_backward_update(
        TableMut {
            weights: MatMut::from_rows(&mut table, 4),
            state: &mut [0.0; 3],
        },
        bags,
        dlrm_kernels::embedding::Pooling::Sum,
        MatRef::new(&[0.0; 4], bags.len(), 4),
        SparseOptimizer::RowwiseAdagrad { lr: 0.1, eps: 0.0 }.into(),
        &mut SparseGradWorkspace::default(),
        Par::Rayon,
    );
}
