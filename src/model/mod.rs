//! The models and their parameters.

pub mod dlrm;
pub mod embedding_tables;
pub mod mlp;
