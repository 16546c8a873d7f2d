//! A resuming client for the socket protocol, for Rust programs, the tests,
//! the CLI tools and the benchmark.
//!
//! It connects to one of several node URLs, remembers the last `seq` and the
//! stream `epoch`, and after any disconnect reconnects (to the next URL) with
//! them, so the node replays what was missed. Reconnects back off
//! exponentially with full jitter, and the backoff only resets once an event
//! arrives; a drain (1012), slow-client (4000) or stream-reset (4003) close
//! reconnects after a short jitter only, so a node's clients do not all
//! return in the same instant. Duplicates by `seq` are dropped, gaps are reported,
//! and refusals that a retry cannot fix (401, 403, 400) end the client. A
//! connection quiet for the stall timeout (a `ping` frame unanswered) is
//! taken for dead and replaced at once ([`Client::stall_timeout`]).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::{self, Message};

/// First reconnect delay ceiling; doubles per failed attempt.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest reconnect delay ceiling.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Time allowed to open a socket and read its welcome.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default stall timeout: the longest a dead connection (half-open TCP after
/// a network change, which the kernel may not notice for minutes) goes
/// unnoticed. 1.5 times the node's default ping interval (20 s): a live node
/// sends a WebSocket ping at least that often, so a live connection always
/// has something within it (docs/protocol.md, "Detecting a dead
/// connection"). The JavaScript client uses the same default.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a `ping` frame gets for anything to come back, at most half the
/// stall timeout: sent after the stall timeout less this of quiet.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The frame the node answers with `{"type":"pong"}`.
const PING_FRAME: &str = r#"{"type":"ping"}"#;

/// What the client hands to its user.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// A (re)connection was welcomed.
    Welcome { node: String, position: u64, epoch: String },
    /// An event, once, in order; `event` is the published JSON text. A
    /// merged frame (docs/protocol.md, "Streamed text") carries `merged`
    /// delta events from `first_seq` to `seq`, `event` being the last one
    /// with the whole text as its `delta`; else `first_seq` is `seq` and
    /// `merged` 1. [`Messages`] assembles the text either way.
    Event { seq: u64, first_seq: u64, merged: u64, event: String },
    /// Events may be missing (see docs/protocol.md).
    Gap { reason: String, from: Option<u64>, to: Option<u64>, earliest: Option<u64> },
}

/// Why the client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("refused with HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("closed with code {code} ({reason}), which a reconnect does not fix")]
    Closed { code: u16, reason: String },
    #[error("bad frame from the server: {0}")]
    Protocol(String),
    /// The URL, or the token as a header value, is unusable.
    #[error("cannot build the socket request: {0}")]
    Request(String),
}

/// Every server frame's fields, flat: serde cannot hold a `RawValue` (the
/// event, kept as published) inside an internally tagged enum.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: String,
    seq: Option<u64>,
    first_seq: Option<u64>,
    merged: Option<u64>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    node: Option<String>,
    position: Option<u64>,
    epoch: Option<String>,
    reason: Option<String>,
    from: Option<u64>,
    to: Option<u64>,
    earliest: Option<u64>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A resuming connection to a user's event stream.
pub struct Client {
    urls: Vec<String>,
    token: Box<dyn Fn() -> String + Send + Sync>,
    next_url: usize,
    ws: Option<Ws>,
    last_seq: Option<u64>,
    epoch: Option<String>,
    attempt: u32,
    /// Reconnections made (not counting the first connection).
    pub reconnects: u64,
    /// Events dropped because their `seq` was not after the last one.
    pub duplicates: u64,
    /// Connections given up as dead ([`Client::stall_timeout`]).
    pub stalls: u64,
    stall_timeout: Duration,
    /// When anything last came on the current socket.
    heard_at: tokio::time::Instant,
    /// When a ping was sent that nothing has followed yet.
    probe_since: Option<tokio::time::Instant>,
}

impl Client {
    /// `urls` are node base URLs such as `ws://127.0.0.1:8080/ws`; `token`
    /// is called before every connection, so it can refresh expiring tokens.
    pub fn new(urls: Vec<String>, token: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self {
            urls,
            token: Box::new(token),
            next_url: 0,
            ws: None,
            last_seq: None,
            epoch: None,
            attempt: 0,
            reconnects: 0,
            duplicates: 0,
            stalls: 0,
            stall_timeout: STALL_TIMEOUT,
            heard_at: tokio::time::Instant::now(),
            probe_since: None,
        }
    }

