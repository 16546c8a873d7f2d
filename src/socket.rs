//! One WebSocket connection: welcome, resume, batched writes, client frames,
//! pings, token expiry and the close codes of docs/protocol.md.
//!
//! [`run`] is generic over any `Sink + Stream` of axum WebSocket messages.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;

use crate::control;
use crate::hub::{Hub, Item, Kick, Kicker, Queued};
use crate::merge::Run;
use crate::metrics as m;
use crate::protocol::{BAD_POSITION, ClientFrame, MAX_CLIENT_FRAME, ServerFrame, close};
use crate::resume::{Gap, Replay};
use crate::user::UserId;

/// Frames written per flush at most. Batching amortises the syscall and the
/// TCP overhead (about 10x more frames/s at 16 per flush, see
/// ../shared/nats-facts.md); the cap keeps one busy socket from delaying its
/// own control frames (pong, close) behind a long run of events.
pub const MAX_WRITE_BATCH: usize = 64;

/// tungstenite's read buffer per connection, allocated and filled when the
/// socket opens and kept for its life. Clients send only small frames (a
/// `resume` frame with the largest numbers is 85 bytes, a pong 6), so one
/// read takes any of them; a rarer bigger one, up to [`MAX_CLIENT_FRAME`],
/// grows the buffer. The default 128 KiB would dominate memory per idle
/// socket; 4 KiB cost 3.5 KB more per idle socket than 512, and 512 about
/// 250 bytes more than this (ad-hoc runs, 10k sockets).
pub const READ_BUFFER: usize = 256;

/// Bytes tungstenite buffers before writing to the TCP socket within a
/// batch. A batch is flushed at its end anyway; this only bounds how much is
/// gathered into one write.
pub const WRITE_BUFFER: usize = 16 * 1024;

/// Hard bound on tungstenite's write buffer: one buffer's worth plus the
/// largest possible frame. Reaching it is a bug, reported as a write error.
pub const MAX_WRITE_BUFFER: usize = WRITE_BUFFER + crate::config::MAX_EVENT_BYTES + 1024;

/// Longest a single write or flush may take before the peer counts as dead.
/// The client's receive window and the bytes the kernel holds unsent
/// ([`crate::server::NOTSENT_LOWAT`]) absorb normal hiccups; a peer that
/// takes this long to accept a batch is gone or hostile. The socket reads
/// none of its client's frames while a write waits.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a socket that fell behind during a streamed message holds the
/// rest of that message's deltas, merging them, before it writes them as one
/// frame. A socket falls behind when deltas wait while a write to its client
/// is pending ([`Backlog::push`]). Merging only what waits would fill the
/// link again at once: the client would take every byte its link carries,
/// mostly frame envelopes, behind kernel buffers full of stale text. Held
/// for a second, a 40 tokens/s answer of 4-byte tokens costs one frame of
/// about 190 bytes of envelope plus 160 of text per second (about 9 bytes a
/// token, against 58 as one frame per 50 ms delta, `--preset tokens`), so a
/// slow link drains its buffers and shows current text once a second.
/// Sockets that keep up never hold: they get every event at once.
pub const BEHIND_ROLLUP: Duration = Duration::from_secs(1);

/// Time given to deliver a close frame before the connection is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a socket opened with `resume=frame` waits for its resume frame.
pub const RESUME_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the client wants its events to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Live from the user's current position.
    Live,
    /// Everything after `last_seq` (0: everything still stored), in the
    /// stream identified by `epoch` when given.
    After { last_seq: u64, epoch: Option<String> },
    /// Wait for a `resume` frame first.
    Frame,
}

/// What the socket needs besides its transport.
pub struct Session {
    pub conn_id: u64,
    pub user: UserId,
    pub node_id: Arc<str>,
    /// Token expiry plus leeway, in seconds since the Unix epoch.
    pub token_exp: u64,
    /// The token's own `exp`, told to the client in `welcome`.
    pub exp: u64,
    /// Checks the tokens of `refresh` frames as a new connection's.
    pub auth: Arc<crate::auth::Authenticator>,
    /// Bytes of frames its queue holds at most, after merging, with the
    /// batch being written (`--socket-queue-bytes`): the only bound on it.
    pub queue_bytes: usize,
    pub ping_interval: Duration,
    pub kicker: Arc<Kicker>,
    pub start: Start,
    /// Where the socket's control requests go ([`crate::control`]).
    pub control: Arc<control::Node>,
    /// A WebSocket's client answers pings, and one that stops is closed;
    /// an event stream's client sends nothing ([`crate::sse`]).
    pub transport: crate::server::Transport,
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
    StreamReset,
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
            End::StreamReset => "stream_reset",
            End::Error => "error",
        }
    }
}

