//! Publishing events: the envelope, JetStream publishes with their acks,
//! retries that keep the message id, and pipelined batches.
//!
//! [`TextStream`] publishes one message's text as it is generated: it
//! coalesces tokens into delta events (docs/publishing.md, section 10),
//! because every published event is a JetStream write.
//!
//! The wire contract this implements is in docs/publishing.md; a publisher in
//! any other language that follows it is equivalent. Events go to
//! `<prefix>.<user_id>` through JetStream, so every publish is answered with
//! the stream sequence it was stored at. Each event carries a `Nats-Msg-Id`,
//! and a retry reuses it: within the stream's duplicate window the stream
//! stores the event once, however often the publish was retried.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::user::{UserId, UserIdError};

/// Events awaiting their ack in [`Publisher::publish_batch`]. Acks come back
/// in publish order on one connection, so a window this deep keeps the
/// connection busy instead of paying a round trip per event, while bounding
/// the events held for a possible retry. When the window is full the batch
/// waits for the oldest ack before sending the next event.
pub const MAX_IN_FLIGHT: usize = 256;

/// Attempts per event (the first publish and its retries) before
/// [`PublishError::Unacknowledged`]. With the backoff below they span about
/// 3 s, well inside the default 2-minute duplicate window, so a retry of an
/// event that was in fact stored is recognised as a duplicate.
pub const MAX_ATTEMPTS: u32 = 5;
/// First retry delay ceiling; doubles per attempt (full jitter).
pub const RETRY_BASE: Duration = Duration::from_millis(100);
/// Largest retry delay ceiling.
pub const RETRY_MAX: Duration = Duration::from_secs(2);
/// Time to wait for one ack before the attempt counts as failed.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Default largest event in bytes: the node's default `--max-event-bytes`.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 256 * 1024;
/// Default subject prefix: the node's default `--subject-prefix`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "agentcast.events";

/// Longest event type name.
pub const MAX_TYPE_LEN: usize = 64;

/// Longest `Nats-Msg-Id`. The stream keeps every id of its duplicate window
/// in memory (and its replicas do too), so ids are meant to be short: a
/// UUID is 36 bytes, `<run_id>-<step>` a few dozen.
pub const MAX_MSG_ID_LEN: usize = 256;

/// The built-in event types. Custom types carry a namespace
/// (`<namespace>.<name>`), so they can never collide with a type added here.
/// `message_delta` is the agent's answer streamed as delta events.
pub const BUILT_IN_TYPES: [&str; 7] = [
    "agent_started",
    "agent_thinking",
    "message_delta",
    "tool_executing",
    "tool_completed",
    "agent_completed",
    "error",
];

/// Longest `message_id` of a delta event, in characters: the contract of
/// docs/publishing.md section 10, which lets nodes and clients key messages
/// by it without a size surprise.
pub const MAX_MESSAGE_ID_CHARS: usize = 128;

/// Default time a [`TextStream`] holds the first unpublished token before it
/// publishes what it has: at 40 tokens a second about two tokens a delta,
/// and well under the 100 ms a reader notices.
pub const DEFAULT_COALESCE_DELAY: Duration = Duration::from_millis(50);
/// Default text a [`TextStream`] buffers before it publishes at once,
/// whatever the time: keeps a burst (a cached answer) to a few events
/// without making any one of them large.
pub const DEFAULT_COALESCE_BYTES: usize = 4096;
/// Tokens handed to a [`TextStream`] and not yet taken by its task. When
/// full (the stream is waiting for an ack or retrying),
/// [`TextStream::push`] waits: the producer is slowed instead of the
/// stream holding an unbounded backlog.
pub const TEXT_STREAM_QUEUE: usize = 1024;

