//! Hybrid-parallel training's communication and sharding (Naumov et al. 2019, section
//! "Parallelism"): embedding tables are model-parallel (each rank owns whole tables and looks
//! them up for the whole global batch), the MLPs and the interaction data-parallel (each rank
//! runs its slice of the batch). Two collectives connect them: an all-to-all (the paper's
//! "butterfly shuffle") of pooled embeddings forward and of their gradients backward, and a
//! reduction of the dense gradients.
//!
//! Communication is I/O behind the [`Collectives`] trait, so the model code runs and is tested
//! without MPI: [`LocalGroup`] runs N ranks as threads of one process (N = 1 is the
//! single-process case), and with the `mpi` feature [`mpi::MpiCollectives`] runs them as MPI
//! processes (rsmpi over the system's MPI library). A leaf module: it imports nothing of the
//! crate.

#[cfg(feature = "mpi")]
pub mod mpi;
mod plan;

pub use plan::{Placement, PlanError, PlanOptions, REPLICATE_BELOW_ROWS, ShardPlan, TableCost};

use std::sync::{Arc, Barrier, Mutex, PoisonError};

/// The collectives hybrid-parallel training needs. Every rank calls each collective in the
/// same order with matching counts (counts are in elements).
pub trait Collectives {
    /// This rank, 0 ..= size - 1.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// MPI_Alltoallv: `send` holds a block of `send_counts[q]` values for each rank q in rank
    /// order; `recv` receives the block rank q sends to this rank (`recv_counts[q]` values),
    /// in rank order.
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) {
        self.all_to_all_v_during(send, send_counts, recv, recv_counts, &mut || {});
    }
    /// [`all_to_all_v`](Self::all_to_all_v), running `work` while the exchange is in flight
    /// (started before `work`, completed after it), so that a rank's compute hides the wait
    /// for the slower ranks and the transfer. `work` may call other collectives (every rank
    /// then calls them in the same order, as always).
    fn all_to_all_v_during(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
        work: &mut dyn FnMut(),
    );
    /// MPI_Allgatherv: every rank's `send` (rank q's holds `counts[q]` values) concatenated
    /// in rank order into `recv`.
    fn all_gather_v(&self, send: &[f32], recv: &mut [f32], counts: &[usize]) {
        self.all_gather_v_during(send, recv, counts, &mut || {});
    }
    /// [`all_gather_v`](Self::all_gather_v) with `work` running while it is in flight (as
    /// [`all_to_all_v_during`](Self::all_to_all_v_during)).
    fn all_gather_v_during(
        &self,
        send: &[f32],
        recv: &mut [f32],
        counts: &[usize],
        work: &mut dyn FnMut(),
    );
    /// MPI_Allreduce with MPI_SUM, in place: the order of the additions is the library's.
    fn all_reduce_sum(&self, values: &mut [f32]) {
        self.all_reduce_sum_during(values, &mut || {});
    }
    /// [`all_reduce_sum`](Self::all_reduce_sum) with `work` running while it is in flight (as
    /// [`all_to_all_v_during`](Self::all_to_all_v_during)): MPI_Iallreduce, as PyTorch's DDP
    /// overlaps the gradient reduction with the rest of the backward.
    fn all_reduce_sum_during(&self, values: &mut [f32], work: &mut dyn FnMut());
    /// Every rank's `value`, in rank order.
    fn all_gather_f64(&self, value: f64) -> Vec<f64>;
    /// Returns once every rank has called it.
    fn barrier(&self);
}

/// Offsets of consecutive blocks of `counts` values.
pub fn displacements(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |at, &c| {
            let start = *at;
            *at += c;
            Some(start)
        })
        .collect()
}

/// What each rank posts for a collective: its values, its per-destination counts and a scalar.
#[derive(Default)]
struct Post {
    values: Vec<f32>,
    counts: Vec<usize>,
    scalar: f64,
}

/// N ranks as threads of one process, sharing memory: each collective posts every rank's
/// input, waits for all, then each rank reads what it receives. Reductions add in rank order,
/// so results are deterministic. One rank is the single-process case.
pub struct LocalGroup {
    size: usize,
    posts: Mutex<Vec<Post>>,
    barrier: Barrier,
}

/// One rank of a [`LocalGroup`].
pub struct LocalRank {
    rank: usize,
    group: Arc<LocalGroup>,
}

impl LocalGroup {
    /// The `n` ranks of a new group (hand one to each thread).
    pub fn ranks(n: usize) -> Vec<LocalRank> {
        let group = Arc::new(LocalGroup {
            size: n,
            posts: Mutex::new((0..n).map(|_| Post::default()).collect()),
            barrier: Barrier::new(n),
        });
        (0..n)
            .map(|rank| LocalRank {
                rank,
                group: Arc::clone(&group),
            })
            .collect()
    }
}

impl LocalRank {
    /// The single-process "group" of one rank.
    pub fn single() -> LocalRank {
        LocalGroup::ranks(1).remove(0)
    }

    /// Posts this rank's input, then (once every rank has posted) returns `read` of all the
    /// posts; no rank posts again before every rank has read.
    fn exchange<R>(&self, post: Post, read: impl FnOnce(&[Post]) -> R) -> R {
        let lock = || {
            self.group
                .posts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        lock()[self.rank] = post;
        self.group.barrier.wait();
        let out = read(&lock());
        self.group.barrier.wait();
        out
    }
}

impl Collectives for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    /// The threads exchange in shared memory at once; `work` runs after the exchange.
    fn all_to_all_v_during(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
        work: &mut dyn FnMut(),
    ) {
        let post = Post {
            values: send.to_vec(),
            counts: send_counts.to_vec(),
            scalar: 0.0,
        };
        self.exchange(post, |posts| {
            let mut at = 0;
            for (post, &n) in posts.iter().zip(recv_counts) {
                let start = displacements(&post.counts)[self.rank];
                assert_eq!(post.counts[self.rank], n, "all-to-all counts disagree");
                recv[at..at + n].copy_from_slice(&post.values[start..start + n]);
                at += n;
            }
        });
        work();
    }

    fn all_gather_v_during(
        &self,
        send: &[f32],
        recv: &mut [f32],
        counts: &[usize],
        work: &mut dyn FnMut(),
    ) {
        let post = Post {
            values: send.to_vec(),
            ..Post::default()
        };
        self.exchange(post, |posts| {
            let mut at = 0;
            for (post, &n) in posts.iter().zip(counts) {
                recv[at..at + n].copy_from_slice(&post.values[..n]);
                at += n;
            }
        });
        work();
    }

    fn all_reduce_sum_during(&self, values: &mut [f32], work: &mut dyn FnMut()) {
        let post = Post {
            values: values.to_vec(),
            ..Post::default()
        };
        self.exchange(post, |posts| {
            values.copy_from_slice(&posts[0].values);
            for post in &posts[1..] {
                values
                    .iter_mut()
                    .zip(&post.values)
                    .for_each(|(v, p)| *v += p);
            }
        });
        work();
    }

    fn all_gather_f64(&self, value: f64) -> Vec<f64> {
        let post = Post {
            scalar: value,
            ..Post::default()
        };
        self.exchange(post, |posts| posts.iter().map(|p| p.scalar).collect())
    }

    fn barrier(&self) {
        self.group.barrier.wait();
    }
}