    /// Sets how long a connection may stay quiet before it is taken for
    /// dead ([`STALL_TIMEOUT`] by default). After the timeout less the probe
    /// time ([`PROBE_TIMEOUT`], at most half of it) with nothing received,
    /// the client sends a `ping` frame; if nothing at all comes within the
    /// probe time, it drops the socket and reconnects at once, resuming from
    /// its position. Anything received counts: a slow connection that is
    /// receiving a backlog is alive.
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout.max(Duration::from_millis(2));
        self
    }

    fn probe_timeout(&self) -> Duration {
        PROBE_TIMEOUT.min(self.stall_timeout / 2)
    }

    /// Starts from a known position instead of live.
    pub fn resume_from(mut self, last_seq: u64, epoch: Option<String>) -> Self {
        self.last_seq = Some(last_seq);
        self.epoch = epoch;
        self
    }

    /// The last `seq` delivered (or resumed from).
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// The socket request: the position in the URL, the token in an
    /// `Authorization` header rather than `?token=`, so it is in no URL a
    /// log line (tungstenite's, a proxy's) may print.
    fn request(&self, base: &str) -> Result<tungstenite::handshake::client::Request, tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let mut url = base.to_owned();
        if let Some(seq) = self.last_seq {
            let sep = if base.contains('?') { '&' } else { '?' };
            url.push_str(&format!("{sep}last_seq={seq}"));
            if let Some(e) = &self.epoch {
                url.push_str(&format!("&epoch={e}"));
            }
        }
        let mut request = url.into_client_request()?;
        let bearer = format!("Bearer {}", (self.token)())
            .parse()
            .map_err(|e| tungstenite::Error::HttpFormat(tungstenite::http::Error::from(e)))?;
        request.headers_mut().insert(tungstenite::http::header::AUTHORIZATION, bearer);
        Ok(request)
    }

    /// Full jitter: uniform in [0, min(max, base * 2^attempt)). The first
    /// connection waits for nothing.
    fn backoff(&self) -> Duration {
        if self.next_url == 0 {
            return Duration::ZERO;
        }
        let ceiling = BACKOFF_BASE.saturating_mul(1 << self.attempt.min(16)).min(BACKOFF_MAX);
        ceiling.mul_f64(rand::random::<f64>())
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        loop {
            tokio::time::sleep(self.backoff()).await;
            let base = self.urls[self.next_url % self.urls.len()].clone();
            self.next_url += 1;
            let request = self.request(&base).map_err(|e| ClientError::Request(format!("{base}: {e}")))?;
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request)).await {
                Ok(Ok((ws, _))) => {
                    self.ws = Some(ws);
                    self.heard_at = tokio::time::Instant::now();
                    self.probe_since = None;
                    return Ok(());
                }
                Ok(Err(tungstenite::Error::Http(resp))) => {
                    let status = resp.status().as_u16();
                    let body =
                        resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                    if matches!(status, 400 | 401 | 403) {
                        return Err(ClientError::Refused { status, body });
                    }
                }
                Ok(Err(_)) | Err(_) => {}
            }
            self.attempt += 1;
        }
    }

    /// The next delivery; reconnects and resumes as needed.
    pub async fn next(&mut self) -> Result<Delivery, ClientError> {
        loop {
            if self.ws.is_none() {
                if self.reconnects > 0 || self.attempt > 0 || self.next_url > 0 {
                    self.reconnects += 1;
                }
                self.connect().await?;
            }
            let probe = self.probe_timeout();
            let deadline = match self.probe_since {
                Some(sent) => sent + probe,
                None => self.heard_at + (self.stall_timeout - probe),
            };
            let ws = self.ws.as_mut().expect("connected above");
            let Ok(msg) = tokio::time::timeout_at(deadline, ws.next()).await else {
                if self.probe_since.is_none() {
                    self.probe_since = Some(tokio::time::Instant::now());
                    // A failed send is the same as no answer: found below.
                    let sent = tokio::time::timeout(probe, ws.send(Message::text(PING_FRAME))).await;
                    if matches!(sent, Ok(Ok(()))) {
                        continue;
                    }
                }
                // Nothing came: the connection is dead though the socket
                // looks open. Reconnect at once (the path failed, not
                // likely the node); the resume loses and repeats nothing.
                self.ws = None;
                self.stalls += 1;
                self.attempt = 0;
                continue;
            };
            self.heard_at = tokio::time::Instant::now();
            self.probe_since = None;
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) =
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                    self.ws = None;
                    match code {
                        // Drain, slow-client and stream-reset closes: back
                        // after a short jitter.
                        1012 | 4000 | 4003 => self.attempt = 0,
                        // The client itself is at fault: a retry repeats it.
                        1002 | 1003 | 1007 | 1008 | 1009 => return Err(ClientError::Closed { code, reason }),
                        _ => self.attempt = self.attempt.max(1),
                    }
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    self.ws = None;
                    self.attempt = self.attempt.max(1);
                    continue;
                }
            };
            let frame: Frame = serde_json::from_str(text.as_str()).map_err(|e| ClientError::Protocol(e.to_string()))?;
            let missing = |field: &str| ClientError::Protocol(format!("{} frame without {field}", frame.kind));
            match frame.kind.as_str() {
                "welcome" => {
                    let position = frame.position.ok_or_else(|| missing("position"))?;
                    let epoch = frame.epoch.unwrap_or_default();
                    if self.epoch.as_deref().is_some_and(|e| e != epoch) && self.last_seq.is_some() {
                        // A new stream: the old position means nothing in it.
                        // The node says so with a stream_reset gap next; if
                        // the socket dies before that, the next resume must
                        // not pair the old position with the new epoch.
                        self.last_seq = Some(0);
                    }
                    if self.last_seq.is_none() {
                        self.last_seq = Some(position);
                    }
                    self.epoch = Some(epoch.clone());
                    return Ok(Delivery::Welcome { node: frame.node.unwrap_or_default(), position, epoch });
                }
                "event" => {
                    let seq = frame.seq.ok_or_else(|| missing("seq"))?;
                    let event = frame.event.ok_or_else(|| missing("event"))?;
                    if self.last_seq.is_some_and(|l| seq <= l) {
                        self.duplicates += 1;
                        continue;
                    }
                    self.last_seq = Some(seq);
                    self.attempt = 0;
                    let (first_seq, merged) = (frame.first_seq.unwrap_or(seq), frame.merged.unwrap_or(1));
                    return Ok(Delivery::Event { seq, first_seq, merged, event: event.get().to_owned() });
                }
                "gap" => {
                    let reason = frame.reason.unwrap_or_default();
                    if reason == "stream_reset" {
                        // Positions from the old stream mean nothing now.
                        self.last_seq = Some(0);
                    } else if let Some(to) = frame.to {
                        self.last_seq = Some(self.last_seq.unwrap_or(0).max(to));
                    }
                    return Ok(Delivery::Gap { reason, from: frame.from, to: frame.to, earliest: frame.earliest });
                }
                // `reconnect`: the close that follows says what to do.
                _ => continue,
            }
        }
    }

    /// Closes the socket politely.
    pub async fn close(&mut self) {
        if let Some(mut ws) = self.ws.take() {
            let _ = ws.close(None).await;
        }
    }
}