/// Why an event was not published. Callers branch on these: the first five
/// are the caller's input and a retry cannot help; `StreamUnavailable` and
/// `Unacknowledged` may pass once NATS or the stream is back.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    UserId(#[from] UserIdError),
    #[error("event is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error(
        "event type {0:?} is not valid: use a built-in type or <namespace>.<name> of ASCII lower-case letters, digits, '_' and '-' (at most {MAX_TYPE_LEN} bytes)"
    )]
    EventType(String),
    #[error("event is not a valid envelope: {0}")]
    Envelope(String),
    /// The message id is the only header a publish carries; it must be
    /// 1 to [`MAX_MSG_ID_LEN`] visible ASCII characters. A CR or LF would
    /// otherwise start another header line, such as a forged `Nats-Sequence`.
    #[error(
        "message id {0:?} is not valid: use 1 to {MAX_MSG_ID_LEN} visible ASCII characters (no spaces or control characters)"
    )]
    MsgId(String),
    /// A delta event's `message_id` must be 1 to [`MAX_MESSAGE_ID_CHARS`]
    /// characters, and a delta event has both `message_id` and `delta`.
    #[error(
        "delta event is not valid: {0} (a delta event has a string `message_id` of 1 to {MAX_MESSAGE_ID_CHARS} characters and a string `delta`)"
    )]
    Delta(String),
    /// No stream stores the subject (or JetStream is not enabled).
    #[error("no stream stores {subject}: is an agentcast node running against this NATS, or the stream created?")]
    StreamUnavailable { subject: String },
    /// JetStream refused the event (for example the stream's own size limit).
    #[error("the stream refused the event: {0}")]
    Rejected(String),
    /// Every attempt failed to send or to get its ack.
    #[error("not acknowledged after {attempts} attempts: {last}")]
    Unacknowledged { attempts: u32, last: String },
    /// Not sent: an earlier event of the same batch failed, and sending on
    /// would store later events around the hole it left.
    #[error("not sent: an earlier event of the batch failed")]
    NotSent,
}

/// One event as published: the envelope of docs/publishing.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The message a delta event belongs to (docs/publishing.md section 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Text to append to the message `message_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
    /// RFC 3339, UTC, milliseconds: when the event happened.
    #[serde(default = "now")]
    pub timestamp: String,
    #[serde(default = "empty_object")]
    pub data: Value,
    /// The `Nats-Msg-Id`: random unless set with [`Event::id`]. Not part of
    /// the payload.
    #[serde(skip, default = "new_id")]
    pub msg_id: String,
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn empty_object() -> Value {
    json!({})
}

