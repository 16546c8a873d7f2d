//! Load benchmark: agentcast (over WebSocket, and over Server-Sent Events as
//! `agentcast-sse`) next to nats-server's own WebSocket listener and a
//! broker-less WebSocket fan-out (the machine's ceiling), same workload,
//! same nats-server, same machine, in one run.
//!
//! `cargo bench --bench load -- --preset chat [options]`
//!
//! Presets (each option below overrides the preset's value):
//! - `chat`: 10k sockets, 5k users (two sockets each), 20k events/s of 300
//!   bytes for 30 s, published through JetStream.
//! - `max`: the chat sockets; the rate doubles from 20k events/s until a step
//!   loses an event, its p99 exceeds 50 ms or the publisher falls behind,
//!   then halves the interval twice: the highest sustained rate.
//! - `idle`: 50k sockets, 25k users, nothing published: memory per socket.
//! - `storm`: agentcast only (the peers keep no history). 10k sockets on one
//!   node; the node is killed with SIGKILL, 20 events per user are published,
//!   and every socket resumes on a second node: time until all are whole.
//! - `flood`: agentcast only. 2,000 sockets of 1,000 users read 2,000
//!   events/s of 300 bytes while 20 stalled sockets (20 more users) never
//!   read and get 100 events/s of the largest size (256 KiB, the default
//!   `--max-event-bytes`) between them; every 5 s each stalled socket
//!   reconnects, resuming from its first position. Run once without the
//!   flood and once with it: the node's peak RSS against the bound its
//!   flags give, and the reading sockets' latency.
//! - `control`: request-to-reply time of control requests (docs/protocol.md
//!   section 9) through the node, 200 sockets of 200 users sending 1,000
//!   requests/s in all (5 a socket, under the node's default 10/s) of about
//!   100 bytes for 30 s, to a responder in this process; beside the same
//!   requests sent by a NATS client straight to the responder (the floor).
//!   `--targets` does not apply (control.rs).
//! - `tokens`: streamed text (tokens.rs). 1,000 runs of one socket each
//!   stream an answer of 40 tokens/s of 4 bytes for 30 s through the
//!   coalescing `TextStream` (`--coalesce-ms 50`; 0: one event per token);
//!   every 10th socket reads at most 1 KB/s (`--slow-every 10 --slow-bps
//!   1024`). Fast sockets' latency from token creation; slow sockets'
//!   closes, exact texts, bytes and frames per token; JetStream messages per
//!   token. agentcast and nats-ws.
//! - `smoke`: a few hundred sockets, every target, a short chat and a storm,
//!   and a short control run and tokens run; this is what `cargo test` runs (the target
//!   sets `test = true`), so the harness cannot rot.
//!
//! Options: --targets agentcast,agentcast-sse,nats-ws,raw --sockets N --users N --rate N
//! --size BYTES --duration SECS --missed N --stalled N --flood-rate N
//! --coalesce-ms MS --slow-every N --slow-bps N --runs N --out FILE.json
//! --nats-servers N (1; 3 is a cluster of three, the stream with three
//! replicas) --partitions N (1: the users spread over N streams, the nodes'
//! `--stream-partitions` and the servers' account mapping).
//! Every preset runs `--runs` times (3; the smoke run once), each run on
//! fresh processes; the report gives each figure's median, min and max over
//! the runs, and the ratios computed within each run, summarised the same
//! way. nats-server is
//! `$AGENTCAST_BENCH_NATS_SERVER`, else `nats-server` on PATH, else
//! /usr/sbin/nats-server.
//!
//! Processes: the coordinator (this one) starts nats-server, the target's
//! servers, and client worker processes (this binary with `--role worker`);
//! the raw server is this binary with `--role raw`. One process here may hold
//! at most 20,000 open files (hard limit, not raisable in this sandbox), so
//! sockets are spread over `ceil(N / SOCKETS_PER_PROCESS)` worker processes
//! and, on the server side, as many agentcast nodes, raw servers, or (idle
//! only, where no event flows) unclustered nats-servers.
//!
//! Every event carries its user index `u`, a per-user number `n`, and its
//! publish time `t` (Unix ns); workers check each socket receives each `n`
//! of its own user exactly once and in order, and take the latency from `t`.

#[path = "../common/mod.rs"]
mod common;
mod control;
mod raw;
mod sse;
mod tokens;
mod worker;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use common::{cpu_ticks, http_status, rss_kb};

const SECRET: &str = "bench-secret-bench-secret-bench-secret";
/// Sockets per process, on either side: the hard open-file limit here is
/// 20,000, and a node also needs descriptors for NATS and its listener.
const SOCKETS_PER_PROCESS: usize = 16_000;
/// JetStream acknowledgements outstanding at once while publishing.
const MAX_INFLIGHT: usize = 4096;
/// Latency is not recorded for events published in the first seconds of a
/// run (still checked for loss): allocator and connection warm-up.
const WARMUP: Duration = Duration::from_secs(2);
/// The `max` preset's pass criterion, from the issue: p99 under 50 ms.
const MAX_P99_MS: f64 = 50.0;
/// Time sockets get, after all connected, before memory is read: lets the
/// nodes' lazy per-socket work (pings, timers) happen once.
const IDLE_SETTLE: Duration = Duration::from_secs(5);
/// The `flood` preset's events to stalled sockets: the default
/// `--max-event-bytes`, the largest event a node takes by default.
const FLOOD_EVENT_BYTES: usize = 256 * 1024;
/// Flood acknowledgements outstanding at once (8 MiB of events).
const FLOOD_INFLIGHT: usize = 32;
/// How often the node's RSS is sampled during a flood run.
const RSS_SAMPLE: Duration = Duration::from_millis(100);
/// Runs of a preset by default (`--runs`): a figure from one run on a
/// shared two-core machine swings by a factor of several (issue 20), so the
/// README gives the median of three with the min and max beside it.
const DEFAULT_RUNS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    Agentcast,
    /// agentcast's `GET /sse`: the same node, events as Server-Sent Events.
    Sse,
    NatsWs,
    Raw,
    /// The raw fan-out fed by the stream's republish (`raw.rs`).
    RawJs,
}

