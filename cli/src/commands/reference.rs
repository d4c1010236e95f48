//! The flags of the PyTorch reference's `dlrm_s_pytorch.py` that `dlrm train` takes besides
//! its own (which already carry the reference's names), so that the reference's command
//! lines run with only the program name changed: each maps to our setting where it means the
//! same, or is refused saying why (docs/reference-flags.md lists every flag). Also the
//! reference's log lines (`--print-time`, `--mlperf-logging`), written by an observer of the
//! training loop.

use super::choice;
use super::tfevents::EventWriter;
use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use dlrm::data::synthetic::Generation;
use dlrm::metrics::EvalMetrics;
use dlrm::model::{ClickLoss, LossFunction};
use dlrm::names::parse_choice;
use dlrm::train::{IntervalReport, TrainObserver};
use std::path::{Path, PathBuf};

/// A value of the reference's `type=bool` flags: `True`/`False` as its command lines spell
/// them (any case), or 1/0. (Python's `bool("False")` is true, so the reference itself takes
/// every non-empty value as true; here `False` means false.)
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("'{text}' is not True or False")),
    }
}

/// Where the training samples come from (`--data-generation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataGeneration {
    Synthetic(Generation),
    /// The reference's `dataset`: Criteo rows of --raw-data-file / --processed-data-file.
    Dataset,
}

impl Default for DataGeneration {
    fn default() -> DataGeneration {
        DataGeneration::Synthetic(Generation::Teacher)
    }
}

/// `--data-generation`: ours (random, zipf, teacher) and the reference's (random, dataset;
/// `synthetic` is teacher data, synthetic data with something to learn).
pub fn parse_data_generation(text: &str) -> Result<DataGeneration, String> {
    match text {
        "dataset" => Ok(DataGeneration::Dataset),
        "synthetic" => Ok(DataGeneration::Synthetic(Generation::Teacher)),
        "internal" => Err(
            "'internal' reads the reference's Facebook-internal traces, which are not public; use dataset, random, zipf or teacher"
                .to_string(),
        ),
        _ => parse_choice::<Generation>(text)
            .map(DataGeneration::Synthetic)
            .map_err(|e| format!("{e}, dataset or synthetic")),
    }
}

/// The Criteo data set of the raw files (`--data-set`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataSet {
    /// Kaggle's train.txt: one file cut into 7 days as the reference cuts it; days 1-6
    /// train, the 7th is halved into test and validation.
    Kaggle,
    /// Day files PREFIX_0, PREFIX_1, ... (--raw-data-file PREFIX): all but the last train, the
    /// last is halved into test and validation.
    Terabyte,
}

/// How the training rows are ordered (`--data-randomize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Randomize {
    /// Shuffle all training rows at preprocessing (seed: --numpy-rand-seed).
    Total,
    /// Shuffle within each day: not implemented (refused).
    Day,
    /// Keep the file order.
    None,
}

/// The reference's default `--numpy-rand-seed`.
pub const REFERENCE_SEED: u64 = 123;