/// 128 random bits in hex: unique without coordination between publishers.
fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Event {
    fn built_in(kind: &str, run_id: &str, data: Value) -> Self {
        Self {
            kind: kind.to_owned(),
            run_id: Some(run_id.to_owned()),
            thread_id: None,
            agent: None,
            message_id: None,
            delta: None,
            timestamp: now(),
            data,
            msg_id: new_id(),
        }
    }

    /// A run began; `input` is what it was asked.
    pub fn agent_started(run_id: &str, input: impl Into<Value>) -> Self {
        Self::built_in("agent_started", run_id, json!({ "input": input.into() }))
    }

    /// Reasoning text the agent chose to show.
    pub fn agent_thinking(run_id: &str, text: &str) -> Self {
        Self::built_in("agent_thinking", run_id, json!({ "text": text }))
    }

    /// Text to append to the message `message_id`: a delta event. Its type
    /// is `kind` (for example `message_delta` or `agent_thinking`).
    pub fn delta(kind: &str, run_id: &str, message_id: &str, delta: &str) -> Result<Self, PublishError> {
        check_type(kind)?;
        check_message_id(message_id)?;
        Ok(Self {
            message_id: Some(message_id.to_owned()),
            delta: Some(delta.to_owned()),
            ..Self::built_in(kind, run_id, json!({}))
        })
    }

    /// A tool call began.
    pub fn tool_executing(run_id: &str, tool: &str, args: impl Into<Value>) -> Self {
        Self::built_in("tool_executing", run_id, json!({ "tool": tool, "args": args.into() }))
    }

    /// A tool call returned.
    pub fn tool_completed(run_id: &str, tool: &str, result: impl Into<Value>) -> Self {
        Self::built_in("tool_completed", run_id, json!({ "tool": tool, "result": result.into() }))
    }

    /// The run finished with `output`.
    pub fn agent_completed(run_id: &str, output: impl Into<Value>) -> Self {
        Self::built_in("agent_completed", run_id, json!({ "output": output.into() }))
    }

    /// The run was stopped before it finished (a user's cancel, docs/publishing.md
    /// section 9): `agent_completed` with `{"status":"cancelled"}`.
    pub fn agent_cancelled(run_id: &str) -> Self {
        Self::built_in("agent_completed", run_id, json!({ "status": "cancelled" }))
    }

    /// The run failed; `code` is a short machine-readable reason.
    pub fn error(run_id: &str, code: &str, message: &str) -> Self {
        Self::built_in("error", run_id, json!({ "code": code, "message": message }))
    }

    /// An event of the caller's own type, `<namespace>.<name>`.
    pub fn custom(kind: &str, run_id: &str, data: impl Into<Value>) -> Result<Self, PublishError> {
        check_type(kind)?;
        Ok(Self::built_in(kind, run_id, data.into()))
    }

    /// An event of any valid type (built-in or custom) without a run.
    pub fn new(kind: &str, data: impl Into<Value>) -> Result<Self, PublishError> {
        check_type(kind)?;
        Ok(Self { run_id: None, ..Self::built_in(kind, "", data.into()) })
    }

    /// An envelope from JSON text (the CLI's input), checked; a missing
    /// `timestamp` is now, a missing `data` is `{}`.
    pub fn from_json(text: &str) -> Result<Self, PublishError> {
        let event: Event = serde_json::from_str(text).map_err(|e| PublishError::Envelope(e.to_string()))?;
        check_type(&event.kind)?;
        if !event.data.is_object() {
            return Err(PublishError::Envelope("`data` must be a JSON object".into()));
        }
        check_delta(&event)?;
        Ok(event)
    }

    pub fn run(mut self, run_id: &str) -> Self {
        self.run_id = Some(run_id.to_owned());
        self
    }

    pub fn thread(mut self, thread_id: &str) -> Self {
        self.thread_id = Some(thread_id.to_owned());
        self
    }

    pub fn agent(mut self, agent: &str) -> Self {
        self.agent = Some(agent.to_owned());
        self
    }

    /// Sets the `Nats-Msg-Id`: give the same id when the same event may be
    /// published again (for example by a restarted job), and it is stored once.
    pub fn id(mut self, msg_id: &str) -> Self {
        self.msg_id = msg_id.to_owned();
        self
    }

    /// The payload bytes.
    pub fn to_bytes(&self) -> Bytes {
        // An Event holds only strings and a serde_json::Value: it always serialises.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// A built-in type, or `<namespace>.<name>` with each part non-empty and made
/// of ASCII lower-case letters, digits, `_` and `-`.
pub fn check_type(kind: &str) -> Result<(), PublishError> {
    if BUILT_IN_TYPES.contains(&kind) {
        return Ok(());
    }
    let part_ok = |p: &str| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    let valid = kind.len() <= MAX_TYPE_LEN && kind.contains('.') && kind.split('.').all(part_ok);
    if valid { Ok(()) } else { Err(PublishError::EventType(kind.to_owned())) }
}

/// A delta event's `message_id`: 1 to [`MAX_MESSAGE_ID_CHARS`] characters.
pub fn check_message_id(message_id: &str) -> Result<(), PublishError> {
    let n = message_id.chars().count();
    if n == 0 || n > MAX_MESSAGE_ID_CHARS {
        return Err(PublishError::Delta(format!("`message_id` is {n} characters")));
    }
    Ok(())
}

/// An event with `message_id` or `delta` has both, and a valid `message_id`.
fn check_delta(event: &Event) -> Result<(), PublishError> {
    match (&event.message_id, &event.delta) {
        (None, None) => Ok(()),
        (Some(id), Some(_)) => check_message_id(id),
        (Some(_), None) => Err(PublishError::Delta("`delta` is missing".into())),
        (None, Some(_)) => Err(PublishError::Delta("`message_id` is missing".into())),
    }
}

/// A `Nats-Msg-Id` value: 1 to [`MAX_MSG_ID_LEN`] visible ASCII characters.
pub fn check_msg_id(id: &str) -> Result<(), PublishError> {
    let valid = !id.is_empty() && id.len() <= MAX_MSG_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic());
    if valid { Ok(()) } else { Err(PublishError::MsgId(id.to_owned())) }
}

/// What the stream said about a stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The stream sequence: the `seq` clients receive.
    pub seq: u64,
    /// True when the stream already held an event with this message id (a
    /// retry, or the same event published twice); `seq` is the first one's.
    pub duplicate: bool,
    pub msg_id: String,
}

