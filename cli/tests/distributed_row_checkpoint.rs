//! Checkpoints of row-split tables from `dlrm train --sharding row` on MPI ranks (built with
//! `--features mpi`; the tests start `mpirun` and are skipped, saying so, when it is not on
//! PATH): each range's owner writes its rows into the table's one file, so the version holds a
//! single process's files (the tables byte for byte), `dlrm export` gives the single-process
//! safetensors byte for byte (--deterministic), a version saved row-wise on 3 ranks resumes
//! row-wise on 2, and a rank crashing once it has written its rows
//! (`DLRM_CRASH_AT=tables@1`) leaves `LATEST` on the previous version, which resumes. The
//! library's tests/distributed_row_checkpoint.rs checks every parameter on ranks as threads.

#[cfg(feature = "mpi")]
mod support;

#[cfg(feature = "mpi")]
mod mpi {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    use super::support::mpi::{dlrm_train, mpirun_found};

    const DLRM: &str = env!("CARGO_BIN_EXE_dlrm");

    /// `dlrm train` on the tiny preset's synthetic data (8 steps of 768 samples, row-wise
    /// Adagrad), on `ranks` MPI ranks with every table split row-wise (None: one plain
    /// process), with `env` set on every rank.
    fn train(ranks: Option<usize>, args: &[&str], env: Option<(&str, &str)>) -> Output {
        let forward: Vec<&str> = env.iter().map(|(name, _)| *name).collect();
        let mut cmd = dlrm_train(ranks, &forward);
        if ranks.is_some() {
            cmd.args(["--deterministic", "--sharding", "row"]);
        }
        cmd.args(["--preset", "tiny", "--data-size", "6144"])
            .args(["--test-data-size", "1000", "--mini-batch-size", "768"])
            .args(["--optimizer", "rowwise-adagrad", "--threads", "1"])
            .args(["--seed", "4", "--print-freq", "0"])
            .args(args)
            .env_remove("DLRM_CRASH_AT");
        if let Some((name, value)) = env {
            cmd.env(name, value);
        }
        cmd.output().expect("run dlrm")
    }

    fn ok(o: Output, what: &str) -> String {
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(o.status.success(), "{what}: {out}{err}");
        out
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

    /// The table and optimizer-state files of a version, with their bytes.
    fn table_files(version: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(version)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().into_string().unwrap(), e.path()))
            .filter(|(name, _)| name.starts_with("table_"))
            .map(|(name, path)| (name, std::fs::read(path).unwrap()))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn row_split_checkpoints_export_and_resume_as_single_process_ones() {
        if !mpirun_found() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (single, whole, resumed) = (
            tmp.path().join("single"),
            tmp.path().join("whole"),
            tmp.path().join("resumed"),
        );
        ok(
            train(None, &["--save-model", arg(&single)], None),
            "one process",
        );
        let want = export(&single);
        let out = ok(
            train(Some(2), &["--save-model", arg(&whole)], None),
            "2 ranks",
        );
        assert!(out.contains(", rows 0["), "the plan splits rows: {out}");
        assert!(export(&whole) == want, "2 ranks export another model");
        let (got, single_tables) = (table_files(&latest(&whole)), table_files(&latest(&single)));
        assert_eq!(got.len(), single_tables.len(), "the table files");
        assert!(got == single_tables, "the table files differ");
        let meta = dlrm::checkpoint::read_meta(&latest(&whole)).unwrap();
        assert_eq!(meta.sharding.map(|s| s.ranks), Some(2));

        // Saved row-wise on 3 ranks at step 3, resumed row-wise on 2 ranks to the end.
        let save = ["--save-model", arg(&resumed), "--stop-after-steps", "3"];
        ok(train(Some(3), &save, None), "3 ranks, stopped");
        let resume = ["--load-model", arg(&resumed), "--save-model", arg(&resumed)];
        ok(train(Some(2), &resume, None), "resumed on 2 ranks");
        assert!(
            export(&resumed) == want,
            "resumed on 2 ranks: another model"
        );
    }

    #[test]
    fn a_rank_crashing_after_writing_its_rows_leaves_latest_on_the_previous_version() {
        if !mpirun_found() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        let save = ["--save-model", arg(&dir), "--stop-after-steps", "2"];
        ok(train(Some(2), &save, None), "2 ranks, stopped");
        let before = latest(&dir);
        let resume = ["--load-model", arg(&dir), "--save-model", arg(&dir)];
        let o = train(Some(2), &resume, Some(("DLRM_CRASH_AT", "tables@1")));
        assert!(!o.status.success(), "the job should have failed");
        assert_eq!(latest(&dir), before, "LATEST moved");
        dlrm::checkpoint::load_dlrm(&before, &dlrm::storage::StorageKind::Anon).unwrap();
        // And the run resumes from it, to the model one process trains.
        ok(train(Some(2), &resume, None), "resumed after the crash");
        assert_ne!(latest(&dir), before);
        let single = tmp.path().join("single");
        ok(
            train(None, &["--save-model", arg(&single)], None),
            "one process",
        );
        assert!(export(&dir) == export(&single), "resumed: another model");
    }
}
