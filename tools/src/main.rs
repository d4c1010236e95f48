//! `dlrm-scaling`: how DLRM training (or one kernel family) scales with threads, core by core
//! and socket by socket. Flags and orchestration only; the work is in the `dlrm_tools` library.

use anyhow::{Context, Result};
use clap::Parser;
use clap::builder::{PossibleValue, PossibleValuesParser, RangedU64ValueParser, TypedValueParser};
use dlrm::config::Preset;
use dlrm::data::synthetic::{Generation, SyntheticConfig};
use dlrm::model::OptimizerKind;
use dlrm::model::architecture::join;
use dlrm::names::{Choice, parse_choice};
use dlrm::spec::{ArchitectureOverrides, resolve_architecture};
use dlrm::storage::interleave_memory;
use dlrm_tools::measure::Schedule;
use dlrm_tools::ranks::{Launcher, sibling_dlrm};
use dlrm_tools::study::{StudyOptions, busy_warning, run};
use dlrm_tools::sweep::{boundaries, default_sweep, sweep_of};
use dlrm_tools::topology::{Placement, Topology, format_cpulist};
use dlrm_tools::workload::{WorkloadKind, WorkloadSpec};
use dlrm_tools::{plot, ranks, report, simulate};
use std::path::PathBuf;

/// Where the pages of the tables go on a multi-socket machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Numa {
    /// Each point builds its model inside its own pool: pages are first touched, so placed, by
    /// the threads that use them.
    FirstTouch,
    /// Interleave all pages round-robin over the NUMA nodes (like numactl --interleave=all).
    Interleave,
}

#[derive(Parser, Debug)]
#[command(
    name = "dlrm-scaling",
    version,
    about = "Thread and socket scaling study of DLRM training and its kernels",
    long_about = "Thread and socket scaling study of DLRM training and its kernels.\n\nRuns the same workload at a sweep of thread counts (one pinned rayon pool per point) and reports samples/s (median of repeats after warm-up), speed-up, parallel efficiency and the time per phase, as a table, and with --out DIR as DIR/scaling.csv and DIR/scaling.svg."
)]
struct Args {
    /// What each point runs.
    #[arg(long, value_enum, default_value_t = WorkloadKind::Train)]
    workload: WorkloadKind,
    /// The `dlrm train` preset the model, data and batch come from.
    #[arg(long, value_parser = choice::<Preset>(), default_value_t = Preset::Kaggle)]
    preset: Preset,
    /// Samples per step (per thread count 1 with --weak); default: the preset's.
    #[arg(long)]
    mini_batch_size: Option<usize>,
    /// Optimizer of the training and sparse-update workloads.
    #[arg(long, value_parser = choice::<OptimizerKind>(), default_value_t = OptimizerKind::Sgd)]
    optimizer: OptimizerKind,
    /// Learning rate; default: the preset's.
    #[arg(long)]
    learning_rate: Option<f32>,
    /// How synthetic ids and labels are drawn (as `dlrm train --data-generation`).
    #[arg(long, value_parser = choice::<Generation>(), default_value_t = Generation::Teacher)]
    data_generation: Generation,
    /// Exponent of the Zipf distribution of ids.
    #[arg(long, default_value_t = 1.05)]
    zipf_alpha: f64,
    /// Ids per bag; default: the preset's.
    #[arg(long)]
    num_indices_per_lookup: Option<usize>,
    /// Distinct batches in the training data set; default: the preset's --num-batches.
    #[arg(long)]
    data_batches: Option<usize>,
    /// Input and output width of the gemm workload's layer (e.g. 367-512); default: the
    /// preset's first top-MLP layer.
    #[arg(long, value_delimiter = '-')]
    gemm_layer: Option<Vec<usize>>,

    /// Thread counts, comma-separated (e.g. 1,2,3); default: 1, 2, 4, ... up to all cores,
    /// each socket boundary, and all logical CPUs.
    #[arg(long, value_delimiter = ',', value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    threads: Option<Vec<usize>>,
    /// MPI ranks, comma-separated (e.g. 1,2). With any above 1, every ranks x threads point is
    /// an `mpirun -np R dlrm train --distributed --threads T` job (1 rank included, so that all
    /// points are measured alike; unpinned), compared on cores = ranks x threads, with each
    /// job's communication share.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    ranks: Vec<usize>,
    /// The `dlrm` binary (built with --features mpi) that --ranks starts; default: `dlrm`
    /// beside this executable.
    #[arg(long, value_name = "PATH")]
    dlrm_bin: Option<PathBuf>,
    /// Fill one socket before the next (compact) or alternate sockets (scatter); physical
    /// cores always come before SMT siblings.
    #[arg(long, value_enum, default_value_t = Placement::Compact)]
    placement: Placement,
    /// Do not pin workers to CPUs (the OS places them, as `dlrm train` leaves them).
    #[arg(long)]
    no_pin: bool,
    /// Weak scaling: the batch is --mini-batch-size times the thread count.
    #[arg(long)]
    weak: bool,
    /// Page placement on multi-socket machines.
    #[arg(long, value_enum, default_value_t = Numa::FirstTouch)]
    numa: Numa,