/// Serves one socket until it ends; returns why.
///
/// Not an `async fn`: one would move its arguments into locals and keep
/// both copies (the transport alone is 368 bytes) for the socket's life;
/// the block below uses them in place.
#[allow(clippy::manual_async_fn)] // see above
pub fn run<S, E>(mut ws: S, hub: Arc<Hub>, mut s: Session) -> impl Future<Output = End>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    async move {
        let mut expiry = token_deadline(s.token_exp);
        // The large futures awaited once before the loop are boxed (this
        // wait, joining, the resume check and the replays): the socket's
        // future is as large as its largest await, and an idle socket keeps
        // it whole for its life. Inline, `previous_rest` (three JetStream
        // reads) made it 6.1 KB, against 1.4 KB for the loop's awaits.
        if s.start == Start::Frame {
            s.start = match Box::pin(wait_resume_frame(&mut ws, &s.kicker, expiry)).await {
                Ok(start) => start,
                Err(end) => return end,
            };
        }
        let joining = Instant::now();
        // Unbounded in frames: bounded in bytes by the kicker's count, which
        // fan-out charges before sending (`--socket-queue-bytes`).
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        // For the answers of control requests: weak, so the queue still
        // closes when the hub drops its sender.
        let own_tx = tx.downgrade();
        let membership = match Box::pin(hub.join(&s.user, s.conn_id, tx, s.kicker.clone(), s.queue_bytes)).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "joining the user's live stream failed");
                return close_with(&mut ws, close::INTERNAL, "subscribe failed", End::Error).await;
            }
        };
        // A position in the previous layout's stream (`--stream-previous`):
        // this socket gets the rest of the user's events there, under that
        // stream's epoch, and closes with 4003; the client resumes, and its
        // next socket starts the current layout from its beginning, under
        // the new epoch (a client takes a new epoch as position 0).
        let mut previous = None;
        if let Start::After { last_seq, epoch: Some(e) } = &s.start
            && let Some(history) = hub.previous_for(s.user.as_str(), e)
        {
            match Box::pin(previous_rest(history, s.user.as_str(), *last_seq)).await {
                Ok(Rest::Tail(last)) => previous = Some((history, *last_seq, last, e.clone())),
                Ok(Rest::None) => s.start = Start::After { last_seq: 0, epoch: None },
                // Told as before: a stream_reset, then all of the new layout.
                Ok(Rest::Unproven) => {}
                Err(e) => return resume_failed(&mut ws, &e).await,
            }
        }
        let (epoch, position) = match &previous {
            Some((_, _, last, old)) => (old.clone(), *last),
            None => (hub.part(s.user.as_str()).epoch(), membership.position.seq()),
        };
        let welcome =
            ServerFrame::Welcome { node: &s.node_id, user: s.user.as_str(), position, epoch: &epoch, exp: s.exp }
                .to_text();
        if send(&mut ws, Message::Text(welcome)).await.is_err() {
            return End::Client;
        }
        if let Some((history, last_seq, last, _)) = previous {
            let begin = async { Ok(Replay::previous(&hub, s.user.as_str(), history, last_seq, last)) };
            if let Err(end) = Box::pin(replay(&mut ws, &s.kicker, expiry, begin)).await {
                return end;
            }
            metrics::histogram!(m::RESUME_DURATION).record(joining.elapsed().as_secs_f64());
            return close_with(&mut ws, close::STREAM_RESET, "stream reset: reconnect and resume", End::StreamReset)
                .await;
        }
        // Everything at or below `position` has been sent or was before this
        // socket's time; queued items at or below it are dropped.
        let mut position = membership.position.seq();
        if let Start::After { last_seq, epoch: client_epoch } = &s.start {
            let begin = Replay::begin(&hub, &membership, *last_seq, client_epoch.as_deref(), &epoch);
            match Box::pin(replay(&mut ws, &s.kicker, expiry, begin)).await {
                Ok(p) => position = p,
                Err(end) => return end,
            }
            metrics::histogram!(m::RESUME_DURATION).record(joining.elapsed().as_secs_f64());
        }

        let mut next_ping = tokio::time::Instant::now() + s.ping_interval;
        // One timer for the socket's two deadlines, the next ping and the
        // token's expiry: boxed, as an `Interval` boxes its own, so an idle
        // socket keeps a pointer rather than the timer inline.
        let mut timer = Box::pin(tokio::time::sleep_until(next_ping.min(expiry)));
        let mut last_heard = Instant::now();
        // Allocated by the first batch and freed whenever the queue runs dry:
        // kept for the life of the socket they would cost an idle socket 6.6 KB
        // (64 items and 64 frames), more than a quarter of its memory.
        let mut out: Vec<Utf8Bytes> = Vec::new();
        let mut backlog = Backlog::default();
        // The hub dropped our sender (only on leave, which we own): noticed
        // while a write is pending, acted on once it is done.
        let mut queue_closed = false;
        // Made by the first control frame: most sockets never send one.
        let mut requests: Option<Box<control::Socket>> = None;

        // Polled in this order, each branch only when those before it are
        // not ready: a kick (drain, slow) first; then the timer and the
        // client's frames, which are rare and small; the outbound queue
        // last. A socket whose queue never runs dry (a client on a slow
        // link, a busy user) still has its token expire on time, its pings
        // sent and its client's frames read between two batches. A client
        // that floods frames delays only its own events, and is closed as
        // slow when its queue fills.
        loop {
            let hold = backlog.held_until();
            tokio::select! {
                biased;
                why = s.kicker.kicked() => return on_kick(&mut ws, why).await,
                () = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if now >= expiry {
                        return token_expired(&mut ws).await;
                    }
                    if s.transport == crate::server::Transport::WebSocket && last_heard.elapsed() > s.ping_interval * 2 {
                        return close_with(&mut ws, close::PING_TIMEOUT, "ping timeout", End::PingTimeout).await;
                    }
                    if send(&mut ws, Message::Ping(Default::default())).await.is_err() {
                        return End::Client;
                    }
                    // From now, not from when it was due: a ping sent late
                    // (after a long write) is not followed by a burst.
                    next_ping = now + s.ping_interval;
                    timer.as_mut().reset(next_ping.min(expiry));
                    continue;
                }
                msg = ws.next() => {
                    last_heard = Instant::now();
                    // Control frames are answered through the queue below,
                    // in order with the events; nothing here waits for them.
                    if let Some(Ok(Message::Text(text))) = &msg
                        && let Some(frame) = control::parse(text.as_str())
                    {
                        let r = requests.get_or_insert_with(|| {
                            Box::new(control::Socket::new(
                                s.control.clone(),
                                s.user.clone(),
                                own_tx.clone(),
                                s.kicker.clone(),
                                s.queue_bytes,
                            ))
                        });
                        r.handle(frame);
                        continue;
                    }
                    if let Some(Ok(Message::Text(text))) = &msg
                        && let Some(token) = refresh_token(text.as_str())
                    {
                        let reply = match refresh(&s, &token) {
                            Ok((close_at, exp)) => {
                                expiry = token_deadline(close_at);
                                timer.as_mut().reset(next_ping.min(expiry));
                                ServerFrame::Refreshed { exp }.to_text()
                            }
                            Err(why) => {
                                metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "refresh_refused").increment(1);
                                ServerFrame::Error { code: "refresh_refused", message: &why }.to_text()
                            }
                        };
                        if send(&mut ws, Message::Text(reply)).await.is_err() {
                            return End::Client;
                        }
                        continue;
                    }
                    if let Some(end) = on_client_message(&mut ws, msg).await {
                        return end;
                    }
                    continue;
                }
                // What a write left behind goes out first, in order.
                () = std::future::ready(()), if backlog.writable() => {}
                // The held deltas of a socket that fell behind are due.
                () = until(hold), if hold.is_some() => {}
                item = rx.recv() => {
                    let Some(item) = item else {
                        // The hub dropped our sender: only on leave, which we own.
                        return close_with(&mut ws, close::INTERNAL, "internal error", End::Error).await;
                    };
                    // Not merged, unless the socket fell behind during this
                    // message: a socket that keeps up gets every event as
                    // its own frame, at once.
                    backlog.push(item, position, false, &s.kicker, s.queue_bytes);
                    take_waiting(&mut rx, &mut backlog, position, false, &s);
                }
            }
            // Sampled once per batch, not per frame.
            m::QUEUE_DEPTH_HISTOGRAM.record((backlog.len() + rx.len()) as f64);
            // Counted against the byte budget until written or dropped.
            let (bytes, oldest) = backlog.take(MAX_WRITE_BATCH, &mut position, &mut out);
            if out.is_empty() {
                s.kicker.release(bytes);
                release_if_idle(&rx, &mut out, &mut backlog);
                continue;
            }
            // A write waits for the client (up to WRITE_TIMEOUT): a kick or
            // the token's expiry ends it. Meanwhile the socket keeps taking
            // from its queue, merging the deltas that wait ([`Backlog::push`]),
            // so what a slow client holds is its text, not its tokens. The
            // expiry is polled last, so a write done at once costs no timer.
            let result = {
                let mut write = std::pin::pin!(write_batch(&mut ws, &mut out));
                // Registered with the timer only if polled: not for a write done at once.
                let mut expired = std::pin::pin!(tokio::time::sleep_until(expiry));
                loop {
                    tokio::select! {
                        biased;
                        _ = s.kicker.kicked() => break Err(WriteFail::Kicked),
                        r = &mut write => break r,
                        item = rx.recv(), if !queue_closed => match item {
                            Some(item) => {
                                backlog.push(item, position, true, &s.kicker, s.queue_bytes);
                                take_waiting(&mut rx, &mut backlog, position, true, &s);
                            }
                            None => queue_closed = true,
                        },
                        () = &mut expired => break Err(WriteFail::Expired),
                    }
                }
            };
            out.clear();
            s.kicker.release(bytes);
            release_if_idle(&rx, &mut out, &mut backlog);
            match result {
                Ok(()) => record_latency(oldest),
                // The select above will see the kick or the expiry next turn.
                Err(WriteFail::Kicked | WriteFail::Expired) => continue,
                Err(WriteFail::Timeout) => return End::Slow,
                Err(WriteFail::Closed) => return End::Client,
            }
        }
    }
}

