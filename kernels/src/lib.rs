//! SIMD CPU kernels for DLRM training: pure compute on slices.
//!
//! This crate never reads a file, parses a flag or prints: callers pass slices with explicit
//! shapes and strides (row-major), matrices as strided row views ([`mat`]). Shapes are checked
//! once at entry and a mismatch is a programmer error (a panic with a message); data from users
//! is validated by the caller.
//!
//! Kernels that may go parallel take a [`parallel::Par`] argument (the caller decides, nothing
//! process-wide does), take their threads from the current rayon pool, and give bit-identical
//! results for any thread count and any `Par`: only independent outputs are split between
//! threads, and reductions are split into chunks fixed by the shape alone.
//!
//! Every kernel has a scalar twin in [`reference`], the oracle of the property tests.

pub mod activation;
pub mod bf16;
pub mod cross;
pub mod embedding;
pub mod fm;
pub mod gemm;
pub mod interaction;
pub mod isa;
pub mod mat;
pub mod optim;
pub mod parallel;
pub mod reference;
pub mod roofline;
mod scratch;
pub mod simd;
