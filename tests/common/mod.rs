//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod alloc;
pub mod fixtures;
pub mod ranks;
pub mod threads;