/// What the previous layout's sealed stream holds for a client resuming
/// from `last_seq` in it ([`previous_rest`]).
enum Rest {
    /// The user's events after the position, up to this one, its last there.
    Tail(u64),
    /// Nothing after the position, and nothing removed after it.
    None,
    /// Nothing after the position now, and no proof that nothing was
    /// removed (the stream's limits took events since).
    Unproven,
}

/// Events leave a stream oldest first (per user, or as the stream's prefix:
/// [`crate::stream`]'s settings), so a user event still stored at or before
/// the position proves nothing after it was removed; without one, every
/// sequence after the position must still be stored ([`History::span`]).
async fn previous_rest(
    history: &crate::history::History,
    user: &str,
    last_seq: u64,
) -> Result<Rest, crate::stream::StreamError> {
    let last = history.newest(user).await?;
    if last > last_seq {
        return Ok(Rest::Tail(last));
    }
    if last > 0 {
        return Ok(Rest::None);
    }
    let end = history.stream_last().await? + 1;
    Ok(match history.span(user, last_seq + 1, end).await? {
        crate::history::Span::Whole => Rest::None,
        _ => Rest::Unproven,
    })
}

/// Waits until `deadline`; forever without one (the branch is then
/// disabled, and this never polled).
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One entry of a socket's backlog: an item as queued, or deltas merged
/// while the socket was behind.
enum Entry {
    Item(Queued),
    /// Boxed: an entry is then two words, and a socket that keeps up
    /// allocates a small backlog per event rather than one sized for runs.
    Run(Box<Run>),
}