/// Publishes events through JetStream.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    subject_prefix: String,
    max_event_bytes: usize,
}

/// An event checked and encoded, ready to be (re)sent.
struct Prepared {
    subject: String,
    msg_id: String,
    payload: Bytes,
}

impl Publisher {
    /// With the node's default subject prefix and event size limit.
    pub fn new(client: async_nats::Client) -> Self {
        let mut js = jetstream::new(client);
        js.set_timeout(ACK_TIMEOUT);
        Self { js, subject_prefix: DEFAULT_SUBJECT_PREFIX.into(), max_event_bytes: DEFAULT_MAX_EVENT_BYTES }
    }

    /// The node's `--subject-prefix`, if not the default.
    pub fn subject_prefix(mut self, prefix: &str) -> Self {
        self.subject_prefix = prefix.to_owned();
        self
    }

    /// The node's `--max-event-bytes`, if not the default. Larger events are
    /// refused here, before they reach NATS.
    pub fn max_event_bytes(mut self, max: usize) -> Self {
        self.max_event_bytes = max;
        self
    }

    /// Time to wait for each ack (default [`ACK_TIMEOUT`]).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.js.set_timeout(timeout);
        self
    }

    /// The subject of a user's events.
    pub fn subject(&self, user: &UserId) -> String {
        format!("{}.{user}", self.subject_prefix)
    }

    fn prepare(&self, user: &str, event: &Event) -> Result<Prepared, PublishError> {
        let user = UserId::parse(user)?;
        check_msg_id(&event.msg_id)?;
        check_delta(event)?;
        let payload = event.to_bytes();
        if payload.len() > self.max_event_bytes {
            return Err(PublishError::TooLarge { size: payload.len(), max: self.max_event_bytes });
        }
        Ok(Prepared { subject: self.subject(&user), msg_id: event.msg_id.clone(), payload })
    }

    /// Publishes one event and waits for the stream to store it, retrying
    /// with backoff under the same message id.
    pub async fn publish(&self, user: &str, event: &Event) -> Result<Published, PublishError> {
        let p = self.prepare(user, event)?;
        self.send_until_acked(&p, 0, None).await
    }

    /// Publishes a user's events in order, with up to [`MAX_IN_FLIGHT`]
    /// awaiting their acks. One result per event, in the same order. An
    /// event whose send or ack fails is retried (same message id) before
    /// later acks are collected; events already in flight behind it may then
    /// be stored before it. Once an event has failed for good, no further
    /// event is sent ([`PublishError::NotSent`]); those already in flight
    /// may still be stored, and their results say so. Use
    /// [`Publisher::publish`] one event at a time when order across such a
    /// failure matters.
    pub async fn publish_batch(&self, user: &str, events: &[Event]) -> Vec<Result<Published, PublishError>> {
        let mut results: Vec<Result<Published, PublishError>> = Vec::with_capacity(events.len());
        let mut in_flight: VecDeque<(Prepared, Result<PublishAckFuture, String>)> = VecDeque::new();
        for event in events {
            if results.iter().any(|r| r.is_err()) {
                while let Some((p, ack)) = in_flight.pop_front() {
                    results.push(self.settle(&p, ack).await);
                }
                results.push(Err(PublishError::NotSent));
                continue;
            }
            let p = match self.prepare(user, event) {
                Ok(p) => p,
                Err(e) => {
                    // Keep results in order: settle what is ahead first.
                    while let Some((p, ack)) = in_flight.pop_front() {
                        results.push(self.settle(&p, ack).await);
                    }
                    results.push(Err(e));
                    continue;
                }
            };
            if in_flight.len() >= MAX_IN_FLIGHT
                && let Some((q, ack)) = in_flight.pop_front()
            {
                results.push(self.settle(&q, ack).await);
            }
            let ack = self.send(&p).await;
            in_flight.push_back((p, ack));
        }
        while let Some((p, ack)) = in_flight.pop_front() {
            results.push(self.settle(&p, ack).await);
        }
        results
    }

    /// Sends without waiting for the ack. An error here is kept as text and
    /// counts as the first failed attempt; the stream cannot be missing at
    /// this point, only the ack says so.
    async fn send(&self, p: &Prepared) -> Result<PublishAckFuture, String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, p.msg_id.as_str());
        self.js.publish_with_headers(p.subject.clone(), headers, p.payload.clone()).await.map_err(|e| e.to_string())
    }

    /// Waits for a pipelined ack; retries the event when it failed.
    async fn settle(&self, p: &Prepared, ack: Result<PublishAckFuture, String>) -> Result<Published, PublishError> {
        let last = match ack {
            Ok(fut) => match fut.await {
                Ok(a) => return Ok(Published { seq: a.sequence, duplicate: a.duplicate, msg_id: p.msg_id.clone() }),
                Err(e) => classify(p, &e)?,
            },
            Err(e) => e,
        };
        self.send_until_acked(p, 1, Some(last)).await
    }

    /// Attempts from `done + 1` up to [`MAX_ATTEMPTS`], each waiting for its ack.
    async fn send_until_acked(
        &self,
        p: &Prepared,
        mut done: u32,
        mut last: Option<String>,
    ) -> Result<Published, PublishError> {
        while done < MAX_ATTEMPTS {
            if done > 0 {
                let ceiling = RETRY_BASE.saturating_mul(1 << (done - 1).min(16)).min(RETRY_MAX);
                tokio::time::sleep(ceiling.mul_f64(rand::random::<f64>())).await;
            }
            done += 1;
            let fut = match self.send(p).await {
                Ok(f) => f,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match fut.await {
                Ok(a) => return Ok(Published { seq: a.sequence, duplicate: a.duplicate, msg_id: p.msg_id.clone() }),
                Err(e) => last = Some(classify(p, &e)?),
            }
        }
        Err(PublishError::Unacknowledged { attempts: done, last: last.unwrap_or_default() })
    }
}

