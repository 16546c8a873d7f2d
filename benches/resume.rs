//! Resume cost at scale: `cargo bench --bench resume -- [options]`.
//!
//! Starts a nats-server (`$AGENTCAST_BENCH_NATS_SERVER`, else `nats-server`
//! on PATH) and a release agentcast node as separate processes, fills the
//! stream with `--events` events of about `--payload` bytes spread
//! round-robin over `--users` users, then measures:
//! 1. each history read a resume could use, alone (direct get of the last
//!    event, the leader's get of it, direct get of the next event, 20
//!    successive next gets, first event, stream info with a subject filter,
//!    and an ordered consumer reading 20 events);
//! 2. a single resume end to end over WebSocket, one at a time, missing 0, 1
//!    and 20 events: from connect to the last missed event;
//! 3. a storm: `--storm` sockets (two per user) resuming at once, each
//!    missing `--missed` events: time until every socket is whole, and any
//!    event lost, duplicated or out of order.
//!
//! Options: --events N (1000000) --users N (10000) --payload BYTES (240)
//! --samples N (200) --storm N (10000) --missed N (20) --out FILE.json
//! --burst N (1): each user's events are written N in a row before the next
//! user's, as agent runs emit theirs; 1 is round-robin, the worst case for
//! reads by subject.
//! --partitions N (1): the users spread over N streams (the node's
//! `--stream-partitions`, the server's account mapping); the reads of part
//! 1 go to each user's stream, and the scan reads partition 0's.

#[path = "common/mod.rs"]
#[allow(dead_code)] // the CPU helpers are the other targets'
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use common::{http_get, http_status, rss_kb};

const SECRET: &str = "bench-secret-bench-secret-bench-secret";

struct Opts {
    events: usize,
    users: usize,
    payload: usize,
    samples: usize,
    storm: usize,
    missed: usize,
    burst: usize,
    partitions: u32,
    out: Option<PathBuf>,
}

fn opts() -> Opts {
    let mut o = Opts {
        events: 1_000_000,
        users: 10_000,
        payload: 240,
        samples: 200,
        storm: 10_000,
        missed: 20,
        burst: 1,
        partitions: 1,
        out: None,
    };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let val = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let num = || val.parse::<usize>().unwrap_or_else(|_| panic!("{flag}: not a number: {val}"));
        match flag.as_str() {
            "--events" => o.events = num(),
            "--users" => o.users = num(),
            "--payload" => o.payload = num(),
            "--samples" => o.samples = num(),
            "--storm" => o.storm = num(),
            "--missed" => o.missed = num(),
            "--burst" => o.burst = num().max(1),
            "--partitions" => o.partitions = (num() as u32).clamp(1, agentcast::partition::MAX_PARTITIONS),
            "--out" => o.out = Some(PathBuf::from(val)),
            other => panic!("unknown option {other}"),
        }
    }
    o
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_node(nats_url: &str, max_per_user: usize, partitions: u32) -> (Proc, std::net::SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(["serve", "--listen", "127.0.0.1:0", "--nats-url", nats_url, "--jwt-secret", SECRET])
        .args(["--stream-partitions", &partitions.to_string()])
        .args(["--stream-max-per-user", &max_per_user.to_string(), "--stream-max-bytes", &(8u64 << 30).to_string()])
        .args(["--max-connections", "200000"])
        .env("AGENTCAST_LOG", "warn,agentcast=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agentcast");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("  node: {line}");
            }
            if let Some(a) = line.split("listening on ").nth(1) {
                let _ = tx.send(a.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).expect("node listens").parse().unwrap();
    (Proc(child), addr)
}

async fn http_body(addr: std::net::SocketAddr, path: &str) -> String {
    http_get(addr, path).await.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99, max) = (pct(&ms, 0.5), pct(&ms, 0.99), ms.last().copied().unwrap_or(f64::NAN));
    println!("  {name:<44} p50 {p50:>8.2} ms  p99 {p99:>8.2} ms  max {max:>8.2} ms  (n={})", ms.len());
    json!({"name": name, "n": ms.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max})
}

fn user(u: usize) -> String {
    format!("user-{u:05}")
}

fn token(user: &str) -> String {
    agentcast::auth::mint_hs256(SECRET.as_bytes(), user, Duration::from_secs(3600)).unwrap()
}

