//! Embedding bags: forward (sum / mean / weighted pooling), the gradient of the per-sample
//! weights, and the coalesced sparse gradient of a table (whose fused optimizer update lives in
//! [`crate::optim`]); and a plain row gather ([`gather_rows`]), the forward without its
//! arithmetic, which measures how close the forward comes to the memory system.
//!
//! Bags follow PyTorch's `EmbeddingBag` (include_last_offset = false): bag b is
//! `indices[offsets[b] .. offsets[b + 1]]`, the last bag runs to `indices.len()`.
//!
//! A lookup reads one random row of a table that is usually far larger than the caches, so the
//! forward is bound by memory latency, not arithmetic (Naumov et al. 2019, section 5; Acun et
//! al., "Understanding Training Efficiency of Deep Learning Recommendation Models at Scale",
//! HPCA 2021). Two things matter: the pooled vector stays in registers while a bag's rows
//! stream through (`pool_block`, specialised at compile time for the common widths), and the
//! row `PREFETCH_DISTANCE` ids ahead is requested early so that several misses overlap.
//!
//! Backward: bag b's output gradient is scattered to every row its bag looked up. The
//! positions are sorted by row id with a stable LSD radix sort (only the id digits that vary
//! are sorted, so the cost is O(nnz) and independent of the table's row count), so duplicates
//! form runs in batch order; each run is then pooled like a forward bag, whose "table" is the
//! output gradient. Distinct rows are independent, so threads take contiguous runs of them.

use crate::simd::SimdVec;
use core::ops::Range;

/// How the rows of a bag are reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Sum of the rows (times the per-sample weights, if any).
    Sum,
    /// Sum divided by the bag's size; an empty bag gives zeros.
    Mean,
}

/// Bags in the PyTorch EmbeddingBag convention (include_last_offset = false): bag b is
/// `indices[offsets[b] .. offsets[b+1]]`, the last bag runs to `indices.len()`;
/// `offsets[0] == 0` when there is at least one bag; an empty bag pools to zeros. One-hot bags
/// ([`Bags::one_hot`], Criteo's categorical features) need no offsets: bag b is `indices[b]`,
/// and the kernels copy rows instead of pooling them. `weights` (per index) are PyTorch's
/// per_sample_weights (only with Pooling::Sum, like PyTorch).
///
/// Ids are validated once, by [`Bags::check`] (or the checking constructor [`Bags::new`]),
/// before any work; the kernels do not scan them again. They stay safe on bags that were never
/// checked because every row they read or write through an id is a bounds-checked slice of the
/// table (one compare next to a likely cache miss), and every bag a bounds-checked range of the
/// indices: a bad id or bag panics, it never reads out of bounds nor pools the wrong rows. This
/// was chosen over a checked-only type because the bags of a batch are made per table and call
/// (`Batch::bags`) where the table's row count is not known, and the check is already done by
/// the batch validation the models run first.
#[derive(Clone, Copy, Debug)]
pub struct Bags<'a> {
    indices: &'a [u32],
    /// None: one id per bag.
    offsets: Option<&'a [u32]>,
    weights: Option<&'a [f32]>,
}

/// Why bags were refused by [`Bags::check`]; positions, bags and ids counted from 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BagError {
    /// More indices than u32 positions can address.
    TooManyIndices { nnz: usize },
    /// Indices but no bags to hold them.
    NoBags { nnz: usize },
    /// The first offset is not 0.
    FirstOffset { offset: u32 },
    /// Bag `bag` starts before bag `bag - 1`.
    OffsetsDecrease { bag: usize },
    /// Bag `bag` starts past the end of the indices.
    OffsetPastEnd { bag: usize, offset: u32, nnz: usize },
    /// The id at `position` is not a row of a table of `rows` rows.
    IdOutOfRange {
        position: usize,
        id: u32,
        rows: usize,
    },
}

impl core::fmt::Display for BagError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            BagError::TooManyIndices { nnz } => {
                write!(f, "{nnz} indices do not fit u32 positions")
            }
            BagError::NoBags { nnz } => write!(f, "{nnz} indices but no bags"),
            BagError::FirstOffset { offset } => write!(f, "offsets[0] = {offset}, must be 0"),
            BagError::OffsetsDecrease { bag } => write!(f, "offsets decrease at bag {bag}"),
            BagError::OffsetPastEnd { bag, offset, nnz } => {
                write!(f, "offset {offset} of bag {bag} is past the {nnz} indices")
            }
            BagError::IdOutOfRange { position, id, rows } => write!(
                f,
                "row id {id} out of range for a table of {rows} rows (position {position})"
            ),
        }
    }
}

