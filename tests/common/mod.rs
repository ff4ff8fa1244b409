//! Shared helpers of the end-to-end tests: a real broker in-process (`TestBroker`, served by
//! `octolog_broker::server::run` on `127.0.0.1:0` with a temp data dir), the real `octolog`
//! binary as a broker process (`BrokerProcess`) and as a command-line tool (`octolog`).
//!
//! Nothing here sleeps to synchronise: helpers wait on real events (a line printed, a process
//! exiting, a future resolving), each wait bounded by a timeout that fails the test loudly.

#![allow(dead_code)] // Each test file uses a different subset.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use octolog_broker::{Broker, BrokerConfig};
use octolog_client::{Client, Consumer, ConsumerBuilder, ConsumerRecord, Offset, StartAt};
use octolog_proto::v1::octolog_client::OctologClient;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest any single wait in a test may take before the test fails. Generous, because a
/// debug build on a busy 2-core machine is slow; a healthy run never comes close.
pub const WAIT: Duration = Duration::from_secs(30);

/// The `octolog` binary built for these tests.
pub const OCTOLOG: &str = env!("CARGO_BIN_EXE_octolog");

/// Waits for `future`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<F: std::future::IntoFuture>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future.into_future()).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A broker served in-process on `127.0.0.1:0` with its own data folder.
#[derive(Debug)]
pub struct TestBroker {
    addr: SocketAddr,
    /// The data folder; the server task owns its `TempDir` and removes it only once the broker
    /// has closed, so that a broker still shutting down never writes into a folder being
    /// removed (which left folders behind in the system's temp dir).
    dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<(octolog_broker::Result<()>, TempDir)>>,
}

