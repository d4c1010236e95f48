//! The sharding plan: which rank owns each embedding table, and which tiny tables every rank
//! holds a replica of.

use serde::Serialize;
use std::fmt;

/// Tables of fewer rows than this are replicated data-parallel on every rank under
/// [`PlanOptions::replicate_tiny`], as Intel's MLPerf DLRM runs do (their `--dp-threshold`):
/// a replica costs little memory and takes the table out of both all-to-alls.
pub const REPLICATE_BELOW_ROWS: usize = 2_048;

/// What placing one table costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableCost {
    pub rows: usize,
    /// Weights and optimizer state.
    pub bytes: u64,
    /// Bytes the lookups of one sample read (ids per sample x d x 4): the table's share of a
    /// rank's embedding time, which is lookups per step x d x bytes per value.
    pub lookup_bytes: u64,
}

/// Where one table lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// One rank owns it (table-wise model parallelism) and looks it up for the whole batch.
    Owner(usize),
    /// Every rank holds it, looks it up for its own slice and applies the whole batch's
    /// update (data parallelism).
    Replicated,
}

/// How a plan is made.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PlanOptions {
    /// Bytes of tables and optimizer state a rank may hold (None: unlimited).
    pub budget: Option<u64>,
    /// Replicate the tables under [`REPLICATE_BELOW_ROWS`] rows on every rank.
    pub replicate_tiny: bool,
}

/// Where each table lives, and each rank's bytes and lookup bytes per sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardPlan {
    /// Per table (in table order).
    pub placement: Vec<Placement>,
    /// Per rank: the bytes of its tables and replicas (weights and optimizer state).
    pub rank_bytes: Vec<u64>,
    /// Per rank: the bytes its owned tables' lookups read per sample of the global batch.
    pub rank_lookup_bytes: Vec<u64>,
}

/// A plan that cannot be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("no ranks to place tables on")]
    NoRanks,
    #[error(
        "table {table} ({bytes} bytes with its optimizer state) fits on no rank: the least \
         loaded holds {used} of its {budget} bytes (--rank-memory-gib); use more ranks or more \
         memory per rank"
    )]
    DoesNotFit {
        table: usize,
        bytes: u64,
        used: u64,
        budget: u64,
    },
}

impl ShardPlan {
    /// Table-wise packing balanced by bytes and lookups. Tiny tables are replicated first
    /// (when asked; on every rank, so they count against every rank's budget). The others go
    /// largest first (bytes, then lookups; ties: lower index) onto the rank whose larger share
    /// (of all the bytes: its memory; of all the lookup bytes: its embedding time) would then
    /// be the least (ties: the lesser sum of the two shares, then the lower rank), among the
    /// ranks with room in `budget`; a table with no room anywhere is refused.
    /// Deterministic: every rank computes the same plan.
    pub fn table_wise(
        tables: &[TableCost],
        ranks: usize,
        options: PlanOptions,
    ) -> Result<ShardPlan, PlanError> {
        if ranks == 0 {
            return Err(PlanError::NoRanks);
        }
        let replicated = |t: &TableCost| options.replicate_tiny && t.rows < REPLICATE_BELOW_ROWS;
        let mut placement = vec![Placement::Replicated; tables.len()];
        // Every rank holds every replica: they fill each rank's budget first.
        let mut replica_bytes = 0;
        for t in (0..tables.len()).filter(|&t| replicated(&tables[t])) {
            let bytes = tables[t].bytes;
            if let Some(budget) = options.budget
                && replica_bytes + bytes > budget
            {
                return Err(PlanError::DoesNotFit {
                    table: t,
                    bytes,
                    used: replica_bytes,
                    budget,
                });
            }
            replica_bytes += bytes;
        }
        let mut rank_bytes = vec![replica_bytes; ranks];
        let mut rank_lookup_bytes = vec![0u64; ranks];
        let mut order: Vec<usize> = (0..tables.len())
            .filter(|&t| !replicated(&tables[t]))
            .collect();
        order.sort_by_key(|&t| {
            let c = tables[t];
            (std::cmp::Reverse((c.bytes, c.lookup_bytes)), t)
        });
        // Shares as fractions of the totals (at least 1, so an empty total divides safely).
        let total_bytes = order.iter().map(|&t| tables[t].bytes).sum::<u64>().max(1) as f64;
        let total_lookups = (order.iter().map(|&t| tables[t].lookup_bytes))
            .sum::<u64>()
            .max(1) as f64;
        for t in order {
            let cost = tables[t];
            let fits = |r: &usize| {
                options
                    .budget
                    .is_none_or(|b| rank_bytes[*r] + cost.bytes <= b)
            };
            // The larger share, then their sum.
            let load = |r: usize| {
                let bytes = (rank_bytes[r] - replica_bytes + cost.bytes) as f64 / total_bytes;
                let lookups = (rank_lookup_bytes[r] + cost.lookup_bytes) as f64 / total_lookups;
                (bytes.max(lookups), bytes + lookups)
            };
            let Some(rank) = (0..ranks).filter(fits).min_by(|&p, &q| {
                let ((max_p, sum_p), (max_q, sum_q)) = (load(p), load(q));
                (max_p.total_cmp(&max_q))
                    .then(sum_p.total_cmp(&sum_q))
                    .then(p.cmp(&q))
            }) else {
                let used = *rank_bytes.iter().min().expect("at least one rank");
                return Err(PlanError::DoesNotFit {
                    table: t,
                    bytes: cost.bytes,
                    used,
                    budget: options.budget.expect("only a budget refuses a table"),
                });
            };
            placement[t] = Placement::Owner(rank);
            rank_bytes[rank] += cost.bytes;
            rank_lookup_bytes[rank] += cost.lookup_bytes;
        }
        Ok(ShardPlan {
            placement,
            rank_bytes,
            rank_lookup_bytes,
        })
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.rank_bytes.len()
    }

    /// The tables rank `rank` owns, in table order.
    pub fn tables_of(&self, rank: usize) -> Vec<usize> {
        self.tables_where(|p| p == Placement::Owner(rank))
    }

    /// The tables every rank holds a replica of, in table order.
    pub fn replicated(&self) -> Vec<usize> {
        self.tables_where(|p| p == Placement::Replicated)
    }

    fn tables_where(&self, keep: impl Fn(Placement) -> bool) -> Vec<usize> {
        (0..self.placement.len())
            .filter(|&t| keep(self.placement[t]))
            .collect()
    }
}

impl fmt::Display for ShardPlan {
    /// One line per rank (its tables, bytes and lookup bytes per sample), then the replicas.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let list = |tables: Vec<usize>| {
            let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
            names.join(",")
        };
        for rank in 0..self.ranks() {
            writeln!(
                f,
                "rank {rank}: tables [{}], {:.1} MiB with replicas, {} lookup bytes per sample",
                list(self.tables_of(rank)),
                self.rank_bytes[rank] as f64 / (1 << 20) as f64,
                self.rank_lookup_bytes[rank]
            )?;
        }
        let replicated = self.replicated();
        if !replicated.is_empty() {
            writeln!(
                f,
                "every rank: tables [{}] replicated (under {REPLICATE_BELOW_ROWS} rows)",
                list(replicated)
            )?;
        }
        Ok(())
    }
}
