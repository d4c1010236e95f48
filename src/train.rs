//! The training loop: batches in, forward, backward with the fused updates, periodic
//! evaluation on held-out data, progress, and the summary the DLRM paper's CPU profile reports
//! (throughput and the time split by phase).

mod sharded;
pub use sharded::{RankTimes, ShardedReport, evaluate_sharded, train_sharded};

use crate::cancel::Cancel;
use crate::checkpoint::{self, TrainState};
use crate::data::Batch;
use crate::metrics::EvalMetrics;
use crate::model::{
    Model, OptimizerKind, ParameterScope, Parameters, PhaseSeconds, PhaseTimer, Precision, Task,
    first_non_finite,
};
use crate::names::{Field, FieldError, FieldNames, ensure_field};
use crate::rng::{SplitMix64, derive_key};
use dlrm_kernels::bf16::Isa;
use dlrm_kernels::roofline::{fma_peak, fma_peak_flops};

pub use crate::data::DataSource;
pub use crate::schedule::{LrSchedule, ensure_learning_rate};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The training loss over one report interval (`--print-freq` steps).
#[derive(Clone, Debug)]
pub struct IntervalReport {
    /// Steps completed, and the run's last step.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    /// The learning rate of the interval's last step.
    pub lr: f32,
    /// Mean training loss of the interval.
    pub loss: f64,
    pub ms_per_step: f64,
    pub samples_per_sec: f64,
}

/// Whoever watches a training run: [`train`] reports through it and never prints (the CLI
/// draws a progress bar and writes lines; tools and tests use [`Quiet`]). Every method has an
/// empty default.
pub trait TrainObserver {
    /// Training runs from step `first_step` to `total_steps`.
    fn started(&mut self, first_step: u64, total_steps: u64) {
        let _ = (first_step, total_steps);
    }
    /// Step `step` is done.
    fn stepped(&mut self, step: u64) {
        let _ = step;
    }
    /// A report interval ended.
    fn interval(&mut self, report: &IntervalReport) {
        let _ = report;
    }
    /// A periodic evaluation (`--test-freq`) after step `step`.
    fn evaluated(&mut self, step: u64, metrics: &EvalMetrics) {
        let _ = (step, metrics);
    }
    /// A checkpoint of step `step` was saved at `path` in `seconds`.
    fn saved(&mut self, step: u64, path: &Path, seconds: f64) {
        let _ = (step, path, seconds);
    }
    /// The steps are over (the final evaluation follows).
    fn finished(&mut self) {}
    /// The final evaluation, after step `step` (the run's last), which the report also holds.
    fn final_evaluation(&mut self, step: u64, metrics: &EvalMetrics) {
        let _ = (step, metrics);
    }
    /// Asked after every step: true ends the run there, with the checkpoint and the final
    /// evaluation of a run's end (e.g. a quality target reached at the latest evaluation,
    /// whose results the final evaluation then reports without evaluating again).
    fn should_stop(&self) -> bool {
        false
    }
}

/// An observer that ignores everything.
pub struct Quiet;

impl TrainObserver for Quiet {}

/// Two observers watching one run (e.g. the console and a run's records): each event goes to
/// the first, then to the second.
impl<A: TrainObserver, B: TrainObserver> TrainObserver for (A, B) {
    fn started(&mut self, first_step: u64, total_steps: u64) {
        self.0.started(first_step, total_steps);
        self.1.started(first_step, total_steps);
    }
    fn stepped(&mut self, step: u64) {
        self.0.stepped(step);
        self.1.stepped(step);
    }
    fn interval(&mut self, report: &IntervalReport) {
        self.0.interval(report);
        self.1.interval(report);
    }
    fn evaluated(&mut self, step: u64, metrics: &EvalMetrics) {
        self.0.evaluated(step, metrics);
        self.1.evaluated(step, metrics);
    }
    fn saved(&mut self, step: u64, path: &Path, seconds: f64) {
        self.0.saved(step, path, seconds);
        self.1.saved(step, path, seconds);
    }
    fn finished(&mut self) {
        self.0.finished();
        self.1.finished();
    }
    fn final_evaluation(&mut self, step: u64, metrics: &EvalMetrics) {
        self.0.final_evaluation(step, metrics);
        self.1.final_evaluation(step, metrics);
    }
    fn should_stop(&self) -> bool {
        self.0.should_stop() || self.1.should_stop()
    }
}