/// What the socket took from its queue and has not written yet, in order.
/// Filled while a write is pending, so the deltas that wait for a slow
/// client merge ([`crate::merge`]) instead of piling up; the kicker's count
/// follows the merged size, so the byte bound applies after merging.
///
/// The one owner of when a live socket merges: while a write is pending,
/// and, once deltas had to wait that way, for the rest of their message,
/// whose deltas are then held up to [`BEHIND_ROLLUP`].
#[derive(Default)]
struct Backlog {
    entries: VecDeque<Entry>,
    /// The message during which the socket fell behind
    /// ([`crate::merge::message_hash`]), until an event of any other kind or
    /// message (or a gap) arrives.
    behind: Option<u64>,
    /// When the last entry, a delta of `behind`'s message, began to be held.
    held_since: Option<tokio::time::Instant>,
}

impl Backlog {
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds `item`, taken from the queue with its bytes counted. An event
    /// at or below `position` is dropped (a replay covered it). With
    /// `writing` (a write is pending: the socket is behind), or during a
    /// message it fell behind in, a delta that continues the last entry's
    /// run joins it, and the count drops by what that saves.
    fn push(&mut self, item: Queued, position: u64, writing: bool, kicker: &Kicker, budget: usize) {
        match &*item {
            Item::Event(f) => {
                if f.seq <= position {
                    kicker.release(item.bytes());
                    return;
                }
                if let Some(message) = self.behind
                    && crate::merge::message_hash(f) != Some(message)
                {
                    self.behind = None;
                    self.held_since = None;
                }
                if (writing || self.behind.is_some())
                    && f.delta.is_some()
                    && let Some(run) = self.run_for(f)
                {
                    let was = run.bytes() + item.bytes();
                    run.push(f);
                    let now = run.bytes();
                    if now <= was {
                        kicker.release(was - now);
                    } else if !kicker.charge(now - was, budget) {
                        kicker.overflowed("bytes");
                    }
                    if self.behind.is_none() {
                        metrics::counter!(m::SOCKETS_BEHIND).increment(1);
                        self.held_since = Some(tokio::time::Instant::now());
                        self.behind = crate::merge::message_hash(f);
                    }
                    return;
                }
                if self.behind.is_some() {
                    self.held_since = Some(tokio::time::Instant::now());
                }
            }
            Item::Gap(_) => {
                self.behind = None;
                self.held_since = None;
            }
            // Outside the user's sequence: ends the run before it, not the
            // message's hold.
            Item::Control(_) => self.held_since = None,
        }
        self.entries.push_back(Entry::Item(item));
    }

