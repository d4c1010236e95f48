//! Where a point's threads spent their time, from the scheduler's per-thread accounting
//! (`/proc/thread-self/schedstat`: nanoseconds run on a CPU, nanoseconds waited on a run queue,
//! timeslices). On a machine shared with other processes, a thread that is ready to run but
//! waits for a CPU makes every fork-join of its pool wait too; reporting that wait tells a point
//! slowed by neighbours from a point slowed by the code (serial phases and load imbalance show as
//! threads neither running nor waiting).

/// Nanoseconds on a CPU and waiting for one, of one thread or summed over a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedTimes {
    pub run_ns: u64,
    pub wait_ns: u64,
}

impl SchedTimes {
    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &SchedTimes) -> SchedTimes {
        SchedTimes {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
        }
    }
}

/// Parses the contents of a schedstat file ("run_ns wait_ns timeslices").
pub fn parse_schedstat(text: &str) -> Option<SchedTimes> {
    let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some(SchedTimes {
        run_ns: f.next()??,
        wait_ns: f.next()??,
    })
}

/// The calling thread's times; `None` where the kernel does not provide them.
pub fn thread_times() -> Option<SchedTimes> {
    parse_schedstat(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

/// The times of every thread of the current rayon pool, summed.
pub fn pool_times() -> Option<SchedTimes> {
    rayon::broadcast(|_| thread_times())
        .into_iter()
        .try_fold(SchedTimes::default(), |sum, t| {
            let t = t?;
            Some(SchedTimes {
                run_ns: sum.run_ns + t.run_ns,
                wait_ns: sum.wait_ns + t.wait_ns,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schedstat() {
        assert_eq!(
            parse_schedstat("93092 514644 2\n"),
            Some(SchedTimes {
                run_ns: 93092,
                wait_ns: 514644
            })
        );
        assert_eq!(parse_schedstat("1"), None);
        assert_eq!(parse_schedstat("x 2 3"), None);
        let a = SchedTimes {
            run_ns: 10,
            wait_ns: 5,
        };
        let b = SchedTimes {
            run_ns: 25,
            wait_ns: 5,
        };
        assert_eq!(
            b.since(&a),
            SchedTimes {
                run_ns: 15,
                wait_ns: 0
            }
        );
    }

    #[test]
    fn a_busy_pool_runs() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        if thread_times().is_none() {
            return; // no schedstat on this kernel
        }
        // Each thread spins 100 ms between two readings of its own times: all that time it was
        // on a CPU or waiting for one. A reading of a running thread lags by up to a scheduler
        // tick (10 ms at HZ=100), so each thread may miss two ticks of it.
        let spins = pool.install(|| {
            rayon::broadcast(|_| {
                let before = thread_times().unwrap();
                let t = std::time::Instant::now();
                while t.elapsed().as_millis() < 100 {}
                (thread_times().unwrap().since(&before), t.elapsed())
            })
        });
        for (d, spun) in spins {
            assert!(
                d.run_ns + d.wait_ns + 20_000_000 >= spun.as_nanos() as u64,
                "{d:?} over {spun:?}"
            );
            assert!(d.run_ns > 0, "{d:?}");
        }
    }
}
