//! `dlrm train --data-generation=dataset --data-set=kaggle` preprocesses raw rows exactly as
//! the reference does: its 7-day split, its dictionaries over every day numbered by first
//! appearance, `--max-ind-range` hashing before the numbering. Golden values come from the
//! reference's own code (tests/fixtures/make_refprep_fixtures.py) on the licensed Criteo
//! rows; the tests skip with a message when DLRM_CRITEO_SAMPLE is unset.

mod support;

use dlrm::data::binary::{DatasetHeader, Encoding};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use support::dataset::{CRITEO_TABLES, fnv1a64, id_columns, label_counts};
use support::{Scratch, assert_ok, dlrm};

/// The file a data variable names, or None (with a message) when it is unset.
fn data_env(var: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var).map(PathBuf::from);
    if path.is_none() {
        eprintln!("skipped: {var} is unset (it names the licensed data this test reads)");
    }
    path
}

/// What the golden script prints, read from a dataset folder, with the golden file's samples
/// looked up here.
fn view(ds: &Path, max_ind_range: i64, samples: &[Value]) -> Value {
    let header = DatasetHeader::read(ds).unwrap();
    let (mut rows, mut positives, mut ids) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut columns = BTreeMap::new();
    for split in ["train", "test", "val"] {
        let (n, positive) = label_counts(ds, split);
        rows.insert(split, n);
        positives.insert(split, positive);
        let tables = id_columns(ds, split);
        let hashes: Vec<String> = tables.iter().map(|c| fnv1a64(c)).collect();
        ids.insert(split, hashes);
        columns.insert(split, tables);
    }
    let dictionaries: Vec<String> = (0..CRITEO_TABLES)
        .map(|t| fnv1a64(&header.read_dictionary(ds, t).unwrap()))
        .collect();
    let samples: Vec<Value> = samples
        .iter()
        .map(|s| {
            let (split, row, table) = (
                s[0].as_str().unwrap(),
                s[1].as_u64().unwrap() as usize,
                s[2].as_u64().unwrap() as usize,
            );
            json!([split, row, table, columns[split][table][row]])
        })
        .collect();
    json!({
        "max_ind_range": max_ind_range,
        "rows": rows,
        "positives": positives,
        "table_sizes": header.table_sizes,
        "dictionary_fnv1a64": dictionaries,
        "id_fnv1a64": ids,
        "samples": samples,
    })
}

fn golden(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The reference's Kaggle path (`--data-randomize=none`, so that rows keep the order the
/// golden values have) on `raw`, trained for one small step; the dataset it keeps is
/// compared with the golden file.
fn check(raw: &Path, max_ind_range: i64, golden_name: &str, expected: Encoding) {
    let dir = Scratch::new(&format!("refprep{max_ind_range}"));
    let processed = dir.arg("processed");
    let raw_flag = format!("--raw-data-file={}", raw.display());
    let processed_flag = format!("--processed-data-file={processed}");
    let range_flag = format!("--max-ind-range={max_ind_range}");
    let o = dlrm(&[
        "train",
        "--data-generation=dataset",
        "--data-set=kaggle",
        &raw_flag,
        &processed_flag,
        &range_flag,
        "--data-randomize=none",
        "--arch-sparse-feature-size=2",
        "--arch-mlp-bot=13-2",
        "--arch-mlp-top=2-1",
        "--num-batches=1",
        "-q",
    ]);
    assert_ok(&o);
    let ds = Path::new(&processed);
    let want = golden(golden_name);
    let samples = want["samples"].as_array().unwrap();
    assert!(samples.len() > 20, "{golden_name}: too few samples");
    assert_eq!(view(ds, max_ind_range, samples), want, "{golden_name}");
    assert_eq!(DatasetHeader::read(ds).unwrap().encoding, expected);
}

/// Without --max-ind-range: every value of every day numbered by first appearance.
#[test]
fn kaggle_ids_and_splits_are_the_references() {
    let Some(raw) = data_env("DLRM_CRITEO_SAMPLE") else {
        return;
    };
    check(
        &raw,
        -1,
        "refprep_sample.json",
        Encoding::HashFirstSeen {
            max_ind_range: 1 << 32,
        },
    );
}

/// With --max-ind-range: values hashed modulo it (with collisions at 1000), then numbered.
#[test]
fn kaggle_ids_with_max_ind_range_are_the_references() {
    let Some(raw) = data_env("DLRM_CRITEO_SAMPLE") else {
        return;
    };
    check(
        &raw,
        1000,
        "refprep_sample_1000.json",
        Encoding::HashFirstSeen {
            max_ind_range: 1000,
        },
    );
}
