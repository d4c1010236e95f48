//! Feature interaction of DLRM: the fused pairwise dot products, and concatenation.
