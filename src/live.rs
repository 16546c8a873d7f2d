//! The users' live subscriptions, on a NATS connection of the node's own.
//!
//! Everything else a node says to NATS (history reads, control requests,
//! checks) goes through async-nats. Live messages do not, for two reasons
//! measured under `cargo bench --bench load -- --preset chat` and `idle`
//! (docs/benchmarks.md):
//! - An async-nats subscription is a tokio channel whose first block of 32
//!   `Message`s (about 6 KB) is allocated when it is made: at one socket per
//!   user that was half of an idle user's memory.
//! - async-nats parses every header of every message into a map (three to
//!   four allocations a header); the republished events carry five, and the
//!   hub reads four of them. Parsing and dropping those maps was about 11% of
//!   the node's CPU.
//!
//! This module speaks the part of the NATS client protocol a subscriber
//! needs (INFO, CONNECT with the node's login and TLS, SUB, UNSUB, MSG,
//! HMSG, PING, PONG), takes the stamps the hub reads ([`LiveMsg`]) in one
//! pass over the headers, and hands each message to its subscription's
//! [`Inbox`]: to the hub's handler at once while the user's task is idle,
//! else into a queue for that task, which holds nothing until a message
//! waits.
//!
//! The connection is kept up by one task: it connects to the configured
//! servers and those the servers announce, in turn, retrying forever; after
//! each (re)connect it subscribes again to every subject it holds and tells
//! the hub ([`Signals`]), whose audit then reads what the connection missed
//! meanwhile. A connection that answers no PING within
//! [`PING_INTERVAL`] × [`MAX_PINGS_OUT`] is taken for dead.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::NatsLogin;
use crate::metrics as m;

/// What the hub learns of the live connection. `Notify` keeps one pending
/// signal when nobody waits, so none is lost and bursts collapse into one.
#[derive(Debug, Default)]
pub struct Signals {
    /// The connection came (back) up: messages may have been missed.
    pub connected: Notify,
    /// Set at the first connect, so later ones count as reconnects.
    pub was_connected: AtomicBool,
}

/// Time allowed to open a connection: TCP, INFO, TLS, CONNECT and the first
/// PONG. A server that takes longer is tried again later, the next one first.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed for one write (a SUB, UNSUB, PING or PONG) to a connected
/// server; a server that takes no bytes for this long is taken for gone and
/// the connection is opened again.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the node PINGs the server when it hears nothing else of it.
/// async-nats's default is 60 s; half gives a dead connection away sooner
/// at one PING a connection per 30 s.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

/// PINGs left unanswered before the connection is taken for dead.
pub const MAX_PINGS_OUT: u32 = 2;

/// Longest wait between two attempts to connect, once every server failed:
/// attempts start at once and back off by 100 ms each round up to this.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// Bytes read from the connection at a time, and what the read buffer
/// shrinks back to after a larger message made it grow.
pub const READ_CHUNK: usize = 64 * 1024;

/// Longest protocol line accepted (INFO lists the cluster's URLs; nats-server
/// limits a client's lines to 4 KiB, its own INFO is not limited). A longer
/// one is a broken connection.
pub const MAX_CONTROL_LINE: usize = 1 << 20;

/// Largest message accepted, headers included: nats-server's largest
/// `max_payload` (64 MiB) and room for headers. A larger size in a MSG line
/// is a broken connection, not a reason to allocate.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024 + 64 * 1024;

/// Headers the stream stamps on each republished message (2.9 sets the
/// first four; 2.10+ add the time stamp). nats-server keeps the publisher's
/// headers and appends its own after them (seen on 2.9.10 and 2.15.1,
/// tests/trust.rs), so a publisher that set one of these makes the message
/// carry two values: the stream's is the last.
pub const STAMPS: [&str; 5] = ["Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Last-Sequence", "Nats-Time-Stamp"];

/// A message as the hub needs it: its payload and the stream's stamps. Of a
/// header set more than once the last value counts: the stream appends its
/// own after any a publisher set ([`LiveMsg::repeated`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveMsg {
    pub payload: Bytes,
    /// `Nats-Stream`.
    pub stream: Option<Bytes>,
    /// `Nats-Sequence`, when it is a number.
    pub seq: Option<u64>,
    /// `Nats-Last-Sequence`, when it is a number.
    pub last_seq: Option<u64>,
    /// `Nats-Time-Stamp` (2.10+).
    pub time: Option<Bytes>,
    /// One of [`STAMPS`] came more than once: the publisher set it.
    pub repeated: bool,
}

impl LiveMsg {
    pub fn stream(&self) -> Option<&str> {
        self.stream.as_deref().and_then(|s| std::str::from_utf8(s).ok())
    }

