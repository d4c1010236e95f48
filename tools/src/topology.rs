//! The machine's CPU topology (sockets, physical cores, SMT siblings, NUMA nodes) and the order
//! in which a scaling study hands CPUs to threads.
//!
//! Linux describes each logical CPU in `/sys/devices/system/cpu/cpuN/topology/`
//! (`physical_package_id`: its socket, `core_id`: its core within the socket,
//! `thread_siblings_list`: the logical CPUs sharing that core) and each NUMA node's CPUs in
//! `/sys/devices/system/node/nodeN/cpulist`. [`Topology::parse`] turns those strings into a
//! topology (a pure function, tested on strings); [`Topology::read_sysfs`] reads them;
//! [`Topology::detect`] falls back to `num_cpus` counts, saying so, where `/sys` is absent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// One logical CPU and its place in the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// The OS's CPU number (what affinity masks use).
    pub id: usize,
    /// Socket, 0-based in the order of the package ids.
    pub socket: usize,
    /// Physical core within its socket, 0-based (cores ordered by NUMA node, then by their
    /// first CPU number).
    pub core: usize,
    /// Hardware thread within its core: 0 for the first sibling, 1 for the second (SMT), ...
    pub thread: usize,
    /// NUMA node, where the OS reports nodes.
    pub node: Option<usize>,
}

/// Where the topology came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Read from sysfs.
    Sysfs,
    /// Counts from `num_cpus`, with the reason sysfs could not be used.
    Fallback(String),
}

/// The logical CPUs of the machine, by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Sorted by id.
    pub cpus: Vec<Cpu>,
    pub source: Source,
}

/// How threads are spread over sockets. Either way every physical core gets one thread before
/// any core gets a second (SMT sibling), so the first points of a sweep measure cores, not
/// hyper-threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// Fill one socket's cores before using the next socket.
    Compact,
    /// Alternate sockets: thread i goes to socket i mod sockets.
    Scatter,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::Compact => "compact",
            Placement::Scatter => "scatter",
        })
    }
}

/// The sysfs strings of one logical CPU (file contents, trailing newline allowed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawCpu {
    pub id: usize,
    pub physical_package_id: String,
    pub core_id: String,
    pub thread_siblings_list: String,
}

/// The sysfs `cpulist` of one NUMA node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawNode {
    pub id: usize,
    pub cpulist: String,
}

/// Why a topology could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: '{value}' is not {expected}")]
    Parse {
        what: String,
        value: String,
        expected: &'static str,
    },
    #[error("CPU {cpu} is not in its own thread_siblings_list '{list}'")]
    NotOwnSibling { cpu: usize, list: String },
    #[error("no logical CPU found")]
    Empty,
}

/// Parses a kernel CPU list ("0-3,8-11", "5", "" for none) into sorted, distinct numbers.
pub fn parse_cpulist(what: &str, list: &str) -> Result<Vec<usize>, TopologyError> {
    let bad = || TopologyError::Parse {
        what: what.to_string(),
        value: list.trim().to_string(),
        expected: "a CPU list like 0-3,8-11",
    };
    let mut out = BTreeSet::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi): (usize, usize) = match part.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let n = part.parse().map_err(|_| bad())?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(bad());
        }
        out.extend(lo..=hi);
    }
    Ok(out.into_iter().collect())
}

