//! Files, locks, cleanup and signals: one run per checkpoint folder, pruning within a run's
//! lineage, outputs that never replace their inputs or existing files unasked, table creation
//! that checks space first and leaves nothing behind, and SIGINT/SIGTERM that stop the work,
//! remove partial outputs and exit 130/143.

use dlrm::checkpoint;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::dlrm as run;
use support::{SHORT_TRAIN, Scratch, assert_error, assert_ok, stderr};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn dlrm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dlrm"))
}

/// The names in `dir` that start with `prefix`.
fn entries(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn run_id(version: &Path) -> String {
    checkpoint::read_meta(version).unwrap().train_state.run_id
}

/// Polls `ready` every 10 ms until it holds (panics after a minute, killing `child`).
fn wait_for(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("dlrm ended ({status}) before {what}");
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn send(child: &Child, signal: libc::c_int) {
    // SAFETY: kill takes plain integers; the child has not been waited for, so its pid is ours.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill failed");
}

/// Runs `dlrm synth` of `rows` synthetic Criteo rows with small vocabularies into `file`.
fn synth_run(file: &Path, rows: u64, extra: &[&str]) -> Output {
    let sizes = vec!["50"; 26].join("-");
    let rows = rows.to_string();
    let args = ["synth", "--rows", &rows, "--arch-embedding-size", &sizes];
    run(&[&args[..], &["--threads", "2", "--out", s(file)], extra].concat())
}

fn synth(file: &Path, rows: u64) {
    assert_ok(&synth_run(file, rows, &[]));
}

#[test]
fn a_second_run_cannot_save_into_a_folder_in_use() {
    let dir = Scratch::new("lock");
    let ck = dir.path("ck");
    // The first run holds the folder, paused in its first save.
    let mut first = dlrm()
        .args(SHORT_TRAIN)
        .arg("--print-freq=0")
        .args(["--save-model", s(&ck)])
        .env("DLRM_PAUSE_AT", "parameters")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&mut first, "the first save", || {
        entries(&ck, ".tmp-ckpt-").len() == 1
    });
    let t = Instant::now();
    let second = run(&[
        &SHORT_TRAIN[..],
        &["--print-freq=0"],
        &["--save-model", s(&ck)],
    ]
    .concat());
    let pid = first.id().to_string();
    assert_error(&second, &[s(&ck), &format!("pid {pid}")]);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the second run waited"
    );
    // Even with --overwrite and --load-model it may not.
    let second = run(&[
        &SHORT_TRAIN[..],
        &["--print-freq=0"],
        &["--save-model", s(&ck), "--overwrite"],
    ]
    .concat());
    assert_error(&second, &[s(&ck), &format!("pid {pid}")]);

    // SIGTERM in the middle of the save: exit 143, no temporary folder left.
    send(&first, libc::SIGTERM);
    let out = first.wait_with_output().unwrap();
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(143), "{e}");
    assert!(
        e.contains("interrupted: removed") && e.contains(".tmp-ckpt-"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(entries(&ck, ".tmp-"), Vec::<String>::new());
    assert_eq!(entries(&ck, "ckpt-"), Vec::<String>::new());

    // The lock went with the process: the folder is free again.
    assert_ok(&run(&[
        &SHORT_TRAIN[..],
        &["--print-freq=0"],
        &["--save-model", s(&ck)],
    ]
    .concat()));
}

#[test]
fn another_runs_folder_is_refused_unless_resumed_or_overwritten() {
    let dir = Scratch::new("owner");
    let ck = dir.path("ck");
    let save = [
        "--save-model",
        s(&ck),
        "--save-every",
        "5",
        "--keep-checkpoints",
        "2",
    ];
    assert_ok(&run(
        &[&SHORT_TRAIN[..], &["--print-freq=0"], &save].concat()
    ));
    let old = entries(&ck, "ckpt-");
    assert_eq!(old.len(), 2, "{old:?}");
    let old_id = run_id(&ck.join(&old[0]));
    std::fs::write(ck.join("notes.txt"), "kept").unwrap();

    // A new run may not mix its checkpoints with the old run's.
    let o = run(&[&SHORT_TRAIN[..], &["--print-freq=0"], &save].concat());
    assert_error(&o, &["--save-model", s(&ck), "--overwrite", "--load-model"]);
    assert_eq!(entries(&ck, "ckpt-"), old);

    // Resuming from the same folder continues that run's lineage.
    let o = run(&[
        &SHORT_TRAIN[..],
        &["--print-freq=0"],
        &save,
        &["--load-model", s(&ck), "--nepochs", "2"],
    ]
    .concat());
    assert_ok(&o);
    let resumed = entries(&ck, "ckpt-");
    assert_eq!(
        resumed,
        ["ckpt-000000000035-000", "ckpt-000000000040-000"],
        "{}",
        stderr(&o)
    );
    assert_eq!(run_id(&ck.join(&resumed[1])), old_id);

    // --overwrite replaces the old run's versions (and only them).
    let o = run(&[
        &SHORT_TRAIN[..],
        &["--print-freq=0"],
        &save,
        &["--overwrite"],
    ]
    .concat());
    assert_ok(&o);
    let new = entries(&ck, "ckpt-");
    assert_eq!(new, ["ckpt-000000000015-000", "ckpt-000000000020-000"]);
    let new_id = run_id(&ck.join(&new[1]));
    assert_ne!(new_id, old_id);
    assert_eq!(run_id(&ck.join(&new[0])), new_id);
    assert_eq!(
        std::fs::read_to_string(ck.join("notes.txt")).unwrap(),
        "kept"
    );
    assert_eq!(
        checkpoint::resolve(&ck).unwrap(),
        ck.join("ckpt-000000000020-000")
    );
    // --overwrite without --save-model is a usage error.
    let o = run(&[&SHORT_TRAIN[..], &["--print-freq=0"], &["--overwrite"]].concat());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn pruning_keeps_this_runs_newest_versions_and_no_other_runs() {
    let dir = Scratch::new("prune");
    let ck = dir.path("ck");
    let save = [
        "--save-model",
        s(&ck),
        "--save-every",
        "5",
        "--keep-checkpoints",
        "2",
    ];
    assert_ok(&run(
        &[&SHORT_TRAIN[..], &["--print-freq=0"], &save].concat()
    ));
    // A version of another lineage that sorts after every version of this run.
    let first = entries(&ck, "ckpt-");
    let foreign = ck.join("ckpt-000000009999-000");
    std::fs::create_dir(&foreign).unwrap();
    for f in std::fs::read_dir(ck.join(&first[1])).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), foreign.join(f.file_name())).unwrap();
        }
    }
    let meta = std::fs::read_to_string(foreign.join("meta.json")).unwrap();
    let id = run_id(&foreign);
    std::fs::write(foreign.join("meta.json"), meta.replace(&id, "another-run")).unwrap();

    let o = run(&[
        &SHORT_TRAIN[..],
        &["--print-freq=0"],
        &save,
        &["--load-model", s(&ck), "--nepochs", "2"],
    ]
    .concat());
    assert_ok(&o);
    // This run's two newest versions are kept; the other run's version is not this run's to
    // prune.
    assert_eq!(
        entries(&ck, "ckpt-"),
        [
            "ckpt-000000000035-000",
            "ckpt-000000000040-000",
            "ckpt-000000009999-000"
        ],
        "{}",
        stderr(&o)
    );
    assert_eq!(
        checkpoint::resolve(&ck).unwrap(),
        ck.join("ckpt-000000000040-000")
    );
}

