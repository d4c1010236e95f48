//! `dlrm serve`: an online scoring server. Requests are parsed on the I/O threads (tokio),
//! queued, scored in micro-batches by a fixed pool of inference threads ([`batcher`]), and
//! answered; the model is reloaded when the checkpoint's LATEST changes or on SIGHUP
//! ([`reload`]); SIGINT or SIGTERM stops it gracefully.

mod batcher;
mod http;
mod metrics;
mod model;
mod reload;

use crate::commands::ThreadArgs;
use anyhow::{Context, Result};
use axum::serve::ListenerExt;
use batcher::Queue;
use clap::Args;
use metrics::Metrics;
use model::Served;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint folder (its LATEST version, reloaded when LATEST changes) or one version
    /// folder.
    #[arg(long)]
    load_model: PathBuf,
    /// Address to listen on (port 0: any free port; the address bound is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Inference threads (each with its own model buffers over the shared tables); as many
    /// threads again serve HTTP.
    #[command(flatten)]
    threads: ThreadArgs,
    /// Most rows scored in one forward pass.
    #[arg(long, default_value_t = 256)]
    max_batch_rows: usize,
    /// Longest a request waits for others to share its forward pass, in microseconds.
    #[arg(long, default_value_t = 200)]
    max_wait_us: u64,
    /// A request not answered within this many milliseconds of its arrival answers 503.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Largest request body accepted (a larger one answers 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Most rows waiting for a forward pass (a request that finds the queue full answers 503).
    #[arg(long, default_value_t = 1 << 16)]
    queue_rows: usize,
    /// Most requests handled at a time, from reading the body to the answer (others answer
    /// 503): with --max-body-bytes, what bounds the memory requests hold.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// How often LATEST is checked for a new version, in milliseconds (0: only on SIGHUP).
    #[arg(long, default_value_t = 500)]
    reload_poll_ms: u64,
    /// Load models even if some of their parameters are NaN or infinite.
    #[arg(long)]
    allow_non_finite: bool,
}

/// What the handlers share.
pub struct App {
    current: RwLock<Arc<Served>>,
    queue: Queue,
    metrics: Metrics,
    /// Permits to handle a request (`--max-in-flight`).
    bodies: tokio::sync::Semaphore,
    max_body_bytes: usize,
    timeout: Duration,
}

impl App {
    /// The version serving now; a request keeps the one it started with.
    fn current(&self) -> Arc<Served> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn swap(&self, served: Served) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(served);
    }
}

fn check(a: &ServeArgs) -> Result<()> {
    for (flag, value) in [
        ("--max-batch-rows", a.max_batch_rows as u64),
        ("--timeout-ms", a.timeout_ms),
        ("--max-body-bytes", a.max_body_bytes as u64),
        ("--queue-rows", a.queue_rows as u64),
        ("--max-in-flight", a.max_in_flight as u64),
    ] {
        anyhow::ensure!(value > 0, "{flag} 0: must be at least 1");
    }
    anyhow::ensure!(
        a.queue_rows >= a.max_batch_rows,
        "--queue-rows {} is less than --max-batch-rows {}: a full batch could never wait",
        a.queue_rows,
        a.max_batch_rows
    );
    Ok(())
}

pub fn run(a: ServeArgs) -> Result<()> {
    check(&a)?;
    let threads = a.threads.count()?;
    let load = reload::Loader {
        checkpoint: a.load_model.clone(),
        threads,
        max_batch_rows: a.max_batch_rows,
        allow_non_finite: a.allow_non_finite,
    };
    let served = load.load()?;
    log::info!(
        "serving {} (step {}) on {threads} inference threads",
        served.version.display(),
        served.meta.train_state.step
    );
    let max_wait = Duration::from_micros(a.max_wait_us);
    let app = Arc::new(App {
        current: RwLock::new(Arc::new(served)),
        queue: Queue::new(a.queue_rows, a.max_batch_rows, max_wait),
        metrics: Metrics::default(),
        bodies: tokio::sync::Semaphore::new(a.max_in_flight),
        max_body_bytes: a.max_body_bytes,
        timeout: Duration::from_millis(a.timeout_ms),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the HTTP threads")?;
    let inference: Vec<_> = (0..threads)
        .map(|i| {
            let app = Arc::clone(&app);
            std::thread::Builder::new()
                .name(format!("inference-{i}"))
                .spawn(move || batcher::run_inference(&app.queue, i, &app.metrics))
                .context("starting an inference thread")
        })
        .collect::<Result<_>>()?;
    let poll = (a.reload_poll_ms > 0).then(|| Duration::from_millis(a.reload_poll_ms));
    let watcher = reload::Watcher::start(Arc::clone(&app), load, poll)?;
    let served = runtime.block_on(serve(Arc::clone(&app), a.listen, watcher.waker()));
    // Every connection is closed: no request can queue more; the threads drain the queue.
    app.queue.close();
    for thread in inference {
        let _ = thread.join();
    }
    watcher.stop();
    served?;
    log::info!(
        "stopped; peak resident memory {:.1} MiB",
        dlrm::train::peak_rss_bytes() as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Serves HTTP on `listen` until SIGINT or SIGTERM, then finishes the requests in flight;
/// SIGHUP asks `reload` for a reload.
async fn serve(app: Arc<App>, listen: SocketAddr, reload: reload::Waker) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}: cannot listen"))?;
    let bound = listener.local_addr()?;
    // On stdout, for whoever started the server on port 0 to read.
    println!("listening on {bound}");
    log::info!("listening on http://{bound}");
    let mut hangup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            reload.wake();
        }
    });
    let stop = async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        log::info!("{name}: finishing the requests in flight");
    };
    // Answers go out at once, not held back to coalesce with the next (Nagle's algorithm).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            log::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, http::router(app))
        .with_graceful_shutdown(stop)
        .await
        .context("serving HTTP")
}
