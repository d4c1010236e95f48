//! `dlrm train --sharding row|auto` on N MPI ranks (built with `--features mpi`; skipped,
//! saying so, when `mpirun` is not on PATH): tables split row-wise give the single-process
//! held-out metrics bit for bit with --deterministic; auto under a small --rank-memory-gib
//! splits only the table no rank can hold and prints the ranges; a table whose rows fit
//! nowhere is refused naming it. The library's tests/distributed_rows.rs checks every
//! parameter on ranks run as threads.

#![cfg(feature = "mpi")]

use std::process::Output;

mod support;

use support::mpi::{dlrm_train, mpirun_found};

/// `dlrm train` (unless --criteo, on synthetic data of the tiny preset: tables of 10 to 5,000
/// rows, d = 16, bags of 1 to 3 ids), on `ranks` MPI ranks (None: one plain process), writing
/// its report into `dir`.
fn train(ranks: Option<usize>, args: &[&str], dir: &std::path::Path) -> Output {
    let mut cmd = dlrm_train(ranks, &[]);
    if !args.contains(&"--criteo") {
        cmd.args(["--preset", "tiny", "--data-size", "6144"]).args([
            "--test-data-size",
            "2000",
            "--num-indices-per-lookup",
            "3",
        ]);
    }
    cmd.args(["--threads", "1", "--seed", "3"])
        .args(args)
        .arg("--report-json")
        .arg(dir.join("report.json"))
        .output()
        .expect("run dlrm")
}

/// The run's report and its standard output.
fn report(ranks: Option<usize>, args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let o = train(ranks, args, dir.path());
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{ranks:?} ranks {args:?}: {stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    (serde_json::from_str(&text).unwrap(), stdout)
}

const METRICS: [&str; 4] = ["test_loss", "test_accuracy", "test_auc", "test_ne"];

/// Rows per GiB of --rank-memory-gib: the tiny preset's rows are 16 f32 (SGD keeps no state).
fn gib_of_rows(rows: f64) -> String {
    format!("{}", rows * 64.0 / (1u64 << 30) as f64)
}

#[test]
fn row_shards_give_the_single_process_metrics_bit_for_bit() {
    if !mpirun_found() {
        return;
    }
    for (optimizer, n) in [("sgd", 2), ("rowwise-adagrad", 3)] {
        let args = ["--optimizer", optimizer, "--mini-batch-size", "768"];
        let (single, _) = report(None, &args);
        let args = [&args[..], &["--deterministic", "--sharding", "row"]].concat();
        let (sharded, stdout) = report(Some(n), &args);
        let placement = sharded["plan"]["placement"].as_array().unwrap();
        assert!(
            placement.iter().all(|p| p.get("rows").is_some()),
            "{placement:?}"
        );
        assert!(stdout.contains("rank 1: tables [], rows 0["), "{stdout}");
        for m in METRICS {
            assert_eq!(single[m], sharded[m], "{optimizer} on {n} ranks: {m}");
        }
        let rank1 = &sharded["per_rank"][1]["collectives"];
        for c in ["row_shard_all_to_all", "row_shard_all_gather"] {
            // The 8 training steps' collectives (the evaluation's are not counted).
            assert_eq!(rank1[c]["calls"].as_u64(), Some(8), "{c}: {rank1}");
            assert!(rank1[c]["bytes"].as_u64().unwrap() > 0, "{c}: {rank1}");
        }
    }
}

#[test]
fn auto_splits_only_the_table_no_rank_holds_and_refuses_one_that_fits_nowhere() {
    if !mpirun_found() {
        return;
    }
    // Every rank holds the 6 tables under 2,048 rows (3,560 rows) and room for 4,800 more:
    // the 5,000-row table 4 is split over the 3 ranks, the 3,000-row table 7 stays whole.
    let budget = gib_of_rows(3_560.0 + 4_800.0);
    let args = ["--mini-batch-size", "768", "--sharding", "auto"];
    let (single, _) = report(None, &args[..2]);
    let args = [
        &args[..],
        &["--rank-memory-gib", &budget, "--deterministic"],
    ]
    .concat();
    let (sharded, stdout) = report(Some(3), &args);
    let placement = &sharded["plan"]["placement"];
    assert_eq!(
        placement[4]["rows"],
        serde_json::json!([0, 1667, 3334, 5000]),
        "{placement}"
    );
    assert!(placement[7].get("owner").is_some(), "{placement}");
    assert!(stdout.contains("rows 4[1667..3334]"), "{stdout}");
    for m in METRICS {
        assert_eq!(single[m], sharded[m], "auto on 3 ranks: {m}");
    }
    // Room for 1,473 rows a rank past the replicas: table 4's 5,000 rows fit on no 2 ranks.
    let dir = tempfile::tempdir().unwrap();
    let budget = gib_of_rows(3_560.0 + 1_473.0);
    let args = ["--sharding", "auto", "--rank-memory-gib", &budget];
    let o = train(Some(2), &args, dir.path());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains(
            "table 4 (320000 bytes with its optimizer state) fits on no rank even split row-wise"
        ),
        "{stderr}"
    );
    assert!(!dir.path().join("report.json").exists());
}

/// The licensed sample (8,000 real Kaggle rows, never committed): every table split row-wise
/// on 2 and 4 ranks gives the single-process held-out metrics bit for bit (batches of 256 and
/// 1280: whole chunks; the last partial batch dropped, as the ranks need whole batches).
#[test]
#[ignore = "needs the licensed Criteo sample: DLRM_CRITEO_SAMPLE (.ci/run sets it and runs --ignored)"]
fn criteo_sample_with_row_shards_gives_the_single_process_metrics() {
    let path = std::env::var("DLRM_CRITEO_SAMPLE")
        .expect("DLRM_CRITEO_SAMPLE must name criteo_sample_train.txt");
    if !mpirun_found() {
        return;
    }
    for (n, batch) in [(2, "256"), (4, "1280")] {
        let args = [
            "--criteo",
            &path,
            "--optimizer",
            "adagrad",
            "--mini-batch-size",
            batch,
        ];
        let args = [&args[..], &["--drop-last-batch"]].concat();
        let (single, _) = report(None, &args);
        let sharded_args = [&args[..], &["--deterministic", "--sharding", "row"]].concat();
        let (sharded, _) = report(Some(n), &sharded_args);
        for m in METRICS {
            assert_eq!(
                single[m], sharded[m],
                "Criteo sample, rows on {n} ranks: {m}"
            );
        }
    }
}
