//! Embedding-bag kernels against their scalar twins: forward (sum, mean, weighted; empty bags,
//! repeated ids, widths around the lane count and the specialised widths), the plain row
//! gather, the per-sample weight gradient and the coalesced backward; bit-identical results
//! for any thread count.

mod common;

use common::{BagCase, assert_close, bag_case, bits, fill, isas, on_1_2_3_threads, sum_tol};
use dlrm_kernels::embedding::{
    self, BagError, Bags, Pooling, SparseGradWorkspace, embedding_bag_backward_coalesce,
};
use dlrm_kernels::isa::Isa;
use dlrm_kernels::mat::{MatMut, MatRef};
use dlrm_kernels::parallel::Par;
use dlrm_kernels::reference;
use proptest::prelude::*;

/// Forward into a NaN-filled strided buffer (padding must stay NaN).
fn forward(isa: Isa, c: &BagCase, par: Par) -> Vec<f32> {
    let mut out = vec![f32::NAN; c.strided_len()];
    embedding::embedding_bag_forward_with_isa(
        isa,
        MatRef::from_rows(&c.table, c.dim),
        c.bags(),
        c.pooling,
        MatMut::with_row_stride(&mut out, c.bags().len(), c.dim, c.stride),
        par,
    );
    out
}

/// Every looked-up row copied into a NaN-filled strided buffer, one row per index.
fn gather(isa: Isa, c: &BagCase, par: Par) -> Vec<f32> {
    let mut out = vec![f32::NAN; gathered_len(c)];
    embedding::gather_rows_with_isa(
        isa,
        MatRef::from_rows(&c.table, c.dim),
        &c.indices,
        MatMut::with_row_stride(&mut out, c.indices.len(), c.dim, c.stride),
        par,
    );
    out
}

fn gathered_len(c: &BagCase) -> usize {
    c.indices
        .len()
        .checked_sub(1)
        .map_or(0, |n| n * c.stride + c.dim)
}

fn check_gather(c: &BagCase) {
    let mut expect = vec![f32::NAN; gathered_len(c)];
    reference::gather_rows(&c.table, c.dim, &c.indices, &mut expect, c.stride);
    // A copy is exact, and the padding between rows stays NaN.
    for isa in isas() {
        assert_eq!(bits(&gather(isa, c, Par::Rayon)), bits(&expect), "{isa:?}");
    }
}

fn weight_grad(isa: Isa, c: &BagCase, par: Par) -> Vec<f32> {
    let mut gw = vec![f32::NAN; c.indices.len()];
    embedding::embedding_bag_weight_grad_with_isa(
        isa,
        MatRef::from_rows(&c.table, c.dim),
        c.bags(),
        MatRef::with_row_stride(&c.grad_out, c.bags().len(), c.dim, c.stride),
        &mut gw,
        par,
    );
    gw
}

fn coalesce(isa: Isa, c: &BagCase, ws: &mut SparseGradWorkspace, par: Par) -> (Vec<u32>, Vec<f32>) {
    let g = embedding::embedding_bag_backward_coalesce_with_isa(
        isa,
        c.rows,
        c.bags(),
        c.pooling,
        MatRef::with_row_stride(&c.grad_out, c.bags().len(), c.dim, c.stride),
        ws,
        par,
    );
    (g.rows.to_vec(), g.grads.to_vec())
}

fn check_forward(c: &BagCase) {
    let mut expect = vec![f32::NAN; c.strided_len()];
    reference::embedding_bag_forward(&c.table, c.dim, c.bags(), c.pooling, &mut expect, c.stride);
    for isa in isas() {
        let out = forward(isa, c, Par::Rayon);
        for b in 0..c.num_bags() {
            let row = b * c.stride..b * c.stride + c.dim;
            let tol = sum_tol(c.bags().bag(b).len());
            assert_close("out", &out[row.clone()], &expect[row], tol, 0.0);
            if b + 1 < c.num_bags() {
                let pad = b * c.stride + c.dim..(b + 1) * c.stride;
                assert!(
                    out[pad].iter().all(|x| x.is_nan()),
                    "{isa:?}: padding written"
                );
            }
        }
    }
}