/// Formats CPU numbers as a kernel CPU list: "0-3,8-11".
pub fn format_cpulist(ids: impl IntoIterator<Item = usize>) -> String {
    let ids: BTreeSet<usize> = ids.into_iter().collect();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for id in ids {
        match ranges.last_mut() {
            Some((_, hi)) if *hi + 1 == id => *hi = id,
            _ => ranges.push((id, id)),
        }
    }
    ranges
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_id(what: String, value: &str) -> Result<i64, TopologyError> {
    value.trim().parse().map_err(|_| TopologyError::Parse {
        what,
        value: value.trim().to_string(),
        expected: "an integer",
    })
}

/// One CPU's sysfs strings, parsed: its package and core ids, and its thread rank (its
/// position in its sibling list).
struct ParsedCpu {
    id: usize,
    package: i64,
    core: i64,
    thread: usize,
}

impl ParsedCpu {
    fn parse(c: &RawCpu) -> Result<ParsedCpu, TopologyError> {
        let package = parse_id(
            format!("cpu{} physical_package_id", c.id),
            &c.physical_package_id,
        )?;
        let core = parse_id(format!("cpu{} core_id", c.id), &c.core_id)?;
        let siblings = parse_cpulist(
            &format!("cpu{} thread_siblings_list", c.id),
            &c.thread_siblings_list,
        )?;
        let thread = siblings.iter().position(|&s| s == c.id).ok_or_else(|| {
            TopologyError::NotOwnSibling {
                cpu: c.id,
                list: c.thread_siblings_list.trim().to_string(),
            }
        })?;
        Ok(ParsedCpu {
            id: c.id,
            package,
            core,
            thread,
        })
    }
}

/// The NUMA node of each CPU listed by a node.
fn node_of_cpus(nodes: &[RawNode]) -> Result<BTreeMap<usize, usize>, TopologyError> {
    let mut node_of = BTreeMap::new();
    for n in nodes {
        for cpu in parse_cpulist(&format!("node{} cpulist", n.id), &n.cpulist)? {
            node_of.insert(cpu, n.id);
        }
    }
    Ok(node_of)
}

/// The rank of each (package id, core id) within its package, cores ordered by (node, first
/// CPU).
fn core_ranks(
    parsed: &[ParsedCpu],
    node_of: &BTreeMap<usize, usize>,
    packages: &BTreeSet<i64>,
) -> BTreeMap<(i64, i64), usize> {
    let mut cores: BTreeMap<(i64, i64), (Option<usize>, usize)> = BTreeMap::new();
    for p in parsed {
        let key = (node_of.get(&p.id).copied(), p.id);
        cores
            .entry((p.package, p.core))
            .and_modify(|k| *k = (*k).min(key))
            .or_insert(key);
    }
    let mut core_rank = BTreeMap::new();
    for &package in packages {
        let mut in_socket: Vec<_> = cores
            .iter()
            .filter(|((pk, _), _)| *pk == package)
            .map(|(&k, &order)| (order, k))
            .collect();
        in_socket.sort();
        for (rank, (_, k)) in in_socket.into_iter().enumerate() {
            core_rank.insert(k, rank);
        }
    }
    core_rank
}

impl Topology {
    /// Builds the topology from the sysfs strings of every online CPU and every NUMA node.
    pub fn parse(cpus: &[RawCpu], nodes: &[RawNode]) -> Result<Topology, TopologyError> {
        if cpus.is_empty() {
            return Err(TopologyError::Empty);
        }
        let node_of = node_of_cpus(nodes)?;
        let parsed = cpus
            .iter()
            .map(ParsedCpu::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let packages: BTreeSet<i64> = parsed.iter().map(|p| p.package).collect();
        let socket_of = |package: i64| packages.iter().position(|&p| p == package).expect("seen");
        let core_rank = core_ranks(&parsed, &node_of, &packages);
        let mut cpus: Vec<Cpu> = parsed
            .iter()
            .map(|p| Cpu {
                id: p.id,
                socket: socket_of(p.package),
                core: core_rank[&(p.package, p.core)],
                thread: p.thread,
                node: node_of.get(&p.id).copied(),
            })
            .collect();
        cpus.sort_by_key(|c| c.id);
        Ok(Topology {
            cpus,
            source: Source::Sysfs,
        })
    }

    /// Reads the topology of the online CPUs under `root` (normally `/sys`).
    pub fn read_sysfs(root: &Path) -> Result<Topology, TopologyError> {
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path).map_err(|source| TopologyError::Io { path, source })
        };
        let cpu_dir = root.join("devices/system/cpu");
        let online = match std::fs::read_to_string(cpu_dir.join("online")) {
            Ok(list) => Some(parse_cpulist("cpu/online", &list)?),
            Err(_) => None,
        };
        let mut raw = Vec::new();
        for id in numbered_entries(&cpu_dir, "cpu")? {
            if online.as_ref().is_some_and(|o| !o.contains(&id)) {
                continue;
            }
            let t = cpu_dir.join(format!("cpu{id}/topology"));
            raw.push(RawCpu {
                id,
                physical_package_id: read(t.join("physical_package_id"))?,
                core_id: read(t.join("core_id"))?,
                thread_siblings_list: read(t.join("thread_siblings_list"))?,
            });
        }
        let node_dir = root.join("devices/system/node");
        let mut nodes = Vec::new();
        if node_dir.is_dir() {
            for id in numbered_entries(&node_dir, "node")? {
                nodes.push(RawNode {
                    id,
                    cpulist: read(node_dir.join(format!("node{id}/cpulist")))?,
                });
            }
        }
        Topology::parse(&raw, &nodes)
    }

    /// `logical` CPUs on `physical` cores of one socket, numbered as Linux numbers them on
    /// x86 (CPU i and i + physical are SMT siblings), with no NUMA information.
    pub fn fallback(logical: usize, physical: usize, reason: String) -> Topology {
        let logical = logical.max(1);
        let physical = physical.clamp(1, logical);
        let cpus = (0..logical)
            .map(|id| Cpu {
                id,
                socket: 0,
                core: id % physical,
                thread: id / physical,
                node: None,
            })
            .collect();
        Topology {
            cpus,
            source: Source::Fallback(reason),
        }
    }

    /// The topology from `/sys`, else the `num_cpus` fallback (its reason says why).
    pub fn detect() -> Topology {
        Topology::read_sysfs(Path::new("/sys")).unwrap_or_else(|e| {
            Topology::fallback(num_cpus::get(), num_cpus::get_physical(), e.to_string())
        })
    }

    pub fn logical_cpus(&self) -> usize {
        self.cpus.len()
    }

    /// Physical cores (CPUs that are the first thread of their core).
    pub fn cores(&self) -> usize {
        self.cpus.iter().filter(|c| c.thread == 0).count()
    }

    pub fn sockets(&self) -> usize {
        self.cpus.iter().map(|c| c.socket + 1).max().unwrap_or(0)
    }

    /// Hardware threads per core (1 without SMT).
    pub fn smt_ways(&self) -> usize {
        self.cpus.iter().map(|c| c.thread + 1).max().unwrap_or(1)
    }

    /// The NUMA nodes that hold CPUs, ascending (empty where the OS reports none).
    pub fn nodes(&self) -> Vec<usize> {
        let nodes: BTreeSet<usize> = self.cpus.iter().filter_map(|c| c.node).collect();
        nodes.into_iter().collect()
    }

    /// Physical cores of each socket.
    pub fn cores_per_socket(&self) -> Vec<usize> {
        let mut n = vec![0; self.sockets()];
        for c in self.cpus.iter().filter(|c| c.thread == 0) {
            n[c.socket] += 1;
        }
        n
    }

    /// Every logical CPU in the order threads take them: one thread per physical core before
    /// any SMT sibling, sockets filled one by one (compact) or taken in turn (scatter).
    pub fn order(&self, placement: Placement) -> Vec<Cpu> {
        let mut order = self.cpus.clone();
        match placement {
            Placement::Compact => order.sort_by_key(|c| (c.thread, c.socket, c.core, c.id)),
            Placement::Scatter => order.sort_by_key(|c| (c.thread, c.core, c.socket, c.id)),
        }
        order
    }
}

