//! The training loop of a [`ShardedDlrm`] on N ranks: every rank steps through the same global
//! batches, each reading from the data source only its part of them ([`RankPart`]: its slice's
//! dense rows and labels and its tables' ids), and the final
//! evaluation scores the whole held-out set (each rank its slice, gathered).

use super::{
    DataSource, EvalMetrics, IntervalReport, TrainObserver, TrainOptions, epoch_order, start_state,
    steps_per_epoch, total_steps,
};
use crate::data::{Batch, RankPart};
use crate::distributed::{Collectives, ShardPlan};
use crate::model::dlrm::{CollectiveCost, CommStats, DenseReduction, ShardedDlrm, slice_of};
use crate::model::{PhaseSeconds, PhaseTimer};
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
    pub per_rank: Vec<RankTimes>,
    pub wall_seconds: f64,
}

/// Trains `model` (this rank's share) for the steps `opts` asks of `data`, then scores the
/// held-out set. Every rank calls it with the same options; `observer` sees the progress
/// (the caller gives rank 0 the one that prints).
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
    // The batch order of the single-process loop (shuffled per epoch when the data asks).
    let (_, mut shuffle_rng) = start_state(opts)?;
    let mut order = Vec::new();
    model.reserve(b);
    model.reserve_inference(opts.test_batch_size);
    observer.started(0, steps);
    let (mut batch, mut timer) = (Batch::default(), PhaseTimer::default());
    let (mut interval_loss, mut interval_steps, mut train_loss) = (0.0, 0u64, 0.0);
    let mut interval_start = Instant::now();
    let steps_start = Instant::now();
    for step in 0..steps {
        if step % per_epoch == 0 {
            epoch_order(&mut order, data_batches, data.shuffle(), &mut shuffle_rng);
        }
        let first = order[((step % per_epoch) % data_batches) as usize] * b as u64;
        data.fill_train_part(first, b, &rank_part(comm, model, b), &mut batch)?;
        timer.restart();
        let loss = model
            .train_step(comm, &batch.view(), opts.lr.at(step), &mut timer)
            .with_context(|| format!("training samples {first}..{}", first + b as u64))?;
        (interval_loss, interval_steps, train_loss) =
            (interval_loss + loss, interval_steps + 1, loss);
        observer.stepped(step + 1);
        if opts.print_freq > 0 && (step + 1) % opts.print_freq as u64 == 0 {
            let secs = interval_start.elapsed().as_secs_f64();
            observer.interval(&IntervalReport {
                step: step + 1,
                total_steps: steps,
                epoch: step / per_epoch,
                loss: interval_loss / interval_steps as f64,
                ms_per_step: 1e3 * secs / interval_steps as f64,
                lr: opts.lr.at(step),
                samples_per_sec: (interval_steps * b as u64) as f64 / secs,
            });
            (interval_loss, interval_steps, interval_start) = (0.0, 0, Instant::now());
        }
    }
    let step_seconds = steps_start.elapsed().as_secs_f64();
    // The training steps' collectives, before the evaluation adds its forward exchanges.
    let train_comm = model.comm_stats();
    observer.finished();
    let metrics = evaluate_sharded(comm, model, data, opts.test_batch_size, &mut batch)?;
    let per_rank = gather_times(comm, timer.seconds(), train_comm);
    Ok(ShardedReport {
        model: "dlrm".into(),
        ranks: comm.size(),
        plan: model.plan().clone(),
        dense_reduction: model.reduction(),
        threads_per_rank,
        batch_size: b,
        steps,
        samples_per_sec: (steps * b as u64) as f64 / step_seconds,
        comm_fraction: train_comm.seconds() / step_seconds,
        train_loss,
        test_loss: metrics.loss,
        test_accuracy: metrics.accuracy,
        test_auc: metrics.auc,
        test_ne: metrics.ne,
        per_rank,
        wall_seconds: start.elapsed().as_secs_f64(),
    })
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
        data.fill_test_part(first, size, &part, batch)?;
        let rows = part.rows;
        model
            .predict(comm, &batch.view(), &mut out)
            .with_context(|| format!("held-out samples {first}..{}", first + size as u64))?;
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
