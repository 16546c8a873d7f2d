//! Resume: what a socket that comes back is sent, and the rule that decides
//! whether it is whole. This module is the one owner of that rule; the live
//! path's repairs ([`crate::hub`]) read through [`read`] too, and the socket
//! only writes the frames a [`Replay`] hands it. docs/protocol.md ("When a
//! resume is complete") states the same rule for clients.
//!
//! # Positions
//!
//! A user's history is accounted for up to a [`Position`]: everything of the
//! user at or below it was sent, announced as missing, or was before the
//! socket's time. The kind says what the sequence is, because the proofs
//! below differ: only an [`Position::Event`] is a message of the user.
//!
//! # The continuity rule
//!
//! JetStream removes a user's events only oldest first: `max_age`,
//! `max_bytes` and `max_msgs` remove the stream's oldest messages, and the
//! per-subject limit (at whatever value it has now or had before) and a
//! purge of the user's subject remove the user's oldest. Settings that would
//! remove any other event (rollups, per-message TTLs) or store events under
//! another subject are refused ([`crate::stream`]); an operator deleting one
//! event that is not the user's oldest is outside the rule, and the stream's
//! `deny_delete` forbids it. So what is stored for a user is a suffix of the
//! user's history, shrinking only from the old end.
//!
//! A read of the user's events after position L is whole when, asked of the
//! stream leader after the read:
//! 1. the message at L is stored and is the user's: nothing after it can have
//!    been removed (the usual case: L is the last event the client saw); or
//! 2. the user's oldest stored event E is at or before L+1: nothing the
//!    reader needs was removed; or
//! 3. every sequence from L+1 to E-1 (to the stream's end when the user holds
//!    nothing) is still stored, none of them the user's: sequences are dense,
//!    so an event of the user removed there would have left one missing.
//!
//! When rule 3 finds an event of the user below the oldest the leader gave,
//! the leader's answers contradict each other (one elected a moment before
//! was seen to do this): nothing is concluded, and the read and its proof
//! are made again.
//!
//! It rests only on what the stream holds when asked, never on its limits,
//! which an operator may have raised since they removed something.
//! Otherwise the reader is told `gap` `expired` from L+1 (or the first
//! missing sequence) to E-1 (or the stream's last sequence), and read events
//! inside it are left out. The rule runs after every chunk, since removals
//! can happen while a long replay is under way. A gap may be announced where
//! nothing of the user's was lost (rule 3 cannot look past
//! [`crate::history::MAX_PROOF_SPAN`], and another user's removed message looks the same);
//! a loss is never passed over in silence.

use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::SemaphorePermit;

use crate::history::{History, Span, Stored};
use crate::hub::EventFrame;
use crate::hub::{FRAME_OVERHEAD, Hub, MAX_SHARED_REPLAY_BYTES, Membership, REPLAY_BYTES, SharedReplay, read_count};
use crate::merge::{Merger, Run};
use crate::metrics as m;
use crate::protocol::{ServerFrame, event_frame_timed};
use crate::scan::MAX_SCAN_SPAN;
use crate::stream::StreamError;

/// Events read per chunk of a replay, each chunk proven and written before
/// the next is read: bounds what one replay holds to this many events, and
/// fewer when they may be large ([`crate::hub::read_count`]). In bytes, the
/// chunks of all replays together are bounded by [`crate::hub::REPLAY_BYTES`].
pub const REPLAY_CHUNK: usize = 64;

/// Largest merged frame a replay carries from one chunk into the next, so
/// that a message's text replays as one frame across chunks
/// ([`crate::merge`]): a reload in the middle of a long answer gets the
/// answer so far at once. A run past it is written at the end of its chunk
/// (the next one starts a new run). Held per replay beyond
/// [`crate::hub::REPLAY_BYTES`] (docs/operations.md counts it per socket):
/// 64 KiB is 16,000 tokens of 4 bytes.
pub const MAX_REPLAY_CARRY: usize = 64 * 1024;

