//! Optimizer updates: fused sparse SGD / Adagrad / row-wise Adagrad for embedding tables, and
//! the dense versions for MLP parameters.
