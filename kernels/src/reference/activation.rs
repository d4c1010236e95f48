//! Scalar twins of the activation kernels.
