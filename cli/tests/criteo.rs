//! The real-data path end to end: Criteo rows (written by the project's synthetic writer, or
//! the licensed sample named by DLRM_CRITEO_SAMPLE) -> `preprocess` -> the binary dataset ->
//! training.

use dlrm::cancel::Cancel;
use dlrm::data::Batch;
use dlrm::data::binary::{BinaryDataset, DatasetSplit, Encoding, SplitRule};
use dlrm::data::criteo::{
    NUM_CATEGORICAL, NUM_DENSE, RawRow, SYNTHETIC_DENSE_SCALE, SyntheticTsv, dense_feature,
    parse_line, write_row,
};
use dlrm::data::preprocess::{
    CHUNK_BYTES, EMPTY_ID, EncodingChoice, FIRST_VALUE_ID, PreprocessOptions, PreprocessSummary,
    Progress, RARE_ID, Sources, preprocess,
};
use dlrm::data::synthetic::{Generation, Split, SyntheticConfig, SyntheticData};
use dlrm::model::OptimizerKind;
use dlrm::model::architecture::{Architecture, InteractionOp, join};
use dlrm::model::dlrm::Dlrm;
use dlrm::rng::SplitMix64;
use dlrm::storage::StorageKind;
use dlrm::train::{DataSource, LrSchedule, Quiet, TrainOptions, TrainReport, train};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The root package's counting allocator (the CLI package cannot name the root's test
/// modules, so the file is included by path).
#[path = "../../tests/common/alloc.rs"]
mod counting_alloc;

use counting_alloc::{CountingAllocator, allocations};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dlrm-criteo-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(files: Vec<PathBuf>, weights: [f64; 3], out: PathBuf) -> PreprocessOptions {
    PreprocessOptions {
        sources: Sources::Weights { files, weights },
        out,
        encoding: EncodingChoice::New(Encoding::Dictionary { min_frequency: 1 }),
        labelled: true,
        skip_bad_lines: false,
        shuffle_seed: None,
        chunk_bytes: CHUNK_BYTES,
        progress: Progress::none(),
        cancel: Cancel::never(),
    }
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

fn run_preprocess(opts: &PreprocessOptions, threads: usize) -> anyhow::Result<PreprocessSummary> {
    in_pool(threads, || preprocess(opts))
}

/// Table sizes of the synthetic Criteo rows: small and varied, so that a short run sees each
/// id often enough to learn it.
fn small_tables() -> Vec<usize> {
    (0..NUM_CATEGORICAL)
        .map(|t| [2, 5, 10, 20, 50, 100, 300][t % 7])
        .collect()
}

fn teacher(seed: u64) -> SyntheticData {
    SyntheticData::new(SyntheticConfig {
        num_dense: NUM_DENSE,
        table_sizes: small_tables(),
        generation: Generation::Teacher,
        zipf_alpha: 1.05,
        num_indices_per_lookup: 1,
        fixed_bag_size: true,
        seed,
    })
}

/// Writes `rows` teacher-labelled Criteo rows to `path`.
fn write_synthetic(path: &Path, rows: u64, seed: u64) {
    let tsv = SyntheticTsv::new(teacher(seed)).unwrap();
    let mut batch = Batch::default();
    let mut out = Vec::new();
    tsv.write_rows(0, rows as usize, true, &mut batch, &mut out);
    std::fs::write(path, out).unwrap();
}

/// Every file of a folder, by relative path.
fn folder_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut all = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                all.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    all
}

fn kaggle_mlps(table_sizes: &[u64], bottom: &str, top: &str) -> Architecture {
    let sizes: Vec<usize> = table_sizes.iter().map(|&n| n as usize).collect();
    Architecture::from_flags(16, &join(&sizes), bottom, top, InteractionOp::Dot, false).unwrap()
}

fn train_options(batch_size: usize, lr: f32, nepochs: usize, seed: u64) -> TrainOptions {
    TrainOptions {
        nepochs,
        seed,
        test_batch_size: 1024,
        ..TrainOptions::new(batch_size, LrSchedule::constant(lr))
    }
}