/// Opens a socket resuming after `last_seq` and reads until `want` events
/// (exactly those, in order) have arrived. Returns the outcome.
async fn resume(
    addr: std::net::SocketAddr,
    user: &str,
    last_seq: u64,
    epoch: &str,
    want: &[u64],
) -> Result<Duration, String> {
    let start = Instant::now();
    let url = format!("ws://{addr}/ws?token={}&last_seq={last_seq}&epoch={epoch}", token(user));
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.map_err(|e| format!("connect: {e}"))?;
    let mut got = Vec::with_capacity(want.len());
    let mut welcomed = false;
    while !welcomed || got.len() < want.len() {
        let msg = tokio::time::timeout(Duration::from_secs(300), ws.next())
            .await
            .map_err(|_| format!("timeout after {} of {}", got.len(), want.len()))?;
        let Some(Ok(Message::Text(t))) = msg else { return Err(format!("socket ended: {msg:?}")) };
        let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
        match v["type"].as_str() {
            Some("welcome") => welcomed = true,
            Some("event") => got.push(v["seq"].as_u64().unwrap_or(0)),
            Some("gap") => return Err(format!("gap: {v}")),
            _ => {}
        }
    }
    let elapsed = start.elapsed();
    if got != want {
        return Err(format!("wrong events: got {got:?}, want {want:?}"));
    }
    let _ = ws.close(None).await;
    Ok(elapsed)
}

fn server_at_least(client: &async_nats::Client, major: u64, minor: u64) -> bool {
    let v = client.server_info().version;
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Batch direct get (nats-server 2.11+): up to `n` messages of `subject`
/// from `from` in one request; answers end with a 204 status.
async fn batch_next(client: &async_nats::Client, stream: &str, subject: &str, from: u64, n: usize) -> Vec<u64> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    let req = json!({"seq": from, "next_by_subj": subject, "batch": n});
    client.publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, req.to_string().into()).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(m) = sub.next().await {
        if m.status.is_some() {
            break;
        }
        let seq = m.headers.as_ref().and_then(|h| h.get("Nats-Sequence")).and_then(|v| v.as_str().parse().ok());
        seqs.push(seq.unwrap());
    }
    seqs
}

/// Reads every message of the stream from `from` through `to` with an
/// unfiltered ordered consumer; returns how many it read.
async fn scan(stream: &async_nats::jetstream::stream::Stream, from: u64, to: u64) -> u64 {
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut n = 0;
    while let Some(m) = msgs.next().await {
        n += 1;
        if m.unwrap().info().unwrap().stream_sequence >= to {
            break;
        }
    }
    n
}

