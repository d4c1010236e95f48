//! The training loop of a [`ShardedDlrm`] on N ranks: every rank steps through the same global
//! batches, each reading from the data source only its part of them ([`RankPart`]: its slice's
//! dense rows and labels and its tables' ids), saves its share of the checkpoints, and the
//! final evaluation scores the whole held-out set (each rank its slice, gathered). A resumed
//! run continues from the checkpoint's step, epoch and batch order as one process does.

use super::{
    DataSource, Diverged, EvalMetrics, EvalPoint, IntervalReport, TrainObserver, TrainOptions,
    check_interval, ensure_finite_loss, ensure_finite_parameters, ensure_finite_predictions,
    epoch_order, eval_point, periodic_eval_due, start_state, steps_per_epoch, total_steps,
};
use crate::checkpoint::{self, TrainState};
use crate::data::{Batch, RankPart};
use crate::distributed::{Collectives, ShardPlan};
use crate::model::dlrm::{CollectiveCost, CommStats, DenseReduction, ShardedDlrm, slice_of};
use crate::model::{ParameterScope, PhaseSeconds, PhaseTimer};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// One rank's share of the run's time.
#[derive(Clone, Debug, Serialize)]
pub struct RankTimes {
    pub rank: usize,
    /// Seconds per phase of the step (the all-to-alls are booked to `emb_fwd` and
    /// `dense_update`, the dense reduction to `dense_update`).
    pub phase_seconds: BTreeMap<&'static str, f64>,
    /// Seconds and bytes of each collective (forward all-to-all, backward all-to-all, dense
    /// all-reduce, replicas' gradient gather).
    pub collectives: CommStats,
}

/// What a distributed run reports (rank 0 writes it with --report-json).
#[derive(Clone, Debug, Serialize)]
pub struct ShardedReport {
    pub model: String,
    pub ranks: usize,
    pub plan: ShardPlan,
    pub dense_reduction: DenseReduction,
    pub threads_per_rank: usize,
    pub batch_size: usize,
    pub steps: u64,
    pub samples_per_sec: f64,
    /// The share of the step time rank 0 spent in collectives.
    pub comm_fraction: f64,
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub test_auc: f64,
    pub test_ne: f64,
    /// Every evaluation of the held-out set (`--test-freq`, then the final one), as one
    /// process reports them.
    pub evals: Vec<EvalPoint>,
    pub per_rank: Vec<RankTimes>,
    pub wall_seconds: f64,
}

