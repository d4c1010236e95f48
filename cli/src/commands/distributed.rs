//! `dlrm train` on N MPI ranks (the `mpi` feature): tables model-parallel, MLPs data-parallel
//! (see `dlrm::model::dlrm::ShardedDlrm`). Under `mpirun` a run is distributed by itself;
//! `--distributed` forces it. Rank 0 prints the plan, the progress and the summary and writes
//! the report and the --log-dir records. Checkpoints (--save-model, --load-model) are
//! single-process ones written and read by all the ranks together (each its own tables, and its
//! rows of the tables split row-wise; see `dlrm::checkpoint::save_sharded`): a run resumes on any number of ranks or in one process.
//! The --save-model folder must be on a file system every rank reaches (shared across
//! machines); `DLRM_CRASH_AT=<phase>@<rank>` crashes one rank mid-save (the crash tests).

use anyhow::Result;
use std::path::Path;

/// How the tables are placed on the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ShardingArg {
    /// Whole tables on ranks, largest first onto the least loaded rank (by bytes and
    /// lookups), within --rank-memory-gib.
    Table,
    /// Every table split row-wise into contiguous row ranges, one per rank (as even as
    /// --rank-memory-gib allows); each rank looks its ranges up for the whole batch.
    Row,
    /// As `table`, with the tables under 2,048 rows replicated on every rank
    /// (data-parallel, out of the all-to-alls), and a table that fits on no rank within
    /// --rank-memory-gib split row-wise over the ranks.
    Auto,
}

/// The distributed flags of `dlrm train`.
#[derive(clap::Args, Debug)]
pub struct DistributedArgs {
    /// Train on the ranks of an MPI job (automatic when started by mpirun with more than one
    /// process; needs a build with `--features mpi`).
    #[arg(long)]
    pub distributed: bool,
    /// How the embedding tables are placed on the ranks.
    #[arg(long, value_enum, default_value_t = ShardingArg::Auto)]
    pub sharding: ShardingArg,
    /// Memory for tables and their optimizer state per rank, in GiB (default: unlimited).
    #[arg(long)]
    pub rank_memory_gib: Option<f64>,
    /// Reduce the dense gradients in a fixed order (gather, then add every chunk's in batch
    /// order): N ranks train bit for bit the single-process model. Slower than the all-reduce.
    #[arg(long)]
    pub deterministic: bool,
    /// Seconds a collective may wait for the other ranks: past it (a rank died or hangs) the
    /// job ends with exit code 1, naming the ranks that stopped answering.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub collective_timeout: f64,
}

/// The number of processes of the MPI job this process was started in (1 outside one), from
/// the launcher's environment (OpenMPI, MPICH/Hydra, Slurm).
pub fn launched_ranks() -> usize {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
}

