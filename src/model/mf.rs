//! Biased matrix factorization, the latent factor model of collaborative filtering (Koren,
//! Bell & Volinsky, "Matrix Factorization Techniques for Recommender Systems", 2009):
//! ```text
//! r_ij ≈ μ + b_i + b_j + w_i^T v_j
//! ```
//! for user i and item j, trained with the squared loss and L2 regularisation of the rows each
//! batch looks up (`weight_decay`, inside the fused sparse update).
//!
//! This is exactly a factorization machine with two one-hot fields, users and items, and no
//! dense features (Rendle 2010, section 5.1): the pairwise term of the two fields is
//! <w_i, v_j>, their first-order weights are the biases b_i and b_j, and w0 is μ. So the model
//! is [`Fm`] in that configuration, with the regression task: the same kernels, tables and
//! fused optimizers, no second implementation. Batches have two tables of ids (users, then
//! items) and the ratings as labels ([`crate::data::movielens`]).

use super::fm::{Fm, FmConfig};
use super::{ModelKind, OptimizerKind, Task};
use crate::storage::StorageKind;

/// The shape of a rating matrix and the training settings of its factorization.
#[derive(Clone, Debug, PartialEq)]
pub struct MfConfig {
    /// Rows of the user table (user ids are below this).
    pub users: usize,
    /// Rows of the item table (item ids are below this).
    pub items: usize,
    /// Width of the latent vectors.
    pub factors: usize,
    /// Initial μ: the mean training rating (μ is then learned with the other parameters).
    pub global_mean: f32,
    /// L2 regularisation of the looked-up user and item rows (factors and biases).
    pub weight_decay: f32,
}

/// Matrix factorization as a two-field factorization machine (see the module documentation).
pub type Mf = Fm;

/// A freshly initialised factorization: factors and biases uniform(±sqrt(1/rows)) keyed by
/// (seed, table, row), as every embedding table, μ = `cfg.global_mean`.
pub fn new(
    cfg: MfConfig,
    optimizer: OptimizerKind,
    storage: &StorageKind,
    seed: u64,
) -> anyhow::Result<Mf> {
    Fm::new(
        FmConfig {
            model: ModelKind::Mf,
            task: Task::Regression,
            factors: cfg.factors,
            table_sizes: vec![cfg.users, cfg.items],
            num_dense: 0,
            weight_decay: cfg.weight_decay,
            initial_bias: cfg.global_mean,
        },
        optimizer,
        storage,
        seed,
    )
}