impl TestBroker {
    /// A broker with default settings on a fresh temp dir.
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// A broker on a fresh temp dir, with settings changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, configure).await
    }

    /// A broker on an existing data folder (e.g. one returned by [`TestBroker::stop`]).
    pub async fn start_in(dir: TempDir, configure: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
        let mut config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..BrokerConfig::default()
        };
        configure(&mut config);
        let broker = tokio::task::spawn_blocking(move || Broker::open(config))
            .await
            .expect("open task")
            .expect("broker opens its data folder");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let (shutdown, signal) = oneshot::channel::<()>();
        let path = dir.path().to_path_buf();
        let task = tokio::spawn(async move {
            let served = octolog_broker::server::run(listener, Arc::new(broker), async move {
                // A dropped sender (test panicked) also shuts the broker down.
                let _ = signal.await;
            })
            .await;
            (served, dir)
        });
        TestBroker {
            addr,
            dir: path,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// `HOST:PORT` of the broker.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// A client connected to the broker.
    pub async fn client(&self) -> Client {
        within("client connect", Client::connect(self.addr()))
            .await
            .expect("client connects")
    }

    /// A raw gRPC client, for requests the client crate would never send.
    pub async fn rpc(&self) -> OctologClient<tonic::transport::Channel> {
        within(
            "raw connect",
            OctologClient::connect(format!("http://{}", self.addr)),
        )
        .await
        .expect("raw gRPC client connects")
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
    }

    /// Shuts the broker down gracefully, asserts it closed cleanly, and hands back its data
    /// folder for a restart.
    pub async fn stop(mut self) -> TempDir {
        let _ = self.shutdown.take().expect("running").send(());
        let task = self.task.take().expect("running");
        let (served, dir) = within("broker shutdown", task).await.expect("server task");
        served.expect("broker shuts down cleanly");
        dir
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Reads every partition of `topic` from the beginning up to the high watermark each had when
/// the call started; returns the records per partition, in the order received.
pub async fn consume_all(client: &Client, topic: &str) -> BTreeMap<u32, Vec<ConsumerRecord>> {
    let info = client
        .admin()
        .describe_topic(topic)
        .await
        .expect("describe");
    let ends: BTreeMap<u32, Offset> = info
        .partitions()
        .iter()
        .map(|p| (p.partition(), p.high_watermark()))
        .collect();
    let mut consumer =
        from_beginning(client, topic, |b| b.max_wait(Duration::from_millis(100))).await;
    let mut out: BTreeMap<u32, Vec<ConsumerRecord>> = ends.keys().map(|&p| (p, vec![])).collect();
    let done = |consumer: &octolog_client::Consumer| {
        ends.iter()
            .all(|(&p, &end)| consumer.position(p).is_some_and(|pos| pos >= end))
    };
    within("consuming to the high watermark", async {
        while !done(&consumer) {
            for record in consumer.poll().await.expect("poll") {
                out.get_mut(&record.partition())
                    .expect("assigned partition")
                    .push(record);
            }
        }
    })
    .await;
    out
}

/// Asserts that `records` (one partition, in the order received) carry offsets `0..n`
/// without gaps.
pub fn assert_dense(partition: u32, records: &[ConsumerRecord]) {
    for (i, record) in records.iter().enumerate() {
        assert_eq!(
            record.offset(),
            Offset(i as u64),
            "partition {partition}: record {i} has offset {}",
            record.offset()
        );
    }
}

/// The value of a record as text.
pub fn value_text(record: &ConsumerRecord) -> String {
    String::from_utf8(record.value().expect("value").to_vec()).expect("utf-8 value")
}

/// The exit, output and error output of a finished `octolog` command.
#[derive(Debug)]
pub struct Run {
    /// The exit code; `None` if a signal ended the process.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Asserts exit 0 and returns standard output.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "command failed: {self:?}");
        &self.stdout
    }

    /// Asserts `code` and a single line `error: ...` on standard error containing `needle`.
    pub fn fails(&self, code: i32, needle: &str) {
        assert_eq!(self.code, Some(code), "{self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one error line expected: {self:?}");
        assert!(lines[0].starts_with("error: "), "{self:?}");
        assert!(
            lines[0].contains(needle),
            "error should mention {needle:?}: {self:?}"
        );
        assert!(!self.stderr.contains("panicked"), "{self:?}");
    }

    /// Standard output parsed as one JSON value per line.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }
}

/// Sends `signal` (a name kill(1) knows, e.g. `TERM`, `KILL`) to process `pid`; whether it
/// was delivered.
fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the `octolog` binary with `args`, feeding it `stdin`; fails the test if it does not
/// exit within [`WAIT`].
pub fn octolog(args: &[&str], stdin: &[u8]) -> Run {
    let mut child = Command::new(OCTOLOG)
        .args(args)
        .env_remove("OCTOLOG_BROKER")
        .env_remove("OCTOLOG_DATA_DIR")
        .env_remove("OCTOLOG_LISTEN")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn octolog");
    let pid = child.id();
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    // A command may exit before reading its input (e.g. on bad usage): ignore broken pipes.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(WAIT) {
        Ok(status) => status.expect("wait for octolog"),
        Err(_) => {
            let _ = send_signal(pid, "KILL");
            panic!("octolog {args:?} did not exit within {WAIT:?}");
        }
    };
    let _ = writer.join();
    let stdout = String::from_utf8(out_reader.join().expect("stdout reader")).expect("utf-8");
    let stderr = String::from_utf8(err_reader.join().expect("stderr reader")).expect("utf-8");
    Run {
        code: status.code(),
        stdout,
        stderr,
    }
}

/// An `octolog` command running in the background, its output read line by line as it comes.
#[derive(Debug)]
pub struct OctologProcess {
    pid: u32,
    /// Receives standard output, one line at a time, as the process writes it.
    lines: mpsc::Receiver<String>,
    /// Receives the exit status once the process ends.
    exited: mpsc::Receiver<std::io::Result<ExitStatus>>,
    /// Set once the exit status has been received.
    status: Option<ExitStatus>,
    /// Everything the process wrote to stderr, for failure messages.
    stderr: Arc<Mutex<String>>,
}

