//! Where the training loop's batches come from.

use super::{Batch, BatchView};
use anyhow::Result;
use std::ops::Range;

/// The part of a global batch one rank of hybrid-parallel training reads (Naumov et al. 2019,
/// section "Parallelism"): the dense rows and labels of its slice of the samples, and its
/// embedding tables' ids for every sample.
#[derive(Clone, Debug)]
pub struct RankPart<'a> {
    /// The rank's samples, counted from the batch's first.
    pub rows: Range<usize>,
    /// The tables the rank owns.
    pub tables: &'a [usize],
}

impl RankPart<'_> {
    /// Shapes `batch` as a global batch of `size` samples and `num_tables` tables holding only
    /// this part: `dense` and `labels` (the slice's) at the slice's rows, zeros elsewhere; the
    /// ids `table_ids(t, ids, offsets)` gives for this part's tables; one-hot id 0 for every
    /// other table (so the batch still validates; the rank never reads them).
    pub fn assemble(
        &self,
        size: usize,
        num_dense: usize,
        (dense, labels): (&[f32], &[f32]),
        num_tables: usize,
        batch: &mut Batch,
        mut table_ids: impl FnMut(usize, &mut Vec<u32>, &mut Vec<u32>),
    ) {
        let Range { start, end } = self.rows;
        batch.num_dense = num_dense;
        batch.dense.clear();
        batch.dense.resize(size * num_dense, 0.0);
        batch.dense[start * num_dense..end * num_dense].copy_from_slice(dense);
        batch.labels.clear();
        batch.labels.resize(size, 0.0);
        batch.labels[start..end].copy_from_slice(labels);
        batch.indices.resize(num_tables, Vec::new());
        batch.offsets.resize(num_tables, Vec::new());
        for (t, (ids, offsets)) in (batch.indices.iter_mut().zip(&mut batch.offsets)).enumerate() {
            if self.tables.contains(&t) {
                table_ids(t, ids, offsets);
            } else {
                ids.clear();
                ids.resize(size, 0);
                offsets.clear();
            }
        }
    }
}

/// The two parts of a [`DataSource`]: the training samples and the held-out ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Where batches come from: an in-memory generator or a mapped dataset.
pub trait DataSource: Sync {
    /// Training samples in one epoch.
    fn train_len(&self) -> u64;
    /// Held-out samples.
    fn test_len(&self) -> u64;
    /// Fills `batch` with training samples `first .. first + size`.
    fn fill_train(&self, first: u64, size: usize, batch: &mut Batch) -> Result<()>;
    /// Fills `batch` with held-out samples `first .. first + size`.
    fn fill_test(&self, first: u64, size: usize, batch: &mut Batch) -> Result<()>;
    /// Training samples `first .. first + size`, borrowed where the source holds them as a
    /// batch reads them (a mapped dataset: no copy); by default filled into `batch`.
    fn train_view<'a>(
        &'a self,
        first: u64,
        size: usize,
        batch: &'a mut Batch,
    ) -> Result<BatchView<'a>> {
        self.fill_train(first, size, batch)?;
        Ok(batch.view())
    }
    /// Held-out samples `first .. first + size`, as [`DataSource::train_view`] gives training
    /// samples.
    fn test_view<'a>(
        &'a self,
        first: u64,
        size: usize,
        batch: &'a mut Batch,
    ) -> Result<BatchView<'a>> {
        self.fill_test(first, size, batch)?;
        Ok(batch.view())
    }
    /// Fills `batch` with the `part` of samples `first .. first + size` of `split` one rank
    /// reads (see [`RankPart::assemble`]). By default the whole batch: a source that can read
    /// a part alone overrides it.
    fn fill_part(
        &self,
        split: Split,
        first: u64,
        size: usize,
        part: &RankPart,
        batch: &mut Batch,
    ) -> Result<()> {
        let _ = part;
        match split {
            Split::Train => self.fill_train(first, size, batch),
            Split::Test => self.fill_test(first, size, batch),
        }
    }
    /// The AUC of the labels' own generating model on the held-out samples, when known.
    fn ceiling_auc(&self) -> Option<f64> {
        None
    }
    /// Whether batch order should be shuffled every epoch (real data), or kept (synthetic data
    /// that is already random).
    fn shuffle(&self) -> bool {
        false
    }
}