/// Reads of a replay that end short of the position the socket joined at (a
/// replica behind the leader answered) are tried this many times, this far
/// apart, before the socket is closed with 1011 to resume later.
const SHORT_READ_ATTEMPTS: u32 = 3;
const SHORT_READ_BACKOFF: Duration = Duration::from_millis(200);

/// How far a user's history is accounted for on this node, and what that
/// sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// An event of the user: the last one delivered (or skipped as not
    /// forwardable), or its newest stored event when its first socket joined.
    Event(u64),
    /// A sequence of the stream (another user's, or 0), taken when the user
    /// had nothing stored: no event of the user lies at or below it unread.
    Horizon(u64),
    /// The end of a range announced to the user's sockets as a gap.
    GapEnd(u64),
}

impl Position {
    pub fn seq(self) -> u64 {
        match self {
            Position::Event(s) | Position::Horizon(s) | Position::GapEnd(s) => s,
        }
    }
}

/// Why continuity could not be proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// Events in the range were removed by the stream's limits (age, size,
    /// per-user count) or by an operator, or may have been.
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

impl Gap {
    pub fn frame(&self) -> Utf8Bytes {
        ServerFrame::Gap { reason: self.reason.label(), from: self.from, to: self.to, earliest: self.earliest }
            .to_text()
    }
}

/// A read judged by the rule: the events to send, after the gap if any.
#[derive(Debug)]
pub struct Read {
    pub events: Vec<Stored>,
    pub gap: Option<Gap>,
    /// Nothing more is stored in the range read.
    pub done: bool,
}

/// A read whose proof met contradicting answers from the stream leader
/// ([`Span::Contradicted`]) is made again, read and proof, this many times,
/// this far apart; then it fails (a resume closes with 1011 and its client
/// comes back; a repair on the live path is retried, see
/// [`crate::hub`]). The leader that answered so was one elected a moment
/// before, still applying its log: this gives it a second to finish.
const CONTRADICTED_ATTEMPTS: u32 = 5;
const CONTRADICTED_BACKOFF: Duration = Duration::from_millis(200);

/// Reads up to `max` of the user's events after `after` and below `before`
/// with direct gets, and judges the read ([`prove`]).
pub async fn read(
    history: &History,
    user: &str,
    after: u64,
    before: Option<u64>,
    max: usize,
) -> Result<Read, StreamError> {
    let mut attempt = 1;
    loop {
        let (events, done) = history.collect(user, after + 1, before, max).await?;
        match prove(history, user, after, events, done).await {
            Err(StreamError::Inconsistent(e)) if attempt < CONTRADICTED_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "reading the user's events again");
                attempt += 1;
                tokio::time::sleep(CONTRADICTED_BACKOFF).await;
            }
            judged => return judged,
        }
    }
}

/// Judges a read of the user's events after `after`, made by any means that
/// returns every event stored in its range at the moment it passes it:
/// whole, or the gap, with the events inside it left out (the module doc
/// states the rule). Called after the read: the stored suffix only shrinks
/// from the old end, so if it still reaches back to `after`, the read saw
/// everything there was.
pub async fn prove(
    history: &History,
    user: &str,
    after: u64,
    mut events: Vec<Stored>,
    done: bool,
) -> Result<Read, StreamError> {
    let whole = |events| Ok(Read { events, gap: None, done });
    // Rule 1: one get by sequence of a message the read has just passed.
    if after > 0 && history.leader_subject_at(after).await?.is_some_and(|s| s == history.subject(user)) {
        return whole(events);
    }
    // Rule 2.
    let first = history.first(user).await?;
    if first.is_some_and(|f| f <= after + 1) {
        return whole(events);
    }
    // Rule 3: up to the user's oldest, or through the stream's end.
    let end = first.unwrap_or(u64::MAX);
    let from = match history.span(user, after + 1, end).await? {
        Span::Whole => return whole(events),
        Span::Broken(at) => at,
        Span::TooLong => after + 1,
        // The read may have been answered from the same wrong view: neither
        // it nor a gap can be trusted.
        Span::Contradicted(at) => {
            return Err(StreamError::Inconsistent(format!(
                "the stream leader gave {} as the user's oldest event but holds one at {at}",
                first.map_or("none".to_owned(), |f| f.to_string())
            )));
        }
    };
    let to = match first {
        Some(f) => f - 1,
        None => history.stream_last().await?.max(from),
    };
    events.retain(|e| e.seq > to);
    let gap = Gap { reason: GapReason::Expired, from: Some(from), to: Some(to), earliest: first };
    Ok(Read { events, gap: Some(gap), done })
}