/// The reference's flags beyond ours, as `dlrm train` takes them.
#[derive(Args, Debug)]
pub struct ReferenceArgs {
    /// With --data-generation dataset: which Criteo data set the raw rows are [default: kaggle]
    #[arg(long, value_enum)]
    pub data_set: Option<DataSet>,
    /// With --data-generation dataset: raw Criteo rows (Kaggle's train.txt, or the prefix of
    /// the Terabyte day files), preprocessed as the reference splits and numbers them (the
    /// categories of all days by first appearance, hashed by --max-ind-range when given).
    #[arg(long)]
    pub raw_data_file: Option<PathBuf>,
    /// With --data-generation dataset: the dataset folder --raw-data-file is preprocessed into
    /// and kept, or, when it already holds one (`dlrm preprocess`), the dataset trained on.
    #[arg(long)]
    pub processed_data_file: Option<PathBuf>,
    /// With --data-generation dataset: shuffle the training rows at preprocessing (total,
    /// seeded by --numpy-rand-seed) or keep their order (none) [default: total]
    #[arg(long, value_enum)]
    pub data_randomize: Option<Randomize>,
    /// Accepted: datasets are always memory-mapped here.
    #[arg(long)]
    pub memory_map: bool,
    /// The loss of the click models [default: bce]
    #[arg(long, value_parser = choice::<LossFunction>())]
    pub loss_function: Option<LossFunction>,
    /// Weights of label 0 and label 1 for --loss-function wbce, dash-separated [default:
    /// 1.0-1.0]
    #[arg(long)]
    pub loss_weights: Option<String>,
    /// Clamp the predicted probability to [t, 1 - t] in the loss (for t in (0, 1)) [default: 0]
    #[arg(long)]
    pub loss_threshold: Option<f32>,
    /// Train on labels rounded to 0 or 1 (True/False): the labels here always are (Criteo
    /// clicks, synthetic clicks); False is refused for synthetic data, whose reference twin
    /// has fractional targets.
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "True")]
    pub round_targets: Option<bool>,
    /// The reference's seed: the same as --seed.
    #[arg(long, conflicts_with = "seed")]
    pub numpy_rand_seed: Option<u64>,
    /// Accepted: data loading here needs no worker processes (the dataset is memory-mapped and
    /// batches are gathered by the --threads workers).
    #[arg(long, allow_negative_numbers = true)]
    pub num_workers: Option<i64>,
    /// Accepted, as --num-workers.
    #[arg(long, allow_negative_numbers = true)]
    pub test_num_workers: Option<i64>,
    /// Evaluate the model (the --load-model checkpoint's, else a new one) on the held-out
    /// data without training.
    #[arg(long)]
    pub inference_only: bool,
    /// Print the reference's log lines on stdout (`Finished training it J/N of epoch E, X
    /// ms/it, loss L`; `Testing at - J/N of epoch E,` and the accuracy line).
    #[arg(long)]
    pub print_time: bool,
    /// With the reference's log lines, add the wall-clock time (HH:MM) to each.
    #[arg(long)]
    pub print_wall_time: bool,
    /// Accepted: the summary's time-by-phase table is this run's profile.
    #[arg(long)]
    pub enable_profiling: bool,
    /// Print MLPerf `:::MLLOG` JSON lines as the reference's mlperf_logger does, and its
    /// recall/precision/f1/ap/auc line at each evaluation.
    #[arg(long)]
    pub mlperf_logging: bool,
    /// Accepted (True or False): one process, so the dense parameters are always in sync.
    #[arg(long, value_parser = parse_bool)]
    pub sync_dense_params: Option<bool>,
    /// Accepted: preprocessing here always uses every --threads worker.
    #[arg(long)]
    pub dataset_multiprocessing: bool,
    /// Accepted: the datasets here are always binary files.
    #[arg(long)]
    pub mlperf_bin_loader: bool,
    /// With --mlperf-logging: end training at the first evaluation whose best accuracy so far
    /// exceeds this fraction (MLPerf's Kaggle target is 0.789) [default: 0: never]
    #[arg(long)]
    pub mlperf_acc_threshold: Option<f64>,
    /// With --mlperf-logging: end training at the first evaluation whose best ROC AUC so far
    /// exceeds this (MLPerf's Terabyte target is 0.8025) [default: 0: never]
    #[arg(long)]
    pub mlperf_auc_threshold: Option<f64>,
    /// Also write TensorBoard scalar events as the reference does, into the folder NAME
    /// (relative to the working directory): Train/Loss at each print interval, and at each
    /// evaluation Test/Acc (with --mlperf-logging, mlperf-metrics-test/*).
    #[arg(long, value_name = "NAME")]
    pub tensor_board_filename: Option<PathBuf>,
    #[command(flatten)]
    pub refused: RefusedArgs,
}

/// One reference flag that cannot mean the same here: its value when given, the values that
/// change nothing (the reference's defaults), and why anything else is refused.
struct Refusal<'a> {
    flag: &'static str,
    given: Option<&'a str>,
    neutral: &'static [&'static str],
    why: &'static str,
}

