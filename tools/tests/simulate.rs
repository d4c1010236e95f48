//! `dlrm-scaling --simulate-ranks`: the alpha-beta projection reproduces the table of
//! docs/scaling-model.md, and its flags are checked.

mod common;

use common::{scaling, text};

#[test]
fn the_kaggle_projection_matches_the_scaling_model_table() {
    let o = scaling(&["--simulate-ranks", "8,64,512", "--mini-batch-size", "65536"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    // Rows of docs/scaling-model.md's table, computed there by hand from the same formulas.
    for row in [
        "| 8 | 25 Gb/s | 65536 | 604.57 | 7.70 | 1.14 | 1% | 7.9x |",
        "| 64 | 100 Gb/s | 65536 | 75.57 | 0.90 | 0.93 | 2% | 62.5x |",
        "| 512 | 25 Gb/s | 65536 | 9.45 | 5.25 | 6.33 | 55% | 230.1x |",
    ] {
        assert!(out.contains(row), "no `{row}` in\n{out}");
    }
    assert!(out.contains("475985 dense parameters"), "{out}");
}

#[test]
fn one_rank_has_no_communication() {
    let o = scaling(&["--simulate-ranks", "1", "--link-gbps", "10"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}");
    let row = (out.lines()).find(|l| l.starts_with("| 1 |")).expect(&out);
    assert!(row.ends_with("| 0.00 | 0.00 | 0% | 1.0x |"), "{row}");
}

#[test]
fn bad_projection_flags_are_named() {
    for (flag, value) in [
        ("--link-gbps", "0"),
        ("--alpha-us", "-1"),
        ("--compute-us-per-sample", "nan"),
    ] {
        let o = scaling(&["--simulate-ranks", "2", &format!("{flag}={value}")]);
        assert_eq!(o.status.code(), Some(1), "{flag} {value}");
        assert!(
            text(&o.stderr).contains(flag),
            "{flag}: {}",
            text(&o.stderr)
        );
    }
}
