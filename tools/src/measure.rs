//! Timing a workload: warm-up steps first (page faults, buffer growth, caches), then repeats of
//! a fixed number of steps, each repeat timed as a whole. The reported rate is the median
//! repeat, which a noisy neighbour or a stray page-cache flush in one repeat does not move.

use crate::schedstat::{SchedTimes, pool_times};
use crate::workload::Workload;
use anyhow::Result;
use dlrm::model::PhaseSeconds;
use std::time::Instant;

/// How many steps a point runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Untimed steps before the first repeat.
    pub warmup_steps: usize,
    /// Timed repeats (the median is reported).
    pub repeats: usize,
    /// Steps per repeat.
    pub steps: usize,
}

/// The timings of one point.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    pub samples_per_step: usize,
    /// Samples per second of each repeat, in run order.
    pub rates: Vec<f64>,
    /// Mean seconds per step of each phase over all repeats (training only).
    pub phases_per_step: Option<PhaseSeconds>,
    /// Threads of the pool that ran the repeats.
    pub threads: usize,
    /// Wall-clock seconds from the scheduler snapshot before the repeats to the one after.
    pub seconds: f64,
    /// The pool's scheduler times over the repeats, summed over its threads (where the OS
    /// reports them).
    pub sched: Option<SchedTimes>,
}

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    }
}

impl Measurement {
    /// Median samples per second over the repeats.
    pub fn samples_per_sec(&self) -> f64 {
        median(&self.rates)
    }

    pub fn min_rate(&self) -> f64 {
        self.rates.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max_rate(&self) -> f64 {
        self.rates.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }

    /// Fraction of the pool's thread-time spent on a CPU (rayon's brief spinning included).
    pub fn cpu_busy(&self) -> Option<f64> {
        self.sched
            .map(|s| s.run_ns as f64 * 1e-9 / (self.seconds * self.threads as f64))
    }

    /// Fraction of the pool's thread-time spent ready to run but waiting for a CPU that
    /// another process held.
    pub fn cpu_wait(&self) -> Option<f64> {
        self.sched
            .map(|s| s.wait_ns as f64 * 1e-9 / (self.seconds * self.threads as f64))
    }

    /// Milliseconds per step at the median rate.
    pub fn step_ms(&self) -> f64 {
        1e3 * self.samples_per_step as f64 / self.samples_per_sec()
    }
}

/// `f(a, b)` for each phase.
pub(crate) fn combine_phases(
    a: &PhaseSeconds,
    b: &PhaseSeconds,
    f: impl Fn(f64, f64) -> f64,
) -> PhaseSeconds {
    PhaseSeconds {
        emb_fwd: f(a.emb_fwd, b.emb_fwd),
        bot_fwd: f(a.bot_fwd, b.bot_fwd),
        interaction_fwd: f(a.interaction_fwd, b.interaction_fwd),
        top_fwd: f(a.top_fwd, b.top_fwd),
        loss: f(a.loss, b.loss),
        top_bwd: f(a.top_bwd, b.top_bwd),
        interaction_bwd: f(a.interaction_bwd, b.interaction_bwd),
        bot_bwd: f(a.bot_bwd, b.bot_bwd),
        emb_update: f(a.emb_update, b.emb_update),
        dense_update: f(a.dense_update, b.dense_update),
        other: f(a.other, b.other),
    }
}

/// The shortest measurement window whose CPU busy and wait fractions are reported: many
/// scheduler ticks (1 to 10 ms) long.
const MIN_SCHED_WINDOW_SECS: f64 = 0.5;

/// Runs the schedule on `w` (on the current thread pool) and returns its timings.
pub fn measure(w: &mut dyn Workload, s: &Schedule) -> Result<Measurement> {
    anyhow::ensure!(
        s.repeats > 0 && s.steps > 0,
        "a point needs at least one repeat of at least one step"
    );
    for _ in 0..s.warmup_steps {
        w.step()?;
    }
    let before = w.phases();
    let samples = w.samples_per_step();
    let mut rates = Vec::with_capacity(s.repeats);
    let window = Instant::now();
    let sched_before = pool_times();
    for _ in 0..s.repeats {
        let t = Instant::now();
        for _ in 0..s.steps {
            w.step()?;
        }
        let secs = t.elapsed().as_secs_f64();
        rates.push((s.steps * samples) as f64 / secs.max(1e-12));
    }
    let sched_after = pool_times();
    let seconds = window.elapsed().as_secs_f64();
    // schedstat's run time of a running thread is brought up to date only at scheduler ticks
    // and switches, so each reading may lag by a tick: over a short window the fractions would
    // be noise (even above 1), and are left out.
    let sched = sched_before
        .zip(sched_after)
        .map(|(b, a)| a.since(&b))
        .filter(|_| seconds >= MIN_SCHED_WINDOW_SECS);
    let phases_per_step = before.zip(w.phases()).map(|(b, a)| {
        let steps = (s.repeats * s.steps) as f64;
        combine_phases(&a, &b, |after, before| (after - before) / steps)
    });
    Ok(Measurement {
        samples_per_step: samples,
        rates,
        phases_per_step,
        threads: rayon::current_num_threads(),
        seconds,
        sched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
    }

    /// Counts steps, and books 1 ms of `emb_fwd` per step.
    struct Counter {
        steps: usize,
        phases: PhaseSeconds,
    }

    impl Workload for Counter {
        fn samples_per_step(&self) -> usize {
            10
        }
        fn step(&mut self) -> Result<()> {
            self.steps += 1;
            self.phases.emb_fwd += 1e-3;
            std::thread::sleep(std::time::Duration::from_micros(200));
            Ok(())
        }
        fn phases(&self) -> Option<PhaseSeconds> {
            Some(self.phases)
        }
        fn flops_per_sample(&self) -> Option<f64> {
            None
        }
    }

    #[test]
    fn measures_repeats_after_the_warmup() {
        let mut w = Counter {
            steps: 0,
            phases: PhaseSeconds {
                emb_fwd: 5.0,
                ..PhaseSeconds::default()
            },
        };
        let s = Schedule {
            warmup_steps: 3,
            repeats: 4,
            steps: 5,
        };
        let m = measure(&mut w, &s).unwrap();
        assert_eq!(w.steps, 3 + 4 * 5);
        assert_eq!(m.rates.len(), 4);
        assert_eq!(m.samples_per_step, 10);
        // 5 steps of >= 200 us: at most 50 samples per ms.
        assert!(
            m.rates.iter().all(|&r| r > 0.0 && r <= 50e3),
            "{:?}",
            m.rates
        );
        assert!(m.min_rate() <= m.samples_per_sec() && m.samples_per_sec() <= m.max_rate());
        let p = m.phases_per_step.unwrap();
        assert!((p.emb_fwd - 1e-3).abs() < 1e-9, "{}", p.emb_fwd);
        assert_eq!(p.top_bwd, 0.0);
        assert_eq!(m.threads, rayon::current_num_threads());
        assert!(m.seconds >= 4.0 * 5.0 * 200e-6, "{}", m.seconds);
        // Fractions of the window (up to the jitter of reading each thread's counters).
        if let (Some(busy), Some(wait)) = (m.cpu_busy(), m.cpu_wait()) {
            let fraction = 0.0..1.1;
            assert!(
                fraction.contains(&busy) && fraction.contains(&wait),
                "{busy} {wait}"
            );
        }
        assert!(measure(&mut w, &Schedule { repeats: 0, ..s }).is_err());
    }
}