/// Each coalesced row within the rounding of the sum of its lookups' gradients.
fn check_grads(c: &BagCase, rows: &[u32], grads: &[f32], expect: &[f32]) {
    let lookups = c.lookups();
    for (i, &r) in rows.iter().enumerate() {
        let g = i * c.dim..(i + 1) * c.dim;
        let tol = sum_tol(lookups[r as usize]);
        assert_close("grads", &grads[g.clone()], &expect[g], tol, 0.0);
    }
}

proptest! {
    // Half the cases of a single path: every case runs on each ISA of `isas()`.
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn forward_matches_reference(c in bag_case()) {
        check_forward(&c);
    }

    #[test]
    fn gather_rows_matches_reference(c in bag_case()) {
        check_gather(&c);
    }

    #[test]
    fn weight_grad_matches_reference(c in bag_case()) {
        let mut expect = vec![0.0; c.indices.len()];
        let (t, g) = (&c.table, &c.grad_out);
        reference::embedding_bag_weight_grad(t, c.dim, c.bags(), g, c.stride, &mut expect);
        for isa in isas() {
            let gw = weight_grad(isa, &c, Par::Rayon);
            // A dim-long dot product of values in [-1, 1].
            assert_close("grad_weights", &gw, &expect, sum_tol(c.dim), 0.0);
        }
    }

    #[test]
    fn coalesce_matches_reference(c in bag_case()) {
        let (erows, egrads) = reference::embedding_bag_backward_coalesce(
            c.rows, c.dim, c.bags(), c.pooling, &c.grad_out, c.stride);
        for isa in isas() {
            let mut ws = SparseGradWorkspace::default();
            let (rows, grads) = coalesce(isa, &c, &mut ws, Par::Rayon);
            prop_assert_eq!(&rows, &erows);
            check_grads(&c, &rows, &grads, &egrads);
            // The workspace, reused on another problem and then on this one, gives the same.
            let mut other = c.clone();
            other.indices.reverse();
            other.grad_out.iter_mut().for_each(|g| *g = -*g);
            coalesce(isa, &other, &mut ws, Par::Rayon);
            let (rows2, grads2) = coalesce(isa, &c, &mut ws, Par::Rayon);
            prop_assert_eq!(rows2, rows);
            prop_assert_eq!(bits(&grads2), bits(&grads));
        }
    }

    #[test]
    fn kernels_are_thread_count_invariant(c in bag_case()) {
        for isa in isas() {
            let [one, two, three] = on_1_2_3_threads(|par| {
                let (rows, grads) = coalesce(isa, &c, &mut SparseGradWorkspace::default(), par);
                let outputs =
                    [forward(isa, &c, par), weight_grad(isa, &c, par), gather(isa, &c, par)];
                (outputs.map(|o| bits(&o)), rows, bits(&grads))
            });
            prop_assert_eq!(&one, &two);
            prop_assert_eq!(&one, &three);
        }
    }
}

/// A bag case with the given shape, bag sizes and ids drawn from `id_range`.
fn case_with(
    rows: usize,
    dim: usize,
    sizes: &[usize],
    id_range: usize,
    pooling: Pooling,
    seed: u64,
) -> BagCase {
    let mut offsets = Vec::new();
    let mut nnz = 0;
    for &s in sizes {
        offsets.push(nnz as u32);
        nnz += s;
    }
    let indices = common::fill_range(nnz, seed, 0.0, id_range as f32)
        .into_iter()
        .map(|x| (x as usize).min(id_range - 1) as u32)
        .collect();
    BagCase {
        rows,
        dim,
        offsets,
        indices,
        weights: None,
        pooling,
        stride: dim,
        table: fill(rows * dim, seed ^ 1),
        grad_out: fill(sizes.len() * dim, seed ^ 2),
        seed,
    }
}

