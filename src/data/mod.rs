//! Data: batches, synthetic generators, the Criteo reader and the binary dataset.

pub mod batch;
pub mod movielens;
pub mod synthetic;

pub use batch::Batch;
