//! `dlrm train`: flags (the reference's names where it has one), presets, and the run.

use super::distributed::DistributedArgs;
use super::models::ModelFlags;
use super::preprocess::EncodingArgs;
use super::progress::{Console, working};
use super::records::{Recorder, run_config};
use super::reference::{
    DataGeneration, DataSet, MlRun, REFERENCE_SEED, Randomize, ReferenceArgs, ReferenceLog,
    parse_bool, parse_data_generation, unset_if_minus_one,
};
use super::runconfig::{resolved_settings, typed};
use super::{ThreadArgs, choice, ensure_at_least_one, ensure_zipf_alpha, samples_of};
use anyhow::{Context, Result};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{ArgMatches, Args};
use dlrm::cancel::{Cancel, note_removed};
use dlrm::checkpoint;
use dlrm::config::{Preset, PresetValues, REFERENCE_KAGGLE_BATCH};
use dlrm::data::Batch;
use dlrm::data::binary::{BinaryDataset, DatasetSplit, Encoding};
use dlrm::data::preprocess::{CHUNK_BYTES, EncodingChoice, PreprocessOptions, Sources, preprocess};
use dlrm::data::synthetic::SyntheticConfig;
use dlrm::metrics::{format_auc, format_ne};
use dlrm::model::architecture::{Architecture, InteractionOp, join};
use dlrm::model::{ModelConfig, ModelKind, OptimizerKind, Precision};
use dlrm::names::{Choice, parse_choice};
use dlrm::spec::{
    ArchitectureOverrides, DataSpec, RunSpec, open_training_dataset, resolve_architecture,
    thread_pool,
};
use dlrm::storage::StorageKind;
use dlrm::train::{
    CheckpointPolicy, LrSchedule, TrainObserver, TrainOptions, TrainReport, ensure_learning_rate,
    evaluate, measure_fma_peak, total_steps, train,
};
use std::path::{Path, PathBuf};

/// Seconds of the FMA-peak probe after a run whose report is written as JSON.
const FMA_PROBE_SECONDS: f64 = 0.2;