/// Sizes past the parallel threshold, on the pool's own path (not forced), every pooling.
#[test]
fn large_problems_match_reference() {
    for (dim, pooling) in [(64, Pooling::Sum), (128, Pooling::Mean), (37, Pooling::Sum)] {
        let sizes: Vec<usize> = (0..3000).map(|b| b % 5).collect();
        let c = case_with(20_000, dim, &sizes, 20_000, pooling, dim as u64);
        check_forward(&c);
        check_gather(&c);
        let (erows, egrads) = reference::embedding_bag_backward_coalesce(
            c.rows,
            c.dim,
            c.bags(),
            c.pooling,
            &c.grad_out,
            c.stride,
        );
        for isa in isas() {
            let mut ws = SparseGradWorkspace::default();
            let (rows, grads) = coalesce(isa, &c, &mut ws, Par::Rayon);
            assert_eq!(rows, erows);
            check_grads(&c, &rows, &grads, &egrads);
        }
    }
}

/// Duplicates are summed in position (batch) order: with unit weights the coalesced gradient
/// is exactly the f32 sum taken in that order.
#[test]
fn duplicates_are_summed_in_batch_order() {
    let sizes: Vec<usize> = (0..200).map(|b| 1 + b % 4).collect();
    let c = case_with(5, 33, &sizes, 5, Pooling::Sum, 9);
    let mut expect = vec![vec![0.0f32; c.dim]; c.rows];
    for b in 0..c.num_bags() {
        for p in c.bags().bag(b) {
            let row = &mut expect[c.indices[p] as usize];
            for (e, g) in row.iter_mut().zip(&c.grad_out[b * c.dim..(b + 1) * c.dim]) {
                *e += g;
            }
        }
    }
    for isa in isas() {
        let mut ws = SparseGradWorkspace::default();
        let (rows, grads) = coalesce(isa, &c, &mut ws, Par::Rayon);
        for (i, &r) in rows.iter().enumerate() {
            assert_eq!(
                bits(&grads[i * c.dim..(i + 1) * c.dim]),
                bits(&expect[r as usize]),
                "{isa:?}: row {r}"
            );
        }
    }
}

/// Ids spread over ranges of every width up to the whole u32 range (so the radix sort runs
/// one to four passes of digits of every width, on few and on many keys) group exactly as the
/// same ids renumbered densely in the same order.
#[test]
fn coalesce_handles_ids_of_every_magnitude() {
    for bags in [500, 6000] {
        let sizes: Vec<usize> = (0..bags).map(|b| b % 4).collect();
        let small = case_with(300, 5, &sizes, 300, Pooling::Sum, 4);
        let (rows_small, grads_small) = coalesce(
            Isa::selected(),
            &small,
            &mut SparseGradWorkspace::default(),
            Par::Rayon,
        );
        for top in [
            1u32 << 9,
            1 << 13,
            1 << 20,
            1 << 24,
            (1 << 25) + 1,
            u32::MAX,
        ] {
            // An increasing map 0..300 -> 7..=top, with shared low digits.
            let m = (top - 7) / 300;
            let spread = |id: u32| id * m + (id % 3) * (m / 3) + 7;
            let big_ids: Vec<u32> = small.indices.iter().map(|&i| spread(i)).collect();
            let big =
                Bags::with_offsets(&big_ids, &small.offsets).with_weights(small.weights.as_deref());
            let mut ws = SparseGradWorkspace::default();
            let g = embedding_bag_backward_coalesce(
                1 << 32,
                big,
                small.pooling,
                MatRef::with_row_stride(&small.grad_out, big.len(), small.dim, small.stride),
                &mut ws,
                Par::Rayon,
            );
            let mapped: Vec<u32> = rows_small.iter().map(|&r| spread(r)).collect();
            assert_eq!(g.rows, &mapped[..], "{bags} bags, ids up to {top}");
            assert_eq!(
                bits(g.grads),
                bits(&grads_small),
                "{bags} bags, ids up to {top}"
            );
        }
    }
}

#[test]
fn no_bags_and_empty_bags() {
    let table = fill(4 * 16, 1);
    let mut out: Vec<f32> = vec![];
    let none = Bags::with_offsets(&[], &[]);
    embedding::embedding_bag_forward(
        MatRef::from_rows(&table, 16),
        none,
        Pooling::Mean,
        MatMut::new(&mut out, none.len(), 16),
        Par::Rayon,
    );
    let empty = Bags::with_offsets(&[], &[0, 0, 0]);
    let mut out = vec![f32::NAN; 3 * 16];
    embedding::embedding_bag_forward(
        MatRef::from_rows(&table, 16),
        empty,
        Pooling::Mean,
        MatMut::new(&mut out, empty.len(), 16),
        Par::Rayon,
    );
    assert!(out.iter().all(|&x| x == 0.0));
    let mut ws = SparseGradWorkspace::default();
    let g = embedding_bag_backward_coalesce(
        4,
        empty,
        Pooling::Mean,
        MatRef::new(&out, empty.len(), 16),
        &mut ws,
        Par::Rayon,
    );
    assert!(g.rows.is_empty() && g.grads.is_empty());
}