    pub fn time(&self) -> Option<&str> {
        self.time.as_deref().and_then(|s| std::str::from_utf8(s).ok())
    }

    /// Reads the NATS header block (`NATS/1.0 …\r\n`, lines `Name: value`,
    /// an empty line) of a message whose bytes are `data`, the first
    /// `headers` of them the block. Names are matched ignoring case (as
    /// nats-server's own lookups do not), so a publisher's `nats-sequence`
    /// counts as repeated.
    fn parse(data: Bytes, headers: usize) -> Self {
        let mut msg = LiveMsg { payload: data.slice(headers..), ..Default::default() };
        let mut seen = [false; STAMPS.len()];
        let block = &data[..headers];
        let mut at = 0;
        for line in block.split(|&b| b == b'\n') {
            let start = at;
            at += line.len() + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if start == 0 {
                continue; // NATS/1.0 and an optional status
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
            let name = line[..colon].trim_ascii();
            let Some(i) = STAMPS.iter().position(|s| s.as_bytes().eq_ignore_ascii_case(name)) else { continue };
            msg.repeated |= seen[i];
            seen[i] = true;
            let value = line[colon + 1..].trim_ascii();
            let number = || std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            // The value's place in `data`: a slice of it, not a copy.
            let from = start + colon + 1 + (line[colon + 1..].len() - line[colon + 1..].trim_ascii_start().len());
            match i {
                0 => msg.stream = Some(data.slice(from..from + value.len())),
                2 => msg.seq = number(),
                3 => msg.last_seq = number(),
                4 => msg.time = Some(data.slice(from..from + value.len())),
                _ => {}
            }
        }
        msg
    }
}

/// Handles a message at once, on the connection's task (`true`), or leaves
/// it to the subscriber's own task (`false`: a message that needs what only
/// that task can do, such as waiting for a read from JetStream).
pub type Handler = Box<dyn Fn(&LiveMsg) -> bool + Send + Sync>;

/// The messages of one subscription: handed to its [`Handler`] as they come
/// while the subscriber's task is idle and nothing waits, else queued for
/// the task in arrival order. So a message is never handled while an
/// earlier one, or the task's own work ([`Subscription::claim`]), is under
/// way: the handler runs under the same lock that the task takes to pop.
///
/// The queue allocates on its first message and holds at most `capacity`
/// (`--nats-subscription-capacity` as lowered by `--nats-subscription-bytes`,
/// [`crate::nats::SUBSCRIPTION_CAPACITY`]). When full, a message is dropped
/// and counted as `slow_consumer` ([`m::NATS_EVENTS`]): the user's task finds
/// the hole at the user's next event or audit and reads it from JetStream,
/// as it does for a message lost while the connection was down.
pub struct Inbox {
    state: Mutex<InboxState>,
    waker: AtomicWaker,
    capacity: usize,
    handler: Handler,
    /// A drop was reported and nothing was taken since: reported once.
    dropping: AtomicBool,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct InboxState {
    queue: VecDeque<LiveMsg>,
    /// The subscriber's task holds a message or works for itself; set from
    /// the start until its first [`Subscription::release`].
    busy: bool,
}

/// What a queue that grew for a burst keeps once drained: past this many
/// slots it gives the memory back.
const INBOX_KEEP: usize = 16;

impl Inbox {
    fn new(capacity: usize, handler: Handler) -> Self {
        Self {
            state: Mutex::new(InboxState { queue: VecDeque::new(), busy: true }),
            waker: AtomicWaker::new(),
            capacity,
            handler,
            dropping: AtomicBool::new(false),
        }
    }

    fn offer(&self, msg: LiveMsg) {
        let mut st = crate::hub::lock(&self.state);
        if st.queue.is_empty() && !st.busy && (self.handler)(&msg) {
            return;
        }
        if st.queue.len() >= self.capacity {
            drop(st);
            metrics::counter!(m::NATS_EVENTS, "event" => "slow_consumer").increment(1);
            if !self.dropping.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    capacity = self.capacity,
                    "a live subscription fell behind; messages were dropped and will be read from JetStream"
                );
            }
            return;
        }
        st.queue.push_back(msg);
        drop(st);
        self.waker.wake();
    }

    /// Takes the oldest queued message, and the inbox with it (busy).
    fn pop(&self) -> Option<LiveMsg> {
        let mut st = crate::hub::lock(&self.state);
        let msg = st.queue.pop_front()?;
        st.busy = true;
        if st.queue.is_empty() && st.queue.capacity() > INBOX_KEEP {
            st.queue = VecDeque::new();
        }
        drop(st);
        self.dropping.store(false, Ordering::Relaxed);
        Some(msg)
    }
}