/// Where the embedding tables live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StorageArg {
    /// Anonymous memory maps with transparent huge pages (fast; tables must fit in RAM).
    Anon,
    /// One memory-mapped file per table in --tables-dir (tables may exceed RAM).
    File,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The model: DLRM, DCN, DCN-v2, a factorization machine (on the same features), or
    /// matrix factorization (of the ratings in --train and --test).
    #[arg(long, value_parser = choice::<ModelKind>(), default_value_t = ModelKind::Dlrm)]
    model: ModelKind,

    /// Starting configuration; every other flag overrides it [default: tiny for synthetic
    /// data; for Criteo data (--dataset, --criteo, --data-generation=dataset) kaggle's
    /// architecture with the reference's Kaggle recipe: batch 128, SGD, lr 0.1; for --model mf
    /// Adagrad at 0.05, batch 256, 20 epochs, --weight-decay 0.001]
    #[arg(long, value_parser = preset_parser())]
    preset: Option<Preset>,

    // Real data.
    /// Train on a binary dataset written by `dlrm preprocess` (the table sizes come from its
    /// header).
    #[arg(long, conflicts_with = "criteo")]
    dataset: Option<PathBuf>,
    /// Preprocess this raw Criteo file into a temporary dataset, then train on it (for files
    /// small enough to preprocess on every run).
    #[arg(long)]
    criteo: Option<PathBuf>,
    /// The held-out split evaluated during and after training (with --dataset or --criteo).
    #[arg(long, value_parser = choice::<DatasetSplit>(), default_value_t = DatasetSplit::Test)]
    eval_split: DatasetSplit,
    #[command(flatten)]
    encoding: EncodingArgs,

    // Architecture (the reference's flag names).
    /// Embedding width d (also the bottom MLP's output width).
    #[arg(long)]
    arch_sparse_feature_size: Option<usize>,
    /// Rows of each embedding table, dash-separated (e.g. 1460-583-10131227).
    #[arg(long, value_delimiter = '-')]
    arch_embedding_size: Option<Vec<usize>>,
    /// Bottom MLP widths, dense feature count first (e.g. 13-512-256-64-16).
    #[arg(long, value_delimiter = '-')]
    arch_mlp_bot: Option<Vec<usize>>,
    /// Top MLP widths without the input, which follows from the interaction (e.g. 512-256-1).
    #[arg(long, value_delimiter = '-')]
    arch_mlp_top: Option<Vec<usize>>,
    /// Feature interaction: dot (pairwise dot products) or cat (concatenation).
    #[arg(long, default_value = "dot")]
    arch_interaction_op: InteractionOp,
    /// Include each vector's dot product with itself in the interaction.
    #[arg(long)]
    arch_interaction_itself: bool,
    /// Cap every table at this many rows (synthetic ids are drawn within the cap; with
    /// --criteo, categories are encoded as the reference does: hashed modulo it, then numbered
    /// in order of first appearance, as `dlrm preprocess --max-ind-range`; -1: no cap).
    #[arg(long, allow_negative_numbers = true)]
    max_ind_range: Option<i64>,
    #[command(flatten)]
    models: ModelFlags,
    /// Training ratings for --model mf: `user item rating timestamp` per line, tab-separated
    /// (MovieLens' u1.base).
    #[arg(long, requires = "test")]
    train: Option<PathBuf>,
    /// Test ratings for --model mf (MovieLens' u1.test).
    #[arg(long, requires = "train")]
    test: Option<PathBuf>,

    // Training.
    /// Samples per training step.
    #[arg(long)]
    mini_batch_size: Option<usize>,
    /// Steps per epoch (0 = one pass over the training data).
    #[arg(long)]
    num_batches: Option<usize>,
    /// Passes over the training data [default: 1; 20 for --model mf]
    #[arg(long)]
    nepochs: Option<usize>,
    /// Learning rate (before warm-up and decay).
    #[arg(long)]
    learning_rate: Option<f32>,
    /// Optimizer for the embedding tables; dense layers use SGD for sgd, Adagrad otherwise.
    #[arg(long, value_parser = choice::<OptimizerKind>())]
    optimizer: Option<OptimizerKind>,
    /// Training precision (default fp32, or the checkpoint's). bf16: the MLP products on bf16
    /// operands with f32 accumulation and f32 master weights, and split-SGD embedding tables
    /// (bf16 upper halves read by the forward, f32-exact updates); DLRM with anonymous table
    /// storage only. Checkpoints and exports hold f32 values either way.
    #[arg(long, value_parser = choice::<Precision>())]
    precision: Option<Precision>,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 0)]
    lr_num_warmup_steps: u64,
    /// Step at which the quadratic learning-rate decay starts.
    #[arg(long, default_value_t = 0)]
    lr_decay_start_step: u64,
    /// Steps over which the learning rate decays (0 = no decay).
    #[arg(long, default_value_t = 0)]
    lr_num_decay_steps: u64,
    /// Evaluate on the held-out data every this many steps (0 or -1 = only at the end).
    #[arg(long, allow_negative_numbers = true)]
    test_freq: Option<i64>,
    /// Report the training loss, and check that every dense parameter is finite, every this
    /// many steps (0: no reports; the check then runs every 100 steps).
    #[arg(long)]
    print_freq: Option<usize>,
    /// Samples per evaluation batch (default, or -1: the training batch size, at least 1024).
    #[arg(long, allow_negative_numbers = true)]
    test_mini_batch_size: Option<i64>,
    /// Drop a last batch smaller than --mini-batch-size instead of training on it.
    #[arg(long)]
    drop_last_batch: bool,

    // Synthetic data.
    /// How synthetic ids and labels are drawn: random (uniform ids, labels Bernoulli(0.5):
    /// nothing to learn), zipf (Zipf ids, labels Bernoulli(0.5)), teacher or synthetic (Zipf
    /// ids, labels from a random teacher model); or dataset: the reference's Criteo data
    /// (--raw-data-file, --processed-data-file) [default: teacher]
    #[arg(long, value_parser = parse_data_generation)]
    data_generation: Option<DataGeneration>,
    /// Exponent of the Zipf distribution of ids (zipf and teacher data).
    #[arg(long, default_value_t = 1.05)]
    zipf_alpha: f64,
    /// Ids per bag (multi-hot lookups).
    #[arg(long)]
    num_indices_per_lookup: Option<usize>,
    /// Every bag has exactly --num-indices-per-lookup ids (else 1 to that many): True or False.
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    num_indices_per_lookup_fixed: Option<bool>,
    /// Training samples of the synthetic data set (default: --num-batches x batch).
    #[arg(long)]
    data_size: Option<u64>,
    /// Held-out samples of the synthetic data set.
    #[arg(long)]
    test_data_size: Option<u64>,

    // System.
    #[command(flatten)]
    threads: ThreadArgs,
    /// Seed of the model's initialisation and of the data (default 1, or the checkpoint's).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the embedding tables live.
    #[arg(long, value_enum, default_value_t = StorageArg::Anon)]
    embedding_storage: StorageArg,
    /// Folder of the table files (with --embedding-storage file).
    #[arg(long)]
    tables_dir: Option<PathBuf>,
    /// Initialise a file table's rows on first touch instead of up front.
    #[arg(long)]
    lazy_init: bool,
    /// Write the run's summary as JSON to this file.
    #[arg(long)]
    report_json: Option<PathBuf>,
    #[command(flatten)]
    distributed: DistributedArgs,

    // Checkpoints.
    /// Save checkpoints (versioned, atomic) into this folder: at the end, and every
    /// --save-every steps.
    #[arg(long)]
    save_model: Option<PathBuf>,
    /// Also save every this many steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// Checkpoint versions kept in --save-model (this run's older ones are pruned).
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// Let --save-model replace another run's checkpoints: their versions and LATEST are
    /// removed when training starts (other files in the folder stay).
    #[arg(long, requires = "save_model")]
    overwrite: bool,
    /// Resume from a checkpoint folder (its LATEST version): parameters, optimizer state and
    /// the position in the data; the run continues to its configured end.
    #[arg(long)]
    load_model: Option<PathBuf>,
    /// Load a --load-model checkpoint even if some of its parameters are NaN or infinite
    /// (by default such a checkpoint is refused, naming the tensor and the first index).
    #[arg(long)]
    allow_non_finite: bool,

    // The reference's other flags (docs/reference-flags.md: each is supported, mapped or
    // refused with why).
    #[command(flatten)]
    reference: ReferenceArgs,

    /// End the run after this many steps (of this run) with a checkpoint in --save-model and
    /// the final evaluation; --load-model then resumes it exactly where it stopped.
    #[arg(long, requires = "save_model")]
    stop_after_steps: Option<u64>,

    // Records and configuration files.
    /// Take flags from this TOML file, keys named as the flags (`mini_batch_size = 128`,
    /// `arch_mlp_bot = [13, 512, 256, 64, 16]`); flags on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the resolved configuration (every setting, presets applied) as TOML for --config,
    /// and exit without training.
    #[arg(long)]
    print_config: bool,
    /// Write the run's records into this folder: config.json (settings, version, CPU, threads,
    /// git commit), metrics.csv (each report interval and evaluation) and TensorBoard event
    /// files.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

impl TrainArgs {
    /// --max-ind-range (-1, the reference's default: no cap).
    fn max_ind_range(&self) -> Result<Option<usize>> {
        unset_if_minus_one("--max-ind-range", self.max_ind_range)
    }

