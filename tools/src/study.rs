//! The sweep: one pinned rayon pool per thread count, the workload built and timed inside it.

use crate::measure::{Schedule, measure};
use crate::report::Point;
use crate::sweep::{cpus_for, sockets_used};
use crate::topology::{Placement, Topology, format_cpulist};
use crate::workload::{KERNEL_BATCHES, WorkloadSpec, build};
use anyhow::{Context, Result};
use dlrm::data::synthetic::{IN_MEMORY_LIMIT, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::train::DataSource;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Everything a study does.
#[derive(Clone, Debug)]
pub struct StudyOptions {
    pub spec: WorkloadSpec,
    /// The synthetic data the batches come from (training and the embedding workloads).
    pub data: SyntheticConfig,
    /// Batches of the largest batch size in the data set (training cycles through them).
    pub data_batches: usize,
    /// Samples per step (at one thread under weak scaling).
    pub batch: usize,
    /// Ascending thread counts.
    pub threads: Vec<usize>,
    pub placement: Placement,
    /// Pin each worker to its CPU of the placement order (else the OS places them).
    pub pin: bool,
    /// Weak scaling: the batch grows with the thread count.
    pub weak: bool,
    pub schedule: Schedule,
}

impl StudyOptions {
    /// Samples per step at `threads` threads.
    pub fn batch_at(&self, threads: usize) -> usize {
        if self.weak {
            self.batch * threads
        } else {
            self.batch
        }
    }
}

/// Training samples of the data set: `data_batches` batches of the largest batch size, fewer if
/// that would not fit in [`IN_MEMORY_LIMIT`] (so that training reads batches from memory and
/// does not time the generator), but at least one batch.
pub fn data_samples(cfg: &SyntheticConfig, max_batch: usize, data_batches: usize) -> u64 {
    // What SyntheticSource holds per sample: dense features, label, and per table an offset
    // and its ids.
    let per_sample =
        4 * (cfg.num_dense + 1 + cfg.table_sizes.len() * (1 + cfg.num_indices_per_lookup)) as u64;
    let per_batch = per_sample * max_batch as u64;
    let fit = (IN_MEMORY_LIMIT / per_batch.max(1)).max(1);
    max_batch as u64 * (data_batches as u64).clamp(1, fit)
}

/// CPUs an affinity mask of core_affinity (a glibc `cpu_set_t`) can name.
const AFFINITY_MASK_CPUS: usize = 1024;

/// A pool of `threads` workers; with `cpus`, worker i pinned to `cpus[i]`. Returns the pool and
/// how many workers could not be pinned.
pub fn pinned_pool(threads: usize, cpus: Option<Vec<usize>>) -> Result<(ThreadPool, usize)> {
    let failed = Arc::new(AtomicUsize::new(0));
    let mut builder = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("scaling-{i}"));
    if let Some(cpus) = cpus {
        let failed = Arc::clone(&failed);
        builder = builder.start_handler(move |i| {
            let id = cpus[i];
            if id >= AFFINITY_MASK_CPUS
                || !core_affinity::set_for_current(core_affinity::CoreId { id })
            {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let pool = builder.build().context("building the thread pool")?;
    // Every worker runs its start handler before it takes any job, so once each has run one,
    // every pin has been attempted.
    pool.broadcast(|_| ());
    let failed = failed.load(Ordering::Relaxed);
    Ok((pool, failed))
}

/// A warning when other processes keep the machine busy (1-minute load average, the first
/// field of /proc/loadavg, above half the logical CPUs): every point then shares its CPUs and
/// the curve measures the neighbours as much as the code.
pub fn busy_warning(loadavg: &str, logical_cpus: usize) -> Option<String> {
    let load: f64 = loadavg.split_whitespace().next()?.parse().ok()?;
    (load > 0.5 * logical_cpus as f64).then(|| {
        format!(
            "warning: load average {load:.2} on {logical_cpus} logical CPUs before the study: other processes compete for the CPUs, so the figures will be noisy and efficiency understated"
        )
    })
}

/// Runs the sweep and returns one point per thread count, printing progress to stderr.
pub fn run(opts: &StudyOptions, topo: &Topology) -> Result<Vec<Point>> {
    let max_threads = opts
        .threads
        .iter()
        .copied()
        .max()
        .context("no thread count")?;
    let max_batch = opts.batch_at(max_threads);
    let data = if opts.spec.kind.needs_data() {
        let batches = match opts.spec.kind {
            crate::workload::WorkloadKind::Train => opts.data_batches,
            _ => KERNEL_BATCHES,
        };
        let len = data_samples(&opts.data, max_batch, batches);
        let t = std::time::Instant::now();
        let source = SyntheticSource::new(SyntheticData::new(opts.data.clone()), len, 0);
        eprintln!(
            "data: {len} synthetic samples ({} batches of {max_batch}, {:?}) in {:.1} s",
            len / max_batch as u64,
            opts.data.generation,
            t.elapsed().as_secs_f64()
        );
        Some(source)
    } else {
        None
    };
    let order = topo.order(opts.placement);
    let mut points = Vec::with_capacity(opts.threads.len());
    for &threads in &opts.threads {
        let cpus = cpus_for(&order, threads);
        let ids: Vec<usize> = cpus.iter().map(|c| c.id).collect();
        let (pool, unpinned) = pinned_pool(threads, opts.pin.then(|| ids.clone()))?;
        if unpinned > 0 {
            eprintln!(
                "warning: {unpinned} of {threads} workers could not be pinned (CPU affinity refused); their placement is the OS's"
            );
        }
        let batch = opts.batch_at(threads);
        let (measurement, flops_per_sample) = pool.install(|| -> Result<_> {
            let t = std::time::Instant::now();
            let mut w = build(
                &opts.spec,
                data.as_ref().map(|d| d as &dyn DataSource),
                batch,
            )?;
            let built = t.elapsed().as_secs_f64();
            let m = measure(&mut *w, &opts.schedule)?;
            eprintln!(
                "{threads:>4} threads: {:.0} samples/s (median of {}, {:.0} - {:.0}), built in {built:.1} s",
                m.samples_per_sec(),
                m.rates.len(),
                m.min_rate(),
                m.max_rate()
            );
            Ok((m, w.flops_per_sample()))
        })?;
        points.push(Point {
            ranks: 1,
            threads,
            sockets: if opts.pin { sockets_used(&cpus) } else { 0 },
            cpus: if opts.pin {
                format_cpulist(ids)
            } else {
                "unpinned".into()
            },
            measurement,
            flops_per_sample,
            comm_fraction: None,
        });
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlrm::data::synthetic::Generation;

    fn cfg(tables: usize) -> SyntheticConfig {
        SyntheticConfig {
            num_dense: 13,
            table_sizes: vec![100; tables],
            generation: Generation::Random,
            zipf_alpha: 1.05,
            num_indices_per_lookup: 1,
            fixed_bag_size: true,
            seed: 1,
        }
    }

    #[test]
    fn data_fits_in_memory_and_holds_a_batch() {
        // 13 + 1 + 26 * 2 floats = 264 bytes a sample.
        assert_eq!(data_samples(&cfg(26), 2048, 200), 2048 * 200);
        let huge = 1 << 22;
        let n = data_samples(&cfg(26), huge, 200);
        assert_eq!(n % huge as u64, 0);
        assert!(n * 264 <= IN_MEMORY_LIMIT);
        assert_eq!(data_samples(&cfg(26), 1 << 30, 200), 1 << 30);
        assert_eq!(data_samples(&cfg(26), 16, 0), 16);
    }

    #[test]
    fn a_busy_machine_is_reported() {
        let w = busy_warning("7.96 7.89 6.03 9/1234 5678\n", 2).unwrap();
        assert!(w.contains("7.96") && w.contains("2 logical CPUs"), "{w}");
        assert!(busy_warning("0.40 1.0 1.0 1/10 1", 2).is_none());
        assert!(busy_warning("", 2).is_none());
    }

    #[test]
    fn pools_have_the_asked_threads_and_pin_them() {
        let (pool, failed) = pinned_pool(2, Some(vec![0, 0])).unwrap();
        assert_eq!(pool.current_num_threads(), 2);
        assert_eq!(failed, 0);
        // A CPU the machine does not have cannot be pinned to, and is reported.
        let (_, failed) = pinned_pool(2, Some(vec![1000, 1 << 20])).unwrap();
        assert_eq!(failed, 2);
        let (unpinned, failed) = pinned_pool(3, None).unwrap();
        assert_eq!((unpinned.current_num_threads(), failed), (3, 0));
    }
}
