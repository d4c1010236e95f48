//! Dynamic micro-batching: requests wait in a bounded queue; a fixed pool of inference
//! threads takes them in batches (up to `max_batch_rows` rows, or what came within
//! `max_wait` of the oldest) and scores each batch in one forward pass.

use super::metrics::Metrics;
use super::model::Served;
use dlrm::data::Batch;
use dlrm::data::criteo::RawRow;
use dlrm::predict::score_rows;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A request's rows, the model version it started on, and where its answer goes.
pub struct Job {
    pub rows: Vec<RawRow>,
    pub served: Arc<Served>,
    /// Past it the request has been answered 503: its rows are not scored.
    pub deadline: Instant,
    /// The probabilities in row order, or why they could not be computed.
    pub reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds all the rows it may: the job would wait past any deadline.
    Full,
    /// The job alone has more rows than the queue holds.
    TooLarge,
    /// The server is shutting down.
    Closed,
}

struct State {
    /// Each job with the time it was queued.
    jobs: VecDeque<(Instant, Job)>,
    rows: usize,
    closed: bool,
}

/// The bounded queue of jobs between the HTTP handlers and the inference threads.
pub struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    capacity_rows: usize,
    max_batch_rows: usize,
    max_wait: Duration,
}

impl Queue {
    pub fn new(capacity_rows: usize, max_batch_rows: usize, max_wait: Duration) -> Queue {
        Queue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                rows: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            capacity_rows,
            max_batch_rows,
            max_wait,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Most rows that may wait (`--queue-rows`).
    pub fn capacity_rows(&self) -> usize {
        self.capacity_rows
    }

    /// Rows waiting.
    pub fn rows(&self) -> usize {
        self.lock().rows
    }

    pub fn push(&self, job: Job) -> Result<(), Refused> {
        let n = job.rows.len();
        if n > self.capacity_rows {
            return Err(Refused::TooLarge);
        }
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if state.rows + n > self.capacity_rows {
            return Err(Refused::Full);
        }
        state.rows += n;
        state.jobs.push_back((Instant::now(), job));
        drop(state);
        // Idle threads wait for any job, a gathering one for enough rows: wake both kinds.
        self.ready.notify_all();
        Ok(())
    }

    /// Stops taking jobs; the inference threads drain what is queued, then stop.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Waits for the next batch and moves its jobs into `jobs`: jobs of one model version, in
    /// order, until they hold `max_batch_rows` rows (at least one job), taken once that many
    /// rows wait or the oldest job has waited `max_wait`. False once closed and drained.
    pub fn next_batch(&self, jobs: &mut Vec<Job>) -> bool {
        let mut state = self.lock();
        loop {
            let Some((queued, _)) = state.jobs.front() else {
                if state.closed {
                    return false;
                }
                state = self
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let window_end = *queued + self.max_wait;
            let now = Instant::now();
            if state.rows >= self.max_batch_rows || now >= window_end || state.closed {
                break;
            }
            state = self
                .ready
                .wait_timeout(state, window_end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let mut rows = 0;
        while let Some((_, job)) = state.jobs.front() {
            let same_version = jobs
                .first()
                .is_none_or(|first| Arc::ptr_eq(&first.served, &job.served));
            if rows >= self.max_batch_rows || !same_version {
                break;
            }
            let (_, job) = state.jobs.pop_front().expect("a front job");
            rows += job.rows.len();
            state.rows -= job.rows.len();
            jobs.push(job);
        }
        true
    }
}

/// The loop of inference thread `index` (which scores with the version's model `index`): takes
/// batches from `queue` until it is closed and drained, and answers each job its slice.
pub fn run_inference(queue: &Queue, index: usize, metrics: &Metrics) {
    let max_rows = queue.max_batch_rows;
    let (mut jobs, mut rows) = (Vec::new(), Vec::new());
    let (mut batch, mut probs, mut scores) = (Batch::default(), Vec::new(), Vec::new());
    while queue.next_batch(&mut jobs) {
        // A job past its deadline has been answered already (its receiver is gone).
        let now = Instant::now();
        jobs.retain(|job| job.deadline > now && !job.reply.is_closed());
        let Some(first) = jobs.first() else {
            continue;
        };
        let served = Arc::clone(&first.served);
        rows.clear();
        for job in &jobs {
            rows.extend_from_slice(&job.rows);
        }
        scores.clear();
        let mut model = served.model(index);
        let scored = rows.chunks(max_rows).try_for_each(|chunk| {
            score_rows(
                model.as_mut(),
                &served.encoder,
                chunk,
                false,
                &mut batch,
                &mut probs,
            )?;
            metrics.batch(chunk.len());
            scores.extend_from_slice(&probs);
            Ok::<_, dlrm::model::BatchError>(())
        });
        drop(model);
        let mut at = 0;
        for job in jobs.drain(..) {
            let n = job.rows.len();
            let answer = match &scored {
                Ok(()) => Ok(scores[at..at + n].to_vec()),
                Err(e) => Err(format!("the forward pass failed: {e}")),
            };
            at += n;
            // A receiver gone meanwhile was answered 503 already.
            let _ = job.reply.send(answer);
        }
    }
}