/// The reference's flags that cannot mean the same here, taken only to be refused (or
/// accepted at their neutral value) with the reason.
#[derive(Args, Debug)]
pub struct RefusedArgs {
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    weighted_pooling: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    md_flag: Option<String>,
    #[arg(long, hide = true)]
    md_threshold: Option<String>,
    #[arg(long, hide = true)]
    md_temperature: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    md_round_dims: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    qr_flag: Option<String>,
    #[arg(long, hide = true)]
    qr_threshold: Option<String>,
    #[arg(long, hide = true)]
    qr_operation: Option<String>,
    #[arg(long, hide = true)]
    qr_collisions: Option<String>,
    #[arg(long, hide = true)]
    activation_function: Option<String>,
    #[arg(long, hide = true)]
    rand_data_dist: Option<String>,
    #[arg(long, hide = true, allow_negative_numbers = true)]
    rand_data_min: Option<String>,
    #[arg(long, hide = true, allow_negative_numbers = true)]
    rand_data_max: Option<String>,
    #[arg(long, hide = true, allow_negative_numbers = true)]
    rand_data_mu: Option<String>,
    #[arg(long, hide = true, allow_negative_numbers = true)]
    rand_data_sigma: Option<String>,
    #[arg(long, hide = true)]
    data_trace_file: Option<String>,
    #[arg(long, hide = true)]
    data_trace_enable_padding: Option<String>,
    #[arg(long, hide = true)]
    data_sub_sample_rate: Option<String>,
    #[arg(long, hide = true)]
    print_precision: Option<String>,
    #[arg(long, hide = true)]
    quantize_mlp_with_bit: Option<String>,
    #[arg(long, hide = true)]
    quantize_emb_with_bit: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    save_onnx: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    use_gpu: Option<String>,
    #[arg(long = "local_rank", hide = true, allow_negative_numbers = true)]
    local_rank: Option<String>,
    #[arg(long, hide = true)]
    dist_backend: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    debug_mode: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    plot_compute_graph: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    mlperf_bin_shuffle: Option<String>,
    #[arg(long, hide = true)]
    mlperf_grad_accum_iter: Option<String>,
}

const ONLY_WITH_MD: &str =
    "it tunes --md-flag (mixed-dimension embeddings), which is not implemented";
const ONLY_WITH_QR: &str =
    "it tunes --qr-flag (quotient-remainder embeddings), which is not implemented";
const RAND_DATA: &str = "it shapes the reference's random dense features and gaussian ids, which are not reproduced: synthetic dense features here are uniform in [0, 1), ids uniform (random) or Zipf (zipf, teacher; --zipf-alpha)";
const TRACE: &str =
    "trace-driven synthetic data is not implemented: use --data-generation random, zipf or teacher";
const QUANTIZE: &str = "quantized inference is not implemented: parameters are fp32 (32)";
const DISTRIBUTED: &str =
    "distributed training is not implemented: one process trains with --threads threads";

