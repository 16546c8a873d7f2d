//! One WebSocket connection: welcome, batched writes, client frames, pings,
//! token expiry and the close codes of docs/protocol.md.
//!
//! [`run`] is generic over any `Sink + Stream` of axum WebSocket messages so
//! that unit tests can drive it with channels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;

use crate::hub::{EventFrame, Hub, Kick, Kicker};
use crate::metrics as m;
use crate::protocol::{ClientFrame, MAX_CLIENT_FRAME, ServerFrame, close};
use crate::user::UserId;

/// Frames written per flush at most. Batching amortises the syscall and the
/// TLS/TCP overhead (about 10x more frames/s at 16 per flush, see
/// ../shared/nats-facts.md); the cap keeps one busy socket from delaying its
/// own control frames (pong, close) behind a long run of events.
pub const MAX_WRITE_BATCH: usize = 64;

/// tungstenite's read buffer per connection. Clients send only small
/// control frames, and the default 128 KiB would dominate memory per idle
/// socket (measured: 135 KB per socket with the default, 6.8 KB with 4 KiB).
pub const READ_BUFFER: usize = 4 * 1024;

/// Bytes tungstenite buffers before writing to the TCP socket within a
/// batch. A batch is flushed at its end anyway; this only bounds how much is
/// gathered into one write.
pub const WRITE_BUFFER: usize = 16 * 1024;

/// Hard bound on tungstenite's write buffer: one buffer's worth plus the
/// largest possible frame. Reaching it is a bug, reported as a write error.
pub const MAX_WRITE_BUFFER: usize = WRITE_BUFFER + crate::config::MAX_EVENT_BYTES + 1024;

/// Longest a single write or flush may take before the peer counts as dead.
/// The kernel's send buffer absorbs normal hiccups; a peer that takes this
/// long to accept a few KiB is gone or hostile.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time given to deliver a close frame before the connection is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the socket needs besides its transport.
pub struct Session {
    pub conn_id: u64,
    pub user: UserId,
    pub node_id: Arc<str>,
    /// Token expiry plus leeway, in seconds since the Unix epoch.
    pub token_exp: u64,
    pub queue: usize,
    pub ping_interval: Duration,
    pub kicker: Arc<Kicker>,
}

/// Why the socket ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Client,
    Slow,
    Drain,
    PingTimeout,
    TokenExpired,
    TooBig,
    Unsupported,
    Error,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::Client => "client",
            End::Slow => "slow",
            End::Drain => "drain",
            End::PingTimeout => "ping_timeout",
            End::TokenExpired => "token_expired",
            End::TooBig => "too_big",
            End::Unsupported => "unsupported",
            End::Error => "error",
        }
    }
}

