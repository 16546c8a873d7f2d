//! Control requests: from a browser, over its socket, to the agent services,
//! and the answer back (docs/protocol.md section 9, docs/publishing.md).
//!
//! A client sends `{"type":"control","id":"..","data":{..}}`. The node sends
//! the `data` object as a NATS request to `<prefix>.<user>` with the user
//! taken from the socket's token, never from the frame, and brings the first
//! reply back as `control_reply`, or says why not with `control_error`.
//! Nothing is stored or resent: a request reaches an agent at most once.
//!
//! Each socket's requests are bounded twice, a token bucket on their rate
//! and a bound on those in flight, and run as tasks of their own, so the
//! socket goes on serving events while an agent thinks. Every answer goes
//! into the socket's outbound queue ([`crate::hub::Queued`]) like an event:
//! in order with the other frames, and a client that does not read is closed
//! as slow when the queue fills, as it would be for events.
//!
//! The agents' side is [`Listener`]: a queue-group subscription on
//! `<prefix>.*` that hands each request's user, id and data to the caller.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, RequestErrorKind};
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc::WeakUnboundedSender;
use tokio::task::JoinSet;

use crate::hub::{Item, Kicker, Queued};
use crate::metrics as m;
use crate::protocol::ServerFrame;
use crate::user::UserId;

/// Default of `--control-prefix`: requests go to `<prefix>.<user id>`.
pub const DEFAULT_PREFIX: &str = "agentcast.control";

/// Default of `--control-timeout`. An agent that is up answers a stop or an
/// approval in milliseconds; 5 s covers one busy with a slow step, and is
/// still short enough for a person watching a Stop button.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default of `--control-rate`, requests per second a socket may send on
/// average. People press buttons: 10 a second is more than anyone clicks,
/// and keeps a scripted client from turning one socket into a flood on the
/// agents' subjects.
pub const DEFAULT_RATE: u32 = 10;

/// Default of `--control-burst`, the token bucket's size: a page that sends
/// a few requests at once (stop every run of a list) is not refused.
pub const DEFAULT_BURST: u32 = 20;

/// Default of `--control-pending`, a socket's requests in flight at most.
/// Each holds a task and a reply subscription until its answer or timeout;
/// 8 covers a page waiting on several agents, and bounds what one socket
/// holds at 8 tasks for `--control-timeout`.
pub const DEFAULT_PENDING: usize = 8;

/// Longest request id, in characters. Ids are the client's own correlation
/// keys (a counter, a UUID); 64 holds either with room.
pub const MAX_ID_LEN: usize = 64;

/// Largest reply forwarded, in bytes: the largest event a node forwards
/// ([`crate::config::MAX_EVENT_BYTES`]), so the frame fits the socket's
/// write buffer bound ([`crate::socket::MAX_WRITE_BUFFER`]). A bigger reply
/// is answered `bad_reply`.
pub const MAX_REPLY_BYTES: usize = crate::config::MAX_EVENT_BYTES;

/// Header with the user id, from the socket's token.
pub const HEADER_USER: &str = "Agentcast-User";
/// Header with the id of the node that sent the request.
pub const HEADER_NODE: &str = "Agentcast-Node";
/// Header with the client's request id (the frame's `id`).
pub const HEADER_REQUEST: &str = "Agentcast-Request";

/// How a control request ended: the label of [`m::CONTROL_REQUESTS`] and,
/// but for `Ok`, the `code` of the `control_error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An agent replied with a JSON object.
    Ok,
    /// No agent listens on the user's control subject.
    NoAgent,
    /// No reply within `--control-timeout`; an agent may still have acted.
    Timeout,
    /// Over the socket's rate (`--control-rate`, `--control-burst`).
    RateLimited,
    /// `--control-pending` requests of the socket are in flight.
    TooManyPending,
    /// The reply was not a JSON object (or bigger than [`MAX_REPLY_BYTES`]).
    BadReply,
    /// The node runs with `--no-control`.
    Disabled,
    /// The frame did not follow the contract.
    BadFrame,
    /// The node's NATS connection failed the request (closed, or the
    /// server's max_payload is smaller than the request); an agent may
    /// have received it, as with `Timeout`.
    Unavailable,
}