/// A subscription to one subject; unsubscribes when dropped. Its task takes
/// the messages its handler gave back ([`Subscription::next`]) and tells
/// when it is done with each ([`Subscription::release`]).
#[derive(Debug)]
pub struct Subscription {
    sid: u64,
    inbox: Arc<Inbox>,
    live: Arc<Shared>,
}

impl Subscription {
    /// The next queued message, once there is one. The subscription is busy
    /// from then until [`Subscription::release`]: later messages queue.
    pub async fn next(&self) -> LiveMsg {
        std::future::poll_fn(|cx| {
            if let Some(msg) = self.inbox.pop() {
                return std::task::Poll::Ready(msg);
            }
            self.inbox.waker.register(cx.waker());
            self.inbox.pop().map_or(std::task::Poll::Pending, std::task::Poll::Ready)
        })
        .await
    }

    /// Marks the subscription busy for the task's own work: messages queue
    /// until [`Subscription::release`].
    pub fn claim(&self) {
        crate::hub::lock(&self.inbox.state).busy = true;
    }

    /// The task is done for now: messages go to the handler again once the
    /// queue is empty (the task takes those queued first).
    pub fn release(&self) {
        crate::hub::lock(&self.inbox.state).busy = false;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let (live, sid) = (self.live.clone(), self.sid);
        // The UNSUB is written in the background: a drop cannot wait, and a
        // message that comes meanwhile finds no inbox and is dropped.
        crate::hub::lock(&live.subs).remove(&sid);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { live.write(format!("UNSUB {sid}\r\n").into_bytes()).await });
        }
    }
}

struct Sub {
    subject: String,
    inbox: Arc<Inbox>,
}

impl std::fmt::Debug for Sub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.subject)
    }
}

/// The connected server's write side, and the token that tells the
/// connection's reader a write to it failed.
struct Writer {
    half: WriteHalf<Box<dyn Io>>,
    broken: tokio_util::sync::CancellationToken,
}

/// A byte stream: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

struct Shared {
    subs: Mutex<HashMap<u64, Sub>>,
    next_sid: AtomicU64,
    /// The connected server's write side; `None` while reconnecting. Held
    /// across a subscription's SUB, so a subject is subscribed either here
    /// or by the resubscription after a reconnect, never both nor neither.
    writer: tokio::sync::Mutex<Option<Writer>>,
    /// One entry per PING written on this connection, oldest first: whom
    /// its PONG tells that everything before it took effect (`None`: a
    /// keepalive). Cleared with the connection.
    pongs: Mutex<VecDeque<Option<tokio::sync::oneshot::Sender<()>>>>,
    connected: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("connected", &self.connected.load(Ordering::Relaxed)).finish()
    }
}

impl Shared {
    /// Writes `bytes` to the connected server, if any. A failure drops the
    /// connection; what was lost is resent after the reconnect (SUBs) or
    /// not needed (UNSUB, PONG: a new connection has no state).
    async fn write(&self, bytes: Vec<u8>) {
        let mut w = self.writer.lock().await;
        write_locked(&mut w, &bytes).await;
    }

    /// Writes a keepalive PING, if connected.
    async fn ping(&self) {
        let mut w = self.writer.lock().await;
        if w.is_some() {
            crate::hub::lock(&self.pongs).push_back(None);
            write_locked(&mut w, b"PING\r\n").await;
        }
    }
}

/// Writes to the connected server, if any. A write that fails or takes
/// longer than [`WRITE_TIMEOUT`] ends the connection: its reader is told,
/// and later writes go nowhere until the reconnect.
async fn write_locked(w: &mut Option<Writer>, bytes: &[u8]) {
    let Some(writer) = w.as_mut() else { return };
    let done = tokio::time::timeout(WRITE_TIMEOUT, async {
        writer.half.write_all(bytes).await?;
        writer.half.flush().await
    })
    .await;
    if !matches!(done, Ok(Ok(())))
        && let Some(gone) = w.take()
    {
        gone.broken.cancel();
    }
}

