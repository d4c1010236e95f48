//! `dlrm compare` learns with its defaults: DLRM with SGD at its default learning rate on the
//! default synthetic teacher rows comes within a stated margin of the teacher's AUC.

mod support;

use support::{Scratch, assert_ok, dlrm, stderr};

/// The defaults' recipe (preset, batch 128, the default SGD learning rate, teacher data),
/// DLRM with SGD only, over half the default steps and a quarter of the held-out rows, to
/// stay short: 1,000 steps reached AUC 0.662 against the teacher's 0.8095 (0.581 at the old
/// learning rate 0.1); the full 2,000 steps 0.698 against 0.809.
#[test]
fn dlrm_with_sgd_learns_with_the_default_learning_rate() {
    let dir = Scratch::new("compare-defaults");
    let out = dir.arg("out");
    let o = dlrm(&[
        "compare",
        "--models",
        "dlrm",
        "--optimizers",
        "sgd",
        "--num-batches",
        "1000",
        "--test-data-size",
        "4096",
        "--test-freq",
        "1000",
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
    let last: Vec<&str> = csv.lines().last().unwrap().split(',').collect();
    assert_eq!(last[col("learning_rate")], "0.5", "{csv}");
    let auc: f64 = last[col("auc")].parse().unwrap();
    // The margin to the ceiling at 1,000 steps; 0.1 stayed 0.23 below it.
    assert!(auc > ceiling - 0.17, "AUC {auc}, teacher {ceiling}\n{csv}");
}
