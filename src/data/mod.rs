//! Data: batches, synthetic generators, the Criteo reader and the binary dataset.

pub mod batch;
pub mod binary;
pub mod criteo;
pub mod movielens;
pub mod preprocess;
pub mod source;
pub mod synthetic;

pub use batch::{Batch, BatchView, IdColumns};
pub use source::{DataSource, RankPart, Split};