impl RefusedArgs {
    fn refusals(&self) -> [Refusal<'_>; 29] {
        fn r<'a>(
            flag: &'static str,
            given: &'a Option<String>,
            neutral: &'static [&'static str],
            why: &'static str,
        ) -> Refusal<'a> {
            Refusal {
                flag,
                given: given.as_deref(),
                neutral,
                why,
            }
        }
        [
            r(
                "--weighted-pooling",
                &self.weighted_pooling,
                &[],
                "weighted pooling is not implemented: the ids of a bag are summed",
            ),
            r(
                "--md-flag",
                &self.md_flag,
                &[],
                "mixed-dimension embeddings are not implemented: every table has --arch-sparse-feature-size columns",
            ),
            r("--md-threshold", &self.md_threshold, &["200"], ONLY_WITH_MD),
            r(
                "--md-temperature",
                &self.md_temperature,
                &["0.3"],
                ONLY_WITH_MD,
            ),
            r("--md-round-dims", &self.md_round_dims, &[], ONLY_WITH_MD),
            r(
                "--qr-flag",
                &self.qr_flag,
                &[],
                "quotient-remainder embeddings are not implemented; --max-ind-range caps the tables by hashing instead",
            ),
            r("--qr-threshold", &self.qr_threshold, &["200"], ONLY_WITH_QR),
            r(
                "--qr-operation",
                &self.qr_operation,
                &["mult"],
                ONLY_WITH_QR,
            ),
            r("--qr-collisions", &self.qr_collisions, &["4"], ONLY_WITH_QR),
            r(
                "--activation-function",
                &self.activation_function,
                &["relu"],
                "the MLPs use ReLU (the top MLP ends in a sigmoid); other activations are not implemented",
            ),
            r(
                "--rand-data-dist",
                &self.rand_data_dist,
                &["uniform"],
                RAND_DATA,
            ),
            r("--rand-data-min", &self.rand_data_min, &["0"], RAND_DATA),
            r("--rand-data-max", &self.rand_data_max, &["1"], RAND_DATA),
            r("--rand-data-mu", &self.rand_data_mu, &["-1"], RAND_DATA),
            r(
                "--rand-data-sigma",
                &self.rand_data_sigma,
                &["1"],
                RAND_DATA,
            ),
            r("--data-trace-file", &self.data_trace_file, &[], TRACE),
            r(
                "--data-trace-enable-padding",
                &self.data_trace_enable_padding,
                &["False"],
                TRACE,
            ),
            r(
                "--data-sub-sample-rate",
                &self.data_sub_sample_rate,
                &["0"],
                "down-sampling the negatives at preprocessing is not implemented: every row is kept (0)",
            ),
            r(
                "--print-precision",
                &self.print_precision,
                &["5"],
                "it sets the precision of --debug-mode's tensor dumps, which are not implemented",
            ),
            r(
                "--quantize-mlp-with-bit",
                &self.quantize_mlp_with_bit,
                &["32"],
                QUANTIZE,
            ),
            r(
                "--quantize-emb-with-bit",
                &self.quantize_emb_with_bit,
                &["32"],
                QUANTIZE,
            ),
            r(
                "--save-onnx",
                &self.save_onnx,
                &[],
                "ONNX export is not implemented; `dlrm export` writes the parameters as safetensors under the reference's names",
            ),
            r(
                "--use-gpu",
                &self.use_gpu,
                &[],
                "dlrm trains on the CPU only (hand-written SIMD kernels); drop --use-gpu",
            ),
            r("--local_rank", &self.local_rank, &["-1"], DISTRIBUTED),
            r("--dist-backend", &self.dist_backend, &[""], DISTRIBUTED),
            r(
                "--debug-mode",
                &self.debug_mode,
                &[],
                "dumping every tensor is not implemented; -v logs the run's details",
            ),
            r(
                "--plot-compute-graph",
                &self.plot_compute_graph,
                &[],
                "the model is fixed Rust code, not a torch graph to plot",
            ),
            r(
                "--mlperf-bin-shuffle",
                &self.mlperf_bin_shuffle,
                &[],
                "it shuffles the reference's binary loader's batches; here the training rows are shuffled at preprocessing (--data-randomize total)",
            ),
            r(
                "--mlperf-grad-accum-iter",
                &self.mlperf_grad_accum_iter,
                &["1"],
                "gradient accumulation is not implemented: every batch updates the model (1)",
            ),
        ]
    }

    /// Refuses the first flag given with a value that would change something, saying why.
    pub fn check(&self) -> Result<()> {
        for r in self.refusals() {
            let Some(given) = r.given else { continue };
            if r.neutral.iter().any(|n| same_value(given, n)) {
                continue;
            }
            let shown = if given.is_empty() {
                r.flag.to_string()
            } else {
                format!("{}={given}", r.flag)
            };
            bail!(
                "{shown} (a flag of dlrm_s_pytorch.py) cannot mean the same here: {}",
                r.why
            );
        }
        Ok(())
    }
}

/// Whether a given value is the neutral one: the same text (any case), or the same number.
fn same_value(given: &str, neutral: &str) -> bool {
    given.eq_ignore_ascii_case(neutral)
        || matches!((given.parse::<f64>(), neutral.parse::<f64>()), (Ok(a), Ok(b)) if a == b)
}

/// A count of the reference's where -1 (its default) means "not set".
pub fn unset_if_minus_one(flag: &str, value: Option<i64>) -> Result<Option<usize>> {
    match value {
        None | Some(-1) => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n as usize)),
        Some(n) => bail!("{flag} {n}: must be -1 (not set) or at least 0"),
    }
}

impl ReferenceArgs {
    /// Refuses what cannot mean the same here; logs the flags accepted without effect.
    pub fn check(&self, generation: DataGeneration) -> Result<()> {
        self.refused.check()?;
        self.thresholds()?;
        let real = generation == DataGeneration::Dataset;
        ensure!(
            real || (self.data_set.is_none()
                && self.raw_data_file.is_none()
                && self.processed_data_file.is_none()
                && self.data_randomize.is_none()),
            "--data-set, --raw-data-file, --processed-data-file and --data-randomize describe Criteo data: add --data-generation=dataset"
        );
        ensure!(
            self.data_randomize != Some(Randomize::Day),
            "--data-randomize=day (shuffling within each day) is not implemented: use total or none"
        );
        ensure!(
            real || self.round_targets != Some(false),
            "--round-targets=False: synthetic labels here are clicks (0 or 1); the reference's fractional random targets are not generated"
        );
        for (flag, given) in [
            ("--num-workers", self.num_workers.is_some()),
            ("--test-num-workers", self.test_num_workers.is_some()),
            ("--memory-map", self.memory_map),
            ("--dataset-multiprocessing", self.dataset_multiprocessing),
            ("--mlperf-bin-loader", self.mlperf_bin_loader),
        ] {
            if given {
                log::info!(
                    "{flag}: data here is memory-mapped binary, read by the --threads workers; nothing else to set"
                );
            }
        }
        Ok(())
    }