/// Frames a replay hands its socket to write, in order.
pub struct Chunk {
    pub frames: Vec<Utf8Bytes>,
    /// How many of them are events.
    pub events: u64,
}

/// Why a replay stopped: the socket closes with 1011 and the client resumes
/// again.
pub type ResumeError = StreamError;

/// One socket's replay: the user's stored events after the client's
/// position up to the position the socket joined at (later events reach its
/// queue), in chunks, each proven whole or preceded by a gap frame.
///
/// Replays of one user's sockets on a node run one at a time (the guard on
/// the user's last replay is held throughout); one that starts from the
/// same position as the previous one is served from it (both tabs of a user
/// coming back after their node died), and only what arrived since is read.
pub struct Replay<'a> {
    hub: &'a Hub,
    user: &'a str,
    joined: Position,
    /// Where the reading began (0 after a stream reset).
    after: u64,
    /// How far this socket is.
    position: u64,
    gapped: bool,
    /// Frames to send before reading: a reset gap, a shared replay.
    first: Option<Chunk>,
    /// What this replay sent, for the user's next socket, while it is small.
    kept: Option<Vec<Utf8Bytes>>,
    shared: Option<tokio::sync::MutexGuard<'a, Option<SharedReplay>>>,
    short_reads: u32,
    /// Events among `kept`.
    kept_events: u64,
    finished: bool,
    /// A run of deltas that may continue in the next chunk
    /// ([`MAX_REPLAY_CARRY`]); written before the replay ends.
    carry: Option<Run>,
    /// The share of [`crate::hub::REPLAY_BYTES`] the last chunk handed out
    /// holds: released when the next chunk is asked for (the socket has
    /// written this one by then) or the replay is dropped.
    held: Option<SemaphorePermit<'a>>,
    /// Set for the tail of a position in the previous layout's stream
    /// ([`Replay::previous`]): read there, with direct gets.
    previous: Option<&'a History>,
}