impl Target {
    fn parse(s: &str) -> Target {
        match s {
            "agentcast" => Target::Agentcast,
            "agentcast-sse" => Target::Sse,
            "nats-ws" => Target::NatsWs,
            "raw" => Target::Raw,
            "raw-js" => Target::RawJs,
            other => panic!("unknown target {other:?} (agentcast, agentcast-sse, nats-ws, raw, raw-js)"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::Agentcast => "agentcast",
            Target::Sse => "agentcast-sse",
            Target::NatsWs => "nats-ws",
            Target::Raw => "raw",
            Target::RawJs => "raw-js",
        }
    }
}

pub fn user(u: usize) -> String {
    format!("user-{u:05}")
}

pub fn token(user: &str) -> String {
    agentcast::auth::mint_hs256(SECRET.as_bytes(), user, Duration::from_secs(24 * 3600)).expect("mint token")
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Latency histogram: 1 µs buckets up to 100 ms, then 1 ms buckets up to
/// 10 minutes; exact enough for p99.9 and mergeable across workers.
pub struct Hist {
    fine: Vec<u64>,
    coarse: Vec<u64>,
}

const HIST_FINE_US: u64 = 100_000;
const HIST_COARSE_MS: u64 = 600_000;

impl Default for Hist {
    fn default() -> Self {
        Hist { fine: vec![0; HIST_FINE_US as usize], coarse: vec![0; HIST_COARSE_MS as usize] }
    }
}

impl Hist {
    pub fn add(&mut self, us: u64) {
        if us < HIST_FINE_US {
            self.fine[us as usize] += 1;
        } else {
            self.coarse[((us / 1000) as usize).min(HIST_COARSE_MS as usize - 1)] += 1;
        }
    }

    /// Non-empty buckets as `[[microseconds, count], ...]`.
    pub fn sparse(&self) -> Value {
        let fine = self.fine.iter().enumerate().filter(|(_, c)| **c > 0).map(|(us, c)| json!([us, c]));
        let coarse = self.coarse.iter().enumerate().filter(|(_, c)| **c > 0).map(|(ms, c)| json!([ms * 1000, c]));
        Value::Array(fine.chain(coarse).collect())
    }
}

/// Merged latencies, in µs.
#[derive(Default)]
struct Latency(BTreeMap<u64, u64>);

impl Latency {
    fn merge(&mut self, sparse: &Value) {
        for pair in sparse.as_array().into_iter().flatten() {
            *self.0.entry(pair[0].as_u64().unwrap_or(0)).or_default() += pair[1].as_u64().unwrap_or(0);
        }
    }

    fn count(&self) -> u64 {
        self.0.values().sum()
    }

    fn pct_ms(&self, p: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((n as f64 * p).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (us, c) in &self.0 {
            seen += c;
            if seen >= rank {
                return *us as f64 / 1000.0;
            }
        }
        f64::NAN
    }

    fn summary(&self) -> Value {
        json!({"samples": self.count(), "p50_ms": self.pct_ms(0.5), "p99_ms": self.pct_ms(0.99),
               "p999_ms": self.pct_ms(0.999), "max_ms": self.pct_ms(1.0)})
    }
}

struct Opts {
    preset: String,
    targets: Vec<Target>,
    sockets: usize,
    users: usize,
    rate: u64,
    size: usize,
    duration: Duration,
    missed: u64,
    /// `flood`: sockets (one user each) that never read.
    stalled: usize,
    /// `flood`: events/s of [`FLOOD_EVENT_BYTES`] to the stalled users.
    flood_rate: u64,
    /// `tokens`: the publisher's coalescing delay; 0 publishes every token.
    coalesce_ms: u64,
    /// `tokens`: every N-th socket is slow (0: none).
    slow_every: usize,
    /// `tokens`: a slow socket's reading rate, bytes/s.
    slow_bps: u64,
    /// Times the whole preset runs, each on fresh processes: the report
    /// gives every figure's median, min and max over them.
    runs: usize,
    out: Option<PathBuf>,
    /// nats-servers in one cluster (1 or 3), and the stream partitions.
    layout: Layout,
}

/// The NATS side of a run: `servers` nats-servers in one cluster (each
/// stream with as many replicas, up to three) and the users spread over
/// `partitions` streams. Set once from the options ([`LAYOUT`]).
#[derive(Debug, Clone, Copy)]
struct Layout {
    servers: usize,
    partitions: u32,
}

/// The run's [`Layout`], read where nats-servers, streams and nodes start.
static LAYOUT: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();

fn layout() -> Layout {
    *LAYOUT.get().unwrap_or(&Layout { servers: 1, partitions: 1 })
}

fn opts(args: &[String], smoke: bool) -> Opts {
    let preset = if smoke { "smoke".to_owned() } else { flag(args, "--preset").unwrap_or("chat").to_owned() };
    let all = vec![Target::Agentcast, Target::Sse, Target::NatsWs, Target::Raw, Target::RawJs];
    let mut o = Opts {
        preset: preset.clone(),
        targets: all,
        sockets: 10_000,
        users: 5_000,
        rate: 20_000,
        size: 300,
        duration: Duration::from_secs(30),
        missed: 20,
        stalled: 0,
        flood_rate: 0,
        coalesce_ms: 50,
        slow_every: 10,
        slow_bps: 1024,
        runs: if smoke { 1 } else { DEFAULT_RUNS },
        out: None,
        layout: Layout { servers: 1, partitions: 1 },
    };
    match preset.as_str() {
        "chat" | "max" => {}
        // Two sockets per user, as in chat.
        "idle" => (o.sockets, o.users) = (50_000, 25_000),
        "storm" => o.targets = vec![Target::Agentcast],
        "flood" => {
            (o.sockets, o.users, o.rate, o.stalled, o.flood_rate) = (2_000, 1_000, 2_000, 20, 100);
            o.targets = vec![Target::Agentcast];
        }
        "control" => {
            o.targets = vec![Target::Agentcast];
            (o.sockets, o.users, o.rate, o.size) = (200, 200, 1_000, 100);
        }
        "tokens" => {
            (o.sockets, o.users, o.rate, o.size) = (1_000, 1_000, 40, tokens::TOKEN_BYTES);
            o.targets = vec![Target::Agentcast, Target::NatsWs];
        }
        "smoke" => (o.sockets, o.users, o.rate, o.duration) = (400, 200, 1_000, Duration::from_secs(3)),
        other => panic!("unknown preset {other:?} (chat, max, idle, storm, flood, control, tokens, smoke)"),
    }
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue;
        }
        let val = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let num = || val.parse::<u64>().unwrap_or_else(|_| panic!("{flag}: not a number: {val}"));
        match flag.as_str() {
            "--preset" => {}
            "--targets" => o.targets = val.split(',').map(Target::parse).collect(),
            "--sockets" => o.sockets = num() as usize,
            "--users" => o.users = num() as usize,
            "--rate" => o.rate = num(),
            "--size" => o.size = num() as usize,
            "--duration" => o.duration = Duration::from_secs(num()),
            "--missed" => o.missed = num(),
            "--stalled" => o.stalled = num() as usize,
            "--flood-rate" => o.flood_rate = num(),
            "--coalesce-ms" => o.coalesce_ms = num(),
            "--slow-every" => o.slow_every = num() as usize,
            "--slow-bps" => o.slow_bps = num(),
            "--runs" => o.runs = (num() as usize).max(1),
            "--nats-servers" => o.layout.servers = num().clamp(1, 3) as usize,
            "--partitions" => o.layout.partitions = (num() as u32).clamp(1, agentcast::partition::MAX_PARTITIONS),
            "--out" => o.out = Some(PathBuf::from(val)),
            other => panic!("unknown option {other}"),
        }
    }
    o
}

/// A child process killed on drop.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id().unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// `$AGENTCAST_BENCH_NATS_SERVER`, else (under `cargo test`) the tests'
/// `$AGENTCAST_TEST_NATS_SERVER`, else `nats-server` on PATH, else Debian's.
fn nats_bin() -> String {
    ["AGENTCAST_BENCH_NATS_SERVER", "AGENTCAST_TEST_NATS_SERVER"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path).map(|d| d.join("nats-server")).find(|p| p.is_file())?;
            Some("nats-server".into())
        })
        .unwrap_or_else(|| "/usr/sbin/nats-server".into())
}