impl OctologProcess {
    /// Starts `octolog ARGS...` with no standard input.
    pub fn spawn(args: &[&std::ffi::OsStr]) -> OctologProcess {
        let mut child = Command::new(OCTOLOG)
            .args(args)
            .env_remove("OCTOLOG_BROKER")
            .env_remove("OCTOLOG_DATA_DIR")
            .env_remove("OCTOLOG_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn octolog");
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        let stderr_pipe = child.stderr.take().expect("stderr");
        let (lines_tx, lines) = mpsc::channel();
        // Keep draining both pipes so the process never blocks on a full one.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines_tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        let (exit_tx, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = exit_tx.send(child.wait());
        });
        OctologProcess {
            pid,
            lines,
            exited,
            status: None,
            stderr,
        }
    }

    /// The next line of standard output; `None` once the process closed it.
    pub fn next_line(&self) -> Option<String> {
        match self.lines.recv_timeout(WAIT) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("no output line within {WAIT:?}; stderr:\n{}", self.stderr())
            }
        }
    }

    /// The next line of standard output if one comes within `timeout`; `None` otherwise
    /// (also once the process closed it).
    pub fn try_next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        assert!(self.status.is_none(), "the process has already exited");
        assert!(send_signal(self.pid, signal), "kill -s {signal} failed");
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let status = match self.exited.recv_timeout(WAIT) {
            Ok(status) => status.expect("wait for the process"),
            Err(_) => panic!(
                "process did not exit within {WAIT:?}; stderr:\n{}",
                self.stderr()
            ),
        };
        self.status = Some(status);
        status
    }
}

impl Drop for OctologProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Ok(status) = self.exited.try_recv() {
                self.status = status.ok();
            } else {
                let _ = send_signal(self.pid, "KILL");
                let _ = self.exited.recv_timeout(WAIT);
            }
        }
    }
}

/// The `octolog serve` binary running as a child process.
#[derive(Debug)]
pub struct BrokerProcess {
    process: OctologProcess,
    addr: String,
}

impl BrokerProcess {
    /// Starts `octolog serve --listen 127.0.0.1:0 --data-dir DIR` plus `args`, and waits for
    /// its `octolog listening on ADDR` line.
    pub fn spawn(dir: &Path, args: &[&str]) -> BrokerProcess {
        let mut all: Vec<&std::ffi::OsStr> = ["serve", "--listen", "127.0.0.1:0", "--data-dir"]
            .iter()
            .map(std::ffi::OsStr::new)
            .collect();
        all.push(dir.as_os_str());
        all.extend(args.iter().map(std::ffi::OsStr::new));
        let process = OctologProcess::spawn(&all);
        let Some(line) = process.next_line() else {
            panic!("broker printed no address; stderr:\n{}", process.stderr());
        };
        let addr = line
            .strip_prefix("octolog listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        assert!(
            addr.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0),
            "{line:?}"
        );
        BrokerProcess { process, addr }
    }

    /// `HOST:PORT` the broker listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What the broker wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`, ...) to the broker.
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    /// Waits for the broker to exit and returns its status.
    pub fn wait(&mut self) -> ExitStatus {
        self.process.wait()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal("KILL");
        self.wait()
    }
}

/// Runs `octolog --broker ADDR ARGS...` against `broker` with `stdin`.
pub fn run(broker: &BrokerProcess, args: &[&str], stdin: &str) -> Run {
    let mut all = vec!["--broker", broker.addr()];
    all.extend_from_slice(args);
    octolog(&all, stdin.as_bytes())
}

/// A broker process on a fresh temp dir (kept alive by the returned `TempDir`).
pub fn start() -> (TempDir, BrokerProcess) {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = BrokerProcess::spawn(dir.path(), &[]);
    (dir, broker)
}

/// Runs `future` to completion on a fresh current-thread runtime (for synchronous tests that
/// also need the client crate).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// A consumer of every partition of `topic` from the beginning, with the settings `configure`
/// makes on the builder.
pub async fn from_beginning(
    client: &Client,
    topic: &str,
    configure: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder,
) -> Consumer {
    let mut consumer = configure(client.consumer(topic))
        .build()
        .await
        .expect("consumer");
    consumer
        .assign_all(StartAt::Beginning)
        .await
        .expect("assign");
    consumer
}
