//! [`Collectives`] over MPI (rsmpi's safe API over the system's MPI library, e.g. OpenMPI).
//!
//! Faults: MPI has no portable way to leave a collective a peer will never join, so every
//! collective is started non-blocking (MPI_Ialltoallv, MPI_Iallgatherv, MPI_Iallreduce) and
//! polled against a deadline. A rank whose collective has not completed within the timeout
//! asks every other rank for a sign of life over a duplicate of the world communicator (a
//! ping each; every rank waiting in a collective answers pings while it polls), names the
//! ranks that did not answer within a grace period as lost, and ends the job with MPI_Abort:
//! the pending request cannot be freed while a peer may still write into its buffers, so the
//! process cannot return an error and carry on.
//!
//! The `*_during` collectives run the caller's work between the start and the polling, so a
//! rank computes while it would otherwise wait for a slower rank. OpenMPI (without an async
//! progress thread) moves a started collective on inside MPI calls only: at its start, in any
//! collective the work itself calls, and in the final polling.

use super::{Collectives, displacements};
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::point_to_point::Status;
use mpi::request::{Request, Scope, StaticScope, scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::time::{Duration, Instant};

/// Tags of the liveness messages on the control communicator.
const PING: mpi::Tag = 1;
const PONG: mpi::Tag = 2;
/// What a ping carries (a static buffer: the pings to lost ranks never complete).
static PING_BYTE: u8 = 0;
/// A collective waits this long before it also answers pings and checks its deadline, so the
/// fast path is the plain MPI_Test loop.
const QUIET_WAIT: Duration = Duration::from_millis(20);

/// The world communicator of an MPI job. MPI is finalised when this is dropped.
pub struct MpiCollectives {
    world: SimpleCommunicator,
    /// A duplicate of `world` for the liveness pings (never mixed with the collectives).
    control: SimpleCommunicator,
    timeout: Duration,
    // Declared last: dropped (MPI_Finalize) after the communicators.
    _universe: Universe,
}

impl MpiCollectives {
    /// Initialises MPI (once per process; `None` if it already was). A collective that has
    /// not completed after `timeout` ends the job naming the ranks that stopped answering.
    pub fn init(timeout: Duration) -> Option<MpiCollectives> {
        let universe = mpi::initialize()?;
        let world = universe.world();
        Some(MpiCollectives {
            control: world.duplicate(),
            world,
            timeout,
            _universe: universe,
        })
    }

    /// Polls `request` (the collective `what`) to completion, answering other ranks' pings
    /// once it has waited a while; past the timeout, ends the job naming the lost ranks.
    fn complete<'a, D: ?Sized, S: Scope<'a>>(&self, what: &str, mut request: Request<'a, D, S>) {
        let start = Instant::now();
        loop {
            request = match request.test() {
                Ok(_) => return,
                Err(pending) => pending,
            };
            let waited = start.elapsed();
            if waited < QUIET_WAIT {
                continue;
            }
            self.answer_pings();
            if waited >= self.timeout {
                self.abort_naming_lost(what);
            }
            std::thread::yield_now();
        }
    }

    /// Answers every ping that has arrived.
    fn answer_pings(&self) {
        while let Some(status) = self.control.any_process().immediate_probe_with_tag(PING) {
            let from = self.control.process_at_rank(status.source_rank());
            let (_, _): (u8, Status) = from.receive_with_tag(PING);
            from.send_with_tag(&PING_BYTE, PONG);
        }
    }

    /// Pings every other rank, waits a grace period for the answers (answering pings
    /// meanwhile), prints which ranks did not answer and aborts the job with exit code 1.
    fn abort_naming_lost(&self, what: &str) -> ! {
        let (me, size) = (self.world.rank(), self.world.size());
        let pings: Vec<Request<u8>> = (0..size)
            .filter(|&q| q != me)
            .map(|q| {
                (self.control.process_at_rank(q)).immediate_send_with_tag(
                    StaticScope,
                    &PING_BYTE,
                    PING,
                )
            })
            .collect();
        let mut alive = vec![false; size as usize];
        alive[me as usize] = true;
        let grace = (self.timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(2));
        let start = Instant::now();
        while start.elapsed() < grace && alive.contains(&false) {
            self.answer_pings();
            if let Some(status) = self.control.any_process().immediate_probe_with_tag(PONG) {
                let from = self.control.process_at_rank(status.source_rank());
                let (_, _): (u8, Status) = from.receive_with_tag(PONG);
                alive[status.source_rank() as usize] = true;
            }
            std::thread::yield_now();
        }
        let lost: Vec<String> = (alive.iter().enumerate())
            .filter(|&(_, &a)| !a)
            .map(|(q, _)| q.to_string())
            .collect();
        let who = if lost.is_empty() {
            "every rank still answers (one is stuck outside the collectives)".to_string()
        } else {
            format!("lost rank {} (no answer within {grace:?})", lost.join(", "))
        };
        eprintln!(
            "error: rank {me}: the {what} did not complete within --collective-timeout {} s: \
             {who}; aborting the job",
            self.timeout.as_secs_f64()
        );
        // The pings to lost ranks never complete: MPI_Abort ends the process with them.
        std::mem::forget(pings);
        self.world.abort(1)
    }
}

/// MPI's counts and displacements (C ints). Panics past 2^31 values a block, MPI's own limit
/// for these calls.
fn mpi_counts(counts: &[usize]) -> (Vec<mpi::Count>, Vec<mpi::Count>) {
    let int = |n: usize| mpi::Count::try_from(n).expect("a block of under 2^31 values");
    (
        counts.iter().map(|&c| int(c)).collect(),
        displacements(counts).into_iter().map(int).collect(),
    )
}

impl Collectives for MpiCollectives {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_to_all_v_during(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
        work: &mut dyn FnMut(),
    ) {
        let (sc, sd) = mpi_counts(send_counts);
        let (rc, rd) = mpi_counts(recv_counts);
        let send = Partition::new(send, sc, sd);
        let mut recv = PartitionMut::new(recv, rc, rd);
        scope(|s| {
            let r = self
                .world
                .immediate_all_to_all_varcount_into(s, &send, &mut recv);
            work();
            self.complete("all-to-all", r);
        });
    }

    fn all_gather_v_during(
        &self,
        send: &[f32],
        recv: &mut [f32],
        counts: &[usize],
        work: &mut dyn FnMut(),
    ) {
        let (c, d) = mpi_counts(counts);
        let mut recv = PartitionMut::new(recv, c, d);
        scope(|s| {
            let r = self
                .world
                .immediate_all_gather_varcount_into(s, send, &mut recv);
            work();
            self.complete("all-gather", r);
        });
    }

    fn all_reduce_sum_during(&self, values: &mut [f32], work: &mut dyn FnMut()) {
        let send = values.to_vec();
        scope(|s| {
            let r =
                self.world
                    .immediate_all_reduce_into(s, &send[..], values, SystemOperation::sum());
            work();
            self.complete("all-reduce", r);
        });
    }

    fn all_gather_f64(&self, value: f64) -> Vec<f64> {
        let mut out = vec![0.0; self.size()];
        scope(|s| {
            let r = self
                .world
                .immediate_all_gather_into(s, &value, &mut out[..]);
            self.complete("all-gather", r);
        });
        out
    }

    fn barrier(&self) {
        self.complete("barrier", self.world.immediate_barrier());
    }
}