fn nats_version() -> String {
    std::process::Command::new(nats_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The account mapping that spreads users over `partitions` streams, as a
/// line of nats-server's configuration; none for one.
fn mapping_conf(partitions: u32) -> String {
    if partitions == 1 {
        return String::new();
    }
    format!("mappings = {{ {} }}\n", agentcast::partition::mapping("agentcast.events", partitions))
}

/// The layout's nats-servers ([`Layout`]): one, or a cluster whose
/// JetStream has a meta leader.
async fn start_layout() -> Vec<Nats> {
    let l = layout();
    let mapping = mapping_conf(l.partitions);
    if l.servers == 1 {
        return vec![start_nats_with(&mapping).await];
    }
    let ports: Vec<u16> = (0..l.servers)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free port").port())
        .collect();
    let routes = ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(", ");
    let mut servers = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let conf = format!(
            "server_name: n{i}\ncluster {{ name: bench, listen: \"127.0.0.1:{p}\", routes: [{routes}] }}\n{mapping}"
        );
        servers.push(start_nats_with(&conf).await);
    }
    let client = async_nats::connect(&servers[0].url).await.expect("connect to the cluster");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = client.request("$JS.API.INFO", "".into()).await;
        let text = answer.map(|m| String::from_utf8_lossy(&m.payload).into_owned()).unwrap_or_default();
        if text.contains("\"memory\"") && !text.contains("\"error\"") {
            return servers;
        }
        assert!(Instant::now() < deadline, "the cluster's JetStream did not start: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The URLs a node or publisher connects to: every server of the layout.
fn layout_urls(nats: &[Nats]) -> String {
    nats.iter().take(layout().servers).map(|n| n.url.as_str()).collect::<Vec<_>>().join(",")
}

/// A nats-server with JetStream and a WebSocket listener, on random ports.
struct Nats {
    proc: Proc,
    url: String,
    ws: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start_nats() -> Nats {
    start_nats_with("").await
}

/// [`start_nats`], with `extra` lines of configuration.
async fn start_nats_with(extra: &str) -> Nats {
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("nats.conf");
    let store = dir.path().join("js");
    std::fs::write(
        &conf,
        format!(
            "host: 127.0.0.1\nport: -1\njetstream {{ store_dir: {:?} }}\n\
             websocket {{ host: 127.0.0.1, port: -1, no_tls: true }}\n{extra}",
            store.display().to_string()
        ),
    )
    .expect("write nats.conf");
    let child = Command::new(nats_bin())
        .arg("-c")
        .arg(&conf)
        .arg("--ports_file_dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start nats-server ($AGENTCAST_BENCH_NATS_SERVER or nats-server on PATH)");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ports = std::fs::read_dir(dir.path())
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "ports"))
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
            .and_then(|t| serde_json::from_str::<Value>(&t).ok());
        if let Some(p) = ports {
            let url = p["nats"][0].as_str().expect("nats url").to_owned();
            let ws = p["websocket"][0].as_str().expect("websocket url");
            let ws = ws.trim_start_matches("ws://").parse().expect("websocket address");
            return Nats { proc: Proc(child), url, ws, _dir: dir };
        }
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stream_settings() -> agentcast::config::StreamSettings {
    agentcast::config::StreamSettings {
        name: "AGENTCAST".into(),
        partitions: layout().partitions,
        previous: None,
        subject_prefix: "agentcast.events".into(),
        live_prefix: "agentcast.live".into(),
        external: false,
        replicas: layout().servers.min(3),
        max_age: Duration::from_secs(24 * 3600),
        max_bytes: 8 << 30,
        max_per_user: 100_000,
        max_event_bytes: 256 * 1024,
        duplicate_window: Duration::from_secs(120),
    }
}

/// A release agentcast node on port 0.
async fn start_node(nats_url: &str) -> (Proc, SocketAddr) {
    let s = stream_settings();
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(["serve", "--listen", "127.0.0.1:0", "--nats-url", nats_url, "--jwt-secret", SECRET])
        .args(["--stream-max-per-user", &s.max_per_user.to_string(), "--stream-max-bytes", &s.max_bytes.to_string()])
        .args(["--stream-partitions", &s.partitions.to_string(), "--stream-replicas", &s.replicas.to_string()])
        .args(["--max-connections", "200000"])
        .env("AGENTCAST_LOG", "warn,agentcast=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start agentcast");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("node starts")
            .expect("node stderr")
            .expect("node exited");
        if let Some(a) = line.split("listening on ").nth(1) {
            break a.split_whitespace().next().unwrap_or("").parse().expect("node address");
        }
    };
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("  node: {line}");
            }
        }
    });
    while http_status(addr, "/readyz").await != 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (Proc(child), addr)
}

/// This binary again, as a raw fan-out server: fed by the publisher over a
/// WebSocket, or with `nats` (`raw-js`) by the stream's republish.
async fn start_raw(nats: Option<&str>) -> (Proc, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args(["--role", "raw"])
        .args(nats.map(|url| ["--nats", url]).into_iter().flatten())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start raw server");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = lines.next_line().await.expect("raw stdout").expect("raw server exited");
    let addr = line.trim_start_matches("listening on ").parse().expect("raw address");
    (Proc(child), addr)
}

/// A client worker process and its command channel.
struct Worker {
    _proc: Proc,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    async fn send(&mut self, line: &str) {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await.expect("worker stdin");
        self.stdin.flush().await.expect("worker stdin");
    }

    /// The next line starting with `word`, without it.
    async fn expect(&mut self, word: &str) -> String {
        loop {
            let line = self.lines.next_line().await.expect("worker stdout").expect("worker exited");
            if let Some(rest) = line.strip_prefix(word) {
                return rest.trim().to_owned();
            }
        }
    }
}

/// A worker process for sockets `first..first + count`; socket i is user
/// `i % users`'s. `extra`: `--stalled` (its sockets never read) or
/// `--tokens ...` (the tokens preset), see [`worker`]'s doc.
fn spawn_worker(target: Target, addrs: &str, first: usize, count: usize, users: usize, extra: &[String]) -> Worker {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args(["--role", "worker", "--target", target.name(), "--addrs", addrs])
        .args(["--first", &first.to_string(), "--count", &count.to_string(), "--users", &users.to_string()])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start worker");
    let stdin = child.stdin.take().expect("stdin");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    Worker { _proc: Proc(child), stdin, lines }
}

async fn start_workers(target: Target, addrs: &[SocketAddr], sockets: usize, users: usize) -> (Vec<Worker>, Value) {
    let n = sockets.div_ceil(SOCKETS_PER_PROCESS).max(1);
    let addrs = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let mut workers = Vec::new();
    for w in 0..n {
        let first = sockets * w / n;
        let count = sockets * (w + 1) / n - first;
        workers.push(spawn_worker(target, &addrs, first, count, users, &[]));
    }
    ready(workers).await
}

/// Waits for every worker's `ready` line and sums them.
async fn ready(mut workers: Vec<Worker>) -> (Vec<Worker>, Value) {
    let (mut connected, mut failed, mut errors) = (0, 0, Vec::new());
    for w in &mut workers {
        let r: Value = serde_json::from_str(&w.expect("ready").await).expect("ready json");
        connected += r["connected"].as_u64().unwrap_or(0);
        failed += r["failed"].as_u64().unwrap_or(0);
        errors.extend(r["errors"].as_array().cloned().unwrap_or_default());
    }
    (workers, json!({"connected": connected, "failed": failed, "errors": errors}))
}

/// Where events go: JetStream, or the raw server's publish socket.
enum Publisher {
    Js(async_nats::jetstream::Context),
    Raw(tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>),
}

/// What a publishing run did.
struct Published {
    events: u64,
    errors: u64,
    seconds: f64,
}