/// This process's rank in the MPI job it was started in (0 outside one), from the launcher's
/// environment, for what must be decided before MPI starts.
pub fn launched_rank() -> usize {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// The files a distributed run reads and writes besides its data and checkpoints.
// Read by the MPI build only; the flags are parsed into it either way.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub struct RunFiles<'a> {
    /// Where rank 0 writes the report.
    pub report_json: Option<&'a Path>,
    /// The checkpoint version every rank loads its share of (resumed on any number of ranks).
    pub load_model: Option<&'a Path>,
    pub load: dlrm::checkpoint::LoadOptions,
    /// Where rank 0 records the run (config.json, metrics.csv, events), with its config.json.
    pub log_dir: Option<(&'a Path, serde_json::Value)>,
}

impl DistributedArgs {
    /// Whether the run is distributed: asked for, or started by mpirun with several ranks.
    pub fn wanted(&self) -> bool {
        self.distributed || launched_ranks() > 1
    }
}

/// Checks the distributed flags before any work (a budget and a timeout must be positive
/// numbers).
pub fn check_flags(a: &DistributedArgs) -> Result<()> {
    let t = a.collective_timeout;
    anyhow::ensure!(
        t.is_finite() && t > 0.0,
        "--collective-timeout {t}: a positive number of seconds is needed"
    );
    if let Some(gib) = a.rank_memory_gib {
        anyhow::ensure!(
            gib.is_finite() && gib > 0.0,
            "--rank-memory-gib {gib}: a positive number of GiB is needed"
        );
    }
    Ok(())
}

/// Trains `spec` on the ranks of this MPI job, reading and writing `files`.
#[cfg(not(feature = "mpi"))]
pub fn run(_a: &DistributedArgs, _spec: dlrm::spec::RunSpec, _files: &RunFiles) -> Result<()> {
    anyhow::bail!(
        "distributed training (--distributed, or {} processes started by mpirun) needs a build \
         with MPI: cargo build --release --features mpi",
        launched_ranks()
    )
}

#[cfg(feature = "mpi")]
pub use with_mpi::run;

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::super::records::Recorder;
    use super::{DistributedArgs, RunFiles, ShardingArg};
    use anyhow::{Context, Result};
    use dlrm::checkpoint;
    use dlrm::data::synthetic::{SyntheticData, SyntheticSource};
    use dlrm::distributed::mpi::MpiCollectives;
    use dlrm::distributed::{Collectives, PlanOptions, ShardPlan, TableCost};
    use dlrm::metrics::{format_auc, format_ne};
    use dlrm::model::ModelKind;
    use dlrm::model::dlrm::{DenseReduction, ShardedDlrm};
    use dlrm::model::parameters::TableSource;
    use dlrm::spec::{DataSpec, RunSpec, thread_pool};
    use dlrm::train::{DataSource, Quiet, ShardedReport, TrainObserver, train_sharded};

    /// Trains `spec` on the ranks of this MPI job (see the module's doc).
    pub fn run(a: &DistributedArgs, spec: RunSpec, files: &RunFiles) -> Result<()> {
        // MPI lives on one worker of the run's pool (initialised, called and finalised there:
        // MPI_THREAD_SINGLE suffices), which hands the kernels' parallel work to the pool.
        thread_pool(spec.threads)?.install(|| run_on_pool(a, spec, files))
    }

    fn run_on_pool(a: &DistributedArgs, spec: RunSpec, files: &RunFiles) -> Result<()> {
        let timeout = std::time::Duration::from_secs_f64(a.collective_timeout);
        let comm = MpiCollectives::init(timeout).context("MPI was already initialised")?;
        let (rank, ranks) = (comm.rank(), comm.size());
        anyhow::ensure!(
            spec.model == ModelKind::Dlrm,
            "distributed training is for --model dlrm, not {}",
            spec.model.name()
        );
        let plan = plan(a, &spec, ranks)?;
        if rank == 0 {
            println!(
                "sharding plan ({ranks} ranks, --sharding {:?}):\n{plan}",
                a.sharding
            );
        }
        let source: Box<dyn DataSource> = match spec.data {
            DataSpec::Synthetic {
                config,
                train_len,
                test_len,
            } => Box::new(SyntheticSource::on_the_fly(
                SyntheticData::new(config),
                train_len,
                test_len,
            )),
            DataSpec::Dataset(ds) => ds,
            DataSpec::Ratings { .. } => anyhow::bail!("distributed training is for DLRM"),
        };
        let reduction = if a.deterministic {
            DenseReduction::Ordered
        } else {
            DenseReduction::AllReduce
        };
        let mut model = match files.load_model {
            // This rank's tables under this run's plan, whatever the ranks that saved them.
            Some(version) => {
                checkpoint::load_sharded(version, &spec.storage, files.load, plan, rank, reduction)
                    .with_context(|| format!("--load-model {}", version.display()))?
                    .0
            }
            None => ShardedDlrm::new(
                spec.arch,
                spec.optimizer,
                spec.train.seed,
                TableSource::Init(&spec.storage),
                plan,
                rank,
                reduction,
            )?,
        };
        // Rank 0 prints and records; the other ranks write nothing beside their checkpoint
        // tables.
        let recorder = match &files.log_dir {
            Some((dir, config)) if rank == 0 => Some(Recorder::create(dir, config)?),
            _ => None,
        };
        let mut console = super::super::progress::Console::new();
        let mut rank0 = (&mut console, recorder);
        let observer: &mut dyn TrainObserver = if rank == 0 { &mut rank0 } else { &mut Quiet };
        let report: ShardedReport = train_sharded(
            &comm,
            &mut model,
            source.as_ref(),
            &spec.train,
            spec.threads,
            observer,
        )?;
        if let Some(recorder) = rank0.1 {
            recorder.finish()?;
        }
        if rank == 0 {
            print_summary(&report);
            if let Some(path) = files.report_json {
                let json = serde_json::to_string_pretty(&report)?;
                std::fs::write(path, json + "\n")
                    .with_context(|| format!("writing the report to {}", path.display()))?;
            }
        }
        comm.barrier();
        Ok(())
    }

    /// The plan of `spec`'s tables (weights and optimizer state; the ids per sample of the
    /// data) on `ranks`.
    fn plan(a: &DistributedArgs, spec: &RunSpec, ranks: usize) -> Result<ShardPlan> {
        let d = spec.arch.embedding_dim;
        let width = spec.optimizer.sparse(0.0).state_width(d);
        let ids_per_sample = match &spec.data {
            DataSpec::Synthetic { config, .. } => config.num_indices_per_lookup.max(1),
            _ => 1,
        };
        let tables: Vec<TableCost> = (spec.arch.table_sizes.iter())
            .map(|&rows| TableCost {
                rows,
                bytes: (rows * (d + width) * 4) as u64,
                lookup_bytes: (ids_per_sample * d * 4) as u64,
            })
            .collect();
        let options = PlanOptions {
            budget: a.rank_memory_gib.map(|g| (g * (1u64 << 30) as f64) as u64),
            replicate_tiny: a.sharding == ShardingArg::Auto,
        };
        Ok(match a.sharding {
            ShardingArg::Table => ShardPlan::table_wise(&tables, ranks, options),
            ShardingArg::Row => ShardPlan::row_wise(&tables, ranks, options),
            ShardingArg::Auto => ShardPlan::auto(&tables, ranks, options),
        }?)
    }

    fn print_summary(r: &ShardedReport) {
        println!("\n== dlrm distributed training summary ==");
        println!(
            "steps {} x global batch {} on {} ranks x {} threads: {:.0} samples/s, \
             communication {:.1}% of the step time (rank 0)",
            r.steps,
            r.batch_size,
            r.ranks,
            r.threads_per_rank,
            r.samples_per_sec,
            100.0 * r.comm_fraction
        );
        println!(
            "train loss {:.5} | held-out loss {:.5}, accuracy {:.4}, AUC {}, NE {}",
            r.train_loss,
            r.test_loss,
            r.test_accuracy,
            format_auc(r.test_auc),
            format_ne(r.test_ne)
        );
    }
}
