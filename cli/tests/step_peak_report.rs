//! With --report-json the training run measures the FMA peak of its threads after the last
//! step and reports the dense compute as a fraction of it, in the JSON and the summary line.

use std::process::Command;

#[test]
fn the_report_states_the_step_as_a_fraction_of_the_fma_peak() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let o = Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(["train", "--num-batches", "20", "--test-data-size", "512"])
        .args(["--threads", "2", "--report-json"])
        .arg(&report)
        .output()
        .expect("run dlrm");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let gflops = json["gflop_per_sec"].as_f64().expect("gflop_per_sec");
    let peak = json["fma_peak_gflop_per_sec"]
        .as_f64()
        .expect("fma_peak_gflop_per_sec");
    let fraction = json["peak_fraction"].as_f64().expect("peak_fraction");
    assert!(gflops > 0.0 && peak > 0.0, "{gflops} of {peak} GFLOP/s");
    assert!(fraction > 0.0 && fraction < 1.5, "fraction {fraction}");
    assert!((fraction - gflops / peak).abs() < 1e-9 * fraction);
    assert!(
        stdout.contains("GFLOP/s FMA peak"),
        "the summary lacks the peak: {stdout}"
    );
}

#[test]
fn without_a_report_file_no_peak_is_probed() {
    let o = Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(["train", "--num-batches", "5", "--test-data-size", "256"])
        .output()
        .expect("run dlrm");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("dense compute"), "{stdout}");
    assert!(!stdout.contains("FMA peak"), "{stdout}");
}