fn train_on(
    data: &BinaryDataset,
    arch: Architecture,
    optimizer: OptimizerKind,
    opts: &TrainOptions,
    seed: u64,
    threads: usize,
) -> TrainReport {
    in_pool(threads, || {
        let mut model = Dlrm::new(arch, optimizer, &StorageKind::Anon, seed).unwrap();
        train(&mut model, data, opts, threads, &mut Quiet).unwrap()
    })
}

#[test]
fn synthetic_rows_parse_back_to_what_the_generator_drew() {
    let data = teacher(5);
    let mut batch = Batch::default();
    data.fill_batch(Split::Train, 0, 300, &mut batch);
    let tsv = SyntheticTsv::new(teacher(5)).unwrap();
    let mut text = Vec::new();
    tsv.write_rows(0, 300, true, &mut Batch::default(), &mut text);
    let mut row = RawRow::default();
    let mut categories: Vec<HashMap<u32, u32>> = vec![HashMap::new(); NUM_CATEGORICAL];
    let lines: Vec<&[u8]> = text
        .strip_suffix(b"\n")
        .unwrap()
        .split(|&b| b == b'\n')
        .collect();
    assert_eq!(lines.len(), 300);
    for (i, line) in lines.iter().enumerate() {
        parse_line(line, true, &mut row).unwrap();
        assert_eq!(row.label, batch.labels[i] > 0.5);
        for (j, &x) in batch.dense_row(i).iter().enumerate() {
            // What the model sees after preprocessing is SCALE * x, up to the rounding of n.
            let seen = dense_feature(row.dense[j]);
            let n = row.dense[j].unwrap() as f32;
            let step = (n + 1.5).ln() - (n + 0.5).max(1.0).ln();
            assert!(
                (seen - SYNTHETIC_DENSE_SCALE * x).abs() <= step.max(0.41),
                "row {i} feature {j}: {seen} for x = {x}"
            );
        }
        // Each id maps to one category and each category to one id.
        for (t, map) in categories.iter_mut().enumerate() {
            let id = batch.bag(t, i)[0];
            let cat = row.categorical[t].unwrap();
            assert_eq!(*map.entry(cat).or_insert(id), id, "table {t}");
        }
    }
    assert!(
        SyntheticTsv::new(SyntheticData::new(SyntheticConfig {
            table_sizes: vec![10; 8],
            ..data.config().clone()
        }))
        .is_err()
    );
}

#[test]
fn preprocess_then_train_learns_teacher_rows() {
    let dir = Scratch::new("teacher");
    let file = dir.path("teacher.tsv");
    let rows = 60_000;
    write_synthetic(&file, rows, 3);
    let out = dir.path("ds");
    let s = run_preprocess(&options(vec![file], [0.8, 0.1, 0.1], out.clone()), 2).unwrap();
    assert_eq!(
        (s.rows.train, s.rows.val, s.rows.test),
        (48_000, 6_000, 6_000)
    );
    assert_eq!(s.lines, rows);
    for (t, (&got, &ids)) in s.table_sizes.iter().zip(&small_tables()).enumerate() {
        // The ids seen in training, plus the empty and rare rows.
        assert!(got >= 3 && got <= ids as u64 + 2, "table {t}: {got} rows");
    }
    let data = BinaryDataset::open(&out).unwrap();
    let arch = kaggle_mlps(&data.header().table_sizes, "13-64-16", "64-1");
    let report = train_on(
        &data,
        arch,
        OptimizerKind::Sgd,
        &train_options(128, 0.5, 2, 1),
        1,
        2,
    );

    // The teacher's own AUC on the same test rows (rows 54000.. of the generator).
    let mut batch = Batch::default();
    let generator = teacher(3);
    generator.fill_batch(Split::Train, 54_000, 6_000, &mut batch);
    let mut probs = Vec::new();
    assert!(generator.teacher_probabilities(&batch, &mut probs));
    let ceiling = dlrm::metrics::roc_auc(&probs, &batch.labels).unwrap();
    assert!(
        report.test_auc > 0.68 && report.test_auc > ceiling - 0.12,
        "test AUC {} (teacher {ceiling})",
        report.test_auc
    );
    assert_eq!(report.steps, 2 * 375);
}