    /// The click loss of --loss-function, --loss-weights and --loss-threshold.
    pub fn click_loss(&self) -> Result<ClickLoss> {
        let mut loss = ClickLoss::default();
        if let Some(f) = self.loss_function {
            loss.function = f;
        }
        if let Some(text) = &self.loss_weights {
            let weights: Vec<f32> = text
                .split('-')
                .map(|w| w.trim().parse::<f32>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    anyhow::anyhow!(
                        "--loss-weights {text}: not two numbers joined by '-' (e.g. 1.0-1.0)"
                    )
                })?;
            let [w0, w1] = weights[..] else {
                bail!(
                    "--loss-weights {text}: give two weights, of label 0 and label 1 (e.g. 1.0-1.0)"
                )
            };
            ensure!(
                loss.function == LossFunction::Wbce,
                "--loss-weights applies to --loss-function=wbce"
            );
            loss.weights = [w0, w1];
        }
        if let Some(t) = self.loss_threshold {
            loss.threshold = t;
        }
        Ok(loss)
    }

    /// The evaluation of --inference-only: the reference's accuracy line (with
    /// --mlperf-logging, its recall ... accuracy line), then ours.
    pub fn print_inference(&self, m: &EvalMetrics) {
        ReferenceLog::new(self, MlRun::default(), 1).print_metrics(m);
        println!(
            "test loss {:.5}  accuracy {:.4}  {}",
            m.loss,
            m.accuracy,
            m.auc_and_ne()
        );
    }

    /// The MLPerf quality target of --mlperf-acc-threshold / --mlperf-auc-threshold. As in the
    /// reference they apply with --mlperf-logging only (without it they are reported as
    /// ignored), and the accuracy is a fraction, as the reference compares it.
    pub fn quality_target(&self) -> Result<QualityTarget> {
        let target = self.thresholds()?;
        if target.is_set() && !self.mlperf_logging {
            log::warn!(
                "--mlperf-acc-threshold and --mlperf-auc-threshold apply with --mlperf-logging only, as in the reference: this run trains to its end"
            );
            return Ok(QualityTarget::default());
        }
        Ok(target)
    }

    /// The thresholds given, checked.
    fn thresholds(&self) -> Result<QualityTarget> {
        let threshold = |flag: &str, value: Option<f64>| -> Result<f64> {
            let t = value.unwrap_or(0.0);
            ensure!(
                (0.0..=1.0).contains(&t),
                "{flag} {t}: must be between 0 (off) and 1; accuracy and AUC are fractions here as in the reference (e.g. 0.789, not 78.9)"
            );
            Ok(t)
        };
        Ok(QualityTarget {
            accuracy: threshold("--mlperf-acc-threshold", self.mlperf_acc_threshold)?,
            auc: threshold("--mlperf-auc-threshold", self.mlperf_auc_threshold)?,
        })
    }

    /// The TensorBoard events of --tensor-board-filename, when given.
    pub fn tensor_board(&self) -> Result<Option<ReferenceEvents>> {
        let Some(name) = &self.tensor_board_filename else {
            return Ok(None);
        };
        // The reference's SummaryWriter("./" + name): a folder under the working directory.
        let dir = Path::new(".").join(name);
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "--tensor-board-filename {}: cannot create the folder",
                name.display()
            )
        })?;
        let events = EventWriter::create(&dir).with_context(|| {
            format!(
                "--tensor-board-filename {}: cannot create the event file",
                name.display()
            )
        })?;
        Ok(Some(ReferenceEvents {
            events,
            mlperf: self.mlperf_logging,
            error: None,
        }))
    }

    /// Whether the reference's log lines replace the progress lines.
    pub fn reference_log(&self) -> bool {
        self.print_time || self.print_wall_time || self.mlperf_logging
    }

    /// The MLPerf events of the start of a run (before the data is read), when asked for.
    pub fn log_init_start(&self) {
        if self.mlperf_logging {
            MlLog.point("cache_clear", serde_json::json!(true));
            MlLog.log(
                MlEvent::Start,
                "init_start",
                serde_json::json!(null),
                serde_json::json!({}),
            );
        }
    }
}

/// MLPerf's log lines, as the `mlperf_logging` package's `mllog` writes them:
/// `:::MLLOG {"namespace": "", "time_ms": ..., "event_type": ..., "key": ..., "value": ...,
/// "metadata": {...}}`.
#[derive(Clone, Copy, Debug)]
pub struct MlLog;