fn payload(u: usize, n: u64, warm: bool, size: usize) -> String {
    let head =
        format!(r#"{{"type":"agent_thinking","u":{u},"n":{n},"t":{},"w":{},"data":{{"text":""#, now_ns(), warm as u8);
    let pad = size.saturating_sub(head.len() + 3);
    format!("{head}{}\"}}}}", "x".repeat(pad))
}

impl Publisher {
    /// Publishes `rate` events/s, each to a random user, for `duration`.
    /// `next[u]` is how many events user u has had in all (its next `n`),
    /// which is what each of its sockets must hold. Events of the first
    /// `WARMUP` are marked as warm-up.
    async fn run(&mut self, next: &mut [u64], rate: u64, duration: Duration, size: usize) -> Published {
        let start = Instant::now();
        let mut sent = 0u64;
        let mut errors = 0u64;
        let mut acks = futures_util::stream::FuturesUnordered::new();
        while start.elapsed() < duration {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let u = rand::random_range(0..next.len());
                let body = payload(u, next[u], start.elapsed() < WARMUP, size);
                next[u] += 1;
                sent += 1;
                match self {
                    Publisher::Js(js) => {
                        match js.publish(format!("agentcast.events.{}", user(u)), body.into()).await {
                            Ok(ack) => acks.push(ack.into_future()),
                            Err(_) => errors += 1,
                        }
                        while acks.len() >= MAX_INFLIGHT {
                            if let Some(Err(_)) = acks.next().await {
                                errors += 1;
                            }
                        }
                    }
                    Publisher::Raw(ws) => {
                        if ws.feed(format!("{}\n{body}", user(u)).into()).await.is_err() {
                            errors += 1;
                        }
                    }
                }
            }
            if let Publisher::Raw(ws) = self {
                let _ = ws.flush().await;
            }
            // Drain acknowledgements while waiting for the next millisecond.
            let tick = tokio::time::sleep(Duration::from_millis(1));
            tokio::pin!(tick);
            loop {
                tokio::select! {
                    _ = &mut tick => break,
                    Some(r) = acks.next(), if !acks.is_empty() => if r.is_err() { errors += 1 },
                }
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        while let Some(r) = acks.next().await {
            if r.is_err() {
                errors += 1;
            }
        }
        Published { events: sent, errors, seconds }
    }

    /// Publishes `k` events to every user, waiting for each acknowledgement.
    async fn each_user(&mut self, next: &mut [u64], k: u64, size: usize) -> u64 {
        let mut errors = 0;
        for _ in 0..k {
            for (u, n) in next.iter_mut().enumerate() {
                let body = payload(u, *n, true, size);
                *n += 1;
                match self {
                    Publisher::Js(js) => {
                        let subject = format!("agentcast.events.{}", user(u));
                        if let Err(e) = async { js.publish(subject, body.into()).await?.await }.await {
                            eprintln!("  publish failed: {e}");
                            errors += 1;
                        }
                    }
                    Publisher::Raw(ws) => {
                        if ws.send(format!("{}\n{body}", user(u)).into()).await.is_err() {
                            errors += 1;
                        }
                    }
                }
            }
        }
        errors
    }
}

/// Everything a target run starts, so it ends together.
struct Setup {
    nats: Vec<Nats>,
    servers: Vec<Proc>,
    addrs: Vec<SocketAddr>,
    /// Processes whose memory is the target's per-socket cost.
    measured: Vec<u32>,
}

async fn setup(target: Target, sockets: usize, idle: bool) -> Setup {
    let processes = sockets.div_ceil(SOCKETS_PER_PROCESS).max(1);
    let mut s = Setup { nats: start_layout().await, servers: vec![], addrs: vec![], measured: vec![] };
    let client = async_nats::connect(&s.nats[0].url).await.expect("connect to nats-server");
    let js = async_nats::jetstream::new(client);
    for k in 0..layout().partitions {
        agentcast::stream::ensure(&js, &stream_settings(), k).await.expect("create the stream");
    }
    match target {
        Target::Agentcast | Target::Sse => {
            for _ in 0..processes {
                let (p, a) = start_node(&layout_urls(&s.nats)).await;
                s.measured.push(p.pid());
                s.servers.push(p);
                s.addrs.push(a);
            }
        }
        Target::Raw | Target::RawJs => {
            // One connection to the first server: a subscription there gets
            // every republish of the layout.
            let url = s.nats[0].url.clone();
            let nats = (target == Target::RawJs).then_some(url.as_str());
            for _ in 0..processes {
                let (p, a) = start_raw(nats).await;
                s.measured.push(p.pid());
                s.servers.push(p);
                s.addrs.push(a);
            }
        }
        Target::NatsWs => {
            assert!(processes == 1 || idle, "more than {SOCKETS_PER_PROCESS} nats-ws sockets only for idle");
            assert!(layout().servers == 1, "nats-ws runs on one nats-server");
            for _ in 1..processes {
                s.nats.push(start_nats().await);
            }
            for n in &s.nats {
                s.measured.push(n.proc.pid());
                s.addrs.push(n.ws);
            }
        }
    }
    s
}

fn total_rss_kb(pids: &[u32]) -> u64 {
    pids.iter().map(|p| rss_kb(*p)).sum()
}

fn total_ticks(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

/// Asks every worker for its report and merges them.
async fn report(workers: &mut [Worker], next: &[u64]) -> (Value, Latency) {
    let expected = serde_json::to_string(next).expect("json");
    for w in workers.iter_mut() {
        w.send(&format!("report {expected}")).await;
    }
    let mut lat = Latency::default();
    let mut sum = json!({"lost": 0, "duplicated": 0, "reordered": 0, "foreign": 0, "gaps": 0,
                         "delivered": 0, "whole": 0, "last_new_ns": 0, "errors": []});
    for w in workers.iter_mut() {
        let r: Value = serde_json::from_str(&w.expect("result").await).expect("result json");
        lat.merge(&r["latency_us"]);
        for k in ["lost", "duplicated", "reordered", "foreign", "gaps", "delivered", "whole"] {
            sum[k] = json!(sum[k].as_u64().unwrap_or(0) + r[k].as_u64().unwrap_or(0));
        }
        sum["last_new_ns"] =
            json!(sum["last_new_ns"].as_u64().unwrap_or(0).max(r["last_new_ns"].as_u64().unwrap_or(0)));
        if let (Some(all), Some(errs)) = (sum["errors"].as_array_mut(), r["errors"].as_array()) {
            all.extend(errs.iter().take(5).cloned());
        }
    }
    (sum, lat)
}

async fn publisher(target: Target, s: &Setup) -> Publisher {
    match target {
        Target::Raw => {
            let url = format!("ws://{}/publish", s.addrs[0]);
            assert!(s.addrs.len() == 1, "the raw publisher feeds one raw server");
            // Nagle off, as on every socket here: batching is the writer's.
            let ws = tokio_tungstenite::connect_async_with_config(url, None, true).await;
            Publisher::Raw(ws.expect("raw publish socket").0)
        }
        _ => {
            let urls: Vec<async_nats::ServerAddr> =
                layout_urls(&s.nats).split(',').map(|u| u.parse().expect("nats url")).collect();
            Publisher::Js(async_nats::jetstream::new(async_nats::connect(urls).await.expect("publisher connects")))
        }
    }
}

/// One rate step on connected sockets: publish, collect, measure.
async fn step(
    target: Target,
    s: &Setup,
    pubr: &mut Publisher,
    workers: &mut [Worker],
    next: &mut [u64],
    o: &Opts,
    rate: u64,
) -> Value {
    let hz = common::clock_ticks_per_s();
    // Every nats-server of the layout (nats-ws: its one server).
    let nats_pids: Vec<u32> = s.nats.iter().take(layout().servers).map(|n| n.proc.pid()).collect();
    let (t0, n0) = (total_ticks(&s.measured), total_ticks(&nats_pids));
    let node = matches!(target, Target::Agentcast | Target::Sse);
    let h0 = if node { node_latency_buckets(&s.addrs).await } else { vec![] };
    let before: u64 = next.iter().sum();
    let published = pubr.run(next, rate, o.duration, o.size).await;
    let (sum, lat) = report(workers, next).await;
    let (t1, n1) = (total_ticks(&s.measured), total_ticks(&nats_pids));
    // The nodes' own view of the same deliveries, for where a tail comes from.
    let node_latency = if node { node_latency(&h0, &node_latency_buckets(&s.addrs).await) } else { json!(null) };
    let events = next.iter().sum::<u64>() - before;
    let fanout = o.sockets as f64 / o.users as f64;
    let deliveries = events as f64 * fanout;
    let per10k = |ticks: u64| ticks as f64 / hz * 1000.0 / (deliveries / 10_000.0);
    let target_cpu = if target == Target::NatsWs { n1 - n0 } else { t1 - t0 };
    let system_cpu = if matches!(target, Target::Agentcast | Target::Sse | Target::RawJs) {
        (t1 - t0) + (n1 - n0)
    } else {
        target_cpu
    };
    let l = lat.summary();
    let v = json!({
        "rate_offered": rate,
        "events_published": published.events,
        "publish_errors": published.errors,
        "published_per_s": published.events as f64 / published.seconds,
        "deliveries_per_s": deliveries / published.seconds,
        "delivery": sum,
        "latency": l,
        "node_latency": node_latency,
        "cpu_ms_per_10k_deliveries": {"target": per10k(target_cpu), "with_nats_server": per10k(system_cpu)},
        "rss_kb": total_rss_kb(&s.measured),
    });
    println!(
        "  {:<10} {:>7} ev/s offered {:>8.0} published/s {:>9.0} deliveries/s  p50 {:>6.2} p99 {:>6.2} p99.9 {:>7.2} ms  lost {} dup {} reord {} foreign {}  cpu {:.1} ms/10k ({:.1} with nats)",
        target.name(),
        rate,
        v["published_per_s"].as_f64().unwrap_or(0.0),
        v["deliveries_per_s"].as_f64().unwrap_or(0.0),
        l["p50_ms"].as_f64().unwrap_or(f64::NAN),
        l["p99_ms"].as_f64().unwrap_or(f64::NAN),
        l["p999_ms"].as_f64().unwrap_or(f64::NAN),
        sum["lost"],
        sum["duplicated"],
        sum["reordered"],
        sum["foreign"],
        per10k(target_cpu),
        per10k(system_cpu),
    );
    if let Some(p99) = v["node_latency"]["p99_ms"].as_f64() {
        let p50 = v["node_latency"]["p50_ms"].as_f64().unwrap_or(f64::NAN);
        println!("  {:<10} the node's own view, stream stored to frame written: p50 {p50:.2} p99 {p99:.2} ms", "");
    }
    v
}

fn step_passes(v: &Value, rate: u64) -> bool {
    let d = &v["delivery"];
    ["lost", "duplicated", "reordered", "foreign", "gaps"].iter().all(|k| d[k].as_u64() == Some(0))
        && v["publish_errors"].as_u64() == Some(0)
        && v["latency"]["p99_ms"].as_f64().is_some_and(|p| p < MAX_P99_MS)
        && v["published_per_s"].as_f64().is_some_and(|r| r >= rate as f64 * 0.95)
}

/// One rate on fresh sockets: start the target, connect, publish, measure.
async fn run_rate(target: Target, o: &Opts, rate: u64) -> Value {
    let s = setup(target, o.sockets, false).await;
    let rss_before = total_rss_kb(&s.measured);
    let (mut workers, conn) = start_workers(target, &s.addrs, o.sockets, o.users).await;
    let mut pubr = publisher(target, &s).await;
    let mut next = vec![0u64; o.users];
    let mut v = step(target, &s, &mut pubr, &mut workers, &mut next, o, rate).await;
    let connected = conn["connected"].as_u64().unwrap_or(0).max(1);
    let grown = v["rss_kb"].as_u64().unwrap_or(0).saturating_sub(rss_before);
    v["rss_bytes_per_socket"] = json!(grown as f64 * 1024.0 / connected as f64);
    v["connections"] = conn;
    v["rss_kb_before_sockets"] = json!(rss_before);
    v
}

/// The `max` preset: double the rate while a step passes, then bisect the
/// interval twice. Every step starts on fresh processes, so one step's
/// backlog or losses never count against the next.
async fn run_max(target: Target, o: &Opts) -> Value {
    let (mut pass, mut fail) = (None::<u64>, None::<u64>);
    let mut steps = Vec::new();
    let mut rate = o.rate;
    let mut bisections = 0;
    loop {
        let v = run_rate(target, o, rate).await;
        if step_passes(&v, rate) {
            pass = Some(rate);
        } else {
            fail = Some(rate);
        }
        steps.push(v);
        rate = match (pass, fail) {
            (Some(p), None) => p * 2,
            (Some(p), Some(f)) if bisections < 2 => {
                bisections += 1;
                (p + f) / 2
            }
            (None, Some(f)) if f >= 2_000 => f / 2,
            _ => break,
        };
    }
    let best = steps
        .iter()
        .filter(|v| step_passes(v, v["rate_offered"].as_u64().unwrap_or(0)))
        .max_by_key(|v| v["rate_offered"].as_u64())
        .cloned();
    json!({"steps": steps, "best": best})
}

/// The `idle` preset: memory per socket with nothing flowing.
async fn run_idle(target: Target, o: &Opts) -> Value {
    let s = setup(target, o.sockets, true).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = total_rss_kb(&s.measured);
    let (workers, conn) = start_workers(target, &s.addrs, o.sockets, o.users).await;
    tokio::time::sleep(IDLE_SETTLE).await;
    let after = total_rss_kb(&s.measured);
    let connected = conn["connected"].as_u64().unwrap_or(0).max(1);
    let per_socket = (after.saturating_sub(before) * 1024) as f64 / connected as f64;
    println!(
        "  {:<10} {} sockets over {} processes: RSS {} MB before, {} MB after: {:.0} bytes per socket",
        target.name(),
        connected,
        s.measured.len(),
        before / 1024,
        after / 1024,
        per_socket
    );
    drop(workers);
    json!({"connections": conn, "processes": s.measured.len(), "rss_kb_before": before, "rss_kb_after": after,
           "rss_bytes_per_socket": per_socket})
}

/// The `storm` preset (agentcast): sockets on node A, which is killed; the
/// users get `missed` events each; every socket resumes on node B.
async fn run_storm(o: &Opts) -> Value {
    let mut s = setup(Target::Agentcast, o.sockets, false).await;
    let b = start_node(&layout_urls(&s.nats)).await;
    let a_addrs = s.addrs.clone();
    let (mut workers, conn) = start_workers(Target::Agentcast, &a_addrs, o.sockets, o.users).await;
    let mut pubr = publisher(Target::Agentcast, &s).await;
    let mut next = vec![0u64; o.users];
    // One event each, so every socket has a position to resume from.
    let mut errors = pubr.each_user(&mut next, 1, o.size).await;
    let (warm, _) = report(&mut workers, &next).await;
    s.servers.clear(); // SIGKILL (kill_on_drop) every node the sockets are on
    for w in workers.iter_mut() {
        w.expect("dropped").await;
    }
    errors += pubr.each_user(&mut next, o.missed, o.size).await;
    let b_pid = b.0.pid();
    let rss_before = rss_kb(b_pid);
    let start_ns = now_ns();
    let start = Instant::now();
    for w in workers.iter_mut() {
        w.send(&format!("resume {}", b.1)).await;
    }
    let (sum, _) = report(&mut workers, &next).await;
    let reported = start.elapsed();
    let seconds = sum["last_new_ns"].as_u64().unwrap_or(0).saturating_sub(start_ns) as f64 / 1e9;
    let whole = sum["whole"].as_u64().unwrap_or(0);
    println!(
        "  agentcast  storm: {whole} of {} sockets whole {seconds:.2} s after the resume began; lost {} dup {} reord {} gaps {}; node B RSS {} MB before, {} MB after",
        o.sockets,
        sum["lost"],
        sum["duplicated"],
        sum["reordered"],
        sum["gaps"],
        rss_before / 1024,
        rss_kb(b_pid) / 1024
    );
    json!({"connections": conn, "warm": warm, "publish_errors": errors, "missed_per_user": o.missed,
           "seconds_until_whole": seconds, "report_seconds": reported.as_secs_f64(), "delivery": sum,
           "node_b_rss_kb_before": rss_before, "node_b_rss_kb_after": rss_kb(b_pid)})
}

/// Peak resident memory of a process (`VmHWM`), in KiB.
fn hwm_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A metric's value from a node's /metrics (summed over the label sets
/// whose line contains `labels`).
async fn node_metric(addr: SocketAddr, name: &str, labels: &str) -> f64 {
    let text = common::http_get(addr, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The nodes' `agentcast_delivery_latency_seconds` histogram (clock
/// `stream`: from the stream storing an event to its frame written to the
/// socket), as (bucket bound in seconds, cumulative count) summed over the
/// nodes.
async fn node_latency_buckets(addrs: &[SocketAddr]) -> Vec<(f64, f64)> {
    let prefix = format!("{}_bucket{{", agentcast::metrics::DELIVERY_LATENCY);
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for addr in addrs {
        let text = common::http_get(*addr, "/metrics").await;
        let lines = text.lines().filter(|l| l.starts_with(&prefix) && l.contains("clock=\"stream\""));
        for line in lines {
            let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let le = match le {
                Some("+Inf") => f64::INFINITY,
                Some(v) => v.parse().unwrap_or(f64::NAN),
                None => continue,
            };
            let count: f64 = line.rsplit(' ').next().and_then(|c| c.parse().ok()).unwrap_or(0.0);
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += count,
                None => buckets.push((le, count)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// p50 and p99 of the deliveries between two readings of
/// [`node_latency_buckets`], interpolated inside a bucket as Prometheus's
/// `histogram_quantile` does: only as fine as the buckets
/// (`agentcast::metrics::LATENCY_BUCKETS`). Empty when the node records
/// none (nats-server 2.9 has no `Nats-Time-Stamp`).
fn node_latency(before: &[(f64, f64)], after: &[(f64, f64)]) -> Value {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| (*le, c - before.iter().find(|(b, _)| b == le).map_or(0.0, |(_, c0)| *c0)))
        .collect();
    let total = counts.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return json!(null);
    }
    let quantile = |q: f64| {
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (le, c) in &counts {
            if *c >= rank {
                if le.is_infinite() {
                    return lower * 1000.0;
                }
                let within = if c > &below { (rank - below) / (c - below) } else { 1.0 };
                return (lower + (le - lower) * within) * 1000.0;
            }
            (lower, below) = (*le, *c);
        }
        f64::NAN
    };
    json!({"deliveries": total, "p50_ms": quantile(0.5), "p99_ms": quantile(0.99),
           "clock": "stream stored to frame written"})
}

/// Publishes `rate` events/s of [`FLOOD_EVENT_BYTES`] for `duration`, in
/// turn to users `first..first + users`; returns (events, errors).
async fn flood_publish(url: String, first: usize, users: usize, rate: u64, duration: Duration) -> (u64, u64) {
    if rate == 0 || users == 0 {
        return (0, 0);
    }
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("flood publisher connects"));
    let mut acks = futures_util::stream::FuturesUnordered::new();
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut n = vec![0u64; users];
    let start = Instant::now();
    while start.elapsed() < duration {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let k = sent as usize % users;
            let body = payload(first + k, n[k], true, FLOOD_EVENT_BYTES);
            n[k] += 1;
            sent += 1;
            match js.publish(format!("agentcast.events.{}", user(first + k)), body.into()).await {
                Ok(ack) => acks.push(ack.into_future()),
                Err(_) => errors += 1,
            }
            while acks.len() >= FLOOD_INFLIGHT {
                if let Some(Err(_)) = acks.next().await {
                    errors += 1;
                }
            }
        }
        let tick = tokio::time::sleep(Duration::from_millis(10));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = &mut tick => break,
                Some(r) = acks.next(), if !acks.is_empty() => if r.is_err() { errors += 1 },
            }
        }
    }
    while let Some(r) = acks.next().await {
        if r.is_err() {
            errors += 1;
        }
    }
    (sent, errors)
}

/// One run of the `flood` preset: the reading sockets under the chat-like
/// load, the stalled sockets, and `flood_rate` events/s of the largest size
/// to the stalled users; the node's RSS sampled throughout.
async fn flood_phase(o: &Opts, flood_rate: u64) -> Value {
    let s = setup(Target::Agentcast, o.sockets + o.stalled, false).await;
    let (pid, addr) = (s.measured[0], s.addrs[0]);
    let rss_before = rss_kb(pid);
    let (mut workers, conn) = start_workers(Target::Agentcast, &s.addrs, o.sockets, o.users).await;
    let addrs = s.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    // Users o.users.. : socket i of this worker is user i.
    let stalled =
        spawn_worker(Target::Agentcast, &addrs, o.users, o.stalled, o.users + o.stalled, &["--stalled".into()]);
    let (_stalled, stalled_conn) = ready(vec![stalled]).await;
    let rss_connected = rss_kb(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                peak = rss_kb(pid).max(peak);
                tokio::time::sleep(RSS_SAMPLE).await;
            }
            peak
        }
    });
    let flood = tokio::spawn(flood_publish(s.nats[0].url.clone(), o.users, o.stalled, flood_rate, o.duration));
    let mut pubr = publisher(Target::Agentcast, &s).await;
    let mut next = vec![0u64; o.users];
    let fast = step(Target::Agentcast, &s, &mut pubr, &mut workers, &mut next, o, o.rate).await;
    let (flood_events, flood_errors) = flood.await.expect("flood publisher");
    stop.store(true, std::sync::atomic::Ordering::Release);
    let sampled = sampler.await.expect("sampler");
    let hwm = hwm_kb(pid);
    let mut metrics = json!({});
    for (key, name, labels) in [
        ("slow_closes_bytes", "agentcast_slow_sockets_total", r#"bound="bytes""#),
        ("disconnects_slow", "agentcast_disconnects_total", r#"reason="slow""#),
        ("resumes", "agentcast_resumes_total", ""),
        ("replayed_events", "agentcast_replayed_events_total", ""),
        ("nats_slow_consumer", "agentcast_nats_events_total", r#"event="slow_consumer""#),
        ("live_gaps_repaired", "agentcast_live_gaps_repaired_total", ""),
    ] {
        metrics[key] = json!(node_metric(addr, name, labels).await);
    }
    let l = &fast["latency"];
    println!(
        "  flood {flood_rate:>4} ev/s of {} KiB ({flood_events} published, {flood_errors} errors): node RSS {} MB before sockets, {} MB connected, peak {} MB (VmHWM; sampled {} MB); reading sockets p50 {:.2} p99 {:.2} ms; slow closes: {} over the byte bound, {} in all",
        FLOOD_EVENT_BYTES / 1024,
        rss_before / 1024,
        rss_connected / 1024,
        hwm / 1024,
        sampled / 1024,
        l["p50_ms"].as_f64().unwrap_or(f64::NAN),
        l["p99_ms"].as_f64().unwrap_or(f64::NAN),
        metrics["slow_closes_bytes"],
        metrics["disconnects_slow"],
    );
    json!({"flood_rate": flood_rate, "flood_events": flood_events, "flood_errors": flood_errors,
           "connections": conn, "stalled_connections": stalled_conn, "fast": fast,
           "rss_kb_before_sockets": rss_before, "rss_kb_connected": rss_connected,
           "rss_kb_peak_sampled": sampled, "vm_hwm_kb": hwm, "node_metrics": metrics})
}

/// The `flood` preset: the same run without the flood and with it, and the
/// bounds the node's flags (its defaults) give (docs/operations.md).
async fn run_flood(o: &Opts) -> Value {
    use agentcast::config::{DEFAULT_SOCKET_QUEUE_BYTES, DEFAULT_SUBSCRIPTION_BYTES};
    use agentcast::hub::{
        LIVE_READ_CONCURRENCY, MAX_SHARED_REPLAY_BYTES, READ_BYTES, REPLAY_BYTES, RESUME_READ_CONCURRENCY,
    };
    let without = flood_phase(o, 0).await;
    let with = flood_phase(o, o.flood_rate).await;
    let per_socket = DEFAULT_SOCKET_QUEUE_BYTES + agentcast::socket::MAX_WRITE_BUFFER;
    let per_user = DEFAULT_SUBSCRIPTION_BYTES + MAX_SHARED_REPLAY_BYTES;
    let events_bound = |sockets: usize, users: usize| {
        let reads = (users.min(LIVE_READ_CONCURRENCY) + RESUME_READ_CONCURRENCY) * READ_BYTES + REPLAY_BYTES;
        (sockets * per_socket + users * per_user + reads) as u64 / 1024
    };
    // What the stalled sockets and their users may add to the node over the
    // same run without the flood.
    let peak_without = without["vm_hwm_kb"].as_u64().unwrap_or(0);
    let peak_with = with["vm_hwm_kb"].as_u64().unwrap_or(0);
    let flood_bound = peak_without + events_bound(o.stalled, o.stalled);
    // Everything the node's sockets and users may hold, over the node
    // before any socket connected (idle socket memory not included).
    let all_bound =
        with["rss_kb_before_sockets"].as_u64().unwrap_or(0) + events_bound(o.sockets + o.stalled, o.users + o.stalled);
    let p99 = |v: &Value| v["fast"]["latency"]["p99_ms"].as_f64();
    println!(
        "  node peak RSS {} MB with the flood, {} MB without; bound for the flood's share (without + stalled sockets' and users' budgets + reads): {} MB; bound for every socket and user from the flags: {} MB; reading sockets' p99 {:?} ms with, {:?} ms without",
        peak_with / 1024,
        peak_without / 1024,
        flood_bound / 1024,
        all_bound / 1024,
        p99(&with),
        p99(&without),
    );
    json!({"without_flood": without, "with_flood": with,
           "bounds": {"per_socket_bytes": per_socket, "per_user_bytes": per_user, "read_bytes": READ_BYTES,
                      "live_read_concurrency": LIVE_READ_CONCURRENCY, "replay_bytes": REPLAY_BYTES,
                      "flood_share_kb": flood_bound, "every_socket_kb": all_bound},
           "peak_under_flood_bound": peak_with < flood_bound, "peak_under_every_socket_bound": peak_with < all_bound,
           "delivery": with["fast"]["delivery"], "publish_errors": with["fast"]["publish_errors"]})
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Value {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => json!((a / b * 100.0).round() / 100.0),
        _ => Value::Null,
    }
}

/// The figures a preset is about, by name, and where each is in a target's
/// result: what the ratios compare and the summary over runs gives.
fn metric_paths(preset: &str) -> &'static [(&'static str, &'static [&'static str])] {
    match preset {
        "idle" => &[("rss_bytes_per_socket", &["rss_bytes_per_socket"])],
        "max" => {
            &[("best_deliveries_per_s", &["best", "deliveries_per_s"]), ("best_p99_ms", &["best", "latency", "p99_ms"])]
        }
        "storm" => &[("seconds_until_whole", &["seconds_until_whole"])],
        "flood" => &[
            ("peak_rss_kb_with_flood", &["with_flood", "vm_hwm_kb"]),
            ("p99_ms_without_flood", &["without_flood", "fast", "latency", "p99_ms"]),
            ("p99_ms_with_flood", &["with_flood", "fast", "latency", "p99_ms"]),
        ],
        "control" => {
            &[("p50_ms", &["agentcast", "latency", "p50_ms"]), ("p99_ms", &["agentcast", "latency", "p99_ms"])]
        }
        "tokens" => &[
            ("slow_bytes_per_token", &["slow", "bytes_per_token"]),
            ("slow_second_half_bytes_per_token", &["slow", "second_half_bytes_per_token"]),
            ("slow_frames_per_token", &["slow", "frames_per_token"]),
            ("slow_p50_ms", &["slow", "latency", "p50_ms"]),
            ("fast_p99_ms", &["fast", "latency", "p99_ms"]),
        ],
        _ => &[
            ("p50_ms", &["latency", "p50_ms"]),
            ("p99_ms", &["latency", "p99_ms"]),
            ("deliveries_per_s", &["deliveries_per_s"]),
            ("cpu_ms_per_10k_deliveries", &["cpu_ms_per_10k_deliveries", "with_nats_server"]),
            ("rss_bytes_per_socket", &["rss_bytes_per_socket"]),
        ],
    }
}

/// Median, min and max of each figure over the runs, `null` where no run
/// has it. `runs` holds one value (a target's result, or a run's ratios)
/// per run; `figure` reads a figure from one.
fn spread(runs: &[&Value], figure: impl Fn(&Value) -> Option<f64>) -> Value {
    let mut xs: Vec<f64> = runs.iter().filter_map(|v| figure(v)).collect();
    if xs.is_empty() {
        return Value::Null;
    }
    xs.sort_by(f64::total_cmp);
    let median = if xs.len() % 2 == 1 { xs[xs.len() / 2] } else { (xs[xs.len() / 2 - 1] + xs[xs.len() / 2]) / 2.0 };
    json!({"median": median, "min": xs[0], "max": xs[xs.len() - 1], "runs": xs.len()})
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, p| v.get(*p))
}

