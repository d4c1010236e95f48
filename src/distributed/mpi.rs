//! [`Collectives`] over MPI (rsmpi's safe API over the system's MPI library, e.g. OpenMPI).

use super::{Collectives, displacements};
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// The world communicator of an MPI job. MPI is finalised when this is dropped.
pub struct MpiCollectives {
    world: SimpleCommunicator,
    // Declared last: dropped (MPI_Finalize) after the communicator.
    _universe: Universe,
}

impl MpiCollectives {
    /// Initialises MPI (once per process; `None` if it already was).
    pub fn init() -> Option<MpiCollectives> {
        let universe = mpi::initialize()?;
        Some(MpiCollectives {
            world: universe.world(),
            _universe: universe,
        })
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

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) {
        let (sc, sd) = mpi_counts(send_counts);
        let (rc, rd) = mpi_counts(recv_counts);
        let send = Partition::new(send, sc, sd);
        let mut recv = PartitionMut::new(recv, rc, rd);
        self.world.all_to_all_varcount_into(&send, &mut recv);
    }

    fn all_gather_v(&self, send: &[f32], recv: &mut [f32], counts: &[usize]) {
        let (c, d) = mpi_counts(counts);
        let mut recv = PartitionMut::new(recv, c, d);
        self.world.all_gather_varcount_into(send, &mut recv);
    }

    fn all_reduce_sum(&self, values: &mut [f32]) {
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
    }

    fn all_gather_f64(&self, value: f64) -> Vec<f64> {
        let mut out = vec![0.0; self.size()];
        self.world.all_gather_into(&value, &mut out[..]);
        out
    }

    fn barrier(&self) {
        self.world.barrier();
    }
}