#[test]
fn outputs_never_replace_inputs_or_existing_files_unasked() {
    let dir = Scratch::new("outputs");
    let data = dir.path("data.tsv");
    synth(&data, 3000);
    let original = std::fs::read(&data).unwrap();
    let ck = dir.path("ck");
    assert_ok(&run(&[
        "train",
        "--criteo",
        s(&data),
        "--mini-batch-size",
        "128",
        "--arch-mlp-bot",
        "13-16",
        "--arch-mlp-top",
        "16-1",
        "--threads",
        "2",
        "--print-freq=0",
        "--save-model",
        s(&ck),
    ]));
    let predict = |out: &Path, extra: &[&str]| {
        let args = ["predict", "--load-model", s(&ck), "--criteo", s(&data)];
        run(&[&args[..], &["--out", s(out), "--threads", "2"], extra].concat())
    };

    // The input as the output: refused, with or without --force, also through a hard link.
    for extra in [&[][..], &["--force"]] {
        let o = predict(&data, extra);
        assert_error(&o, &["--out", s(&data), "is the input"]);
    }
    let link = dir.path("link.tsv");
    std::fs::hard_link(&data, &link).unwrap();
    let o = predict(&link, &["--force"]);
    assert_error(&o, &["--out", s(&link), "is the input"]);
    assert_eq!(std::fs::read(&data).unwrap(), original);

    // An existing file: only with --force.
    let probs = dir.path("probs.txt");
    std::fs::write(&probs, "precious").unwrap();
    let o = predict(&probs, &[]);
    assert_error(&o, &["--out", s(&probs), "already exists", "--force"]);
    assert_eq!(std::fs::read_to_string(&probs).unwrap(), "precious");
    assert_ok(&predict(&probs, &["--force"]));
    assert_eq!(
        std::fs::read_to_string(&probs).unwrap().lines().count(),
        3000
    );

    // export, synth and preprocess: the same rule.
    let exported = dir.path("model.safetensors");
    std::fs::write(&exported, "precious").unwrap();
    let export = |extra: &[&str]| {
        let args = ["export", "--load-model", s(&ck), "--out", s(&exported)];
        run(&[&args[..], extra].concat())
    };
    assert_error(&export(&[]), &["--out", s(&exported), "--force"]);
    assert_eq!(std::fs::read_to_string(&exported).unwrap(), "precious");
    assert_ok(&export(&["--force"]));
    // import saves checkpoints too: the same folder rules as train --save-model.
    let import = |extra: &[&str]| {
        let args = ["import", "--in", s(&exported), "--save-model", s(&ck)];
        run(&[&args[..], extra].concat())
    };
    assert_error(&import(&[]), &["--save-model", s(&ck), "--overwrite"]);
    assert_ok(&import(&["--overwrite"]));
    assert_eq!(entries(&ck, "ckpt-"), ["ckpt-000000000000-000"]);
    let version = checkpoint::resolve(&ck).unwrap();
    let dense = version.join("dense.safetensors");
    let o = run(&[
        "export",
        "--load-model",
        s(&ck),
        "--out",
        s(&dense),
        "--force",
    ]);
    assert_error(&o, &["--out", "is the input"]);

    let o = synth_run(&data, 10, &[]);
    assert_error(&o, &["--out", s(&data), "already exists", "--force"]);
    assert_eq!(std::fs::read(&data).unwrap(), original);
    let other = dir.path("other.tsv");
    synth(&other, 10);
    assert_ok(&synth_run(&other, 20, &["--force"]));
    assert_eq!(std::fs::read_to_string(&other).unwrap().lines().count(), 20);

    let ds = dir.path("ds");
    std::fs::create_dir(&ds).unwrap();
    std::fs::write(ds.join("old"), "old").unwrap();
    let o = run(&["preprocess", s(&data), "--out", s(&ds)]);
    assert_error(&o, &["--out", s(&ds), "already exists", "--force"]);
    assert!(ds.join("old").exists());
    let o = run(&["preprocess", s(&data), "--out", s(&data), "--force"]);
    assert_error(&o, &["--out", s(&data), "is the input"]);
    assert_eq!(std::fs::read(&data).unwrap(), original);
    let o = run(&[
        "preprocess",
        s(&data),
        "--out",
        s(&ds),
        "--force",
        "--threads",
        "2",
    ]);
    assert_ok(&o);
    assert!(!ds.join("old").exists() && ds.join("train").is_dir());
    assert_eq!(entries(&dir.0, "ds."), Vec::<String>::new());
}

