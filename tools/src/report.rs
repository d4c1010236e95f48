//! The study's results: speed-up and parallel efficiency from the measured points, the
//! tables printed to stdout, and `scaling.csv`.
//!
//! Speed-up and efficiency are relative to the smallest thread count measured (t0, normally 1):
//! speed-up(t) = t0 · rate(t) / rate(t0), efficiency(t) = speed-up(t) / t. Under weak scaling
//! the batch grows with the thread count and `rate` is in samples, so the same formulas give the
//! usual weak-scaling efficiency T(t0) / T(t) per step.

use crate::measure::{Measurement, combine_phases};
use dlrm::model::PhaseSeconds;
use std::fmt::Write;

/// One measured configuration: `ranks` processes of `threads` threads each.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// MPI ranks (1: the study's own process).
    pub ranks: usize,
    /// Threads per rank.
    pub threads: usize,
    /// Sockets its threads ran on (0 when unpinned: the OS placed them).
    pub sockets: usize,
    /// Its CPUs as a kernel CPU list ("0-3,8-11"), or "unpinned".
    pub cpus: String,
    pub measurement: Measurement,
    pub flops_per_sample: Option<f64>,
    /// The share of the step time rank 0 spent in collectives (MPI points only).
    pub comm_fraction: Option<f64>,
}

impl Point {
    /// The cores the point uses: ranks x threads.
    pub fn cores(&self) -> usize {
        self.ranks * self.threads
    }
}

/// A point with its derived figures.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub ranks: usize,
    pub threads: usize,
    pub sockets: usize,
    pub cpus: String,
    pub batch: usize,
    /// Median over the repeats.
    pub samples_per_sec: f64,
    pub samples_per_sec_min: f64,
    pub samples_per_sec_max: f64,
    pub speedup: f64,
    /// A fraction (1.0 = perfect scaling).
    pub efficiency: f64,
    pub step_ms: f64,
    pub gflop_per_sec: Option<f64>,
    /// Fractions of the pool's thread-time on a CPU, and waiting for one held by another
    /// process (see [`crate::schedstat`]).
    pub cpu_busy: Option<f64>,
    pub cpu_wait: Option<f64>,
    /// Milliseconds per step of each training phase.
    pub phases_ms: Option<PhaseSeconds>,
    pub comm_fraction: Option<f64>,
}

impl Row {
    /// The cores the row's point used: ranks x threads.
    pub fn cores(&self) -> usize {
        self.ranks * self.threads
    }
}

/// Derives speed-up and efficiency relative to the point with the fewest cores (the first
/// such: with --ranks, the one with fewer ranks).
pub fn rows(points: &[Point]) -> Vec<Row> {
    let Some(base) = points.iter().min_by_key(|p| p.cores()) else {
        return Vec::new();
    };
    let (t0, rate0) = (base.cores() as f64, base.measurement.samples_per_sec());
    points
        .iter()
        .map(|p| {
            let m = &p.measurement;
            let rate = m.samples_per_sec();
            let speedup = t0 * rate / rate0;
            Row {
                ranks: p.ranks,
                threads: p.threads,
                sockets: p.sockets,
                cpus: p.cpus.clone(),
                batch: m.samples_per_step,
                samples_per_sec: rate,
                samples_per_sec_min: m.min_rate(),
                samples_per_sec_max: m.max_rate(),
                speedup,
                efficiency: speedup / p.cores() as f64,
                step_ms: m.step_ms(),
                gflop_per_sec: p.flops_per_sample.map(|f| f * rate * 1e-9),
                cpu_busy: m.cpu_busy(),
                cpu_wait: m.cpu_wait(),
                phases_ms: m
                    .phases_per_step
                    .map(|s| combine_phases(&s, &s, |secs, _| secs * 1e3)),
                comm_fraction: p.comm_fraction,
            }
        })
        .collect()
}

/// The phase names in step order (as [`PhaseSeconds::entries`] lists them).
pub fn phase_names() -> Vec<&'static str> {
    PhaseSeconds::default()
        .entries()
        .iter()
        .map(|(n, _)| *n)
        .collect()
}