/// Every [`Outcome`], for registering the metric's series at zero.
pub const OUTCOMES: [Outcome; 9] = [
    Outcome::Ok,
    Outcome::NoAgent,
    Outcome::Timeout,
    Outcome::RateLimited,
    Outcome::TooManyPending,
    Outcome::BadReply,
    Outcome::Disabled,
    Outcome::BadFrame,
    Outcome::Unavailable,
];

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NoAgent => "no_agent",
            Outcome::Timeout => "timeout",
            Outcome::RateLimited => "rate_limited",
            Outcome::TooManyPending => "too_many_pending",
            Outcome::BadReply => "bad_reply",
            Outcome::Disabled => "disabled",
            Outcome::BadFrame => "bad_frame",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// The node's control settings (the `--control-*` flags), checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `false` with `--no-control`: every request is answered `disabled`.
    pub enabled: bool,
    pub prefix: String,
    pub timeout: Duration,
    /// Requests per second, on average, per socket.
    pub rate: u32,
    /// Requests a socket may send at once after a quiet spell.
    pub burst: u32,
    /// Requests of one socket in flight at most.
    pub pending: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            prefix: DEFAULT_PREFIX.into(),
            timeout: DEFAULT_TIMEOUT,
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
            pending: DEFAULT_PENDING,
        }
    }
}

impl Settings {
    /// The subject a user's control requests go to.
    pub fn subject(&self, user: &UserId) -> String {
        format!("{}.{}", self.prefix, user.as_str())
    }
}

/// What the node's sockets share to send requests.
pub struct Node {
    pub settings: Settings,
    pub client: Client,
    pub node_id: Arc<str>,
}

/// A control frame as the client sent it, checked.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub id: String,
    /// The `data` object's JSON text, as sent.
    pub data: Bytes,
}

/// Why a control frame was refused. With an `id` the client is answered
/// with `control_error` (`bad_frame`); without one, with an `error` frame,
/// as for any frame the node did not understand.
#[derive(Debug, PartialEq)]
pub struct BadFrame {
    pub id: Option<String>,
    pub why: FrameError,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("control frame: {0}")]
    Json(String),
    #[error("control frame: id must be a string of 1 to {MAX_ID_LEN} visible ASCII characters")]
    Id,
    #[error("control frame: data must be a JSON object")]
    Data,
}

#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

impl BadFrame {
    /// The frame that answers it, on a socket and over HTTP alike:
    /// `control_error` `bad_frame` for its id, or, without a usable id, an
    /// `error` frame with the code `bad_frame`.
    fn answer(&self) -> Utf8Bytes {
        let why = self.why.to_string();
        match &self.id {
            Some(id) => error_frame(id, Outcome::BadFrame, Some(&why)),
            None => ServerFrame::Error { code: "bad_frame", message: &why }.to_text(),
        }
    }
}

/// Reads a client text frame as a control frame: `None` when it is not one
/// (its `type` is not `control`, or it is no JSON object with a `type`), for
/// the socket's other frames to handle.
pub fn parse(text: &str) -> Option<Result<Request, BadFrame>> {
    let kind: Kind = serde_json::from_str(text).ok()?;
    if kind.kind.as_deref() != Some("control") {
        return None;
    }
    let frame: Frame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => return Some(Err(BadFrame { id: None, why: FrameError::Json(e.to_string()) })),
    };
    let Some(id) = frame.id.and_then(|raw| serde_json::from_str::<String>(raw.get()).ok()).filter(|id| valid_id(id))
    else {
        return Some(Err(BadFrame { id: None, why: FrameError::Id }));
    };
    match frame.data.map(RawValue::get) {
        Some(data) if data.starts_with('{') => Some(Ok(Request { id, data: Bytes::copy_from_slice(data.as_bytes()) })),
        _ => Some(Err(BadFrame { id: Some(id), why: FrameError::Data })),
    }
}

/// 1 to [`MAX_ID_LEN`] visible ASCII characters: the id goes into a NATS
/// header, where a line break would end the header and anything outside
/// ASCII is not portable; spaces at either end would be trimmed by some
/// parsers, so none at all.
fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// `{"type":"control_reply","id":..,"data":<reply>}` with the reply embedded
/// as the agent sent it; an empty reply is `{}`. `Err` when the reply is not
/// a JSON object or is over [`MAX_REPLY_BYTES`].
pub fn reply_frame(id: &str, reply: &[u8]) -> Result<Utf8Bytes, Outcome> {
    if reply.len() > MAX_REPLY_BYTES {
        return Err(Outcome::BadReply);
    }
    let text = std::str::from_utf8(reply).map_err(|_| Outcome::BadReply)?;
    let data: &RawValue = if text.is_empty() {
        serde_json::from_str("{}").map_err(|_| Outcome::BadReply)?
    } else {
        serde_json::from_str(text).map_err(|_| Outcome::BadReply)?
    };
    if !data.get().starts_with('{') {
        return Err(Outcome::BadReply);
    }
    Ok(ServerFrame::ControlReply { id, data }.to_text())
}

