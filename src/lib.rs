//! DLRM (Naumov et al. 2019) for CPUs: the model, its data and its training, built on the
//! SIMD kernels of `dlrm-kernels`. The command line is the `dlrm-cli` package; this crate
//! never prints (it reports through observers and `log`) and takes no command-line crate.
//!
//! Modules import only from the layers below their own (lowest first):
//!
//! 1. `names`, `rng`, `cancel`, `metrics`: leaf utilities that import nothing of the crate.
//!    `metrics` is one of them, so the synthetic data may compute its ceiling AUC with it.
//! 2. `data`: batches, their sources (`DataSource`), the generators, the Criteo reader, the
//!    binary dataset and preprocessing.
//! 3. `model` (with `model::architecture`), `schedule`: the models over batches, and the
//!    learning-rate schedule.
//! 4. `checkpoint`: a model and its training state on disk.
//! 5. `train` (the loop, which saves checkpoints), `config` (the presets).
//! 6. `spec` (a run resolved once: it builds the pool, the data source and the model),
//!    `interop` (PyTorch's names), `predict` (scoring raw rows).

pub mod cancel;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod interop;
pub mod metrics;
pub mod model;
pub mod names;
pub mod predict;
pub mod rng;
pub mod schedule;
pub mod spec;
pub mod train;

pub use dlrm_kernels as kernels;
