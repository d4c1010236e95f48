//! The `dlrm-scaling` binary end to end, on the tiny preset: it prints the topology and the
//! tables, writes scaling.csv and scaling.svg, runs every workload, and names bad flags.

mod common;

use common::{QUICK, TempDir, scaling, text};
use std::path::Path;

/// Quick points on a data set of 4 batches.
fn quick() -> Vec<&'static str> {
    let mut args = QUICK.to_vec();
    args.extend(["--data-batches", "4"]);
    args
}

#[test]
fn two_points_write_the_csv_and_the_plot() {
    let dir = TempDir::new("e2e");
    let out_dir = dir.path().join("out");
    let mut args = quick();
    args.extend(["--threads", "1,2", "--out", out_dir.to_str().unwrap()]);
    let o = scaling(&args);
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("CPU topology"), "{stdout}");
    assert!(stdout.contains("efficiency"), "{stdout}");
    // The phase table: one line per phase, with the speed-up from 1 to 2 threads.
    let top_bwd = stdout
        .lines()
        .find(|l| l.starts_with("top_bwd"))
        .expect("phase table");
    assert!(top_bwd.ends_with('x'), "{top_bwd}");

    let csv = std::fs::read_to_string(out_dir.join("scaling.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no column {name}: {}", lines[0]))
    };
    for (line, threads) in lines[1..].iter().zip(["1", "2"]) {
        // CPU lists of up to 2 CPUs hold no comma.
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), header.len(), "{line}");
        assert_eq!(f[col("workload")], "train");
        assert_eq!(f[col("threads")], threads);
        assert_eq!(f[col("batch")], "128");
        let rate: f64 = f[col("samples_per_sec")].parse().unwrap();
        assert!(rate > 0.0, "{line}");
        let eff: f64 = f[col("efficiency")].parse().unwrap();
        assert!(eff > 0.0 && eff < 5.0, "efficiency is a fraction: {line}");
        let phase: f64 = f[col("top_bwd_ms")].parse().unwrap();
        assert!(phase > 0.0, "{line}");
        for frac in ["cpu_busy", "cpu_wait"] {
            let v = f[col(frac)];
            assert!(
                v.is_empty() || (0.0..=1.0).contains(&v.parse::<f64>().unwrap()),
                "{frac}: {line}"
            );
        }
    }
    let first: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(first[col("speedup")], "1.0000");

    let svg = std::fs::read_to_string(out_dir.join("scaling.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    for needle in ["threads", "samples/s", "parallel efficiency", "<polyline"] {
        assert!(svg.contains(needle), "scaling.svg lacks {needle}");
    }
}

#[test]
fn kernel_workloads_and_weak_scaling_run() {
    for workload in ["gemm", "embedding", "sparse-update"] {
        let mut args = quick();
        args.extend(["--workload", workload, "--threads", "1", "--weak"]);
        args.extend(["--optimizer", "adagrad"]);
        // Interleaving needs NUMA nodes in /sys (a single node is enough).
        if Path::new("/sys/devices/system/node/node0").exists() {
            args.extend(["--numa", "interleave"]);
        }
        let o = scaling(&args);
        let stdout = text(&o.stdout);
        assert!(o.status.success(), "{workload}: {}", text(&o.stderr));
        assert!(stdout.contains(workload), "{workload}: {stdout}");
        // Kernel workloads have no training phases.
        assert!(!stdout.contains("top_bwd"), "{workload}: {stdout}");
    }
    let mut args = quick();
    args.extend([
        "--workload",
        "gemm",
        "--threads",
        "1",
        "--gemm-layer",
        "3-5",
    ]);
    let o = scaling(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // 2 * 3 * 5 flops a row.
    assert!(text(&o.stdout).contains("GFLOP/s"));
}

#[test]
fn topology_only_prints_the_orders() {
    let o = scaling(&["--topology"]);
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for needle in [
        "CPU topology",
        "compact order: 0",
        "scatter order: 0",
        "default thread counts: [1",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
}

#[test]
fn bad_flags_are_named() {
    let cases: [(&[&str], &str); 4] = [
        (&["--threads", "1,0"], "--threads"),
        (&["--threads", "two"], "'two'"),
        (&["--gemm-layer", "367"], "--gemm-layer"),
        (&["--mini-batch-size", "0"], "--mini-batch-size"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["--preset", "tiny"];
        all.extend_from_slice(args);
        let o = scaling(&all);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            text(&o.stderr).contains(needle),
            "{args:?}: error should name {needle}: {}",
            text(&o.stderr)
        );
    }
}
