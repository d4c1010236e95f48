//! Optimizer kernels against their scalar twins: the fused embedding backward + update for
//! each sparse optimizer (duplicate ids coalesced, rows never looked up left bit-identical),
//! the dense SGD / Adagrad updates, and bit-identical results for any thread count.

mod common;

use common::{BagCase, assert_close, bag_case, bits, fill, fill_range, on_1_2_3_threads};
use dlrm_kernels::embedding::{SparseGradWorkspace, embedding_bag_backward_coalesce};
use dlrm_kernels::optim::{self, SparseOptimizer};
use dlrm_kernels::reference;
use proptest::prelude::*;

fn optimizer() -> impl Strategy<Value = SparseOptimizer> {
    (0u8..3, prop::sample::select(vec![0.01f32, 0.1, 0.5])).prop_map(|(k, lr)| match k {
        0 => SparseOptimizer::Sgd { lr },
        1 => SparseOptimizer::Adagrad { lr, eps: 1e-10 },
        _ => SparseOptimizer::RowwiseAdagrad { lr, eps: 1e-8 },
    })
}

/// Optimizer state of a table: accumulators in [0, 1), as after some steps.
fn initial_state(c: &BagCase, opt: SparseOptimizer) -> Vec<f32> {
    fill_range(c.rows * opt.state_width(c.dim), c.seed ^ 11, 0.0, 1.0)
}

/// (table, state) after one fused backward + update.
fn update(c: &BagCase, opt: SparseOptimizer, ws: &mut SparseGradWorkspace) -> (Vec<f32>, Vec<f32>) {
    let (mut table, mut state) = (c.table.clone(), initial_state(c, opt));
    optim::embedding_bag_backward_update(
        &mut table,
        &mut state,
        c.dim,
        c.bags(),
        c.pooling,
        &c.grad_out,
        c.stride,
        opt,
        ws,
    );
    (table, state)
}

fn check_update(c: &BagCase, opt: SparseOptimizer) {
    let (table, state) = update(c, opt, &mut SparseGradWorkspace::default());
    let (mut etable, mut estate) = (c.table.clone(), initial_state(c, opt));
    reference::embedding_bag_backward_update(
        &mut etable,
        &mut estate,
        c.dim,
        c.bags(),
        c.pooling,
        &c.grad_out,
        c.stride,
        opt,
    );
    // Adagrad divides by sqrt(state) >= |g|: the rounding of g is amplified where the state
    // is small, hence the looser bound.
    assert_close("table", &table, &etable, 2e-5, 1e-5);
    assert_close("state", &state, &estate, 1e-5, 1e-5);
    let mut looked_up = vec![false; c.rows];
    c.indices.iter().for_each(|&i| looked_up[i as usize] = true);
    let (sw, state0) = (opt.state_width(c.dim), initial_state(c, opt));
    for r in (0..c.rows).filter(|&r| !looked_up[r]) {
        let row = r * c.dim..(r + 1) * c.dim;
        assert_eq!(
            bits(&table[row.clone()]),
            bits(&c.table[row]),
            "row {r} changed"
        );
        let srow = r * sw..(r + 1) * sw;
        assert_eq!(
            bits(&state[srow.clone()]),
            bits(&state0[srow]),
            "state {r} changed"
        );
    }
}

/// Dense vector lengths: empty, tiny, around the lane widths, and past one parallel chunk.
fn dense_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![0usize, 1, 7, 8, 15, 16, 17, 31, 33, 100, 1000, 16_385]),
        1 => 0usize..40_000,
    ]
}