/// Ratios of agentcast to each peer, on the figures a preset is about.
fn ratios(preset: &str, results: &[(Target, Value)]) -> Value {
    if preset == "control" {
        let Some((_, v)) = results.first() else { return json!({}) };
        let get = |path: &str, p: &str| v[path]["latency"][p].as_f64();
        return json!({"agentcast_over_nats_direct": {
            "p50_ms": ratio(get("agentcast", "p50_ms"), get("nats-direct", "p50_ms")),
            "p99_ms": ratio(get("agentcast", "p99_ms"), get("nats-direct", "p99_ms")),
        }});
    }
    let get = |t: Target, path: &[&str]| {
        let (_, v) = results.iter().find(|(x, _)| *x == t)?;
        let mut v = v;
        for p in path {
            v = v.get(*p)?;
        }
        v.as_f64()
    };
    let ran = |t: Target| results.iter().any(|(x, _)| *x == t);
    let mut out = json!({});
    // Each peer against agentcast, and the same node's two transports.
    let pairs = [
        (Target::Agentcast, Target::NatsWs, "agentcast_over_nats-ws"),
        (Target::Agentcast, Target::Raw, "agentcast_over_raw"),
        (Target::Agentcast, Target::RawJs, "agentcast_over_raw-js"),
        (Target::Sse, Target::Agentcast, "agentcast_sse_over_agentcast"),
    ];
    for (a, b, name) in pairs.into_iter().filter(|(a, b, _)| ran(*a) && ran(*b)) {
        let mut r = json!({});
        for (figure, path) in metric_paths(preset) {
            r[*figure] = ratio(get(a, path), get(b, path));
        }
        out[name] = r;
    }
    out
}

