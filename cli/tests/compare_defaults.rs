//! `dlrm compare` converges with its defaults: DLRM with SGD at its default learning rate, on
//! the default synthetic teacher rows and for the default number of steps, comes within a
//! stated margin of the teacher's AUC (the ceiling, computed on the same held-out rows).

mod support;

use support::{Scratch, assert_ok, dlrm, stderr};

/// Every default of the comparison (tiny preset with a tenth of its table rows, its MLPs,
/// batch 128, 8,000 steps, SGD 0.5 for DLRM, teacher data, 16,384 held-out rows, evaluated
/// every 400 steps); only the other runs (DCN, Adagrad) are left out. Measured: AUC 0.7698
/// against the teacher's 0.7874 (0.0176 below; the previous defaults, 2,000 steps on the
/// preset's own tables with the Kaggle MLPs, stopped 0.111 below, at 0.698 against 0.809).
#[test]
fn dlrm_with_sgd_converges_with_the_defaults() {
    let dir = Scratch::new("compare-defaults");
    let out = dir.arg("out");
    let o = dlrm(&[
        "compare",
        "--models",
        "dlrm",
        "--optimizers",
        "sgd",
        "--threads",
        "2",
        "--out-dir",
        &out,
    ]);
    assert_ok(&o);
    let log = stderr(&o);
    let ceiling: f64 = log
        .split("teacher AUC ")
        .nth(1)
        .and_then(|r| r.get(..6))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no teacher AUC in {log}"));
    let csv = std::fs::read_to_string(dir.path("out").join("compare.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 20, "an evaluation every 400 steps\n{csv}");
    let last = rows.last().unwrap();
    assert_eq!(last[col("learning_rate")], "0.5", "{csv}");
    assert_eq!(last[col("step")], "8000", "{csv}");
    let svg = std::fs::read_to_string(dir.path("out").join("compare.svg")).unwrap();
    assert!(
        svg.contains("8 tables of 3 to 500 rows"),
        "the plot states the tables"
    );
    let auc: f64 = last[col("auc")].parse().unwrap();
    // Converged: within 0.03 of the ceiling (0.0176 measured; the ISA changes the last bits).
    assert!(auc > ceiling - 0.03, "AUC {auc}, teacher {ceiling}\n{csv}");
}
