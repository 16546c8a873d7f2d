//! Reading a user's stored events, and deciding whether a read is complete.
//!
//! The continuity rule (docs/protocol.md, "Resume and gaps") rests on how
//! JetStream removes messages under limits: `max_age`, `max_bytes` and
//! `max_msgs` remove the stream's oldest messages (a prefix of the stream),
//! and `max_msgs_per_subject` removes a subject's oldest. Either way, what is
//! stored for a user is always a suffix of the user's history. So after a
//! read of the user's events following `after`:
//! - if an event of the user at or before `after` is still stored, nothing
//!   after it can have been removed: the read is complete;
//! - otherwise events in between may have been removed, unless the stream
//!   still starts at or before `after + 1` (no prefix removal past `after`)
//!   and the user holds fewer events than the per-subject limit (the limit
//!   never removed anything since, see [`History::check`]).
//!
//! When neither holds the reader reports a [`Gap`]. Deleting or purging a
//! user's messages by hand is outside this rule (docs/operations.md).
//!
//! Costs, which matter when thousands of sockets resume at once: one direct
//! get per event read, one more (first event of the subject) when the first
//! event found is not right after `after`, and one stream info only when that
//! does not settle it. Direct gets are answered by any replica.

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use bytes::Bytes;
use futures_util::TryStreamExt;

use crate::stream::StreamError;

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

/// Reads of one stream.
#[derive(Clone)]
pub struct History {
    stream: Stream<()>,
    subject_prefix: String,
    max_per_user: i64,
}

impl History {
    pub fn new(stream: Stream<()>, subject_prefix: String, max_per_user: i64) -> Self {
        Self { stream, subject_prefix, max_per_user }
    }

    fn subject(&self, user: &str) -> String {
        format!("{}.{user}", self.subject_prefix)
    }

    /// Sequence of the user's newest stored event, 0 when none.
    pub async fn last(&self, user: &str) -> Result<u64, StreamError> {
        let subject = self.subject(user);
        match self.stream.direct_get_last_for_subject(subject.as_str()).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(0),
            Err(e) => Err(StreamError::Nats(format!("last of {subject}: {e}"))),
        }
    }

    /// The user's first stored event at or after `from`.
    pub async fn next(&self, user: &str, from: u64) -> Result<Option<Stored>, StreamError> {
        let subject = self.subject(user);
        match self.stream.direct_get_next_for_subject(subject.as_str(), Some(from.max(1))).await {
            Ok(m) => Ok(Some(Stored { seq: m.sequence, payload: m.payload })),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(StreamError::Nats(format!("next of {subject} from {from}: {e}"))),
        }
    }

    /// The stream's last sequence, asked of the stream leader.
    pub async fn stream_last(&self) -> Result<u64, StreamError> {
        let info =
            self.stream.info_with_subjects("").await.map_err(|e| StreamError::Nats(format!("stream info: {e}")))?;
        Ok(info.info.state.last_sequence)
    }

    /// Sequence of the user's oldest stored event.
    pub async fn first(&self, user: &str) -> Result<Option<u64>, StreamError> {
        Ok(self.next(user, 1).await?.map(|s| s.seq))
    }

    /// The stream's first sequence and the number of events stored for the user.
    async fn subject_state(&self, user: &str) -> Result<(u64, u64), StreamError> {
        let subject = self.subject(user);
        let err = |e: &dyn std::fmt::Display| StreamError::Nats(format!("stream info for {subject}: {e}"));
        let mut info = self.stream.info_with_subjects(subject.as_str()).await.map_err(|e| err(&e))?;
        let first = info.info.state.first_sequence;
        let mut count = 0;
        while let Some((s, n)) = info.try_next().await.map_err(|e| err(&e))? {
            if s == subject {
                count = n as u64;
            }
        }
        Ok((first, count))
    }

    /// Whether a read of the user's events after `after`, whose first result
    /// was `first_found` (None: nothing stored after `after`), is complete.
    /// Returns the gap to announce when it cannot be proven.
    pub async fn check(&self, user: &str, after: u64, first_found: Option<u64>) -> Result<Option<Gap>, StreamError> {
        if first_found == Some(after + 1) {
            return Ok(None);
        }
        if first_found.is_none() && after == 0 {
            // Nothing held and nothing asked for: no history to be partial.
            return Ok(None);
        }
        if after > 0 && self.first(user).await?.is_some_and(|f| f <= after) {
            // An event at or before `after` survives, so nothing after it was removed.
            return Ok(None);
        }
        let (stream_first, count) = self.subject_state(user).await?;
        // After a per-subject removal the user holds exactly the limit, and
        // only removals of the stream's prefix lower it again, which move
        // `stream_first` past what they removed.
        let per_subject_untouched = (count as i64) < self.max_per_user;
        if stream_first <= after + 1 && (first_found.is_none() || per_subject_untouched) {
            return Ok(None);
        }
        let to = match first_found {
            Some(e1) => e1 - 1,
            None => stream_first.saturating_sub(1).max(after + 1),
        };
        Ok(Some(Gap { reason: GapReason::Expired, from: Some(after + 1), to: Some(to), earliest: first_found }))
    }
}

/// The stream's epoch: its creation time in nanoseconds since the Unix
/// epoch, as a string. It changes when the stream is deleted and created
/// again, which restarts its sequences.
pub fn epoch(info: &async_nats::jetstream::stream::Info) -> String {
    info.created.unix_timestamp_nanos().to_string()
}
