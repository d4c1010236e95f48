//! Serving tests' setup: a small trained checkpoint, `dlrm serve` started over loopback, and
//! plain HTTP/1.1 requests to it.

use super::{Scratch, assert_ok, dlrm};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Synthetic Criteo rows (`rows` of them, small vocabularies) in `dir`/rows.tsv, preprocessed
/// into `dir`/ds.
pub fn make_data(dir: &Scratch, rows: u64) {
    let sizes = [
        50, 100, 20, 300, 7, 1000, 30, 60, 10, 500, 40, 80, 90, 100, 5, 6, 7, 8, 9,
    ]
    .iter()
    .chain(&[10, 11, 12, 13, 14, 15, 16])
    .map(|n| n.to_string())
    .collect::<Vec<_>>()
    .join("-");
    let (file, rows) = (dir.arg("rows.tsv"), rows.to_string());
    let args = ["synth", "--format", "criteo-tsv", "--rows", &rows];
    assert_ok(&dlrm(
        &[
            &args[..],
            &["--arch-embedding-size", &sizes, "--out", &file],
        ]
        .concat(),
    ));
    let o = dlrm(&[
        "preprocess",
        &file,
        "--out",
        &dir.arg("ds"),
        "--split",
        "8,1,1",
    ]);
    assert_ok(&o);
}

/// Trains a small model on `dir`/ds for `epochs` epochs into the checkpoint folder `ck`.
pub fn train(dir: &Scratch, ck: &Path, epochs: &str) {
    let ds = dir.arg("ds");
    let mut args = vec!["train", "--dataset", &ds, "--mini-batch-size", "128"];
    args.extend(["--arch-mlp-bot", "13-32-16", "--arch-mlp-top", "16-1"]);
    args.extend(["--nepochs", epochs, "--threads", "2", "--save-model", s(ck)]);
    assert_ok(&dlrm(&args));
}

/// A scratch folder named after `tag` with `rows` synthetic rows (`rows.tsv`, `ds`) and a
/// model trained on them for one epoch in its checkpoint folder `ck`; returns the folder, the
/// checkpoint folder and the first row of `rows.tsv` (labelled).
pub fn trained_model(tag: &str, rows: u64) -> (Scratch, PathBuf, String) {
    let dir = Scratch::new(tag);
    make_data(&dir, rows);
    let ck = dir.path("ck");
    train(&dir, &ck, "1");
    let text = std::fs::read_to_string(dir.path("rows.tsv")).unwrap();
    let first = text.lines().next().unwrap().to_string();
    (dir, ck, first)
}

/// A running `dlrm serve`: its address, and its stderr as far as it has come.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(ck: &Path, extra: &[&str]) -> Server {
        let args = ["serve", "--load-model", s(ck), "--listen", "127.0.0.1:0"];
        let mut child = Command::new(env!("CARGO_BIN_EXE_dlrm"))
            .args([&args[..], &["--threads", "2"], extra].concat())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dlrm serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (mut stderr, sink) = (child.stderr.take().unwrap(), Arc::clone(&log));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut line = String::new();
        let mut stdout: BufReader<ChildStdout> = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("no address: {line:?} {}", log.lock().unwrap()))
            .trim()
            .to_string();
        Server { child, addr, log }
    }

    /// One request on its own connection: the status code and the body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, String) {
        request_to(&self.addr, method, path, content_type, body)
    }

    pub fn post(&self, content_type: &str, body: &[u8]) -> (u16, String) {
        self.request("POST", "/v1/predict", content_type, body)
    }

    pub fn get(&self, path: &str) -> String {
        let (code, body) = self.request("GET", path, "", b"");
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill takes plain integers; the child has not been waited for, so its pid is
        // ours.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Sends SIGTERM and returns the exit code (waiting at most 20 s).
    pub fn stop(self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        self.stop_after_signal()
    }

    /// Waits (at most 20 s) for the exit a signal already sent asked for.
    pub fn stop_after_signal(mut self) -> Option<i32> {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < until, "the server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn request_to(addr: &str, method: &str, path: &str, kind: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let kind = match kind {
        "" => String::new(),
        k => format!("Content-Type: {k}\r\n"),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{kind}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) and close before it has read all of a large body.
    let _ = stream.write_all(body);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_string())
}
