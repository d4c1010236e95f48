//! Scalar twins of the optim kernels.
