//! The `dlrm` binary's stderr goes through `log`: info lines by default, only warnings and
//! errors with --quiet (never the error itself), more with -v, and RUST_LOG honoured; errors
//! the library raises name the command's flags, not the library's field names.

use std::process::{Command, Output};

fn dlrm(args: &[&str], rust_log: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dlrm"));
    cmd.args(args).env_remove("RUST_LOG");
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    cmd.output().expect("run dlrm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A run of a few steps that evaluates once and reports every step.
const SHORT: [&str; 9] = [
    "train",
    "--num-batches",
    "4",
    "--mini-batch-size",
    "64",
    "--test-data-size",
    "256",
    "--print-freq",
    "1",
];

#[test]
fn info_lines_are_printed_by_default_and_silenced_by_quiet() {
    let loud = dlrm(&SHORT, None);
    assert_eq!(loud.status.code(), Some(0), "{}", stderr(&loud));
    let text = stderr(&loud);
    assert!(text.contains("DLRM: bottom 13-64-16"), "{text}");
    assert!(text.contains("data: "), "{text}");
    assert!(text.contains("step 4/4 (epoch 0): loss"), "{text}");
    // The plain format: no level or module prefix on info lines.
    assert!(!text.contains("INFO"), "{text}");

    let mut quiet_args = vec!["--quiet"];
    quiet_args.extend(SHORT);
    let quiet = dlrm(&quiet_args, None);
    assert_eq!(quiet.status.code(), Some(0), "{}", stderr(&quiet));
    assert_eq!(stderr(&quiet), "", "--quiet leaves stderr empty on success");
    // The summary is the command's output, on stdout: --quiet keeps it.
    assert!(String::from_utf8_lossy(&quiet.stdout).contains("training summary"));

    // The global flag is accepted after the subcommand too.
    let mut after = SHORT.to_vec();
    after.push("-q");
    let o = dlrm(&after, None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
}

#[test]
fn quiet_never_silences_an_error() {
    let o = dlrm(&["-q", "train", "--learning-rate", "0"], None);
    assert_eq!(o.status.code(), Some(1));
    let text = stderr(&o);
    assert!(text.starts_with("error: --learning-rate 0"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn rust_log_selects_the_lines() {
    // RUST_LOG=warn drops the info lines as --quiet does.
    let o = dlrm(&SHORT, Some("warn"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    // -v and --quiet contradict each other.
    let o = dlrm(&["-v", "-q", "train"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--quiet"), "{}", stderr(&o));
}

#[test]
fn library_errors_name_the_flags_of_the_command() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["train", "--arch-embedding-size", "10-0-5"],
            "--arch-embedding-size: '10-0-5': item 2 is 0",
        ),
        (
            &[
                "train",
                "--lr-num-warmup-steps",
                "10",
                "--lr-decay-start-step",
                "5",
                "--lr-num-decay-steps",
                "5",
            ],
            "--lr-decay-start-step 5 is before the end of the warm-up (--lr-num-warmup-steps 10)",
        ),
        (
            &["train", "--arch-mlp-bot", "13-64-32"],
            "--arch-mlp-bot: the bottom MLP ends in 32 outputs but --arch-sparse-feature-size is 16",
        ),
        (
            &["train", "--arch-mlp-top", "64-2"],
            "--arch-mlp-top: the top MLP must end in 1 output",
        ),
        (
            &["train", "--max-ind-range", "0"],
            "--max-ind-range must be at least 1",
        ),
        (
            &["train", "--model", "dcn", "--weight-decay", "0.1"],
            "--weight-decay applies to --model fm and mf, not dcn",
        ),
    ];
    for (args, needle) in cases {
        let o = dlrm(args, None);
        let text = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: {text}");
        assert!(!text.contains("panicked"), "{args:?}: {text}");
        for field in [
            "table_sizes",
            "decay_start_step",
            "embedding_dim",
            "max_ind_range",
        ] {
            assert!(!text.contains(field), "{args:?} names a field: {text}");
        }
    }
}