#[test]
#[should_panic(expected = "out of range")]
fn forward_rejects_an_id_past_the_table() {
    let table = fill(4 * 8, 1);
    let bags = Bags::with_offsets(&[1, 4], &[0]);
    let mut out = vec![0.0; 8];
    embedding::embedding_bag_forward(
        MatRef::from_rows(&table, 8),
        bags,
        Pooling::Sum,
        MatMut::new(&mut out, bags.len(), 8),
        Par::Rayon,
    );
}

#[test]
#[should_panic(expected = "gather_rows: row id 4 out of range for a table of 4 rows")]
fn gather_rejects_an_id_past_the_table() {
    let table = fill(4 * 8, 1);
    let mut out = vec![0.0; 16];
    embedding::gather_rows(
        MatRef::from_rows(&table, 8),
        &[1, 4],
        MatMut::new(&mut out, 2, 8),
        Par::Rayon,
    );
}

#[test]
#[should_panic(expected = "out of range")]
fn backward_rejects_an_id_past_the_table() {
    let bags = Bags::with_offsets(&[3, 2], &[0, 1]);
    let grad = vec![0.0; 16];
    embedding_bag_backward_coalesce(
        3,
        bags,
        Pooling::Sum,
        MatRef::new(&grad, bags.len(), 8),
        &mut Default::default(),
        Par::Rayon,
    );
}

#[test]
#[should_panic(expected = "Pooling::Sum")]
fn weights_need_sum_pooling() {
    let table = fill(4 * 8, 1);
    let bags = Bags::with_offsets(&[1], &[0]).with_weights(Some(&[0.5]));
    let mut out = vec![0.0; 8];
    embedding::embedding_bag_forward(
        MatRef::from_rows(&table, 8),
        bags,
        Pooling::Mean,
        MatMut::new(&mut out, bags.len(), 8),
        Par::Rayon,
    );
}

#[test]
fn bag_ranges_follow_pytorch() {
    let bags = Bags::with_offsets(&[5, 6, 7, 8], &[0, 2, 2]);
    assert_eq!(bags.len(), 3);
    assert!(!bags.is_empty());
    assert_eq!(
        (0..3).map(|b| bags.bag(b)).collect::<Vec<_>>(),
        [0..2, 2..2, 2..4]
    );
}