/// The node's live connection. Dropping it ends the connection's task.
#[derive(Debug)]
pub struct Live {
    shared: Arc<Shared>,
    capacity: usize,
    task: tokio::task::AbortHandle,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Live {
    /// Starts the connection's task and returns at once: like the node's
    /// other connections, it connects in the background, and
    /// [`Live::is_connected`] says when it is up. `capacity`: messages a
    /// subscription holds ([`Inbox`]).
    pub async fn start(login: &NatsLogin, name: &str, capacity: usize, signals: Arc<Signals>) -> anyhow::Result<Self> {
        let connector = Connector::new(login, name).await?;
        let shared = Arc::new(Shared {
            subs: Mutex::default(),
            next_sid: AtomicU64::new(1),
            writer: tokio::sync::Mutex::new(None),
            pongs: Mutex::default(),
            connected: AtomicBool::new(false),
        });
        let task = tokio::spawn(run(connector, shared.clone(), signals)).abort_handle();
        Ok(Self { shared, capacity, task })
    }

    /// A connection to `url` with no login: for tests and tools.
    pub async fn plain(url: &str) -> anyhow::Result<Self> {
        let login = NatsLogin::plain(url)?;
        Self::start(&login, "agentcast-live", crate::nats::SUBSCRIPTION_CAPACITY, Arc::default()).await
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Subscribes to `subject`, and returns once the server has answered
    /// a PING sent after the SUB: the subscription took effect on that
    /// server, and a read of the stream made from now on sees every event
    /// this subscription will not. While the connection is down it returns
    /// at once (the SUB goes out at the reconnect, and the hub's audit after
    /// it reads what came meanwhile); a server that does not answer within
    /// [`WRITE_TIMEOUT`] is not waited for longer (the audit, again).
    ///
    /// The subscription starts busy: messages queue until the task's first
    /// [`Subscription::release`].
    pub async fn subscribe(&self, subject: String, handler: Handler) -> Subscription {
        let sid = self.shared.next_sid.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(Inbox::new(self.capacity, handler));
        let mut line = format!("SUB {subject} {sid}\r\n").into_bytes();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut w = self.shared.writer.lock().await;
        crate::hub::lock(&self.shared.subs).insert(sid, Sub { subject, inbox: inbox.clone() });
        let sub = Subscription { sid, inbox, live: self.shared.clone() };
        if w.is_none() {
            return sub;
        }
        crate::hub::lock(&self.shared.pongs).push_back(Some(tx));
        line.extend_from_slice(b"PING\r\n");
        write_locked(&mut w, &line).await;
        drop(w);
        let _ = tokio::time::timeout(WRITE_TIMEOUT, rx).await;
        sub
    }
}

/// The server's INFO, the fields this connection uses.
#[derive(Debug, Default, serde::Deserialize)]
struct Info {
    #[serde(default)]
    tls_required: bool,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    connect_urls: Vec<String>,
    #[serde(default)]
    ldm: bool,
    #[serde(default)]
    headers: bool,
}

/// What opening a connection needs: the login, read once at start.
struct Connector {
    name: String,
    servers: Vec<async_nats::ServerAddr>,
    user: Option<(String, String)>,
    token: Option<String>,
    creds: Option<(String, nkeys::KeyPair)>,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    tls_required: bool,
}

impl Connector {
    async fn new(login: &NatsLogin, name: &str) -> anyhow::Result<Self> {
        let creds = match &login.creds {
            None => None,
            Some(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| anyhow::anyhow!("--nats-creds {}: {e}", path.display()))?;
                Some(parse_creds(&text).map_err(|e| anyhow::anyhow!("--nats-creds {}: {e}", path.display()))?)
            }
        };
        let tls_wanted = login.tls_required || login.urls.iter().any(|u| u.tls_required());
        let tls = match tls_config(login).await {
            Ok(c) => Some(Arc::new(c)),
            Err(e) if tls_wanted => anyhow::bail!("NATS TLS: {e}"),
            // Kept for a server whose INFO asks for TLS; `open` says so then.
            Err(_) => None,
        };
        Ok(Self {
            name: name.to_owned(),
            servers: login.urls.clone(),
            user: login.user.clone(),
            token: login.token.clone(),
            creds,
            tls,
            tls_required: login.tls_required,
        })
    }

    /// Opens a connection to `addr` and logs in: the stream after the first
    /// PONG, and the server's INFO.
    async fn open(&self, addr: &async_nats::ServerAddr) -> anyhow::Result<(Box<dyn Io>, BytesMut, Info)> {
        let mut tcp = TcpStream::connect((addr.host(), addr.port())).await?;
        tcp.set_nodelay(true)?;
        let mut buf = BytesMut::with_capacity(4096);
        let info = match read_op(&mut tcp, &mut buf).await? {
            Op::Info(info) => info,
            other => anyhow::bail!("the server began with {other:?}, not INFO"),
        };
        if !info.headers {
            anyhow::bail!("the server does not support headers (nats-server 2.2 or later is needed)");
        }
        let io: Box<dyn Io> = if self.tls_required || addr.tls_required() || info.tls_required {
            let Some(config) = &self.tls else {
                anyhow::bail!("the server requires TLS; no TLS configuration could be built")
            };
            if !buf.is_empty() {
                anyhow::bail!("the server sent more than INFO before the TLS handshake");
            }
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(addr.host().to_owned())?;
            Box::new(tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await?)
        } else {
            Box::new(tcp)
        };
        self.login(io, buf, info).await
    }

    async fn login(
        &self,
        mut io: Box<dyn Io>,
        mut buf: BytesMut,
        info: Info,
    ) -> anyhow::Result<(Box<dyn Io>, BytesMut, Info)> {
        let mut connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "lang": "rust-agentcast",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "headers": true,
            "no_responders": false,
            "echo": false,
            "tls_required": self.tls_required,
            "name": self.name,
        });
        if let Some((user, pass)) = &self.user {
            connect["user"] = user.clone().into();
            connect["pass"] = pass.clone().into();
        }
        if let Some(token) = &self.token {
            connect["auth_token"] = token.clone().into();
        }
        if let Some((jwt, key)) = &self.creds {
            use base64::Engine;
            let nonce = info.nonce.as_deref().unwrap_or_default();
            let sig = key.sign(nonce.as_bytes()).map_err(|e| anyhow::anyhow!("signing the server's nonce: {e}"))?;
            connect["jwt"] = jwt.clone().into();
            connect["sig"] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig).into();
        }
        io.write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes()).await?;
        io.flush().await?;
        loop {
            match read_op(&mut io, &mut buf).await? {
                Op::Pong => return Ok((io, buf, info)),
                Op::Err(e) => anyhow::bail!("the server refused the connection: {e}"),
                Op::Ping => {
                    io.write_all(b"PONG\r\n").await?;
                    io.flush().await?;
                }
                _ => {}
            }
        }
    }
}

