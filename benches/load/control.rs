//! The `control` preset: time from a control request to its reply, through
//! the node (WebSocket client -> node -> NATS request -> responder -> back),
//! beside the same request sent by a NATS client straight to the responder
//! (the floor), in the same run, on the same nats-server.
//!
//! The responder is [`agentcast::control::Listener`] in this process, on its
//! own NATS connection, answering `{"status":"ok"}` at once. Both paths send
//! the same requests at the same rate for the same time: `--rate` requests/s
//! in all, spread round-robin over `--sockets` sockets of as many users (the
//! direct path sends to the same users' subjects, with the headers a node
//! sets). The direct path runs first, then the path through the node.
//!
//! Each request's id carries its number and send time (ns on a clock the
//! readers share), so a reply is timed by the socket that reads it, with no
//! shared table. Requests sent in the first [`WARMUP`] are checked but not
//! timed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::{Hist, Latency, Opts, WARMUP, start_nats, start_node, token, user};

/// Queue group of the bench's responder.
const GROUP: &str = "agentcast-bench";
/// Frames a socket's writer may have waiting. Each socket is sent at most
/// rate / sockets requests a second (below the node's 10/s default), so the
/// queue holds a few at most; a full one is counted as a send error.
const SOCKET_QUEUE: usize = 64;
/// Time after the last request for replies still on their way; the node
/// answers `timeout` after 5 s, so everything is in by then.
const DRAIN: Duration = Duration::from_secs(6);

/// What one path saw.
struct Tally {
    hist: Hist,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// Requests numbered below this were sent during [`WARMUP`].
    warm: u64,
}

impl Tally {
    fn new(o: &Opts) -> Self {
        Tally { hist: Hist::default(), ok: 0, errors: BTreeMap::new(), warm: o.rate * WARMUP.as_secs() }
    }

    /// Records the answer to request `id` (`<i>-<sent ns>`), read at
    /// `now_ns` on the same clock.
    fn answer(&mut self, id: &str, now_ns: u64, outcome: Result<(), String>) {
        let sent = id.split_once('-').and_then(|(i, t)| Some((i.parse::<u64>().ok()?, t.parse::<u64>().ok()?)));
        match (outcome, sent) {
            (Ok(()), Some((i, t))) => {
                self.ok += 1;
                if i >= self.warm {
                    self.hist.add(now_ns.saturating_sub(t) / 1000);
                }
            }
            (Ok(()), None) => *self.errors.entry("unknown_id".into()).or_default() += 1,
            (Err(code), _) => *self.errors.entry(code).or_default() += 1,
        }
    }
}

/// The request data: a cancel, padded to about `size` bytes.
fn data(i: u64, size: usize) -> Value {
    let pad = size.saturating_sub(48);
    json!({"action": "cancel", "run_id": format!("r{i}"), "pad": "x".repeat(pad)})
}

/// Sends `rate` requests a second for `duration` through `send(i, ns since
/// clock)`; returns how many were sent and in how many seconds.
async fn schedule(rate: u64, duration: Duration, clock: Instant, mut send: impl FnMut(u64, u64)) -> (u64, f64) {
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            send(sent, clock.elapsed().as_nanos() as u64);
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (sent, start.elapsed().as_secs_f64())
}

/// The phase's figures, printed and as JSON.
fn summary(path: &str, o: &Opts, sent: u64, seconds: f64, tally: &Tally, send_errors: u64) -> Value {
    let mut lat = Latency::default();
    lat.merge(&tally.hist.sparse());
    let l = lat.summary();
    let answered = tally.ok + tally.errors.values().sum::<u64>();
    println!(
        "  {path:<10} {:>6} req/s offered {:>8.0} sent/s  p50 {:>6.3} p99 {:>6.3} p99.9 {:>6.3} max {:>7.3} ms  ok {} of {sent}  errors {:?}  unanswered {}",
        o.rate,
        sent as f64 / seconds,
        l["p50_ms"].as_f64().unwrap_or(f64::NAN),
        l["p99_ms"].as_f64().unwrap_or(f64::NAN),
        l["p999_ms"].as_f64().unwrap_or(f64::NAN),
        l["max_ms"].as_f64().unwrap_or(f64::NAN),
        tally.ok,
        tally.errors,
        sent.saturating_sub(answered),
    );
    json!({"rate_offered": o.rate, "sent": sent, "sent_per_s": sent as f64 / seconds, "ok": tally.ok,
           "errors": tally.errors, "send_errors": send_errors, "unanswered": sent.saturating_sub(answered),
           "latency": l})
}

