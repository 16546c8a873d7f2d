//! Reading a user's stored events, and proving that a read missed nothing.
//!
//! The continuity rule (docs/protocol.md, "When a resume is complete") rests
//! on how JetStream removes messages under limits: `max_age`, `max_bytes` and
//! `max_msgs` remove the stream's oldest messages (a prefix of the stream),
//! and `max_msgs_per_subject` removes a subject's oldest. Either way, what is
//! stored for a user is always a suffix of the user's history, and it only
//! shrinks from the old end. So after reading the user's events following
//! `after` (by direct gets, or by a shared scan: [`crate::scan`]), the read is
//! complete when:
//! - the message at `after` is still stored and is the user's (the common
//!   case: `after` is the last event the client saw), or the user's oldest
//!   stored event is at or before `after + 1`: either way nothing after
//!   `after` was removed before or during the read; or
//! - the stream still starts at or before `after + 1` and the user holds
//!   fewer events than the stream's per-subject limit: no removal reached
//!   past `after` (see [`History::read`]).
//!
//! Otherwise a [`Gap`] says what may be missing, and read events inside it
//! are left out. The check runs after every chunk of reads, since removals
//! can happen while a long read is under way. Deleting or purging a user's
//! messages by hand is outside this rule.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind, Stream};
use bytes::Bytes;
use futures_util::TryStreamExt;

use crate::stream::StreamError;

/// Parts a long bounded read is split into at most, read at once on
/// different connections (see [`History::read`] and
/// [`crate::nats::READ_CONNECTIONS`]). Each part reads up to `max - 1`
/// events before the parts are joined, so a read holds at most this many
/// times `max` events.
pub const READ_CHAINS: usize = 4;

/// Events a part of a split read is expected to hold, at least. Each part
/// ends with a get that scans past its end to the user's next event, so a
/// part with one or two events costs more than reading them in one chain:
/// measured, splitting a resume of one missed event into four parts doubled
/// its time.
const MIN_EVENTS_PER_CHAIN: usize = 4;

/// How a chain of gets ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// It saw the user's next event at or past its bound: the server that
    /// answered held everything up to there.
    Bound,
    /// No later event of the user on the server that answered.
    NotFound,
    /// It took as many events as it was allowed.
    Max,
}

/// One stored event of a user.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub payload: Bytes,
}

/// Why continuity could not be proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// Events in the range were removed by the stream's limits (age, size,
    /// per-user count), or may have been.
    Expired,
    /// The stream was deleted and created again: the client's position
    /// belongs to the old one.
    StreamReset,
    /// NATS could not be read to repair a hole on the live path.
    Unavailable,
}

impl GapReason {
    pub fn label(self) -> &'static str {
        match self {
            GapReason::Expired => "expired",
            GapReason::StreamReset => "stream_reset",
            GapReason::Unavailable => "unavailable",
        }
    }
}

/// Events with `seq` in `from..=to` may be missing; `from`/`to` are `None`
/// when the range is unknown (a stream reset). `earliest` is the user's
/// oldest event still stored, when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub reason: GapReason,
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub earliest: Option<u64>,
}

/// Reads of one stream, spread over the node's read connections.
#[derive(Clone)]
pub struct History {
    /// The handle on the connection that carries the live subscriptions:
    /// [`History::last`] is asked there, so that it is answered after a
    /// subscription made just before it on that connection took effect.
    live: Stream<()>,
    /// One handle per read connection ([`crate::nats::READ_CONNECTIONS`]).
    streams: Arc<[Stream<()>]>,
    /// Picks the connection of the next single request.
    turn: Arc<AtomicUsize>,
    subject_prefix: String,
}

impl History {
    /// `live`: a handle to the stream on the connection of the live
    /// subscriptions; `streams`: one on each read connection (at least one).
    pub fn new(live: Stream<()>, streams: Vec<Stream<()>>, subject_prefix: String) -> Self {
        assert!(!streams.is_empty(), "History needs a stream handle");
        Self { live, streams: streams.into(), turn: Arc::default(), subject_prefix }
    }

