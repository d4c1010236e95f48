//! Checkpoints: resuming is exact, a crash at any phase of a save leaves the previous
//! checkpoint loadable and intact, training never writes through to a checkpoint, and a
//! damaged or mismatched checkpoint is an error naming the file.

mod support;

use dlrm::cancel::Cancel;
use dlrm::checkpoint::{self, TrainState};
use dlrm::config::Preset;
use dlrm::data::Batch;
use dlrm::data::synthetic::{Generation, SyntheticConfig, SyntheticData, SyntheticSource};
use dlrm::model::OptimizerKind;
use dlrm::model::architecture::Architecture;
use dlrm::model::dlrm::Dlrm;
use dlrm::storage::StorageKind;
use dlrm::train::{CheckpointPolicy, DataSource, LrSchedule, Quiet, TrainOptions, train};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::SHORT_TRAIN;

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "dlrm-ckpt-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Synthetic data whose batch order is shuffled every epoch, as a real dataset's is.
struct Shuffled(SyntheticSource);

impl DataSource for Shuffled {
    fn train_len(&self) -> u64 {
        self.0.train_len()
    }
    fn test_len(&self) -> u64 {
        self.0.test_len()
    }
    fn fill_train(&self, first: u64, size: usize, batch: &mut Batch) -> anyhow::Result<()> {
        self.0.fill_train(first, size, batch)
    }
    fn fill_test(&self, first: u64, size: usize, batch: &mut Batch) -> anyhow::Result<()> {
        self.0.fill_test(first, size, batch)
    }
    fn shuffle(&self) -> bool {
        true
    }
}

fn arch() -> Architecture {
    Preset::Tiny.values().architecture()
}

fn source() -> Shuffled {
    let a = arch();
    let data = SyntheticData::new(SyntheticConfig {
        num_dense: a.num_dense(),
        table_sizes: a.table_sizes.clone(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 1,
        fixed_bag_size: true,
        seed: 3,
    });
    Shuffled(SyntheticSource::new(data, 64 * 10, 512))
}

fn options(nepochs: usize, ckpt: Option<&Path>, resume: Option<TrainState>) -> TrainOptions {
    TrainOptions {
        batch_size: 64,
        num_batches: 0,
        nepochs,
        lr: LrSchedule {
            base: 0.05,
            warmup_steps: 3,
            decay_start_step: 4,
            decay_steps: 40,
        },
        test_freq: 0,
        print_freq: 0,
        test_batch_size: 256,
        keep_last_batch: true,
        seed: 9,
        checkpoint: ckpt.map(|dir| CheckpointPolicy {
            dir: dir.to_path_buf(),
            every: 7,
            keep: 2,
            dataset_files: None,
        }),
        resume,
        stop_after_steps: None,
        cancel: Cancel::never(),
    }
}

fn bits(m: &Dlrm) -> Vec<u32> {
    let mut v = Vec::new();
    for l in m.bottom.layers.iter().chain(&m.top.layers) {
        v.extend(l.weight.iter().chain(&l.bias).map(|x| x.to_bits()));
    }
    for (sw, sb) in m.dense_state() {
        v.extend(sw.iter().chain(sb).map(|x| x.to_bits()));
    }
    for (t, s) in m.embeddings.tables.iter().zip(&m.embeddings.states) {
        v.extend(t.weights().iter().chain(s.as_slice()).map(|x| x.to_bits()));
    }
    v
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
}

#[test]
fn resuming_is_bit_identical_to_training_straight_through() {
    for (optimizer, storage_kind) in [
        (OptimizerKind::Adagrad, "anon"),
        (OptimizerKind::RowwiseAdagrad, "file"),
    ] {
        pool().install(|| {
            let data = source();
            // Straight through: 3 epochs of 10 steps.
            let mut straight = Dlrm::new(arch(), optimizer, &StorageKind::Anon, 9).unwrap();
            train(&mut straight, &data, &options(3, None, None), 2, &mut Quiet).unwrap();

            // 2 epochs with checkpoints (every 7 steps and at the end), then resume to 3.
            let dir = TempDir::new("resume");
            let mut first = Dlrm::new(arch(), optimizer, &StorageKind::Anon, 9).unwrap();
            train(
                &mut first,
                &data,
                &options(2, Some(&dir.0), None),
                2,
                &mut Quiet,
            )
            .unwrap();
            drop(first);
            let version = checkpoint::resolve(&dir.0).unwrap();
            let tables = TempDir::new("tables");
            let storage = match storage_kind {
                "anon" => StorageKind::Anon,
                _ => StorageKind::File {
                    dir: tables.0.clone(),
                    lazy_init: false,
                },
            };
            let (mut resumed, meta) = checkpoint::load_dlrm(&version, &storage).unwrap();
            assert_eq!(meta.train_state.step, 20);
            let saved_files = file_digests(&version);
            train(
                &mut resumed,
                &data,
                &options(3, None, Some(meta.train_state)),
                2,
                &mut Quiet,
            )
            .unwrap();
            assert!(
                bits(&resumed) == bits(&straight),
                "{optimizer:?}/{storage_kind}: resumed model differs"
            );
            // Training on never wrote through to the checkpoint it started from.
            assert_eq!(file_digests(&version), saved_files);
        });
    }
}

/// A cheap content digest of every file of a folder.
fn file_digests(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            (e.file_name().to_string_lossy().into_owned(), h)
        })
        .collect();
    v.sort();
    v
}

