//! Scalar twins of the interaction kernels.