/// Serves one socket until it ends; returns why.
pub async fn run<S, E>(mut ws: S, hub: Arc<Hub>, s: Session) -> End
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let (tx, mut rx) = mpsc::channel::<EventFrame>(s.queue);
    let _membership = match hub.join(&s.user, s.conn_id, tx, s.kicker.clone()).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "subscribing to the user's live subject failed");
            return close_with(&mut ws, close::INTERNAL, "subscribe failed", End::Error).await;
        }
    };
    let mut position = match hub.position(&s.user).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "reading the user's position failed");
            return close_with(&mut ws, close::INTERNAL, "history unavailable", End::Error).await;
        }
    };
    let welcome = ServerFrame::Welcome {
        node: &s.node_id,
        user: s.user.as_str(),
        position,
    }
    .to_text();
    if send(&mut ws, Message::Text(welcome)).await.is_err() {
        return End::Client;
    }

    let expiry = token_deadline(s.token_exp);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + s.ping_interval, s.ping_interval);
    let mut last_heard = Instant::now();
    let mut batch: Vec<EventFrame> = Vec::with_capacity(MAX_WRITE_BATCH);

    loop {
        tokio::select! {
            biased;
            why = s.kicker.kicked() => {
                return match why {
                    Kick::Slow => close_with(&mut ws, close::SLOW, "slow: reconnect and resume", End::Slow).await,
                    Kick::Error => close_with(&mut ws, close::INTERNAL, "internal error: reconnect and resume", End::Error).await,
                    Kick::Drain => {
                        let frame = ServerFrame::Reconnect { reason: "drain" }.to_text();
                        let _ = send(&mut ws, Message::Text(frame)).await;
                        close_with(&mut ws, close::DRAIN, "drain: reconnect and resume", End::Drain).await
                    }
                };
            }
            n = rx.recv_many(&mut batch, MAX_WRITE_BATCH) => {
                if n == 0 {
                    // The hub dropped our sender: only on leave, which we own.
                    return close_with(&mut ws, close::INTERNAL, "internal error", End::Error).await;
                }
                // Anything at or below what this socket has already covered
                // (its welcome position) is not sent again.
                batch.retain(|f| f.seq > position);
                if let Some(last) = batch.last() {
                    position = last.seq;
                    let frames = batch.len();
                    let bytes: usize = batch.iter().map(|f| f.text.len()).sum();
                    let result = tokio::select! {
                        r = write_batch(&mut ws, batch.drain(..)) => r,
                        _ = s.kicker.kicked() => Err(WriteFail::Kicked),
                    };
                    match result {
                        Ok(()) => {
                            metrics::counter!(m::FRAMES_SENT).increment(frames as u64);
                            metrics::counter!(m::BYTES_SENT).increment(bytes as u64);
                            metrics::histogram!(m::WRITE_BATCH).record(frames as f64);
                        }
                        // The select above will see the kick next turn.
                        Err(WriteFail::Kicked) => continue,
                        Err(WriteFail::Timeout) => return End::Slow,
                        Err(WriteFail::Closed) => return End::Client,
                    }
                }
                batch.clear();
            }
            msg = ws.next() => {
                last_heard = Instant::now();
                match msg {
                    None => return End::Client,
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the close reply; a flush sends it.
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
                        return End::Client;
                    }
                    Some(Ok(Message::Text(text))) => {
                        let reply = match serde_json::from_str::<ClientFrame>(text.as_str()) {
                            Ok(ClientFrame::Ping) => ServerFrame::Pong.to_text(),
                            Err(e) => {
                                metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "bad_frame").increment(1);
                                ServerFrame::Error { code: "bad_frame", message: &e.to_string() }.to_text()
                            }
                        };
                        if send(&mut ws, Message::Text(reply)).await.is_err() {
                            return End::Client;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "binary").increment(1);
                        return close_with(&mut ws, close::UNSUPPORTED, "binary frames are not supported", End::Unsupported).await;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Err(e)) => match read_failure(&e) {
                        Some(ReadFailure::TooBig) => {
                            metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "too_big").increment(1);
                            let why = format!("client frames are limited to {MAX_CLIENT_FRAME} bytes");
                            return close_with(&mut ws, close::TOO_BIG, &why, End::TooBig).await;
                        }
                        Some(ReadFailure::NotUtf8) => {
                            metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "not_utf8").increment(1);
                            return close_with(&mut ws, close::NOT_UTF8, "text frames must be UTF-8", End::Unsupported).await;
                        }
                        None => {
                            tracing::debug!(error = %e, "read failed");
                            return End::Client;
                        }
                    },
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > s.ping_interval * 2 {
                    return close_with(&mut ws, close::PING_TIMEOUT, "ping timeout", End::PingTimeout).await;
                }
                if send(&mut ws, Message::Ping(Default::default())).await.is_err() {
                    return End::Client;
                }
            }
            _ = tokio::time::sleep_until(expiry) => {
                return close_with(&mut ws, close::TOKEN_EXPIRED, "token expired: reconnect with a fresh token", End::TokenExpired).await;
            }
        }
    }
}

enum WriteFail {
    Kicked,
    Timeout,
    Closed,
}

async fn write_batch<S, E>(ws: &mut S, frames: impl Iterator<Item = EventFrame>) -> Result<(), WriteFail>
where
    S: Sink<Message, Error = E> + Unpin,
{
    let write = async {
        for f in frames {
            ws.feed(Message::Text(f.text)).await?;
        }
        ws.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteFail::Closed),
        Err(_) => Err(WriteFail::Timeout),
    }
}

async fn send<S, E>(ws: &mut S, msg: Message) -> Result<(), ()>
where
    S: Sink<Message, Error = E> + Unpin,
{
    match tokio::time::timeout(WRITE_TIMEOUT, ws.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Sends a close frame (best effort, bounded in time) and reports `end`.
async fn close_with<S, E>(ws: &mut S, code: u16, reason: &str, end: End) -> End
where
    S: Sink<Message, Error = E> + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.send(Message::Close(Some(frame)))).await;
    end
}

/// The instant the token expires, as a tokio deadline.
fn token_deadline(exp: u64) -> tokio::time::Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Capped so a far-future exp does not overflow the timer.
    let left = Duration::from_secs(exp.saturating_sub(now).min(10 * 365 * 24 * 3600));
    tokio::time::Instant::now() + left
}

/// Read errors that the client caused and gets a close code for.
enum ReadFailure {
    TooBig,
    NotUtf8,
}

fn read_failure<E: std::error::Error + 'static>(e: &E) -> Option<ReadFailure> {
    use tokio_tungstenite::tungstenite::Error;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        match err.downcast_ref::<Error>() {
            Some(Error::Capacity(_)) => return Some(ReadFailure::TooBig),
            Some(Error::Utf8(_)) => return Some(ReadFailure::NotUtf8),
            Some(_) => return None,
            None => cur = err.source(),
        }
    }
    None
}