/// The numbers N of the entries `<prefix>N` of `dir`, ascending.
fn numbered_entries(dir: &Path, prefix: &str) -> Result<Vec<usize>, TopologyError> {
    let entries = std::fs::read_dir(dir).map_err(|source| TopologyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut ids: Vec<usize> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok())
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

impl fmt::Display for Topology {
    /// A summary line, then one line per socket.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let smt = match self.smt_ways() {
            1 => "no SMT".to_string(),
            w => format!("{w}-way SMT"),
        };
        let nodes = self.nodes();
        let numa = if nodes.is_empty() {
            "NUMA unknown".to_string()
        } else {
            plural(nodes.len(), "NUMA node")
        };
        match &self.source {
            Source::Sysfs => write!(f, "CPU topology (from /sys): ")?,
            Source::Fallback(why) => write!(
                f,
                "CPU topology: /sys unusable ({why}); counts from num_cpus, CPUs i and i + cores taken as SMT siblings: "
            )?,
        }
        writeln!(
            f,
            "{}, {}, {} ({smt}), {numa}",
            plural(self.sockets(), "socket"),
            plural(self.cores(), "core"),
            plural(self.logical_cpus(), "logical CPU"),
        )?;
        for (s, cores) in self.cores_per_socket().into_iter().enumerate() {
            let in_socket = || self.cpus.iter().filter(move |c| c.socket == s);
            let nodes: BTreeSet<usize> = in_socket().filter_map(|c| c.node).collect();
            write!(
                f,
                "  socket {s}: {}, CPUs {}",
                plural(cores, "core"),
                format_cpulist(in_socket().map(|c| c.id))
            )?;
            if !nodes.is_empty() {
                let names: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
                write!(f, ", NUMA node {}", names.join(","))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-socket machine, 4 cores per socket, 2-way SMT, numbered as Linux numbers Intel
    /// servers: CPUs 0-3 socket 0, 4-7 socket 1, 8-11 their siblings on socket 0, 12-15 on 1.
    pub(crate) fn two_socket_smt() -> Topology {
        let cpus: Vec<RawCpu> = (0..16)
            .map(|id| {
                let first = id % 8;
                RawCpu {
                    id,
                    physical_package_id: format!("{}\n", first / 4),
                    // Core ids are per socket and need not be dense.
                    core_id: format!("{}\n", (first % 4) * 2),
                    thread_siblings_list: format!("{},{}\n", first, first + 8),
                }
            })
            .collect();
        let nodes = [
            RawNode {
                id: 0,
                cpulist: "0-3,8-11\n".into(),
            },
            RawNode {
                id: 1,
                cpulist: "4-7,12-15\n".into(),
            },
        ];
        Topology::parse(&cpus, &nodes).unwrap()
    }

    #[test]
    fn cpulists_parse_and_format() {
        assert_eq!(
            parse_cpulist("x", "0-3,8-11\n").unwrap(),
            [0, 1, 2, 3, 8, 9, 10, 11]
        );
        assert_eq!(parse_cpulist("x", "5").unwrap(), [5]);
        assert_eq!(parse_cpulist("x", "\n").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpulist("x", "3,1-2,2").unwrap(), [1, 2, 3]);
        for bad in ["a", "3-1", "1-", "1,,x"] {
            let e = parse_cpulist("node0 cpulist", bad).unwrap_err().to_string();
            assert!(e.contains("node0 cpulist"), "{e}");
        }
        assert_eq!(format_cpulist([8, 0, 1, 2, 3, 9, 11]), "0-3,8-9,11");
        assert_eq!(format_cpulist([]), "");
    }

    #[test]
    fn parses_a_two_socket_smt_machine() {
        let t = two_socket_smt();
        assert_eq!(t.source, Source::Sysfs);
        assert_eq!(
            (t.logical_cpus(), t.cores(), t.sockets(), t.smt_ways()),
            (16, 8, 2, 2)
        );
        assert_eq!(t.nodes(), [0, 1]);
        assert_eq!(t.cores_per_socket(), [4, 4]);
        let c13 = t.cpus[13];
        assert_eq!(
            c13,
            Cpu {
                id: 13,
                socket: 1,
                core: 1,
                thread: 1,
                node: Some(1)
            }
        );
        let text = t.to_string();
        assert!(text.contains("2 sockets, 8 cores, 16 logical CPUs (2-way SMT), 2 NUMA nodes"));
        assert!(text.contains("socket 1: 4 cores, CPUs 4-7,12-15, NUMA node 1"));
    }

    #[test]
    fn parses_a_single_socket_machine_without_numa() {
        let cpus: Vec<RawCpu> = (0..2)
            .map(|id| RawCpu {
                id,
                physical_package_id: "0".into(),
                core_id: id.to_string(),
                thread_siblings_list: id.to_string(),
            })
            .collect();
        let t = Topology::parse(&cpus, &[]).unwrap();
        assert_eq!((t.cores(), t.sockets(), t.smt_ways()), (2, 1, 1));
        assert!(t.nodes().is_empty());
        assert!(t.to_string().contains("no SMT"), "{t}");
    }

    #[test]
    fn bad_sysfs_strings_are_errors() {
        let cpu = |pkg: &str, sib: &str| RawCpu {
            id: 1,
            physical_package_id: pkg.into(),
            core_id: "0".into(),
            thread_siblings_list: sib.into(),
        };
        assert!(matches!(
            Topology::parse(&[cpu("zero", "1")], &[]),
            Err(TopologyError::Parse { .. })
        ));
        assert!(matches!(
            Topology::parse(&[cpu("0", "0,2")], &[]),
            Err(TopologyError::NotOwnSibling { cpu: 1, .. })
        ));
        assert!(matches!(
            Topology::parse(&[], &[]),
            Err(TopologyError::Empty)
        ));
        // Some hypervisors report package -1: still one socket.
        assert_eq!(
            Topology::parse(&[cpu("-1", "1")], &[]).unwrap().sockets(),
            1
        );
    }

    #[test]
    fn compact_fills_a_socket_and_scatter_alternates() {
        let t = two_socket_smt();
        let ids = |p| t.order(p).iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(
            ids(Placement::Compact),
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
        );
        assert_eq!(
            ids(Placement::Scatter),
            [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
        );
        // Physical cores first either way: the first 8 CPUs are 8 distinct cores.
        for p in [Placement::Compact, Placement::Scatter] {
            let first: BTreeSet<_> = t.order(p)[..8].iter().map(|c| (c.socket, c.core)).collect();
            assert_eq!(first.len(), 8);
        }
    }

    #[test]
    fn fallback_numbers_siblings_after_the_cores() {
        let t = Topology::fallback(8, 4, "no /sys".into());
        assert_eq!((t.cores(), t.sockets(), t.smt_ways()), (4, 1, 2));
        assert_eq!((t.cpus[5].core, t.cpus[5].thread), (1, 1));
        let text = t.to_string();
        assert!(text.contains("/sys unusable (no /sys)"), "{text}");
        let ids: Vec<usize> = t.order(Placement::Compact).iter().map(|c| c.id).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn reads_a_sysfs_tree() {
        let root = std::env::temp_dir().join(format!("dlrm-topology-{}", std::process::id()));
        let write = |rel: &str, text: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        for id in 0..3 {
            let t = format!("devices/system/cpu/cpu{id}/topology");
            write(&format!("{t}/physical_package_id"), "0\n");
            write(&format!("{t}/core_id"), &format!("{}\n", id / 2));
            write(
                &format!("{t}/thread_siblings_list"),
                if id < 2 { "0-1\n" } else { "2\n" },
            );
        }
        // cpu2 is offline: left out.
        write("devices/system/cpu/online", "0-1\n");
        write("devices/system/node/node0/cpulist", "0-2\n");
        let t = Topology::read_sysfs(&root).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(t.logical_cpus(), 2);
        assert_eq!((t.cores(), t.smt_ways()), (1, 2));
        assert_eq!(t.cpus[1].node, Some(0));
        let missing = Topology::read_sysfs(&root.join("absent")).unwrap_err();
        assert!(matches!(missing, TopologyError::Io { .. }), "{missing}");
    }
}
