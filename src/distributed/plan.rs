//! The sharding plan: which rank owns each embedding table (or each contiguous row range of a
//! table split row-wise), and which tiny tables every rank holds a replica of.

use serde::Serialize;
use std::fmt;
use std::ops::Range;

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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// One rank owns it (table-wise model parallelism) and looks it up for the whole batch.
    Owner(usize),
    /// Every rank holds it, looks it up for its own slice and applies the whole batch's
    /// update (data parallelism).
    Replicated,
    /// Split row-wise: rank r owns the rows `bounds[r] .. bounds[r + 1]` (contiguous, in rank
    /// order, covering every row once; a range may be empty) and looks them up for the whole
    /// batch.
    Rows(Vec<usize>),
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
    /// Per table: its rows.
    pub rows: Vec<usize>,
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
        "table {table} ({bytes} bytes with its optimizer state) fits on no rank even split \
         row-wise: the ranks have {free} bytes free in all within --rank-memory-gib; use more \
         ranks or more memory per rank"
    )]
    RowsDoNotFit { table: usize, bytes: u64, free: u64 },
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

/// Which tables a plan splits row-wise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowSplit {
    Never,
    /// Those that fit on no rank whole.
    Unfit,
    /// Every table not replicated.
    Every,
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
        ShardPlan::pack(tables, ranks, options, RowSplit::Never)
    }

    /// [`table_wise`](Self::table_wise), except that a table that fits on no rank whole is
    /// split row-wise over the ranks with room (see [`row_wise`](Self::row_wise)); refused
    /// only when even its rows do not fit in the room left on all the ranks together.
    pub fn auto(
        tables: &[TableCost],
        ranks: usize,
        options: PlanOptions,
    ) -> Result<ShardPlan, PlanError> {
        ShardPlan::pack(tables, ranks, options, RowSplit::Unfit)
    }

    /// Every table (but the replicated tiny ones, when asked) split row-wise over all the
    /// ranks into contiguous ranges in rank order, as even as the budget allows: with room
    /// everywhere rank r gets ceil(rows / N) or floor(rows / N) rows, the larger ranges first;
    /// a rank short of room gets what fits and the others share the rest evenly.
    pub fn row_wise(
        tables: &[TableCost],
        ranks: usize,
        options: PlanOptions,
    ) -> Result<ShardPlan, PlanError> {
        ShardPlan::pack(tables, ranks, options, RowSplit::Every)
    }

    fn pack(
        tables: &[TableCost],
        ranks: usize,
        options: PlanOptions,
        split: RowSplit,
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
        let mut plan = ShardPlan {
            placement: Vec::new(),
            rows: tables.iter().map(|c| c.rows).collect(),
            rank_bytes: vec![replica_bytes; ranks],
            rank_lookup_bytes: vec![0u64; ranks],
        };
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
            let (rank_bytes, rank_lookup_bytes) = (&plan.rank_bytes, &plan.rank_lookup_bytes);
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
            let best = (0..ranks).filter(fits).min_by(|&p, &q| {
                let ((max_p, sum_p), (max_q, sum_q)) = (load(p), load(q));
                (max_p.total_cmp(&max_q))
                    .then(sum_p.total_cmp(&sum_q))
                    .then(p.cmp(&q))
            });
            placement[t] = match (best, split) {
                (Some(rank), RowSplit::Never | RowSplit::Unfit) => {
                    plan.rank_bytes[rank] += cost.bytes;
                    plan.rank_lookup_bytes[rank] += cost.lookup_bytes;
                    Placement::Owner(rank)
                }
                (None, RowSplit::Never) => {
                    return Err(PlanError::DoesNotFit {
                        table: t,
                        bytes: cost.bytes,
                        used: *plan.rank_bytes.iter().min().expect("at least one rank"),
                        budget: options.budget.expect("only a budget refuses a table"),
                    });
                }
                _ => plan.split_rows(t, cost, options.budget)?,
            };
        }
        plan.placement = placement;
        Ok(plan)
    }

    /// Splits table `t` over the ranks' room left in `budget` (as even as it allows, see
    /// [`even_rows`]), charging each rank its share of the bytes and of the lookups (ids are
    /// taken as spread evenly over the rows).
    fn split_rows(
        &mut self,
        t: usize,
        cost: TableCost,
        budget: Option<u64>,
    ) -> Result<Placement, PlanError> {
        // Weights and state are per row, so bytes / rows is exact.
        let row_bytes = cost.bytes.div_ceil(cost.rows.max(1) as u64).max(1);
        let room: Vec<usize> = (self.rank_bytes.iter())
            .map(|&used| {
                budget.map_or(usize::MAX, |b| {
                    (b.saturating_sub(used) / row_bytes) as usize
                })
            })
            .collect();
        let Some(counts) = even_rows(cost.rows, &room) else {
            let free = (self.rank_bytes.iter())
                .map(|&used| budget.map_or(0, |b| b.saturating_sub(used)))
                .sum();
            return Err(PlanError::RowsDoNotFit {
                table: t,
                bytes: cost.bytes,
                free,
            });
        };
        let mut bounds = vec![0];
        for (r, &n) in counts.iter().enumerate() {
            bounds.push(bounds[r] + n);
            self.rank_bytes[r] += n as u64 * row_bytes;
            self.rank_lookup_bytes[r] +=
                (cost.lookup_bytes * n as u64).div_ceil(cost.rows.max(1) as u64);
        }
        Ok(Placement::Rows(bounds))
    }

    /// The tables split row-wise, in table order.
    pub fn row_split(&self) -> Vec<usize> {
        self.tables_where(|p| matches!(p, Placement::Rows(_)))
    }

    /// The rows of table `table` (of the whole table's row numbers) that rank `rank` holds and
    /// updates: its range of a table split row-wise, or every row of a table it owns or holds
    /// a replica of; None when it holds none. What the rank stores of the table, and writes at
    /// row offset `start` of a checkpoint's table.
    pub fn rows_of(&self, table: usize, rank: usize) -> Option<Range<usize>> {
        let rows = match &self.placement[table] {
            Placement::Owner(r) if *r != rank => return None,
            Placement::Owner(_) | Placement::Replicated => 0..self.rows[table],
            Placement::Rows(bounds) => bounds[rank]..bounds[rank + 1],
        };
        (!rows.is_empty()).then_some(rows)
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.rank_bytes.len()
    }

    /// The tables rank `rank` owns, in table order.
    pub fn tables_of(&self, rank: usize) -> Vec<usize> {
        self.tables_where(|p| *p == Placement::Owner(rank))
    }

    /// The tables every rank holds a replica of, in table order.
    pub fn replicated(&self) -> Vec<usize> {
        self.tables_where(|p| *p == Placement::Replicated)
    }

    fn tables_where(&self, keep: impl Fn(&Placement) -> bool) -> Vec<usize> {
        (0..self.placement.len())
            .filter(|&t| keep(&self.placement[t]))
            .collect()
    }
}