/// Trains `model` (this rank's share) for the steps `opts` asks of `data` (from `opts.resume`'s
/// state when it resumes a checkpoint, as one process resumes it), saving the checkpoints
/// `opts.checkpoint` asks for ([`checkpoint::save_sharded`]), then scores the held-out set.
/// Every rank calls it with the same options; `observer` sees the progress (the caller gives
/// rank 0 the one that prints and records).
pub fn train_sharded(
    comm: &dyn Collectives,
    model: &mut ShardedDlrm,
    data: &dyn DataSource,
    opts: &TrainOptions,
    threads_per_rank: usize,
    observer: &mut dyn TrainObserver,
) -> Result<ShardedReport> {
    let start = Instant::now();
    let b = opts.batch_size;
    if let Some(why) = model.batch_size_error(b) {
        anyhow::bail!(why);
    }
    // Whole global batches only: the ranks split every batch evenly.
    let len = data.train_len();
    anyhow::ensure!(
        len >= b as u64 && (!opts.keep_last_batch || len.is_multiple_of(b as u64)),
        "the {len} training samples are not a whole number of --mini-batch-size {b} batches: \
         pass --drop-last-batch (each rank trains an equal slice of every global batch)"
    );
    let (data_batches, per_epoch) = steps_per_epoch(opts, len)?;
    let steps = total_steps(opts, len)?;
    // The batch order and the position of the single-process loop (shuffled per epoch when
    // the data asks), from step 0 or from the resumed state.
    let (mut state, mut shuffle_rng) = start_state(opts)?;
    let first_step = state.step;
    anyhow::ensure!(
        first_step < steps,
        "nothing to do: the checkpoint is at step {first_step} of {steps}"
    );
    let stop_at = (opts.stop_after_steps)
        .map(|n| first_step.saturating_add(n))
        .filter(|&s| s < steps);
    let (first_epoch, mut skip) = (state.epoch, state.batch_in_epoch);
    let mut order = Vec::new();
    model.reserve(b);
    model.reserve_inference(opts.test_batch_size);
    observer.started(first_step, steps);
    let mut run = Steps::new(comm, model, data, opts, observer);
    let stop = stop_at.unwrap_or(steps);
    'epochs: for epoch in first_epoch..opts.nepochs as u64 {
        let epoch_shuffle_state = shuffle_rng.state();
        epoch_order(&mut order, data_batches, data.shuffle(), &mut shuffle_rng);
        for k in std::mem::take(&mut skip)..per_epoch {
            if Some(state.step) == stop_at {
                break 'epochs;
            }
            let first = order[(k % data_batches) as usize] * b as u64;
            run.step(state.step, first)?;
            state = TrainState {
                step: state.step + 1,
                epoch,
                batch_in_epoch: k + 1,
                epoch_shuffle_state,
                ..state
            };
            run.after_step(&state, steps, epoch, state.step == stop)?;
        }
    }
    if run.last_saved != Some(state.step) {
        run.save(&state)?;
    }
    let step_seconds = run.steps_start.elapsed().as_secs_f64() - run.excluded_seconds;
    let train_loss = run.final_loss();
    let (timer, mut evals) = (run.timer, run.evals);
    // The training steps' collectives, before the evaluation adds its forward exchanges.
    let train_comm = model.comm_stats();
    observer.finished();
    let mut batch = Batch::default();
    let metrics = evaluate_sharded(comm, model, data, opts.test_batch_size, &mut batch)?;
    observer.final_evaluation(state.step, &metrics);
    evals.push(eval_point(state.step, &metrics));
    let per_rank = gather_times(comm, timer.seconds(), train_comm);
    Ok(ShardedReport {
        model: "dlrm".into(),
        ranks: comm.size(),
        plan: model.plan().clone(),
        dense_reduction: model.reduction(),
        threads_per_rank,
        batch_size: b,
        steps: state.step,
        samples_per_sec: ((state.step - first_step) * b as u64) as f64 / step_seconds,
        comm_fraction: train_comm.seconds() / step_seconds,
        train_loss,
        test_loss: metrics.loss,
        test_accuracy: metrics.accuracy,
        test_auc: metrics.auc,
        test_ne: metrics.ne,
        evals,
        per_rank,
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}

/// The training steps of one rank: what it trains on, its progress reports and checkpoints.
struct Steps<'a> {
    comm: &'a dyn Collectives,
    model: &'a mut ShardedDlrm,
    data: &'a dyn DataSource,
    opts: &'a TrainOptions,
    observer: &'a mut dyn TrainObserver,
    batch: Batch,
    eval_batch: Batch,
    timer: PhaseTimer,
    interval_loss: f64,
    interval_steps: u64,
    interval_start: Instant,
    /// The mean loss of the last closed interval.
    train_loss: f64,
    steps_start: Instant,
    /// Seconds spent saving checkpoints and evaluating (left out of the throughput).
    excluded_seconds: f64,
    last_saved: Option<u64>,
    /// The periodic evaluations so far.
    evals: Vec<EvalPoint>,
    /// Steps between scans of the dense parameters.
    check_interval: u64,
}