/// An observer that may be absent (e.g. records written only when asked for): when absent,
/// events are ignored.
impl<T: TrainObserver> TrainObserver for Option<T> {
    fn started(&mut self, first_step: u64, total_steps: u64) {
        if let Some(o) = self {
            o.started(first_step, total_steps);
        }
    }
    fn stepped(&mut self, step: u64) {
        if let Some(o) = self {
            o.stepped(step);
        }
    }
    fn interval(&mut self, report: &IntervalReport) {
        if let Some(o) = self {
            o.interval(report);
        }
    }
    fn evaluated(&mut self, step: u64, metrics: &EvalMetrics) {
        if let Some(o) = self {
            o.evaluated(step, metrics);
        }
    }
    fn saved(&mut self, step: u64, path: &Path, seconds: f64) {
        if let Some(o) = self {
            o.saved(step, path, seconds);
        }
    }
    fn finished(&mut self) {
        if let Some(o) = self {
            o.finished();
        }
    }
    fn final_evaluation(&mut self, step: u64, metrics: &EvalMetrics) {
        if let Some(o) = self {
            o.final_evaluation(step, metrics);
        }
    }
    fn should_stop(&self) -> bool {
        self.as_ref().is_some_and(|o| o.should_stop())
    }
}

/// An observer lent for a run (e.g. one chosen at run time, `&mut dyn TrainObserver`, paired
/// with another).
impl<T: TrainObserver + ?Sized> TrainObserver for &mut T {
    fn started(&mut self, first_step: u64, total_steps: u64) {
        (**self).started(first_step, total_steps);
    }
    fn stepped(&mut self, step: u64) {
        (**self).stepped(step);
    }
    fn interval(&mut self, report: &IntervalReport) {
        (**self).interval(report);
    }
    fn evaluated(&mut self, step: u64, metrics: &EvalMetrics) {
        (**self).evaluated(step, metrics);
    }
    fn saved(&mut self, step: u64, path: &Path, seconds: f64) {
        (**self).saved(step, path, seconds);
    }
    fn finished(&mut self) {
        (**self).finished();
    }
    fn final_evaluation(&mut self, step: u64, metrics: &EvalMetrics) {
        (**self).final_evaluation(step, metrics);
    }
    fn should_stop(&self) -> bool {
        (**self).should_stop()
    }
}

/// What a training run does.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub batch_size: usize,
    /// Steps per epoch; 0 = one pass over the training data.
    pub num_batches: usize,
    pub nepochs: usize,
    pub lr: LrSchedule,
    /// Evaluate every this many steps (0 = only at the end).
    pub test_freq: usize,
    pub print_freq: usize,
    pub test_batch_size: usize,
    /// Keep a last partial batch of an epoch (else drop it).
    pub keep_last_batch: bool,
    pub seed: u64,
    /// Where and how often to save checkpoints (None: never).
    pub checkpoint: Option<CheckpointPolicy>,
    /// Continue a run from this state (a loaded checkpoint's) instead of from step 0.
    pub resume: Option<TrainState>,
    /// End the run after this many steps of this call (counted from `resume`'s step), with the
    /// checkpoint and evaluation of a run's end: a later run resumes from that checkpoint
    /// exactly. None: run to the configured end.
    pub stop_after_steps: Option<u64>,
    /// Checked between steps and in checkpoint saves (never requested by default).
    pub cancel: Cancel,
}

impl TrainOptions {
    /// One epoch of `batch_size` batches at learning rate `lr`, evaluated at the end only,
    /// quietly, no checkpoints; change fields with struct update syntax.
    pub fn new(batch_size: usize, lr: LrSchedule) -> TrainOptions {
        TrainOptions {
            batch_size,
            num_batches: 0,
            nepochs: 1,
            lr,
            test_freq: 0,
            print_freq: 0,
            test_batch_size: batch_size.max(1024),
            keep_last_batch: true,
            seed: 1,
            checkpoint: None,
            resume: None,
            stop_after_steps: None,
            cancel: Cancel::never(),
        }
    }
}

/// When and where checkpoints are saved.
#[derive(Clone, Debug)]
pub struct CheckpointPolicy {
    pub dir: PathBuf,
    /// Save every this many steps (0: only at the end).
    pub every: u64,
    /// Versions kept.
    pub keep: usize,
    /// A dataset folder whose encoding files (dictionaries, header) go into the checkpoint.
    pub dataset_files: Option<PathBuf>,
}

/// One evaluation (accuracy, AUC and NE are NaN, written as null, for regression).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub auc: f64,
    pub ne: f64,
    /// Regression only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
}