/// The kinds of MLPerf log events.
#[derive(Clone, Copy, Debug)]
pub enum MlEvent {
    Point,
    Start,
    End,
}

impl MlLog {
    /// Writes one event line on stdout.
    pub fn log(
        self,
        event: MlEvent,
        key: &str,
        value: serde_json::Value,
        metadata: serde_json::Value,
    ) {
        let event_type = match event {
            MlEvent::Point => "POINT_IN_TIME",
            MlEvent::Start => "INTERVAL_START",
            MlEvent::End => "INTERVAL_END",
        };
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut line = serde_json::Map::new();
        line.insert("namespace".into(), "".into());
        line.insert("time_ms".into(), time_ms.into());
        line.insert("event_type".into(), event_type.into());
        line.insert("key".into(), key.into());
        line.insert("value".into(), value);
        line.insert("metadata".into(), metadata);
        println!(":::MLLOG {}", serde_json::Value::Object(line));
    }

    /// An event without metadata.
    pub fn point(self, key: &str, value: serde_json::Value) {
        self.log(MlEvent::Point, key, value, serde_json::json!({}));
    }
}

/// MLPerf's quality target: training ends at the first evaluation whose best accuracy or
/// best ROC AUC so far exceeds its threshold (dlrm_s_pytorch.py, `--mlperf-acc-threshold`,
/// `--mlperf-auc-threshold`; 0 is off). The reference tests the best values that its
/// `inference()` returns to no one, so there they stay at their start and no run stops; here
/// they are the run's.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QualityTarget {
    pub accuracy: f64,
    pub auc: f64,
}

impl QualityTarget {
    pub fn is_set(&self) -> bool {
        self.accuracy > 0.0 || self.auc > 0.0
    }

    /// The metric and threshold that the best values exceed, accuracy first as the reference
    /// tests them.
    fn reached(&self, best_accuracy: f64, best_auc: f64) -> Option<(&'static str, f64)> {
        if self.accuracy > 0.0 && best_accuracy > self.accuracy {
            Some(("accuracy", self.accuracy))
        } else if self.auc > 0.0 && best_auc > self.auc {
            Some(("auc", self.auc))
        } else {
            None
        }
    }
}

/// What the reference logs at the start of a run: the submission, the seed, the batch and the
/// learning-rate schedule.
#[derive(Default)]
pub struct MlRun {
    pub seed: u64,
    pub batch_size: usize,
    pub learning_rate: f32,
    pub warmup_steps: u64,
    pub decay_start_step: u64,
    pub decay_steps: u64,
}

impl MlRun {
    pub fn log(&self, ml: MlLog) {
        use serde_json::json;
        for (key, value) in [
            ("submission_benchmark", json!("dlrm")),
            ("submission_org", json!("reference_implementation")),
            ("submission_division", json!("closed")),
            ("submission_status", json!("onprem")),
            ("submission_platform", json!("reference_implementation")),
            ("seed", json!(self.seed)),
            ("global_batch_size", json!(self.batch_size)),
            ("opt_base_learning_rate", json!(self.learning_rate)),
            ("opt_learning_rate_warmup_steps", json!(self.warmup_steps)),
            ("sgd_opt_base_learning_rate", json!(self.learning_rate)),
            ("lr_decay_start_steps", json!(self.decay_start_step)),
            ("sgd_opt_learning_rate_decay_steps", json!(self.decay_steps)),
            ("sgd_opt_learning_rate_decay_poly_power", json!(2)),
        ] {
            ml.point(key, value);
        }
    }
}

/// The training loop's reports as the reference prints them (stdout), with MLPerf events when
/// asked.
pub struct ReferenceLog {
    run: MlRun,
    nepochs: u64,
    per_epoch: u64,
    total_steps: u64,
    print_time: bool,
    wall_time: bool,
    mlperf: Option<MlLog>,
    best_accuracy: f64,
    best_auc: f64,
    target: QualityTarget,
    /// The target was reached: the run ends after this step.
    target_reached: bool,
    /// The step of the latest evaluation printed.
    last_tested: Option<u64>,
}

impl ReferenceLog {
    pub fn new(a: &ReferenceArgs, run: MlRun, nepochs: usize) -> ReferenceLog {
        ReferenceLog::with_target(a, run, nepochs, QualityTarget::default())
    }

