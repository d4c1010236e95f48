//! `dlrm train` on N MPI ranks (built with `--features mpi`; the tests start `mpirun` and are
//! skipped, saying so, when it is not on PATH): with --deterministic, N = 1 .. 4 ranks
//! (3 does not divide the tables evenly) give the held-out metrics of the single-process run
//! to the bit, for SGD, Adagrad and row-wise Adagrad; without it, within rounding; a batch the
//! ranks cannot split is refused. The library's tests/distributed.rs checks every parameter
//! on ranks run as threads. Without the feature, a distributed run is refused saying how to
//! build one.

#[test]
#[cfg(not(feature = "mpi"))]
fn without_the_feature_a_distributed_run_says_how_to_build_one() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(["train", "--distributed", "--num-batches", "2"])
        .output()
        .expect("run dlrm");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cargo build --release --features mpi"),
        "{stderr}"
    );
}

#[cfg(feature = "mpi")]
mod support;

#[cfg(feature = "mpi")]
mod mpi {
    use std::path::Path;
    use std::process::Output;

    use super::support::mpi::{dlrm_train, mpirun_found};

    /// `dlrm train` (synthetic data on the tiny preset unless --criteo), on `ranks` MPI ranks (None: one plain process).
    fn train(ranks: Option<usize>, args: &[&str], report: &Path) -> Output {
        let mut cmd = dlrm_train(ranks, &[]);
        if !args.contains(&"--criteo") {
            cmd.args(["--preset", "tiny", "--data-size", "6144"])
                .args(["--test-data-size", "2000"]);
        }
        cmd.args(["--threads", "1", "--seed", "3"])
            .args(args)
            .arg("--report-json")
            .arg(report)
            .output()
            .expect("run dlrm")
    }

    fn report(ranks: Option<usize>, args: &[&str]) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        let o = train(ranks, args, &path);
        assert!(
            o.status.success(),
            "{ranks:?} ranks {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    const METRICS: [&str; 4] = ["test_loss", "test_accuracy", "test_auc", "test_ne"];

    #[test]
    fn deterministic_ranks_give_the_single_process_metrics_bit_for_bit() {
        if !mpirun_found() {
            return;
        }
        let cases: &[(&str, &[usize])] = &[
            ("sgd", &[1, 2, 3, 4]),
            ("adagrad", &[3]),
            ("rowwise-adagrad", &[2]),
        ];
        for &(optimizer, rank_counts) in cases {
            for &n in rank_counts {
                // Slices of whole 128-row chunks: 768 / 3, 1024 / 4.
                let batch = if n == 4 { "1024" } else { "768" };
                let args = ["--optimizer", optimizer, "--mini-batch-size", batch];
                let single = report(None, &args);
                let args = [&args[..], &["--deterministic"]].concat();
                let sharded = report(Some(n), &args);
                assert_eq!(sharded["ranks"], n);
                assert_eq!(sharded["per_rank"].as_array().unwrap().len(), n);
                assert_eq!(sharded["plan"]["placement"].as_array().unwrap().len(), 8);
                for m in METRICS {
                    assert_eq!(single[m], sharded[m], "{optimizer} on {n} ranks: {m}");
                }
                // The same interval's mean loss (its ranks' sums are added in another order).
                let loss = |r: &serde_json::Value| r["train_loss"].as_f64().unwrap();
                let (a, b) = (loss(&single), loss(&sharded));
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs(),
                    "{optimizer} on {n} ranks: train_loss {b} against {a}"
                );
            }
        }
    }

    #[test]
    fn the_all_reduce_agrees_within_rounding_and_reports_its_collectives() {
        if !mpirun_found() {
            return;
        }
        let args = ["--optimizer", "adagrad", "--mini-batch-size", "512"];
        let single = report(None, &args);
        let sharded = report(Some(2), &args);
        for m in METRICS {
            let (a, b) = (single[m].as_f64().unwrap(), sharded[m].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4 * a.abs(), "{m}: {a} vs {b}");
        }
        let rank1 = &sharded["per_rank"][1]["collectives"];
        // The 12 training steps' collectives (the evaluation's are not counted).
        for c in [
            "forward_all_to_all",
            "backward_all_to_all",
            "dense_all_reduce",
        ] {
            assert_eq!(rank1[c]["calls"].as_u64(), Some(12), "{c}: {rank1}");
            assert!(rank1[c]["bytes"].as_u64().unwrap() > 0, "{c}: {rank1}");
        }
        let comm = sharded["comm_fraction"].as_f64().unwrap();
        assert!(comm > 0.0 && comm < 1.0, "comm_fraction {comm}");
    }

    /// The licensed sample (8,000 real Kaggle rows, never committed): 2 and 4 ranks give the
    /// single-process held-out metrics bit for bit (batches of 256 and 1280: whole chunks;
    /// the last partial batch dropped, as the ranks need whole batches).
    #[test]
    #[ignore = "needs the licensed Criteo sample: DLRM_CRITEO_SAMPLE (.ci/run sets it and runs --ignored)"]
    fn criteo_sample_on_2_and_4_ranks_gives_the_single_process_metrics() {
        let path = std::env::var("DLRM_CRITEO_SAMPLE")
            .expect("DLRM_CRITEO_SAMPLE must name criteo_sample_train.txt");
        if !mpirun_found() {
            return;
        }
        for (n, batch) in [(2, "256"), (4, "1280")] {
            let args = ["--criteo", &path, "--optimizer", "adagrad"];
            let args = [
                &args[..],
                &["--mini-batch-size", batch, "--drop-last-batch"],
            ]
            .concat();
            let single = report(None, &args);
            let sharded = report(Some(n), &[&args[..], &["--deterministic"]].concat());
            for m in METRICS {
                assert_eq!(single[m], sharded[m], "Criteo sample on {n} ranks: {m}");
            }
        }
    }

    #[test]
    fn a_batch_the_ranks_cannot_split_is_refused() {
        if !mpirun_found() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let o = train(
            Some(3),
            &["--mini-batch-size", "1000"],
            &dir.path().join("r.json"),
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(stderr.contains("not divisible by the 3 ranks"), "{stderr}");
    }
}
