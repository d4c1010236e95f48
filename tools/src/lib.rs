//! Performance tools for dlrm-rs. `dlrm-scaling` runs the same workload (DLRM training, or one
//! kernel family) at a sweep of thread counts, each in its own rayon pool pinned core by core
//! and socket by socket, and reports throughput, speed-up, parallel efficiency and the time
//! split by phase as a table, `scaling.csv` and `scaling.svg`.

pub mod measure;
pub mod plot;
pub mod ranks;
pub mod report;
pub mod schedstat;
pub mod simulate;
pub mod study;
pub mod sweep;
pub mod topology;
pub mod workload;
