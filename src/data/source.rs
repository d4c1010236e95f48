//! Where the training loop's batches come from.

use super::{Batch, BatchView};
use anyhow::Result;

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
