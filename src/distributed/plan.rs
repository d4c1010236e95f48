//! The table-wise sharding plan: which rank owns each embedding table.

use serde::Serialize;
use std::fmt;

/// Which rank owns each table (table-wise model parallelism), and each rank's bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardPlan {
    /// Per table (in table order): the rank that owns it.
    pub owner: Vec<usize>,
    /// Per rank: the bytes of its tables (weights and optimizer state).
    pub rank_bytes: Vec<u64>,
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
    /// Table-wise packing, balanced by bytes: tables largest first (ties: lower index first),
    /// each onto the least loaded rank (ties: lower rank), refusing a table that would take a
    /// rank past `budget` bytes. Deterministic: every rank computes the same plan.
    pub fn table_wise(
        table_bytes: &[u64],
        ranks: usize,
        budget: Option<u64>,
    ) -> Result<ShardPlan, PlanError> {
        if ranks == 0 {
            return Err(PlanError::NoRanks);
        }
        let mut order: Vec<usize> = (0..table_bytes.len()).collect();
        order.sort_by_key(|&t| (std::cmp::Reverse(table_bytes[t]), t));
        let mut owner = vec![0; table_bytes.len()];
        let mut rank_bytes = vec![0u64; ranks];
        for t in order {
            let (rank, &used) = rank_bytes
                .iter()
                .enumerate()
                .min_by_key(|&(r, &b)| (b, r))
                .expect("at least one rank");
            let bytes = table_bytes[t];
            if let Some(budget) = budget
                && used + bytes > budget
            {
                return Err(PlanError::DoesNotFit {
                    table: t,
                    bytes,
                    used,
                    budget,
                });
            }
            owner[t] = rank;
            rank_bytes[rank] += bytes;
        }
        Ok(ShardPlan { owner, rank_bytes })
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.rank_bytes.len()
    }

    /// The tables rank `rank` owns, in table order.
    pub fn tables_of(&self, rank: usize) -> Vec<usize> {
        (0..self.owner.len())
            .filter(|&t| self.owner[t] == rank)
            .collect()
    }
}

impl fmt::Display for ShardPlan {
    /// One line per rank: its tables and bytes.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for rank in 0..self.ranks() {
            let tables: Vec<String> = self.tables_of(rank).iter().map(|t| t.to_string()).collect();
            writeln!(
                f,
                "rank {rank}: tables [{}], {:.1} MiB",
                tables.join(","),
                self.rank_bytes[rank] as f64 / (1 << 20) as f64
            )?;
        }
        Ok(())
    }
}