/// What a run reports (also written as JSON by --report-json).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    pub model: String,
    pub samples_per_sec: f64,
    /// The dense compute's rate in the steady state: [`Model::flops_per_sample`] times
    /// `samples_per_sec` (absent for models that do not count their FLOPs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gflop_per_sec: Option<f64>,
    /// The FMA peak of the training threads, measured after the run by [`measure_fma_peak`]
    /// (absent unless asked for with [`TrainReport::add_fma_peak`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fma_peak_gflop_per_sec: Option<f64>,
    /// `gflop_per_sec` / `fma_peak_gflop_per_sec`: the step's fraction of the machine's peak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_fraction: Option<f64>,
    pub threads: usize,
    /// The precision the model trained in ([`Model::precision`]).
    #[serde(default)]
    pub precision: Precision,
    /// The instruction set the BF16 kernels run on ([`Isa::selected`], as `Debug` names it:
    /// `Avx512Bf16`, `Portable`).
    #[serde(default)]
    pub isa: String,
    pub batch_size: usize,
    pub steps: u64,
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub test_auc: f64,
    pub test_ne: f64,
    /// RMSE on the held-out data (regression only; absent for classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_rmse: Option<f64>,
    /// RMSE on the whole training data after training (regression only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_rmse: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_auc: Option<f64>,
    pub evals: Vec<EvalPoint>,
    pub phase_seconds: PhaseSeconds,
    pub peak_rss_bytes: u64,
    pub optimizer: OptimizerKind,
    pub learning_rate: f32,
    pub wall_seconds: f64,
}

impl TrainReport {
    /// Records the FMA peak `gflop_per_sec` of the threads that trained, and the dense
    /// compute's fraction of it.
    pub fn add_fma_peak(&mut self, gflop_per_sec: f64) {
        self.fma_peak_gflop_per_sec = Some(gflop_per_sec);
        self.peak_fraction = self.gflop_per_sec.map(|g| g / gflop_per_sec);
    }
}

/// Vector FMAs per [`fma_peak`] call of the probe: about 0.1 ms, so the clock is read rarely.
const FMA_PROBE_ITERS: usize = 1 << 14;

/// The peak FMA rate (GFLOP/s) of the current thread pool: every thread runs independent
/// vector FMA chains on registers (the roofline bench's `fma-peak` loop) for `seconds`.
pub fn measure_fma_peak(seconds: f64) -> f64 {
    use rayon::prelude::*;
    use std::hint::black_box;
    let threads = rayon::current_num_threads();
    let started = Instant::now();
    let calls: usize = (0..threads)
        .into_par_iter()
        .with_max_len(1)
        .map(|_| {
            let mut calls = 0;
            while started.elapsed().as_secs_f64() < seconds {
                black_box(fma_peak(
                    FMA_PROBE_ITERS,
                    black_box(0.999_999),
                    black_box(1e-7),
                ));
                calls += 1;
            }
            calls
        })
        .sum();
    (calls * fma_peak_flops(FMA_PROBE_ITERS)) as f64 / started.elapsed().as_secs_f64() * 1e-9
}

/// Steps excluded from the throughput figure while caches, pages and buffers warm up.
fn warmup_steps(total: u64) -> u64 {
    (total / 10).clamp(1, 20).min(total.saturating_sub(1))
}

/// Training stopped because the model diverged: the loss or a parameter is NaN or infinite.
/// Returned inside the `anyhow::Error` of [`train`], so callers can tell it from other
/// failures (`downcast_ref`).
#[derive(Clone, Debug, PartialEq)]
pub struct Diverged {
    /// Steps completed, the diverging one included.
    pub step: u64,
    /// What became non-finite.
    pub what: String,
}

impl Diverged {
    /// The message with the learning rate named by `names`.
    pub fn render(&self, names: FieldNames<'_>) -> String {
        format!(
            "{} at step {}; training stopped (lower {}, or check the data)",
            self.what,
            self.step,
            names(Field::LearningRate)
        )
    }
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(&Field::name))
    }
}

impl std::error::Error for Diverged {}

/// Steps between scans of the dense parameters when the options ask for no progress reports
/// (`print_freq` 0): the scan then keeps its own interval.
const DEFAULT_CHECK_INTERVAL: u64 = 100;

/// Refuses a model whose parameters are not all finite (dense parameters, or every parameter
/// with `ParameterScope::All`): the error names the tensor, the index and the step.
fn ensure_finite_parameters<P: Parameters + ?Sized>(
    model: &P,
    scope: ParameterScope,
    step: u64,
) -> Result<()> {
    match first_non_finite(model, scope) {
        Some(bad) => Err(Diverged {
            step,
            what: format!("parameter {bad}"),
        }
        .into()),
        None => Ok(()),
    }
}

/// Refuses a non-finite loss of the step that completed `step` steps.
fn ensure_finite_loss(loss: f64, step: u64) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    Err(Diverged {
        step,
        what: format!("the loss diverged to {loss}"),
    }
    .into())
}

/// Steps between scans of the dense parameters: the report interval, or
/// [`DEFAULT_CHECK_INTERVAL`] without reports.
fn check_interval(opts: &TrainOptions) -> u64 {
    match opts.print_freq {
        0 => DEFAULT_CHECK_INTERVAL,
        n => n as u64,
    }
}

/// Whether the options ask for a periodic evaluation after step `step` (`--test-freq`; never
/// after the run's `last` step, which the final evaluation scores).
fn periodic_eval_due(opts: &TrainOptions, step: u64, last: bool) -> bool {
    opts.test_freq > 0 && step.is_multiple_of(opts.test_freq as u64) && !last
}