/// When a [`TextStream`] publishes: after `delay` since the first token it
/// has not published yet, or as soon as at least `max_bytes` are buffered,
/// whichever comes first, and on finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalesce {
    pub delay: Duration,
    /// At least 1; 1 (with a zero delay) publishes every token as its own
    /// event, which is what coalescing saves.
    pub max_bytes: usize,
}

impl Default for Coalesce {
    fn default() -> Self {
        Self { delay: DEFAULT_COALESCE_DELAY, max_bytes: DEFAULT_COALESCE_BYTES }
    }
}

/// The text of one message, published as delta events while it is
/// generated (docs/publishing.md section 10). Tokens are coalesced by
/// [`Coalesce`], and one delta is published at a time: the next is sent only
/// once the previous is acked, so a retry (same `Nats-Msg-Id`) can neither
/// duplicate nor reorder the text. Tokens pushed while a delta awaits its
/// ack are published together in the next one.
///
/// Dropping it without [`TextStream::finish`] still publishes what was
/// pushed, from its task, but nobody learns the outcome.
pub struct TextStream {
    tokens: mpsc::Sender<(Instant, String)>,
    task: JoinHandle<Result<Vec<Published>, PublishError>>,
}

impl TextStream {
    /// Appends a token to the message. Waits only when
    /// [`TEXT_STREAM_QUEUE`] tokens are waiting (NATS is slow or down).
    /// [`PublishError::NotSent`] once a delta has failed for good:
    /// [`TextStream::finish`] then says why.
    pub async fn push(&self, token: impl Into<String>) -> Result<(), PublishError> {
        self.tokens.send((Instant::now(), token.into())).await.map_err(|_| PublishError::NotSent)
    }

    /// Publishes what is buffered and returns every delta's ack, in order.
    /// On an error the deltas before it are stored and nothing after it.
    pub async fn finish(self) -> Result<Vec<Published>, PublishError> {
        drop(self.tokens);
        self.task.await.map_err(|e| PublishError::Unacknowledged { attempts: 0, last: e.to_string() })?
    }
}