/// Bags marked one-hot (Criteo's one-hot features) are pooled by a row copy; that copy must
/// give the bits of the accumulating path, which one-id bags given by offsets take (and which
/// pools a bag of one row to exactly that row, -0.0 included), whichever threads take which
/// bags.
#[test]
fn one_id_bags_pool_to_their_rows_on_every_path() {
    for dim in [1, 5, 16, 17, 64, 130] {
        for pooling in [Pooling::Sum, Pooling::Mean] {
            let rows = 97;
            let mut table = fill(rows * dim, dim as u64);
            table[3 * dim..4 * dim].fill(-0.0);
            let n = 301;
            let indices: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % rows) as u32).collect();
            let one_id_offsets: Vec<u32> = (0..n as u32).collect();
            // The same ids, the last bag holding two of them.
            let mixed: Vec<u32> = (0..n as u32 - 1).collect();
            let stride = dim + 3;
            let run = |offsets: Option<&[u32]>, par: Par| {
                let bags =
                    offsets.map_or(Bags::one_hot(&indices), |o| Bags::with_offsets(&indices, o));
                assert_eq!(bags.is_one_hot(), offsets.is_none());
                let mut out = vec![f32::NAN; (bags.len() - 1) * stride + dim];
                embedding::embedding_bag_forward(
                    MatRef::from_rows(&table, dim),
                    bags,
                    pooling,
                    MatMut::with_row_stride(&mut out, bags.len(), dim, stride),
                    par,
                );
                let mut expect = vec![f32::NAN; out.len()];
                reference::embedding_bag_forward(&table, dim, bags, pooling, &mut expect, stride);
                // The padding between output rows stays NaN; the rows are compared.
                let pad = |v: &[f32]| {
                    v.chunks(stride)
                        .all(|r| r[dim..].iter().all(|x| x.is_nan()))
                };
                assert!(pad(&out));
                let rows = |v: &[f32]| -> Vec<f32> {
                    v.chunks(stride).flat_map(|r| r[..dim].to_vec()).collect()
                };
                (rows(&out), rows(&expect))
            };
            let [one, two, three] = on_1_2_3_threads(|par| {
                let (hot, expect) = run(None, par);
                for (b, &id) in indices.iter().enumerate() {
                    let row = &table[id as usize * dim..][..dim];
                    assert_eq!(bits(&hot[b * dim..][..dim]), bits(row), "dim {dim} bag {b}");
                }
                assert_close("one-hot", &hot, &expect, 0.0, 0.0);
                let (one_id, _) = run(Some(&one_id_offsets), par);
                assert_eq!(bits(&one_id), bits(&hot), "dim {dim}");
                let (mixed_out, expect) = run(Some(&mixed), par);
                assert_close("mixed", &mixed_out, &expect, sum_tol(2), 0.0);
                (bits(&hot), bits(&mixed_out))
            });
            assert_eq!(one, two, "dim {dim}");
            assert_eq!(one, three, "dim {dim}");
        }
    }
}

/// A multi-table forward problem (what the models call): `tables` tables of one width, the
/// same number of bags each, pooled into rows `stride` apart from column `first_col` on.
#[derive(Clone, Debug)]
struct TablesCase {
    tables: Vec<BagCase>,
    dim: usize,
    batch: usize,
    pooling: Pooling,
    first_col: usize,
    stride: usize,
}

/// 1 to 4 tables of 1 to 1000 rows, up to 40 bags of 0 to 6 ids (some tables one-hot, the
/// copy path; some with hot ids), sum, mean or weighted sum, output rows with leading columns
/// and padding.
fn tables_case() -> impl Strategy<Value = TablesCase> {
    (
        1usize..=4,
        prop::sample::select(common::DIMS.to_vec()),
        0usize..40,
        0u8..3,
        0usize..3,
        0usize..3,
        any::<u64>(),
    )
        .prop_map(|(n, dim, batch, mode, first_col, pad, seed)| {
            let pooling = if mode == 1 {
                Pooling::Mean
            } else {
                Pooling::Sum
            };
            let tables = (0..n)
                .map(|t| {
                    let s = seed.wrapping_add(t as u64 * 0x9E37);
                    let rows = [1usize, 2, 3, 7, 50, 1000][(s % 6) as usize];
                    let one_hot = (s >> 8) % 3 == 0;
                    let sizes: Vec<usize> = if one_hot {
                        vec![1; batch]
                    } else {
                        common::fill_range(batch, s ^ 5, 0.0, 7.0)
                            .iter()
                            .map(|&x| x as usize)
                            .collect()
                    };
                    let id_range = if (s >> 16) % 4 == 0 {
                        rows.min(3)
                    } else {
                        rows
                    };
                    let mut c = case_with(rows, dim, &sizes, id_range, pooling, s);
                    if mode == 2 {
                        c.weights = Some(fill(c.indices.len(), s ^ 3));
                    }
                    c
                })
                .collect();
            TablesCase {
                tables,
                dim,
                batch,
                pooling,
                first_col,
                stride: first_col + n * dim + pad,
            }
        })
}

/// The multi-table forward into a NaN-filled buffer (columns it does not own must stay NaN).
fn forward_tables(isa: Isa, c: &TablesCase, par: Par) -> Vec<f32> {
    let (n, dim) = (c.tables.len(), c.dim);
    let span = c.first_col + n * dim;
    let len = c.batch.checked_sub(1).map_or(0, |b| b * c.stride + span);
    let mut out = vec![f32::NAN; len];
    let rows = MatMut::with_row_stride(&mut out, c.batch, span, c.stride);
    embedding::embedding_bag_forward_tables_with_isa(
        isa,
        n,
        |t| {
            (
                MatRef::from_rows(&c.tables[t].table, dim),
                c.tables[t].bags(),
            )
        },
        c.pooling,
        rows.into_cols(c.first_col, n * dim),
        par,
    );
    out
}

