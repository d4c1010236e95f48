//! Checkpoints of `dlrm train` on MPI ranks (built with `--features mpi`; the tests start
//! `mpirun` and are skipped, saying so, when it is not on PATH): a distributed run saves the
//! checkpoint one process saves (`dlrm export` gives the same safetensors, byte for byte, with
//! --deterministic), resumes it on another number of ranks, records its run in --log-dir from
//! rank 0 only, and a rank crashing in the middle of a save (`DLRM_CRASH_AT=<phase>@<rank>`)
//! ends the job and leaves `LATEST` on the previous complete version. The library's
//! tests/distributed_checkpoint.rs checks every parameter on ranks run as threads.

#[cfg(feature = "mpi")]
mod support;

#[cfg(feature = "mpi")]
mod mpi {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    use super::support::mpi::{dlrm_train, mpirun_found};

    const DLRM: &str = env!("CARGO_BIN_EXE_dlrm");

    /// `dlrm train` on the tiny preset's synthetic data (8 steps of 768 samples, Adagrad), on
    /// `ranks` MPI ranks (None: one plain process), with `env` set on every rank.
    fn train(ranks: Option<usize>, args: &[&str], env: Option<(&str, &str)>) -> Output {
        let forward: Vec<&str> = env.iter().map(|(name, _)| *name).collect();
        let mut cmd = dlrm_train(ranks, &forward);
        if ranks.is_some() {
            cmd.arg("--deterministic");
        }
        cmd.args(["--preset", "tiny", "--data-size", "6144"])
            .args(["--test-data-size", "1000", "--mini-batch-size", "768"])
            .args(["--optimizer", "adagrad", "--threads", "1", "--seed", "3"])
            .args(["--print-freq", "0"])
            .args(args)
            .env_remove("DLRM_CRASH_AT");
        if let Some((name, value)) = env {
            cmd.env(name, value);
        }
        cmd.output().expect("run dlrm")
    }

    fn ok(o: Output, what: &str) {
        assert!(
            o.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn arg(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// `dlrm export` of checkpoint folder `dir`: the file's bytes.
    fn export(dir: &Path) -> Vec<u8> {
        let out = dir.with_extension("safetensors");
        let o = Command::new(DLRM)
            .args(["export", "--load-model", arg(dir), "--out", arg(&out)])
            .output()
            .expect("run dlrm export");
        ok(o, "export");
        std::fs::read(out).unwrap()
    }

    fn latest(dir: &Path) -> PathBuf {
        dlrm::checkpoint::resolve(dir).unwrap()
    }

    #[test]
    fn distributed_checkpoints_resume_on_other_ranks_and_export_as_single_process_ones() {
        if !mpirun_found() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (single, whole, resumed, logs) = (
            tmp.path().join("single"),
            tmp.path().join("whole"),
            tmp.path().join("resumed"),
            tmp.path().join("logs"),
        );
        ok(
            train(None, &["--save-model", arg(&single)], None),
            "one process",
        );
        let want = export(&single);
        let args = ["--save-model", arg(&whole), "--log-dir", arg(&logs)];
        ok(train(Some(2), &args, None), "2 ranks");
        assert!(export(&whole) == want, "2 ranks export another model");
        // Rank 0 alone records the run.
        for f in ["config.json", "metrics.csv"] {
            assert!(logs.join(f).is_file(), "no {f} in --log-dir");
        }
        let meta = dlrm::checkpoint::read_meta(&latest(&whole)).unwrap();
        assert_eq!(meta.sharding.map(|s| s.ranks), Some(2));

        // Saved on 2 ranks at step 3, resumed on 3 ranks to the end.
        let save = ["--save-model", arg(&resumed), "--stop-after-steps", "3"];
        ok(train(Some(2), &save, None), "2 ranks, stopped");
        let resume = ["--load-model", arg(&resumed), "--save-model", arg(&resumed)];
        ok(train(Some(3), &resume, None), "resumed on 3 ranks");
        assert!(
            export(&resumed) == want,
            "resumed on 3 ranks: another model"
        );
    }

    #[test]
    fn a_rank_crashing_mid_save_leaves_latest_on_the_previous_version() {
        if !mpirun_found() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        let save = ["--save-model", arg(&dir), "--stop-after-steps", "2"];
        ok(train(Some(2), &save, None), "2 ranks, stopped");
        let before = latest(&dir);
        let resume = ["--load-model", arg(&dir), "--save-model", arg(&dir)];
        for phase in ["tables@1", "synced@1", "parameters@0"] {
            let o = train(Some(2), &resume, Some(("DLRM_CRASH_AT", phase)));
            assert!(!o.status.success(), "{phase}: the job should have failed");
            assert_eq!(latest(&dir), before, "{phase}: LATEST moved");
            dlrm::checkpoint::load_dlrm(&before, &dlrm::storage::StorageKind::Anon)
                .unwrap_or_else(|e| panic!("{phase}: {e:#}"));
        }
        // And the run resumes from it.
        ok(train(Some(2), &resume, None), "resumed after the crashes");
        assert_ne!(latest(&dir), before);
    }
}
