//! Scalar twins of the split-BF16 embedding kernels: the halves joined into an f32 table,
//! the f32 twins run on it, and the result split again.

use crate::embedding::{Bags, Pooling};
use crate::mat::{MatMut, MatRef};
use crate::optim::{SparseStep, TableMut};

/// The upper and lower 16 bits of each value.
pub fn split_f32(src: &[f32]) -> (Vec<u16>, Vec<u16>) {
    src.iter()
        .map(|x| ((x.to_bits() >> 16) as u16, (x.to_bits() & 0xFFFF) as u16))
        .unzip()
}

/// The values whose upper and lower 16 bits are `hi[i]` and `lo[i]`.
pub fn join_f32(hi: &[u16], lo: &[u16]) -> Vec<f32> {
    hi.iter()
        .zip(lo)
        .map(|(&h, &l)| f32::from_bits((u32::from(h) << 16) | u32::from(l)))
        .collect()
}

/// Twin of [`crate::embedding::bf16::embedding_bag_forward_split`] for one table: the forward
/// of the bf16 rows (`hi`, rows x dim) widened to f32, sums in f64.
pub fn embedding_bag_forward_split(
    hi: &[u16],
    dim: usize,
    bags: Bags,
    pooling: Pooling,
    out: &mut [f32],
    out_stride: usize,
) {
    let table = join_f32(hi, &vec![0; hi.len()]);
    super::embedding_bag_forward(&table, dim, bags, pooling, out, out_stride);
}

/// Twin of [`crate::embedding::bf16::embedding_bag_backward_update_split`]: the f32 twin's
/// update of the joined table, split back into `hi` and `lo`.
pub fn embedding_bag_backward_update_split(
    (hi, lo, dim): (&mut [u16], &mut [u16], usize),
    state: &mut [f32],
    bags: Bags,
    pooling: Pooling,
    grad_out: MatRef,
    step: SparseStep,
) {
    let mut table = join_f32(hi, lo);
    let weights = MatMut::from_rows(&mut table, dim);
    super::embedding_bag_backward_update(
        TableMut { weights, state },
        bags,
        pooling,
        grad_out,
        step,
    );
    let (h, l) = split_f32(&table);
    hi.copy_from_slice(&h);
    lo.copy_from_slice(&l);
}