    /// The handle for the next request, round-robin over the connections.
    pub fn stream(&self) -> &Stream<()> {
        &self.streams[self.turn.fetch_add(1, Ordering::Relaxed) % self.streams.len()]
    }

    /// The subject the user's events are stored under.
    pub fn subject(&self, user: &str) -> String {
        format!("{}.{user}", self.subject_prefix)
    }

    /// Sequence of the user's newest stored event, 0 when none, as the
    /// stream's leader has it. Asked on the live connection: nats-server
    /// handles one connection's commands in order (and a route's), so after
    /// a SUB on it, no event falls between the two.
    ///
    /// Not a direct get: any replica (or a mirror with `mirror_direct`) may
    /// answer one, and one that lags would give an older position; the events
    /// after it, stored before the SUB, would then be neither read nor sent
    /// live. The leader is the one that republishes, so what it stores after
    /// answering reaches the SUB. It costs a little more: 0.42 ms p50 against
    /// 0.27 ms on 2.15.1 at 1M events, and a storm of 10,000 resumes took
    /// about 1 s longer (docs/durability.md, run 7).
    pub async fn last(&self, user: &str) -> Result<u64, StreamError> {
        let subject = self.subject(user);
        match self.live.get_last_raw_message_by_subject(subject.as_str()).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(0),
            Err(e) => Err(StreamError::Nats(format!("last of {subject}: {e}"))),
        }
    }

    /// The user's first stored event at or after `from`.
    pub async fn next(&self, user: &str, from: u64) -> Result<Option<Stored>, StreamError> {
        self.next_on(self.stream(), user, from).await
    }

    async fn next_on(&self, stream: &Stream<()>, user: &str, from: u64) -> Result<Option<Stored>, StreamError> {
        let subject = self.subject(user);
        match stream.direct_get_next_for_subject(subject.as_str(), Some(from.max(1))).await {
            Ok(m) => Ok(Some(Stored { seq: m.sequence, payload: m.payload })),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(StreamError::Nats(format!("next of {subject} from {from}: {e}"))),
        }
    }

    /// The stream's last sequence, asked of the stream leader.
    pub async fn stream_last(&self) -> Result<u64, StreamError> {
        Ok(self.leader_state().await?.last_sequence)
    }

    /// The stream's state (first and last sequence) as its leader has it.
    async fn leader_state(&self) -> Result<async_nats::jetstream::stream::State, StreamError> {
        let info =
            self.stream().info_with_subjects("").await.map_err(|e| StreamError::Nats(format!("stream info: {e}")))?;
        Ok(info.info.state.clone())
    }

    /// Sequence of the user's oldest stored event.
    pub async fn first(&self, user: &str) -> Result<Option<u64>, StreamError> {
        Ok(self.next(user, 1).await?.map(|s| s.seq))
    }

    /// The stream's first sequence and limit, and the user's event count.
    async fn subject_state(&self, user: &str) -> Result<SubjectState, StreamError> {
        let subject = self.subject(user);
        let err = |e: &dyn std::fmt::Display| StreamError::Nats(format!("stream info for {subject}: {e}"));
        let mut info = self.stream().info_with_subjects(subject.as_str()).await.map_err(|e| err(&e))?;
        let stream_first = info.info.state.first_sequence;
        let limit = info.info.config.max_messages_per_subject;
        let mut count = 0;
        while let Some((s, n)) = info.try_next().await.map_err(|e| err(&e))? {
            if s == subject {
                count = n as u64;
            }
        }
        Ok(SubjectState { stream_first, count, limit })
    }

    /// The subject of the message at `seq`, as the replica asked has it;
    /// `None` when it holds no such message.
    async fn subject_at(&self, seq: u64) -> Result<Option<async_nats::Subject>, StreamError> {
        match self.stream().direct_get(seq).await {
            Ok(m) => Ok(Some(m.subject)),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(StreamError::Nats(format!("message {seq}: {e}"))),
        }
    }

    /// Whether the stored message at `seq` is one of the user's. A message
    /// the answering replica does not hold counts as no one's only when the
    /// stream (asked of its leader) no longer starts at or before it;
    /// otherwise that replica lags, and the answer is an error.
    pub async fn is_users(&self, user: &str, seq: u64) -> Result<bool, StreamError> {
        match self.subject_at(seq).await? {
            Some(s) => Ok(s.as_str() == self.subject(user)),
            None if seq < self.leader_state().await?.first_sequence => Ok(false),
            None => {
                Err(StreamError::Nats(format!("message {seq} is stored but the replica asked does not have it yet")))
            }
        }
    }

    /// Reads up to `max` of the user's events after `after` and below
    /// `before` with direct gets, then proves the read complete or returns
    /// the gap (see [`History::prove`]). `done` is true when nothing more is
    /// stored in the range.
    ///
    /// Each get returns the user's next event, so a read is a chain of round
    /// trips, each one a server-side scan over the other users' events in
    /// between. The first event is read alone: how far it lies from `after`
    /// says how far apart the user's events are. When that predicts at least
    /// [`MIN_EVENTS_PER_CHAIN`] events per part, the rest of a bounded range
    /// is split into up to [`READ_CHAINS`] parts read at once on different
    /// connections, and the parts' events are joined in order, up to the
    /// first part that did not reach its end.
    pub async fn read(&self, user: &str, after: u64, before: Option<u64>, max: usize) -> Result<Read, StreamError> {
        let (events, done) = self.collect(user, after + 1, before, max).await?;
        self.prove(user, after, events, done).await
    }

    async fn collect(
        &self,
        user: &str,
        from: u64,
        before: Option<u64>,
        max: usize,
    ) -> Result<(Vec<Stored>, bool), StreamError> {
        let first = match self.next(user, from).await? {
            Some(ev) if before.is_none_or(|b| ev.seq < b) => ev,
            _ => return Ok((Vec::new(), true)),
        };
        let spacing = first.seq + 1 - from;
        let rest = first.seq + 1;
        let mut events = vec![first];
        if before.is_some_and(|b| b <= rest) {
            return Ok((events, true));
        }
        if max <= 1 {
            return Ok((events, false));
        }
        // Split only the stretch expected to hold what this read may take:
        // parts beyond it would be read and thrown away.
        let (window, parts) = match before {
            Some(b) => {
                let window = b.min(rest.saturating_add(spacing.saturating_mul(max as u64 - 1)));
                let expected = (window - rest) / spacing;
                (Some(window), (expected as usize / MIN_EVENTS_PER_CHAIN).clamp(1, READ_CHAINS.min(self.streams.len())))
            }
            None => (None, 1),
        };
        let bounds: Vec<(u64, Option<u64>)> = match window {
            Some(w) if parts > 1 => {
                let step = (w - rest).div_ceil(parts as u64);
                (0..parts as u64).map(|i| (rest + i * step, Some((rest + (i + 1) * step).min(w)))).collect()
            }
            _ => vec![(rest, window)],
        };
        let n = bounds.len();
        let base = self.turn.fetch_add(n, Ordering::Relaxed);
        let chains = bounds.into_iter().enumerate().map(|(i, (f, b))| {
            let stream = &self.streams[(base + i) % self.streams.len()];
            async move { self.chain(stream, user, f, b, max - 1).await }
        });
        let mut done = window == before;
        for (i, (part, ended)) in futures_util::future::try_join_all(chains).await?.into_iter().enumerate() {
            let room = max - events.len();
            if part.len() > room {
                events.extend(part.into_iter().take(room));
                done = false;
                break;
            }
            events.extend(part);
            // A part that found nothing more before its bound, while a later
            // part exists, may have been answered by a replica that lags
            // behind the others: nothing after it is joined, and the next
            // read goes on from the last event taken.
            if ended == Ended::Max || (ended == Ended::NotFound && i + 1 < n) {
                done = false;
                break;
            }
        }
        Ok((events, done))
    }

    /// Up to `max` of the user's events from `from` and below `before`, one
    /// direct get each on `stream`; and how the chain ended.
    async fn chain(
        &self,
        stream: &Stream<()>,
        user: &str,
        mut from: u64,
        before: Option<u64>,
        max: usize,
    ) -> Result<(Vec<Stored>, Ended), StreamError> {
        let mut events = Vec::new();
        while events.len() < max {
            match self.next_on(stream, user, from).await? {
                Some(ev) if before.is_none_or(|b| ev.seq < b) => {
                    from = ev.seq + 1;
                    events.push(ev);
                }
                Some(_) => return Ok((events, Ended::Bound)),
                None => return Ok((events, Ended::NotFound)),
            }
        }
        Ok((events, Ended::Max))
    }

    /// Judges a read of the user's events after `after`, made by any means
    /// that returns every event stored in its range at the moment it passes
    /// it: proven complete, or the gap, with the events inside it left out.
    /// Called after the read: the stored suffix only shrinks from the old
    /// end, so if it still reaches back to `after`, the read saw everything
    /// there was.
    pub async fn prove(
        &self,
        user: &str,
        after: u64,
        mut events: Vec<Stored>,
        done: bool,
    ) -> Result<Read, StreamError> {
        // Asked first because it is the cheapest: a get by sequence of a
        // message the read has just passed, where the user's oldest event
        // may sit in a block of the stream's start that is no longer cached
        // (measured: 0.2 ms p50 for either, but up to 47 ms for the oldest).
        if after > 0 && self.subject_at(after).await?.is_some_and(|s| s.as_str() == self.subject(user)) {
            return Ok(Read { events, gap: None, done });
        }
        let first = self.first(user).await?;
        // An oldest event at `after + 1` is the first the reader needs:
        // nothing it needs was removed (and a gap from `after + 1` to
        // `after` would announce nothing).
        if first.is_some_and(|f| f <= after + 1) {
            return Ok(Read { events, gap: None, done });
        }
        if first.is_none() && events.is_empty() && after == 0 {
            // Nothing held and nothing asked for: no history to be partial.
            return Ok(Read { events, gap: None, done });
        }
        let state = self.subject_state(user).await?;
        // After a per-subject removal the user holds exactly the limit, and
        // only removals of the stream's prefix lower it again, which move the
        // stream's first sequence past what they removed. A subject that is
        // empty was not emptied by the per-subject limit (it keeps the newest).
        let per_subject_untouched = state.limit <= 0 || (state.count as i64) < state.limit;
        if state.stream_first <= after + 1 && (first.is_none() || per_subject_untouched) {
            return Ok(Read { events, gap: None, done });
        }
        let to = match first {
            Some(f) => f - 1,
            None => state.stream_first.saturating_sub(1).max(after + 1),
        };
        events.retain(|e| e.seq > to);
        let gap = Gap { reason: GapReason::Expired, from: Some(after + 1), to: Some(to), earliest: first };
        Ok(Read { events, gap: Some(gap), done })
    }
}

/// The outcome of [`History::read`].
#[derive(Debug)]
pub struct Read {
    pub events: Vec<Stored>,
    pub gap: Option<Gap>,
    pub done: bool,
}

struct SubjectState {
    stream_first: u64,
    count: u64,
    /// The stream's own per-subject limit (not this node's flag: with an
    /// externally managed stream, or mid-rollout, they can differ).
    limit: i64,
}

/// The stream's epoch: its creation time in nanoseconds since the Unix
/// epoch, as a string. It changes when the stream is deleted and created
/// again, which restarts its sequences.
pub fn epoch(info: &async_nats::jetstream::stream::Info) -> String {
    info.created.unix_timestamp_nanos().to_string()
}