    /// Until when the last entry is held: the socket fell behind during its
    /// message, and it has not waited [`BEHIND_ROLLUP`] yet.
    fn held_until(&self) -> Option<tokio::time::Instant> {
        let since = self.held_since?;
        self.behind.as_ref()?;
        let until = since + BEHIND_ROLLUP;
        (until > tokio::time::Instant::now()).then_some(until)
    }

    /// Whether anything is ready to be written: an entry not held.
    fn writable(&self) -> bool {
        match self.entries.len() {
            0 => false,
            1 => self.held_until().is_none(),
            _ => true,
        }
    }

    /// The run at the end of the backlog that `f` continues, if any.
    fn run_for(&mut self, f: &crate::hub::EventFrame) -> Option<&mut Run> {
        let tail = self.entries.back_mut()?;
        if let Entry::Item(q) = tail {
            let Item::Event(prev) = &**q else { return None };
            let run = Run::start(prev).filter(|r| r.accepts(f))?;
            *tail = Entry::Run(Box::new(run));
        }
        match tail {
            Entry::Run(r) if r.accepts(f) => Some(r),
            _ => None,
        }
    }

    /// Renders up to `max` entries into `out`, not a held last one; returns
    /// the bytes they were counted as and the origin of the oldest event
    /// among them.
    fn take(&mut self, max: usize, position: &mut u64, out: &mut Vec<Utf8Bytes>) -> (usize, Option<m::Origin>) {
        let (mut bytes, mut oldest) = (0, None);
        let ready = self.entries.len() - usize::from(self.held_until().is_some());
        if ready == self.entries.len() {
            // What follows starts a new hold.
            self.held_since = None;
        }
        for entry in self.entries.drain(..max.min(ready)) {
            match entry {
                Entry::Item(item) => {
                    bytes += item.bytes();
                    if let Item::Event(f) = &*item {
                        oldest = oldest.or(f.origin);
                    }
                    if let Some(text) = render(&item, position) {
                        out.push(text);
                    }
                }
                Entry::Run(run) => {
                    bytes += run.bytes();
                    oldest = oldest.or(run.first_origin());
                    if run.seq() > *position {
                        *position = run.seq();
                        if run.count() > 1 {
                            metrics::counter!(m::MERGED_EVENTS, "path" => "live").increment(run.count());
                        }
                        out.push(run.frame());
                    }
                }
            }
        }
        (bytes, oldest)
    }
}

/// Moves what else waits in the queue into the backlog, up to a batch: the
/// item received before it is one. `try_recv` rather than `recv_many`,
/// whose vector would be allocated and freed for every event of a socket
/// that keeps up.
fn take_waiting(
    rx: &mut mpsc::UnboundedReceiver<Queued>,
    backlog: &mut Backlog,
    position: u64,
    writing: bool,
    s: &Session,
) {
    for _ in 1..MAX_WRITE_BATCH {
        let Ok(item) = rx.try_recv() else { return };
        backlog.push(item, position, writing, &s.kicker, s.queue_bytes);
    }
}

/// Frees the batch buffers once the queue is empty: a socket that goes idle
/// holds none, and a busy one keeps them from batch to batch.
fn release_if_idle(rx: &mpsc::UnboundedReceiver<Queued>, out: &mut Vec<Utf8Bytes>, backlog: &mut Backlog) {
    if rx.is_empty() && backlog.entries.is_empty() {
        *out = Vec::new();
        backlog.entries = VecDeque::new();
    }
}

/// Records the time from `origin` to now in the delivery latency of its
/// clock. A clock behind the origin (the publisher's clock ahead of ours)
/// counts as zero rather than vanishing.
fn record_latency(origin: Option<m::Origin>) {
    let Some(o) = origin else { return };
    let secs = std::time::SystemTime::now().duration_since(o.at).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    m::delivery_latency(o.clock).record(secs);
}