impl<'a> Steps<'a> {
    fn new(
        comm: &'a dyn Collectives,
        model: &'a mut ShardedDlrm,
        data: &'a dyn DataSource,
        opts: &'a TrainOptions,
        observer: &'a mut dyn TrainObserver,
    ) -> Steps<'a> {
        Steps {
            comm,
            model,
            data,
            opts,
            observer,
            batch: Batch::default(),
            eval_batch: Batch::default(),
            timer: PhaseTimer::default(),
            interval_loss: 0.0,
            interval_steps: 0,
            interval_start: Instant::now(),
            train_loss: f64::NAN,
            steps_start: Instant::now(),
            excluded_seconds: 0.0,
            last_saved: None,
            evals: Vec::new(),
            check_interval: check_interval(opts),
        }
    }

    /// Step `step` on the global batch starting at training sample `first`.
    fn step(&mut self, step: u64, first: u64) -> Result<()> {
        let b = self.opts.batch_size;
        let part = rank_part(self.comm, self.model, b);
        (self.data).fill_part(crate::data::Split::Train, first, b, &part, &mut self.batch)?;
        self.timer.restart();
        let lr = self.opts.lr.at(step);
        let loss = (self.model)
            .train_step(self.comm, &self.batch.view(), lr, &mut self.timer)
            .with_context(|| format!("training samples {first}..{}", first + b as u64))?;
        // The global batch's loss, the same on every rank: all stop here together.
        ensure_finite_loss(loss, step + 1)?;
        self.interval_loss += loss;
        self.interval_steps += 1;
        Ok(())
    }

    /// After a step (the run now at `state`; `last`: the run's last step): the periodic
    /// finiteness scan, checkpoint, progress report and evaluation, as one process does them.
    fn after_step(
        &mut self,
        state: &TrainState,
        total_steps: u64,
        epoch: u64,
        last: bool,
    ) -> Result<()> {
        let step = state.step;
        // The loss can stay finite over non-finite parameters: the dense ones are scanned
        // every report interval, the tables before every save (as `train` does).
        if step.is_multiple_of(self.check_interval) {
            ensure_finite_on_every_rank(self.comm, self.model, ParameterScope::Dense, step)?;
        }
        if let Some(every) = (self.opts.checkpoint.as_ref().map(|c| c.every)).filter(|&e| e > 0)
            && step.is_multiple_of(every)
        {
            self.save(state)?;
        }
        self.observer.stepped(step);
        let print_freq = self.opts.print_freq as u64;
        if print_freq > 0 && step.is_multiple_of(print_freq) {
            let secs = self.interval_start.elapsed().as_secs_f64();
            let n = self.interval_steps;
            self.train_loss = self.interval_loss / n as f64;
            self.observer.interval(&IntervalReport {
                step,
                total_steps,
                epoch,
                loss: self.train_loss,
                ms_per_step: 1e3 * secs / n as f64,
                lr: self.opts.lr.at(step - 1),
                samples_per_sec: (n * self.opts.batch_size as u64) as f64 / secs,
            });
            (self.interval_loss, self.interval_steps) = (0.0, 0);
            self.interval_start = Instant::now();
        }
        if periodic_eval_due(self.opts, step, last) {
            self.periodic_eval(step)?;
        }
        Ok(())
    }

    /// An evaluation of the whole held-out set after step `step` (`--test-freq`), which the
    /// observer (rank 0's prints and records it) sees as one process's.
    fn periodic_eval(&mut self, step: u64) -> Result<()> {
        let t = Instant::now();
        let (comm, batch_size) = (self.comm, self.opts.test_batch_size);
        let m = evaluate_sharded(
            comm,
            self.model,
            self.data,
            batch_size,
            &mut self.eval_batch,
        )
        .map_err(|e| {
            // Non-finite predictions (gathered: every rank sees them) come from parameters
            // that diverged since the last scan: report them as the divergence they are.
            ensure_finite_on_every_rank(comm, self.model, ParameterScope::All, step)
                .err()
                .unwrap_or(e)
        })?;
        self.observer.evaluated(step, &m);
        self.evals.push(eval_point(step, &m));
        self.excluded_seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// The mean loss of the last interval (the open one if it has steps), as the
    /// single-process report gives it.
    fn final_loss(&self) -> f64 {
        match self.interval_steps {
            0 => self.train_loss,
            n => self.interval_loss / n as f64,
        }
    }

    /// Checks that every rank's parameters, tables included, are finite, then saves this
    /// rank's share of a checkpoint at `state` if the options ask for checkpoints: runs before
    /// every save and at the end (saving or not), so no non-finite model is written.
    fn save(&mut self, state: &TrainState) -> Result<()> {
        let t = Instant::now();
        ensure_finite_on_every_rank(self.comm, self.model, ParameterScope::All, state.step)?;
        let Some(policy) = &self.opts.checkpoint else {
            self.excluded_seconds += t.elapsed().as_secs_f64();
            return Ok(());
        };
        let path = checkpoint::save_sharded(
            &policy.dir,
            self.comm,
            self.model,
            state,
            policy.dataset_files.as_deref(),
            policy.keep,
            &self.opts.cancel,
        )?;
        let secs = t.elapsed().as_secs_f64();
        self.observer.saved(state.step, &path, secs);
        self.excluded_seconds += secs;
        self.last_saved = Some(state.step);
        Ok(())
    }
}