/// Rows with few distinct values (so that counts matter), empty fields and negatives.
fn random_rows(n: usize, seed: u64) -> Vec<RawRow> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| RawRow {
            label: rng.bernoulli(0.3),
            dense: std::array::from_fn(|_| match rng.below(5) {
                0 => None,
                1 => Some(-(rng.below(3) as i64)),
                _ => Some(rng.below(5000) as i64),
            }),
            categorical: std::array::from_fn(|t| match rng.below(6) {
                0 => None,
                _ => Some(0x10_0000 * t as u32 + rng.below(1 + t as u64) as u32 * 0x01_0001),
            }),
        })
        .collect()
}

/// The rows as a file: LF and CRLF line ends, the last line without one.
fn write_rows(path: &Path, rows: &[RawRow], labelled: bool) {
    let mut text = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        write_row(r, labelled, &mut text);
        if i % 3 == 1 {
            text.pop();
            text.extend_from_slice(b"\r\n");
        }
    }
    text.pop();
    std::fs::write(path, text).unwrap();
}

/// The dictionary the documentation describes: values seen at least `k` times in `train`,
/// by decreasing count then value, from FIRST_VALUE_ID.
fn oracle_dictionary(train: &[RawRow], table: usize, k: u32) -> HashMap<u32, u32> {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for r in train {
        if let Some(v) = r.categorical[table] {
            *counts.entry(v).or_default() += 1;
        }
    }
    let mut kept: Vec<(u32, u32)> = counts.into_iter().filter(|&(_, c)| c >= k).collect();
    kept.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    kept.iter()
        .enumerate()
        .map(|(i, &(v, _))| (v, FIRST_VALUE_ID + i as u32))
        .collect()
}

/// Checks every array of every split against the rows and an id function.
fn check_dataset(
    data: &BinaryDataset,
    rows: &[RawRow],
    splits: [std::ops::Range<usize>; 3],
    id: impl Fn(usize, Option<u32>) -> u32,
) {
    let mut batch = Batch::default();
    for (split, range) in DatasetSplit::ALL.into_iter().zip(splits) {
        assert_eq!(data.rows(split), range.len() as u64, "{split:?}");
        data.fill(split, 0, range.len(), &mut batch).unwrap();
        for (i, r) in rows[range].iter().enumerate() {
            assert_eq!(batch.labels[i], r.label as u8 as f32);
            let dense: Vec<f32> = r.dense.iter().map(|&x| dense_feature(x)).collect();
            assert_eq!(batch.dense_row(i), &dense[..]);
            for t in 0..NUM_CATEGORICAL {
                assert_eq!(
                    batch.bag(t, i),
                    &[id(t, r.categorical[t])],
                    "{split:?} row {i} table {t}"
                );
            }
        }
    }
}

#[test]
fn dictionaries_and_hashing_encode_as_documented() {
    let dir = Scratch::new("encode");
    let rows = random_rows(50, 9);
    let file = dir.path("rows.tsv");
    write_rows(&file, &rows, true);
    let splits = [0..30, 30..40, 40..50];

    let mut opts = options(vec![file.clone()], [6.0, 2.0, 2.0], dir.path("dict"));
    opts.encoding = EncodingChoice::New(Encoding::Dictionary { min_frequency: 2 });
    run_preprocess(&opts, 2).unwrap();
    let data = BinaryDataset::open(&opts.out).unwrap();
    let dicts: Vec<_> = (0..NUM_CATEGORICAL)
        .map(|t| oracle_dictionary(&rows[..30], t, 2))
        .collect();
    for (t, d) in dicts.iter().enumerate() {
        assert_eq!(
            data.header().table_sizes[t],
            d.len() as u64 + 2,
            "table {t}"
        );
    }
    check_dataset(&data, &rows, splits.clone(), |t, v| match v {
        None => EMPTY_ID,
        Some(v) => dicts[t].get(&v).copied().unwrap_or(RARE_ID),
    });
    assert_eq!(data.header().split, SplitRule::Weights([6.0, 2.0, 2.0]));
    assert!(data.header().labelled);

    let mut opts = options(vec![file], [6.0, 2.0, 2.0], dir.path("hash"));
    opts.encoding = EncodingChoice::New(Encoding::Hash { max_ind_range: 7 });
    run_preprocess(&opts, 2).unwrap();
    let data = BinaryDataset::open(&opts.out).unwrap();
    assert_eq!(data.header().table_sizes, vec![7; NUM_CATEGORICAL]);
    check_dataset(&data, &rows, splits, |_, v| v.map_or(0, |v| v % 7));
}

