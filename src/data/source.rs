//! Where the training loop's batches come from.

use super::Batch;
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