impl core::error::Error for BagError {}

impl<'a> Bags<'a> {
    /// Bags of one id each: bag b is `indices[b]`.
    pub fn one_hot(indices: &'a [u32]) -> Bags<'a> {
        Bags {
            indices,
            offsets: None,
            weights: None,
        }
    }

    /// Bags delimited by `offsets` (not checked: see [`Bags::check`]).
    pub fn with_offsets(indices: &'a [u32], offsets: &'a [u32]) -> Bags<'a> {
        Bags {
            indices,
            offsets: Some(offsets),
            weights: None,
        }
    }

    /// Bags delimited by `offsets`, checked against a table of `rows` rows.
    pub fn new(indices: &'a [u32], offsets: &'a [u32], rows: usize) -> Result<Bags<'a>, BagError> {
        let bags = Bags::with_offsets(indices, offsets);
        bags.check(rows)?;
        Ok(bags)
    }

    /// These bags with per-sample weights (one per index, PyTorch's optional
    /// per_sample_weights), or without weights for None.
    pub fn with_weights(self, weights: Option<&'a [f32]>) -> Bags<'a> {
        Bags { weights, ..self }
    }

    /// Checks the bag structure and that every id is below `rows`, in one pass over the
    /// offsets and one over the ids: the one validation bags get.
    pub fn check(&self, rows: usize) -> Result<(), BagError> {
        let nnz = self.indices.len();
        if u32::try_from(nnz).is_err() {
            return Err(BagError::TooManyIndices { nnz });
        }
        match self.offsets {
            None => {}
            Some([]) if nnz > 0 => return Err(BagError::NoBags { nnz }),
            Some(&[first, ..]) if first != 0 => {
                return Err(BagError::FirstOffset { offset: first });
            }
            Some(offsets) => {
                let mut prev = 0;
                for (bag, &offset) in offsets.iter().enumerate() {
                    if offset < prev {
                        return Err(BagError::OffsetsDecrease { bag });
                    }
                    if offset as usize > nnz {
                        return Err(BagError::OffsetPastEnd { bag, offset, nnz });
                    }
                    prev = offset;
                }
            }
        }
        // A branch-free max (vectorised) when every id is valid, the usual case; the first
        // bad position is searched for only when there is one.
        let max = self.indices.iter().fold(0, |m: u32, &id| m.max(id));
        if self.indices.is_empty() || (max as usize) < rows {
            return Ok(());
        }
        let position = self
            .indices
            .iter()
            .position(|&id| id as usize >= rows)
            .expect("the largest id is out of range");
        Err(BagError::IdOutOfRange {
            position,
            id: self.indices[position],
            rows,
        })
    }

    /// Number of bags.
    pub fn len(&self) -> usize {
        self.offsets.map_or(self.indices.len(), <[u32]>::len)
    }

    /// Whether there are no bags.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids of all bags, concatenated.
    pub fn indices(&self) -> &'a [u32] {
        self.indices
    }

    /// Where each bag starts in the indices; None for one-hot bags.
    pub fn offsets(&self) -> Option<&'a [u32]> {
        self.offsets
    }

    /// The per-sample weights, one per index.
    pub fn weights(&self) -> Option<&'a [f32]> {
        self.weights
    }

    /// Whether every bag holds exactly one id (and `indices[b]` is bag b's).
    pub fn is_one_hot(&self) -> bool {
        self.offsets.is_none()
    }

    /// The positions (in `indices`) of bag `b`; panics if the offsets do not delimit a
    /// range of the indices (bags that [`Bags::check`] refuses).
    #[inline]
    pub fn bag(&self, b: usize) -> Range<usize> {
        let Some(offsets) = self.offsets else {
            assert!(b < self.indices.len(), "bag {b} of {}", self.indices.len());
            return b..b + 1;
        };
        let start = offsets[b] as usize;
        let end = offsets
            .get(b + 1)
            .map_or(self.indices.len(), |&e| e as usize);
        assert!(
            start <= end && end <= self.indices.len(),
            "bag {b} is {start}..{end} of {} indices",
            self.indices.len()
        );
        start..end
    }

    /// The kernels' entry check, constant time (the ids and offsets are [`Bags::check`]'s):
    /// the bag count, and the weights' count and pooling.
    pub(crate) fn check_shape(&self, pooling: Pooling, who: &str) {
        let nnz = self.indices.len();
        assert!(
            u32::try_from(nnz).is_ok(),
            "{who}: {nnz} indices do not fit u32 positions"
        );
        if let Some(w) = self.weights {
            assert!(
                pooling == Pooling::Sum,
                "{who}: per-sample weights need Pooling::Sum (as in PyTorch)"
            );
            assert_eq!(
                w.len(),
                nnz,
                "{who}: {} per-sample weights for {nnz} indices",
                w.len()
            );
        }
    }

    /// [`Bags::check_shape`] and [`Bags::check`], panicking (programmer errors), for kernels
    /// that still scan their bags once at entry.
    pub(crate) fn assert_valid(&self, rows: usize, pooling: Pooling, who: &str) {
        self.check_shape(pooling, who);
        if let Err(e) = self.check(rows) {
            panic!("{who}: {e}");
        }
    }

    /// The factor applied to the row looked up at position `p` of bag `b`.
    #[inline(always)]
    fn scale(&self, pooling: Pooling, p: usize, b: usize) -> f32 {
        match (pooling, self.weights) {
            (Pooling::Mean, _) => 1.0 / self.bag(b).len() as f32,
            (Pooling::Sum, Some(w)) => w[p],
            (Pooling::Sum, None) => 1.0,
        }
    }
}

