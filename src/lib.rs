//! DLRM (Naumov et al. 2019) for CPUs: the model, its data and its training, built on the
//! SIMD kernels of `dlrm-kernels`.

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