    /// --test-mini-batch-size (-1, the reference's default: not set).
    fn test_mini_batch_size(&self) -> Result<Option<usize>> {
        unset_if_minus_one("--test-mini-batch-size", self.test_mini_batch_size)
    }

    /// --test-freq: -1 (the reference's default: no evaluation while training) is 0 here,
    /// evaluation at the end only.
    fn test_freq(&self) -> Result<Option<usize>> {
        unset_if_minus_one("--test-freq", self.test_freq).map(|f| match self.test_freq {
            Some(-1) => Some(0),
            _ => f,
        })
    }

    /// --data-generation (teacher when not given).
    fn generation(&self) -> DataGeneration {
        self.data_generation.unwrap_or_default()
    }

    /// --seed, or the reference's --numpy-rand-seed.
    fn seed(&self) -> Option<u64> {
        self.seed.or(self.reference.numpy_rand_seed)
    }
}

/// The parser of --preset: each preset offered with its values.
fn preset_parser() -> impl TypedValueParser<Value = Preset> {
    PossibleValuesParser::new(Preset::ALL.iter().map(|&p| {
        PossibleValue::new(p.name()).help(format!("{}: {}", p.help(), p.values().summary()))
    }))
    .try_map(|name| parse_choice::<Preset>(&name))
}

/// Preprocesses `sources` into the dataset folder `out`, as `dlrm preprocess` would, with
/// `encoding`, shuffling the training rows with `shuffle_seed`.
fn preprocess_criteo(
    a: &TrainArgs,
    sources: Sources,
    encoding: Encoding,
    out: &Path,
    shuffle_seed: Option<u64>,
    cancel: &Cancel,
) -> Result<()> {
    let opts = PreprocessOptions {
        sources,
        out: out.to_path_buf(),
        encoding: EncodingChoice::New(encoding),
        labelled: true,
        skip_bad_lines: a.encoding.skip_bad_lines,
        shuffle_seed,
        chunk_bytes: CHUNK_BYTES,
        progress: super::progress::passes(),
        cancel: cancel.clone(),
    };
    let s = preprocess(&opts)?;
    log::info!(
        "preprocessed {} lines ({} bad) in {:.2} s into {}: train {} / validation {} / test {} rows",
        s.lines,
        s.bad_lines,
        s.seconds,
        out.display(),
        s.rows.train,
        s.rows.val,
        s.rows.test
    );
    Ok(())
}

/// The raw files of the reference's --data-set: Kaggle's one file, or the Terabyte day
/// files PREFIX_0, PREFIX_1, ... (all but the last train; the last is halved into test and
/// validation, as the reference splits day 23).
fn reference_sources(a: &TrainArgs, raw: &Path) -> Result<Sources> {
    match a.reference.data_set.unwrap_or(DataSet::Kaggle) {
        DataSet::Kaggle => a.encoding.sources(vec![raw.to_path_buf()]),
        DataSet::Terabyte => {
            anyhow::ensure!(
                a.encoding.split.is_none(),
                "--split cuts one file; with --data-set=terabyte the last day file is halved into test and validation"
            );
            let day = |i: usize| {
                let mut name = raw.as_os_str().to_owned();
                name.push(format!("_{i}"));
                PathBuf::from(name)
            };
            let mut days: Vec<PathBuf> = (0..).map(day).take_while(|p| p.is_file()).collect();
            anyhow::ensure!(
                days.len() >= 2,
                "--raw-data-file {} with --data-set=terabyte names day files {}_0, {}_1, ...: found {} (at least 2 needed: training days and the evaluation day)",
                raw.display(),
                raw.display(),
                raw.display(),
                days.len()
            );
            let eval = days.pop().into_iter().collect();
            Ok(Sources::Days { train: days, eval })
        }
    }
}

/// The encoding of the reference's --data-generation=dataset (data_utils.py getCriteoAdData):
/// every category of every day, hashed modulo --max-ind-range when given, numbered in order of
/// first appearance. Without --max-ind-range the reference numbers the values themselves: a
/// modulus of 2^32 leaves every 32-bit value as it is. --min-frequency asks for this
/// project's dictionaries instead.
fn reference_encoding(a: &TrainArgs) -> Result<Encoding> {
    let max_ind_range = a.max_ind_range()?.map(|n| n as u64);
    if max_ind_range.is_none() && a.encoding.min_frequency.is_none() {
        return Ok(Encoding::HashFirstSeen {
            max_ind_range: 1 << 32,
        });
    }
    a.encoding.encoding(max_ind_range)
}