/// Batches in one pass over `train_len` training samples, and steps per epoch.
fn steps_per_epoch(opts: &TrainOptions, train_len: u64) -> Result<(u64, u64)> {
    ensure_field(opts.batch_size > 0, |n| {
        format!("{} must be at least 1", n(Field::BatchSize))
    })?;
    ensure_field(opts.nepochs > 0, |n| {
        format!("{} must be at least 1", n(Field::Epochs))
    })?;
    anyhow::ensure!(train_len > 0, "the training data is empty");
    let bs = opts.batch_size as u64;
    let partial = !train_len.is_multiple_of(bs) && opts.keep_last_batch;
    let data_batches = train_len / bs + u64::from(partial);
    anyhow::ensure!(
        data_batches > 0,
        "the training data ({train_len} samples) is smaller than one batch of {bs} and the last partial batch is dropped"
    );
    let per_epoch = if opts.num_batches > 0 {
        opts.num_batches as u64
    } else {
        data_batches
    };
    Ok((data_batches, per_epoch))
}

/// Steps a run of `opts` takes over `train_len` training samples (all epochs): the step
/// [`train`] runs to, from step 0 or from a resumed state.
pub fn total_steps(opts: &TrainOptions, train_len: u64) -> Result<u64> {
    let (_, per_epoch) = steps_per_epoch(opts, train_len)?;
    let epochs = opts.nepochs as u64;
    per_epoch.checked_mul(epochs).ok_or_else(|| {
        FieldError::new(|n| format!("{} x {} overflows", n(Field::NumBatches), n(Field::Epochs)))
            .into()
    })
}

/// Bytes of memory available for new allocations: `MemAvailable` of /proc/meminfo, or
/// `u64::MAX` (no limit known) where the file is absent or unreadable (not Linux).
pub fn available_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| mem_available(&s))
        .unwrap_or(u64::MAX)
}

/// The `MemAvailable:` line of /proc/meminfo's text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses buffers of `what` that need more than the available memory: `count` items of
/// `bytes_each` bytes (checked: a product that overflows is refused too). Returns the bytes.
pub fn ensure_fits_in_memory(what: &str, count: u64, bytes_each: u64) -> Result<u64> {
    fits_in_memory(count, bytes_each).map_err(|short| anyhow::anyhow!("{what} {short}"))
}

/// Memory that `count` items of `bytes_each` bytes would need beyond what is available.
#[derive(Clone, Copy, Debug)]
pub struct MemoryShortfall {
    count: u64,
    bytes_each: u64,
    available: u64,
}

impl std::fmt::Display for MemoryShortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let MemoryShortfall {
            count,
            bytes_each,
            available,
        } = *self;
        let needed = count
            .checked_mul(bytes_each)
            .map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
        write!(
            f,
            "need {needed} bytes ({count} x {bytes_each}), but only {available} bytes of memory are available"
        )
    }
}

/// The bytes of `count` items of `bytes_each` bytes, when they fit in the available memory.
pub fn fits_in_memory(count: u64, bytes_each: u64) -> Result<u64, MemoryShortfall> {
    let available = available_memory_bytes();
    match count.checked_mul(bytes_each) {
        Some(n) if n <= available => Ok(n),
        _ => Err(MemoryShortfall {
            count,
            bytes_each,
            available,
        }),
    }
}

/// Reserves the model's buffers for batches of `batch` samples, after checking that they fit
/// in memory (with the batch's own arrays, `size` naming the setting that sized them).
pub fn reserve_checked(
    model: &mut dyn Model,
    batch: usize,
    training: bool,
    size: Field,
) -> Result<()> {
    // The batch arrays: dense values, labels, and an id and an offset per table.
    let batch_floats = model.num_dense() + 1 + 2 * model.num_tables();
    let floats = model.buffer_floats_per_sample(training) + batch_floats;
    if let Err(short) = fits_in_memory(batch as u64, 4 * floats as u64) {
        return Err(FieldError::new(move |n| {
            format!("the buffers of {} {batch} {short}", n(size))
        })
        .into());
    }
    if training {
        model.reserve(batch);
    } else {
        model.reserve_inference(batch);
    }
    Ok(())
}

/// Evaluates the model on the whole held-out split.
pub fn evaluate(
    model: &mut dyn Model,
    data: &dyn DataSource,
    batch_size: usize,
    batch: &mut Batch,
) -> Result<EvalMetrics> {
    score(model, data, Samples::HeldOut, batch_size, batch)
}

/// Which samples of a source [`score`] reads.
#[derive(Clone, Copy)]
enum Samples {
    Training,
    HeldOut,
}

