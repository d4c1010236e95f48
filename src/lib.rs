//! DLRM (Naumov et al. 2019) for CPUs: the model, its data and its training, built on the
//! SIMD kernels of `dlrm-kernels`. The command line is the `dlrm-cli` package; this crate
//! never prints (it reports through observers and `log`) and takes no command-line crate.
//!
//! No `unsafe` outside [`storage`], which holds every map and system call of the crate.
//!
//! Modules import only from the layers below their own (lowest first):
//!
//! 1. `names`, `rng`, `cancel`, `metrics`, `distributed`: leaf utilities that import nothing of
//!    the crate.
//!    `metrics` is one of them, so the synthetic data may compute its ceiling AUC with it.
//!    `distributed` (the collectives of hybrid-parallel training and the sharding plan) too.
//! 2. `storage`: files, maps and system calls.
//! 3. `data`: batches, their sources (`DataSource`), the generators, the Criteo reader, the
//!    binary dataset and preprocessing.
//! 4. `model` (with `model::architecture` and the `Parameters` visitor), `schedule`: the
//!    models over batches, and the learning-rate schedule.
//! 5. `checkpoint`: any model and its training state on disk.
//! 6. `train` (the loop, which saves checkpoints), `config` (the presets).
//! 7. `spec` (a run resolved once: it builds the pool, the data source and the model),
//!    `interop` (PyTorch's names), `predict` (scoring raw rows).

#![deny(unsafe_code)]

pub mod cancel;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distributed;
pub mod interop;
pub mod metrics;
pub mod model;
pub mod names;
pub mod predict;
pub mod rng;
pub mod schedule;
pub mod spec;
#[allow(unsafe_code)]
pub mod storage;
pub mod train;

pub use dlrm_kernels as kernels;
