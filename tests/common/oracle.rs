//! The continuity oracle of issue 14, for tests that try to break it: a
//! client session's frames are checked against what was published for its
//! user. Events must be strictly increasing, after the session's start, the
//! user's own and real (the payload names user and publish index); every
//! event of the user published after the start, up to a bound, must arrive
//! exactly once or lie inside a `gap` received before the next event beyond
//! it. A gap where nothing was lost is allowed; silence is not.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// What was published, per user, in publish order (index = the payload's `i`).
#[derive(Default, Clone, Debug)]
pub struct Published {
    pub seqs: HashMap<String, Vec<u64>>,
}

impl Published {
    pub fn payload(user: &str, i: usize) -> String {
        format!(r#"{{"u":"{user}","i":{i}}}"#)
    }

    /// Publishes the user's next event and records its sequence.
    pub async fn publish(&mut self, js: &async_nats::jetstream::Context, user: &str) -> u64 {
        let list = self.seqs.entry(user.to_owned()).or_default();
        let seq = super::publish(js, user, Self::payload(user, list.len())).await;
        list.push(seq);
        seq
    }

    pub async fn publish_n(&mut self, js: &async_nats::jetstream::Context, user: &str, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.publish(js, user).await);
        }
        out
    }

    pub fn of(&self, user: &str) -> &[u64] {
        self.seqs.get(user).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The user's newest published sequence (0 when none).
    pub fn newest(&self, user: &str) -> u64 {
        self.of(user).last().copied().unwrap_or(0)
    }
}

/// A raw socket session: everything it received, in order.
pub struct Session {
    pub user: String,
    /// The position it resumed from (`last_seq`), or its welcome's position
    /// for a socket opened without one.
    pub start: u64,
    pub resumed: bool,
    pub node: String,
    pub frames: Vec<Value>,
    pub closed: Option<String>,
    ws: Option<super::Ws>,
}