/// Messages whose text [`Messages`] keeps at most: the oldest is forgotten
/// past it, so a long-lived client's memory stays bounded. An agent streams
/// one or a few messages at a time; 256 cover many runs of history.
pub const MAX_MESSAGES: usize = 256;

/// One delta applied to a streamed message.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageUpdate<'a> {
    pub message_id: &'a str,
    /// The text this event (or merged frame) added.
    pub delta: &'a str,
    /// The message's text so far, this delta included.
    pub text: &'a str,
}

/// Assembles streamed messages from delivered events: each delta event's
/// `delta` (docs/protocol.md, "Streamed text") is appended to its
/// `message_id`'s text. A merged frame's delta is the text of all the events
/// it carries, so merged and unmerged frames give the same text, and after a
/// resume the replay rebuilds it.
#[derive(Debug, Default)]
pub struct Messages {
    texts: HashMap<String, String>,
    /// Message ids, oldest first, for [`MAX_MESSAGES`].
    order: VecDeque<String>,
    /// The last delta applied, returned by reference.
    delta: String,
}

#[derive(Deserialize)]
struct DeltaEvent {
    message_id: Option<String>,
    delta: Option<String>,
}

impl Messages {
    /// Applies one delivered event (the `event` of [`Delivery::Event`]);
    /// `None` when it is not a delta event.
    pub fn apply(&mut self, event: &str) -> Option<MessageUpdate<'_>> {
        let DeltaEvent { message_id: Some(id), delta: Some(delta) } = serde_json::from_str(event).ok()? else {
            return None;
        };
        if id.is_empty() || id.chars().count() > crate::protocol::MAX_MESSAGE_ID_CHARS {
            return None;
        }
        if !self.texts.contains_key(&id) {
            if self.order.len() >= MAX_MESSAGES
                && let Some(old) = self.order.pop_front()
            {
                self.texts.remove(&old);
            }
            self.order.push_back(id.clone());
        }
        self.delta = delta;
        self.texts.entry(id.clone()).or_default().push_str(&self.delta);
        let (id, text) = self.texts.get_key_value(&id)?;
        Some(MessageUpdate { message_id: id, delta: &self.delta, text })
    }

    /// A message's text so far.
    pub fn text(&self, message_id: &str) -> Option<&str> {
        self.texts.get(message_id).map(String::as_str)
    }
}
