//! Embedding table storage: memory maps, anonymous (huge pages) or file-backed.