/// What a control run must show to count as sane: every request sent and
/// answered `ok` on both paths.
fn check_control(v: &Value) -> Result<(), String> {
    for path in ["agentcast", "nats-direct"] {
        let r = &v[path];
        let sent = r["sent"].as_u64().unwrap_or(0);
        if sent == 0 || r["ok"].as_u64() != Some(sent) || r["send_errors"].as_u64() != Some(0) {
            return Err(format!("{path}: not every request answered ok: {r}"));
        }
    }
    Ok(())
}

/// What a run must show to count as sane: nothing lost, duplicated,
/// reordered or misdelivered. The smoke run (`cargo test`) fails on it.
fn check(v: &Value) -> Result<(), String> {
    let d = &v["delivery"];
    for k in ["lost", "duplicated", "reordered", "foreign", "gaps"] {
        if d[k].as_u64() != Some(0) {
            return Err(format!("{k} = {} in {v}", d[k]));
        }
    }
    if v["publish_errors"].as_u64() != Some(0) {
        return Err(format!("publish errors in {v}"));
    }
    Ok(())
}

/// The value after `name` in `args`, if `name` is there.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    match flag(&args, "--role") {
        Some("worker") => return rt.block_on(worker::run(worker::Spec::parse(&args))),
        Some("raw") => {
            return rt.block_on(raw::run(flag(&args, "--nats").map(str::to_owned)));
        }
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
    // `cargo bench` passes --bench; `cargo test` runs this target bare.
    let smoke = !args.iter().any(|a| a == "--bench");
    let o = opts(&args, smoke);
    LAYOUT.set(o.layout).expect("the layout is set once");
    rt.block_on(coordinate(o, smoke));
}