/// The metrics of the model's predictions on every sample of `samples` (borrowed from `data`
/// or filled into `batch`), for the model's task.
fn score(
    model: &mut dyn Model,
    data: &dyn DataSource,
    samples: Samples,
    batch_size: usize,
    batch: &mut Batch,
) -> Result<EvalMetrics> {
    let (n, split) = match samples {
        Samples::Training => (data.train_len(), "training"),
        Samples::HeldOut => (data.test_len(), "held-out"),
    };
    let mut preds = Vec::with_capacity(n as usize);
    let mut labels = Vec::with_capacity(n as usize);
    let mut out = Vec::new();
    let mut first = 0;
    while first < n {
        let size = batch_size.min((n - first) as usize);
        let view = match samples {
            Samples::Training => data.train_view(first, size, batch)?,
            Samples::HeldOut => data.test_view(first, size, batch)?,
        };
        model
            .predict(&view, &mut out)
            .with_context(|| format!("{split} samples {first}..{}", first + size as u64))?;
        ensure_finite_predictions(model, &out, |i| {
            format!("{split} sample {}", first + i as u64)
        })?;
        preds.extend_from_slice(&out);
        labels.extend_from_slice(view.labels);
        first += size as u64;
    }
    Ok(match model.task() {
        Task::Classification => EvalMetrics::compute(&preds, &labels),
        Task::Regression => EvalMetrics::regression(&preds, &labels),
    })
}

/// Refuses non-finite predictions, which make every metric meaningless (all-NaN scores tie,
/// which reads as AUC 0.5): names the sample (`sample(i)` for prediction i) and the model's
/// first non-finite parameter.
pub fn ensure_finite_predictions<P: Parameters + ?Sized>(
    model: &P,
    preds: &[f32],
    sample: impl FnOnce(usize) -> String,
) -> Result<()> {
    let Some(i) = preds.iter().position(|p| !p.is_finite()) else {
        return Ok(());
    };
    let cause = first_non_finite(model, ParameterScope::All)
        .map_or_else(String::new, |bad| format!(" (parameter {bad})"));
    anyhow::bail!(
        "the model's prediction for {} is {}: its parameters are not finite{cause}",
        sample(i),
        preds[i]
    )
}

/// Peak resident set size of this process (VmHWM), 0 where /proc is absent.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The shape of a run over its data, checked before any step.
struct Plan {
    train_len: u64,
    /// Batches in one pass over the training data.
    data_batches: u64,
    per_epoch: u64,
    total_steps: u64,
    /// The batch size, as a sample count.
    bs: u64,
    /// Samples of a training and of an evaluation batch (no batch is larger than its data).
    train_batch: usize,
    test_batch: usize,
    /// The step `stop_after_steps` ends the run at, when before the end.
    stop_at: Option<u64>,
}

impl Plan {
    fn new(opts: &TrainOptions, data: &dyn DataSource) -> Result<Plan> {
        opts.lr.validate()?;
        ensure_field(opts.test_batch_size > 0, |n| {
            format!("{} must be at least 1", n(Field::TestBatchSize))
        })?;
        let train_len = data.train_len();
        let (data_batches, per_epoch) = steps_per_epoch(opts, train_len)?;
        let total_steps = total_steps(opts, train_len)?;
        let resumed_at = opts.resume.as_ref().map_or(0, |r| r.step);
        anyhow::ensure!(data.test_len() > 0, "the held-out data is empty");
        anyhow::ensure!(
            resumed_at < total_steps,
            "nothing to do: the checkpoint is at step {resumed_at} of {total_steps}"
        );
        let bs = opts.batch_size as u64;
        anyhow::ensure!(
            opts.stop_after_steps != Some(0),
            "stop_after_steps must be at least 1"
        );
        let stop_at = opts
            .stop_after_steps
            .map(|n| resumed_at.saturating_add(n))
            .filter(|&s| s < total_steps);
        Ok(Plan {
            train_len,
            data_batches,
            per_epoch,
            total_steps,
            bs,
            train_batch: bs.min(train_len) as usize,
            test_batch: (opts.test_batch_size as u64).min(data.test_len()) as usize,
            stop_at,
        })
    }
}

/// Where a run starts: the training state (step 0, or a resumed checkpoint's) and the
/// generator of the epochs' batch orders.
fn start_state(opts: &TrainOptions) -> Result<(TrainState, SplitMix64)> {
    let Some(r) = &opts.resume else {
        let shuffle_rng = SplitMix64::new(derive_key(opts.seed, &[0x005e_ed0f]));
        let state = TrainState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            epoch_shuffle_state: shuffle_rng.state(),
            lr: opts.lr,
            batch_size: opts.batch_size,
            seed: opts.seed,
            run_id: checkpoint::new_run_id(),
        };
        return Ok((state, shuffle_rng));
    };
    // A state at step 0 (imported parameters) has no position in the data to keep.
    anyhow::ensure!(
        r.step == 0 || r.batch_size == opts.batch_size,
        "the checkpoint was trained with batches of {}, not {}",
        r.batch_size,
        opts.batch_size
    );
    let state = TrainState {
        lr: opts.lr,
        ..r.clone()
    };
    Ok((state, SplitMix64::from_state(r.epoch_shuffle_state)))
}

