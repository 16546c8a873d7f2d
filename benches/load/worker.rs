//! A client worker process: holds its share of the sockets, checks every
//! event it receives, and reports to the coordinator over stdin/stdout.
//!
//! Lines from the coordinator: `report <expected>` (a JSON array, per user,
//! of how many events were published; the worker waits until each socket has
//! them all or `SETTLE` passes, then prints `result <json>`), and in a storm
//! `resume <addr>` (every socket, already dropped, reconnects with the last
//! `seq` and epoch it saw). The worker prints `ready <json>` once every
//! socket has connected or failed, and `dropped` once every socket has ended
//! after the coordinator killed the node.
//!
//! With `--stalled` (the `flood` preset) the worker's sockets never read
//! after their welcome: every [`STALL_RECONNECT`] each drops its connection
//! and opens a new one resuming from its first welcome's position (so the
//! node replays the user's whole flood into a socket that again reads
//! nothing), the way a hostile or broken client would.
//!
//! The `agentcast-sse` target opens `GET /sse` instead of a WebSocket and
//! reads the event stream (sse.rs); it serves the rate presets (`chat`,
//! `max`, `idle`, `smoke`), not a storm, stalled sockets or tokens.
//!
//! With `--tokens <tokens>,<period_ms>,<slow_every>,<slow_bps>` (the `tokens`
//! preset, tokens.rs) each socket's user streams one text answer as delta
//! events: token k of user u is [`crate::tokens::token`]`(u, k)`, created at
//! `t0 + offset(u) + k * period` (t0 from the coordinator's `tokens <t0>`
//! line). Every `slow_every`-th socket reads at most `slow_bps` bytes a
//! second (it sleeps after each message) through a small receive buffer.
//! The socket appends each frame's `delta` to its text, which makes merged
//! and unmerged frames alike; `treport <wait_ms>` waits for every text to be
//! whole (or the socket closed, or the wait to pass) and prints
//! `tresult <json>`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{Hist, Target, now_ns, token};

/// Sockets opening at once per worker: enough to fill 16k sockets in a few
/// seconds without overrunning the listener's accept backlog (somaxconn 4096).
const CONNECT_CONCURRENCY: usize = 256;
/// Longest wait for every socket to have every published event once a
/// report is asked for; what is still missing then is counted as lost.
const SETTLE: Duration = Duration::from_secs(60);
/// Source addresses 127.0.0.2 .. 127.0.0.(1 + SOURCE_ADDRESSES): each gives
/// its own ephemeral port range (28k here), so 50k+ sockets fit.
const SOURCE_ADDRESSES: u32 = 64;
/// Client read buffer: frames are small, and 50k sockets must fit in memory.
const CLIENT_READ_BUFFER: usize = 4 * 1024;
/// How long a stalled socket stays connected before it reconnects.
const STALL_RECONNECT: Duration = Duration::from_secs(5);
/// Receive buffer of a slow socket in the tokens preset: small, so the
/// throttle reaches the server instead of filling megabytes of kernel
/// buffer first.
const SLOW_RCVBUF: u32 = 4096;

#[derive(Clone)]
pub struct Spec {
    pub target: Target,
    pub addrs: Vec<SocketAddr>,
    pub first: usize,
    pub count: usize,
    pub users: usize,
    /// The sockets never read after their welcome (see the module doc).
    pub stalled: bool,
    /// The tokens preset's plan (see the module doc).
    pub tokens: Option<crate::tokens::Plan>,
}

impl Spec {
    pub fn parse(args: &[String]) -> Spec {
        let get = |k: &str| {
            let i = args.iter().position(|a| a == k).unwrap_or_else(|| panic!("worker needs {k}"));
            args[i + 1].clone()
        };
        Spec {
            target: Target::parse(&get("--target")),
            addrs: get("--addrs").split(',').map(|a| a.parse().expect("worker address")).collect(),
            first: get("--first").parse().unwrap(),
            count: get("--count").parse().unwrap(),
            users: get("--users").parse().unwrap(),
            stalled: args.iter().any(|a| a == "--stalled"),
            tokens: args.iter().position(|a| a == "--tokens").map(|i| crate::tokens::Plan::parse(&args[i + 1])),
        }
    }
}