/// The metrics of the whole held-out set (each rank scores its slice of every batch; the
/// predictions and the labels, which each rank reads for its slice only, are gathered).
pub fn evaluate_sharded(
    comm: &dyn Collectives,
    model: &mut ShardedDlrm,
    data: &dyn DataSource,
    batch_size: usize,
    batch: &mut Batch,
) -> Result<EvalMetrics> {
    let n = data.test_len();
    let (mut preds, mut labels, mut out) = (Vec::new(), Vec::new(), Vec::new());
    let mut first = 0;
    while first < n {
        let size = batch_size.min((n - first) as usize);
        let part = rank_part(comm, model, size);
        data.fill_part(crate::data::Split::Test, first, size, &part, batch)?;
        let rows = part.rows;
        model
            .predict(comm, &batch.view(), &mut out)
            .with_context(|| format!("held-out samples {first}..{}", first + size as u64))?;
        // Gathered: every rank finds the same prediction, and fails together.
        ensure_finite_predictions(model, &out, |i| {
            format!("held-out sample {}", first + i as u64)
        })?;
        preds.extend_from_slice(&out);
        let counts: Vec<usize> = (0..comm.size())
            .map(|q| slice_of(q, comm.size(), size).len())
            .collect();
        let at = labels.len();
        labels.resize(at + size, 0.0);
        comm.all_gather_v(&batch.labels[rows], &mut labels[at..], &counts);
        first += size as u64;
    }
    Ok(EvalMetrics::compute(&preds, &labels))
}

/// Checks this rank's parameters in `scope` for NaN and infinities after `step` steps, agreeing
/// with the other ranks (a gather: every rank calls it at the same point), so that all stop
/// together: a rank holding one returns the error one process gives, naming the parameter;
/// the others a divergence naming the ranks that found one.
fn ensure_finite_on_every_rank(
    comm: &dyn Collectives,
    model: &ShardedDlrm,
    scope: ParameterScope,
    step: u64,
) -> Result<()> {
    let mine = ensure_finite_parameters(model, scope, step);
    let all = comm.all_gather_f64(if mine.is_err() { 1.0 } else { 0.0 });
    mine?;
    let ranks: Vec<String> = (all.iter().enumerate())
        .filter(|(_, bad)| **bad != 0.0)
        .map(|(q, _)| q.to_string())
        .collect();
    if ranks.is_empty() {
        return Ok(());
    }
    Err(Diverged {
        step,
        what: format!(
            "a parameter of rank {} (named in its output)",
            ranks.join(", ")
        ),
    }
    .into())
}

/// What this rank reads of a global batch of `size` samples: its slice's rows; its own and the
/// replicated tables.
fn rank_part<'a>(comm: &dyn Collectives, model: &'a ShardedDlrm, size: usize) -> RankPart<'a> {
    RankPart {
        rows: slice_of(comm.rank(), comm.size(), size),
        tables: model.tables_read(),
    }
}

/// Every rank's phase and collective times, in rank order.
fn gather_times(comm: &dyn Collectives, phases: PhaseSeconds, stats: CommStats) -> Vec<RankTimes> {
    let gather = |x: f64| comm.all_gather_f64(x);
    let phase_values: Vec<Vec<f64>> = phases.entries().iter().map(|&(_, s)| gather(s)).collect();
    let costs = [
        stats.forward_all_to_all,
        stats.backward_all_to_all,
        stats.dense_all_reduce,
        stats.replica_all_gather,
        stats.row_shard_all_to_all,
        stats.row_shard_all_gather,
    ];
    let cost_values: Vec<[Vec<f64>; 3]> = costs
        .iter()
        .map(|c| {
            [
                gather(c.calls as f64),
                gather(c.seconds),
                gather(c.bytes as f64),
            ]
        })
        .collect();
    (0..comm.size())
        .map(|rank| {
            let phase_seconds = (phases.entries().iter().zip(&phase_values))
                .map(|(&(name, _), all)| (name, all[rank]))
                .collect();
            let cost = |i: usize| CollectiveCost {
                calls: cost_values[i][0][rank] as u64,
                seconds: cost_values[i][1][rank],
                bytes: cost_values[i][2][rank] as u64,
            };
            RankTimes {
                rank,
                phase_seconds,
                collectives: CommStats {
                    forward_all_to_all: cost(0),
                    backward_all_to_all: cost(1),
                    dense_all_reduce: cost(2),
                    replica_all_gather: cost(3),
                    row_shard_all_to_all: cost(4),
                    row_shard_all_gather: cost(5),
                },
            }
        })
        .collect()
}