    /// A log that also ends the run when `target` is reached.
    pub fn with_target(
        a: &ReferenceArgs,
        run: MlRun,
        nepochs: usize,
        target: QualityTarget,
    ) -> ReferenceLog {
        ReferenceLog {
            run,
            nepochs: nepochs.max(1) as u64,
            per_epoch: 1,
            total_steps: 0,
            print_time: a.print_time,
            wall_time: a.print_wall_time,
            mlperf: a.mlperf_logging.then_some(MlLog),
            best_accuracy: 0.0,
            best_auc: 0.0,
            target,
            target_reached: false,
            last_tested: None,
        }
    }

    /// `run_stop` with its status.
    fn run_stop(&self, status: &str) {
        if let Some(ml) = self.mlperf {
            ml.log(
                MlEvent::End,
                "run_stop",
                serde_json::json!(null),
                serde_json::json!({"status": status}),
            );
        }
    }

    /// After an evaluation: the reference's line when the quality target is reached, and the
    /// end of the run.
    fn check_target(&mut self) {
        if self.target_reached {
            return;
        }
        if let Some((metric, threshold)) = self.target.reached(self.best_accuracy, self.best_auc) {
            println!("MLPerf testing {metric} threshold {threshold:?} reached, stop training");
            self.run_stop("success");
            self.target_reached = true;
        }
    }

    /// The reference's (iteration in its epoch, 1-based; epoch, 0-based) of step `step`.
    fn position(&self, step: u64) -> (u64, u64) {
        let epoch = step.saturating_sub(1) / self.per_epoch;
        (step - epoch * self.per_epoch, epoch)
    }

    fn epoch_events(&self, start: bool, epoch: u64) {
        let Some(ml) = self.mlperf else { return };
        use serde_json::json;
        if start {
            ml.log(
                MlEvent::Start,
                "block_start",
                json!(null),
                json!({"first_epoch_num": epoch + 1, "epoch_count": 1}),
            );
            ml.log(
                MlEvent::Start,
                "epoch_start",
                json!(null),
                json!({"epoch_num": epoch + 1}),
            );
        } else {
            ml.log(
                MlEvent::End,
                "epoch_stop",
                json!(null),
                json!({"epoch_num": epoch + 1}),
            );
            ml.log(
                MlEvent::End,
                "block_stop",
                json!(null),
                json!({"first_epoch_num": epoch + 1}),
            );
        }
    }

    /// `Testing at - J/N of epoch E,` and the reference's accuracy line (with --mlperf-logging
    /// its recall, precision, f1, ap and AUC line), tracking the best values.
    fn testing(&mut self, step: u64, m: &EvalMetrics) {
        let (j, k) = self.position(step);
        let epoch_num = (step as f64) / self.per_epoch as f64 + 1.0;
        if let Some(ml) = self.mlperf {
            ml.log(
                MlEvent::Start,
                "eval_start",
                serde_json::json!(null),
                serde_json::json!({"epoch_num": epoch_num}),
            );
        }
        println!("Testing at - {j}/{} of epoch {k},", self.per_epoch);
        self.print_metrics(m);
        if let Some(ml) = self.mlperf {
            let meta = serde_json::json!({"epoch_num": epoch_num});
            ml.log(
                MlEvent::Point,
                "eval_accuracy",
                serde_json::json!(m.auc),
                meta.clone(),
            );
            ml.log(MlEvent::End, "eval_stop", serde_json::json!(null), meta);
        }
        self.last_tested = Some(step);
        self.check_target();
    }

    /// The reference's line of an evaluation's results, tracking the best values.
    fn print_metrics(&mut self, m: &EvalMetrics) {
        self.best_accuracy = self.best_accuracy.max(m.accuracy);
        if self.mlperf.is_some() {
            self.best_auc = self.best_auc.max(m.auc);
            println!(
                "recall {:.4}, precision {:.4}, f1 {:.4}, ap {:.4}, auc {:.4}, best auc {:.4}, accuracy {:3.3} %, best accuracy {:3.3} %",
                m.recall,
                m.precision,
                m.f1,
                m.average_precision,
                m.auc,
                self.best_auc,
                m.accuracy * 100.0,
                self.best_accuracy * 100.0
            );
        } else {
            println!(
                " accuracy {:3.3} %, best {:3.3} %",
                m.accuracy * 100.0,
                self.best_accuracy * 100.0
            );
        }
    }
}