/// Fills `order` with the batches of one epoch, shuffled when the data asks for it. The order
/// is a function of the generator state alone, so a resumed run draws the same order from the
/// saved state.
fn epoch_order(order: &mut Vec<u64>, data_batches: u64, shuffle: bool, rng: &mut SplitMix64) {
    order.clear();
    order.extend(0..data_batches);
    if shuffle {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
}

/// Throughput bookkeeping: the steps after the warm-up, without the time spent evaluating and
/// saving.
struct Clock {
    started: Instant,
    start_step: u64,
    warmup: u64,
    steady_start: Option<Instant>,
    excluded_seconds: f64,
}

impl Clock {
    fn new(start_step: u64, total_steps: u64) -> Clock {
        Clock {
            started: Instant::now(),
            start_step,
            warmup: warmup_steps(total_steps.saturating_sub(start_step)),
            steady_start: None,
            excluded_seconds: 0.0,
        }
    }

    /// Called before step `step` runs: the steady state starts after the warm-up.
    fn before_step(&mut self, step: u64) {
        if step == self.start_step + self.warmup {
            self.steady_start = Some(Instant::now());
        }
    }

    /// Leaves `seconds` of work that is not training out of the throughput.
    fn exclude(&mut self, seconds: f64) {
        if self.steady_start.is_some() {
            self.excluded_seconds += seconds;
        }
    }

    /// Samples per second of the steady steps up to `step` (NaN when there were none).
    fn samples_per_sec(&self, step: u64, bs: u64) -> f64 {
        let seconds =
            self.steady_start.map_or(0.0, |s| s.elapsed().as_secs_f64()) - self.excluded_seconds;
        let steady_steps = (step - self.start_step).saturating_sub(self.warmup);
        if steady_steps > 0 && seconds > 0.0 {
            (steady_steps * bs) as f64 / seconds
        } else {
            f64::NAN
        }
    }
}

/// The training loss over the current report interval.
struct Window {
    loss: f64,
    steps: u64,
    last_loss: f64,
    start: Instant,
}

impl Window {
    fn new() -> Window {
        Window {
            loss: 0.0,
            steps: 0,
            last_loss: f64::NAN,
            start: Instant::now(),
        }
    }

    /// Ends the interval: its mean loss and speed; the next one starts.
    fn close(
        &mut self,
        step: u64,
        total_steps: u64,
        epoch: u64,
        bs: u64,
        lr: f32,
    ) -> IntervalReport {
        let secs = self.start.elapsed().as_secs_f64();
        self.last_loss = self.loss / self.steps as f64;
        let report = IntervalReport {
            step,
            total_steps,
            epoch,
            lr,
            loss: self.last_loss,
            ms_per_step: secs * 1e3 / self.steps as f64,
            samples_per_sec: (self.steps * bs) as f64 / secs.max(1e-9),
        };
        *self = Window {
            last_loss: self.last_loss,
            ..Window::new()
        };
        report
    }

    /// The mean loss of the last interval (the open one if it has steps).
    fn final_loss(&self) -> f64 {
        if self.steps > 0 {
            self.loss / self.steps as f64
        } else {
            self.last_loss
        }
    }
}

/// A training run between its steps: what it trains, on what, and where it stands.
struct Run<'a> {
    model: &'a mut dyn Model,
    data: &'a dyn DataSource,
    opts: &'a TrainOptions,
    observer: &'a mut dyn TrainObserver,
    plan: Plan,
    batch: Batch,
    eval_batch: Batch,
    /// Where training stands after the latest step (what a checkpoint records).
    state: TrainState,
    clock: Clock,
    window: Window,
    evals: Vec<EvalPoint>,
    /// The latest periodic evaluation and its step: the final one when the run ends there.
    last_eval: Option<(u64, EvalMetrics)>,
    last_saved: Option<u64>,
    /// The time per phase: the loop times the data loading (`other`), each step its own
    /// phases.
    timer: PhaseTimer,
    /// Steps between scans of the dense parameters.
    check_interval: u64,
}