/// The columns of scaling.csv: the study, the point (ranks, threads per rank), its rates, the
/// pool's CPU busy and wait fractions (empty where the OS does not report them), rank 0's
/// share of the step time in collectives (empty without MPI ranks), and one `<phase>_ms` column per training
/// phase (milliseconds per step; empty for kernel workloads).
pub fn csv_header() -> Vec<String> {
    let mut cols: Vec<String> = [
        "workload",
        "placement",
        "ranks",
        "threads",
        "sockets",
        "cpus",
        "batch",
        "samples_per_sec",
        "samples_per_sec_min",
        "samples_per_sec_max",
        "speedup",
        "efficiency",
        "step_ms",
        "gflop_per_sec",
        "cpu_busy",
        "cpu_wait",
        "comm_fraction",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cols.extend(phase_names().iter().map(|n| format!("{n}_ms")));
    cols
}

/// scaling.csv: a header line, then one line per row. `placement` is "compact", "scatter" or
/// "unpinned".
pub fn csv(workload: &str, placement: &str, rows: &[Row]) -> String {
    let mut out = csv::Writer::from_writer(Vec::new());
    let record = |out: &mut csv::Writer<Vec<u8>>, fields: &[String]| {
        out.write_record(fields)
            .expect("writing CSV to memory cannot fail")
    };
    record(&mut out, &csv_header());
    for r in rows {
        let mut fields = vec![
            workload.to_string(),
            placement.to_string(),
            r.ranks.to_string(),
            r.threads.to_string(),
            r.sockets.to_string(),
            // Quoted by the writer when the CPU list holds commas.
            r.cpus.clone(),
            r.batch.to_string(),
            format!("{:.1}", r.samples_per_sec),
            format!("{:.1}", r.samples_per_sec_min),
            format!("{:.1}", r.samples_per_sec_max),
            format!("{:.4}", r.speedup),
            format!("{:.4}", r.efficiency),
            format!("{:.4}", r.step_ms),
            r.gflop_per_sec.map_or(String::new(), |g| format!("{g:.3}")),
            r.cpu_busy.map_or(String::new(), |f| format!("{f:.4}")),
            r.cpu_wait.map_or(String::new(), |f| format!("{f:.4}")),
            r.comm_fraction.map_or(String::new(), |f| format!("{f:.4}")),
        ];
        let phases = r.phases_ms.map(|p| p.entries());
        fields.extend((0..phase_names().len()).map(|i| {
            phases
                .as_ref()
                .map_or(String::new(), |e| format!("{:.4}", e[i].1))
        }));
        record(&mut out, &fields);
    }
    let bytes = out
        .into_inner()
        .expect("flushing CSV to memory cannot fail");
    String::from_utf8(bytes).expect("the fields are UTF-8")
}

/// The main table: one line per point; with MPI ranks, each line starts with its ranks and
/// ends with its communication share.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let gflops = rows.iter().any(|r| r.gflop_per_sec.is_some());
    let sched = rows.iter().any(|r| r.cpu_busy.is_some());
    let comm = rows.iter().any(|r| r.comm_fraction.is_some());
    if comm {
        let _ = write!(s, "{:>5} ", "ranks");
    }
    let _ = write!(
        s,
        "{:>7} {:>7} {:>12} {:>21} {:>8} {:>10} {:>9}",
        "threads", "sockets", "samples/s", "(min - max)", "speed-up", "efficiency", "ms/step"
    );
    if gflops {
        let _ = write!(s, " {:>8}", "GFLOP/s");
    }
    if sched {
        let _ = write!(s, " {:>8} {:>8}", "CPU busy", "CPU wait");
    }
    if comm {
        let _ = write!(s, " {:>6}", "comm");
    }
    s.push('\n');
    for r in rows {
        if comm {
            let _ = write!(s, "{:>5} ", r.ranks);
        }
        let _ = write!(
            s,
            "{:>7} {:>7} {:>12.0} {:>21} {:>7.2}x {:>9.1}% {:>9.2}",
            r.threads,
            // 0: unpinned, the OS chose.
            if r.sockets == 0 {
                "-".to_string()
            } else {
                r.sockets.to_string()
            },
            r.samples_per_sec,
            format!(
                "({:.0} - {:.0})",
                r.samples_per_sec_min, r.samples_per_sec_max
            ),
            r.speedup,
            100.0 * r.efficiency,
            r.step_ms,
        );
        if let Some(g) = r.gflop_per_sec {
            let _ = write!(s, " {g:>8.1}");
        }
        if let (Some(busy), Some(wait)) = (r.cpu_busy, r.cpu_wait) {
            let _ = write!(s, " {:>7.1}% {:>7.1}%", 100.0 * busy, 100.0 * wait);
        }
        if let Some(f) = r.comm_fraction {
            let _ = write!(s, " {:>5.1}%", 100.0 * f);
        }
        s.push('\n');
    }
    s
}