/// `{"type":"control_error","id":..,"code":..}`, with a `message` for
/// `bad_frame`.
pub fn error_frame(id: &str, code: Outcome, message: Option<&str>) -> Utf8Bytes {
    ServerFrame::ControlError { id, code: code.label(), message }.to_text()
}

/// Requests per second, refilled continuously, up to `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32) -> Self {
        Self { tokens: f64::from(burst), at: Instant::now() }
    }

    fn refill(&mut self, rate: u32, burst: u32, now: Instant) {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.at = now;
    }

    /// Whether it is full again: then forgetting it changes nothing.
    fn refilled(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        self.tokens >= f64::from(burst)
    }

    fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One socket's control requests: its rate, those in flight, and where
/// their answers go. Made at the socket's first control frame, so a socket
/// that never sends one carries only the pointer to it. Dropped with the socket,
/// which aborts the requests still waiting for a reply (their client is
/// gone; a request already sent may still have reached an agent).
pub struct Socket {
    node: Arc<Node>,
    subject: String,
    user: UserId,
    queue: WeakUnboundedSender<Queued>,
    kicker: Arc<Kicker>,
    /// The socket's byte budget (`--socket-queue-bytes`), which answers
    /// count against as events do.
    budget: usize,
    bucket: Bucket,
    in_flight: JoinSet<()>,
}

impl Socket {
    /// `queue` is the socket's outbound queue, held weakly so that the
    /// socket still sees the hub drop its sender; `budget` its byte budget.
    pub fn new(
        node: Arc<Node>,
        user: UserId,
        queue: WeakUnboundedSender<Queued>,
        kicker: Arc<Kicker>,
        budget: usize,
    ) -> Self {
        let bucket = Bucket::full(node.settings.burst);
        let subject = node.settings.subject(&user);
        Self { subject, node, user, queue, kicker, budget, bucket, in_flight: JoinSet::new() }
    }

    /// Handles one control frame: answers it at once (refused) or starts
    /// its request. Never waits.
    pub fn handle(&mut self, frame: Result<Request, BadFrame>) {
        let req = match frame {
            Ok(req) => req,
            Err(bad) => {
                count(Outcome::BadFrame);
                if bad.id.is_none() {
                    // No request to answer: a bad client frame like any other.
                    metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "bad_frame").increment(1);
                }
                return enqueue(&self.queue, &self.kicker, self.budget, bad.answer());
            }
        };
        let s = &self.node.settings;
        if !s.enabled {
            return self.refuse(&req.id, Outcome::Disabled, None);
        }
        if !self.bucket.take(s.rate, s.burst, Instant::now()) {
            return self.refuse(&req.id, Outcome::RateLimited, None);
        }
        while self.in_flight.try_join_next().is_some() {}
        if self.in_flight.len() >= s.pending {
            return self.refuse(&req.id, Outcome::TooManyPending, None);
        }
        let node = self.node.clone();
        let (subject, user, queue, kicker, budget) =
            (self.subject.clone(), self.user.clone(), self.queue.clone(), self.kicker.clone(), self.budget);
        self.in_flight.spawn(async move {
            let (_, frame) = ask(&node, subject, &user, req).await;
            enqueue(&queue, &kicker, budget, frame);
        });
    }

    fn refuse(&self, id: &str, code: Outcome, message: Option<&str>) {
        count(code);
        enqueue(&self.queue, &self.kicker, self.budget, error_frame(id, code, message));
    }
}

fn count(outcome: Outcome) {
    metrics::counter!(m::CONTROL_REQUESTS, "outcome" => outcome.label()).increment(1);
}