impl Run<'_> {
    /// One step on batch `bi` of epoch `epoch`: its loading, then the model's step. Returns
    /// the batch's loss.
    fn step(&mut self, epoch: u64, bi: u64) -> Result<f64> {
        let (model, opts, step) = (&mut *self.model, self.opts, self.state.step);
        let first = bi * self.plan.bs;
        let size = self.plan.bs.min(self.plan.train_len - first) as usize;
        let samples = || {
            format!(
                "epoch {epoch}, training samples {first}..{}",
                first + size as u64
            )
        };
        self.timer.restart();
        let view = self
            .data
            .train_view(first, size, &mut self.batch)
            .with_context(samples)?;
        self.timer.lap(|p| &mut p.other);
        let loss = model
            .train_step(&view, opts.lr.at(step), &mut self.timer)
            .with_context(samples)?;
        ensure_finite_loss(loss, step + 1)?;
        Ok(loss)
    }

    /// After step `k` of epoch `epoch` (whose order came from `epoch_shuffle_state`): the
    /// state moves on, then the periodic checks, checkpoint, report and evaluation.
    fn after_step(
        &mut self,
        epoch: u64,
        k: u64,
        epoch_shuffle_state: u64,
        loss: f64,
    ) -> Result<()> {
        let step = self.state.step + 1;
        // The loss can stay finite over non-finite parameters (a ReLU maps NaN to 0), so the
        // dense parameters are scanned every report interval. The embedding tables (gigabytes
        // for Criteo) are scanned only before each checkpoint save and at the end: a full scan
        // per interval would cost more than the steps it checks, and a non-finite row either
        // reaches the loss when it is next looked up or is caught before anything is written
        // (`save_checkpoint`).
        if step.is_multiple_of(self.check_interval) {
            ensure_finite_parameters(&*self.model, ParameterScope::Dense, step)?;
        }
        self.state = TrainState {
            step,
            epoch,
            batch_in_epoch: k + 1,
            epoch_shuffle_state,
            ..self.state.clone()
        };
        let opts = self.opts;
        if let Some(every) = opts.checkpoint.as_ref().map(|c| c.every).filter(|&e| e > 0)
            && step.is_multiple_of(every)
        {
            let secs = save_checkpoint(opts, &*self.model, &self.state, self.observer)?;
            self.last_saved = Some(step);
            self.clock.exclude(secs);
        }
        self.window.loss += loss;
        self.window.steps += 1;
        self.observer.stepped(step);
        let total = self.plan.total_steps;
        let last = step == total || Some(step) == self.plan.stop_at;
        if opts.print_freq > 0 && (step.is_multiple_of(opts.print_freq as u64) || last) {
            let lr = opts.lr.at(step - 1);
            let report = self.window.close(step, total, epoch, self.plan.bs, lr);
            self.observer.interval(&report);
        }
        if periodic_eval_due(opts, step, last) {
            self.periodic_eval(step)?;
        }
        Ok(())
    }

    /// An evaluation on the held-out data after step `step` (`--test-freq`).
    fn periodic_eval(&mut self, step: u64) -> Result<()> {
        let t = Instant::now();
        let model = &mut *self.model;
        // Non-finite predictions here come from parameters that diverged since the last scan:
        // report them as the divergence they are.
        let m = evaluate(model, self.data, self.plan.test_batch, &mut self.eval_batch).map_err(
            |e| {
                ensure_finite_parameters(model, ParameterScope::All, step)
                    .err()
                    .unwrap_or(e)
            },
        )?;
        self.observer.evaluated(step, &m);
        self.evals.push(eval_point(step, &m));
        self.last_eval = Some((step, m));
        self.clock.exclude(t.elapsed().as_secs_f64());
        Ok(())
    }

    /// After the last step: the final save and evaluation, and the report.
    fn finish(mut self, threads: usize) -> Result<TrainReport> {
        let (model, opts, data, step) = (&mut *self.model, self.opts, self.data, self.state.step);
        let samples_per_sec = self.clock.samples_per_sec(step, self.plan.bs);
        let phases = self.timer.seconds();
        self.observer.finished();
        if self.last_saved != Some(step) {
            save_checkpoint(opts, model, &self.state, self.observer)?;
        }
        let (train_batch, test_batch) = (self.plan.train_batch, self.plan.test_batch);
        // The model has not changed since an evaluation at this step (a run stopped by its
        // observer right after one): its results are the final ones.
        let final_eval = match self.last_eval {
            Some((at, m)) if at == step => {
                self.evals.pop();
                m
            }
            _ => evaluate(model, data, test_batch, &mut self.eval_batch)?,
        };
        self.observer.final_evaluation(step, &final_eval);
        self.evals.push(eval_point(step, &final_eval));
        let train_rmse = match model.task() {
            Task::Classification => None,
            Task::Regression => {
                let batch = train_batch.max(test_batch);
                let m = score(model, data, Samples::Training, batch, &mut self.eval_batch)?;
                m.rmse
            }
        };
        Ok(TrainReport {
            model: model.name().to_string(),
            samples_per_sec,
            gflop_per_sec: model.flops_per_sample().map(|f| f * samples_per_sec * 1e-9),
            fma_peak_gflop_per_sec: None,
            peak_fraction: None,
            threads,
            precision: model.precision(),
            isa: format!("{:?}", Isa::selected()),
            batch_size: opts.batch_size,
            steps: step,
            train_loss: self.window.final_loss(),
            test_loss: final_eval.loss,
            test_accuracy: final_eval.accuracy,
            test_auc: final_eval.auc,
            test_ne: final_eval.ne,
            test_rmse: final_eval.rmse,
            train_rmse,
            teacher_auc: data.ceiling_auc(),
            evals: self.evals,
            phase_seconds: phases,
            peak_rss_bytes: peak_rss_bytes(),
            optimizer: model.optimizer(),
            learning_rate: opts.lr.base,
            wall_seconds: self.clock.started.elapsed().as_secs_f64(),
        })
    }
}

