//! The `dlrm` command line: argument parsing and orchestration only (no math lives here).

mod commands;
mod server;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use dlrm::cancel::{Cancel, Interrupted};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

#[derive(Parser)]
#[command(
    name = "dlrm",
    version,
    about = "Train DLRM (Naumov et al. 2019) on a CPU, with hand-written SIMD kernels",
    long_about = "Train DLRM (Naumov et al. 2019) on a CPU, with hand-written SIMD kernels.\n\nRun `dlrm train` with no arguments for a short run on synthetic teacher data that visibly learns."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More detail on stderr: -v debug, -vv trace (RUST_LOG, e.g. RUST_LOG=dlrm=debug, refines
    /// it).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors on stderr: no progress bars, no info lines.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
}

/// Sends the `log` records of the run to stderr as plain lines (errors prefixed `error: `, as
/// main prints a failure), at the level -v / --quiet ask for; RUST_LOG, when set, adds its
/// directives.
fn init_logging(verbose: u8, quiet: bool) {
    use std::io::Write;
    let level = match (quiet, verbose) {
        (true, _) => log::LevelFilter::Warn,
        (false, 0) => log::LevelFilter::Info,
        (false, 1) => log::LevelFilter::Debug,
        (false, _) => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_default_env()
        .format(|out, record| match record.level() {
            log::Level::Error => writeln!(out, "error: {}", record.args()),
            _ => writeln!(out, "{}", record.args()),
        })
        .init();
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (on synthetic data by default) and report throughput, loss, accuracy,
    /// AUC and the time split by phase.
    Train(Box<commands::train::TrainArgs>),
    /// Score a saved model on a dataset's held-out split or on raw labelled Criteo rows: loss,
    /// accuracy, AUC, normalized entropy.
    Eval(Box<commands::score::EvalArgs>),
    /// Write one click probability per line of a raw Criteo file, with a saved model.
    Predict(Box<commands::score::PredictArgs>),
    /// Serve a saved model over HTTP: micro-batched scoring of raw Criteo rows, metrics, hot
    /// reload of new checkpoint versions.
    Serve(Box<server::ServeArgs>),
    /// Write a checkpoint's parameters as safetensors under the PyTorch reference's names.
    Export(commands::export::ExportArgs),
    /// Read parameters from a PyTorch-named safetensors file into a new checkpoint.
    Import(commands::export::ImportArgs),
    /// Train DLRM and DCN with SGD and with Adagrad on the same data and plot validation
    /// accuracy and AUC against iterations (the DLRM paper's Figure 5): CSV + SVG.
    Compare(Box<commands::compare::CompareArgs>),
    /// Turn raw Criteo files (tab-separated) into a binary dataset for `dlrm train --dataset`.
    Preprocess(Box<commands::preprocess::PreprocessArgs>),
    /// Write synthetic data as a file (Criteo's tab-separated format).
    Synth(Box<commands::synth::SynthArgs>),
}

/// Makes SIGINT and SIGTERM request cancellation of the work the returned handle is passed to
/// (the handle holds the signal's number, for the exit status); a second signal while the
/// first one's cleanup runs ends the process at once, as the signal would by default. Only the
/// commands that check the handle install this: the others keep the default actions.
fn cancel_on_signals() -> anyhow::Result<Cancel> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let signal = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so that it sees whether an earlier signal came before this one.
        flag::register_conditional_default(sig, Arc::clone(&received))?;
        flag::register(sig, Arc::clone(&received))?;
        flag::register_usize(sig, Arc::clone(&signal), sig as usize)?;
    }
    Ok(Cancel::new(signal))
}

fn main() {
    // `dlrm train --config FILE` adds the file's flags to the command line before parsing.
    let args =
        commands::runconfig::with_config_file(&Cli::command(), std::env::args_os().collect())
            .unwrap_or_else(|e| {
                exit_with_error(&e);
            });
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Command::Train(args) => {
            let given = matches
                .subcommand_matches("train")
                .expect("the train command's flags");
            cancel_on_signals().and_then(|c| commands::train::run(*args, given, &c))
        }
        Command::Eval(args) => commands::score::run_eval(*args),
        Command::Predict(args) => {
            cancel_on_signals().and_then(|c| commands::score::run_predict(*args, &c))
        }
        Command::Serve(args) => server::run(*args),
        Command::Export(args) => {
            cancel_on_signals().and_then(|c| commands::export::run_export(args, &c))
        }
        Command::Import(args) => commands::export::run_import(args),
        Command::Compare(args) => commands::compare::run(*args),
        Command::Preprocess(args) => {
            cancel_on_signals().and_then(|c| commands::preprocess::run(*args, &c))
        }
        Command::Synth(args) => cancel_on_signals().and_then(|c| commands::synth::run(*args, &c)),
    };
    if let Err(e) = result {
        // An interruption by a signal exits as the shell reports a process the signal killed.
        if let Some(i) = e.downcast_ref::<Interrupted>() {
            eprintln!("{i}");
            std::process::exit(128 + i.reason as i32);
        }
        exit_with_error(&e);
    }
}

/// Prints `error: ...` and exits 1. The line goes out in one write: under `mpirun` the ranks
/// share one stderr, and a line written in pieces interleaves with another rank's.
fn exit_with_error(e: &anyhow::Error) -> ! {
    use std::io::Write;
    let line = format!("error: {}\n", commands::render_error(e));
    let _ = std::io::stderr().write_all(line.as_bytes());
    std::process::exit(1);
}