/// Sends the request and returns the frame that answers it, with its outcome.
async fn ask(node: &Node, subject: String, user: &UserId, req: Request) -> (Outcome, Utf8Bytes) {
    let mut headers = HeaderMap::new();
    // Checked: user ids and request ids are visible ASCII, node ids come
    // from the operator (a bad one fails the request, not the node).
    headers.insert(HEADER_USER, user.as_str());
    headers.insert(HEADER_REQUEST, req.id.as_str());
    if let Ok(v) = node.node_id.parse::<async_nats::HeaderValue>() {
        headers.insert(HEADER_NODE, v);
    }
    let request = async_nats::Request::new().headers(headers).payload(req.data).timeout(Some(node.settings.timeout));
    let sent = Instant::now();
    let outcome = match node.client.send_request(subject, request).await {
        Ok(msg) => {
            metrics::histogram!(m::CONTROL_REPLY_TIME).record(sent.elapsed().as_secs_f64());
            match reply_frame(&req.id, &msg.payload) {
                Ok(frame) => {
                    count(Outcome::Ok);
                    return (Outcome::Ok, frame);
                }
                Err(bad) => bad,
            }
        }
        Err(e) => match e.kind() {
            RequestErrorKind::NoResponders => Outcome::NoAgent,
            RequestErrorKind::TimedOut => Outcome::Timeout,
            _ => {
                tracing::warn!(error = %e, "control request failed");
                Outcome::Unavailable
            }
        },
    };
    count(outcome);
    (outcome, error_frame(&req.id, outcome, None))
}

/// Users whose `POST /control` budgets a node keeps at once. An entry is
/// kept while its user has requests in flight or its bucket is not full
/// again; past this many, idle entries are dropped first, and if none is
/// idle the request is refused (`429`, `too_many_pending`) rather than the
/// map growing: about 100 bytes an entry, 6.4 MB at the bound.
pub const MAX_HTTP_USERS: usize = 65_536;

/// Control requests over HTTP (`POST /control`), for clients on an event
/// stream, which cannot send frames. The same request, limits and answers
/// as a socket's ([`Socket`]), except that the rate, burst and pending
/// limits are per user on the node (an HTTP request has no socket).
pub struct Http {
    node: Arc<Node>,
    users: std::sync::Mutex<std::collections::HashMap<UserId, HttpUser>>,
}

struct HttpUser {
    bucket: Bucket,
    in_flight: usize,
}

impl Http {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node, users: std::sync::Mutex::default() }
    }

    /// Answers one request body (a `control` frame, as on a socket): the
    /// frame that answers it (`control_reply`, `control_error` or `error`)
    /// and its outcome.
    pub async fn handle(&self, user: &UserId, body: &str) -> (Outcome, Utf8Bytes) {
        let req = match parse(body) {
            Some(Ok(req)) => req,
            Some(Err(bad)) => {
                count(Outcome::BadFrame);
                return (Outcome::BadFrame, bad.answer());
            }
            None => {
                count(Outcome::BadFrame);
                let message = r#"the body must be a control frame: {"type":"control","id":...,"data":{...}}"#;
                return (Outcome::BadFrame, ServerFrame::Error { code: "bad_frame", message }.to_text());
            }
        };
        let s = &self.node.settings;
        if !s.enabled {
            count(Outcome::Disabled);
            return (Outcome::Disabled, error_frame(&req.id, Outcome::Disabled, None));
        }
        if let Err(refused) = self.take(user) {
            count(refused);
            return (refused, error_frame(&req.id, refused, None));
        }
        // Released however the request ends (also when its client leaves
        // and the handler is dropped).
        let _in_flight = InFlight { http: self, user };
        ask(&self.node, s.subject(user), user, req).await
    }

    fn take(&self, user: &UserId) -> Result<(), Outcome> {
        let s = &self.node.settings;
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if !users.contains_key(user) && users.len() >= MAX_HTTP_USERS {
            let (rate, burst) = (s.rate, s.burst);
            users.retain(|_, u| u.in_flight > 0 || !u.bucket.refilled(rate, burst, now));
            if users.len() >= MAX_HTTP_USERS {
                return Err(Outcome::TooManyPending);
            }
        }
        let entry =
            users.entry(user.clone()).or_insert_with(|| HttpUser { bucket: Bucket::full(s.burst), in_flight: 0 });
        if entry.in_flight >= s.pending {
            return Err(Outcome::TooManyPending);
        }
        if !entry.bucket.take(s.rate, s.burst, now) {
            return Err(Outcome::RateLimited);
        }
        entry.in_flight += 1;
        Ok(())
    }
}