impl Publisher {
    /// Streams the text of message `message_id` as delta events of
    /// `template`'s type, run, thread and agent (its `data` is not sent).
    /// The user, type and message id are checked here.
    pub fn text_stream(
        &self,
        user: &str,
        template: &Event,
        message_id: &str,
        coalesce: Coalesce,
    ) -> Result<TextStream, PublishError> {
        UserId::parse(user)?;
        check_type(&template.kind)?;
        check_message_id(message_id)?;
        let template = Event {
            message_id: Some(message_id.to_owned()),
            delta: Some(String::new()),
            data: json!({}),
            ..template.clone()
        };
        let (tx, rx) = mpsc::channel(TEXT_STREAM_QUEUE);
        let task = tokio::spawn(stream_text(self.clone(), user.to_owned(), template, coalesce, rx));
        Ok(TextStream { tokens: tx, task })
    }
}

/// The task of a [`TextStream`]: gathers tokens and publishes a delta when
/// one is due, waiting for each ack (with retries) before the next.
async fn stream_text(
    publisher: Publisher,
    user: String,
    template: Event,
    coalesce: Coalesce,
    mut rx: mpsc::Receiver<(Instant, String)>,
) -> Result<Vec<Published>, PublishError> {
    let max_bytes = coalesce.max_bytes.max(1);
    let mut acked = Vec::new();
    let mut text = String::new();
    // When the oldest unpublished token was pushed: the delay counts from it,
    // including the time it waited in the queue behind an ack.
    let mut first: Option<Instant> = None;
    let mut open = true;
    loop {
        // Take what is already queued, so a delta due after an ack carries
        // every token that came in meanwhile.
        while open && text.len() < max_bytes {
            match rx.try_recv() {
                Ok((at, token)) => add(&mut text, &mut first, at, &token),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if let Some(since) = first {
            if !open || text.len() >= max_bytes || since.elapsed() >= coalesce.delay {
                let event = Event {
                    timestamp: now(),
                    msg_id: new_id(),
                    delta: Some(std::mem::take(&mut text)),
                    ..template.clone()
                };
                first = None;
                acked.push(publisher.publish(&user, &event).await?);
                continue;
            }
        } else if !open {
            return Ok(acked);
        }
        let deadline = first.map(|t| t + coalesce.delay);
        tokio::select! {
            token = rx.recv() => match token {
                Some((at, token)) => add(&mut text, &mut first, at, &token),
                None => open = false,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
        }
    }
}

/// Appends a token; an empty one changes nothing and starts no delay.
fn add(text: &mut String, first: &mut Option<Instant>, at: Instant, token: &str) {
    if token.is_empty() {
        return;
    }
    if first.is_none() {
        *first = Some(at);
    }
    text.push_str(token);
}

/// A failed ack: final errors are returned, retryable ones become the text of
/// the last attempt.
fn classify(p: &Prepared, e: &jetstream::context::PublishError) -> Result<String, PublishError> {
    match e.kind() {
        PublishErrorKind::StreamNotFound => Err(PublishError::StreamUnavailable { subject: p.subject.clone() }),
        PublishErrorKind::MaxPayloadExceeded => Err(PublishError::Rejected(e.to_string())),
        _ => match std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>()) {
            // The stream answered with an error (its size limit, storage
            // full): the same bytes again get the same answer.
            Some(api) => Err(PublishError::Rejected(api.to_string())),
            None => Ok(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_build_the_envelope() {
        let e = Event::tool_executing("r1", "weather", json!({"city": "Paris"})).agent("a").thread("t").id("m1");
        let v: Value = serde_json::from_slice(&e.to_bytes()).unwrap();
        assert_eq!(v["type"], "tool_executing");
        assert_eq!(v["run_id"], "r1");
        assert_eq!(v["thread_id"], "t");
        assert_eq!(v["agent"], "a");
        assert_eq!(v["data"], json!({"tool": "weather", "args": {"city": "Paris"}}));
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(v.get("msg_id").is_none());
        assert_eq!(e.msg_id, "m1");
        assert_ne!(Event::agent_thinking("r", "x").msg_id, Event::agent_thinking("r", "x").msg_id);
    }

    /// The Python package (clients/python) keeps its own list: the two
    /// must name the same types, or one side refuses what the other sends.
    #[test]
    fn the_python_package_knows_the_same_built_in_types() {
        let py = include_str!("../clients/python/src/agentcast/events.py");
        let start = py.find("BUILT_IN_TYPES = (").expect("the tuple in events.py");
        let tuple = &py[start..start + py[start..].find(')').expect("its end")];
        let mut names: Vec<&str> = tuple.split('"').skip(1).step_by(2).collect();
        let mut ours = BUILT_IN_TYPES.to_vec();
        names.sort_unstable();
        ours.sort_unstable();
        assert_eq!(names, ours);
    }

    #[test]
    fn type_names() {
        for ok in BUILT_IN_TYPES.iter().copied().chain(["acme.search_results", "a.b.c", "x-1.y_2"]) {
            assert!(check_type(ok).is_ok(), "{ok}");
        }
        for bad in ["", "custom", "Acme.x", "acme.", ".x", "a..b", "a.b c", "a.é"] {
            assert!(matches!(check_type(bad), Err(PublishError::EventType(_))), "{bad}");
        }
        assert!(check_type(&format!("a.{}", "b".repeat(MAX_TYPE_LEN))).is_err());
    }

    #[test]
    fn from_json_checks_the_envelope() {
        let e = Event::from_json(r#"{"type":"agent_thinking","run_id":"r","data":{"text":"hi"}}"#).unwrap();
        assert_eq!((e.kind.as_str(), e.run_id.as_deref()), ("agent_thinking", Some("r")));
        assert_eq!(Event::from_json(r#"{"type":"acme.x"}"#).unwrap().data, json!({}));
        let err = |t: &str| Event::from_json(t).unwrap_err().to_string();
        assert!(err(r#"{"type":"agent_thinking","extra":1}"#).contains("unknown field `extra`"));
        assert!(err(r#"{"data":{}}"#).contains("missing field `type`"));
        assert!(err(r#"{"type":"nope"}"#).contains("event type \"nope\""));
        assert!(err(r#"{"type":"acme.x","data":[1]}"#).contains("`data` must be a JSON object"));
        assert!(err("[1]").contains("not a valid envelope"));
    }

    #[test]
    fn delta_events_carry_a_message_id_of_1_to_128_characters() {
        let e = Event::delta("message_delta", "r1", "m1", "Hel").unwrap();
        let v: Value = serde_json::from_slice(&e.to_bytes()).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["message_id"].as_str(), v["delta"].as_str()),
            (Some("message_delta"), Some("m1"), Some("Hel"))
        );
        assert_eq!(v["data"], json!({}));
        // Characters, not bytes: 128 two-byte characters are fine.
        assert!(Event::delta("message_delta", "r1", &"é".repeat(128), "x").is_ok());
        for bad in [String::new(), "x".repeat(129)] {
            let e = Event::delta("message_delta", "r1", &bad, "x").unwrap_err();
            assert!(matches!(e, PublishError::Delta(_)), "{e}");
            assert!(e.to_string().contains("1 to 128 characters"), "{e}");
        }
        assert!(Event::from_json(r#"{"type":"message_delta","message_id":"m","delta":"a"}"#).is_ok());
        let err = |t: &str| Event::from_json(t).unwrap_err().to_string();
        assert!(err(r#"{"type":"message_delta","message_id":"m"}"#).contains("`delta` is missing"));
        assert!(err(r#"{"type":"message_delta","delta":"a"}"#).contains("`message_id` is missing"));
        assert!(err(r#"{"type":"message_delta","message_id":"","delta":"a"}"#).contains("0 characters"));
        // Non-delta events serialise as before: no message_id, no delta.
        let plain: Value = serde_json::from_slice(&Event::agent_thinking("r", "t").to_bytes()).unwrap();
        assert!(plain.get("message_id").is_none() && plain.get("delta").is_none());
    }
}