/// The JWT and the key of a NATS credentials file: the first two blocks
/// between `-----BEGIN …-----` and `------END …------` lines.
fn parse_creds(text: &str) -> Result<(String, nkeys::KeyPair), String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line.starts_with("---") && line.contains("BEGIN") {
            match lines.next() {
                Some(value) if !value.is_empty() && !value.starts_with("---") => blocks.push(value.to_owned()),
                _ => return Err("a block of the credentials file is empty".into()),
            }
        }
    }
    let [jwt, seed, ..] = blocks.as_slice() else {
        return Err("no user JWT and key seed (two -----BEGIN … blocks) in the credentials file".into());
    };
    let key = nkeys::KeyPair::from_seed(seed).map_err(|e| format!("the key seed: {e}"))?;
    Ok((jwt.clone(), key))
}

async fn tls_config(login: &NatsLogin) -> anyhow::Result<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    match &login.tls_ca {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| anyhow::anyhow!("--nats-tls-ca: {e}"))? {
                roots.add(cert.map_err(|e| anyhow::anyhow!("--nats-tls-ca: {e}"))?)?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    // The provider named, not taken from the build's features: rustls
    // panics when more than one is compiled in and none is chosen.
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match &login.tls_client {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("--nats-tls-cert: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("--nats-tls-key: {e}"))?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// One operation from the server.
#[derive(Debug)]
enum Op {
    Info(Info),
    Msg { sid: u64, data: Bytes, headers: usize },
    Ping,
    Pong,
    Ok,
    Err(String),
}

/// Reads until one whole operation is in `buf`, and takes it out.
async fn read_op<R: AsyncRead + Unpin + ?Sized>(r: &mut R, buf: &mut BytesMut) -> anyhow::Result<Op> {
    loop {
        if let Some(op) = parse(buf)? {
            return Ok(op);
        }
        buf.reserve(READ_CHUNK.min(buf.capacity().max(4096)));
        if r.read_buf(buf).await? == 0 {
            anyhow::bail!("the server closed the connection");
        }
    }
}

/// Takes the first whole operation out of `buf`, if there is one.
fn parse(buf: &mut BytesMut) -> io::Result<Option<Op>> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err(bad(format!("a protocol line longer than {MAX_CONTROL_LINE} bytes")));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| bad("a protocol line that is not UTF-8".into()))?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let (verb, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let is = |name: &str| verb.eq_ignore_ascii_case(name);
    if is("MSG") || is("HMSG") {
        // MSG <subject> <sid> [reply] <size>; HMSG <subject> <sid> [reply] <headers> <size>
        let headed = verb.len() == 4;
        let malformed = || bad(format!("a malformed {verb} line"));
        let mut args = [""; 5];
        let mut n = 0;
        for arg in rest.split_ascii_whitespace() {
            *args.get_mut(n).ok_or_else(malformed)? = arg;
            n += 1;
        }
        let numbers = if headed { 2 } else { 1 };
        if n < 2 + numbers || n > 3 + numbers {
            return Err(malformed());
        }
        let num = |s: &str| s.parse::<usize>().map_err(|_| malformed());
        let sid = args[1].parse::<u64>().map_err(|_| malformed())?;
        let size = num(args[n - 1])?;
        let headers = if headed { num(args[n - 2])? } else { 0 };
        if size > MAX_MESSAGE || headers > size {
            return Err(bad(format!("a {verb} of {size} bytes")));
        }
        let whole = end + 1 + size + 2;
        if buf.len() < whole {
            buf.reserve(whole - buf.len());
            return Ok(None);
        }
        let data = Bytes::copy_from_slice(&buf[end + 1..end + 1 + size]);
        buf.advance(whole);
        return Ok(Some(Op::Msg { sid, data, headers }));
    }
    let op = if is("PING") {
        Op::Ping
    } else if is("PONG") {
        Op::Pong
    } else if is("+OK") {
        Op::Ok
    } else if is("-ERR") {
        Op::Err(rest.trim().trim_matches('\'').to_owned())
    } else if is("INFO") {
        Op::Info(serde_json::from_str(rest).map_err(|e| bad(format!("an INFO the node cannot read: {e}")))?)
    } else {
        return Err(bad(format!("an unknown operation {:?}", verb.chars().take(16).collect::<String>())));
    };
    buf.advance(end + 1);
    Ok(Some(op))
}

/// The connection's task: connects, subscribes, reads, and starts over.
async fn run(connector: Connector, shared: Arc<Shared>, signals: Arc<Signals>) {
    let mut discovered: Vec<async_nats::ServerAddr> = Vec::new();
    let mut next = 0usize;
    let mut round = 0u32;
    let mut last_error = String::new();
    loop {
        let candidates: Vec<&async_nats::ServerAddr> = connector.servers.iter().chain(discovered.iter()).collect();
        let addr = candidates[next % candidates.len()].clone();
        next += 1;
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, connector.open(&addr)).await;
        let opened = match opened {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
        };
        let (io, buf, info) = match opened {
            Ok(c) => c,
            Err(error) => {
                note_failure(&mut last_error, error);
                // Every server tried once more: wait a little longer.
                if next.is_multiple_of(candidates.len()) {
                    round += 1;
                    tokio::time::sleep((Duration::from_millis(100) * round).min(MAX_RECONNECT_DELAY)).await;
                }
                continue;
            }
        };
        round = 0;
        last_error.clear();
        learn(&info, &connector, &mut discovered);
        let (reader, half) = tokio::io::split(io);
        let broken = tokio_util::sync::CancellationToken::new();
        {
            let mut w = shared.writer.lock().await;
            *w = Some(Writer { half, broken: broken.clone() });
            let subs: String = crate::hub::lock(&shared.subs)
                .iter()
                .map(|(sid, sub)| format!("SUB {} {sid}\r\n", sub.subject))
                .collect();
            write_locked(&mut w, subs.as_bytes()).await;
            if w.is_none() {
                continue;
            }
        }
        shared.connected.store(true, Ordering::Release);
        metrics::counter!(m::NATS_EVENTS, "event" => "connected").increment(1);
        metrics::gauge!(m::NATS_CONNECTED).set(1.0);
        if signals.was_connected.swap(true, Ordering::Relaxed) {
            metrics::counter!(m::NATS_RECONNECTS).increment(1);
            tracing::info!(server = %addr.host(), "NATS live connection back");
        } else {
            // The node's "NATS connected" line stands for the first one.
            tracing::debug!(server = %addr.host(), "NATS live connection up");
        }
        signals.connected.notify_one();
        let why = read(reader, buf, &shared, &broken, &connector, &mut discovered).await;
        shared.connected.store(false, Ordering::Release);
        *shared.writer.lock().await = None;
        // This connection's PINGs will never be answered: their waiters go
        // on now. Nothing is added while the writer is gone.
        crate::hub::lock(&shared.pongs).clear();
        metrics::counter!(m::NATS_EVENTS, "event" => "disconnected").increment(1);
        metrics::gauge!(m::NATS_CONNECTED).set(0.0);
        tracing::warn!(error = %why, "NATS live connection lost; reconnecting");
    }
}

/// Logs a failure to connect once, not at every retry.
fn note_failure(last: &mut String, error: String) {
    if *last != error {
        tracing::warn!(%error, "cannot open the NATS live connection; retrying");
        *last = error;
    }
}

/// Adds the servers an INFO announces to those tried after a disconnect.
fn learn(info: &Info, connector: &Connector, discovered: &mut Vec<async_nats::ServerAddr>) {
    for url in &info.connect_urls {
        let url = if url.contains("://") { url.clone() } else { format!("nats://{url}") };
        let Ok(addr) = url.parse::<async_nats::ServerAddr>() else { continue };
        let known = |a: &async_nats::ServerAddr| a.host() == addr.host() && a.port() == addr.port();
        if !connector.servers.iter().any(known) && !discovered.iter().any(known) {
            discovered.push(addr);
        }
    }
}

/// Reads the connection until it breaks: each message into its inbox.
async fn read(
    mut reader: ReadHalf<Box<dyn Io>>,
    mut buf: BytesMut,
    shared: &Shared,
    broken: &tokio_util::sync::CancellationToken,
    connector: &Connector,
    discovered: &mut Vec<async_nats::ServerAddr>,
) -> String {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut pings_out = 0u32;
    loop {
        // Everything whole in the buffer first.
        loop {
            let op = match parse(&mut buf) {
                Ok(Some(op)) => op,
                Ok(None) => break,
                Err(e) => return format!("protocol error: {e}"),
            };
            match op {
                Op::Msg { sid, data, headers } => {
                    let inbox = crate::hub::lock(&shared.subs).get(&sid).map(|s| s.inbox.clone());
                    // No inbox: unsubscribed meanwhile.
                    if let Some(inbox) = inbox {
                        inbox.offer(LiveMsg::parse(data, headers));
                    }
                }
                Op::Ping => shared.write(b"PONG\r\n".to_vec()).await,
                Op::Pong => {
                    pings_out = 0;
                    if let Some(Some(waiter)) = crate::hub::lock(&shared.pongs).pop_front() {
                        let _ = waiter.send(());
                    }
                }
                Op::Ok => {}
                Op::Err(e) => {
                    metrics::counter!(m::NATS_EVENTS, "event" => "server_error").increment(1);
                    tracing::warn!(error = %e, "NATS server error on the live connection");
                }
                Op::Info(info) => {
                    learn(&info, connector, discovered);
                    if info.ldm {
                        metrics::counter!(m::NATS_EVENTS, "event" => "lame_duck").increment(1);
                        tracing::warn!("the NATS server of the live connection is in lame duck mode");
                    }
                }
            }
        }
        if buf.is_empty() && buf.capacity() > 4 * READ_CHUNK {
            buf = BytesMut::new();
        }
        buf.reserve(READ_CHUNK);
        tokio::select! {
            n = reader.read_buf(&mut buf) => match n {
                Ok(0) => return "the server closed the connection".into(),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            },
            _ = ping.tick() => {
                if pings_out >= MAX_PINGS_OUT {
                    return format!("no answer to {MAX_PINGS_OUT} PINGs");
                }
                pings_out += 1;
                shared.ping().await;
            }
            () = broken.cancelled() => return "a write failed".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Vec<Op> {
        let mut buf = BytesMut::from(bytes);
        let mut ops = Vec::new();
        while let Some(op) = parse(&mut buf).unwrap() {
            ops.push(op);
        }
        assert!(buf.is_empty(), "left {:?}", buf);
        ops
    }

    #[test]
    fn reads_messages_with_and_without_headers_and_control_lines() {
        let hdr = "NATS/1.0\r\nNats-Stream: S\r\nNats-Sequence: 7\r\n\r\n";
        let wire = format!(
            "INFO {{\"headers\":true,\"connect_urls\":[\"10.0.0.1:4222\"]}}\r\nPING\r\nMSG a.b 3 5\r\nhello\r\nHMSG a.c 4 r.x {} {}\r\n{hdr}{{}}\r\n+OK\r\n-ERR 'Permissions Violation'\r\nPONG\r\n",
            hdr.len(),
            hdr.len() + 2
        );
        let ops = parse_all(wire.as_bytes());
        assert!(matches!(&ops[0], Op::Info(i) if i.headers && i.connect_urls == ["10.0.0.1:4222"]));
        assert!(matches!(ops[1], Op::Ping));
        let Op::Msg { sid: 3, data, headers: 0 } = &ops[2] else { panic!("{:?}", ops[2]) };
        assert_eq!(&data[..], b"hello");
        let Op::Msg { sid: 4, data, headers } = &ops[3] else { panic!("{:?}", ops[3]) };
        let msg = LiveMsg::parse(data.clone(), *headers);
        assert_eq!((msg.stream(), msg.seq, &msg.payload[..]), (Some("S"), Some(7), &b"{}"[..]));
        assert!(matches!(ops[4], Op::Ok));
        assert!(matches!(&ops[5], Op::Err(e) if e == "Permissions Violation"));
        assert!(matches!(ops[6], Op::Pong));
    }

    #[test]
    fn a_message_split_across_reads_waits_for_its_last_byte() {
        let wire = b"MSG a 1 5\r\nhello\r\n";
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert!(parse(&mut buf).unwrap().is_none(), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing taken at {cut}");
            buf.extend_from_slice(&wire[cut..]);
            assert!(matches!(parse(&mut buf).unwrap(), Some(Op::Msg { sid: 1, .. })));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn the_last_stamp_counts_and_a_repeated_one_is_seen() {
        let hdr = "NATS/1.0\r\nnats-sequence: 999\r\nX-Other: 1\r\nNats-Stream:  AGENTCAST \r\nNats-Subject: agentcast.events.u\r\nNats-Sequence: 12\r\nNats-Last-Sequence: 9\r\nNats-Time-Stamp: 2026-11-26T10:00:00Z\r\n\r\n";
        let data = Bytes::from(format!("{hdr}{{\"type\":\"x\"}}"));
        let msg = LiveMsg::parse(data, hdr.len());
        assert_eq!(msg.stream(), Some("AGENTCAST"));
        assert_eq!((msg.seq, msg.last_seq), (Some(12), Some(9)));
        assert_eq!(msg.time(), Some("2026-11-26T10:00:00Z"));
        assert!(msg.repeated);
        assert_eq!(&msg.payload[..], br#"{"type":"x"}"#);
        let plain = "NATS/1.0\r\nNats-Sequence: x\r\n\r\n";
        let msg = LiveMsg::parse(Bytes::from(plain), plain.len());
        assert_eq!((msg.seq, msg.stream.is_none(), msg.repeated), (None, true, false));
    }

    #[test]
    fn broken_lines_are_errors_not_guesses() {
        for wire in [
            &b"MSG a x 5\r\nhello\r\n"[..],
            b"MSG a 1\r\n",
            b"HMSG a 1 9 5\r\nhello\r\n",
            b"MSG a 1 99999999999\r\n",
            b"WHAT\r\n",
            b"INFO {\r\n",
        ] {
            assert!(parse(&mut BytesMut::from(wire)).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
    }

    fn seqs(inbox: &Inbox) -> Vec<u64> {
        std::iter::from_fn(|| inbox.pop()).map(|m| m.seq.unwrap()).collect()
    }

    #[test]
    fn a_full_inbox_drops_and_a_drained_one_gives_its_memory_back() {
        let inbox = Inbox::new(3, Box::new(|_| false));
        for seq in 1..=5 {
            inbox.offer(LiveMsg { seq: Some(seq), ..Default::default() });
        }
        assert_eq!(seqs(&inbox), [1, 2, 3]);
        let big = Inbox::new(1000, Box::new(|_| false));
        for _ in 0..100 {
            big.offer(LiveMsg::default());
        }
        while big.pop().is_some() {}
        assert_eq!(crate::hub::lock(&big.state).queue.capacity(), 0);
    }

    #[test]
    fn the_handler_runs_only_while_the_task_is_idle_and_nothing_waits() {
        let handled = Arc::new(Mutex::new(Vec::new()));
        let h = handled.clone();
        // Handles even sequences, leaves odd ones to the task.
        let inbox = Inbox::new(
            100,
            Box::new(move |m: &LiveMsg| {
                let even = m.seq.is_some_and(|s| s % 2 == 0);
                if even {
                    h.lock().unwrap().extend(m.seq);
                }
                even
            }),
        );
        let offer = |s| inbox.offer(LiveMsg { seq: Some(s), ..Default::default() });
        // Busy from the start: everything queues.
        offer(2);
        assert!(handled.lock().unwrap().is_empty());
        crate::hub::lock(&inbox.state).busy = false;
        // 2 still waits: 4 queues behind it, not past it.
        offer(4);
        assert_eq!(seqs(&inbox), [2, 4]);
        // Taken by the task: busy until it releases.
        offer(6);
        assert_eq!(seqs(&inbox), [6]);
        crate::hub::lock(&inbox.state).busy = false;
        offer(8);
        assert_eq!(*handled.lock().unwrap(), [8]);
        // Given back: queued for the task, and what follows waits behind it.
        offer(9);
        offer(10);
        assert_eq!(seqs(&inbox), [9, 10]);
        assert_eq!(*handled.lock().unwrap(), [8]);
    }

    #[test]
    fn a_credentials_file_gives_its_jwt_and_key() {
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let text = format!(
            "-----BEGIN NATS USER JWT-----\neyJhbGc.x.y\n------END NATS USER JWT------\n\n***** IMPORTANT *****\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        let (jwt, key) = parse_creds(&text).unwrap();
        assert_eq!(jwt, "eyJhbGc.x.y");
        assert_eq!(key.seed().unwrap(), seed);
        assert!(parse_creds("no blocks").is_err());
    }
}
