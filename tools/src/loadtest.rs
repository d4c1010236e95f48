//! `dlrm-loadtest`: requests/s, rows/s and latency percentiles of a `dlrm serve` on this
//! machine, at several numbers of concurrent clients and rows per request. Each client is a
//! thread with one keep-alive HTTP/1.1 connection that sends its next request when the last
//! is answered; every point is bounded in time and in requests. Loopback addresses only.

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "dlrm-loadtest",
    version,
    about = "Load test of a `dlrm serve` on a loopback address: rows/s and p50/p99 latency per number of clients and rows per request"
)]
struct Args {
    /// The server (a loopback address: 127.0.0.0/8 or ::1).
    #[arg(long)]
    addr: SocketAddr,
    /// Criteo lines the requests are made of (taken in turn, each client from its own offset).
    #[arg(long)]
    rows: PathBuf,
    /// Concurrent clients of each point.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 64])]
    clients: Vec<usize>,
    /// Rows per request of each point.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 128])]
    rows_per_request: Vec<usize>,
    /// Measured seconds per point (after --warmup-seconds).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Unmeasured seconds at the start of each point.
    #[arg(long, default_value_t = 0.5)]
    warmup_seconds: f64,
    /// Most requests one client sends per point after the warm-up.
    #[arg(long, default_value_t = 1_000_000)]
    max_requests: usize,
}

/// The most lines read from --rows.
const MAX_LINES: usize = 1 << 16;

/// Clients per point allowed (each is a thread and a connection).
const MAX_CLIENTS: usize = 1024;

/// What one client measured: each answered request's latency (after the warm-up), the
/// requests that failed, and when it stopped.
struct ClientLog {
    latencies: Vec<Duration>,
    /// Requests sent after the warm-up.
    measured: usize,
    failures: u64,
    first_failure: Option<String>,
    finished: Instant,
}

impl Default for ClientLog {
    fn default() -> ClientLog {
        ClientLog {
            latencies: Vec::new(),
            measured: 0,
            failures: 0,
            first_failure: None,
            finished: Instant::now(),
        }
    }
}

/// One keep-alive connection to the server.
struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    fn open(addr: SocketAddr) -> Result<Connection> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Connection {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Posts `body` to /v1/predict; the status code and the answer's body.
    fn post(&mut self, addr: SocketAddr, body: &[u8], answer: &mut Vec<u8>) -> Result<u16> {
        let head = format!(
            "POST /v1/predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/tab-separated-values\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.writer.write_all(head.as_bytes())?;
        self.writer.write_all(body)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let code = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            ensure!(
                self.reader.read_line(&mut line)? > 0,
                "the server closed the connection"
            );
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = Some(value.trim().parse::<usize>()?);
            }
        }
        let length = length.context("an answer without Content-Length")?;
        answer.resize(length, 0);
        self.reader.read_exact(answer)?;
        Ok(code)
    }
}

/// Request bodies of `n` lines each, from consecutive lines of `lines` (wrapping around).
fn bodies(lines: &[String], n: usize, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut body = Vec::new();
            for j in 0..n {
                body.extend_from_slice(lines[(i * n + j) % lines.len()].as_bytes());
                body.push(b'\n');
            }
            body
        })
        .collect()
}

/// One client's requests until `end` (recording from `measure_from`) or `max_requests`.
fn client(
    addr: SocketAddr,
    bodies: &[Vec<u8>],
    first: usize,
    (measure_from, end): (Instant, Instant),
    max_requests: usize,
) -> Result<ClientLog> {
    let mut connection = Connection::open(addr)?;
    let (mut log, mut answer) = (ClientLog::default(), Vec::new());
    for i in 0.. {
        let sent = Instant::now();
        if sent >= end || log.measured == max_requests {
            break;
        }
        if sent >= measure_from {
            log.measured += 1;
        }
        let code = connection.post(addr, &bodies[(first + i) % bodies.len()], &mut answer)?;
        if code != 200 {
            log.failures += 1;
            log.first_failure
                .get_or_insert_with(|| format!("{code}: {}", String::from_utf8_lossy(&answer)));
        } else if sent >= measure_from {
            log.latencies.push(sent.elapsed());
        }
    }
    log.finished = Instant::now();
    Ok(log)
}

/// The `q`-quantile of sorted latencies, in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// Runs one point: `clients` clients sending `n`-row requests.
fn point(a: &Args, lines: &[String], clients: usize, n: usize) -> Result<()> {
    let bodies = bodies(lines, n, (lines.len() / n).clamp(1, 4096));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(a.warmup_seconds);
    let end = measure_from + Duration::from_secs_f64(a.seconds);
    let logs: Vec<Result<ClientLog>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let first = c * bodies.len() / clients;
                let bodies = &bodies;
                scope.spawn(move || {
                    client(a.addr, bodies, first, (measure_from, end), a.max_requests)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a client panicked")))
            .collect()
    });
    let logs = logs.into_iter().collect::<Result<Vec<_>>>()?;
    // Until the last client stopped (at --max-requests, or at the end).
    let stopped = logs.iter().map(|l| l.finished).max().unwrap_or(end);
    let seconds = stopped.min(end).duration_since(measure_from).as_secs_f64();
    let mut latencies: Vec<Duration> = logs
        .iter()
        .flat_map(|l| l.latencies.iter().copied())
        .collect();
    latencies.sort_unstable();
    let failures: u64 = logs.iter().map(|l| l.failures).sum();
    let requests = latencies.len() as f64;
    println!(
        "{clients:>7} {n:>9} {:>10.0} {:>11.0} {:>8.3} {:>8.3} {failures:>8}",
        requests / seconds,
        requests * n as f64 / seconds,
        quantile_ms(&latencies, 0.5),
        quantile_ms(&latencies, 0.99),
    );
    if let Some(first) = logs.iter().find_map(|l| l.first_failure.as_ref()) {
        eprintln!("first failure: {first}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        a.addr.ip().is_loopback(),
        "--addr {}: only loopback addresses (127.0.0.0/8, ::1) are load-tested",
        a.addr
    );
    ensure!(
        a.seconds > 0.0
            && a.seconds <= 600.0
            && a.warmup_seconds >= 0.0
            && a.warmup_seconds <= 60.0,
        "--seconds must be in (0, 600] and --warmup-seconds in [0, 60]"
    );
    if let Some(c) = a.clients.iter().find(|&&c| c == 0 || c > MAX_CLIENTS) {
        bail!("--clients {c}: must be 1 to {MAX_CLIENTS}");
    }
    ensure!(
        !a.rows_per_request.contains(&0),
        "--rows-per-request 0: must be at least 1"
    );
    let file = std::fs::File::open(&a.rows)
        .with_context(|| format!("{}: cannot open", a.rows.display()))?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .take(MAX_LINES)
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("{}: cannot read", a.rows.display()))?;
    ensure!(!lines.is_empty(), "{}: no rows", a.rows.display());
    println!(
        "{:>7} {:>9} {:>10} {:>11} {:>8} {:>8} {:>8}",
        "clients", "rows/req", "requests/s", "rows/s", "p50 ms", "p99 ms", "failed"
    );
    for &n in &a.rows_per_request {
        for &clients in &a.clients {
            point(&a, &lines, clients, n)?;
        }
    }
    Ok(())
}