/// Ids between the row being accumulated and the row being prefetched. Measured with the
/// forward on a 1 GiB table (4 Mi rows at dim 64, 2 Mi at dim 128; no huge pages), 40 batches
/// of 2048 bags of 20 and of 1 uniform random ids, one thread, on a shared 2-core AVX-512
/// Xeon VM: best of 8 x 9 runs, ns per lookup (distance 0 requests the row being read, i.e. no
/// look-ahead):
///
/// | distance | dim 64, bag 20 | dim 64, bag 1 | dim 128, bag 20 | dim 128, bag 1 |
/// |----------|----------------|---------------|-----------------|----------------|
/// | 0        | 51.7           | 35.6          | 80.2            | 93.2           |
/// | 2        | 51.7           | 58.3          | 73.5            | 57.5           |
/// | 4        | 50.7           | 31.2          | 72.7            | 55.8           |
/// | 6        | 49.5           | 29.3          | 69.3            | 55.1           |
/// | 8        | 49.9           | 29.2          | 68.6            | 55.1           |
/// | 12       | 50.9           | 29.9          | 70.9            | 78.6           |
///
/// Long bags gain little (the loads within a bag are independent, and out-of-order execution
/// already overlaps their misses); one-id bags gain up to 40%. 6 and 8 tie on the minima; 6
/// had the better median (69 vs 81 ns at dim 128, bag 1), and a shorter distance wastes fewer
/// prefetches at the end of a batch.
pub const PREFETCH_DISTANCE: usize = 6;

/// Widest block of vectors the generic path accumulates in registers at once; wider rows are
/// pooled in column blocks of this many vectors, the bag's rows then being in cache for every
/// block but the first.
const GENERIC_NV: usize = 8;

/// Smallest forward / backward (in floats touched) that is split across threads.
const MIN_PARALLEL_FLOATS: usize = 1 << 15;

/// out = (sum over k < n of w_k * `row_k[col .. col + width]`) / div, the NV vectors of the sum
/// held in registers, where `row(k)` gives row k (from its column 0) and w_k, and
/// width = (NV - 1) * LANES + tail, 0 < tail <= LANES. `prefetch(k)` is called before row k is
/// read (to request a row further ahead). Rows are added in k order, with one FMA per
/// element and row after the first, so the bits depend only on the rows and their order.
#[inline(always)]
fn pool_block<'r, V: SimdVec, const NV: usize>(
    n: usize,
    row: &impl Fn(usize) -> (&'r [f32], f32),
    prefetch: &impl Fn(usize),
    col: usize,
    tail: usize,
    div: Option<f32>,
    out: &mut [f32],
) {
    let lanes = V::LANES;
    let width = (NV - 1) * lanes + tail;
    assert!(tail > 0 && tail <= lanes && out.len() == width);
    let mut acc = [V::splat(0.0); NV];
    for k in 0..n {
        prefetch(k);
        let (r, w) = row(k);
        let r = &r[col..col + width];
        let w = V::splat(w);
        for (v, a) in acc.iter_mut().enumerate() {
            // SAFETY: r holds width floats: LANES at v * LANES for v < NV - 1, tail for the
            // last vector.
            let x = unsafe {
                if v + 1 < NV || tail == lanes {
                    V::load(r.as_ptr().add(v * lanes))
                } else {
                    V::load_partial(r.as_ptr().add(v * lanes), tail)
                }
            };
            // The first row is multiplied rather than added to zero, so a bag of one row pools
            // to exactly that row (-0.0 included), as the copy of one-id bags gives it.
            *a = if k == 0 { x * w } else { x.mul_add(w, *a) };
        }
    }
    if let Some(d) = div {
        let d = V::splat(d);
        for a in acc.iter_mut() {
            *a = *a / d;
        }
    }
    for (v, a) in acc.iter().enumerate() {
        // SAFETY: out holds width floats, laid out as for the loads above.
        unsafe {
            if v + 1 < NV || tail == lanes {
                V::store(out.as_mut_ptr().add(v * lanes), *a)
            } else {
                V::store_partial(out.as_mut_ptr().add(v * lanes), tail, *a)
            }
        }
    }
}