impl<'a> Replay<'a> {
    /// Sets up the replay of a socket that resumes from `last_seq` of
    /// `client_epoch`; `epoch` is the stream's as this node knows it.
    pub async fn begin(
        hub: &'a Hub,
        membership: &'a Membership,
        last_seq: u64,
        client_epoch: Option<&str>,
        epoch: &str,
    ) -> Result<Replay<'a>, ResumeError> {
        let user = membership.user();
        let joined = membership.position;
        let part = hub.part(user);
        let history = part.history();
        // A position from another stream: the epoch says so, or the position
        // lies beyond anything this stream has stored.
        let mut reset = client_epoch.is_some_and(|e| !epoch.is_empty() && e != epoch);
        if !reset && last_seq > joined.seq() && last_seq > part.stream_last() {
            reset = last_seq > history.stream_last().await?;
        }
        let mut replay = Replay::new(hub, user, joined, last_seq, None);
        replay.gapped = reset;
        if reset {
            let earliest = history.first(user).await?;
            let gap = Gap { reason: GapReason::StreamReset, from: None, to: None, earliest };
            metrics::counter!(m::GAPS_SENT, "reason" => "stream_reset").increment(1);
            replay.first = Some(Chunk { frames: vec![gap.frame()], events: 0 });
            replay.after = 0;
            replay.position = 0;
            // Not kept for another socket: its frames lack the reset notice.
            replay.kept = None;
        } else if last_seq >= joined.seq() {
            // Nothing to read: every event of the user after the joined
            // position reaches the queue. (A horizon is the stream's last
            // sequence once the user's subscription took effect, so that
            // holds for it too: see `Hub::start_user`.)
            replay.finished = true;
            replay.kept = None;
            metrics::counter!(m::RESUMES, "outcome" => "complete").increment(1);
            return Ok(replay);
        }
        let shared = membership.replay.lock().await;
        if let Some(prev) = shared.as_ref().filter(|p| p.after == replay.after && !reset) {
            replay.gapped |= prev.gapped;
            replay.position = prev.through;
            replay.kept = None;
            metrics::counter!(m::SHARED_REPLAYS).increment(1);
            replay.first = Some(Chunk { frames: prev.frames.clone(), events: prev.events });
        }
        replay.shared = Some(shared);
        Ok(replay)
    }

    /// The replay of the user's events after `last_seq` in `history`, the
    /// previous layout's sealed stream (`--stream-previous`), up to its
    /// last event of the user, `last`: proven by the same rule as any
    /// replay, in that stream's sequences. Not shared with the user's other
    /// sockets, whose positions are in the current layout.
    pub fn previous(hub: &'a Hub, user: &'a str, history: &'a History, last_seq: u64, last: u64) -> Replay<'a> {
        let mut replay = Replay::new(hub, user, Position::Event(last), last_seq, Some(history));
        replay.finished = last_seq >= last;
        replay
    }

    /// A replay from `last_seq` up to `joined`, read from `previous` when
    /// given (not kept for other sockets then), else from the user's stream.
    fn new(hub: &'a Hub, user: &'a str, joined: Position, last_seq: u64, previous: Option<&'a History>) -> Replay<'a> {
        Replay {
            hub,
            user,
            joined,
            after: last_seq,
            position: last_seq,
            gapped: false,
            first: None,
            kept: previous.is_none().then(Vec::new),
            shared: None,
            short_reads: 0,
            kept_events: 0,
            finished: false,
            carry: None,
            held: None,
            previous,
        }
    }

    /// The next frames to write, or `None` when the socket has everything up
    /// to the position it joined at.
    ///
    /// The chunk's bytes count against [`crate::hub::REPLAY_BYTES`] from
    /// before its read until the next call or the replay's end: call this
    /// only once the previous chunk's frames are written or dropped.
    pub async fn next(&mut self) -> Result<Option<Chunk>, ResumeError> {
        self.held = None;
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        while !self.finished {
            let joined = self.joined.seq();
            if self.position >= joined {
                self.finish();
                break;
            }
            let max = read_count(REPLAY_CHUNK, self.hub.max_event_bytes());
            let (read, mut permit) = self.read(joined + 1, max).await?;
            let start = self.position;
            let carried = self.carry.as_ref().map_or(0, Run::count);
            let mut merger = Merger::continuing(self.carry.take());
            merger.out.reserve(read.events.len() + 1);
            let mut fed = 0;
            if let Some(gap) = read.gap {
                self.gapped = true;
                self.position = self.position.max(gap.to.unwrap_or(self.position));
                metrics::counter!(m::GAPS_SENT, "reason" => gap.reason.label()).increment(1);
                merger.other(gap.frame());
            }
            for ev in read.events {
                self.position = ev.seq;
                // Not forwardable payloads are skipped, not holes.
                if let Ok(f) = event_frame_timed(ev.seq, &ev.payload) {
                    merger.event(&EventFrame { seq: ev.seq, text: f.text, origin: None, delta: f.delta });
                    fed += 1;
                }
            }
            if read.done && self.position < joined {
                self.settle().await?;
            }
            // More to read: the run may go on in the next chunk.
            if self.position < joined && merger.pending_bytes() <= MAX_REPLAY_CARRY {
                self.carry = merger.take_run();
            }
            merger.flush();
            if merger.merged > 0 {
                metrics::counter!(m::MERGED_EVENTS, "path" => "replay").increment(merger.merged);
            }
            let events = carried + fed - self.carry.as_ref().map_or(0, Run::count);
            let chunk = Chunk { frames: merger.out, events };
            if let Some(k) = self.kept.as_mut() {
                let bytes = |frames: &[Utf8Bytes]| frames.iter().map(|f| f.len()).sum::<usize>();
                if bytes(k) + bytes(&chunk.frames) <= MAX_SHARED_REPLAY_BYTES {
                    k.extend(chunk.frames.iter().cloned());
                    self.kept_events += chunk.events;
                } else {
                    self.kept = None;
                }
            }
            if self.position > start {
                self.short_reads = 0;
            }
            if !chunk.frames.is_empty() {
                // Only what the frames take stays held while they are written.
                let used: usize = chunk.frames.iter().map(|f| f.len()).sum();
                drop(permit.split(permit.num_permits().saturating_sub(used)));
                self.held = Some(permit);
                return Ok(Some(chunk));
            }
        }
        Ok(None)
    }

    /// The position the socket reached: queued items at or below it are
    /// not sent again.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// A read that found nothing more below the joined position, although
    /// the position is above this socket's. Whether that is the truth is
    /// asked of the stream leader (a direct get may have been answered by a
    /// replica behind it): for a joined [`Position::Event`] it is not, since
    /// that event is the user's; for a horizon or gap end, it is when the
    /// leader holds no event of the user up to it. A short read is tried
    /// again, and after [`SHORT_READ_ATTEMPTS`] the replay fails.
    async fn settle(&mut self) -> Result<(), ResumeError> {
        let joined = self.joined.seq();
        let missing = match self.joined {
            Position::Event(_) => Some(joined),
            Position::Horizon(_) | Position::GapEnd(_) => {
                let history = self.previous.unwrap_or_else(|| self.hub.part(self.user).history());
                history.leader_next(self.user, self.position + 1).await?.filter(|&s| s <= joined)
            }
        };
        let Some(missing) = missing else {
            self.position = joined;
            return Ok(());
        };
        self.short_reads += 1;
        if self.short_reads >= SHORT_READ_ATTEMPTS {
            return Err(StreamError::Nats(format!(
                "history read ended at {}, before event {missing} (a replica behind the leader?)",
                self.position
            )));
        }
        tokio::time::sleep(SHORT_READ_BACKOFF).await;
        Ok(())
    }

    fn finish(&mut self) {
        self.finished = true;
        if let (Some(frames), Some(shared)) = (self.kept.take(), self.shared.as_mut()) {
            let (after, through, events, gapped) = (self.after, self.position, self.kept_events, self.gapped);
            **shared = Some(SharedReplay { after, through, frames, events, gapped });
        }
        self.shared = None;
        metrics::counter!(m::RESUMES, "outcome" => if self.gapped { "gap" } else { "complete" }).increment(1);
    }

    async fn read(&self, before: u64, max: usize) -> Result<(Read, SemaphorePermit<'a>), StreamError> {
        let Some(history) = self.previous else {
            return read_for_resume(self.hub, self.user, self.position, before, max).await;
        };
        let _slot = acquire(self.hub.resume_slots()).await;
        let read = read(history, self.user, self.position, Some(before), max).await?;
        let permit = hold(self.hub, &read).await;
        Ok((read, permit))
    }
}

/// Reads up to `max` of the user's events after `after` and below `before`
/// for a resume, and judges the read. While a resume-read slot is free this
/// is direct gets, the cheapest way for one resume. When every slot is busy
/// (a storm: many sockets came back at once) or a shared scan is already
/// gathering, a recent range joins the scan instead ([`crate::scan`]); if
/// the scan fails, direct gets.
///
/// Returns with the read its share of [`crate::hub::REPLAY_BYTES`]: as
/// much as the read's frames may take (each event's payload plus
/// [`FRAME_OVERHEAD`], and a gap frame), taken once the read is proven and
/// while its resume-read slot is still held. So a replay that waits for the
/// budget holds a slot, and what waiting reads hold stays within the slots
/// ([`crate::hub::RESUME_READ_CONCURRENCY`] reads of at most
/// [`crate::hub::READ_BYTES`]) and the scan's rounds held
/// ([`crate::scan::MAX_SCAN_ROUNDS_HELD`]); a
/// storm of small resumes takes only what its events take.
pub async fn read_for_resume<'h>(
    hub: &'h Hub,
    user: &str,
    after: u64,
    before: u64,
    max: usize,
) -> Result<(Read, SemaphorePermit<'h>), StreamError> {
    let part = hub.part(user);
    let history = part.history();
    let mut slot = hub.resume_slots().try_acquire().ok();
    if part.scanner().busy() {
        slot = None;
    }
    // Only ranges near the stream's end: a round reads from its oldest
    // request to the end, so one old position would make every request of
    // the round wait for a long read.
    let near_end = after.saturating_add(1 + MAX_SCAN_SPAN) >= part.stream_last().max(before.saturating_sub(1));
    if slot.is_none() && near_end {
        match part.scanner().read(history.subject(user), after, before, max).await {
            Ok(found) => {
                let _slot = acquire(hub.resume_slots()).await;
                let round = found.round;
                match prove(history, user, after, found.events, found.done).await {
                    Ok(read) => {
                        let permit = hold(hub, &read).await;
                        drop(round);
                        return Ok((read, permit));
                    }
                    // Read again below, with direct gets, until the answers agree.
                    Err(StreamError::Inconsistent(e)) => tracing::debug!(error = %e, "reading the user's events again"),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => tracing::debug!(error = %e, "shared scan failed; reading with direct gets"),
        }
    }
    let _slot = match slot {
        Some(slot) => slot,
        None => acquire(hub.resume_slots()).await,
    };
    let read = read(history, user, after, Some(before), max).await?;
    let permit = hold(hub, &read).await;
    Ok((read, permit))
}

/// Bytes a gap frame takes at most (both bounds and the earliest event).
const GAP_FRAME_BYTES: usize = 128;

/// Waits for as much of the node's replay bytes as the frames of `read`
/// may take.
async fn hold<'h>(hub: &'h Hub, read: &Read) -> SemaphorePermit<'h> {
    let events: usize = read.events.iter().map(|e| e.payload.len() + FRAME_OVERHEAD).sum();
    let bytes = (events + read.gap.map_or(0, |_| GAP_FRAME_BYTES)).min(REPLAY_BYTES);
    let n = u32::try_from(bytes).unwrap_or(u32::MAX);
    hub.replay_bytes().acquire_many(n).await.expect("the replay byte budget is never closed")
}

/// Waits for a slot of a semaphore that is never closed.
pub async fn acquire(slots: &tokio::sync::Semaphore) -> tokio::sync::SemaphorePermit<'_> {
    slots.acquire().await.expect("read slots are never closed")
}

/// Counts and logs a replay that failed.
pub fn failed(e: &ResumeError) {
    tracing::warn!(error = %e, "reading history for a resume failed");
    m::jetstream_error("resume");
    metrics::counter!(m::RESUMES, "outcome" => "failed").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_name_their_sequence() {
        assert_eq!(Position::Event(7).seq(), 7);
        assert_eq!(Position::Horizon(0).seq(), 0);
        assert_eq!(Position::GapEnd(9).seq(), 9);
    }

    #[test]
    fn gap_frames_leave_out_unknown_bounds() {
        let g = Gap { reason: GapReason::StreamReset, from: None, to: None, earliest: Some(3) };
        assert_eq!(g.frame().as_str(), r#"{"type":"gap","reason":"stream_reset","earliest":3}"#);
        let g = Gap { reason: GapReason::Expired, from: Some(4), to: Some(9), earliest: None };
        assert_eq!(g.frame().as_str(), r#"{"type":"gap","reason":"expired","from":4,"to":9}"#);
    }
}
