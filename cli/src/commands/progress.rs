//! A training run on the terminal: a progress bar when stderr is one, plain lines otherwise
//! (logs and pipes), through `log` so that --quiet silences both.

use dlrm::data::preprocess::{PassObserver, Progress};
use dlrm::metrics::EvalMetrics;
use dlrm::train::{IntervalReport, TrainObserver};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct Console {
    bar: ProgressBar,
    interactive: bool,
}

impl Console {
    pub fn new() -> Console {
        Console {
            bar: ProgressBar::hidden(),
            interactive: super::show_progress(),
        }
    }

    /// A line above the bar, or on its own.
    fn line(&self, text: String) {
        if self.interactive {
            self.bar.println(text);
        } else {
            log::info!("{text}");
        }
    }
}

impl TrainObserver for Console {
    fn started(&mut self, first_step: u64, total_steps: u64) {
        if self.interactive {
            self.bar = ProgressBar::new(total_steps);
            self.bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  ETA {eta}  {msg}",
                )
                .expect("valid template"),
            );
            self.bar.set_position(first_step);
            // The rate, and so the ETA, counts this run's steps only, not a resumed run's.
            self.bar.reset_eta();
        }
    }

    fn stepped(&mut self, _step: u64) {
        self.bar.inc(1);
    }

    fn interval(&mut self, r: &IntervalReport) {
        if self.interactive {
            self.bar.set_message(format!(
                "loss {:.5}  {:.0} samples/s",
                r.loss, r.samples_per_sec
            ));
        } else {
            log::info!(
                "step {}/{} (epoch {}): loss {:.6}, {:.2} ms/step, {:.0} samples/s",
                r.step,
                r.total_steps,
                r.epoch,
                r.loss,
                r.ms_per_step,
                r.samples_per_sec
            );
        }
    }

    fn evaluated(&mut self, step: u64, m: &EvalMetrics) {
        self.line(match m.rmse {
            Some(rmse) => format!("step {step}: test MSE {:.5}, RMSE {rmse:.4}", m.loss),
            None => format!(
                "step {step}: test loss {:.5}, accuracy {:.4}, {}",
                m.loss,
                m.accuracy,
                m.auc_and_ne()
            ),
        });
    }

    fn saved(&mut self, step: u64, path: &Path, seconds: f64) {
        self.line(format!(
            "step {step}: saved {} in {seconds:.2} s",
            path.display()
        ));
    }

    fn finished(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Runs `work` (`what`: a step of unknown length, such as initialising tables) with a spinner
/// and the time so far on a terminal, a line beforehand otherwise, so that it is never silent.
pub fn working<T>(what: &str, work: impl FnOnce() -> T) -> T {
    if !super::show_progress() {
        log::info!("{what}...");
        return work();
    }
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}...")
            .expect("valid template"),
    );
    spinner.set_message(what.to_string());
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let result = work();
    spinner.finish_and_clear();
    result
}

/// The passes of preprocessing as a progress bar per pass (bytes done, rows per second).
struct PassBar(Mutex<ProgressBar>);

impl PassBar {
    fn bar(&self) -> std::sync::MutexGuard<'_, ProgressBar> {
        // A panic elsewhere while drawing leaves a bar that is still fit to draw.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl PassObserver for PassBar {
    fn started(&self, what: &'static str, bytes: u64) {
        let bar = ProgressBar::new(bytes);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {decimal_bytes_per_sec} {msg}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(what);
        *self.bar() = bar;
    }

    fn advanced(&self, bytes: u64) {
        self.bar().inc(bytes);
    }

    fn rate(&self, rows_per_sec: f64) {
        self.bar().set_message(format!("{rows_per_sec:.0} rows/s"));
    }

    fn finished(&self) {
        self.bar().finish_and_clear();
    }
}

/// The observer of a preprocessing run: bars when [`super::show_progress`], else none.
pub fn passes() -> Progress {
    if super::show_progress() {
        Progress::new(Arc::new(PassBar(Mutex::new(ProgressBar::hidden()))))
    } else {
        Progress::none()
    }
}
