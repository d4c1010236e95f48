//! Scalar twins of the embedding kernels.