#[test]
fn table_creation_checks_space_and_collisions_before_making_any_file() {
    let dir = Scratch::new("tables");
    let tables = dir.path("tables");
    std::fs::create_dir(&tables).unwrap();
    let train = |extra: &[&str]| {
        let args = [
            "train",
            "--embedding-storage",
            "file",
            "--tables-dir",
            s(&tables),
            "--num-batches",
            "2",
            "--threads",
            "2",
            "--print-freq=0",
        ];
        run(&[&args[..], extra].concat())
    };
    // The last table alone needs 4e9 x 16 x 4 bytes = 256 GB, more than the file system has;
    // the first tables fit. The check covers the whole model before the first file is made.
    let o = train(&["--arch-embedding-size", "100-200-4000000000"]);
    assert_error(&o, &[s(&tables), "needs", "free"]);
    assert_eq!(entries(&tables, ""), Vec::<String>::new());

    // A table file in the way: an error naming it, before any other file is made.
    std::fs::write(tables.join("table_001.emb"), "someone else's").unwrap();
    let o = train(&["--arch-embedding-size", "100-200-300"]);
    assert_error(&o, &["table_001.emb"]);
    assert_eq!(entries(&tables, ""), ["table_001.emb"]);
    std::fs::remove_file(tables.join("table_001.emb")).unwrap();
    // The rerun with the obstacle gone succeeds.
    assert_ok(&train(&["--arch-embedding-size", "100-200-300"]));
}