impl Session {
    /// Opens a socket at `base` (`ws://host:port`) for `user`, resuming from
    /// `last_seq` (with `epoch`) or live when `None`, and reads its welcome.
    pub async fn open(base: &str, user: &str, last_seq: Option<u64>, epoch: Option<&str>) -> Result<Self, String> {
        let mut url = format!("{base}/ws?token={}", super::token(user));
        if let Some(l) = last_seq {
            url.push_str(&format!("&last_seq={l}"));
            if let Some(e) = epoch {
                url.push_str(&format!("&epoch={e}"));
            }
        }
        let (ws, _) = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url.as_str()))
            .await
            .map_err(|_| format!("connect {base}: timeout"))?
            .map_err(|e| format!("connect {base}: {e}"))?;
        let mut s = Self {
            user: user.to_owned(),
            start: last_seq.unwrap_or(0),
            resumed: last_seq.is_some(),
            node: base.to_owned(),
            frames: Vec::new(),
            closed: None,
            ws: Some(ws),
        };
        s.read_one(Duration::from_secs(10)).await;
        match s.frames.first() {
            Some(w) if w["type"] == "welcome" => {
                if last_seq.is_none() {
                    s.start = w["position"].as_u64().unwrap_or(0);
                }
                Ok(s)
            }
            other => Err(format!("no welcome from {base}: {other:?}, closed {:?}", s.closed)),
        }
    }

    pub fn epoch(&self) -> Option<String> {
        self.frames.first().and_then(|w| w["epoch"].as_str()).map(str::to_owned)
    }

    /// Reads one frame within `d`; false on timeout or once closed.
    pub async fn read_one(&mut self, d: Duration) -> bool {
        let Some(ws) = self.ws.as_mut() else { return false };
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => return false,
                Ok(Some(Ok(Message::Text(t)))) => {
                    self.frames.push(serde_json::from_str(t.as_str()).expect("json frame"));
                    return true;
                }
                Ok(Some(Ok(Message::Close(c)))) => {
                    self.closed = Some(format!("close {c:?}"));
                    self.ws = None;
                    return false;
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => {
                    self.closed = Some(format!("error {e}"));
                    self.ws = None;
                    return false;
                }
                Ok(None) => {
                    self.closed = Some("end of stream".into());
                    self.ws = None;
                    return false;
                }
            }
        }
    }

    /// Whatever frames are already there (within `d`), without waiting longer.
    pub async fn drain_for(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while self.ws.is_some() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.read_one(left).await {
                break;
            }
        }
    }

    /// How far the session is accounted for: the newest event received or
    /// gap end, or its start.
    pub fn accounted(&self) -> u64 {
        let mut a = self.start;
        for f in &self.frames {
            match f["type"].as_str() {
                Some("event") => a = a.max(f["seq"].as_u64().unwrap_or(0)),
                Some("gap") if f["reason"] != "stream_reset" => a = a.max(f["to"].as_u64().unwrap_or(0)),
                _ => {}
            }
        }
        a
    }

    /// Reads until the session is accounted up to `upto`, for at most `d`.
    /// True when it got there.
    pub async fn read_until(&mut self, upto: u64, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        while self.accounted() < upto {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.read_one(left).await {
                return self.accounted() >= upto;
            }
        }
        true
    }

    pub async fn close(&mut self) {
        if let Some(mut ws) = self.ws.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        }
    }

    pub fn is_open(&self) -> bool {
        self.ws.is_some()
    }

    /// The positions this session makes legitimate for a later resume: the
    /// seqs it received, the `to` of its gaps, its welcome's position.
    pub fn positions(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for f in &self.frames {
            match f["type"].as_str() {
                Some("event") => out.extend(f["seq"].as_u64()),
                Some("gap") => out.extend(f["to"].as_u64()),
                Some("welcome") => out.extend(f["position"].as_u64()),
                _ => {}
            }
        }
        out
    }

    /// The oracle: `Err` holds a diagnosis. Every published event of the
    /// user in (start, upto] must be received once or covered by a gap that
    /// came before the next received event beyond it.
    pub fn check(&self, published: &Published, upto: u64) -> Result<(), String> {
        let mine = published.of(&self.user);
        let mut problems = Vec::new();
        let mut last = 0u64;
        // (frame index, seq) of events; (frame index, from, to) of gaps.
        let mut events: Vec<(usize, u64)> = Vec::new();
        let mut gaps: Vec<(usize, u64, u64)> = Vec::new();
        for (i, f) in self.frames.iter().enumerate() {
            match f["type"].as_str() {
                Some("event") => {
                    let seq = f["seq"].as_u64().unwrap_or(0);
                    if seq <= last {
                        problems.push(format!("event {seq} after {last}: not strictly increasing"));
                    }
                    if seq <= self.start {
                        problems.push(format!("event {seq} is not after the start {}", self.start));
                    }
                    let (u, idx) = (f["event"]["u"].as_str(), f["event"]["i"].as_u64());
                    if u != Some(self.user.as_str()) {
                        problems.push(format!("event {seq} is not the user's: {}", f["event"]));
                    } else if idx.and_then(|i| mine.get(i as usize)) != Some(&seq) {
                        problems.push(format!("event {seq} is not a published event of the user: {}", f["event"]));
                    }
                    last = last.max(seq);
                    events.push((i, seq));
                }
                Some("gap") => {
                    if f["reason"] == "stream_reset" {
                        problems.push(format!("unexpected stream_reset gap {f}"));
                        continue;
                    }
                    let (from, to) = (f["from"].as_u64().unwrap_or(0), f["to"].as_u64().unwrap_or(0));
                    gaps.push((i, from, to));
                }
                _ => {}
            }
        }
        let mut missing = Vec::new();
        for &p in mine.iter().filter(|p| **p > self.start && **p <= upto) {
            let n = events.iter().filter(|e| e.1 == p).count();
            if n == 1 {
                continue;
            }
            if n > 1 {
                problems.push(format!("event {p} received {n} times"));
                continue;
            }
            // Not received: a gap covering it must come before the next
            // received event beyond it.
            let next_beyond = events.iter().find(|e| e.1 > p).map(|e| e.0).unwrap_or(usize::MAX);
            if !gaps.iter().any(|&(i, from, to)| i < next_beyond && from <= p && p <= to) {
                missing.push(p);
            }
        }
        if !missing.is_empty() {
            problems.push(format!("SILENTLY MISSING {} event(s): {}", missing.len(), ranges(&missing)));
        }
        if problems.is_empty() {
            return Ok(());
        }
        let expected: Vec<u64> = mine.iter().copied().filter(|p| *p > self.start && *p <= upto).collect();
        let received: Vec<u64> = events.iter().map(|e| e.1).collect();
        let gaps: Vec<String> = gaps.iter().map(|g| format!("{}..{}", g.1, g.2)).collect();
        Err(format!(
            "user {} on {} from {} {} (checked up to {upto}): {}\n    expected (published, not necessarily still stored): {}\n    received: {}\n    gaps: {:?}\n    welcome: {}{}",
            self.user,
            self.node,
            if self.resumed { "last_seq" } else { "welcome position" },
            self.start,
            problems.join("; "),
            ranges(&expected),
            ranges(&received),
            gaps,
            self.frames.first().map(|w| w.to_string()).unwrap_or_default(),
            self.closed.as_ref().map(|c| format!("\n    ended: {c}")).unwrap_or_default(),
        ))
    }
}

/// `[2, 3, 4, 7]` as "2..4, 7".
pub fn ranges(seqs: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] == seqs[j] + 1 {
            j += 1;
        }
        out.push(if i == j { seqs[i].to_string() } else { format!("{}..{}", seqs[i], seqs[j]) });
        i = j + 1;
    }
    if out.is_empty() { "none".into() } else { out.join(", ") }
}