    /// Untimed steps before the repeats of each point.
    #[arg(long, default_value_t = 20)]
    warmup_steps: usize,
    /// Timed repeats per point (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Steps per repeat.
    #[arg(long, default_value_t = 36)]
    steps: usize,
    /// Seed of the model's initialisation and of the data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write scaling.csv and scaling.svg to this directory (created if needed).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the topology and the placement orders, then exit.
    #[arg(long)]
    topology: bool,

    /// Measure nothing: print the alpha-beta projection of the preset's hybrid-parallel step
    /// at --mini-batch-size on these rank counts (e.g. 8,64,512), then exit
    /// (docs/scaling-model.md).
    #[arg(long, value_delimiter = ',', value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    simulate_ranks: Option<Vec<usize>>,
    /// Link bandwidths of the projection, Gb/s, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "25,100")]
    link_gbps: Vec<f64>,
    /// Latency of one message in the projection, microseconds.
    #[arg(long, default_value_t = 5.0)]
    alpha_us: f64,
    /// Compute microseconds of one sample's training step on one core in the projection
    /// (default: the Kaggle step measured at batch 2048 on the 2-core Xeon, 36.9 us a sample
    /// on 2 threads).
    #[arg(long, default_value_t = 73.8)]
    compute_us_per_sample: f64,
}

/// The parser of a library enumeration's values by their names, offered with their help.
fn choice<T: Choice>() -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(T::ALL.iter().map(|&v| match v.help() {
        "" => PossibleValue::new(v.name()),
        help => PossibleValue::new(v.name()).help(help),
    }))
    .try_map(|name| parse_choice::<T>(&name))
}

