//! Hot reload: a thread watches the checkpoint's LATEST (every `--reload-poll-ms`) and
//! reloads on a change or on SIGHUP; the new version is loaded beside the old one and swapped
//! in atomically, and a version that fails to load leaves the old one serving.

use super::App;
use super::model::Served;
use anyhow::{Context, Result};
use dlrm::checkpoint::LATEST;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

/// How to load the checkpoint served.
pub struct Loader {
    pub checkpoint: PathBuf,
    pub threads: usize,
    pub max_batch_rows: usize,
    pub allow_non_finite: bool,
}

impl Loader {
    pub fn load(&self) -> Result<Served> {
        let (t, rows, non_finite) = (self.threads, self.max_batch_rows, self.allow_non_finite);
        Served::load(&self.checkpoint, t, rows, non_finite)
    }

    /// What LATEST says now (None for a version folder, or a LATEST that cannot be read).
    fn latest(&self) -> Option<String> {
        std::fs::read_to_string(self.checkpoint.join(LATEST)).ok()
    }
}

enum Wake {
    Reload,
    Stop,
}

/// Asks the watcher for a reload.
pub struct Waker(SyncSender<Wake>);

impl Waker {
    pub fn wake(&self) {
        // A reload already asked for covers this one.
        let _ = self.0.try_send(Wake::Reload);
    }
}

pub struct Watcher {
    wake: SyncSender<Wake>,
    thread: JoinHandle<()>,
}

impl Watcher {
    pub fn start(app: Arc<App>, loader: Loader, poll: Option<Duration>) -> Result<Watcher> {
        let (wake, wakes) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || watch(&app, &loader, poll, &wakes))
            .context("starting the reload thread")?;
        Ok(Watcher { wake, thread })
    }

    pub fn waker(&self) -> Waker {
        Waker(self.wake.clone())
    }

    pub fn stop(self) {
        // A full channel holds a reload the thread takes before it sees the channel close.
        if let Err(TrySendError::Full(_)) = self.wake.try_send(Wake::Stop) {
            let _ = self.wake.send(Wake::Stop);
        }
        let _ = self.thread.join();
    }
}

fn watch(app: &App, loader: &Loader, poll: Option<Duration>, wakes: &Receiver<Wake>) {
    let mut seen = loader.latest();
    // A year stands for "never" where only SIGHUP reloads.
    let period = poll.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    loop {
        let asked = match wakes.recv_timeout(period) {
            Ok(Wake::Reload) => true,
            Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => false,
        };
        let latest = loader.latest();
        if !asked && (latest.is_none() || latest == seen) {
            continue;
        }
        // A version that fails is not tried again until LATEST changes or SIGHUP asks.
        seen = latest;
        reload(app, loader, if asked { "SIGHUP" } else { "LATEST changed" });
    }
}

fn reload(app: &App, loader: &Loader, why: &str) {
    let old = app.current();
    match loader.load() {
        Ok(served) => {
            log::info!(
                "{why}: serving {} (step {}) instead of {}",
                served.version.display(),
                served.meta.train_state.step,
                old.name
            );
            app.swap(served);
            app.metrics.reload(true);
        }
        Err(e) => {
            log::error!(
                "{why}: cannot load {}: {}; still serving {}",
                loader.checkpoint.display(),
                crate::commands::render_error(&e),
                old.name
            );
            app.metrics.reload(false);
        }
    }
}