/// Requests straight to the responder from one NATS connection.
async fn direct(nats_url: &str, o: &Opts) -> Value {
    let client = async_nats::connect(nats_url).await.expect("the direct client connects");
    let tally = Arc::new(Mutex::new(Tally::new(o)));
    // One completion per request, at most rate x duration in all.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let start = Instant::now();
    let sockets = o.sockets.max(1) as u64;
    let (sent, seconds) = schedule(o.rate, o.duration, start, |i, ns| {
        let (client, tally, done) = (client.clone(), tally.clone(), done_tx.clone());
        let u = (i % sockets) as usize;
        let id = format!("{i}-{ns}");
        let body = serde_json::to_vec(&data(i, o.size)).expect("json");
        tokio::spawn(async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(agentcast::control::HEADER_USER, user(u).as_str());
            headers.insert(agentcast::control::HEADER_NODE, "bench");
            headers.insert(agentcast::control::HEADER_REQUEST, id.as_str());
            let subject = format!("{}.{}", agentcast::control::DEFAULT_PREFIX, user(u));
            let r = client.request_with_headers(subject, headers, body.into()).await;
            let now = start.elapsed().as_nanos() as u64;
            let outcome = match r {
                Ok(m) if serde_json::from_slice::<serde_json::Map<String, Value>>(&m.payload).is_ok() => Ok(()),
                Ok(_) => Err("bad_reply".to_owned()),
                Err(e) => Err(format!("{:?}", e.kind())),
            };
            tally.lock().unwrap().answer(&id, now, outcome);
            let _ = done.send(());
        });
    })
    .await;
    drop(done_tx);
    let mut answered = 0;
    let _ = tokio::time::timeout(DRAIN, async {
        while answered < sent && done_rx.recv().await.is_some() {
            answered += 1;
        }
    })
    .await;
    let t = tally.lock().unwrap();
    summary("direct", o, sent, seconds, &t, 0)
}

/// Requests through a node: one socket per user, each a writer fed by the
/// schedule and a reader that times the replies.
async fn through_node(addr: SocketAddr, o: &Opts) -> Value {
    let tally = Arc::new(Mutex::new(Tally::new(o)));
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut queues = Vec::with_capacity(o.sockets);
    let mut tasks = Vec::with_capacity(o.sockets);
    for s in 0..o.sockets {
        let url = format!("ws://{addr}/ws?token={}", token(&user(s)));
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await.expect("socket opens");
        let (mut sink, mut stream) = ws.split();
        // The welcome comes first; requests go after it.
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) if t.contains(r#""welcome""#) => break,
                Some(Ok(_)) => {}
                other => panic!("no welcome on socket {s}: {other:?}"),
            }
        }
        let (tx, mut rx) = mpsc::channel::<String>(SOCKET_QUEUE);
        queues.push(tx);
        tasks.push(tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if sink.send(Message::text(frame)).await.is_err() {
                    break;
                }
            }
        }));
        let (tally, answered) = (tally.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(t) = msg else { continue };
                let now = start.elapsed().as_nanos() as u64;
                let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                let outcome = match v["type"].as_str() {
                    Some("control_reply") if v["data"].is_object() => Ok(()),
                    Some("control_reply") => Err("bad_reply".to_owned()),
                    Some("control_error") => Err(v["code"].as_str().unwrap_or("?").to_owned()),
                    _ => continue,
                };
                tally.lock().unwrap().answer(v["id"].as_str().unwrap_or(""), now, outcome);
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    let mut send_errors = 0u64;
    let (sent, seconds) = schedule(o.rate, o.duration, start, |i, ns| {
        let frame = json!({"type": "control", "id": format!("{i}-{ns}"), "data": data(i, o.size)}).to_string();
        if queues[(i % queues.len() as u64) as usize].try_send(frame).is_err() {
            send_errors += 1;
        }
    })
    .await;
    let deadline = Instant::now() + DRAIN;
    while answered.load(std::sync::atomic::Ordering::Relaxed) < sent - send_errors && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        t.abort();
    }
    let t = tally.lock().unwrap();
    summary("agentcast", o, sent, seconds, &t, send_errors)
}

/// Both paths, one after the other, on one nats-server and one node.
pub async fn run(o: &Opts) -> Value {
    let nats = start_nats().await;
    let (_node, addr) = start_node(&nats.url).await;
    let client = async_nats::connect(&nats.url).await.expect("the responder connects");
    let mut listener = agentcast::control::Listener::subscribe(client, agentcast::control::DEFAULT_PREFIX, GROUP)
        .await
        .expect("subscribe");
    let responder = tokio::spawn(async move {
        let reply = json!({"status": "ok"});
        while let Some(req) = listener.next().await {
            if let Err(e) = req.reply(&reply).await {
                eprintln!("  responder: {e}");
            }
        }
    });
    let direct = direct(&nats.url, o).await;
    let node = through_node(addr, o).await;
    responder.abort();
    json!({"agentcast": node, "nats-direct": direct})
}