/// The frame for a queued item, unless this socket already covered it.
fn render(item: &Item, position: &mut u64) -> Option<Utf8Bytes> {
    match item {
        Item::Event(f) if f.seq > *position => {
            *position = f.seq;
            Some(f.text.clone())
        }
        Item::Event(_) => None,
        Item::Control(text) => Some(text.clone()),
        Item::Gap(g) => {
            // Only the part this socket has not already covered.
            let from = g.from.map(|f| f.max(*position + 1));
            match g.to {
                Some(to) if to <= *position => return None,
                Some(to) => *position = to,
                // No end: an event of the user stored outside its stream
                // ([`crate::hub`]'s `misplaced`); the position stays.
                None => {}
            }
            metrics::counter!(m::GAPS_SENT, "reason" => g.reason.label()).increment(1);
            Some(Gap { from, ..*g }.frame())
        }
    }
}

/// Writes the replay of a resuming socket ([`crate::resume::Replay`]),
/// once `begin` has set it up, and returns the position it reached. A kick
/// (the node drains, the queue overflowed) ends it at once with its close
/// code, also mid-read, and so does the token's `expiry`: a long replay to
/// a slow client does not outlive its token.
async fn replay<'h, S, E>(
    ws: &mut S,
    kicker: &Kicker,
    expiry: tokio::time::Instant,
    begin: impl Future<Output = Result<Replay<'h>, crate::resume::ResumeError>>,
) -> Result<u64, End>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
{
    let begun = tokio::select! {
        r = begin => r,
        why = kicker.kicked() => return Err(on_kick(ws, why).await),
        _ = tokio::time::sleep_until(expiry) => return Err(token_expired(ws).await),
    };
    let mut replay = match begun {
        Ok(r) => r,
        Err(e) => return Err(resume_failed(ws, &e).await),
    };
    loop {
        let next = tokio::select! {
            r = replay.next() => r,
            why = kicker.kicked() => return Err(on_kick(ws, why).await),
            _ = tokio::time::sleep_until(expiry) => return Err(token_expired(ws).await),
        };
        let mut chunk = match next {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok(replay.position()),
            Err(e) => return Err(resume_failed(ws, &e).await),
        };
        let written = tokio::select! {
            r = write_batch(ws, &mut chunk.frames) => r,
            _ = kicker.kicked() => Err(WriteFail::Kicked),
            _ = tokio::time::sleep_until(expiry) => Err(WriteFail::Expired),
        };
        match written {
            // Counted as written, so a client that leaves mid-replay still
            // shows what it was sent.
            Ok(()) => metrics::counter!(m::REPLAYED_EVENTS).increment(chunk.events),
            Err(WriteFail::Kicked) => return Err(on_kick(ws, kicker.kicked().await).await),
            Err(WriteFail::Expired) => return Err(token_expired(ws).await),
            Err(WriteFail::Timeout) => return Err(End::Slow),
            Err(WriteFail::Closed) => return Err(End::Client),
        }
    }
}

async fn resume_failed<S, E>(ws: &mut S, e: &crate::resume::ResumeError) -> End
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
{
    crate::resume::failed(e);
    close_with(ws, close::INTERNAL, "history unavailable: reconnect and resume", End::Error).await
}

/// Reads the first client frame of a `resume=frame` socket. Until it
/// comes, the socket is answered as it would be later (a close frame is
/// echoed, a binary frame gets 1003, a broken frame its close code), a
/// drain closes it with `reconnect` and 1012 (it has not joined its user, so
/// nothing else would reach it), and the token's `expiry` with 4001.
async fn wait_resume_frame<S, E>(ws: &mut S, kicker: &Kicker, expiry: tokio::time::Instant) -> Result<Start, End>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let deadline = tokio::time::sleep(RESUME_FRAME_TIMEOUT);
    let mut deadline = std::pin::pin!(deadline);
    loop {
        let msg = tokio::select! {
            biased;
            why = kicker.kicked() => return Err(on_kick(ws, why).await),
            _ = tokio::time::sleep_until(expiry) => return Err(token_expired(ws).await),
            _ = &mut deadline => return Err(close_with(ws, close::POLICY, "no resume frame", End::Unsupported).await),
            msg = ws.next() => msg,
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                return match serde_json::from_str::<ClientFrame>(text.as_str()) {
                    Ok(ClientFrame::Resume { last_seq: Some(last_seq), epoch }) => Ok(Start::After { last_seq, epoch }),
                    Ok(ClientFrame::Resume { last_seq: None, .. }) => Ok(Start::Live),
                    // A position the node refuses (above 2^53-1): say so, the client must drop it.
                    Err(e) if e.to_string().contains(BAD_POSITION) => {
                        Err(close_with(ws, close::POLICY, BAD_POSITION, End::Unsupported).await)
                    }
                    _ => Err(close_with(ws, close::POLICY, "expected a resume frame first", End::Unsupported).await),
                };
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            // Everything else ends the socket there.
            other => {
                if let Some(end) = on_client_message(ws, other).await {
                    return Err(end);
                }
            }
        }
    }
}