/// Trains `model` on `data`; the caller has entered the thread pool. Stops with
/// [`crate::cancel::Interrupted`] between steps (and in a checkpoint save) once `opts.cancel`
/// is requested.
pub fn train(
    model: &mut dyn Model,
    data: &dyn DataSource,
    opts: &TrainOptions,
    threads: usize,
    observer: &mut dyn TrainObserver,
) -> Result<TrainReport> {
    let plan = Plan::new(opts, data)?;
    reserve_checked(model, plan.train_batch, true, Field::BatchSize)?;
    reserve_checked(model, plan.test_batch, false, Field::TestBatchSize)?;
    let (state, mut shuffle_rng) = start_state(opts)?;
    let (first_epoch, mut skip) = (state.epoch, state.batch_in_epoch);
    observer.started(state.step, plan.total_steps);
    let (nd, nt) = (model.num_dense(), model.num_tables());
    let mut order: Vec<u64> = Vec::with_capacity(plan.data_batches as usize);
    let mut run = Run {
        model,
        data,
        opts,
        observer,
        batch: Batch::new(nd, nt),
        eval_batch: Batch::new(nd, nt),
        clock: Clock::new(state.step, plan.total_steps),
        state,
        plan,
        window: Window::new(),
        evals: Vec::new(),
        last_eval: None,
        last_saved: None,
        timer: PhaseTimer::default(),
        check_interval: check_interval(opts),
    };
    'epochs: for epoch in first_epoch..opts.nepochs as u64 {
        let epoch_shuffle_state = shuffle_rng.state();
        epoch_order(
            &mut order,
            run.plan.data_batches,
            data.shuffle(),
            &mut shuffle_rng,
        );
        for k in std::mem::take(&mut skip)..run.plan.per_epoch {
            if Some(run.state.step) == run.plan.stop_at {
                break 'epochs;
            }
            opts.cancel.check()?;
            run.clock.before_step(run.state.step);
            let bi = order[(k % run.plan.data_batches) as usize];
            let loss = run.step(epoch, bi)?;
            run.after_step(epoch, k, epoch_shuffle_state, loss)?;
            if run.observer.should_stop() {
                break 'epochs;
            }
        }
    }
    run.finish(threads)
}

/// Checks that every parameter, tables included, is finite, then saves a checkpoint at `state`
/// if the options ask for checkpoints; returns the seconds spent. Runs before every save and
/// at the end of training (saving or not), so no non-finite model is written or returned.
fn save_checkpoint(
    opts: &TrainOptions,
    model: &dyn Model,
    state: &TrainState,
    observer: &mut dyn TrainObserver,
) -> Result<f64> {
    let t = Instant::now();
    ensure_finite_parameters(model, ParameterScope::All, state.step)?;
    let Some(policy) = &opts.checkpoint else {
        return Ok(t.elapsed().as_secs_f64());
    };
    let path = checkpoint::save(
        &policy.dir,
        model,
        state,
        policy.dataset_files.as_deref(),
        policy.keep,
        &opts.cancel,
    )?;
    let secs = t.elapsed().as_secs_f64();
    observer.saved(state.step, &path, secs);
    Ok(secs)
}

fn eval_point(step: u64, m: &EvalMetrics) -> EvalPoint {
    EvalPoint {
        step,
        loss: m.loss,
        accuracy: m.accuracy,
        auc: m.auc,
        ne: m.ne,
        rmse: m.rmse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_reads_the_kib_line() {
        let text = "MemTotal:       16314112 kB\nMemFree:  1000 kB\nMemAvailable:   12000 kB\n";
        assert_eq!(mem_available(text), Some(12000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert!(available_memory_bytes() > 0);
    }

    #[test]
    fn buffers_beyond_memory_are_refused_with_the_bytes() {
        assert_eq!(ensure_fits_in_memory("x", 3, 4).unwrap(), 12);
        let e = ensure_fits_in_memory("the buffers", u64::MAX, 2).unwrap_err();
        assert!(e.to_string().contains("more than 2^64 bytes"), "{e}");
    }
}
