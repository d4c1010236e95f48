//! Embedding bags: forward (sum / mean / weighted pooling) and the backward fused with the
//! sparse optimizer update.
