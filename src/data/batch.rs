//! A mini-batch: dense features, per-table bags of row ids (PyTorch EmbeddingBag convention, or
//! one id per sample with no offsets), labels. Buffers are reused from batch to batch (filled
//! in place), so producing a batch allocates nothing once they have reached their size.

use dlrm_kernels::embedding::Bags;
use std::ops::Range;

/// One mini-batch of `size()` samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// Dense features per sample.
    pub num_dense: usize,
    /// size x num_dense, row-major, already transformed (log(1 + x) for Criteo).
    pub dense: Vec<f32>,
    /// One label per sample, 0.0 or 1.0 (or a rating, for matrix factorization).
    pub labels: Vec<f32>,
    /// Per table: the row ids of all bags, concatenated.
    pub indices: Vec<Vec<u32>>,
    /// Per table: where each sample's bag starts in `indices` (`size()` entries, first 0; the
    /// last bag runs to the end), or empty when the table is one-hot: one id per sample, sample
    /// i's being `indices[t][i]` (Criteo's categorical features; no offsets to build or read).
    pub offsets: Vec<Vec<u32>>,
}

impl Batch {
    /// An empty batch shaped for `num_dense` features and `num_tables` tables.
    pub fn new(num_dense: usize, num_tables: usize) -> Batch {
        Batch {
            num_dense,
            dense: Vec::new(),
            labels: Vec::new(),
            indices: vec![Vec::new(); num_tables],
            offsets: vec![Vec::new(); num_tables],
        }
    }

    pub fn size(&self) -> usize {
        self.labels.len()
    }

    pub fn num_tables(&self) -> usize {
        self.indices.len()
    }

    /// Empties every buffer, keeping its capacity.
    pub fn clear(&mut self) {
        self.dense.clear();
        self.labels.clear();
        self.indices.iter_mut().for_each(Vec::clear);
        self.offsets.iter_mut().for_each(Vec::clear);
    }

    /// Whether table `t` is one-hot (one id per sample, no offsets).
    pub fn is_one_hot(&self, t: usize) -> bool {
        self.offsets[t].is_empty()
    }

    /// Table `t`'s bags, as the embedding kernels take them (one-hot when the table is). Not
    /// checked: the models validate a batch (`validate_batch`) before running the kernels.
    pub fn bags(&self, t: usize) -> Bags<'_> {
        if self.is_one_hot(t) {
            Bags::one_hot(&self.indices[t])
        } else {
            Bags::with_offsets(&self.indices[t], &self.offsets[t])
        }
    }

    /// Sample `i`'s bag in table `t`.
    pub fn bag(&self, t: usize, i: usize) -> &[u32] {
        &self.indices[t][bag_range(&self.indices[t], &self.offsets[t], i)]
    }

    /// Makes this batch a copy of samples `first .. first + size` of `src` (offsets rebased to
    /// this batch's ids; buffers reused).
    pub fn copy_samples(&mut self, src: &Batch, first: usize, size: usize) {
        assert!(
            first + size <= src.size(),
            "samples {first}..{} of {}",
            first + size,
            src.size()
        );
        let nd = src.num_dense;
        self.num_dense = nd;
        self.dense.clear();
        self.dense
            .extend_from_slice(&src.dense[first * nd..(first + size) * nd]);
        self.labels.clear();
        self.labels
            .extend_from_slice(&src.labels[first..first + size]);
        let nt = src.num_tables();
        self.indices.resize(nt, Vec::new());
        self.offsets.resize(nt, Vec::new());
        for t in 0..nt {
            let offs = &src.offsets[t];
            let ids = match size {
                0 => 0..0,
                _ => {
                    bag_range(&src.indices[t], offs, first).start
                        ..bag_range(&src.indices[t], offs, first + size - 1).end
                }
            };
            self.indices[t].clear();
            self.indices[t].extend_from_slice(&src.indices[t][ids.clone()]);
            self.offsets[t].clear();
            if !offs.is_empty() {
                let start = ids.start as u32;
                self.offsets[t].extend(offs[first..first + size].iter().map(|&o| o - start));
            }
        }
    }

    /// Sample `i`'s dense features.
    pub fn dense_row(&self, i: usize) -> &[f32] {
        &self.dense[i * self.num_dense..(i + 1) * self.num_dense]
    }
}

/// The positions (in `indices`) of sample `i`'s bag in a table of the given ids and offsets,
/// empty offsets meaning one id per sample.
pub(crate) fn bag_range(indices: &[u32], offsets: &[u32], i: usize) -> Range<usize> {
    if offsets.is_empty() {
        return i..i + 1;
    }
    let start = offsets[i] as usize;
    let end = offsets.get(i + 1).map_or(indices.len(), |&e| e as usize);
    start..end
}