fn main() {
    if let Err(e) = main_result() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The study the flags describe: the preset's model and data, the sweep, the schedule.
fn study_options(a: &Args, topo: &Topology) -> Result<StudyOptions> {
    let p = a.preset.values();
    let arch = resolve_architecture(&p, &ArchitectureOverrides::default(), None)?;
    let gemm_in_out = match &a.gemm_layer {
        Some(widths) => match widths[..] {
            [i, o] if i > 0 && o > 0 => (i, o),
            _ => anyhow::bail!(
                "--gemm-layer: '{}' must be two widths of at least 1, IN-OUT (e.g. 367-512)",
                join(widths)
            ),
        },
        None => (arch.top[0], arch.top[1]),
    };
    let bags = a.num_indices_per_lookup.unwrap_or(p.num_indices_per_lookup);
    anyhow::ensure!(bags >= 1, "--num-indices-per-lookup must be at least 1");
    anyhow::ensure!(
        a.zipf_alpha > 0.0 && a.zipf_alpha.is_finite(),
        "--zipf-alpha must be a positive number"
    );
    let batch = a.mini_batch_size.unwrap_or(p.mini_batch_size);
    anyhow::ensure!(batch >= 1, "--mini-batch-size must be at least 1");
    let threads = match &a.threads {
        Some(counts) => sweep_of(counts),
        None => default_sweep(topo),
    };
    let max_threads = *threads.last().expect("at least one thread count");
    if max_threads > topo.logical_cpus() {
        eprintln!(
            "warning: {max_threads} threads on {} logical CPUs: threads will share CPUs",
            topo.logical_cpus()
        );
    }
    let opts = StudyOptions {
        data: SyntheticConfig {
            num_dense: arch.num_dense(),
            table_sizes: arch.table_sizes.clone(),
            generation: a.data_generation,
            zipf_alpha: a.zipf_alpha,
            num_indices_per_lookup: bags,
            fixed_bag_size: true,
            seed: a.seed,
        },
        spec: WorkloadSpec {
            kind: a.workload,
            arch,
            optimizer: a.optimizer,
            learning_rate: a.learning_rate.unwrap_or(p.learning_rate),
            gemm_in_out,
            seed: a.seed,
        },
        data_batches: a.data_batches.unwrap_or(p.num_batches),
        batch,
        threads,
        placement: a.placement,
        pin: !a.no_pin,
        weak: a.weak,
        schedule: Schedule {
            warmup_steps: a.warmup_steps,
            repeats: a.repeats,
            steps: a.steps,
        },
    };

    Ok(opts)
}

/// The launcher of the MPI points, checked before any work: they train (`dlrm train`), and
/// need the `dlrm` binary and mpirun.
fn mpi_launcher(a: &Args) -> Result<Launcher> {
    anyhow::ensure!(
        a.workload == WorkloadKind::Train,
        "--ranks above 1 runs `dlrm train`: it measures --workload train, not {}",
        a.workload.name()
    );
    let l = Launcher {
        dlrm: match &a.dlrm_bin {
            Some(path) => path.clone(),
            None => sibling_dlrm()?,
        },
        preset: a.preset.name().to_string(),
    };
    ranks::check(&l)?;
    Ok(l)
}

/// `--simulate-ranks`: the projection of the preset's step, checked flags, no measurement.
fn simulate(a: &Args, ranks: &[usize]) -> Result<()> {
    let positive = |v: f64| v > 0.0 && v.is_finite();
    anyhow::ensure!(
        a.link_gbps.iter().all(|&g| positive(g)),
        "--link-gbps: every bandwidth must be a positive number of Gb/s"
    );
    anyhow::ensure!(
        a.alpha_us >= 0.0 && a.alpha_us.is_finite(),
        "--alpha-us must be a number of microseconds, at least 0"
    );
    anyhow::ensure!(
        positive(a.compute_us_per_sample),
        "--compute-us-per-sample must be a positive number of microseconds"
    );
    let p = a.preset.values();
    let arch = resolve_architecture(&p, &ArchitectureOverrides::default(), None)?;
    let batch = a.mini_batch_size.unwrap_or(p.mini_batch_size);
    anyhow::ensure!(batch >= 1, "--mini-batch-size must be at least 1");
    let machine = simulate::Machine {
        alpha: a.alpha_us * 1e-6,
        compute_per_sample: a.compute_us_per_sample * 1e-6,
    };
    let points: Vec<_> = (ranks.iter())
        .flat_map(|&n| a.link_gbps.iter().map(move |&g| (n, g)))
        .map(|(n, g)| simulate::project(&arch, &machine, batch, n, g))
        .collect();
    println!(
        "{} preset: {} tables of d = {}, {} dense parameters; alpha {} us, compute {} us a \
         sample on one core",
        a.preset.name(),
        arch.num_tables(),
        arch.embedding_dim,
        simulate::dense_parameters(&arch),
        a.alpha_us,
        a.compute_us_per_sample
    );
    print!("{}", simulate::table(&points, &machine));
    Ok(())
}

fn main_result() -> Result<()> {
    let a = Args::parse();
    if let Some(ranks) = &a.simulate_ranks {
        return simulate(&a, ranks);
    }
    let topo = Topology::detect();
    print!("{topo}");
    let order = topo.order(a.placement);
    if a.topology {
        for p in [Placement::Compact, Placement::Scatter] {
            let ids: Vec<String> = topo.order(p).iter().map(|c| c.id.to_string()).collect();
            println!("{p} order: {}", ids.join(" "));
        }
        println!("default thread counts: {:?}", default_sweep(&topo));
        return Ok(());
    }

    let opts = study_options(&a, &topo)?;
    if a.numa == Numa::Interleave {
        let nodes = topo.nodes();
        anyhow::ensure!(
            !nodes.is_empty(),
            "--numa interleave: the OS reports no NUMA nodes"
        );
        // Before any pool exists, so that every worker inherits the policy.
        interleave_memory(&nodes).with_context(|| {
            format!(
                "--numa interleave over nodes {}",
                format_cpulist(nodes.iter().copied())
            )
        })?;
    }
    let ranks = sweep_of(&a.ranks);
    let launcher = match ranks[..] {
        [1] => None,
        _ => Some(mpi_launcher(&a)?),
    };
    let scaling = if a.weak { "weak" } else { "strong" };
    let placement = if a.no_pin || launcher.is_some() {
        "unpinned".to_string()
    } else {
        a.placement.to_string()
    };
    let preset = a.preset.name();
    let title = format!(
        "{} | {preset} preset | batch {}{} ({scaling} scaling) | {placement}{}",
        a.workload.name(),
        opts.batch,
        if a.weak { " per thread" } else { "" },
        match launcher {
            Some(_) => {
                let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
                format!(" | ranks {}", list.join(","))
            }
            None => String::new(),
        },
    );
    println!("{title}");
    if let Some(w) = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| busy_warning(&l, topo.logical_cpus()))
    {
        eprintln!("{w}");
    }
    let points = match &launcher {
        Some(l) => ranks::run(l, &opts, &ranks)?,
        None => run(&opts, &topo)?,
    };
    let rows = report::rows(&points);
    println!("\n{}", report::table(&rows));
    if let Some(phases) = report::phase_table(&rows) {
        println!("{phases}");
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let csv = dir.join("scaling.csv");
        std::fs::write(&csv, report::csv(a.workload.name(), &placement, &rows))
            .with_context(|| format!("writing {}", csv.display()))?;
        let marks = if a.no_pin || launcher.is_some() {
            Vec::new()
        } else {
            boundaries(&order)
        };
        plot::write_svg(&dir.join("scaling.svg"), &title, &rows, &marks)?;
        println!("wrote {} and scaling.svg", csv.display());
    }
    Ok(())
}