#[test]
fn encode_like_gives_new_rows_the_training_ids() {
    let dir = Scratch::new("like");
    let rows = random_rows(80, 4);
    let file = dir.path("train.tsv");
    write_rows(&file, &rows, true);
    let first = options(vec![file], [1.0, 0.0, 0.0], dir.path("first"));
    run_preprocess(&first, 1).unwrap();

    // New rows without labels (as Kaggle's test.txt), all into the test split.
    let new_rows: Vec<RawRow> = random_rows(30, 77)
        .into_iter()
        .map(|r| RawRow { label: false, ..r })
        .collect();
    let new_file = dir.path("new.tsv");
    write_rows(&new_file, &new_rows, false);
    let mut opts = options(vec![new_file.clone()], [0.0, 0.0, 1.0], dir.path("second"));
    opts.encoding = EncodingChoice::Like(first.out.clone());
    opts.labelled = false;
    run_preprocess(&opts, 2).unwrap();
    let data = BinaryDataset::open(&opts.out).unwrap();
    assert!(!data.header().labelled);
    let first_data = BinaryDataset::open(&first.out).unwrap();
    assert_eq!(data.header().table_sizes, first_data.header().table_sizes);
    let dicts: Vec<_> = (0..NUM_CATEGORICAL)
        .map(|t| oracle_dictionary(&rows, t, 1))
        .collect();
    check_dataset(&data, &new_rows, [0..0, 0..0, 0..30], |t, v| match v {
        None => EMPTY_ID,
        Some(v) => dicts[t].get(&v).copied().unwrap_or(RARE_ID),
    });
    assert!(
        new_rows.iter().any(|r| (0..NUM_CATEGORICAL)
            .any(|t| r.categorical[t].is_some_and(|v| !dicts[t].contains_key(&v)))),
        "some new values are unseen"
    );

    // The same file read as labelled says which flag it needs.
    let mut wrong = options(vec![new_file], [0.0, 0.0, 1.0], dir.path("wrong"));
    wrong.encoding = EncodingChoice::Like(first.out.clone());
    let e = format!("{:#}", run_preprocess(&wrong, 1).unwrap_err());
    assert!(e.contains("new.tsv:1:") && e.contains("--no-label"), "{e}");
}