#[tokio::main]
async fn main() {
    let o = opts();
    let dir = tempfile::tempdir().unwrap();
    let nats_bin = std::env::var("AGENTCAST_BENCH_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    let n = o.partitions;
    let conf = dir.path().join("mapping.conf");
    let mapping = if n > 1 {
        format!("mappings = {{ {} }}\n", agentcast::partition::mapping("agentcast.events", n))
    } else {
        String::new()
    };
    std::fs::write(&conf, mapping).unwrap();
    let (nats_proc, nats_url) =
        agentcast::dev::start_nats(std::path::Path::new(&nats_bin), dir.path(), &["-c", conf.to_str().unwrap()])
            .await
            .unwrap();
    let nats_version = Command::new(&nats_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let per_user = o.events.div_ceil(o.users);
    let (node_proc, addr) = start_node(&nats_url, per_user * 2, n);
    while http_status(addr, "/readyz").await != 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "agentcast resume benchmark: {nats_version}, {} events over {} users (~{per_user} each, in bursts of {}), {n} partition(s)",
        o.events, o.users, o.burst
    );

    // Fill, pipelined with a bounded number of acks in flight.
    let client = async_nats::connect(&nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let pad = "x".repeat(o.payload.saturating_sub(80));
    let start = Instant::now();
    let mut seqs: HashMap<usize, Vec<u64>> = HashMap::new();
    // At most MAX_INFLIGHT acknowledgements outstanding.
    const MAX_INFLIGHT: usize = 4096;
    let mut pending = futures_util::stream::FuturesOrdered::new();
    for i in 0..o.events {
        let u = (i / o.burst) % o.users;
        let payload = format!(r#"{{"type":"agent_thinking","run_id":"r-{i:08}","data":{{"text":"{pad}"}}}}"#);
        let ack = js.publish(format!("agentcast.events.{}", user(u)), payload.into()).await.unwrap();
        pending.push_back(async move { (u, ack.await.expect("ack").sequence) });
        while pending.len() >= MAX_INFLIGHT {
            let (u, seq) = pending.next().await.unwrap();
            seqs.entry(u).or_default().push(seq);
        }
    }
    while let Some((u, seq)) = pending.next().await {
        seqs.entry(u).or_default().push(seq);
    }
    let fill = start.elapsed();
    println!("  filled in {fill:.1?} ({:.0} events/s)", o.events as f64 / fill.as_secs_f64());

    // Each user's stream, and the prefix of the subjects it stores events under.
    let part = |u: usize| agentcast::partition::of_token(&user(u), n) as usize;
    let names: Vec<String> = (0..n).map(|k| agentcast::partition::stream_name("AGENTCAST", n, k)).collect();
    let prefixes: Vec<String> = (0..n).map(|k| agentcast::partition::stored_prefix("agentcast.events", n, k)).collect();
    let mut streams = Vec::new();
    let mut infos = Vec::new();
    for name in &names {
        let mut s = js.get_stream(name).await.unwrap();
        infos.push(s.info().await.unwrap().clone());
        streams.push(s);
    }
    let epochs: Vec<String> = infos.iter().map(agentcast::history::epoch).collect();
    let mut results = Vec::new();

    // 1. The reads a resume can use, alone.
    println!("history reads ({} random users, one at a time):", o.samples);
    let sample_users: Vec<usize> = (0..o.samples).map(|_| rand::random_range(0..o.users)).collect();
    let k = o.missed.min(per_user - 1);
    let mut last_ms = Vec::new();
    let mut leader_last_ms = Vec::new();
    let mut next_ms = Vec::new();
    let mut read_ms = Vec::new();
    let mut first_ms = Vec::new();
    let mut info_ms = Vec::new();
    let mut ordered_ms = Vec::new();
    let mut batch_ms = Vec::new();
    let mut history_ms = Vec::new();
    // As a node reads: over READ_CONNECTIONS connections of its own.
    let mut readers = Vec::new();
    for _ in 0..agentcast::nats::READ_CONNECTIONS {
        readers.push(async_nats::connect(&nats_url).await.unwrap());
    }
    let histories: Vec<agentcast::history::History> = (0..n as usize)
        .map(|k| {
            agentcast::history::History::new(&js.client(), readers.clone(), &names[k], prefixes[k].clone()).unwrap()
        })
        .collect();
    let batch_supported = server_at_least(&client, 2, 11);
    for &u in &sample_users {
        let (stream, history) = (&streams[part(u)], &histories[part(u)]);
        let subject = format!("{}.{}", prefixes[part(u)], user(u));
        let s = &seqs[&u];
        let from = s[s.len() - k];
        let t = Instant::now();
        stream.direct_get_last_for_subject(subject.as_str()).await.unwrap();
        last_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // As a node asks a user's position: of the stream's leader.
        let t = Instant::now();
        stream.get_last_raw_message_by_subject(subject.as_str()).await.unwrap();
        leader_last_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        stream.direct_get_next_for_subject(subject.as_str(), Some(from)).await.unwrap();
        next_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let mut at = from;
        for _ in 0..k {
            at = stream.direct_get_next_for_subject(subject.as_str(), Some(at)).await.unwrap().sequence + 1;
        }
        read_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        stream.direct_get_first_for_subject(subject.as_str()).await.unwrap();
        first_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let _ = stream.info_with_subjects(subject.as_str()).await.unwrap();
        info_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap().take(k);
        while let Some(m) = msgs.next().await {
            m.unwrap();
        }
        ordered_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let read =
            agentcast::resume::read(history, &user(u), s[s.len() - k - 1], Some(s[s.len() - 1] + 1), 64).await.unwrap();
        history_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(read.gap.is_none() && read.done && read.events.len() == k, "history read of {subject}");
        if batch_supported {
            let t = Instant::now();
            let got = batch_next(&client, &names[part(u)], &subject, from, k).await;
            batch_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(got, s[s.len() - k..], "batch direct get of {subject}");
        }
    }
    results.push(summary("direct get: last of the user's subject", last_ms));
    results.push(summary("leader get: last of the user's subject", leader_last_ms));
    results.push(summary("direct get: next of the user's subject", next_ms));
    results.push(summary(&format!("direct get: {k} successive next"), read_ms));
    results.push(summary("direct get: first of the user's subject", first_ms));
    results.push(summary("stream info with a subject filter", info_ms));
    results.push(summary(&format!("ordered consumer: create, read {k}"), ordered_ms));
    results.push(summary(&format!("history read: {k} events, proven (as a resume reads)"), history_ms));
    if batch_supported {
        results.push(summary(&format!("batch direct get: {k} next in one request"), batch_ms));
    }

    // The range a storm of the first `storm_users` users reads in partition
    // 0's stream, scanned once with an unfiltered ordered consumer.
    let storm_users = (o.storm / 2).min(o.users);
    let scan_from = (0..storm_users).filter(|&u| part(u) == 0).map(|u| seqs[&u][seqs[&u].len() - k]).min().unwrap_or(1);
    let scan_to = infos[0].state.last_sequence;
    let mut scan_ms = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let read = scan(&streams[0], scan_from, scan_to).await;
        scan_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(read, scan_to - scan_from + 1, "scan read every message");
    }
    let scan_summary = summary(&format!("ordered consumer: scan {} messages", scan_to - scan_from + 1), scan_ms);
    results.push(scan_summary);

    // 2. One resume at a time, end to end.
    println!("single resume over WebSocket (connect to last missed event, one at a time):");
    for missed in [0usize, 1, k] {
        let mut ms = Vec::new();
        for &u in &sample_users {
            let s = &seqs[&u];
            let last_seq = s[s.len() - missed - 1];
            let want = &s[s.len() - missed..];
            ms.push(resume(addr, &user(u), last_seq, &epochs[part(u)], want).await.unwrap().as_secs_f64() * 1e3);
        }
        results.push(summary(&format!("resume missing {missed}"), ms));
    }

    // 3. The storm.
    let sockets = storm_users * 2;
    let rss_before = rss_kb(node_proc.0.id());
    println!("storm: {sockets} sockets ({storm_users} users x 2) resume at once, each missing {k}:");
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(sockets);
    for u in 0..storm_users {
        for _ in 0..2 {
            let s = seqs[&u].clone();
            let epoch = epochs[part(u)].clone();
            tasks.push(tokio::spawn(async move {
                let last_seq = s[s.len() - k - 1];
                resume(addr, &user(u), last_seq, &epoch, &s[s.len() - k..]).await
            }));
        }
    }
    let mut whole = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut lat = Vec::with_capacity(sockets);
    for t in tasks {
        match t.await.unwrap() {
            Ok(d) => {
                whole += 1;
                lat.push(d.as_secs_f64() * 1e3);
            }
            Err(e) => failures.push(e),
        }
    }
    let all = start.elapsed();
    let rss_after = rss_kb(node_proc.0.id());
    println!("  {whole} of {sockets} sockets whole in {all:.2?}; {} failed", failures.len());
    for f in failures.iter().take(5) {
        println!("    failure: {f}");
    }
    let storm_lat = summary("storm: per-socket connect to whole", lat);
    println!("  node RSS {} MB before, {} MB after", rss_before / 1024, rss_after / 1024);
    let node_metrics = http_body(addr, "/metrics").await;
    let storm_metrics: Vec<&str> = node_metrics
        .lines()
        .filter(|l| {
            ["agentcast_history_scan", "agentcast_resumes_total", "agentcast_shared_replays"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    for l in &storm_metrics {
        println!("  node: {l}");
    }

    let report = json!({
        "bench": "resume",
        "nats_server": nats_version,
        "events": o.events, "users": o.users, "payload_bytes": o.payload, "missed": k, "burst": o.burst,
        "partitions": n,
        "fill_events_per_s": o.events as f64 / fill.as_secs_f64(),
        "reads": results,
        "storm": {"sockets": sockets, "whole": whole, "failed": failures.len(), "seconds": all.as_secs_f64(),
                  "latency": storm_lat, "node_rss_kb_before": rss_before, "node_rss_kb_after": rss_after,
                  "node_metrics": storm_metrics},
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
    });
    if let Some(out) = o.out {
        std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("wrote {}", out.display());
    }
    drop(node_proc);
    drop(nats_proc);
}