async fn on_kick<S, E>(ws: &mut S, why: Kick) -> End
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
{
    match why {
        Kick::Slow => close_with(ws, close::SLOW, "slow: reconnect and resume", End::Slow).await,
        Kick::StreamReset => {
            close_with(ws, close::STREAM_RESET, "stream reset: reconnect and resume", End::StreamReset).await
        }
        Kick::Drain => {
            let frame = ServerFrame::Reconnect { reason: "drain" }.to_text();
            let _ = send(ws, Message::Text(frame)).await;
            close_with(ws, close::DRAIN, "drain: reconnect and resume", End::Drain).await
        }
    }
}

/// Handles one read from the client; `Some` ends the socket.
async fn on_client_message<S, E>(ws: &mut S, msg: Option<Result<Message, E>>) -> Option<End>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    match msg {
        None => Some(End::Client),
        Some(Ok(Message::Close(_))) => {
            // tungstenite queued the close reply; a flush sends it.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
            Some(End::Client)
        }
        Some(Ok(Message::Text(text))) => {
            let reply = match serde_json::from_str::<ClientFrame>(text.as_str()) {
                Ok(ClientFrame::Ping) => ServerFrame::Pong.to_text(),
                // Taken before this, in the socket's loop (see `refresh`);
                // only a socket still waiting for its resume frame gets here.
                Ok(ClientFrame::Refresh { .. }) => {
                    let message = "refresh is accepted once the socket has started";
                    ServerFrame::Error { code: "refresh_refused", message }.to_text()
                }
                Ok(ClientFrame::Resume { .. }) => {
                    metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "late_resume").increment(1);
                    let message = "resume is only accepted as the first frame of a socket opened with resume=frame";
                    ServerFrame::Error { code: "late_resume", message }.to_text()
                }
                Err(e) => {
                    metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "bad_frame").increment(1);
                    ServerFrame::Error { code: "bad_frame", message: &e.to_string() }.to_text()
                }
            };
            send(ws, Message::Text(reply)).await.err().map(|_| End::Client)
        }
        Some(Ok(Message::Binary(_))) => {
            metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "binary").increment(1);
            Some(close_with(ws, close::UNSUPPORTED, "binary frames are not supported", End::Unsupported).await)
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
        Some(Err(e)) => match read_failure(&e) {
            Some(ReadFailure::TooBig) => {
                metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "too_big").increment(1);
                let why = format!("client frames are limited to {MAX_CLIENT_FRAME} bytes");
                Some(close_with(ws, close::TOO_BIG, &why, End::TooBig).await)
            }
            Some(ReadFailure::NotUtf8) => {
                metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "not_utf8").increment(1);
                // tungstenite reports a text frame and a close frame's reason
                // alike; the reason text covers both.
                Some(close_with(ws, close::NOT_UTF8, "invalid UTF-8", End::Unsupported).await)
            }
            Some(ReadFailure::Protocol) => {
                metrics::counter!(m::CLIENT_FRAMES_REJECTED, "reason" => "protocol").increment(1);
                tracing::debug!(error = %e, "the client broke RFC 6455");
                Some(close_with(ws, close::PROTOCOL, "protocol error", End::Unsupported).await)
            }
            None => {
                tracing::debug!(error = %e, "read failed");
                Some(End::Client)
            }
        },
    }
}

enum WriteFail {
    Kicked,
    /// The token expired while the write waited for the client.
    Expired,
    Timeout,
    Closed,
}

