//! A training run's records in `--log-dir`: `config.json` (the resolved settings and where the
//! run ran), `metrics.csv` (a row per report interval and per evaluation) and TensorBoard
//! scalar events, so that runs can be compared side by side. The training loop reports to a
//! [`Recorder`] as it does to the console; nothing here runs inside the loop's own code.

use super::tfevents::EventWriter;
use anyhow::{Context, Result};
use dlrm::metrics::EvalMetrics;
use dlrm::train::{IntervalReport, TrainObserver};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The columns of metrics.csv: `kind` is `train` (a report interval: lr, train loss,
/// samples/s) or `eval` (an evaluation on the held-out data: loss, accuracy, AUC, NE, and RMSE
/// for regression); a row leaves the other kind's cells empty.
pub const METRICS_COLUMNS: [&str; 11] = [
    "kind",
    "step",
    "epoch",
    "lr",
    "train_loss",
    "samples_per_sec",
    "test_loss",
    "accuracy",
    "auc",
    "ne",
    "rmse",
];

/// Writes a run's records as the run reports its progress. Write errors cannot stop the
/// training loop from inside an observer: the first one is kept and returned by
/// [`Recorder::finish`].
pub struct Recorder {
    csv: csv::Writer<File>,
    csv_path: PathBuf,
    events: EventWriter,
    epoch: u64,
    error: Option<anyhow::Error>,
}

/// The CPU model as /proc/cpuinfo names it (None where it is absent).
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// The commit the binary was built from (set by build.rs), when it was built in a git checkout.
pub fn git_commit() -> Option<&'static str> {
    option_env!("DLRM_GIT_COMMIT")
}

/// What config.json holds: the resolved `settings` (flag names as keys, as `--config` takes
/// them), the version, the CPU model, the thread count, the git commit when known, and the
/// command line.
pub fn run_config(settings: &toml::Table, threads: usize) -> Result<serde_json::Value> {
    let mut config = serde_json::json!({
        "dlrm_version": env!("CARGO_PKG_VERSION"),
        "cpu_model": cpu_model(),
        "threads": threads,
        "command_line": std::env::args().collect::<Vec<_>>(),
        "settings": serde_json::to_value(settings)?,
    });
    if let Some(commit) = git_commit() {
        config["git_commit"] = commit.into();
    }
    Ok(config)
}

impl Recorder {
    /// Creates `dir` (if needed) and the records in it, config.json first.
    pub fn create(dir: &Path, config: &serde_json::Value) -> Result<Recorder> {
        let in_dir = |what: &str| format!("--log-dir {}: cannot create {what}", dir.display());
        std::fs::create_dir_all(dir).with_context(|| in_dir("the folder"))?;
        let json = serde_json::to_string_pretty(config)? + "\n";
        std::fs::write(dir.join("config.json"), json).with_context(|| in_dir("config.json"))?;
        let csv_path = dir.join("metrics.csv");
        let mut csv = csv::Writer::from_path(&csv_path).with_context(|| in_dir("metrics.csv"))?;
        csv.write_record(METRICS_COLUMNS)?;
        csv.flush()?;
        let events = EventWriter::create(dir).with_context(|| in_dir("the event file"))?;
        Ok(Recorder {
            csv,
            csv_path,
            events,
            epoch: 0,
            error: None,
        })
    }

    /// The first write error of the run, if any.
    pub fn finish(self) -> Result<()> {
        self.error.map_or(Ok(()), Err)
    }

    /// Keeps the first error of a write.
    fn keep(&mut self, result: Result<()>) {
        if let Err(e) = result
            && self.error.is_none()
        {
            log::warn!("{e:#}: the run goes on without its records");
            self.error = Some(e);
        }
    }

    /// A metrics.csv row of `cells` (by column) and the same values as TensorBoard scalars
    /// tagged `group/column`.
    fn row(&mut self, group: &str, step: u64, cells: &[(&str, f64)]) -> Result<()> {
        let mut record = vec![String::new(); METRICS_COLUMNS.len()];
        record[0] = group.to_string();
        record[1] = step.to_string();
        record[2] = self.epoch.to_string();
        for &(column, value) in cells {
            let i = METRICS_COLUMNS
                .iter()
                .position(|c| *c == column)
                .expect("a metrics.csv column");
            // NaN (an AUC of one class, a classification metric of a regression) stays empty.
            if value.is_finite() {
                record[i] = value.to_string();
                self.events
                    .scalar(&format!("{group}/{column}"), step, value as f32)?;
            }
        }
        let path = &self.csv_path;
        let write = |csv: &mut csv::Writer<File>| -> Result<()> {
            csv.write_record(&record)?;
            Ok(csv.flush()?)
        };
        write(&mut self.csv).with_context(|| format!("writing {}", path.display()))
    }
}

impl TrainObserver for Recorder {
    fn interval(&mut self, r: &IntervalReport) {
        self.epoch = r.epoch;
        // The learning rate's shortest decimal as an f32 (0.1), not its f64 expansion.
        let lr = r.lr.to_string().parse().unwrap_or(f64::NAN);
        let cells = [
            ("lr", lr),
            ("train_loss", r.loss),
            ("samples_per_sec", r.samples_per_sec),
        ];
        let result = self.row("train", r.step, &cells);
        self.keep(result);
    }

    fn evaluated(&mut self, step: u64, m: &EvalMetrics) {
        let mut cells = vec![
            ("test_loss", m.loss),
            ("accuracy", m.accuracy),
            ("auc", m.auc),
            ("ne", m.ne),
        ];
        cells.extend(m.rmse.map(|r| ("rmse", r)));
        let result = self.row("eval", step, &cells);
        self.keep(result);
    }

    fn final_evaluation(&mut self, step: u64, m: &EvalMetrics) {
        self.evaluated(step, m);
    }
}