/// One HTTP control request in flight for its user.
struct InFlight<'a> {
    http: &'a Http,
    user: &'a UserId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut users = self.http.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = users.get_mut(self.user) {
            u.in_flight = u.in_flight.saturating_sub(1);
        }
    }
}

/// Puts an answer in the socket's queue, counted in bytes as an event is;
/// a queue over its bytes closes the socket as slow, as an event would
/// ([`crate::protocol::close::SLOW`]). A socket that is gone needs no answer.
fn enqueue(queue: &WeakUnboundedSender<Queued>, kicker: &Kicker, budget: usize, frame: Utf8Bytes) {
    let Some(tx) = queue.upgrade() else { return };
    let bytes = frame.len();
    if !kicker.charge(bytes, budget) {
        return kicker.overflowed("bytes");
    }
    if tx.send(Arc::new(Item::Control(frame))).is_err() {
        kicker.release(bytes);
    }
}

/// A control request as an agent receives it from [`Listener::next`].
#[derive(Debug)]
pub struct Incoming {
    /// The user whose socket sent it, from the token (the subject's last
    /// token and the `Agentcast-User` header, checked to agree).
    pub user: UserId,
    /// The client's request id.
    pub id: String,
    /// The node that sent it.
    pub node: String,
    /// The request's `data` object.
    pub data: serde_json::Map<String, serde_json::Value>,
    reply: Option<async_nats::Subject>,
    client: Client,
}

/// Why [`Incoming::reply`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("the request has no reply subject (it was not sent as a request)")]
    NoReplySubject,
    #[error("the reply must be a JSON object")]
    NotObject,
    #[error("publishing the reply: {0}")]
    Publish(#[from] async_nats::PublishError),
}

impl Incoming {
    /// Answers the request with `data`, which must be a JSON object; the
    /// client receives it as its `control_reply`. Only the first answer to
    /// a request reaches the client.
    pub async fn reply(&self, data: &serde_json::Value) -> Result<(), ReplyError> {
        if !data.is_object() {
            return Err(ReplyError::NotObject);
        }
        let subject = self.reply.clone().ok_or(ReplyError::NoReplySubject)?;
        let body = serde_json::to_vec(data).map_err(|_| ReplyError::NotObject)?;
        self.client.publish(subject, body.into()).await?;
        Ok(())
    }
}

/// The agents' side: a subscription on `<prefix>.*` in a queue group, so
/// each request goes to one member of the group.
pub struct Listener {
    prefix: String,
    client: Client,
    sub: async_nats::Subscriber,
}

/// Why a received message was not handed over by [`Listener::next`]; it is
/// logged and skipped (the node then answers its client `timeout`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IncomingError {
    #[error("subject {0:?} is not <prefix>.<user id>")]
    Subject(String),
    #[error("the {HEADER_USER} header does not name the subject's user")]
    UserHeader,
    #[error("no {HEADER_REQUEST} header")]
    RequestHeader,
    #[error("the payload is not a JSON object")]
    Payload,
}

impl Listener {
    /// Subscribes to `<prefix>.*` in queue group `group`.
    pub async fn subscribe(client: Client, prefix: &str, group: &str) -> Result<Self, async_nats::SubscribeError> {
        let sub = client.queue_subscribe(format!("{prefix}.*"), group.to_owned()).await?;
        Ok(Self { prefix: prefix.to_owned(), client, sub })
    }

    /// The next request; `None` when the subscription ends. Messages that
    /// are not control requests are logged and skipped.
    pub async fn next(&mut self) -> Option<Incoming> {
        loop {
            let msg = self.sub.next().await?;
            match self.read(msg) {
                Ok(incoming) => return Some(incoming),
                Err(e) => tracing::warn!(error = %e, "not a control request; skipped"),
            }
        }
    }