/// What one socket has seen. `got` is a bitset over the per-user event
/// number `n`, so duplicates and reordering are told apart exactly.
#[derive(Default)]
pub struct Sock {
    got: Vec<u64>,
    distinct: u64,
    max_n: Option<u64>,
    duplicated: u64,
    reordered: u64,
    foreign: u64,
    gaps: u64,
    last_seq: u64,
    epoch: String,
    last_new_ns: u64,
    ended: bool,
    /// The tokens preset: the text so far, frames and bytes read, the
    /// bytes and tokens of the messages that began in the text's second
    /// half, and the close code if the server closed the socket.
    pub text: String,
    pub frames: u64,
    pub bytes: u64,
    pub late_bytes: u64,
    pub late_tokens: u64,
    pub closed: Option<u16>,
}

/// A socket's user and what it has seen, as the worker keeps them.
pub type SockRef = (u64, Arc<Mutex<Sock>>);

impl Sock {
    fn record(&mut self, n: u64) {
        let (w, b) = ((n / 64) as usize, n % 64);
        if self.got.len() <= w {
            self.got.resize(w + 1, 0);
        }
        if self.got[w] & (1 << b) != 0 {
            self.duplicated += 1;
            return;
        }
        self.got[w] |= 1 << b;
        self.distinct += 1;
        if self.max_n.is_some_and(|m| n < m) {
            self.reordered += 1;
        }
        self.max_n = Some(self.max_n.map_or(n, |m| m.max(n)));
        self.last_new_ns = now_ns();
    }
}

/// The event fields the harness publishes (see `crate::payload`).
#[derive(Deserialize)]
struct Ev {
    u: u64,
    n: u64,
    t: u64,
    #[serde(default)]
    w: u8,
}

/// An agentcast frame (the raw server sends the same shape).
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    seq: Option<u64>,
    event: Option<Ev>,
    epoch: Option<String>,
    position: Option<u64>,
}

struct Shared {
    hist: Mutex<Hist>,
    /// The tokens preset's slow sockets: how old each token is when it
    /// arrives (the fast sockets' go to `hist`).
    slow_hist: Mutex<Hist>,
    connected: AtomicUsize,
    failed: AtomicUsize,
    settled: Notify,
    ended: AtomicUsize,
    errors: Mutex<Vec<String>>,
    /// The tokens preset's t0 (Unix ns), 0 until the coordinator says.
    t0: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn event(&self, sock: &Mutex<Sock>, user: u64, ev: Ev) {
        let mut s = sock.lock().unwrap();
        if ev.u != user {
            s.foreign += 1;
            return;
        }
        s.record(ev.n);
        drop(s);
        if ev.w == 0 {
            let lat_us = now_ns().saturating_sub(ev.t) / 1000;
            self.hist.lock().unwrap().add(lat_us);
        }
    }

    fn error(&self, e: String) {
        let mut errs = self.errors.lock().unwrap();
        if errs.len() < 5 {
            errs.push(e);
        }
    }
}

