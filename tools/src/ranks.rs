//! Points with MPI ranks (`--ranks`): each ranks x threads point is one
//! `mpirun -np R dlrm train --distributed --threads T --report-json F` job (the `dlrm` binary
//! built with `--features mpi`), and its samples/s and communication share come from rank 0's
//! report. Processes per socket and threads per process are thus compared on the same total
//! cores (ranks x threads).
//!
//! The report's rate covers every step of the job (the steps of the schedule's warm-up and
//! repeats, run back to back), so each such point has one rate, not a median of repeats.

use crate::measure::Measurement;
use crate::report::Point;
use crate::study::StudyOptions;
use anyhow::{Context, Result};
use dlrm::names::Choice;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How the training jobs are started.
#[derive(Clone, Debug)]
pub struct Launcher {
    /// The `dlrm` binary (built with `--features mpi`).
    pub dlrm: PathBuf,
    /// The `dlrm train --preset` the study's model and data come from.
    pub preset: String,
}

/// The default `--dlrm-bin`: `dlrm` beside the running executable (cargo builds both binaries
/// into the same target folder).
pub fn sibling_dlrm() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating dlrm-scaling's own executable")?;
    Ok(exe.with_file_name("dlrm"))
}

/// Refuses, before any work, a launcher that cannot start: no `dlrm` binary, or no `mpirun`
/// on PATH.
pub fn check(launcher: &Launcher) -> Result<()> {
    anyhow::ensure!(
        launcher.dlrm.is_file(),
        "--dlrm-bin {}: no such file (build it with: cargo build --release -p dlrm-cli --features mpi)",
        launcher.dlrm.display()
    );
    match Command::new("mpirun").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => anyhow::bail!(
            "--ranks: `mpirun --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => anyhow::bail!(
            "--ranks needs mpirun on PATH (e.g. Debian's openmpi-bin) to start the ranks: {e}"
        ),
    }
}

/// The `mpirun ... dlrm train ...` command of one point writing its report to `report`.
fn command(
    launcher: &Launcher,
    opts: &StudyOptions,
    ranks: usize,
    threads: usize,
    report: &Path,
) -> Command {
    let schedule = &opts.schedule;
    let steps = schedule.warmup_steps + schedule.repeats * schedule.steps;
    let batch = opts.batch_at(ranks * threads);
    let (spec, data) = (&opts.spec, &opts.data);
    let mut c = Command::new("mpirun");
    // Threads of a rank run on the cores the OS gives them: OpenMPI would otherwise bind each
    // rank to one core (its default for up to two ranks), and its T threads would share it.
    c.args(["--oversubscribe", "--bind-to", "none"]);
    if running_as_root() {
        c.arg("--allow-run-as-root");
    }
    c.args(["-np", &ranks.to_string()])
        .arg(&launcher.dlrm)
        .args(["train", "--distributed", "--preset", &launcher.preset])
        .args(["--threads", &threads.to_string()])
        .args(["--mini-batch-size", &batch.to_string()])
        .args(["--num-batches", &steps.max(1).to_string()])
        .args(["--test-data-size", &batch.to_string()])
        .args(["--optimizer", spec.optimizer.name()])
        .args(["--learning-rate", &spec.learning_rate.to_string()])
        .args(["--data-generation", data.generation.name()])
        .args(["--zipf-alpha", &data.zipf_alpha.to_string()])
        .args([
            "--num-indices-per-lookup",
            &data.num_indices_per_lookup.to_string(),
        ])
        .args(["--num-indices-per-lookup-fixed", "true"])
        .args(["--seed", &spec.seed.to_string()])
        .args(["--print-freq", "0", "--report-json"])
        .arg(report);
    c
}

/// mpirun refuses to start as root without `--allow-run-as-root`. The owner of /proc/self is
/// this process's effective user.
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Runs one point's job in `scratch` and reads its report.
fn run_point(
    launcher: &Launcher,
    opts: &StudyOptions,
    ranks: usize,
    threads: usize,
    scratch: &Path,
) -> Result<Point> {
    let path = scratch.join(format!("report-{ranks}x{threads}.json"));
    let mut cmd = command(launcher, opts, ranks, threads, &path);
    let what = format!("{ranks} ranks x {threads} threads");
    let o = cmd
        .output()
        .with_context(|| format!("{what}: starting {cmd:?}"))?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    anyhow::ensure!(
        o.status.success(),
        "{what}: {cmd:?} failed ({}):\n{}",
        o.status,
        stderr.trim()
    );
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{what}: reading rank 0's report {}", path.display()))?;
    let report: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{what}: parsing rank 0's report {}", path.display()))?;
    let field = |name: &str| {
        report[name]
            .as_f64()
            .with_context(|| format!("{what}: rank 0's report {} has no {name}", path.display()))
    };
    Ok(Point {
        ranks,
        threads,
        sockets: 0,
        cpus: "unpinned".into(),
        measurement: Measurement {
            samples_per_step: field("batch_size")? as usize,
            rates: vec![field("samples_per_sec")?],
            phases_per_step: None,
            threads: ranks * threads,
            seconds: field("wall_seconds")?,
            sched: None,
        },
        flops_per_sample: None,
        comm_fraction: Some(field("comm_fraction")?),
    })
}

/// Runs every ranks x threads point (ranks outer), printing progress to stderr. The reports
/// go to a temporary folder, removed afterwards (also when a job fails).
pub fn run(launcher: &Launcher, opts: &StudyOptions, ranks: &[usize]) -> Result<Vec<Point>> {
    let scratch = tempfile::tempdir().context("creating a folder for the jobs' reports")?;
    let mut points = Vec::with_capacity(ranks.len() * opts.threads.len());
    for &r in ranks {
        for &t in &opts.threads {
            let p = run_point(launcher, opts, r, t, scratch.path())?;
            eprintln!(
                "{r:>3} ranks x {t:>3} threads: {:.0} samples/s, communication {:.1}%",
                p.measurement.samples_per_sec(),
                100.0 * p.comm_fraction.unwrap_or(0.0)
            );
            points.push(p);
        }
    }
    Ok(points)
}