proptest! {
    // Half the cases of a single path: every case runs on each ISA of `isas()`.
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Each table's slot of each output row is the scalar twin's pooled bag; every other
    /// column stays untouched; the bits are the same on any thread count; on every ISA.
    #[test]
    fn forward_tables_matches_reference(c in tables_case()) {
        for isa in isas() {
            check_forward_tables(isa, &c)?;
        }
    }
}

fn check_forward_tables(isa: Isa, c: &TablesCase) -> Result<(), TestCaseError> {
    let out = forward_tables(isa, c, Par::Rayon);
    let (dim, stride) = (c.dim, c.stride);
    let mut owned = vec![false; out.len()];
    for (t, table) in c.tables.iter().enumerate() {
        let mut expect = vec![0.0; c.batch * dim];
        reference::embedding_bag_forward(
            &table.table,
            dim,
            table.bags(),
            c.pooling,
            &mut expect,
            dim,
        );
        for b in 0..c.batch {
            let at = b * stride + c.first_col + t * dim;
            let tol = sum_tol(table.bags().bag(b).len());
            assert_close(
                "out",
                &out[at..at + dim],
                &expect[b * dim..][..dim],
                tol,
                0.0,
            );
            owned[at..at + dim].iter_mut().for_each(|o| *o = true);
        }
    }
    for (i, x) in out.iter().enumerate() {
        prop_assert!(
            owned[i] || x.is_nan(),
            "column {} of row {} written",
            i % stride,
            i / stride
        );
    }
    let [one, two, three] = on_1_2_3_threads(|par| bits(&forward_tables(isa, c, par)));
    prop_assert_eq!(&one, &bits(&out));
    prop_assert_eq!(&one, &two);
    prop_assert_eq!(&one, &three);
    prop_assert_eq!(&one, &bits(&forward_tables(isa, c, Par::Seq)));
    Ok(())
}

/// What the checking constructor must say of `ids` in bags delimited by `offsets` (None:
/// one-hot) over a table of `rows` rows, written from the PyTorch convention directly: the
/// first fault in the order offsets (first, then bag by bag), then ids.
fn expected_check(ids: &[u32], offsets: Option<&[u32]>, rows: usize) -> Result<(), BagError> {
    let nnz = ids.len();
    if let Some(offsets) = offsets {
        if offsets.is_empty() && nnz > 0 {
            return Err(BagError::NoBags { nnz });
        }
        if offsets.first().is_some_and(|&o| o != 0) {
            return Err(BagError::FirstOffset { offset: offsets[0] });
        }
        for (bag, &offset) in offsets.iter().enumerate() {
            if bag > 0 && offset < offsets[bag - 1] {
                return Err(BagError::OffsetsDecrease { bag });
            }
            if offset as usize > nnz {
                return Err(BagError::OffsetPastEnd { bag, offset, nnz });
            }
        }
    }
    match ids.iter().position(|&id| id as usize >= rows) {
        Some(position) => Err(BagError::IdOutOfRange {
            position,
            id: ids[position],
            rows,
        }),
        None => Ok(()),
    }
}

