//! Random inputs shared by the kernels' property tests: embedding-bag problems here, GEMM
//! problems in [`gemm`].
#![allow(dead_code)]

pub mod gemm;

use dlrm_kernels::embedding::{Bags, Pooling};
use dlrm_kernels::parallel::Par;
use proptest::prelude::*;

/// Deterministic pseudo-random values in [lo, hi).
pub fn fill_range(len: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn fill(len: usize, seed: u64) -> Vec<f32> {
    fill_range(len, seed, -1.0, 1.0)
}

/// Embedding widths: the specialised ones, around them, and generic ones past 128.
pub const DIMS: [usize; 12] = [1, 5, 15, 16, 17, 31, 32, 33, 64, 100, 128, 130];

/// One random problem: a table, bags over it, pooling, and an output gradient.
#[derive(Clone, Debug)]
pub struct BagCase {
    pub rows: usize,
    pub dim: usize,
    pub offsets: Vec<u32>,
    pub indices: Vec<u32>,
    pub weights: Option<Vec<f32>>,
    pub pooling: Pooling,
    /// Floats between consecutive output (and output gradient) rows.
    pub stride: usize,
    pub table: Vec<f32>,
    pub grad_out: Vec<f32>,
    pub seed: u64,
}

impl BagCase {
    pub fn bags(&self) -> Bags<'_> {
        Bags::with_offsets(&self.indices, &self.offsets).with_weights(self.weights.as_deref())
    }

    pub fn num_bags(&self) -> usize {
        self.offsets.len()
    }

    /// How often each table row is looked up.
    pub fn lookups(&self) -> Vec<usize> {
        let mut n = vec![0; self.rows];
        self.indices.iter().for_each(|&i| n[i as usize] += 1);
        n
    }

    /// Length of a buffer of num_bags rows of dim floats, `stride` apart.
    pub fn strided_len(&self) -> usize {
        self.num_bags()
            .checked_sub(1)
            .map_or(0, |n| n * self.stride + self.dim)
    }
}

/// Bags of 0 to 6 ids (so empty bags and repeats within a bag occur), up to 40 bags, over
/// tables of 1 to 1000 rows; `hot` draws every id from the first three rows, so that most ids
/// repeat across bags. Pooling: sum, mean or weighted sum.
pub fn bag_case() -> impl Strategy<Value = BagCase> {
    (
        prop::sample::select(vec![1usize, 2, 3, 7, 50, 1000]),
        prop::sample::select(DIMS.to_vec()),
        prop::collection::vec(0usize..=6, 0..40),
        0u8..3,
        any::<bool>(),
        0usize..3,
        any::<u64>(),
    )
        .prop_map(|(rows, dim, sizes, mode, hot, pad, seed)| {
            let mut offsets = Vec::with_capacity(sizes.len());
            let mut nnz = 0u32;
            for s in &sizes {
                offsets.push(nnz);
                nnz += *s as u32;
            }
            let id_range = if hot { rows.min(3) } else { rows };
            let indices = fill_range(nnz as usize, seed ^ 7, 0.0, id_range as f32)
                .into_iter()
                .map(|x| (x as usize).min(id_range - 1) as u32)
                .collect();
            let pooling = if mode == 1 {
                Pooling::Mean
            } else {
                Pooling::Sum
            };
            let weights = (mode == 2).then(|| fill(nnz as usize, seed ^ 3));
            let stride = dim + pad;
            let n = sizes.len();
            BagCase {
                rows,
                dim,
                offsets,
                indices,
                weights,
                pooling,
                stride,
                table: fill(rows * dim, seed),
                grad_out: fill(n * stride, seed ^ 5),
                seed,
            }
        })
}

/// Runs `f(Par::AlwaysSplit)` on pools of 1, 2 and 3 threads: every kernel that `f` calls
/// with that parallelism takes its parallel path whatever the size of the input, so the three
/// results must be bit-identical.
pub fn on_1_2_3_threads<R: Send>(f: impl Fn(Par) -> R + Sync) -> [R; 3] {
    let pool = |t| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
    };
    let run = || f(Par::AlwaysSplit);
    [
        pool(1).install(run),
        pool(2).install(run),
        pool(3).install(run),
    ]
}

/// The bit patterns of a slice (for exact comparisons that treat NaN as a value).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Bound on the rounding error of an f32 sum (or FMA chain) of `k` terms of magnitude at most
/// 1 against the exact sum: (k - 1) u sum |x_i| with u = eps / 2 (Higham, "Accuracy and
/// Stability of Numerical Algorithms", 2nd ed., section 4.2), with slack for a final division
/// and the rounding of the f64 reference.
pub fn sum_tol(k: usize) -> f32 {
    (k * k) as f32 * f32::EPSILON + 1e-6
}

/// |actual - expected| <= abs + rel * |expected| elementwise.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], abs: f32, rel: f32) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= abs + rel * e.abs(),
            "{what}[{i}] = {a}, reference {e} (tolerance {abs} + {rel}*|e|)"
        );
    }
}

/// One ISA per vector width this CPU runs (portable, then AVX2, then AVX-512 where present):
/// the property tests call every kernel once per path. AVX512-BF16 runs the f32 kernels on
/// the AVX-512 path, so it is not repeated.
pub fn isas() -> Vec<dlrm_kernels::isa::Isa> {
    let mut out: Vec<dlrm_kernels::isa::Isa> = Vec::new();
    for isa in dlrm_kernels::isa::Isa::all_supported() {
        if out
            .last()
            .is_none_or(|last| last.simd_level() != isa.simd_level())
        {
            out.push(isa);
        }
    }
    out
}
