//! The `tokens` preset: streamed text. `--users` runs (one socket each)
//! stream one answer each, `--rate` tokens a second of [`TOKEN_BYTES`] bytes
//! for `--duration`, through the coalescing [`agentcast::publisher::TextStream`]
//! (`--coalesce-ms`, default 50; 0 publishes every token as its own event).
//! Every `--slow-every`-th socket reads at most `--slow-bps` bytes a second
//! (worker.rs). The same publishing runs against agentcast and against
//! nats-server's WebSocket listener (which delivers every stored event as
//! its own message: it cannot merge).
//!
//! Reported: for fast sockets, the time from a token's creation at the
//! publisher (its scheduled time) to the socket, coalescing included; for
//! slow sockets, how many were closed, how many texts are whole and exact,
//! the bytes and frames they read per token (over the whole text and over
//! its second half, once the buffers between socket and node are full),
//! and the same time (how stale their text is, their reading pace
//! included); JetStream messages and stored bytes per token.

use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use crate::worker::SockRef;
use crate::{Hist, Latency, Opts, Target, WARMUP, now_ns, ready, setup, spawn_worker, user};
use agentcast::publisher::{Coalesce, Event, Publisher};

/// Every token is this many bytes (three hex digits and a space), so a
/// socket knows which tokens a text of a given length holds.
pub const TOKEN_BYTES: usize = 4;
/// Time from the start command to the first token: every socket has its
/// welcome by then, and the tokens' creation times are in the future.
const LEAD: Duration = Duration::from_secs(2);
/// Longest wait, after the last token, for texts still on their way (slow
/// sockets take long by design; what is missing then is reported).
const SETTLE: Duration = Duration::from_secs(20);

/// Token k of user u: deterministic, so every socket knows its whole text.
pub fn token(u: u64, k: u64) -> String {
    format!("{:03x} ", (u * 31 + k) % 4096)
}

/// What every worker needs to know of the workload.
#[derive(Clone, Copy)]
pub struct Plan {
    pub tokens: u64,
    pub period_ms: u64,
    pub slow_every: usize,
    pub slow_bps: u64,
}

impl Plan {
    pub fn parse(s: &str) -> Plan {
        let v: Vec<u64> = s.split(',').map(|x| x.parse().expect("--tokens n,period_ms,slow_every,slow_bps")).collect();
        assert_eq!(v.len(), 4, "--tokens n,period_ms,slow_every,slow_bps");
        Plan { tokens: v[0], period_ms: v[1].max(1), slow_every: v[2] as usize, slow_bps: v[3].max(1) }
    }

    fn arg(&self) -> String {
        format!("{},{},{},{}", self.tokens, self.period_ms, self.slow_every, self.slow_bps)
    }

    pub fn is_slow(&self, socket: usize) -> bool {
        self.slow_every > 0 && socket.is_multiple_of(self.slow_every)
    }

    /// Runs start spread over one period, so publishes do not come in steps.
    pub fn created_ns(&self, t0: u64, u: u64, k: u64) -> u64 {
        let period = self.period_ms * 1_000_000;
        t0 + period * (u % 100) / 100 + k * period
    }

    /// Tokens created during [`WARMUP`]: checked but not timed.
    pub fn warm_tokens(&self) -> u64 {
        WARMUP.as_millis() as u64 / self.period_ms
    }

    pub fn text(&self, u: u64) -> String {
        (0..self.tokens).map(|k| token(u, k)).collect()
    }
}