fn dense(len: usize, seed: u64, adagrad: bool) -> (Vec<f32>, Vec<f32>) {
    let (mut p, g) = (fill(len, seed), fill(len, seed ^ 1));
    let mut s = fill_range(len, seed ^ 2, 0.0, 1.0);
    if adagrad {
        optim::adagrad_update(&mut p, &g, &mut s, 0.1, 1e-10);
    } else {
        optim::sgd_update(&mut p, &g, 0.1);
    }
    (p, s)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn backward_update_matches_reference(c in bag_case(), opt in optimizer()) {
        check_update(&c, opt);
    }

    #[test]
    fn backward_update_is_thread_count_invariant(c in bag_case(), opt in optimizer()) {
        let [one, two, three] = on_1_2_3_threads(|| {
            let (t, s) = update(&c, opt, &mut SparseGradWorkspace::default());
            (bits(&t), bits(&s))
        });
        prop_assert_eq!(&one, &two);
        prop_assert_eq!(&one, &three);
    }

    /// The fused update is the coalesced gradient put through the dense update of each row.
    #[test]
    fn backward_update_applies_the_coalesced_gradient(c in bag_case(), adagrad in any::<bool>()) {
        let opt = if adagrad {
            SparseOptimizer::Adagrad { lr: 0.1, eps: 1e-10 }
        } else {
            SparseOptimizer::Sgd { lr: 0.1 }
        };
        let mut ws = SparseGradWorkspace::default();
        let (table, state) = update(&c, opt, &mut ws);
        let (mut etable, mut estate) = (c.table.clone(), initial_state(&c, opt));
        let g = embedding_bag_backward_coalesce(
            c.rows, c.dim, c.bags(), c.pooling, &c.grad_out, c.stride, &mut ws);
        let d = c.dim;
        for (&r, g) in g.rows.iter().zip(g.grads.chunks(d)) {
            let row = r as usize * d..(r as usize + 1) * d;
            if adagrad {
                optim::adagrad_update(&mut etable[row.clone()], g, &mut estate[row], 0.1, 1e-10);
            } else {
                optim::sgd_update(&mut etable[row], g, 0.1);
            }
        }
        prop_assert_eq!(bits(&table), bits(&etable));
        prop_assert_eq!(bits(&state), bits(&estate));
    }

    #[test]
    fn dense_updates_match_reference(
        len in dense_len(),
        seed in any::<u64>(),
        adagrad in any::<bool>(),
    ) {
        let (p, s) = dense(len, seed, adagrad);
        let (mut ep, eg) = (fill(len, seed), fill(len, seed ^ 1));
        let mut es = fill_range(len, seed ^ 2, 0.0, 1.0);
        if adagrad {
            reference::adagrad_update(&mut ep, &eg, &mut es, 0.1, 1e-10);
            assert_close("state", &s, &es, 1e-6, 1e-6);
        } else {
            reference::sgd_update(&mut ep, &eg, 0.1);
        }
        assert_close("param", &p, &ep, 1e-6, 1e-6);
    }

    #[test]
    fn dense_updates_are_thread_count_invariant(
        len in dense_len(),
        seed in any::<u64>(),
        adagrad in any::<bool>(),
    ) {
        let [one, two, three] = on_1_2_3_threads(|| {
            let (p, s) = dense(len, seed, adagrad);
            (bits(&p), bits(&s))
        });
        prop_assert_eq!(&one, &two);
        prop_assert_eq!(&one, &three);
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
            let bags = dlrm_kernels::embedding::Bags {
                indices,
                offsets: &[0],
                weights: None,
            };
            optim::embedding_bag_backward_update(
                &mut table,
                &mut state,
                dim,
                bags,
                dlrm_kernels::embedding::Pooling::Sum,
                g,
                dim,
                opt,
                &mut SparseGradWorkspace::default(),
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
    let bags = dlrm_kernels::embedding::Bags {
        indices: &[0],
        offsets: &[0],
        weights: None,
    };
    optim::embedding_bag_backward_update(
        &mut table,
        &mut [0.0; 3],
        4,
        bags,
        dlrm_kernels::embedding::Pooling::Sum,
        &[0.0; 4],
        4,
        SparseOptimizer::RowwiseAdagrad { lr: 0.1, eps: 0.0 },
        &mut SparseGradWorkspace::default(),
    );
}
