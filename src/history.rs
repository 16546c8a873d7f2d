//! Reads of a user's stored events and of the stream's state.
//!
//! Direct gets spread over the node's read connections (any replica may
//! answer them), requests the stream leader answers, and a look at whether a
//! stretch of sequences is still stored whole. Which reads make a resume
//! whole is decided in [`crate::resume`], the one owner of that rule.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind, Stream};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::stream::StreamError;

/// Parts a long bounded read is split into at most, read at once on
/// different connections (see [`History::collect`] and
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

/// Reads of one stream, spread over the node's read connections.
#[derive(Clone)]
pub struct History {
    /// The handle on the connection that carries the live subscriptions:
    /// [`History::last`] is asked there, so that it is answered after a
    /// subscription made just before it on that connection took effect.
    live: Stream<()>,
    /// The read connections ([`crate::nats::READ_CONNECTIONS`]), for the
    /// requests no stream handle makes ([`History::newest_many`]).
    readers: Arc<[Client]>,
    /// One handle per read connection, in the order of `readers`.
    streams: Arc<[Stream<()>]>,
    /// Picks the connection of the next single request.
    turn: Arc<AtomicUsize>,
    /// The stream's name, for the requests no stream handle makes.
    name: String,
    subject_prefix: String,
}

impl History {
    /// Reads of the stream `name`: `live` is the connection of the live
    /// subscriptions; `readers` (at least one) carry the other reads. Makes
    /// no request: it fails only on a name that is not a stream name.
    pub fn new(live: &Client, readers: Vec<Client>, name: &str, subject_prefix: String) -> Result<Self, StreamError> {
        assert!(!readers.is_empty(), "History needs a read connection");
        // get_stream_no_info checks the name and makes no request: it is
        // ready at its first poll.
        let handle = |c: &Client| {
            let js = async_nats::jetstream::new(c.clone());
            match futures_util::FutureExt::now_or_never(js.get_stream_no_info(name)) {
                Some(Ok(stream)) => Ok(stream),
                Some(Err(e)) => {
                    Err(StreamError::Mismatch { name: name.to_owned(), diff: format!("not a valid stream name: {e}") })
                }
                None => Err(StreamError::Nats(format!("stream {name}: making a handle needed a request"))),
            }
        };
        let live = handle(live)?;
        let streams = readers.iter().map(handle).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            live,
            readers: readers.into(),
            streams: streams.into(),
            turn: Arc::default(),
            name: name.to_owned(),
            subject_prefix,
        })
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
        self.last_on(&self.live, user).await
    }

    /// Sequence of the user's newest stored event, 0 when none, as the
    /// stream's leader has it; asked on a read connection, for the audit
    /// ([`crate::hub::AUDIT_INTERVAL`]), which must not delay live events.
    pub async fn newest(&self, user: &str) -> Result<u64, StreamError> {
        self.last_on(self.stream(), user).await
    }

    /// The newest event of each of `users` (at most [`NEWEST_BATCH`]), in
    /// one request of nats-server 2.11+ (a direct get with `multi_last`),
    /// or [`Batched::Unsupported`] when the server that answered does not
    /// know that request (2.9 and 2.10 answer "408 Empty Request").
    ///
    /// A direct get: any replica (or a `mirror_direct` mirror) may answer,
    /// so the answer says how far it reaches ([`Newest::through`], the last
    /// sequence the answering server had stored): nothing it says about
    /// events after that holds. The server answers in sequence order and
    /// stops after [`NEWEST_BATCH_BYTES`], the payloads included; the users
    /// it did not reach are asked again at the same point.
    pub async fn newest_many(&self, users: &[&str]) -> Result<Batched, StreamError> {
        assert!(users.len() <= NEWEST_BATCH, "at most NEWEST_BATCH users a batch");
        let client = &self.readers[self.turn.fetch_add(1, Ordering::Relaxed) % self.readers.len()];
        let api = format!("$JS.API.DIRECT.GET.{}", self.name);
        let err = |what: String| StreamError::Nats(format!("newest events of {} users: {what}", users.len()));
        let index: std::collections::HashMap<String, usize> =
            users.iter().enumerate().map(|(i, u)| (self.subject(u), i)).collect();
        let mut seqs: Vec<Option<u64>> = vec![None; users.len()];
        let mut through: Option<u64> = None;
        loop {
            let asked: Vec<&str> = index.iter().filter(|&(_, &i)| seqs[i].is_none()).map(|(s, _)| s.as_str()).collect();
            if asked.is_empty() {
                break;
            }
            let mut request = serde_json::json!({ "multi_last": asked, "max_bytes": NEWEST_BATCH_BYTES });
            if let Some(t) = through {
                // Later rounds read at the first one's point.
                request["up_to_seq"] = t.into();
            }
            let inbox = client.new_inbox();
            let mut answers = client.subscribe(inbox.clone()).await.map_err(|e| err(e.to_string()))?;
            client
                .publish_with_reply(api.clone(), inbox, request.to_string().into())
                .await
                .map_err(|e| err(e.to_string()))?;
            let mut found = 0usize;
            let (pending, upto) = loop {
                let m = match tokio::time::timeout(NEWEST_BATCH_STALL, answers.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(err("the subscription ended".into())),
                    Err(_) => return Err(err(format!("no answer within {NEWEST_BATCH_STALL:?}"))),
                };
                let header = |name: &str| -> Option<u64> { m.headers.as_ref()?.get_last(name)?.as_str().parse().ok() };
                match m.status.map(|s| s.as_u16()) {
                    None => {
                        // The stream's stamps are the last values (see
                        // crate::hub's RESERVED_STAMPS).
                        let subject = m.headers.as_ref().and_then(|h| h.get_last("Nats-Subject"));
                        let i = subject.and_then(|s| index.get(s.as_str()));
                        match (i, header("Nats-Sequence")) {
                            (Some(&i), Some(seq)) => {
                                seqs[i] = Some(seq);
                                found += 1;
                            }
                            _ => return Err(err("an answer without a known subject or a sequence".into())),
                        }
                    }
                    Some(204) => match (header("Nats-Num-Pending"), header("Nats-UpTo-Sequence")) {
                        (Some(pending), Some(upto)) => break (pending, Some(upto)),
                        _ => return Err(err("an end of batch without its counts".into())),
                    },
                    // None of them has an event (up to the point asked for).
                    Some(404) => break (0, through),
                    Some(408) if through.is_none() => return Ok(Batched::Unsupported),
                    Some(code) => {
                        return Err(err(format!("status {code} {}", m.description.as_deref().unwrap_or(""))));
                    }
                }
            };
            through = through.or(upto);
            if pending == 0 {
                for s in &asked {
                    seqs[index[*s]].get_or_insert(0);
                }
            } else if found == 0 {
                return Err(err(format!("{pending} pending and none sent")));
            }
        }
        Ok(Batched::Read(Newest {
            seqs: seqs.into_iter().map(|s| s.unwrap_or(0)).collect(),
            // An answer of "none" from the first round says nothing of how
            // far its server reached.
            through: through.unwrap_or(0),
        }))
    }

    /// The leader's newest event of the user, asked on `stream`'s connection.
    async fn last_on(&self, stream: &Stream<()>, user: &str) -> Result<u64, StreamError> {
        let subject = self.subject(user);
        match stream.get_last_raw_message_by_subject(subject.as_str()).await {
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
        Ok(self.leader_state().await?.last)
    }

    /// The stream's first and last sequence and its count of interior
    /// deletes, as its leader has them.
    pub async fn leader_state(&self) -> Result<LeaderState, StreamError> {
        let info =
            self.stream().info_with_subjects("").await.map_err(|e| StreamError::Nats(format!("stream info: {e}")))?;
        let st = &info.info.state;
        Ok(LeaderState { first: st.first_sequence, last: st.last_sequence, deleted: st.deleted_count })
    }

    /// The subject of the message stored at `seq`, as the stream leader has
    /// it; `None` when it holds none there. The leader, not a direct get: a
    /// replica that has not yet applied a removal would still show the
    /// message (see [`crate::resume`], rule 1).
    pub async fn leader_subject_at(&self, seq: u64) -> Result<Option<String>, StreamError> {
        match self.stream().get_raw_message(seq).await {
            Ok(m) => Ok(Some(m.subject.to_string())),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(StreamError::Nats(format!("message {seq}: {e}"))),
        }
    }

    /// Sequence of the user's first stored event at or after `from`, as the
    /// stream leader has it.
    pub async fn leader_next(&self, user: &str, from: u64) -> Result<Option<u64>, StreamError> {
        let subject = self.subject(user);
        match self.stream().get_first_raw_message_by_subject(subject.as_str(), from.max(1)).await {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(StreamError::Nats(format!("next of {subject} from {from}: {e}"))),
        }
    }

    /// Sequence of the user's oldest stored event, as the stream leader has it.
    pub async fn first(&self, user: &str) -> Result<Option<u64>, StreamError> {
        self.leader_next(user, 1).await
    }

    /// Whether every sequence in `from..to` is still stored, none of them the
    /// user's: then no event of the user in that stretch was ever removed,
    /// whatever the stream's limits were. Sequences are dense (every one was
    /// given to a message), so a missing one is a removed message.
    ///
    /// Cheap when the stream has no interior deletes (one stream info);
    /// otherwise the stretch's headers are read in order, up to
    /// [`MAX_PROOF_SPAN`] messages, and the first missing sequence ends the
    /// look.
    pub async fn span(&self, user: &str, from: u64, to: u64) -> Result<Span, StreamError> {
        if from >= to {
            return Ok(Span::Whole);
        }
        let state = self.leader_state().await?;
        if state.first > from {
            return Ok(Span::Broken(from));
        }
        // Nothing past the stream's end was ever stored.
        let to = to.min(state.last + 1);
        if from >= to || state.deleted == Some(0) {
            return Ok(Span::Whole);
        }
        if to - from > MAX_PROOF_SPAN {
            return Ok(Span::TooLong);
        }
        let err = |e: &dyn std::fmt::Display| StreamError::Nats(format!("reading sequences {from}..{to}: {e}"));
        let consumer = self
            .stream()
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
                headers_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| err(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| err(&e))?;
        let subject = self.subject(user);
        let mut expect = from;
        while expect < to {
            let msg = match tokio::time::timeout(SPAN_STALL, messages.next()).await {
                Ok(Some(msg)) => msg.map_err(|e| err(&e))?,
                Ok(None) => return Err(StreamError::Nats(format!("reading sequences {from}..{to} ended early"))),
                Err(_) => return Err(StreamError::Nats(format!("reading sequences {from}..{to} stalled at {expect}"))),
            };
            let info = msg.info().map_err(|e| err(&e))?;
            let seq = info.stream_sequence;
            if seq != expect {
                return Ok(Span::Broken(expect));
            }
            // A message of the user's below what the caller took for its
            // oldest: that answer was wrong, so nothing follows from this one.
            if msg.subject.as_str() == subject {
                return Ok(Span::Contradicted(seq));
            }
            expect = seq + 1;
            if info.pending == 0 && expect < to {
                // The end came first: the stretch's tail was removed since.
                return Ok(Span::Broken(expect));
            }
        }
        Ok(Span::Whole)
    }

    /// Reads up to `max` of the user's events from `from` and below `before`
    /// with direct gets; `done` is true when nothing more is stored in the
    /// range. Not proven whole: [`crate::resume::read`] does that.
    ///
    /// Each get returns the user's next event, so a read is a chain of round
    /// trips, each one a server-side scan over the other users' events in
    /// between. The first event is read alone: how far it lies from `from`
    /// says how far apart the user's events are. When that predicts at least
    /// [`MIN_EVENTS_PER_CHAIN`] events per part, the rest of a bounded range
    /// is split into up to [`READ_CHAINS`] parts read at once on different
    /// connections, and the parts' events are joined in order, up to the
    /// first part that did not reach its end.
    pub async fn collect(
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
}

/// Users asked for in one batched read of newest events
/// ([`History::newest_many`]). nats-server answers at most 1,024 subjects a
/// request, and holds the stream's writes while it looks them up (its
/// `isolateMu`): a quarter of that keeps each pause short (about 3 ms at
/// 12 us a user, `cargo bench --bench audit`).
pub const NEWEST_BATCH: usize = 256;

/// Bytes one answer to a batched read may carry before the server stops
/// and reports the rest as pending (`max_bytes`; asked again, see
/// [`History::newest_many`]). The events' payloads come along, as no request
/// asks for sequences alone: this bounds what one answer holds in memory.
pub const NEWEST_BATCH_BYTES: usize = 1024 * 1024;

/// A batched read that receives no message for this long fails (the audit
/// asks again at its next interval).
const NEWEST_BATCH_STALL: Duration = Duration::from_secs(5);

/// What [`History::newest_many`] found.
#[derive(Debug)]
pub enum Batched {
    Read(Newest),
    /// The server does not answer batched reads (before 2.11).
    Unsupported,
}

/// The newest events of a batch of users.
#[derive(Debug)]
pub struct Newest {
    /// Per user, in the order asked: the sequence of its newest event at or
    /// below `through`, 0 when none.
    pub seqs: Vec<u64>,
    /// The stream's last sequence on the server that answered, when it
    /// answered: every event up to it is accounted for. 0 when no user had
    /// an event (the server then does not say).
    pub through: u64,
}

/// What [`History::leader_state`] found.
#[derive(Debug, Clone, Copy)]
pub struct LeaderState {
    pub first: u64,
    pub last: u64,
    /// Interior deletes (messages removed that were not the stream's
    /// oldest); `None` when the server did not say.
    pub deleted: Option<u64>,
}

/// What [`History::span`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Every sequence is stored, and none is the user's.
    Whole,
    /// The first sequence that is not stored (or is, unexpectedly, the user's).
    Broken(u64),
    /// Longer than [`MAX_PROOF_SPAN`]: not looked at.
    TooLong,
    /// A message of the user's is stored at this sequence, inside a stretch
    /// the caller was told holds none of them. Seen in tests/cluster.rs
    /// right after the stream leader was killed: the new leader answered a
    /// later oldest event for a user than one it held moments later (a
    /// leader still applying its log). The reads must be made again.
    Contradicted(u64),
}

/// Messages [`History::span`] reads at most. Headers only, in order, on one
/// ordered consumer: about 0.2 s for this many here. A longer stretch is
/// reported as may-be-missing rather than read: it arises only when a client
/// resumes from a horizon (a sequence that is not one of its user's events)
/// far behind the user's oldest event on a stream that has removed messages
/// out of order (per-user limits, deletes).
pub const MAX_PROOF_SPAN: u64 = 64 * 1024;

/// A look at a stretch that receives no message for this long has stalled
/// and fails (the resume is retried by its client).
const SPAN_STALL: Duration = Duration::from_secs(3);

/// The stream's epoch: its creation time in nanoseconds since the Unix
/// epoch, as a string. It changes when the stream is deleted and created
/// again, which restarts its sequences.
pub fn epoch(info: &async_nats::jetstream::stream::Info) -> String {
    info.created.unix_timestamp_nanos().to_string()
}