/// Valid bags with at most one fault planted: an id at or past the table's end (up to
/// u32::MAX), a first offset past 0, a decreasing offset, an offset past the ids, offsets
/// dropped while ids remain; `one_hot` drops the offsets (and keeps the ids).
fn awkward_bags() -> impl Strategy<Value = (Vec<u32>, Option<Vec<u32>>, usize)> {
    (
        bag_case(),
        0u8..6,
        any::<prop::sample::Index>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(c, fault, at, wild, one_hot)| {
            let (mut ids, mut offsets, rows) = (c.indices, c.offsets, c.rows);
            match fault {
                1 if !ids.is_empty() => {
                    let i = at.index(ids.len());
                    ids[i] = (rows as u32).saturating_add(wild % 3).max(wild);
                }
                2 if !offsets.is_empty() => offsets[0] = 1 + wild % 4,
                3 if offsets.len() > 1 => {
                    let b = 1 + at.index(offsets.len() - 1);
                    offsets[b - 1] = offsets[b] + 1 + wild % 3;
                }
                4 if !offsets.is_empty() => {
                    let b = at.index(offsets.len());
                    offsets[b] = ids.len() as u32 + 1 + wild % 5;
                }
                5 if !ids.is_empty() => offsets.clear(),
                _ => {}
            }
            (ids, (!one_hot).then_some(offsets), rows)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The checking constructor accepts exactly the well-formed bags whose ids are rows, and
    /// names the first fault; one-hot bags are checked the same way without offsets.
    #[test]
    fn checked_constructor_refuses_every_bad_bag((ids, offsets, rows) in awkward_bags()) {
        let expect = expected_check(&ids, offsets.as_deref(), rows);
        let bags = match &offsets {
            Some(o) => Bags::with_offsets(&ids, o),
            None => Bags::one_hot(&ids),
        };
        prop_assert_eq!(bags.check(rows), expect.clone());
        if let Some(o) = &offsets {
            prop_assert_eq!(Bags::new(&ids, o, rows).map(|b| b.len()), expect.map(|()| o.len()));
        }
    }

    /// Checked bags, one-hot and by offsets, through the forward and the backward equal the
    /// scalar twins; one-hot bags (a row copy) and the same bags given by offsets 0..n (the
    /// accumulating path) agree bit for bit, and so do the backward's coalesced gradients.
    #[test]
    fn checked_bags_match_the_scalar_twins(c in bag_case()) {
        let bags = Bags::new(&c.indices, &c.offsets, c.rows).expect("a bag case is valid");
        prop_assert!(!bags.is_one_hot());
        check_forward(&c);
        let n = c.num_bags().min(c.indices.len());
        let ids = &c.indices[..n];
        let one_hot = Bags::one_hot(ids);
        one_hot.check(c.rows).expect("ids of a bag case are rows");
        let unit: Vec<u32> = (0..n as u32).collect();
        let by_offsets = Bags::new(ids, &unit, c.rows).unwrap();
        prop_assert_eq!(one_hot.len(), n);
        let grad = MatRef::with_row_stride(&c.grad_out, n, c.dim, c.stride);
        let run = |bags: Bags| {
            let mut out = vec![f32::NAN; n.checked_sub(1).map_or(0, |m| m * c.stride + c.dim)];
            embedding::embedding_bag_forward(
                MatRef::from_rows(&c.table, c.dim),
                bags,
                c.pooling,
                MatMut::with_row_stride(&mut out, n, c.dim, c.stride),
                Par::Rayon,
            );
            let mut ws = SparseGradWorkspace::default();
            let g = embedding_bag_backward_coalesce(c.rows, bags, c.pooling, grad, &mut ws, Par::Rayon);
            (out, g.rows.to_vec(), g.grads.to_vec())
        };
        let (out, rows, grads) = run(one_hot);
        let mut expect = vec![f32::NAN; out.len()];
        reference::embedding_bag_forward(&c.table, c.dim, one_hot, c.pooling, &mut expect, c.stride);
        prop_assert_eq!(bits(&out), bits(&expect));
        let (erows, egrads) = reference::embedding_bag_backward_coalesce(
            c.rows, c.dim, one_hot, c.pooling, &c.grad_out, c.stride);
        prop_assert_eq!(&rows, &erows);
        let lookups = ids.iter().fold(vec![0; c.rows], |mut l, &id| { l[id as usize] += 1; l });
        for (i, &r) in rows.iter().enumerate() {
            let g = i * c.dim..(i + 1) * c.dim;
            assert_close("grads", &grads[g.clone()], &egrads[g], sum_tol(lookups[r as usize]), 0.0);
        }
        let (out2, rows2, grads2) = run(by_offsets);
        prop_assert_eq!(bits(&out2), bits(&out));
        prop_assert_eq!(rows2, rows);
        prop_assert_eq!(bits(&grads2), bits(&grads));
    }
}