async fn coordinate(o: Opts, smoke: bool) {
    let version = nats_version();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let workload = match o.preset.as_str() {
        "idle" => format!("{} idle sockets, {} users", o.sockets, o.users),
        "storm" => {
            format!("{} sockets, {} users, {} missed events of {} bytes each", o.sockets, o.users, o.missed, o.size)
        }
        "max" => {
            format!("{} sockets, {} users, {}-byte events from {} events/s up", o.sockets, o.users, o.size, o.rate)
        }
        "flood" => format!(
            "{} reading sockets, {} users, {} events/s of {} bytes for {:?}; {} stalled sockets (one user each) get {} events/s of {} bytes",
            o.sockets, o.users, o.rate, o.size, o.duration, o.stalled, o.flood_rate, FLOOD_EVENT_BYTES
        ),
        "control" => format!(
            "{} sockets of as many users, {} control requests/s in all of about {} bytes for {:?}, each path",
            o.sockets, o.rate, o.size, o.duration
        ),
        "tokens" => format!(
            "{} runs of one socket each, {} tokens/s of {} bytes for {:?}, coalescing {} ms; every {}th socket reads at most {} bytes/s",
            o.users, o.rate, o.size, o.duration, o.coalesce_ms, o.slow_every, o.slow_bps
        ),
        _ => format!(
            "{} sockets, {} users, {} events/s of {} bytes for {:?}",
            o.sockets, o.users, o.rate, o.size, o.duration
        ),
    };
    let l = o.layout;
    println!(
        "agentcast load benchmark, preset {}: {workload}; {version} x{} ({} partition(s)); {cores} cores ({cpu})",
        o.preset, l.servers, l.partitions
    );
    let mut runs: Vec<Vec<(Target, Value)>> = Vec::new();
    let mut failures = Vec::new();
    for run in 1..=o.runs {
        if o.runs > 1 {
            println!("run {run} of {}", o.runs);
        }
        let mut results: Vec<(Target, Value)> = Vec::new();
        for &t in &o.targets {
            let v = match o.preset.as_str() {
                "idle" => run_idle(t, &o).await,
                "max" => run_max(t, &o).await,
                "flood" => {
                    if t != Target::Agentcast {
                        println!("  {}: flood is agentcast only", t.name());
                        continue;
                    }
                    run_flood(&o).await
                }
                "storm" => {
                    if t != Target::Agentcast {
                        println!("  {}: no history to resume from; storm is agentcast only", t.name());
                        continue;
                    }
                    run_storm(&o).await
                }
                "control" => control::run(&o).await,
                "tokens" => {
                    if matches!(t, Target::Raw | Target::RawJs | Target::Sse) {
                        println!("  {}: tokens is agentcast and nats-ws", t.name());
                        continue;
                    }
                    tokens::run(t, &o).await
                }
                "smoke" => {
                    let chat = run_rate(t, &o, o.rate).await;
                    if let Err(e) = check(&chat) {
                        failures.push(format!("{} chat: {e}", t.name()));
                    }
                    let mut v = json!({"chat": chat});
                    if t == Target::Agentcast {
                        let storm = run_storm(&o).await;
                        if let Err(e) = check(&storm) {
                            failures.push(format!("storm: {e}"));
                        }
                        if storm["delivery"]["whole"].as_u64() != Some(o.sockets as u64) {
                            failures.push(format!("storm: not every socket whole: {storm}"));
                        }
                        v["storm"] = storm;
                        let short = Opts {
                            preset: "control".into(),
                            targets: vec![Target::Agentcast],
                            sockets: 20,
                            users: 20,
                            rate: 100,
                            size: 100,
                            duration: Duration::from_secs(3),
                            missed: 0,
                            stalled: 0,
                            flood_rate: 0,
                            coalesce_ms: o.coalesce_ms,
                            slow_every: o.slow_every,
                            slow_bps: o.slow_bps,
                            runs: 1,
                            out: None,
                            layout: o.layout,
                        };
                        let c = control::run(&short).await;
                        if let Err(e) = check_control(&c) {
                            failures.push(format!("control: {e}"));
                        }
                        v["control"] = c;
                        // A short tokens run (every 10th of 40 sockets slow).
                        let short = Opts { preset: "tokens".into(), sockets: 40, users: 40, rate: 40, ..short };
                        let t = tokens::run(Target::Agentcast, &short).await;
                        if let Err(e) = tokens::check(&t) {
                            failures.push(format!("tokens: {e}"));
                        }
                        v["tokens"] = t;
                    }
                    v
                }
                _ => run_rate(t, &o, o.rate).await,
            };
            results.push((t, v));
        }
        if o.runs > 1 && !["storm", "smoke", "flood"].contains(&o.preset.as_str()) {
            println!("ratios of run {run}: {}", ratios(&o.preset, &results));
        }
        runs.push(results);
    }
    // Per target, each figure's spread over the runs; per pair, the spread
    // of the ratios computed within each run (never across runs).
    let mut summary = json!({});
    for &t in &o.targets {
        let of_t: Vec<&Value> = runs.iter().filter_map(|r| r.iter().find(|(x, _)| *x == t).map(|(_, v)| v)).collect();
        let mut figures = json!({});
        for (name, path) in metric_paths(&o.preset) {
            figures[*name] = spread(&of_t, |v| at(v, path).and_then(Value::as_f64));
        }
        summary[t.name()] = figures;
    }
    let per_run_ratios: Vec<Value> = runs.iter().map(|r| ratios(&o.preset, r)).collect();
    let mut ratio_spread = json!({});
    let rs: Vec<&Value> = per_run_ratios.iter().collect();
    if let Some(Value::Object(pairs)) = per_run_ratios.first() {
        for (pair, figures) in pairs {
            let mut out = json!({});
            for name in figures.as_object().into_iter().flat_map(|f| f.keys()) {
                out[name] = spread(&rs, |v| v[pair][name].as_f64());
            }
            ratio_spread[pair] = out;
        }
    }
    let report = json!({
        "bench": "load",
        "preset": o.preset,
        "date": time_now(),
        "nats_server": version,
        "nats_servers": o.layout.servers,
        "partitions": o.layout.partitions,
        "machine": {"cores": cores, "cpu": cpu},
        "workload": {"sockets": o.sockets, "users": o.users, "rate": o.rate, "size": o.size,
                     "duration_s": o.duration.as_secs(), "missed": o.missed,
                     "stalled": o.stalled, "flood_rate": o.flood_rate, "flood_event_bytes": FLOOD_EVENT_BYTES,
                     "coalesce_ms": o.coalesce_ms, "slow_every": o.slow_every, "slow_bps": o.slow_bps},
        "runs": runs.iter().zip(&per_run_ratios).map(|(results, ratios)| json!({
            "results": results.iter().map(|(t, v)| json!({"target": t.name(), "result": v})).collect::<Vec<_>>(),
            "ratios": ratios,
        })).collect::<Vec<_>>(),
        "summary": summary,
        "ratios": ratio_spread,
    });
    if o.runs > 1 {
        println!("over {} runs (median, min to max):", o.runs);
        for (target, figures) in report["summary"].as_object().into_iter().flatten() {
            for (name, s) in figures.as_object().into_iter().flatten().filter(|(_, s)| !s.is_null()) {
                let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
                println!("  {target:<14} {name:<28} {:>10.2} ({:.2} to {:.2})", f("median"), f("min"), f("max"));
            }
        }
    }
    if !["storm", "smoke", "flood"].contains(&o.preset.as_str()) {
        println!("ratios (median over runs): {}", median_ratios(&report["ratios"]));
    }
    if let Some(out) = &o.out {
        let mut f = std::fs::File::create(out).expect("create --out file");
        f.write_all(serde_json::to_string_pretty(&report).expect("json").as_bytes()).expect("write --out file");
        println!("wrote {}", out.display());
    }
    if smoke {
        assert!(failures.is_empty(), "smoke run failed: {failures:#?}");
    }
}

/// The ratios' medians alone, for the summary line.
fn median_ratios(spread: &Value) -> Value {
    let mut out = json!({});
    for (pair, figures) in spread.as_object().into_iter().flatten() {
        for (name, s) in figures.as_object().into_iter().flatten() {
            out[pair][name] = s["median"].clone();
        }
    }
    out
}

fn time_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}