async fn write_batch<S, E>(ws: &mut S, frames: &mut Vec<Utf8Bytes>) -> Result<(), WriteFail>
where
    S: Sink<Message, Error = E> + Unpin,
{
    let n = frames.len();
    let bytes: usize = frames.iter().map(|f| f.len()).sum();
    let mut write = std::pin::pin!(async {
        for f in frames.drain(..) {
            ws.feed(Message::Text(f)).await?;
        }
        ws.flush().await
    });
    // Most batches are written at once: they need no timer (reading the
    // clock and building one was 4% of the node's CPU under `chat`).
    let written = match futures_util::poll!(write.as_mut()) {
        std::task::Poll::Ready(r) => Ok(r),
        std::task::Poll::Pending => tokio::time::timeout(WRITE_TIMEOUT, write).await,
    };
    match written {
        Ok(Ok(())) => {
            let hot = m::hot();
            hot.frames_sent.increment(n as u64);
            hot.bytes_sent.increment(bytes as u64);
            hot.write_batches.increment(1);
            Ok(())
        }
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

async fn token_expired<S, E>(ws: &mut S) -> End
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
{
    close_with(ws, close::TOKEN_EXPIRED, "token expired: reconnect with a fresh token", End::TokenExpired).await
}

/// Sends a close frame and waits for the client's in reply, reading and
/// discarding what comes before it; both bounded by [`CLOSE_TIMEOUT`]
/// together. Reports `end`.
///
/// Not closed at once after the write: a connection closed with unread
/// data from the client (a pong, a `ping` frame sent meanwhile) is reset by
/// the kernel, and the reset discards what the node had not yet sent,
/// close frame included: the client would see the connection drop, not the
/// code that tells it what to do.
async fn close_with<S, E>(ws: &mut S, code: u16, reason: &str, end: End) -> End
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
{
    let frame = CloseFrame { code, reason: Utf8Bytes::from(reason) };
    let handshake = async {
        if ws.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
    end
}

/// The token of a `refresh` frame, if `text` is one.
fn refresh_token(text: &str) -> Option<String> {
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(ClientFrame::Refresh { token }) => Some(token),
        _ => None,
    }
}

/// Checks a refresh's token as a new connection's would be checked, and
/// that it names the socket's user: the socket's new close time (`exp` plus
/// leeway) and `exp`, or why it was refused (the old expiry stands).
fn refresh(s: &Session, token: &str) -> Result<(u64, u64), String> {
    let id = s.auth.verify(token).map_err(|e| e.to_string())?;
    if id.user != s.user {
        return Err("the token is for another user".into());
    }
    Ok((id.close_at, id.exp))
}

/// Longest a token's expiry is waited for: a far-future `exp` would
/// overflow the timer. A socket open this long is closed as expired.
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The instant the token expires (`exp`, seconds since the Unix epoch), as
/// a tokio deadline. To the millisecond, not the second: `exp` passes at the
/// start of its second, whatever part of a second the clock shows now.
fn token_deadline(exp: u64) -> tokio::time::Instant {
    let at = std::time::UNIX_EPOCH.checked_add(Duration::from_secs(exp));
    let left = at.map_or(MAX_TOKEN_WAIT, |at| at.duration_since(std::time::SystemTime::now()).unwrap_or_default());
    tokio::time::Instant::now() + left.min(MAX_TOKEN_WAIT)
}

/// Read errors that the client caused and gets a close code for.
enum ReadFailure {
    TooBig,
    NotUtf8,
    /// A frame RFC 6455 forbids: reserved bits or opcodes, unmasked,
    /// a fragmented or oversized control frame, a stray continuation.
    Protocol,
}

fn read_failure<E: std::error::Error + 'static>(e: &E) -> Option<ReadFailure> {
    use tokio_tungstenite::tungstenite::Error;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        match err.downcast_ref::<Error>() {
            Some(Error::Capacity(_)) => return Some(ReadFailure::TooBig),
            Some(Error::Utf8(_)) => return Some(ReadFailure::NotUtf8),
            // The peer going away mid-handshake is no violation to answer.
            Some(Error::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
                | ProtocolError::ReceivedAfterClosing
                | ProtocolError::SendAfterClosing,
            )) => return None,
            Some(Error::Protocol(_)) => return Some(ReadFailure::Protocol),
            Some(_) => return None,
            None => cur = err.source(),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    /// What a socket's future may take. An idle socket keeps it whole for
    /// its life (in its task, with the task's header), so every byte here is
    /// a byte per idle socket. It is as large as its largest await: the
    /// loop's are about 1.4 KB, and an await of three JetStream reads left
    /// inline once made it 6.1 KB (docs/benchmarks.md).
    const MAX_SOCKET_FUTURE: usize = 2048;

    /// The size of what `f` returns, read off its type without calling it.
    fn returned_size<A, B, C, R>(_: fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_socket_future_stays_small() {
        let ws = returned_size(super::run::<axum::extract::ws::WebSocket, axum::Error>);
        let sse = returned_size(super::run::<crate::sse::Transport, crate::sse::Closed>);
        assert!(ws <= MAX_SOCKET_FUTURE, "a WebSocket's future is {ws} bytes: box what is awaited once");
        assert!(sse <= MAX_SOCKET_FUTURE, "an event stream's future is {sse} bytes: box what is awaited once");
    }
}