/// The dataset of the reference's --data-generation=dataset: --processed-data-file when it
/// holds one, else --raw-data-file preprocessed into it (kept, as the reference keeps its
/// processed file) or, without it, into `temp`.
fn reference_dataset(a: &TrainArgs, cancel: &Cancel, temp: Option<&Path>) -> Result<PathBuf> {
    let r = &a.reference;
    let processed = r.processed_data_file.as_deref();
    if let Some(dir) = processed
        && dir.exists()
    {
        anyhow::ensure!(
            dir.is_dir(),
            "--processed-data-file {} is a file (the reference's .npz?): here it names the dataset folder that --raw-data-file is preprocessed into, or one written by `dlrm preprocess`",
            dir.display()
        );
        log::info!(
            "--processed-data-file {}: training on this dataset",
            dir.display()
        );
        return Ok(dir.to_path_buf());
    }
    let raw = r.raw_data_file.as_deref().context(
        "--data-generation=dataset needs --raw-data-file (raw Criteo rows) or an existing --processed-data-file dataset",
    )?;
    let sources = reference_sources(a, raw)?;
    let encoding = reference_encoding(a)?;
    let shuffle = match (
        a.encoding.shuffle_seed,
        r.data_randomize.unwrap_or(Randomize::Total),
    ) {
        (Some(seed), _) => Some(seed),
        (None, Randomize::Total) => Some(a.seed().unwrap_or(REFERENCE_SEED)),
        (None, _) => None,
    };
    let Some(out) = processed else {
        let out = temp
            .context("--raw-data-file needs a temporary folder")?
            .join("dataset");
        preprocess_criteo(a, sources, encoding, &out, shuffle, cancel)?;
        return Ok(out);
    };
    // Written beside the destination and renamed when complete, so that a failed run leaves
    // no half-written dataset under the name the next run would reuse.
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    let partial = out.with_file_name(name);
    let written =
        preprocess_criteo(a, sources, encoding, &partial, shuffle, cancel).and_then(|()| {
            std::fs::rename(&partial, out)
                .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    written?;
    Ok(out.to_path_buf())
}

pub fn run(a: TrainArgs, matches: &ArgMatches, cancel: &Cancel) -> Result<()> {
    // The temporary dataset of --criteo, removed when dropped: when the run ends, fails or is
    // interrupted.
    let temp = match (&a.criteo, &a.reference.raw_data_file) {
        (Some(_), _) | (_, Some(_)) => Some(
            tempfile::Builder::new()
                .prefix("dlrm-criteo-")
                .tempdir()
                .context("creating a temporary folder for the --criteo dataset")?,
        ),
        _ => None,
    };
    let temp_path = temp.as_ref().map(|t| t.path().to_path_buf());
    let result = run_with(a, matches, cancel, temp_path.as_deref());
    drop(temp);
    result.map_err(|e| match &temp_path {
        Some(path) => note_removed(e, path),
        None => e,
    })
}

/// A checkpoint to resume from: its version folder, its meta data, its model's config and
/// optimizer.
struct Resume {
    version: PathBuf,
    meta: checkpoint::Meta,
    config: ModelConfig,
    optimizer: OptimizerKind,
}

/// The run, with `matches` its parsed flags and `temp` the temporary folder for the --criteo
/// dataset.
fn run_with(
    a: TrainArgs,
    matches: &ArgMatches,
    cancel: &Cancel,
    temp: Option<&Path>,
) -> Result<()> {
    check_data_flags(&a)?;
    // An explicit --precision is checked before any work; a checkpoint's, once it is read.
    if let Some(precision) = a.precision {
        check_precision(&a, precision)?;
    }
    a.reference.log_init_start();
    // Taken before any work, so that a second run saving into the same folder fails at once.
    let _checkpoint_lock = claim_checkpoint_folder(&a)?;
    let d = defaults(&a);
    let (preset, p) = (d.preset, &d.p);
    check_numeric_flags(&a, p.learning_rate)?;
    let threads = a.threads.count()?;
    let pool = thread_pool(threads)?;
    let dataset = pool.install(|| open_data(&a, cancel, temp))?;
    let arch = resolve_architecture(p, &architecture_overrides(&a)?, dataset.as_ref())?;
    let resume = read_resume(&a, &arch, dataset.as_ref())?;
    let spec = run_spec(&a, &d, arch, dataset, resume.as_ref(), cancel)?;
    let train_command = TrainArgs::augment_args(clap::Command::new("train"));
    let settings = resolved_settings(&train_command, matches, resolved_flags(&a, preset, &spec));
    if a.print_config {
        print!("{}", toml::to_string(&settings)?);
        return Ok(());
    }
    if a.distributed.wanted() {
        super::distributed::check_flags(&a.distributed)?;
        let files = super::distributed::RunFiles {
            report_json: a.report_json.as_deref(),
            load_model: resume.as_ref().map(|r| r.version.as_path()),
            load: checkpoint::LoadOptions {
                allow_non_finite: a.allow_non_finite,
            },
            log_dir: match &a.log_dir {
                Some(dir) => Some((dir.as_path(), run_config(&settings, threads)?)),
                None => None,
            },
        };
        return super::distributed::run(&a.distributed, spec, &files);
    }
    let recorder = match &a.log_dir {
        Some(dir) => Some(Recorder::create(dir, &run_config(&settings, threads)?)?),
        None => None,
    };
    let Some((mut report, config)) =
        pool.install(|| train_spec(&a, spec, resume.as_ref(), recorder))?
    else {
        // Nothing trained (--inference-only, or a checkpoint already at the run's end).
        return Ok(());
    };
    if a.report_json.is_some() {
        // The machine's limit on the same threads, to state the step as a fraction of it.
        report.add_fma_peak(pool.install(|| measure_fma_peak(FMA_PROBE_SECONDS)));
    }
    print_summary(&report);
    if let Some(path) = &a.report_json {
        let mut json = serde_json::to_value(&report)?;
        json["architecture"] = serde_json::to_value(&config)?;
        let json = serde_json::to_string_pretty(&json)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    Ok(())
}

/// The settings that the preset, the data or a resumed checkpoint decide, as the flags that
/// would set them (for --print-config and config.json).
fn resolved_flags(
    a: &TrainArgs,
    preset: Preset,
    spec: &RunSpec,
) -> Vec<(&'static str, toml::Value)> {
    let t = &spec.train;
    let value = |x: &dyn std::fmt::Display| typed(&x.to_string());
    let widths = |w: &[usize]| toml::Value::Array(w.iter().map(|&n| value(&n)).collect());
    let mut flags = vec![
        ("preset", preset.name().into()),
        ("mini_batch_size", value(&t.batch_size)),
        ("learning_rate", value(&t.lr.base)),
        ("optimizer", spec.optimizer.name().into()),
        ("test_freq", value(&t.test_freq)),
        ("print_freq", value(&t.print_freq)),
        ("test_mini_batch_size", value(&t.test_batch_size)),
        ("seed", value(&t.seed)),
        ("threads", value(&spec.threads)),
    ];
    if a.model != ModelKind::Mf {
        let arch = &spec.arch;
        flags.push(("arch_sparse_feature_size", value(&arch.embedding_dim)));
        flags.push(("arch_mlp_bot", widths(&arch.bottom)));
        flags.push(("arch_mlp_top", widths(&arch.top[1..])));
    }
    if let DataSpec::Synthetic {
        config,
        train_len,
        test_len,
    } = &spec.data
    {
        flags.push(("arch_embedding_size", widths(&config.table_sizes)));
        flags.push(("data_size", value(train_len)));
        flags.push(("test_data_size", value(test_len)));
        flags.push((
            "num_indices_per_lookup",
            value(&config.num_indices_per_lookup),
        ));
        flags.push(("num_indices_per_lookup_fixed", config.fixed_bag_size.into()));
    }
    flags
}

/// Whether the run trains on real data (a dataset or a raw Criteo file).
fn real_data(a: &TrainArgs) -> bool {
    a.dataset.is_some() || a.criteo.is_some() || a.generation() == DataGeneration::Dataset
}

/// The preset when --preset is not given: kaggle for real data, tiny for synthetic data.
fn default_preset(a: &TrainArgs) -> Preset {
    if real_data(a) {
        Preset::Kaggle
    } else {
        Preset::Tiny
    }
}

/// What the run uses for the flags not given.
struct Defaults {
    /// The preset named, or chosen for the data.
    preset: Preset,
    /// The preset's values (batch and learning rate adjusted below).
    p: PresetValues,
    optimizer: OptimizerKind,
    nepochs: usize,
    weight_decay: f32,
}

/// The run's defaults: the --preset's values, SGD, one epoch; without --preset, real Criteo
/// data trains with the reference's Kaggle recipe (bench/dlrm_s_criteo_kaggle.sh: batch 128,
/// SGD at 0.1) and synthetic data with the tiny preset. Matrix factorization on ratings
/// trains with Adagrad at 0.05, batches of 256, 20 epochs and L2 0.001 on the rows looked up
/// (test RMSE about 0.92 on MovieLens' u1 split).
fn defaults(a: &TrainArgs) -> Defaults {
    let preset = a.preset.unwrap_or(default_preset(a));
    let mut d = Defaults {
        preset,
        p: preset.values(),
        optimizer: OptimizerKind::Sgd,
        nepochs: 1,
        weight_decay: 0.0,
    };
    if a.model == ModelKind::Mf {
        d.p.mini_batch_size = 256;
        d.p.learning_rate = 0.05;
        d.optimizer = OptimizerKind::Adagrad;
        d.nepochs = 20;
        d.weight_decay = 0.001;
    } else if a.preset.is_none() && real_data(a) {
        d.p.mini_batch_size = REFERENCE_KAGGLE_BATCH;
    }
    d
}

/// Refuses data flags that do nothing with the data chosen.
fn check_data_flags(a: &TrainArgs) -> Result<()> {
    a.reference.check(a.generation())?;
    anyhow::ensure!(
        !(a.reference.inference_only && a.save_model.is_some()),
        "--inference-only trains nothing, so --save-model would save nothing: drop one of them"
    );
    anyhow::ensure!(
        a.generation() != DataGeneration::Dataset || (a.dataset.is_none() && a.criteo.is_none()),
        "--data-generation=dataset reads --raw-data-file or --processed-data-file; --dataset and --criteo name the data themselves: give one of the two ways"
    );
    if !real_data(a) {
        anyhow::ensure!(
            !a.encoding.any(),
            "--min-frequency, --split, --shuffle-seed and --skip-bad-lines preprocess --criteo FILE; without it they do nothing"
        );
    } else {
        anyhow::ensure!(
            a.data_size.is_none() && a.test_data_size.is_none(),
            "--data-size and --test-data-size size synthetic data; a dataset has its own"
        );
        anyhow::ensure!(
            a.dataset.is_none() || a.max_ind_range()?.is_none(),
            "--max-ind-range applies when preprocessing (dlrm preprocess --max-ind-range); the dataset's ids are already in range"
        );
    }
    Ok(())
}

/// The claim on the --save-model folder (none without it).
fn claim_checkpoint_folder(a: &TrainArgs) -> Result<Option<checkpoint::FolderLock>> {
    let Some(dir) = &a.save_model else {
        return Ok(None);
    };
    // The ranks of a distributed run share the folder: rank 0 holds it for them.
    if a.distributed.wanted() && super::distributed::launched_rank() != 0 {
        return Ok(None);
    }
    let resumed_from = a
        .load_model
        .as_deref()
        .map(checkpoint::resolve)
        .transpose()?;
    Ok(Some(checkpoint::claim(
        dir,
        resumed_from.as_deref(),
        a.overwrite,
    )?))
}

/// The dataset of --dataset, or of --criteo preprocessed into `temp`; none for synthetic data.
fn open_data(a: &TrainArgs, cancel: &Cancel, temp: Option<&Path>) -> Result<Option<BinaryDataset>> {
    let dir = match (&a.dataset, &a.criteo) {
        (Some(dir), _) => dir.clone(),
        (None, Some(file)) => {
            let out = temp
                .context("--criteo needs a temporary folder")?
                .join("dataset");
            let sources = a.encoding.sources(vec![file.clone()])?;
            let encoding = a.encoding.encoding(a.max_ind_range()?.map(|n| n as u64))?;
            preprocess_criteo(a, sources, encoding, &out, a.encoding.shuffle_seed, cancel)?;
            out
        }
        (None, None) if a.generation() == DataGeneration::Dataset => {
            reference_dataset(a, cancel, temp)?
        }
        (None, None) => return Ok(None),
    };
    working(&format!("mapping the dataset {}", dir.display()), || {
        open_training_dataset(&dir, a.eval_split)
    })
    .map(Some)
}

/// The architecture flags given.
fn architecture_overrides(a: &TrainArgs) -> Result<ArchitectureOverrides> {
    Ok(ArchitectureOverrides {
        embedding_dim: a.arch_sparse_feature_size,
        table_sizes: a.arch_embedding_size.clone(),
        bottom: a.arch_mlp_bot.clone(),
        top: a.arch_mlp_top.clone(),
        interaction: Some(a.arch_interaction_op),
        self_interaction: a.arch_interaction_itself,
        max_ind_range: a.max_ind_range()?,
    })
}

/// Where the tables live; the --tables-dir folder is created.
fn storage(a: &TrainArgs) -> Result<StorageKind> {
    let storage = match a.embedding_storage {
        StorageArg::Anon => StorageKind::Anon,
        StorageArg::File => StorageKind::File {
            dir: a
                .tables_dir
                .clone()
                .context("--embedding-storage file needs --tables-dir DIR")?,
            lazy_init: a.lazy_init,
        },
    };
    if let StorageKind::File { dir, .. } = &storage {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--tables-dir {}: cannot create", dir.display()))?;
    }
    Ok(storage)
}

/// The --load-model checkpoint, checked against the flags and the dataset.
fn read_resume(
    a: &TrainArgs,
    arch: &Architecture,
    dataset: Option<&BinaryDataset>,
) -> Result<Option<Resume>> {
    let Some(dir) = &a.load_model else {
        return Ok(None);
    };
    let version = checkpoint::resolve(dir)?;
    let meta = checkpoint::read_meta(&version)?;
    let (config, optimizer) = checkpoint::read_model_config(&version, &meta)?;
    check_flags_match(a, arch, &config, optimizer)
        .with_context(|| format!("--load-model {}", version.display()))?;
    if let Some(ds) = dataset {
        checkpoint::check_encoding(&version, &meta, ds)?;
    }
    Ok(Some(Resume {
        version,
        meta,
        config,
        optimizer,
    }))
}

/// The run the flags describe (a resumed checkpoint's architecture, optimizer and seed unless
/// given).
fn run_spec(
    a: &TrainArgs,
    d: &Defaults,
    arch: Architecture,
    dataset: Option<BinaryDataset>,
    resume: Option<&Resume>,
    cancel: &Cancel,
) -> Result<RunSpec> {
    let p = &d.p;
    let precision = a
        .precision
        .or(resume.map(|r| r.meta.precision))
        .unwrap_or_default();
    check_precision(a, precision)?;
    let storage = storage(a)?;
    let threads = a.threads.count()?;
    let bags = a.num_indices_per_lookup.unwrap_or(p.num_indices_per_lookup);
    anyhow::ensure!(bags >= 1, "--num-indices-per-lookup must be at least 1");
    // A DLRM checkpoint carries its architecture; the other models' inputs were checked
    // against the run's data.
    let arch = match resume.map(|r| &r.config) {
        Some(ModelConfig::Dlrm(saved)) => saved.clone(),
        _ => arch,
    };
    let optimizer = a
        .optimizer
        .or(resume.map(|r| r.optimizer))
        .unwrap_or(d.optimizer);
    let seed = a
        .seed()
        .or(resume.map(|r| r.meta.train_state.seed))
        .unwrap_or(1);
    ensure_zipf_alpha(a.zipf_alpha)?;
    let batch_size = a.mini_batch_size.unwrap_or(p.mini_batch_size);
    let train = train_options(a, d, batch_size, seed, dataset.as_ref(), resume, cancel)?;
    let data = match (a.model, &a.train, &a.test, dataset) {
        (ModelKind::Mf, Some(train), Some(test), _) => DataSpec::Ratings {
            train: train.clone(),
            test: test.clone(),
        },
        (ModelKind::Mf, _, _, _) => {
            anyhow::bail!("--model mf trains on rating files: give --train FILE --test FILE")
        }
        (kind, Some(_), _, _) | (kind, _, Some(_), _) => anyhow::bail!(
            "--train and --test are rating files for --model mf, not {}",
            kind.name()
        ),
        (_, None, None, Some(ds)) => DataSpec::Dataset(Box::new(ds)),
        (_, None, None, None) => {
            let train_len = match a.data_size {
                Some(n) => n,
                None => samples_of(a.num_batches.unwrap_or(p.num_batches).max(1), batch_size)?,
            };
            DataSpec::Synthetic {
                config: SyntheticConfig {
                    num_dense: arch.num_dense(),
                    table_sizes: arch.table_sizes.clone(),
                    generation: match a.generation() {
                        DataGeneration::Synthetic(g) => g,
                        DataGeneration::Dataset => unreachable!("dataset runs have a dataset"),
                    },
                    zipf_alpha: a.zipf_alpha,
                    num_indices_per_lookup: bags,
                    fixed_bag_size: a.num_indices_per_lookup_fixed.unwrap_or(true),
                    seed,
                },
                train_len,
                test_len: a
                    .test_data_size
                    .unwrap_or((train_len / 8).clamp(4096, 262_144)),
            }
        }
    };
    Ok(RunSpec {
        model: a.model,
        arch,
        model_options: a.models.options(d.weight_decay)?,
        optimizer,
        precision,
        storage,
        threads,
        data,
        train,
    })
}

/// Refuses bf16 where it has no implementation, before anything is created: models other
/// than DLRM, and tables in files (split-BF16 tables live in anonymous memory).
fn check_precision(a: &TrainArgs, precision: Precision) -> Result<()> {
    if precision == Precision::Fp32 {
        return Ok(());
    }
    let given = if a.precision.is_some() {
        "--precision bf16"
    } else {
        "the checkpoint's precision bf16 (--load-model)"
    };
    anyhow::ensure!(
        a.model == ModelKind::Dlrm,
        "{given} is implemented for --model dlrm only, not --model {}: use --precision fp32",
        a.model.name()
    );
    anyhow::ensure!(
        matches!(a.embedding_storage, StorageArg::Anon),
        "{given} cannot be combined with --embedding-storage file: split-BF16 tables live in anonymous memory (use --embedding-storage anon, or --precision fp32)"
    );
    Ok(())
}

/// The training loop's options from the flags.
fn train_options(
    a: &TrainArgs,
    d: &Defaults,
    batch_size: usize,
    seed: u64,
    dataset: Option<&BinaryDataset>,
    resume: Option<&Resume>,
    cancel: &Cancel,
) -> Result<TrainOptions> {
    let p = &d.p;
    Ok(TrainOptions {
        batch_size,
        // By default one epoch is the whole training set (for synthetic data, --num-batches
        // steps of the preset unless --data-size says otherwise).
        num_batches: a.num_batches.unwrap_or(0),
        nepochs: a.nepochs.unwrap_or(d.nepochs),
        lr: LrSchedule {
            base: a.learning_rate.unwrap_or(p.learning_rate),
            warmup_steps: a.lr_num_warmup_steps,
            decay_start_step: a.lr_decay_start_step,
            decay_steps: a.lr_num_decay_steps,
        },
        test_freq: a.test_freq()?.unwrap_or(p.test_freq),
        print_freq: a.print_freq.unwrap_or(100),
        test_batch_size: a.test_mini_batch_size()?.unwrap_or(batch_size.max(1024)),
        keep_last_batch: !a.drop_last_batch,
        seed,
        checkpoint: a.save_model.clone().map(|dir| CheckpointPolicy {
            dir,
            every: a.save_every,
            keep: a.keep_checkpoints,
            dataset_files: dataset.map(|ds| ds.dir().to_path_buf()),
        }),
        resume: resume.map(|r| r.meta.train_state.clone()),
        stop_after_steps: a.stop_after_steps,
        cancel: cancel.clone(),
    })
}

/// Builds the model (or loads the checkpoint's) and the data source, and trains, reporting to
/// the console and to `recorder`; returns the report and the model's configuration, `None`
/// when the checkpoint has already reached the run's end.
fn train_spec(
    a: &TrainArgs,
    spec: RunSpec,
    resume: Option<&Resume>,
    recorder: Option<Recorder>,
) -> Result<Option<(TrainReport, ModelConfig)>> {
    let t = std::time::Instant::now();
    let loaded = match resume {
        Some(r) => {
            let opts = checkpoint::LoadOptions {
                allow_non_finite: a.allow_non_finite,
            };
            Some(checkpoint::load_model(&r.version, &spec.storage, opts)?.0)
        }
        None => None,
    };
    let batch_size = spec.train.batch_size;
    let building = match resume {
        Some(r) => format!("loading the model of {}", r.version.display()),
        None => "initialising the model's tables".to_string(),
    };
    let mut run = match resume {
        Some(r) => working(&building, || spec.build(loaded))
            .with_context(|| format!("--load-model {}", r.version.display()))?,
        None => working(&building, || spec.build(loaded))?,
    };
    let threads = run.threads;
    log::info!(
        "{} | {threads} threads, batch {batch_size}",
        run.description
    );
    run.model.set_click_loss(a.reference.click_loss()?)?;
    if a.reference.inference_only {
        let test_batch = run.train.test_batch_size;
        run.model.reserve_inference(test_batch);
        let m = evaluate(
            run.model.as_mut(),
            run.source.as_ref(),
            test_batch,
            &mut Batch::default(),
        )?;
        a.reference.print_inference(&m);
        return Ok(None);
    }
    // After the load, so that a damaged checkpoint is an error, not "nothing to do".
    if let Some(r) = resume {
        let total = total_steps(&run.train, run.source.train_len())?;
        if r.meta.train_state.step >= total {
            log::info!(
                "nothing to do: the checkpoint is at step {} of {total} ({})",
                r.meta.train_state.step,
                r.version.display()
            );
            return Ok(None);
        }
    }
    log::info!(
        "data: {} training / {} {}; model ready in {:.1} s",
        run.source.train_len(),
        run.source.test_len(),
        data_description(a),
        t.elapsed().as_secs_f64()
    );
    let (mut console, mut reference);
    let observer: &mut dyn TrainObserver = if a.reference.reference_log() {
        let lr = &run.train.lr;
        let ml = MlRun {
            seed: run.train.seed,
            batch_size,
            learning_rate: lr.base,
            warmup_steps: lr.warmup_steps,
            decay_start_step: lr.decay_start_step,
            decay_steps: lr.decay_steps,
        };
        let target = a.reference.quality_target()?;
        reference = ReferenceLog::with_target(&a.reference, ml, run.train.nepochs, target);
        &mut reference
    } else {
        console = Console::new();
        &mut console
    };
    let (model, source, opts) = (run.model.as_mut(), run.source.as_ref(), &run.train);
    let mut observers = (observer, (recorder, a.reference.tensor_board()?));
    let report = train(model, source, opts, threads, &mut observers)?;
    let (_, (recorder, events)) = observers;
    if let Some(recorder) = recorder {
        recorder.finish()?;
    }
    if let Some(events) = events {
        events.finish()?;
    }
    Ok(Some((report, run.model.config())))
}

/// What the held-out samples and the training samples are, for the log.
fn data_description(a: &TrainArgs) -> String {
    let raw = a.reference.raw_data_file.as_ref().or(a.criteo.as_ref());
    match (&a.dataset, raw, &a.train) {
        (_, _, Some(_)) => "test ratings".to_string(),
        (Some(dir), _, _) => format!("held-out rows of {}", dir.display()),
        (None, Some(file), _) => format!("held-out rows of {}", file.display()),
        (None, None, None) => match a.generation() {
            DataGeneration::Synthetic(g) => format!("held-out synthetic samples ({g:?})"),
            DataGeneration::Dataset => "held-out rows of the processed dataset".to_string(),
        },
    }
}

/// Refuses numeric flags that make no sense, before any work: counts of 0 where something
/// must exist, and a learning rate that is not a positive number (`preset_lr` when not given).
fn check_numeric_flags(a: &TrainArgs, preset_lr: f32) -> Result<()> {
    let count = |v: Option<usize>| v.map(|n| n as u64);
    ensure_at_least_one(&[
        ("--mini-batch-size", count(a.mini_batch_size)),
        ("--test-mini-batch-size", count(a.test_mini_batch_size()?)),
        ("--nepochs", count(a.nepochs)),
        ("--keep-checkpoints", Some(a.keep_checkpoints as u64)),
        ("--data-size", a.data_size),
        ("--test-data-size", a.test_data_size),
        ("--num-indices-per-lookup", count(a.num_indices_per_lookup)),
        ("--stop-after-steps", a.stop_after_steps),
    ])?;
    ensure_learning_rate("--learning-rate", a.learning_rate.unwrap_or(preset_lr))
}

/// The model, architecture and optimizer flags given explicitly must agree with a loaded
/// checkpoint; the tables and dense features of a model other than DLRM (which takes its
/// architecture from the checkpoint) must be those of the run's data (`arch`).
fn check_flags_match(
    a: &TrainArgs,
    arch: &Architecture,
    config: &ModelConfig,
    optimizer: OptimizerKind,
) -> Result<()> {
    let kind = config.kind();
    anyhow::ensure!(
        a.model == kind,
        "holds a {} model: pass --model {}",
        kind.name(),
        kind.name()
    );
    if let ModelConfig::Dlrm(saved) = config {
        return check_dlrm_flags_match(a, saved, optimizer);
    }
    // MF's tables are the rating files' users and items, checked once they are read.
    let (tables, num_dense) = match kind {
        ModelKind::Mf => (&arch.table_sizes[..], arch.num_dense()),
        _ => config.inputs(),
    };
    anyhow::ensure!(
        tables == arch.table_sizes && num_dense == arch.num_dense(),
        "the checkpoint's {} has tables {} and {num_dense} dense features, this run's data {} and {}",
        kind.name(),
        join(tables),
        join(&arch.table_sizes),
        arch.num_dense()
    );
    check_optimizer_matches(a, optimizer)
}

/// [`check_flags_match`] for a DLRM checkpoint of architecture `arch`.
fn check_dlrm_flags_match(
    a: &TrainArgs,
    arch: &Architecture,
    optimizer: OptimizerKind,
) -> Result<()> {
    let mismatch = |flag: &str, given: String, saved: String| {
        anyhow::bail!("{flag} {given} does not match the checkpoint's {saved}")
    };
    if let Some(d) = a.arch_sparse_feature_size
        && d != arch.embedding_dim
    {
        mismatch(
            "--arch-sparse-feature-size",
            d.to_string(),
            arch.embedding_dim.to_string(),
        )?;
    }
    if let Some(t) = &a.arch_embedding_size
        && *t != arch.table_sizes
    {
        mismatch("--arch-embedding-size", join(t), join(&arch.table_sizes))?;
    }
    if let Some(b) = &a.arch_mlp_bot
        && *b != arch.bottom
    {
        mismatch("--arch-mlp-bot", join(b), join(&arch.bottom))?;
    }
    if let Some(t) = &a.arch_mlp_top
        && t[..] != arch.top[1..]
    {
        mismatch("--arch-mlp-top", join(t), arch.top_flag())?;
    }
    check_optimizer_matches(a, optimizer)
}

fn check_optimizer_matches(a: &TrainArgs, optimizer: OptimizerKind) -> Result<()> {
    if let Some(o) = a.optimizer
        && o != optimizer
    {
        anyhow::bail!(
            "--optimizer {o:?} does not match the checkpoint's {:?}",
            optimizer
        );
    }
    Ok(())
}

fn print_summary(r: &TrainReport) {
    println!("\n== {} training summary ==", r.model);
    println!(
        "steps {} x batch {} on {} threads: {:.0} samples/s (steady state), {:.1} s wall",
        r.steps, r.batch_size, r.threads, r.samples_per_sec, r.wall_seconds
    );
    println!("precision {} (kernels on {})", r.precision, r.isa);
    match (r.gflop_per_sec, r.fma_peak_gflop_per_sec) {
        (Some(g), Some(peak)) => println!(
            "dense compute {g:.1} GFLOP/s ({:.1}% of the {peak:.1} GFLOP/s FMA peak; MLP products and interaction, steady state)",
            100.0 * g / peak
        ),
        (Some(g), None) => {
            println!("dense compute {g:.1} GFLOP/s (MLP products and interaction, steady state)")
        }
        _ => {}
    }
    println!("train loss {:.5} (last report interval)", r.train_loss);
    match (r.test_rmse, r.train_rmse) {
        (Some(test), Some(train)) => println!(
            "test  MSE {:.5}  RMSE {test:.4}  (training data RMSE {train:.4})",
            r.test_loss
        ),
        _ => println!(
            "test  loss {:.5}  accuracy {:.4}  AUC {}  NE {}",
            r.test_loss,
            r.test_accuracy,
            format_auc(r.test_auc),
            format_ne(r.test_ne)
        ),
    }
    if let Some(t) = r.teacher_auc {
        println!("teacher AUC {t:.4} (the ceiling on this data)");
    }
    let total = r.phase_seconds.total();
    println!("time by phase (all steps):");
    for (name, s) in r.phase_seconds.entries() {
        println!(
            "  {name:<16} {s:8.3} s  {:5.1} %",
            100.0 * s / total.max(1e-12)
        );
    }
    println!(
        "peak RSS {:.1} MiB",
        r.peak_rss_bytes as f64 / (1 << 20) as f64
    );
}