pub async fn run(spec: Spec) {
    let shared = Arc::new(Shared {
        hist: Mutex::new(Hist::default()),
        slow_hist: Mutex::new(Hist::default()),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        settled: Notify::new(),
        ended: AtomicUsize::new(0),
        errors: Mutex::new(Vec::new()),
        t0: std::sync::atomic::AtomicU64::new(0),
    });
    let (resume_tx, resume_rx) = watch::channel::<Option<SocketAddr>>(None);
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut socks = Vec::with_capacity(spec.count);
    for i in spec.first..spec.first + spec.count {
        let sock = Arc::new(Mutex::new(Sock::default()));
        socks.push(((i % spec.users) as u64, sock.clone()));
        let ctx = SockCtx {
            index: i,
            user: (i % spec.users) as u64,
            target: spec.target,
            addr: spec.addrs[i % spec.addrs.len()],
            sock,
            shared: shared.clone(),
            gate: gate.clone(),
            resume: resume_rx.clone(),
            stalled: spec.stalled,
            plan: spec.tokens,
        };
        tokio::spawn(ctx.run());
    }
    while shared.connected.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire) < spec.count {
        shared.settled.notified().await;
    }
    let ready = json!({"connected": shared.connected.load(Ordering::Acquire),
                       "failed": shared.failed.load(Ordering::Acquire),
                       "errors": *shared.errors.lock().unwrap()});
    println!("ready {ready}");

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut dropped_told = false;
    loop {
        let line = tokio::select! {
            l = lines.next_line() => match l { Ok(Some(l)) => l, _ => return },
            _ = tokio::time::sleep(Duration::from_millis(50)), if !dropped_told => {
                if shared.ended.load(Ordering::Acquire) == spec.count && spec.count > 0 {
                    dropped_told = true;
                    println!("dropped");
                }
                continue;
            }
        };
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match cmd {
            "resume" => {
                dropped_told = false;
                shared.ended.store(0, Ordering::Release);
                let _ = resume_tx.send(Some(arg.parse().expect("resume address")));
            }
            "report" => {
                let expected: Vec<u64> = serde_json::from_str(arg).expect("expected counts");
                let deadline = tokio::time::Instant::now() + SETTLE;
                loop {
                    let whole = socks.iter().all(|(u, s)| s.lock().unwrap().distinct >= expected[*u as usize]);
                    if whole || tokio::time::Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let (mut lost, mut dup, mut reord, mut foreign, mut gaps, mut delivered, mut whole, mut last) =
                    (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
                for (u, s) in &socks {
                    let s = s.lock().unwrap();
                    let want = expected[*u as usize];
                    lost += want.saturating_sub(s.distinct);
                    whole += u64::from(s.distinct >= want);
                    dup += s.duplicated;
                    reord += s.reordered;
                    foreign += s.foreign;
                    gaps += s.gaps;
                    delivered += s.distinct;
                    last = last.max(s.last_new_ns);
                }
                let mut r = json!({"lost": lost, "duplicated": dup, "reordered": reord, "foreign": foreign,
                                   "gaps": gaps, "delivered": delivered, "whole": whole, "last_new_ns": last});
                r["latency_us"] = shared.hist.lock().unwrap().sparse();
                r["errors"] = json!(*shared.errors.lock().unwrap());
                *shared.hist.lock().unwrap() = Hist::default();
                println!("result {r}");
            }
            "tokens" => shared.t0.store(arg.parse().expect("t0"), Ordering::Release),
            "treport" => {
                let plan = spec.tokens.expect("treport needs --tokens");
                let wait = Duration::from_millis(arg.parse().expect("wait ms"));
                let r = crate::tokens::report(&plan, &socks, spec.first, wait, [&shared.hist, &shared.slow_hist]).await;
                println!("tresult {r}");
            }
            other => panic!("worker: unknown command {other:?}"),
        }
    }
}

struct SockCtx {
    index: usize,
    user: u64,
    target: Target,
    addr: SocketAddr,
    sock: Arc<Mutex<Sock>>,
    shared: Arc<Shared>,
    gate: Arc<tokio::sync::Semaphore>,
    resume: watch::Receiver<Option<SocketAddr>>,
    stalled: bool,
    plan: Option<crate::tokens::Plan>,
}

impl SockCtx {
    async fn run(mut self) {
        if self.target == Target::Sse {
            return self.run_sse().await;
        }
        let mut first = true;
        loop {
            let permit = self.gate.clone().acquire_owned().await.unwrap();
            let opened = match self.connect().await {
                Ok(ws) => self.handshake(ws).await,
                Err(e) => Err(e),
            };
            let ws = match opened {
                Ok(ws) => ws,
                Err(e) => {
                    self.shared.error(format!("socket {}: {e}", self.index));
                    if first {
                        self.shared.failed.fetch_add(1, Ordering::AcqRel);
                        self.shared.settled.notify_one();
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            drop(permit);
            if first {
                first = false;
                self.shared.connected.fetch_add(1, Ordering::AcqRel);
                self.shared.settled.notify_one();
            }
            if self.stalled {
                // Holds the socket without reading, then comes back.
                tokio::time::sleep(STALL_RECONNECT).await;
                drop(ws);
                continue;
            }
            self.read(ws).await;
            self.sock.lock().unwrap().ended = true;
            self.shared.ended.fetch_add(1, Ordering::AcqRel);
            // Only a storm reconnects: wait for the coordinator's word.
            if self.resume.changed().await.is_err() {
                return;
            }
            self.addr = self.resume.borrow().expect("resume address");
        }
    }

    /// A TCP connection to the socket's server from its source address.
    async fn tcp(&self) -> Result<tokio::net::TcpStream, String> {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + (self.index as u32 % SOURCE_ADDRESSES));
        let tcp = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        if self.plan.is_some_and(|p| p.is_slow(self.index)) {
            tcp.set_recv_buffer_size(SLOW_RCVBUF).map_err(|e| e.to_string())?;
        }
        tcp.bind(SocketAddr::new(IpAddr::V4(src), 0)).map_err(|e| format!("bind {src}: {e}"))?;
        let stream = tcp.connect(self.addr).await.map_err(|e| format!("connect {}: {e}", self.addr))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(stream)
    }

    async fn connect(&self) -> Result<Ws, String> {
        let stream = self.tcp().await?;
        let user = crate::user(self.user as usize);
        let url = match self.target {
            Target::Agentcast => {
                let s = self.sock.lock().unwrap();
                // A stalled socket asks for a replay even from 0 (all the user has).
                if s.last_seq == 0 && !self.stalled {
                    format!("ws://{}/ws?token={}", self.addr, token(&user))
                } else {
                    format!("ws://{}/ws?token={}&last_seq={}&epoch={}", self.addr, token(&user), s.last_seq, s.epoch)
                }
            }
            Target::NatsWs => format!("ws://{}/", self.addr),
            Target::Raw | Target::RawJs => format!("ws://{}/ws?user={user}", self.addr),
            Target::Sse => unreachable!("SSE sockets are opened by run_sse"),
        };
        let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER).write_buffer_size(0);
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(30),
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)),
        )
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
        Ok(ws)
    }

    /// Checks one agentcast frame, a WebSocket text message or an event
    /// stream's data: an event is recorded (and its `seq` kept for a
    /// resume), a gap counted and reported. False for a `close` frame, with
    /// which an event stream ends.
    fn on_frame(&self, text: &str) -> bool {
        match serde_json::from_str::<Frame>(text) {
            Ok(f) if f.kind == "event" => {
                if let Some(seq) = f.seq {
                    self.sock.lock().unwrap().last_seq = seq;
                }
                match f.event {
                    Some(ev) => self.shared.event(&self.sock, self.user, ev),
                    None => self.shared.error(format!("event without fields: {text}")),
                }
            }
            Ok(f) if f.kind == "gap" => {
                self.sock.lock().unwrap().gaps += 1;
                self.shared.error(format!("gap: {text}"));
            }
            Ok(f) if f.kind == "close" => {
                self.shared.error(format!("closed: {text}"));
                return false;
            }
            Ok(_) => {}
            Err(e) => self.shared.error(format!("bad frame {e}: {text}")),
        }
        true
    }

    /// The `agentcast-sse` socket: opens the stream, then checks every event
    /// as a WebSocket's, until the response ends.
    async fn run_sse(self) {
        assert!(!self.stalled && self.plan.is_none(), "agentcast-sse serves the rate presets only");
        let permit = self.gate.clone().acquire_owned().await.unwrap();
        let opened = async {
            let user = crate::user(self.user as usize);
            let mut stream = crate::sse::Stream::open(self.tcp().await?, self.addr, &token(&user)).await?;
            // Its welcome first.
            match stream.next().await? {
                Some(ev) if ev.event == "welcome" => Ok(stream),
                other => Err(format!("before welcome: {other:?}")),
            }
        };
        let stream = tokio::time::timeout(Duration::from_secs(30), opened)
            .await
            .unwrap_or_else(|_| Err("no welcome within 30 s".into()));
        drop(permit);
        let mut stream = match stream {
            Ok(stream) => {
                self.shared.connected.fetch_add(1, Ordering::AcqRel);
                self.shared.settled.notify_one();
                stream
            }
            Err(e) => {
                self.shared.error(format!("socket {}: {e}", self.index));
                self.shared.failed.fetch_add(1, Ordering::AcqRel);
                self.shared.settled.notify_one();
                return;
            }
        };
        loop {
            match stream.next().await {
                Ok(Some(ev)) => {
                    if !self.on_frame(&ev.data) {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.shared.error(format!("socket {}: {e}", self.index));
                    break;
                }
            }
        }
        self.sock.lock().unwrap().ended = true;
        self.shared.ended.fetch_add(1, Ordering::AcqRel);
    }

    /// Reads until the socket is ready to receive: agentcast's and the raw
    /// server's `welcome`, or NATS's PONG after CONNECT and SUB.
    async fn handshake(&self, mut ws: Ws) -> Result<Ws, String> {
        if self.target == Target::NatsWs {
            let subject = format!("agentcast.live.{}", crate::user(self.user as usize));
            let hello = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1,\"echo\":false}}\r\nSUB {subject} 1\r\nPING\r\n"
            );
            ws.send(Message::binary(hello.into_bytes())).await.map_err(|e| e.to_string())?;
        }
        let mut nats = NatsParser::default();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .map_err(|_| "no welcome within 30 s".to_string())?;
            match msg {
                Some(Ok(Message::Text(t))) if self.target != Target::NatsWs => {
                    let f: Frame = serde_json::from_str(t.as_str()).map_err(|e| format!("{e}: {t}"))?;
                    match f.kind {
                        "welcome" => {
                            let mut s = self.sock.lock().unwrap();
                            if let Some(e) = f.epoch {
                                s.epoch = e;
                            }
                            // A stalled socket resumes from its first
                            // position: it never reads an event.
                            if self.stalled && s.last_seq == 0 {
                                s.last_seq = f.position.unwrap_or(0);
                            }
                            drop(s);
                            return Ok(ws);
                        }
                        // Resumed events may come before nothing else; a
                        // gap here is a failure the report shows.
                        "gap" => self.sock.lock().unwrap().gaps += 1,
                        _ => return Err(format!("before welcome: {t}")),
                    }
                }
                Some(Ok(Message::Binary(b))) if self.target == Target::NatsWs => {
                    nats.buf.extend_from_slice(&b);
                    let mut pong = false;
                    while let Some(item) = nats.next().map_err(|e| e.to_string())? {
                        match item {
                            NatsItem::Pong => pong = true,
                            NatsItem::Ping => {
                                ws.send(Message::binary(&b"PONG\r\n"[..])).await.map_err(|e| e.to_string())?
                            }
                            NatsItem::Err(e) => return Err(format!("nats: {e}")),
                            NatsItem::Msg(_) | NatsItem::Other => {}
                        }
                    }
                    if pong {
                        return Ok(ws);
                    }
                }
                Some(Ok(_)) => {}
                other => return Err(format!("ended before welcome: {other:?}")),
            }
        }
    }

    async fn read(&self, mut ws: Ws) {
        let mut nats = NatsParser::default();
        if let Some(plan) = self.plan {
            return self.read_tokens(ws, plan, nats).await;
        }
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(t)) => {
                    self.on_frame(t.as_str());
                }
                Ok(Message::Binary(b)) => {
                    let (payloads, go_on) = self.nats_payloads(&mut ws, &mut nats, &b).await;
                    for payload in payloads {
                        match serde_json::from_slice::<Ev>(&payload) {
                            Ok(ev) => self.shared.event(&self.sock, self.user, ev),
                            Err(e) => self.shared.error(format!("bad payload: {e}")),
                        }
                    }
                    if !go_on {
                        return;
                    }
                }
                Ok(Message::Close(c)) => {
                    if let Some(c) = c
                        && u16::from(c.code) != 1000
                    {
                        self.shared.error(format!("closed {} {}", c.code, c.reason));
                    }
                    return;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

impl SockCtx {
    /// Feeds a binary message to the NATS parser: the MSG payloads it
    /// completes, PINGs answered, `-ERR`s reported. The flag is false when
    /// the socket is done (a PONG could not be sent, or the protocol broke).
    async fn nats_payloads(&self, ws: &mut Ws, nats: &mut NatsParser, bytes: &[u8]) -> (Vec<Vec<u8>>, bool) {
        nats.buf.extend_from_slice(bytes);
        let mut payloads = Vec::new();
        loop {
            match nats.next() {
                Ok(Some(NatsItem::Msg(payload))) => payloads.push(payload),
                Ok(Some(NatsItem::Ping)) => {
                    if ws.send(Message::binary(&b"PONG\r\n"[..])).await.is_err() {
                        return (payloads, false);
                    }
                }
                Ok(Some(NatsItem::Err(e))) => self.shared.error(format!("nats: {e}")),
                Ok(Some(_)) => {}
                Ok(None) => return (payloads, true),
                Err(e) => {
                    self.shared.error(format!("nats protocol: {e}"));
                    return (payloads, false);
                }
            }
        }
    }

    /// The tokens preset's reader: appends each delta, times the tokens it
    /// completes, and throttles slow sockets.
    async fn read_tokens(&self, mut ws: Ws, plan: crate::tokens::Plan, mut nats: NatsParser) {
        let slow = plan.is_slow(self.index);
        #[derive(Deserialize)]
        struct Delta {
            delta: String,
        }
        #[derive(Deserialize)]
        struct DeltaFrame {
            #[serde(rename = "type")]
            kind: String,
            event: Option<Delta>,
        }
        while let Some(msg) = ws.next().await {
            let size = match &msg {
                Ok(m) => m.len() as u64,
                Err(_) => 0,
            };
            let mut deltas = Vec::new();
            match msg {
                Ok(Message::Text(t)) => match serde_json::from_str::<DeltaFrame>(t.as_str()) {
                    Ok(f) if f.kind == "event" => match f.event {
                        Some(d) => deltas.push(d.delta),
                        None => self.shared.error(format!("event without delta: {t}")),
                    },
                    Ok(f) if f.kind == "gap" => self.shared.error(format!("gap: {t}")),
                    Ok(_) => {}
                    Err(e) => self.shared.error(format!("bad frame {e}: {t}")),
                },
                Ok(Message::Binary(b)) => {
                    let (payloads, go_on) = self.nats_payloads(&mut ws, &mut nats, &b).await;
                    for payload in payloads {
                        match serde_json::from_slice::<Delta>(&payload) {
                            Ok(d) => deltas.push(d.delta),
                            Err(e) => self.shared.error(format!("bad payload: {e}")),
                        }
                    }
                    if !go_on {
                        self.sock.lock().unwrap().closed.get_or_insert(1006);
                        return;
                    }
                }
                Ok(Message::Close(c)) => {
                    self.sock.lock().unwrap().closed = Some(c.map_or(1005, |c| u16::from(c.code)));
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    let mut s = self.sock.lock().unwrap();
                    s.closed = Some(1006);
                    drop(s);
                    self.shared.error(format!("socket {}: {e}", self.index));
                    return;
                }
            }
            let now = now_ns();
            let t0 = self.shared.t0.load(Ordering::Acquire);
            {
                let mut s = self.sock.lock().unwrap();
                s.bytes += size;
                s.frames += deltas.len() as u64;
                let starts = s.text.len() / crate::tokens::TOKEN_BYTES;
                let late = starts as u64 >= plan.tokens / 2;
                if late {
                    s.late_bytes += size;
                }
                for d in deltas {
                    let before = s.text.len() / crate::tokens::TOKEN_BYTES;
                    s.text.push_str(&d);
                    let after = s.text.len() / crate::tokens::TOKEN_BYTES;
                    if late {
                        s.late_tokens += (after - before) as u64;
                    }
                    if t0 > 0 {
                        let mut hist = if slow { &self.shared.slow_hist } else { &self.shared.hist }.lock().unwrap();
                        for k in (before..after).filter(|k| *k as u64 >= plan.warm_tokens()) {
                            let created = plan.created_ns(t0, self.user, k as u64);
                            hist.add(now.saturating_sub(created) / 1000);
                        }
                    }
                }
            }
            if slow && size > 0 {
                tokio::time::sleep(Duration::from_secs_f64(size as f64 / plan.slow_bps as f64)).await;
            }
        }
        self.sock.lock().unwrap().closed.get_or_insert(1006);
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// The few NATS server operations a subscriber sees.
enum NatsItem {
    Msg(Vec<u8>),
    Ping,
    Pong,
    Err(String),
    Other,
}

/// NATS protocol parser for bytes arriving over WebSocket frames, which need
/// not align with operations.
#[derive(Default)]
struct NatsParser {
    buf: Vec<u8>,
}

impl NatsParser {
    fn next(&mut self) -> Result<Option<NatsItem>, String> {
        let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let line = std::str::from_utf8(&self.buf[..eol]).map_err(|e| e.to_string())?.to_owned();
        let mut parts = line.split_ascii_whitespace();
        let op = parts.next().unwrap_or("").to_ascii_uppercase();
        let item = match op.as_str() {
            "MSG" | "HMSG" => {
                let args: Vec<&str> = parts.collect();
                let total: usize = args.last().and_then(|a| a.parse().ok()).ok_or(format!("bad {line}"))?;
                let hdr: usize = if op == "HMSG" {
                    args.get(args.len().wrapping_sub(2)).and_then(|a| a.parse().ok()).ok_or(format!("bad {line}"))?
                } else {
                    0
                };
                if self.buf.len() < eol + 2 + total + 2 {
                    return Ok(None);
                }
                let payload = self.buf[eol + 2 + hdr..eol + 2 + total].to_vec();
                self.buf.drain(..eol + 2 + total + 2);
                return Ok(Some(NatsItem::Msg(payload)));
            }
            "PING" => NatsItem::Ping,
            "PONG" => NatsItem::Pong,
            "-ERR" => NatsItem::Err(line.clone()),
            _ => NatsItem::Other,
        };
        self.buf.drain(..eol + 2);
        Ok(Some(item))
    }
}