/// A good file with `bad` as line 5 (of 9).
fn file_with_bad_line(dir: &Scratch, name: &str, bad: &str) -> PathBuf {
    let rows = random_rows(8, 1);
    let mut text = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if i == 4 {
            text.extend_from_slice(bad.as_bytes());
            text.push(b'\n');
        }
        write_row(r, true, &mut text);
    }
    let path = dir.path(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn good_line_fields() -> Vec<String> {
    let mut text = Vec::new();
    write_row(&random_rows(1, 5)[0], true, &mut text);
    text.pop();
    String::from_utf8(text)
        .unwrap()
        .split('\t')
        .map(str::to_string)
        .collect()
}

#[test]
fn bad_lines_are_errors_naming_file_line_and_field() {
    let dir = Scratch::new("bad");
    let fields = good_line_fields();
    let with = |i: usize, v: &str| {
        let mut f = fields.clone();
        f[i] = v.to_string();
        f.join("\t")
    };
    let cases = [
        (
            fields[..30].join("\t"),
            "30 tab-separated fields, expected 40",
        ),
        (
            format!("{}\t", fields.join("\t")),
            "41 tab-separated fields",
        ),
        (with(0, "2"), "field 1 (label)"),
        (with(5, "4.5"), "field 6 (I5)"),
        (with(13, "x"), "field 14 (I13)"),
        (with(14, "12345zz9"), "field 15 (C1)"),
        (with(39, "123456789"), "field 40 (C26)"),
    ];
    for (k, (bad, needle)) in cases.iter().enumerate() {
        let file = file_with_bad_line(&dir, &format!("bad{k}.tsv"), bad);
        let out = dir.path(&format!("out{k}"));
        let e = format!(
            "{:#}",
            run_preprocess(
                &options(vec![file.clone()], [8.0, 1.0, 1.0], out.clone()),
                2
            )
            .unwrap_err()
        );
        let place = format!("{}:5:", file.display());
        assert!(e.contains(&place) && e.contains(needle), "{e}");
        // Nothing is written: neither the folder nor its temporary sibling.
        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("out{k}")))
            .collect();
        assert!(left.is_empty(), "{left:?}");

        // With --skip-bad-lines, the line is counted, reported and left out.
        let mut opts = options(vec![file], [8.0, 1.0, 1.0], out);
        opts.skip_bad_lines = true;
        let s = run_preprocess(&opts, 2).unwrap();
        assert_eq!((s.lines, s.bad_lines, s.rows.total()), (9, 1, 8));
        assert!(s.bad_examples[0].contains(&place), "{:?}", s.bad_examples);
        let data = BinaryDataset::open(&opts.out).unwrap();
        assert_eq!(data.header().bad_lines, 1);
    }
    // An existing output folder is never overwritten.
    let file = file_with_bad_line(&dir, "fine.tsv", &fields.join("\t"));
    std::fs::create_dir(dir.path("taken")).unwrap();
    let e = run_preprocess(&options(vec![file], [1.0, 1.0, 1.0], dir.path("taken")), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn threads_and_chunk_sizes_do_not_change_a_byte() {
    let dir = Scratch::new("chunks");
    let file = dir.path("rows.tsv");
    write_synthetic(&file, 3000, 8);
    for shuffle_seed in [None, Some(17)] {
        let mut reference = None;
        for (k, (threads, chunk)) in [(1, CHUNK_BYTES), (2, 100), (3, 777), (2, 4096)]
            .into_iter()
            .enumerate()
        {
            let mut opts = options(
                vec![file.clone()],
                [0.7, 0.2, 0.1],
                dir.path(&format!("o{k}")),
            );
            opts.chunk_bytes = chunk;
            opts.shuffle_seed = shuffle_seed;
            let s = run_preprocess(&opts, threads).unwrap();
            assert_eq!(s.lines, 3000);
            let bytes = folder_bytes(&opts.out);
            std::fs::remove_dir_all(&opts.out).unwrap();
            match &reference {
                None => reference = Some(bytes),
                Some(r) => assert!(
                    *r == bytes,
                    "{threads} threads, chunks of {chunk} bytes, shuffle {shuffle_seed:?}"
                ),
            }
        }
    }
}

/// All rows of a split as comparable tuples (labels and dense values as bits).
fn split_rows(data: &BinaryDataset, split: DatasetSplit) -> Vec<Vec<u32>> {
    let n = data.rows(split) as usize;
    let mut b = Batch::default();
    data.fill(split, 0, n, &mut b).unwrap();
    (0..n)
        .map(|i| {
            let mut v = vec![b.labels[i].to_bits()];
            v.extend(b.dense_row(i).iter().map(|x| x.to_bits()));
            v.extend((0..b.num_tables()).map(|t| b.bag(t, i)[0]));
            v
        })
        .collect()
}

#[test]
fn shuffling_permutes_only_the_training_split() {
    let dir = Scratch::new("shuffle");
    let file = dir.path("rows.tsv");
    write_synthetic(&file, 2000, 2);
    let plain = options(vec![file.clone()], [0.8, 0.1, 0.1], dir.path("plain"));
    run_preprocess(&plain, 2).unwrap();
    let mut shuffled = options(vec![file], [0.8, 0.1, 0.1], dir.path("shuffled"));
    shuffled.shuffle_seed = Some(5);
    run_preprocess(&shuffled, 2).unwrap();
    let (a, b) = (
        BinaryDataset::open(&plain.out).unwrap(),
        BinaryDataset::open(&shuffled.out).unwrap(),
    );
    assert_eq!(b.header().shuffle_seed, Some(5));
    let (mut ra, mut rb) = (
        split_rows(&a, DatasetSplit::Train),
        split_rows(&b, DatasetSplit::Train),
    );
    assert_ne!(ra, rb, "the training rows are reordered");
    let same_place = ra.iter().zip(&rb).filter(|(x, y)| x == y).count();
    assert!(
        same_place < 20,
        "{same_place} of 1600 rows kept their place"
    );
    ra.sort();
    rb.sort();
    assert_eq!(ra, rb, "the same rows");
    for s in [DatasetSplit::Val, DatasetSplit::Test] {
        assert_eq!(split_rows(&a, s), split_rows(&b, s));
    }
}

#[test]
fn terabyte_days_split_the_evaluation_files_in_half() {
    let dir = Scratch::new("days");
    let rows = random_rows(45, 12);
    let days: Vec<PathBuf> = rows
        .chunks(15)
        .enumerate()
        .map(|(d, r)| {
            let p = dir.path(&format!("day_{d}"));
            write_rows(&p, r, true);
            p
        })
        .collect();
    let mut opts = options(Vec::new(), [1.0; 3], dir.path("ds"));
    opts.sources = Sources::Days {
        train: days[..2].to_vec(),
        eval: days[2..].to_vec(),
    };
    opts.encoding = EncodingChoice::New(Encoding::Hash {
        max_ind_range: 1000,
    });
    run_preprocess(&opts, 2).unwrap();
    let data = BinaryDataset::open(&opts.out).unwrap();
    assert_eq!(data.header().split, SplitRule::Days { train_sources: 2 });
    assert_eq!(data.header().sources.len(), 3);
    // The reference's order: test (the first half, rounded up), then validation.
    check_dataset(&data, &rows, [0..30, 38..45, 30..38], |_, v| {
        v.map_or(0, |v| v % 1000)
    });
}

#[test]
fn filling_batches_allocates_nothing_once_warm_and_epochs_keep_or_drop_the_last_batch() {
    let dir = Scratch::new("fill");
    let file = dir.path("rows.tsv");
    write_rows(&file, &random_rows(50, 3), true);
    let opts = options(vec![file], [6.0, 2.0, 2.0], dir.path("ds"));
    run_preprocess(&opts, 1).unwrap();
    let data = BinaryDataset::open(&opts.out)
        .unwrap()
        .with_eval_split(DatasetSplit::Val);
    assert_eq!((data.train_len(), data.test_len()), (30, 10));
    assert!(data.shuffle());
    let mut batch = Batch::default();
    data.fill_train(0, 8, &mut batch).unwrap();
    let before = allocations();
    for first in [3, 20, 22, 0] {
        data.fill_train(first, 8, &mut batch).unwrap();
        assert_eq!(batch.size(), 8);
    }
    assert_eq!(allocations() - before, 0);
    assert!(data.fill_train(25, 8, &mut batch).is_err(), "past the end");

    let arch = kaggle_mlps(&data.header().table_sizes, "13-16", "8-1");
    let mut o = train_options(8, 0.1, 3, 2);
    let kept = train_on(&data, arch.clone(), OptimizerKind::Adagrad, &o, 2, 1);
    assert_eq!(kept.steps, 3 * 4);
    o.keep_last_batch = false;
    let dropped = train_on(&data, arch, OptimizerKind::Adagrad, &o, 2, 1);
    assert_eq!(dropped.steps, 3 * 3);
}

/// The licensed sample: 8,000 real Kaggle rows, never committed; the test needs its path.
#[test]
#[ignore = "needs the licensed Criteo sample: DLRM_CRITEO_SAMPLE (.ci/run sets it and runs --ignored)"]
fn real_criteo_sample_reaches_the_auc_bar() {
    let path = std::env::var_os("DLRM_CRITEO_SAMPLE")
        .expect("DLRM_CRITEO_SAMPLE must name criteo_sample_train.txt (8,000 real Kaggle rows)");
    let dir = Scratch::new("real");
    let opts = options(vec![PathBuf::from(path)], [0.8, 0.1, 0.1], dir.path("ds"));
    let s = run_preprocess(&opts, 2).unwrap();
    assert_eq!((s.rows.train, s.rows.val, s.rows.test), (6400, 800, 800));
    let data = BinaryDataset::open(&opts.out).unwrap();
    let arch = kaggle_mlps(&data.header().table_sizes, "13-512-256-64-16", "512-256-1");
    // Pinned: SGD at 0.1, batches of 128, 3 epochs, seed 1 (about 0.70 on the test rows;
    // seeds 1 to 5 give 0.70 to 0.72).
    let r = train_on(
        &data,
        arch,
        OptimizerKind::Sgd,
        &train_options(128, 0.1, 3, 1),
        1,
        2,
    );
    eprintln!(
        "real Criteo sample: test AUC {:.4}, NE {:.4}",
        r.test_auc, r.test_ne
    );
    assert!(r.test_auc >= 0.62, "test AUC {}", r.test_auc);
}

fn dlrm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dlrm"))
        .args(args)
        .output()
        .expect("run dlrm")
}

