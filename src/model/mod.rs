//! The models and their parameters.

pub mod embedding_tables;
