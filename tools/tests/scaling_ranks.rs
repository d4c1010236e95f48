//! `dlrm-scaling --ranks`: ranks x threads points as `mpirun dlrm train` jobs in one CSV and
//! plot, and the clear refusals when they cannot run (no mpirun, no `dlrm` binary, a job that
//! fails, a workload other than training). The end-to-end test needs mpirun on PATH and the
//! `dlrm` binary beside `dlrm-scaling` built with `--features mpi` (as
//! `cargo test -p dlrm-cli --features mpi` leaves it); it says why when it skips.

mod common;

use common::{QUICK, TempDir, scaling, scaling_with_path, text};
use std::process::Command;

fn mpirun_found() -> bool {
    let found = Command::new("mpirun").arg("--version").output().is_ok();
    if !found {
        eprintln!("mpirun is not on PATH: skipping");
    }
    found
}

#[test]
fn ranks_and_threads_share_one_csv_and_plot() {
    if !mpirun_found() {
        return;
    }
    let dir = TempDir::new("ranks-e2e");
    let out = dir.path().join("out");
    let mut args = QUICK.to_vec();
    args.extend(["--ranks", "2,1", "--threads", "1"]);
    args.extend(["--out", out.to_str().unwrap()]);
    let o = scaling(&args);
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    if !o.status.success() {
        // The refusals name what is missing, and leave no output behind.
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(!out.exists());
        if stderr.contains("--features mpi") {
            eprintln!("the dlrm binary beside dlrm-scaling lacks the mpi feature: skipping");
            return;
        }
        panic!("{stdout}{stderr}");
    }
    assert!(
        stdout.contains("ranks 1,2") && stdout.contains("comm"),
        "{stdout}"
    );
    let csv = std::fs::read_to_string(out.join("scaling.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    assert_eq!(lines.len(), 3, "{csv}");
    for (line, ranks) in lines[1..].iter().zip(["1", "2"]) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!((f[col("ranks")], f[col("threads")]), (ranks, "1"), "{line}");
        let rate: f64 = f[col("samples_per_sec")].parse().unwrap();
        let comm: f64 = f[col("comm_fraction")].parse().unwrap();
        // Two ranks spend part of their training steps exchanging.
        let exchanged = if ranks == "1" {
            (0.0..1.0).contains(&comm)
        } else {
            comm > 0.0 && comm < 1.0
        };
        assert!(rate > 0.0 && exchanged, "{line}");
    }
    let svg = std::fs::read_to_string(out.join("scaling.svg")).unwrap();
    for label in [
        "1 rank x threads",
        "2 ranks x threads",
        "cores (ranks x threads)",
    ] {
        assert!(svg.contains(label), "the plot lacks {label}");
    }
}

#[test]
fn without_mpirun_ranks_are_refused_before_any_work() {
    let dir = TempDir::new("ranks-nompi");
    let out = dir.path().join("out");
    // An existing file as the binary: the refusal is about mpirun alone.
    let bin = env!("CARGO_BIN_EXE_dlrm-scaling");
    let mut args = QUICK.to_vec();
    args.extend(["--ranks", "1,2", "--dlrm-bin", bin]);
    args.extend(["--out", out.to_str().unwrap()]);
    let o = scaling_with_path(&args, dir.path());
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--ranks needs mpirun on PATH"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn a_missing_dlrm_binary_is_named() {
    let o = scaling(&["--ranks", "2", "--dlrm-bin", "/nonexistent/dlrm"]);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--dlrm-bin /nonexistent/dlrm: no such file")
            && stderr.contains("--features mpi"),
        "{stderr}"
    );
}

#[test]
fn a_failing_job_names_its_point_and_command() {
    if !mpirun_found() {
        return;
    }
    let mut args = QUICK.to_vec();
    args.extend([
        "--ranks",
        "1,2",
        "--threads",
        "1",
        "--dlrm-bin",
        "/bin/false",
    ]);
    let o = scaling(&args);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 ranks x 1 threads") && stderr.contains("failed"),
        "{stderr}"
    );
}

#[test]
fn ranks_measure_training_only_and_at_least_one() {
    let o = scaling(&["--workload", "gemm", "--ranks", "2"]);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--workload train, not gemm"), "{stderr}");
    let o = scaling(&["--ranks", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
}