/// Evaluates `$body` with `$width` bound to `$dim`, as a literal for each specialised width
/// (16, 32, 64, 128) and as the runtime value otherwise, so that an always-inlined helper in
/// `$body` is compiled once per specialised width with its loops unrolled.
macro_rules! with_width {
    ($dim:expr, |$width:ident| $body:expr) => {
        match $dim {
            16 => {
                let $width = 16;
                $body
            }
            32 => {
                let $width = 32;
                $body
            }
            64 => {
                let $width = 64;
                $body
            }
            128 => {
                let $width = 128;
                $body
            }
            $width => $body,
        }
    };
}
pub(crate) use with_width;

/// Calls `pool_block::<V, N>` for the runtime vector count `$nv` in 1..=GENERIC_NV (a
/// constant where the width is, see [`with_width`]).
macro_rules! pool_block_nv {
    ($V:ident, $nv:expr, ($($arg:expr),*)) => {
        match $nv {
            1 => pool_block::<$V, 1>($($arg),*),
            2 => pool_block::<$V, 2>($($arg),*),
            3 => pool_block::<$V, 3>($($arg),*),
            4 => pool_block::<$V, 4>($($arg),*),
            5 => pool_block::<$V, 5>($($arg),*),
            6 => pool_block::<$V, 6>($($arg),*),
            7 => pool_block::<$V, 7>($($arg),*),
            8 => pool_block::<$V, 8>($($arg),*),
            nv => unreachable!("{nv} vectors in a block of at most {GENERIC_NV}"),
        }
    };
}

/// out[..width] = (sum over k < n of w_k * row_k[..width]) / div, for rows given by `row(k)`
/// (see [`pool_block`]). A width of whole vectors, at most GENERIC_NV of them (16, 32, 64, 128
/// on AVX-512), is pooled in one block with no tail; any other width in column blocks of up
/// to GENERIC_NV vectors, the last one masked. `prefetch` runs during the first block only.
#[inline(always)]
fn pool_rows<'r, V: SimdVec>(
    width: usize,
    n: usize,
    row: &impl Fn(usize) -> (&'r [f32], f32),
    prefetch: &impl Fn(usize),
    div: Option<f32>,
    out: &mut [f32],
) {
    let out = &mut out[..width];
    let lanes = V::LANES;
    if width > 0 && width.is_multiple_of(lanes) && width <= GENERIC_NV * lanes {
        pool_block_nv!(V, width / lanes, (n, row, prefetch, 0, lanes, div, out));
        return;
    }
    for (blk, out) in out.chunks_mut(GENERIC_NV * lanes).enumerate() {
        let col = blk * GENERIC_NV * lanes;
        let nv = out.len().div_ceil(lanes);
        let tail = out.len() - (nv - 1) * lanes;
        if blk == 0 {
            pool_block_nv!(V, nv, (n, row, prefetch, col, tail, div, out));
        } else {
            pool_block_nv!(V, nv, (n, row, &|_| {}, col, tail, div, out));
        }
    }
}

mod backward;
pub mod bf16;
mod forward;

pub(crate) use backward::RowGrads;
pub use backward::{
    CoalescedGrad, SparseGradWorkspace, embedding_bag_backward_coalesce,
    embedding_bag_backward_coalesce_with_isa, embedding_bag_weight_grad,
    embedding_bag_weight_grad_with_isa,
};
pub use forward::{
    embedding_bag_forward, embedding_bag_forward_tables, embedding_bag_forward_tables_with_isa,
    embedding_bag_forward_with_isa, gather_rows, gather_rows_with_isa,
};
