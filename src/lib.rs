//! DLRM (Naumov et al. 2019) for CPUs: the model, its data and its training, built on the
//! SIMD kernels of `dlrm-kernels`.
//!
//! No `unsafe` outside [`storage`], which holds every map and system call of the crate.

#![deny(unsafe_code)]

pub mod cancel;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod interop;
pub mod metrics;
pub mod model;
pub mod predict;
pub mod rng;
#[allow(unsafe_code)]
pub mod storage;
pub mod train;

pub use dlrm_kernels as kernels;