impl TrainObserver for ReferenceLog {
    fn started(&mut self, first_step: u64, total_steps: u64) {
        self.total_steps = total_steps;
        self.per_epoch = (total_steps / self.nepochs).max(1);
        if let Some(ml) = self.mlperf {
            ml.log(
                MlEvent::End,
                "init_stop",
                serde_json::json!(null),
                serde_json::json!({}),
            );
            ml.log(
                MlEvent::Start,
                "run_start",
                serde_json::json!(null),
                serde_json::json!({}),
            );
            self.run.log(ml);
        }
        println!("time/loss/accuracy (if enabled):");
        self.epoch_events(true, first_step / self.per_epoch);
    }

    fn stepped(&mut self, step: u64) {
        if step.is_multiple_of(self.per_epoch) {
            let epoch = step / self.per_epoch - 1;
            self.epoch_events(false, epoch);
            if step < self.total_steps {
                self.epoch_events(true, epoch + 1);
            }
        }
    }

    fn interval(&mut self, r: &IntervalReport) {
        let (j, k) = self.position(r.step);
        // The reference prints -1 as the time per iteration without --print-time.
        let ms = if self.print_time { r.ms_per_step } else { -1.0 };
        let wall = if self.wall_time {
            format!(" ({})", wall_clock_hh_mm())
        } else {
            String::new()
        };
        println!(
            "Finished training it {j}/{} of epoch {k}, {ms:.2} ms/it, loss {:.6}{wall}",
            self.per_epoch, r.loss
        );
    }

    fn evaluated(&mut self, step: u64, m: &EvalMetrics) {
        self.testing(step, m);
    }

    fn saved(&mut self, _step: u64, path: &std::path::Path, _seconds: f64) {
        println!("Saving model to {}", path.display());
    }

    fn final_evaluation(&mut self, step: u64, m: &EvalMetrics) {
        // A run stopped at its target ends right after the evaluation already printed.
        if m.rmse.is_none() && self.last_tested != Some(step) {
            self.testing(step, m);
        }
        if !self.target_reached {
            // As the reference: a target missed ends the run "aborted".
            self.run_stop(if self.target.is_set() {
                "aborted"
            } else {
                "success"
            });
        }
    }

    fn should_stop(&self) -> bool {
        self.target_reached
    }
}

/// The reference's TensorBoard scalars (`--tensor-board-filename`), as its SummaryWriter
/// writes them: `Train/Loss` at each print interval and, at each evaluation, `Test/Acc` or,
/// with --mlperf-logging, `mlperf-metrics-test/{recall,precision,f1,ap,roc_auc,accuracy}`;
/// the step is the global iteration. Write errors cannot stop the loop from inside an
/// observer: the first is kept and returned by [`ReferenceEvents::finish`].
pub struct ReferenceEvents {
    events: EventWriter,
    mlperf: bool,
    error: Option<anyhow::Error>,
}

impl ReferenceEvents {
    /// The first write error, if any.
    pub fn finish(self) -> Result<()> {
        self.error.map_or(Ok(()), Err)
    }

    fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        for &(tag, value) in values {
            if self.error.is_some() || !value.is_finite() {
                continue;
            }
            if let Err(e) = self.events.scalar(tag, step, value as f32) {
                log::warn!("{e:#}: the run goes on without its TensorBoard events");
                self.error = Some(e.context("writing --tensor-board-filename's events"));
            }
        }
    }
}

impl TrainObserver for ReferenceEvents {
    fn interval(&mut self, r: &IntervalReport) {
        self.scalars(r.step, &[("Train/Loss", r.loss)]);
    }

    fn evaluated(&mut self, step: u64, m: &EvalMetrics) {
        if m.rmse.is_some() {
            return;
        }
        if self.mlperf {
            self.scalars(
                step,
                &[
                    ("mlperf-metrics-test/recall", m.recall),
                    ("mlperf-metrics-test/precision", m.precision),
                    ("mlperf-metrics-test/f1", m.f1),
                    ("mlperf-metrics-test/ap", m.average_precision),
                    ("mlperf-metrics-test/roc_auc", m.auc),
                    ("mlperf-metrics-test/accuracy", m.accuracy),
                ],
            );
        } else {
            self.scalars(step, &[("Test/Acc", m.accuracy)]);
        }
    }

    fn final_evaluation(&mut self, step: u64, m: &EvalMetrics) {
        self.evaluated(step, m);
    }
}

/// The wall-clock time as `HH:MM`, as the reference's `time.strftime("%H:%M")` writes it, in
/// UTC (reading the local time zone would need the C library or another dependency).
fn wall_clock_hh_mm() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}", (now / 3600) % 24, (now / 60) % 60)
}