fn dlrm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dlrm"))
}

#[test]
fn a_crash_at_any_phase_of_a_save_leaves_a_loadable_checkpoint() {
    let dir = TempDir::new("crash");
    let d = dir.0.to_str().unwrap();
    let ok = dlrm()
        .args(SHORT_TRAIN)
        .arg("--print-freq=0")
        .args(["--optimizer", "adagrad", "--save-model", d])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let first = checkpoint::resolve(&dir.0).unwrap();
    let first_files = file_digests(&first);
    for (i, phase) in [
        "tables",
        "parameters",
        "synced",
        "renamed",
        "latest-written",
        "latest-replaced",
        "pruned",
    ]
    .into_iter()
    .enumerate()
    {
        // One more epoch than any earlier run, so the run has steps left whichever version
        // LATEST names (a run with none has nothing to do, and saves nothing).
        let nepochs = (i + 2).to_string();
        let out = dlrm()
            .args(SHORT_TRAIN)
            .arg("--print-freq=0")
            .args(["--nepochs", &nepochs, "--load-model", d, "--save-model", d])
            .env("DLRM_CRASH_AT", phase)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{phase}: the save should have aborted"
        );
        // Whatever LATEST names now is complete and loads; the first version is intact.
        let latest = checkpoint::resolve(&dir.0).unwrap();
        checkpoint::load_dlrm(&latest, &StorageKind::Anon)
            .unwrap_or_else(|e| panic!("{phase}: {e:#}"));
        if first.exists() {
            assert_eq!(
                file_digests(&first),
                first_files,
                "{phase}: first version changed"
            );
        }
        let expect_new = matches!(phase, "latest-replaced" | "pruned");
        assert_eq!(
            latest != first,
            expect_new,
            "{phase}: LATEST is {}",
            latest.display()
        );
    }
}

#[test]
fn damaged_or_mismatched_checkpoints_are_errors_naming_the_file() {
    let dir = TempDir::new("bad");
    let d = dir.0.to_str().unwrap();
    let ok = dlrm()
        .args(SHORT_TRAIN)
        .arg("--print-freq=0")
        .args(["--optimizer", "adagrad", "--save-model", d])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let version = checkpoint::resolve(&dir.0).unwrap();
    let run = |extra: &[&str]| {
        let out = dlrm()
            .args(SHORT_TRAIN)
            .arg("--print-freq=0")
            .args(["--load-model", d])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--arch-mlp-bot", "13-32-16"]);
    assert!(
        e.contains("--arch-mlp-bot") && e.contains("13-64-16"),
        "{e}"
    );
    let e = run(&["--optimizer", "sgd"]);
    assert!(e.contains("--optimizer"), "{e}");

    let table = version.join("table_002.emb");
    let original = std::fs::read(&table).unwrap();
    std::fs::write(&table, &original[..original.len() / 2]).unwrap();
    let e = run(&[]);
    assert!(
        e.contains("table_002.emb") && e.contains("truncated"),
        "{e}"
    );
    let mut foreign = original.clone();
    foreign[..8].copy_from_slice(b"NOTATABL");
    std::fs::write(&table, &foreign).unwrap();
    let e = run(&[]);
    assert!(
        e.contains("table_002.emb") && e.contains("not a dlrm table"),
        "{e}"
    );
    std::fs::remove_file(&table).unwrap();
    let e = run(&[]);
    assert!(e.contains("table_002.emb"), "{e}");
    std::fs::write(&table, &original).unwrap();
    std::fs::write(version.join("dense.safetensors"), b"garbage").unwrap();
    let e = run(&[]);
    assert!(e.contains("dense.safetensors"), "{e}");
    std::fs::write(dir.0.join("LATEST"), "nothing-here\n").unwrap();
    let e = run(&[]);
    assert!(e.contains("LATEST"), "{e}");
}