    fn read(&self, msg: async_nats::Message) -> Result<Incoming, IncomingError> {
        let subject = msg.subject.as_str();
        let user = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|u| UserId::parse(u).ok())
            .ok_or_else(|| IncomingError::Subject(subject.to_owned()))?;
        let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
        if header(HEADER_USER).as_deref() != Some(user.as_str()) {
            return Err(IncomingError::UserHeader);
        }
        let id = header(HEADER_REQUEST).ok_or(IncomingError::RequestHeader)?;
        let node = header(HEADER_NODE).unwrap_or_default();
        let data = serde_json::from_slice(&msg.payload).map_err(|_| IncomingError::Payload)?;
        Ok(Incoming { user, id, node, data, reply: msg.reply, client: self.client.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(id: &str, data: &str) -> Option<Result<Request, BadFrame>> {
        Some(Ok(Request { id: id.into(), data: Bytes::copy_from_slice(data.as_bytes()) }))
    }

    fn bad(id: Option<&str>, why: FrameError) -> Option<Result<Request, BadFrame>> {
        Some(Err(BadFrame { id: id.map(Into::into), why }))
    }

    #[test]
    fn control_frames_are_read_with_their_data_as_sent() {
        let data = r#"{ "action":"cancel", "x":1.50, "s":"\u00e9" }"#;
        assert_eq!(parse(&format!(r#"{{"type":"control","id":"r1","data":{data}}}"#)), ok("r1", data));
        assert_eq!(parse(r#"{"data":{},"id":"a\"b","type":"control","extra":1}"#), ok("a\"b", "{}"));
        assert_eq!(
            parse(&format!(r#"{{"type":"control","id":"{}","data":{{}}}}"#, "x".repeat(64))).map(|r| r.is_ok()),
            Some(true)
        );
        // Not control frames: left to the socket's other handling.
        for other in [r#"{"type":"ping"}"#, r#"{"type":"resume","last_seq":1}"#, "nope", "[1]", r#"{"id":"x"}"#] {
            assert_eq!(parse(other), None, "{other}");
        }
    }

    #[test]
    fn bad_control_frames_say_why() {
        for id in [r#""""#, &format!(r#""{}""#, "x".repeat(65)), "1", "null", r#""a b""#, r#""a\nb""#, r#""é""#] {
            let frame = format!(r#"{{"type":"control","id":{id},"data":{{}}}}"#);
            assert_eq!(parse(&frame), bad(None, FrameError::Id), "{frame}");
        }
        assert_eq!(parse(r#"{"type":"control","data":{}}"#), bad(None, FrameError::Id));
        for data in ["[]", "1", "\"s\"", "null"] {
            let frame = format!(r#"{{"type":"control","id":"r","data":{data}}}"#);
            assert_eq!(parse(&frame), bad(Some("r"), FrameError::Data), "{frame}");
        }
        assert_eq!(parse(r#"{"type":"control","id":"r"}"#), bad(Some("r"), FrameError::Data));
        let dup = parse(r#"{"type":"control","id":"a","id":"b","data":{}}"#);
        assert!(matches!(dup, Some(Err(BadFrame { id: None, why: FrameError::Json(_) }))), "{dup:?}");
    }

    #[test]
    fn replies_must_be_json_objects() {
        assert_eq!(
            reply_frame("r\"1", br#"{"ok": true}"#).unwrap().as_str(),
            r#"{"type":"control_reply","id":"r\"1","data":{"ok": true}}"#
        );
        assert_eq!(reply_frame("r", b"").unwrap().as_str(), r#"{"type":"control_reply","id":"r","data":{}}"#);
        for bad in [&b"[]"[..], b"1", b"nope", b"{", b" ", &[b'{', 0xff, b'}']] {
            assert_eq!(reply_frame("r", bad), Err(Outcome::BadReply), "{bad:?}");
        }
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_REPLY_BYTES));
        assert_eq!(reply_frame("r", big.as_bytes()), Err(Outcome::BadReply));
        assert_eq!(
            error_frame("r", Outcome::NoAgent, None).as_str(),
            r#"{"type":"control_error","id":"r","code":"no_agent"}"#
        );
    }

    #[test]
    fn the_bucket_allows_bursts_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket { tokens: 3.0, at: t0 };
        assert!((0..3).all(|_| b.take(10, 3, t0)));
        assert!(!b.take(10, 3, t0));
        assert!(!b.take(10, 3, t0 + Duration::from_millis(50)));
        assert!(b.take(10, 3, t0 + Duration::from_millis(100)));
        // A long quiet spell refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..5).filter(|_| b.take(10, 3, later)).count(), 3);
    }

    #[test]
    fn subjects_are_the_prefix_and_the_user() {
        let s = Settings::default();
        assert_eq!(s.subject(&UserId::parse("auth0|u-1").unwrap()), "agentcast.control.auth0|u-1");
    }
}