/// Milliseconds per step of each phase at each thread count, and each phase's speed-up from
/// the first to the last row: the phase that does not scale stands out. `None` for kernel
/// workloads.
pub fn phase_table(rows: &[Row]) -> Option<String> {
    let phases: Vec<(usize, PhaseSeconds)> = rows
        .iter()
        .map(|r| Some((r.threads, r.phases_ms?)))
        .collect::<Option<_>>()?;
    let (first, last) = (phases.first()?, phases.last()?);
    let mut s = String::new();
    let _ = write!(s, "{:<16}", "ms/step");
    for (t, _) in &phases {
        let _ = write!(s, " {:>9}", format!("{t} thr"));
    }
    if phases.len() > 1 {
        let _ = write!(s, " {:>9}", "speed-up");
    }
    s.push('\n');
    for (i, name) in phase_names().iter().enumerate() {
        let _ = write!(s, "{name:<16}");
        for (_, p) in &phases {
            let _ = write!(s, " {:>9.3}", p.entries()[i].1);
        }
        if phases.len() > 1 {
            let (a, b) = (first.1.entries()[i].1, last.1.entries()[i].1);
            let _ = write!(s, " {:>8.2}x", a / b);
        }
        s.push('\n');
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedstat::SchedTimes;

    fn point(threads: usize, rates: Vec<f64>, phases: Option<PhaseSeconds>) -> Point {
        Point {
            ranks: 1,
            threads,
            sockets: 1,
            cpus: crate::topology::format_cpulist(0..threads),
            measurement: Measurement {
                samples_per_step: 100,
                rates,
                phases_per_step: phases,
                threads,
                seconds: 2.0,
                sched: Some(SchedTimes {
                    run_ns: threads as u64 * 1_500_000_000,
                    wait_ns: threads as u64 * 100_000_000,
                }),
            },
            flops_per_sample: Some(1e6),
            comm_fraction: None,
        }
    }

    fn phases(total: f64) -> PhaseSeconds {
        PhaseSeconds {
            top_bwd: total * 0.75,
            other: total * 0.25,
            ..PhaseSeconds::default()
        }
    }

    #[test]
    fn speedup_and_efficiency_are_relative_to_the_smallest_point() {
        let r = rows(&[
            point(1, vec![90.0, 100.0, 300.0], Some(phases(1.0))),
            point(4, vec![360.0], Some(phases(0.3))),
        ]);
        assert_eq!(r[0].samples_per_sec, 100.0);
        assert_eq!((r[0].speedup, r[0].efficiency), (1.0, 1.0));
        assert_eq!(
            (r[0].samples_per_sec_min, r[0].samples_per_sec_max),
            (90.0, 300.0)
        );
        assert!((r[1].speedup - 3.6).abs() < 1e-12);
        assert!((r[1].efficiency - 0.9).abs() < 1e-12);
        assert!((r[0].step_ms - 1000.0).abs() < 1e-9);
        assert!((r[0].gflop_per_sec.unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(r[0].phases_ms.unwrap().top_bwd, 750.0);
        assert_eq!((r[1].cpu_busy, r[1].cpu_wait), (Some(0.75), Some(0.05)));
        // Without a 1-thread point, the smallest one is the base, assumed perfectly scaled.
        let r = rows(&[point(2, vec![200.0], None), point(4, vec![300.0], None)]);
        assert_eq!((r[0].speedup, r[0].efficiency), (2.0, 1.0));
        assert_eq!((r[1].speedup, r[1].efficiency), (3.0, 0.75));
        assert!(rows(&[]).is_empty());
    }

    #[test]
    fn csv_has_one_column_per_field_and_phase() {
        let header = csv_header();
        for col in [
            "threads",
            "samples_per_sec",
            "speedup",
            "efficiency",
            "emb_fwd_ms",
            "top_bwd_ms",
            "other_ms",
        ] {
            assert!(header.iter().any(|h| h == col), "missing {col}");
        }
        assert_eq!(header.len(), 17 + 11);
        let r = rows(&[
            point(1, vec![100.0], Some(phases(1.0))),
            point(2, vec![150.0], None),
        ]);
        let text = csv("train", "compact", &r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], header.join(","));
        // The CPU list "0-1" has no comma; every line has the header's field count.
        for l in &lines[1..] {
            assert_eq!(l.split(',').count(), header.len(), "{l}");
        }
        let first: Vec<&str> = lines[1].split(',').collect();
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        assert_eq!(&first[..5], ["train", "compact", "1", "1", "1"]);
        assert_eq!(first[col("comm_fraction")], "");
        assert_eq!(first[col("efficiency")], "1.0000");
        assert_eq!(first[col("top_bwd_ms")], "750.0000");
        assert_eq!(first[col("cpu_wait")], "0.0500");
        let second: Vec<&str> = lines[2].split(',').collect();
        assert_eq!(second[col("efficiency")], "0.7500");
        assert_eq!(second[col("top_bwd_ms")], "");
    }

    #[test]
    fn tables_show_rates_and_the_phase_split() {
        let r = rows(&[
            point(1, vec![100.0], Some(phases(1.0))),
            point(2, vec![180.0], Some(phases(0.5))),
        ]);
        let t = table(&r);
        assert!(t.contains("efficiency") && t.contains("90.0%"), "{t}");
        assert!(
            t.contains("CPU wait") && t.contains("75.0%") && t.contains("5.0%"),
            "{t}"
        );
        let p = phase_table(&r).unwrap();
        let top = p.lines().find(|l| l.starts_with("top_bwd")).unwrap();
        assert!(top.contains("750.000") && top.contains("375.000") && top.ends_with("2.00x"));
        let kernels = rows(&[point(1, vec![1.0], None)]);
        assert!(phase_table(&kernels).is_none());
    }

    #[test]
    fn ranks_count_as_cores_and_show_their_communication() {
        let mpi = |ranks: usize, threads: usize, rate: f64, comm: f64| Point {
            ranks,
            comm_fraction: Some(comm),
            ..point(threads, vec![rate], None)
        };
        // 2 ranks x 1 thread against 1 rank x 2 threads: both 2 cores, both against 1 core.
        let r = rows(&[
            mpi(1, 1, 100.0, 0.0),
            mpi(1, 2, 180.0, 0.0),
            mpi(2, 1, 150.0, 0.25),
        ]);
        assert_eq!(r[0].cores(), 1);
        assert!((r[1].efficiency - 0.9).abs() < 1e-12);
        assert!((r[2].speedup - 1.5).abs() < 1e-12);
        assert!((r[2].efficiency - 0.75).abs() < 1e-12);
        let t = table(&r);
        let last = t.lines().last().unwrap();
        assert!(t.starts_with("ranks") && t.contains("comm"), "{t}");
        assert!(
            last.trim_start().starts_with('2') && last.ends_with("25.0%"),
            "{t}"
        );
        let text = csv("train", "unpinned", &r);
        let header = csv_header();
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        let third: Vec<&str> = text.lines().nth(3).unwrap().split(',').collect();
        assert_eq!((third[col("ranks")], third[col("threads")]), ("2", "1"));
        assert_eq!(third[col("comm_fraction")], "0.2500");
        // Without ranks, the table is the thread study's own.
        assert!(table(&rows(&[point(1, vec![1.0], None)])).starts_with("threads"));
    }
}