/// Worker side: waits until every socket's text is whole or it was closed
/// (at most `wait`), then sums fast and slow sockets apart.
/// `hists` are the fast and the slow sockets' token times.
pub async fn report(plan: &Plan, socks: &[SockRef], first: usize, wait: Duration, hists: [&Mutex<Hist>; 2]) -> Value {
    let deadline = tokio::time::Instant::now() + wait;
    let want = plan.tokens as usize * TOKEN_BYTES;
    loop {
        let done =
            socks.iter().all(|(_, s)| s.lock().map(|s| s.text.len() >= want || s.closed.is_some()).unwrap_or(true));
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sum = [json!({}), json!({})];
    for (i, (u, s)) in socks.iter().enumerate() {
        let Ok(s) = s.lock() else { continue };
        let slow = plan.is_slow(first + i);
        let text = plan.text(*u);
        let t = &mut sum[usize::from(slow)];
        let add = |t: &mut Value, k: &str, n: u64| t[k] = json!(t[k].as_u64().unwrap_or(0) + n);
        add(t, "sockets", 1);
        add(t, "closed", u64::from(s.closed.is_some_and(|c| c != 1000)));
        add(t, "whole_and_exact", u64::from(s.text == text));
        add(t, "prefix_exact", u64::from(text.starts_with(&s.text)));
        add(t, "tokens_read", (s.text.len() / TOKEN_BYTES) as u64);
        add(t, "bytes", s.bytes);
        add(t, "frames", s.frames);
        add(t, "late_bytes", s.late_bytes);
        add(t, "late_tokens", s.late_tokens);
        if let Some(c) = s.closed.filter(|c| *c != 1000) {
            t["close_codes"][c.to_string()] = json!(t["close_codes"][c.to_string()].as_u64().unwrap_or(0) + 1);
        }
    }
    let mut r = json!({"fast": sum[0], "slow": sum[1]});
    for (side, hist) in ["fast", "slow"].into_iter().zip(hists) {
        let mut h = hist.lock().unwrap_or_else(|e| e.into_inner());
        r[side]["latency_us"] = h.sparse();
        *h = Hist::default();
    }
    r
}

/// What a tokens run must show to count as sane (the smoke run): no
/// publish failed, every fast socket has its whole text, exact, and every
/// text read is exact as far as it goes.
pub fn check(v: &Value) -> Result<(), String> {
    let n = |side: &str, k: &str| v[side][k].as_u64().unwrap_or(0);
    if v["publish_errors"].as_array().is_none_or(|e| !e.is_empty()) {
        return Err(format!("publish errors: {}", v["publish_errors"]));
    }
    if n("fast", "whole_and_exact") != n("fast", "sockets") || n("fast", "sockets") == 0 {
        return Err(format!("fast sockets not whole and exact: {}", v["fast"]));
    }
    for side in ["fast", "slow"] {
        if n(side, "prefix_exact") != n(side, "sockets") {
            return Err(format!("{side} sockets with a wrong text: {}", v[side]));
        }
    }
    Ok(())
}

/// One target: the publishing runs and the sockets' reports.
pub async fn run(target: Target, o: &Opts) -> Value {
    let plan = Plan {
        tokens: o.duration.as_secs() * o.rate,
        period_ms: 1000 / o.rate.max(1),
        slow_every: o.slow_every,
        slow_bps: o.slow_bps,
    };
    let s = setup(target, o.sockets, false).await;
    let addrs = s.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let extra = ["--tokens".to_owned(), plan.arg()];
    let n = o.sockets.div_ceil(crate::SOCKETS_PER_PROCESS).max(1);
    let workers = (0..n)
        .map(|w| {
            let first = o.sockets * w / n;
            spawn_worker(target, &addrs, first, o.sockets * (w + 1) / n - first, o.users, &extra)
        })
        .collect();
    let (mut workers, connected) = ready(workers).await;
    let client = async_nats::connect(&s.nats[0].url).await.expect("publisher connects");
    let js = async_nats::jetstream::new(client.clone());
    let before = js.get_stream("AGENTCAST").await.expect("stream").info().await.expect("stream info").state.clone();
    let publisher = Publisher::new(client);
    let coalesce = if o.coalesce_ms == 0 {
        Coalesce { delay: Duration::ZERO, max_bytes: 1 }
    } else {
        Coalesce { delay: Duration::from_millis(o.coalesce_ms), ..Coalesce::default() }
    };
    let t0 = now_ns() + LEAD.as_nanos() as u64;
    for w in &mut workers {
        w.send(&format!("tokens {t0}")).await;
    }
    let start = tokio::time::Instant::now() + LEAD;
    let mut runs = Vec::new();
    for u in 0..o.users as u64 {
        let publisher = publisher.clone();
        runs.push(tokio::spawn(async move {
            let template = Event::new("message_delta", json!({}))?.run(&format!("run-{u}"));
            let stream = publisher.text_stream(&user(u as usize), &template, &format!("m-{u}"), coalesce)?;
            let mut late_ms = 0u64;
            for k in 0..plan.tokens {
                let at = plan.created_ns(t0, u, k) - t0;
                let due = start + Duration::from_nanos(at);
                late_ms = late_ms.max(tokio::time::Instant::now().saturating_duration_since(due).as_millis() as u64);
                tokio::time::sleep_until(due).await;
                stream.push(token(u, k)).await?;
            }
            Ok::<_, agentcast::publisher::PublishError>((stream.finish().await?.len() as u64, late_ms))
        }));
    }
    let (mut deltas, mut errors, mut late_ms) = (0u64, Vec::new(), 0u64);
    for r in runs {
        match r.await {
            Ok(Ok((d, late))) => {
                deltas += d;
                late_ms = late_ms.max(late);
            }
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let after = js.get_stream("AGENTCAST").await.expect("stream").info().await.expect("stream info").state.clone();
    let tokens = plan.tokens * o.users as u64;
    for w in &mut workers {
        w.send(&format!("treport {}", SETTLE.as_millis())).await;
    }
    let mut lat = [Latency::default(), Latency::default()];
    let mut sum = json!({"fast": {}, "slow": {}});
    for w in &mut workers {
        let r: Value = serde_json::from_str(&w.expect("tresult").await).expect("tresult json");
        for (i, side) in ["fast", "slow"].into_iter().enumerate() {
            lat[i].merge(&r[side]["latency_us"]);
            for (k, v) in r[side].as_object().into_iter().flatten().filter(|(k, _)| *k != "latency_us") {
                if let Some(n) = v.as_u64() {
                    sum[side][k] = json!(sum[side][k].as_u64().unwrap_or(0) + n);
                } else {
                    sum[side][k] = v.clone();
                }
            }
        }
    }
    for side in ["fast", "slow"] {
        let read = sum[side]["tokens_read"].as_f64().unwrap_or(0.0);
        for k in ["bytes", "frames"] {
            let per = sum[side][k].as_f64().unwrap_or(0.0) / read;
            sum[side][format!("{k}_per_token")] =
                if read > 0.0 { json!((per * 100.0).round() / 100.0) } else { Value::Null };
        }
    }
    // Once a slow socket has fallen behind (its first seconds fill the
    // buffers between it and the node, unmerged), the text's second half.
    for side in ["fast", "slow"] {
        let (b, t) =
            (sum[side]["late_bytes"].as_f64().unwrap_or(0.0), sum[side]["late_tokens"].as_f64().unwrap_or(0.0));
        sum[side]["second_half_bytes_per_token"] =
            if t > 0.0 { json!((b / t * 100.0).round() / 100.0) } else { Value::Null };
    }
    // For slow sockets: how stale the text they show is, their reading
    // pace included.
    sum["fast"]["latency"] = lat[0].summary();
    sum["slow"]["latency"] = lat[1].summary();
    let stored = after.messages.saturating_sub(before.messages);
    let stored_bytes = after.bytes.saturating_sub(before.bytes);
    let v = json!({"connected": connected, "tokens": tokens, "deltas_acked": deltas,
        "jetstream_messages_per_token": stored as f64 / tokens.max(1) as f64,
        "jetstream_bytes_per_token": stored_bytes as f64 / tokens.max(1) as f64,
        "publisher_late_max_ms": late_ms, "publish_errors": errors.iter().take(5).collect::<Vec<_>>(),
        "fast": sum["fast"], "slow": sum["slow"]});
    println!("  {}: {v}", target.name());
    drop(s);
    v
}