#[test]
fn sigint_and_sigterm_stop_preprocess_and_remove_its_partial_output() {
    let dir = Scratch::new("sig-preprocess");
    let data = dir.path("big.tsv");
    synth(&data, 400_000);
    let ds = dir.path("ds");
    // A partial output of a run that was killed (its pid is no longer running) is removed.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id()
    };
    let stale = dir.path(&format!("ds.partial-{dead}"));
    std::fs::create_dir(&stale).unwrap();
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut child = dlrm()
            .args(["preprocess", s(&data), "--out", s(&ds), "--threads", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let partial = dir.path(&format!("ds.partial-{}", child.id()));
        wait_for(&mut child, "the partial output", || partial.exists());
        send(&child, signal);
        let out = child.wait_with_output().unwrap();
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(
            e.contains(&format!("interrupted: removed {}", partial.display())),
            "{e}"
        );
        assert!(!stale.exists(), "{e}");
        assert_eq!(entries(&dir.0, "ds"), Vec::<String>::new());
    }
}

#[test]
fn signals_stop_training_on_criteo_and_remove_the_temporary_dataset() {
    let dir = Scratch::new("sig-criteo");
    let data = dir.path("data.tsv");
    synth(&data, 5000);
    let tmp = dir.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut child = dlrm()
            .args(["train", "--criteo", s(&data), "--mini-batch-size", "64"])
            .args(["--arch-mlp-bot", "13-16", "--arch-mlp-top", "16-1"])
            .args(["--nepochs", "100000", "--threads", "2", "--print-freq=0"])
            .env("TMPDIR", &tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Training has started once the temporary dataset is complete.
        wait_for(&mut child, "the temporary dataset", || {
            entries(&tmp, "dlrm-criteo-")
                .first()
                .is_some_and(|d| tmp.join(d).join("dataset").is_dir())
        });
        let temp = tmp.join(&entries(&tmp, "dlrm-criteo-")[0]);
        std::thread::sleep(Duration::from_millis(300));
        send(&child, signal);
        let out = child.wait_with_output().unwrap();
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(
            e.contains(&format!("interrupted: removed {}", temp.display())),
            "{e}"
        );
        assert_eq!(entries(&tmp, ""), Vec::<String>::new());
    }
}

#[test]
fn signals_stop_predict_and_remove_its_partial_output() {
    let dir = Scratch::new("sig-predict");
    let small = dir.path("small.tsv");
    synth(&small, 2000);
    let big = dir.path("big.tsv");
    synth(&big, 400_000);
    let ck = dir.path("ck");
    assert_ok(&run(&[
        "train",
        "--criteo",
        s(&small),
        "--mini-batch-size",
        "64",
        "--arch-mlp-bot",
        "13-16",
        "--arch-mlp-top",
        "16-1",
        "--threads",
        "2",
        "--print-freq=0",
        "--save-model",
        s(&ck),
    ]));
    let out = dir.path("p.txt");
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut child = dlrm()
            .args(["predict", "--load-model", s(&ck), "--criteo", s(&big)])
            .args([
                "--out",
                s(&out),
                "--threads",
                "1",
                "--mini-batch-size",
                "128",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let partial = dir.path(&format!("p.txt.partial-{}", child.id()));
        wait_for(&mut child, "the partial output", || partial.exists());
        send(&child, signal);
        let o = child.wait_with_output().unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{e}");
        assert!(
            e.contains(&format!("interrupted: removed {}", partial.display())),
            "{e}"
        );
        assert_eq!(entries(&dir.0, "p.txt"), Vec::<String>::new(), "{e}");
    }
}