#[test]
fn command_line_synth_preprocess_train() {
    let dir = Scratch::new("cli");
    let file = dir.path("synth.tsv");
    let ds = dir.path("ds");
    let sizes = join(&small_tables());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = dlrm(&[
        "synth",
        "--format",
        "criteo-tsv",
        "--rows",
        "6000",
        "--arch-embedding-size",
        &sizes,
        "--out",
        &s(&file),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = dlrm(&[
        "preprocess",
        &s(&file),
        "--out",
        &s(&ds),
        "--split",
        "8,1,1",
        "--min-frequency",
        "2",
        "--shuffle-seed",
        "3",
        "--threads",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(
        summary.contains("train 4800, validation 600, test 600") && summary.contains("MB/s"),
        "{summary}"
    );
    let report = dir.path("report.json");
    let o = dlrm(&[
        "train",
        "--dataset",
        &s(&ds),
        "--arch-mlp-bot",
        "13-32-16",
        "--arch-mlp-top",
        "16-1",
        "--mini-batch-size",
        "256",
        "--nepochs",
        "2",
        "--threads",
        "2",
        "--eval-split",
        "val",
        "--report-json",
        &s(&report),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["steps"], 2 * 19);
    assert!(json["test_auc"].as_f64().unwrap() > 0.5);

    // Preprocess and train in one command.
    let o = dlrm(&[
        "train",
        "--criteo",
        &s(&file),
        "--split",
        "0.8,0.1,0.1",
        "--arch-mlp-bot",
        "13-32-16",
        "--arch-mlp-top",
        "16-1",
        "--mini-batch-size",
        "256",
        "--threads",
        "2",
        "--report-json",
        &s(&report),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("train 4800 / validation 600 / test 600"));

    // Flags that make no sense with the data are errors that name them.
    for (args, needle) in [
        (
            vec!["train", "--dataset", &s(&ds), "--max-ind-range", "10"],
            "--max-ind-range",
        ),
        (
            vec![
                "train",
                "--dataset",
                &s(&ds),
                "--arch-embedding-size",
                "5-5",
            ],
            "--arch-embedding-size",
        ),
        (vec!["train", "--min-frequency", "3"], "--criteo"),
        (
            vec!["train", "--dataset", &s(&dir.path("none"))],
            "header.json",
        ),
        (
            vec!["preprocess", &s(&file), "--out", &s(&ds)],
            "already exists",
        ),
        (
            vec![
                "preprocess",
                &s(&file),
                "--out",
                &s(&dir.path("x")),
                "--split",
                "1,2",
            ],
            "--split",
        ),
    ] {
        let o = dlrm(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}

/// The number after `key ` in `text`.
fn number_after(text: &str, key: &str) -> f64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {text}"))
        + key.len();
    text[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn eval_and_predict_score_a_saved_model_with_its_encoding() {
    let dir = Scratch::new("serve");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let file = dir.path("rows.tsv");
    write_synthetic(&file, 3000, 11);
    let (ds, ck, report) = (dir.path("ds"), dir.path("ck"), dir.path("report.json"));
    let o = dlrm(&[
        "preprocess",
        &s(&file),
        "--out",
        &s(&ds),
        "--split",
        "8,1,1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mlps = ["--arch-mlp-bot", "13-32-16", "--arch-mlp-top", "16-1"];
    let (ds_s, ck_s, report_s) = (s(&ds), s(&ck), s(&report));
    let mut args = vec!["train", "--dataset", &ds_s, "--mini-batch-size", "128"];
    args.extend(mlps);
    args.extend(["--save-model", &ck_s, "--report-json", &report_s]);
    let o = dlrm(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();

    // eval on the dataset's test split reproduces the trainer's final test metrics.
    let o = dlrm(&["eval", "--load-model", &ck_s, "--dataset", &ds_s]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("300 rows"), "{out}");
    let auc = number_after(&out, "AUC");
    assert!(
        (auc - json["test_auc"].as_f64().unwrap()).abs() < 1e-4,
        "{out} vs {json}"
    );

    // eval on raw rows encodes them with the checkpoint's dictionaries.
    let o = dlrm(&["eval", "--load-model", &ck_s, "--criteo", &s(&file)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("3000 rows"), "{out}");
    assert!(number_after(&out, "AUC") > 0.55, "{out}");

    // predict: one probability per line, the same with and without the label column.
    let predict = |input: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec!["predict", "--load-model", &ck_s, "--criteo"];
        let (i, o) = (s(input), s(out));
        args.extend([i.as_str(), "--out", o.as_str(), "--threads", "2"]);
        args.extend(extra);
        dlrm(&args)
    };
    let read = |p: &Path| -> Vec<f32> {
        let text = std::fs::read_to_string(p).unwrap();
        text.lines().map(|l| l.parse().unwrap()).collect()
    };
    let probs_path = dir.path("probs.txt");
    let o = predict(&file, &probs_path, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("rows/s"));
    let probs = read(&probs_path);
    assert_eq!(probs.len(), 3000);
    assert!(probs.iter().all(|p| *p > 0.0 && *p < 1.0));
    let text = std::fs::read_to_string(&file).unwrap();
    let unlabelled = dir.path("unlabelled.tsv");
    let stripped: String = text
        .lines()
        .map(|l| format!("{}\n", l.split_once('\t').unwrap().1))
        .collect();
    std::fs::write(&unlabelled, stripped).unwrap();
    let o = predict(&unlabelled, &dir.path("u.txt"), &["--no-label"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read(&dir.path("u.txt")), probs);

    // A bad line is an error naming it (and no output file appears), or NaN when skipped.
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(2, "1\tnot\ta\trow");
    let bad = dir.path("bad.tsv");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let bad_out = dir.path("bad.txt");
    let o = predict(&bad, &bad_out, &[]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("bad.tsv:3:"), "{}", stderr_of(&o));
    assert!(!bad_out.exists() && !dir.path("bad.txt.partial").exists());
    let o = predict(&bad, &bad_out, &["--skip-bad-lines"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("skipped 1 lines"),
        "{}",
        stderr_of(&o)
    );
    let mut scored = read(&bad_out);
    assert!(scored.remove(2).is_nan());
    assert_eq!(scored, probs);

    // A model trained on synthetic ids has no encoding for raw rows.
    let synth_ck = s(&dir.path("synth-ck"));
    let o = dlrm(&["train", "--num-batches", "2", "--save-model", &synth_ck]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let o = dlrm(&[
        "predict",
        "--load-model",
        &synth_ck,
        "--criteo",
        &s(&file),
        "--out",
        &s(&bad_out),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr_of(&o).contains("not trained on a Criteo dataset"),
        "{}",
        stderr_of(&o)
    );
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn compare_runs_on_a_preprocessed_dataset() {
    let dir = Scratch::new("compare");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let file = dir.path("rows.tsv");
    write_synthetic(&file, 2000, 5);
    let (ds, out) = (s(&dir.path("ds")), s(&dir.path("out")));
    let o = dlrm(&["preprocess", &s(&file), "--out", &ds, "--split", "8,1,1"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let o = dlrm(&[
        "compare",
        "--dataset",
        &ds,
        "--models",
        "dlrm,fm",
        "--optimizers",
        "sgd",
        "--lr-sgd",
        "0.01",
        "--arch-mlp-bot",
        "13-32-16",
        "--arch-mlp-top",
        "16-1",
        "--mini-batch-size",
        "100",
        "--nepochs",
        "2",
        "--test-freq",
        "8",
        "--out-dir",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("1600 training / 200 val rows"),
        "{}",
        stderr_of(&o)
    );
    let csv = std::fs::read_to_string(dir.path("out").join("compare.csv")).unwrap();
    // Two epochs of 16 steps, evaluated every 8 steps: 4 evaluations per run.
    for model in ["dlrm", "fm"] {
        let rows = csv
            .lines()
            .filter(|l| l.starts_with(&format!("{model},")))
            .count();
        assert_eq!(rows, 4, "{csv}");
    }
    assert!(dir.path("out").join("compare.svg").exists());
    let o = dlrm(&["compare", "--nepochs", "2"]);
    assert!(
        !o.status.success() && stderr_of(&o).contains("--dataset"),
        "{}",
        stderr_of(&o)
    );
}