/// Rows per rank for a table of `rows` rows over ranks with room for `room[r]` rows, as even
/// as the room allows (water-filling): the least level L with sum_r min(room_r, L) >= rows;
/// every rank takes min(room_r, L - 1) rows, and the ranks with room for L take one more, in
/// rank order, until all rows are placed. None when the room is short of the rows.
fn even_rows(rows: usize, room: &[usize]) -> Option<Vec<usize>> {
    let filled = |level: usize| (room.iter().map(|&r| r.min(level))).fold(0, usize::saturating_add);
    if filled(rows) < rows {
        return None;
    }
    let (mut lo, mut hi) = (0, rows);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if filled(mid) >= rows {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut counts: Vec<usize> = room.iter().map(|&r| r.min(lo.saturating_sub(1))).collect();
    let mut left = rows - counts.iter().sum::<usize>();
    for (count, &r) in counts.iter_mut().zip(room) {
        if left > 0 && r >= lo {
            *count += 1;
            left -= 1;
        }
    }
    Some(counts)
}

impl fmt::Display for ShardPlan {
    /// One line per rank (its tables, bytes and lookup bytes per sample), then the replicas.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let list = |tables: Vec<usize>| {
            let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
            names.join(",")
        };
        for rank in 0..self.ranks() {
            let ranges: Vec<String> = (self.row_split().into_iter())
                .filter_map(|t| Some(format!("{t}[{:?}]", self.rows_of(t, rank)?)))
                .collect();
            let rows = if ranges.is_empty() {
                String::new()
            } else {
                format!(", rows {}", ranges.join(" "))
            };
            writeln!(
                f,
                "rank {rank}: tables [{}]{rows}, {:.1} MiB with replicas, {} lookup bytes per \
                 sample",
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
