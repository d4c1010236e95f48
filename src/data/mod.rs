//! Data: batches, synthetic generators, the Criteo reader and the binary dataset.

pub mod batch;

pub use batch::Batch;
