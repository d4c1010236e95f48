//! `--simulate-ranks`: the alpha-beta projection of a hybrid-parallel DLRM step on N ranks
//! (docs/scaling-model.md). Tables are model-parallel (T/N a rank), the MLPs data-parallel
//! (B/N samples a rank); per step each rank sends its tables' pooled vectors for the other
//! ranks' samples forward and receives their gradients backward (two pairwise all-to-alls of
//! N-1 messages), and all-reduces the dense gradients (a ring: 2(N-1) messages, 2 P (N-1)/N
//! floats). Each message costs alpha plus its bytes over the link bandwidth beta (Hockney's
//! model). Optimistic by design: balanced tables, no overlap loss, no contention.

use dlrm::model::architecture::Architecture;

/// What the projection is made for.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Latency of one message, seconds.
    pub alpha: f64,
    /// Compute seconds of one sample's step on one core.
    pub compute_per_sample: f64,
}

/// One projected point.
#[derive(Clone, Debug, PartialEq)]
pub struct Projection {
    pub ranks: usize,
    pub link_gbps: f64,
    pub batch: usize,
    pub compute_s: f64,
    /// Forward and backward all-to-all together.
    pub all_to_all_s: f64,
    pub all_reduce_s: f64,
}

impl Projection {
    pub fn step_s(&self) -> f64 {
        self.compute_s + self.all_to_all_s + self.all_reduce_s
    }

    pub fn comm_share(&self) -> f64 {
        (self.all_to_all_s + self.all_reduce_s) / self.step_s()
    }
}

/// The dense parameters (floats) of the bottom and top MLPs: weights and biases.
pub fn dense_parameters(arch: &Architecture) -> usize {
    [&arch.bottom, &arch.top]
        .iter()
        .flat_map(|widths| widths.windows(2).map(|w| w[0] * w[1] + w[1]))
        .sum()
}

/// The step of `arch` at global batch `batch` on `ranks` ranks joined by `link_gbps` links.
pub fn project(
    arch: &Architecture,
    machine: &Machine,
    batch: usize,
    ranks: usize,
    link_gbps: f64,
) -> Projection {
    let n = ranks as f64;
    let beta = link_gbps * 1e9 / 8.0;
    let (d, tables) = (arch.embedding_dim as f64, arch.num_tables() as f64);
    let others = (n - 1.0) / n;
    // 4 d (T/N) B (N-1)/N bytes a rank sends each way; N-1 messages each way.
    let a2a_bytes = 4.0 * d * (tables / n) * batch as f64 * others;
    let all_to_all_s = 2.0 * ((n - 1.0) * machine.alpha + a2a_bytes / beta);
    // The ring all-reduce: reduce-scatter then all-gather, 2 (N-1) messages, 2 P (N-1)/N floats.
    let ar_bytes = 2.0 * 4.0 * dense_parameters(arch) as f64 * others;
    let all_reduce_s = 2.0 * (n - 1.0) * machine.alpha + ar_bytes / beta;
    Projection {
        ranks,
        link_gbps,
        batch,
        compute_s: machine.compute_per_sample * batch as f64 / n,
        all_to_all_s,
        all_reduce_s,
    }
}

/// The projections as a Markdown table, with each point's speed-up over one rank's compute.
pub fn table(points: &[Projection], machine: &Machine) -> String {
    let mut out = String::from(
        "| ranks | link | global batch | compute ms | all-to-all ms (fwd+bwd) | all-reduce ms \
         | comm share | speed-up vs 1 rank |\n|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        let one_rank = machine.compute_per_sample * p.batch as f64;
        out += &format!(
            "| {} | {} Gb/s | {} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.1}x |\n",
            p.ranks,
            p.link_gbps,
            p.batch,
            p.compute_s * 1e3,
            p.all_to_all_s * 1e3,
            p.all_reduce_s * 1e3,
            p.comm_share() * 100.0,
            one_rank / p.step_s(),
        );
    }
    out
}
