//! Split-BF16 embedding kernels on every ISA this CPU supports: the split and join are exact
//! inverses; the forward equals its scalar twin within f32 summation error, and gives the same
//! bits on every ISA and thread count; the fused update of the halves is bit for bit the f32
//! table's update (split), for each sparse optimizer, with and without weight decay.

mod common;

use common::{BagCase, assert_close, bag_case, bits, fill_range, on_1_2_3_threads, sum_tol};
use dlrm_kernels::bf16::Isa;
use dlrm_kernels::embedding::bf16::{
    SplitTable, SplitTableMut, embedding_bag_backward_update_split, embedding_bag_forward_split,
    join_f32_slice, split_f32_slice,
};
use dlrm_kernels::embedding::{Pooling, SparseGradWorkspace};
use dlrm_kernels::mat::{MatMut, MatRef};
use dlrm_kernels::optim::{self, SparseOptimizer, SparseStep, TableMut};
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

fn optimizer() -> impl Strategy<Value = SparseOptimizer> {
    (0u8..3, prop::sample::select(vec![0.01f32, 0.1, 0.5])).prop_map(|(k, lr)| match k {
        0 => SparseOptimizer::Sgd { lr },
        1 => SparseOptimizer::Adagrad { lr, eps: 1e-10 },
        _ => SparseOptimizer::RowwiseAdagrad { lr, eps: 1e-8 },
    })
}

/// The forward of the case's table (its upper halves) on `isa`, into rows `stride` apart.
fn forward(c: &BagCase, hi: &[u16], tables: usize, isa: Isa, par: Par) -> Vec<f32> {
    let n = c.num_bags();
    let cols = tables * c.dim;
    let stride = cols + c.stride - c.dim;
    let mut out = vec![f32::NAN; n * stride];
    let out_mut = MatMut::with_row_stride(&mut out, n, cols, stride);
    let lookup = |_| (SplitTable::new(hi, c.dim), c.bags());
    embedding_bag_forward_split(tables, lookup, c.pooling, out_mut, isa, par);
    out
}

/// (hi, lo, state) after one fused update of the split case table on `isa`.
fn split_update(
    c: &BagCase,
    step: SparseStep,
    state0: &[f32],
    isa: Isa,
    par: Par,
) -> (Vec<u16>, Vec<u16>, Vec<f32>) {
    let (mut hi, mut lo) = reference::split_f32(&c.table);
    let mut state = state0.to_vec();
    let table = SplitTableMut {
        hi: &mut hi,
        lo: &mut lo,
        dim: c.dim,
        state: &mut state,
    };
    let grad_out = MatRef::with_row_stride(&c.grad_out, c.num_bags(), c.dim, c.stride);
    let ws = &mut SparseGradWorkspace::default();
    embedding_bag_backward_update_split(table, c.bags(), c.pooling, grad_out, step, ws, isa, par);
    (hi, lo, state)
}

