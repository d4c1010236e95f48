//! Which thread counts a study measures, and where along the sweep a new socket or the SMT
//! siblings come in.

use crate::topology::{Cpu, Topology};
use std::collections::BTreeSet;

/// The thread counts of `--threads 1,2,3` (each at least 1, as the flag's parser checks),
/// ascending and distinct.
pub fn sweep_of(counts: &[usize]) -> Vec<usize> {
    let distinct: BTreeSet<usize> = counts.iter().copied().collect();
    distinct.into_iter().collect()
}

/// The default sweep: 1, 2, 4, ... below the core count, the core count of the first socket,
/// the first two sockets, ... (where a compact placement crosses a socket), all physical cores,
/// and all logical CPUs.
pub fn default_sweep(topo: &Topology) -> Vec<usize> {
    let cores = topo.cores();
    let mut out: BTreeSet<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|&n| n < cores)
        .collect();
    out.extend(topo.cores_per_socket().iter().scan(0, |sum, &c| {
        *sum += c;
        Some(*sum)
    }));
    out.insert(cores.max(1));
    out.insert(topo.logical_cpus().max(1));
    out.into_iter().collect()
}

/// A point of the sweep where threads start to use something new.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boundary {
    /// The smallest thread count that uses it.
    pub threads: usize,
    /// What comes in: "socket 1", "SMT".
    pub what: String,
}

/// Where, in a placement order, each further socket and the first SMT sibling come in.
pub fn boundaries(order: &[Cpu]) -> Vec<Boundary> {
    let mut seen = BTreeSet::new();
    let mut smt = false;
    let mut out = Vec::new();
    for (i, c) in order.iter().enumerate() {
        if seen.insert(c.socket) && i > 0 {
            out.push(Boundary {
                threads: i + 1,
                what: format!("socket {}", c.socket),
            });
        }
        if c.thread > 0 && !smt {
            smt = true;
            out.push(Boundary {
                threads: i + 1,
                what: "SMT".into(),
            });
        }
    }
    out
}

/// The CPUs that `threads` pinned threads use: the first ones of the order, wrapping around
/// when there are more threads than CPUs.
pub fn cpus_for(order: &[Cpu], threads: usize) -> Vec<Cpu> {
    order.iter().cycle().take(threads).copied().collect()
}

/// Distinct sockets among `cpus`.
pub fn sockets_used(cpus: &[Cpu]) -> usize {
    cpus.iter().map(|c| c.socket).collect::<BTreeSet<_>>().len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Placement, RawCpu, RawNode};

    fn machine(sockets: usize, cores: usize, smt: usize) -> Topology {
        let per_thread = sockets * cores;
        let cpus: Vec<RawCpu> = (0..per_thread * smt)
            .map(|id| {
                let first = id % per_thread;
                let siblings: Vec<String> = (0..smt)
                    .map(|t| (first + t * per_thread).to_string())
                    .collect();
                RawCpu {
                    id,
                    physical_package_id: (first / cores).to_string(),
                    core_id: (first % cores).to_string(),
                    thread_siblings_list: siblings.join(","),
                }
            })
            .collect();
        let nodes: Vec<RawNode> = (0..sockets)
            .map(|s| RawNode {
                id: s,
                cpulist: (0..smt)
                    .map(|t| {
                        let lo = t * per_thread + s * cores;
                        format!("{lo}-{}", lo + cores - 1)
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            })
            .collect();
        Topology::parse(&cpus, &nodes).unwrap()
    }

    #[test]
    fn thread_lists_sort_and_drop_repeats() {
        assert_eq!(sweep_of(&[1, 2, 3]), [1, 2, 3]);
        assert_eq!(sweep_of(&[4, 1, 2, 2]), [1, 2, 4]);
    }

    #[test]
    fn default_sweep_hits_powers_of_two_sockets_and_smt() {
        assert_eq!(
            default_sweep(&machine(2, 28, 2)),
            [1, 2, 4, 8, 16, 28, 32, 56, 112]
        );
        assert_eq!(default_sweep(&machine(1, 2, 1)), [1, 2]);
        assert_eq!(default_sweep(&machine(1, 1, 1)), [1]);
        assert_eq!(default_sweep(&machine(1, 6, 2)), [1, 2, 4, 6, 12]);
    }

    #[test]
    fn boundaries_follow_the_placement() {
        let t = machine(2, 4, 2);
        let b = |p| boundaries(&t.order(p));
        let at = |threads: usize, what: &str| Boundary {
            threads,
            what: what.into(),
        };
        assert_eq!(b(Placement::Compact), [at(5, "socket 1"), at(9, "SMT")]);
        assert_eq!(b(Placement::Scatter), [at(2, "socket 1"), at(9, "SMT")]);
        assert!(boundaries(&machine(1, 2, 1).order(Placement::Compact)).is_empty());
    }

    #[test]
    fn cpus_wrap_past_the_machine_and_count_sockets() {
        let t = machine(2, 2, 1);
        let order = t.order(Placement::Compact);
        let ids: Vec<usize> = cpus_for(&order, 6).iter().map(|c| c.id).collect();
        assert_eq!(ids, [0, 1, 2, 3, 0, 1]);
        assert_eq!(sockets_used(&cpus_for(&order, 2)), 1);
        assert_eq!(sockets_used(&cpus_for(&order, 3)), 2);
        let scatter = t.order(Placement::Scatter);
        assert_eq!(sockets_used(&cpus_for(&scatter, 2)), 2);
    }
}