/// (table, state) after the f32 table's fused update.
/// The f32 update on `isa` (whose vector width decides whether multiply-adds are fused).
fn fp32_update(c: &BagCase, step: SparseStep, state0: &[f32], isa: Isa) -> (Vec<f32>, Vec<f32>) {
    let (mut table, mut state) = (c.table.clone(), state0.to_vec());
    let t = TableMut {
        weights: MatMut::from_rows(&mut table, c.dim),
        state: &mut state,
    };
    let grad_out = MatRef::with_row_stride(&c.grad_out, c.num_bags(), c.dim, c.stride);
    let ws = &mut SparseGradWorkspace::default();
    let bags = c.bags();
    optim::embedding_bag_backward_update_with_isa(
        isa,
        t,
        bags,
        c.pooling,
        grad_out,
        step,
        ws,
        Par::Rayon,
    );
    (table, state)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Split then join gives back every bit pattern (NaNs, infinities, subnormals included),
    /// and the halves are the upper and lower 16 bits.
    #[test]
    fn split_and_join_are_exact(words in prop::collection::vec(any::<u32>(), 0..70)) {
        let src: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
        let (want_hi, want_lo) = reference::split_f32(&src);
        for isa in Isa::all_supported() {
            let (mut hi, mut lo) = (vec![0u16; src.len()], vec![0u16; src.len()]);
            split_f32_slice(&src, &mut hi, &mut lo, isa);
            prop_assert_eq!(&hi, &want_hi, "{:?}", isa);
            prop_assert_eq!(&lo, &want_lo, "{:?}", isa);
            let mut back = vec![0.0f32; src.len()];
            join_f32_slice(&hi, &lo, &mut back, isa);
            prop_assert_eq!(bits(&back), words.clone(), "{:?}", isa);
        }
    }

    /// The forward of the bf16 rows: within the summation error of the f64 twin, on two
    /// tables sharing output rows, and the same bits on every ISA and thread count.
    #[test]
    fn forward_matches_twin_on_every_isa(c in bag_case()) {
        let (hi, _) = reference::split_f32(&c.table);
        let n = c.num_bags();
        let cols = 2 * c.dim;
        let stride = cols + c.stride - c.dim;
        let mut want = vec![0.0f32; n * stride];
        reference::embedding_bag_forward_split(&hi, c.dim, c.bags(), c.pooling, &mut want, stride);
        let max_bag = (0..n).map(|b| c.bags().bag(b).len()).max().unwrap_or(0);
        let first = forward(&c, &hi, 2, Isa::Portable, Par::Seq);
        for b in 0..n {
            for t in 0..2 {
                let got = &first[b * stride + t * c.dim..][..c.dim];
                let e = &want[b * stride..][..c.dim];
                assert_close("forward", got, e, sum_tol(max_bag), 1e-6);
            }
        }
        for isa in Isa::all_supported() {
            for out in on_1_2_3_threads(|par| forward(&c, &hi, 2, isa, par)) {
                prop_assert_eq!(bits(&out), bits(&first), "{:?}", isa);
            }
        }
    }

    /// The split update equals the f32 update bit for bit (halves joined), state included, on
    /// every ISA and thread count; and rows never looked up keep their halves.
    #[test]
    fn split_update_is_the_fp32_update(
        c in bag_case(),
        opt in optimizer(),
        wd in prop_oneof![Just(0.0f32), Just(0.01f32)],
    ) {
        let step = SparseStep { opt, weight_decay: wd };
        let state0 = fill_range(c.rows * opt.state_width(c.dim), c.seed ^ 11, 0.1, 1.1);
        for isa in Isa::all_supported() {
            let (want_table, want_state) = fp32_update(&c, step, &state0, isa);
            for (hi, lo, state) in on_1_2_3_threads(|par| split_update(&c, step, &state0, isa, par)) {
                prop_assert_eq!(bits(&reference::join_f32(&hi, &lo)), bits(&want_table), "{:?}", isa);
                prop_assert_eq!(bits(&state), bits(&want_state), "{:?}", isa);
            }
        }
        // The twin (f64 arithmetic) agrees within the f32 update's rounding.
        let (want_table, _) = fp32_update(&c, step, &state0, Isa::selected());
        let (mut hi, mut lo) = reference::split_f32(&c.table);
        let mut state = state0.clone();
        let grad_out = MatRef::with_row_stride(&c.grad_out, c.num_bags(), c.dim, c.stride);
        reference::embedding_bag_backward_update_split(
            (&mut hi, &mut lo, c.dim), &mut state, c.bags(), c.pooling, grad_out, step,
        );
        let max_k = c.lookups().into_iter().max().unwrap_or(0);
        let tol = 4.0 * sum_tol(max_k + 1) + 1e-6;
        assert_close("twin", &want_table, &reference::join_f32(&hi, &lo), tol, 1e-5);
    }
}

/// A one-hot, unweighted bag pools to its row exactly: the bf16 row widened (-0.0 kept).
#[test]
fn one_row_bag_is_the_widened_row() {
    let table = [-0.0f32, 1.0 + f32::EPSILON, -3.5e-20, f32::MAX, 7.0];
    let (hi, _) = reference::split_f32(&table);
    let bags = dlrm_kernels::embedding::Bags::one_hot(&[0u32]);
    for isa in Isa::all_supported() {
        let mut out = vec![0.0f32; 5];
        embedding_bag_forward_split(
            1,
            |_| (SplitTable::new(&hi, 5), bags),
            Pooling::Sum,
            MatMut::from_rows(&mut out, 5),
            isa,
            Par::Seq,
        );
        let want: Vec<u32> = hi.iter().map(|&h| u32::from(h) << 16).collect();
        assert_eq!(bits(&out), want, "{isa:?}");
    }
}
