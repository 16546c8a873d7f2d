//! Shared tail scans: one sequential read of the stream serving many resumes.
//!
//! A direct get of a user's next event makes the server step over every
//! other user's event stored between two of that user's (see
//! docs/durability.md): about 0.5 ms each with 10,000 users writing in turn.
//! That is cheap for one resume and ruinous for a storm, when a node that
//! died sends thousands of sockets back at once, each missing the same recent
//! stretch of the stream: 10,000 resumes of 20 events are 200,000 such gets.
//! Reading that stretch once, in order, with an ordered consumer costs about
//! as much as 1,000 of them (200,000 messages in about 0.5 s here).
//!
//! So when a node's history-read slots are all busy (the sign of a storm),
//! a resume asks the [`Scanner`] instead. Requests that arrive together form
//! a round; the round reads every stored message from the oldest position any
//! of them needs to the newest, and hands each request its user's events.
//! The continuity proof is the same as for direct gets and runs afterwards
//! ([`crate::history::History::prove`]): what is stored for a user is a
//! suffix of the user's history, so if an event of the user at or before the
//! request's position is still stored after the scan, the scan, which reads
//! every stored message in its range in order, missed none of the user's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use crate::history::Stored;
use crate::metrics as m;
use crate::stream::StreamError;

/// How far behind the stream's end a request may start to join a scan. A
/// round reads from its oldest request to the end, so this bounds a round
/// to about this many messages plus what arrives meanwhile: at about
/// 400,000 messages/s (measured here) about 0.6 s of reading, the cost of
/// about 1,200 scanning direct gets. A request further behind waits for a
/// history-read slot instead.
pub const MAX_SCAN_SPAN: u64 = 256 * 1024;

/// Requests served by one round; later ones wait for the next round.
pub const MAX_SCAN_REQUESTS: usize = 2048;

/// Payload bytes one round collects for all its requests together: 2,048
/// storm resumes of 20 events of 300 bytes take 12 MiB. A request whose
/// first event would pass it gets an error and reads with direct gets
/// instead (bounded by the history-read slots); one that has events gets
/// what fits, marked not done.
pub const MAX_SCAN_ROUND_BYTES: usize = 64 * 1024 * 1024;

/// Payload bytes one request collects in a round, beyond its first event. A
/// user with more to read gets what fits, marked not done, and reads the
/// rest next (a storm resume of 20 events of 300 bytes needs 6 KB).
pub const MAX_SCAN_BYTES_PER_REQUEST: usize = 32 * 1024;

/// Rounds whose results may be held at once. A request's events wait,
/// after its round, for a history-read slot (to be proven) and then for the
/// node's replay bytes ([`crate::hub::REPLAY_BYTES`]); until every request
/// of a round has passed that point, the round's permit is held and the next
/// round but one does not start. So what scans hold beyond the replay
/// budget is at most this many rounds of [`MAX_SCAN_ROUND_BYTES`]; later
/// requests wait in the queue, which holds only their positions. Two, so one round reads while the last one's
/// results drain.
pub const MAX_SCAN_ROUNDS_HELD: usize = 2;

/// How long a round waits after its first request for others to join: a
/// storm's resumes arrive over seconds, and a round costs the same for one
/// request as for two thousand.
const ROUND_GATHER: Duration = Duration::from_millis(20);

/// A round that receives no message for this long has stalled: it fails
/// its requests, which fall back to direct gets. Messages arrive every few
/// microseconds while a scan runs.
const SCAN_STALL: Duration = Duration::from_secs(3);

/// A round that has not finished after this fails the same way. At the rate
/// above, a round of [`MAX_SCAN_SPAN`] takes under 1 s.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

/// What a round found for one request: the user's events in order, and
/// whether the whole range was read (false when the request's cap was hit).
#[derive(Debug)]
pub struct Found {
    pub events: Vec<Stored>,
    pub done: bool,
    /// The round's share of [`MAX_SCAN_ROUNDS_HELD`]: drop it once the
    /// events are counted in the replay bytes (or dropped).
    pub round: Arc<OwnedSemaphorePermit>,
}

struct Request {
    subject: String,
    after: u64,
    before: u64,
    max: usize,
    reply: oneshot::Sender<Result<Found, StreamError>>,
}

/// Collects requests into rounds and runs them one at a time.
pub struct Scanner {
    stream: Stream<()>,
    pending: Mutex<Vec<Request>>,
    wake: Notify,
    /// [`MAX_SCAN_ROUNDS_HELD`] permits.
    held: Arc<Semaphore>,
}

impl Scanner {
    pub fn new(stream: Stream<()>) -> Self {
        let held = Arc::new(Semaphore::new(MAX_SCAN_ROUNDS_HELD));
        Self { stream, pending: Mutex::default(), wake: Notify::new(), held }
    }

    /// Whether requests are waiting for a round (new resumes join them).
    pub fn busy(&self) -> bool {
        !lock(&self.pending).is_empty()
    }

    /// The events of `subject` after `after` and below `before`, at most
    /// `max` of them, read by the next round. Not proven complete: the caller
    /// proves it.
    pub async fn read(&self, subject: String, after: u64, before: u64, max: usize) -> Result<Found, StreamError> {
        let (reply, rx) = oneshot::channel();
        lock(&self.pending).push(Request { subject, after, before, max, reply });
        self.wake.notify_one();
        // Bounded even if the scanner's task were gone: the caller then reads
        // with direct gets.
        match tokio::time::timeout(ROUND_TIMEOUT + ROUND_TIMEOUT, rx).await {
            Ok(Ok(found)) => found,
            Ok(Err(_)) => Err(StreamError::Nats("history scan stopped".into())),
            Err(_) => Err(StreamError::Nats("no history scan answered in time".into())),
        }
    }

    /// Runs rounds until `stop`.
    pub async fn run(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            tokio::time::sleep(ROUND_GATHER).await;
            loop {
                // Requests keep gathering while earlier rounds' results drain.
                let permit = tokio::select! {
                    _ = stop.cancelled() => return,
                    p = self.held.clone().acquire_owned() => Arc::new(p.expect("the scanner's semaphore is never closed")),
                };
                let round: Vec<Request> = {
                    let mut pending = lock(&self.pending);
                    let n = pending.len().min(MAX_SCAN_REQUESTS);
                    pending.drain(..n).collect()
                };
                if round.is_empty() {
                    break;
                }
                self.round(round, permit).await;
            }
        }
    }

    async fn round(&self, round: Vec<Request>, permit: Arc<OwnedSemaphorePermit>) {
        let from = round.iter().map(|r| r.after + 1).min().unwrap_or(1);
        let to = round.iter().map(|r| r.before.saturating_sub(1)).max().unwrap_or(0);
        let mut by_subject: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, r) in round.iter().enumerate() {
            by_subject.entry(r.subject.as_str()).or_default().push(i);
        }
        let mut found: Vec<Collect> = round.iter().map(|_| Collect::default()).collect();
        let mut budget = MAX_SCAN_ROUND_BYTES;
        let read =
            tokio::time::timeout(ROUND_TIMEOUT, self.scan(from, to, &round, &by_subject, &mut found, &mut budget))
                .await;
        let outcome = match read {
            Ok(Ok(reached)) => Ok(reached),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StreamError::Nats(format!("history scan of {from}..={to} timed out"))),
        };
        metrics::counter!(m::HISTORY_SCANS, "outcome" => if outcome.is_ok() { "ok" } else { "failed" }).increment(1);
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, requests = round.len(), "history scan failed; its resumes read with direct gets");
        }
        for (r, c) in round.into_iter().zip(found) {
            let result = match &outcome {
                // Done when the scan passed the end of the range (or the
                // stream's end) without the request reaching its cap.
                Ok(_) if c.events.is_empty() && c.capped => Err(StreamError::Nats(format!(
                    "history scan of {from}..={to}: its {MAX_SCAN_ROUND_BYTES} bytes were taken by other resumes"
                ))),
                Ok(reached) => {
                    let done = !c.capped && *reached >= r.before.saturating_sub(1);
                    Ok(Found { done, events: c.events, round: permit.clone() })
                }
                Err(e) => Err(e.clone()),
            };
            let _ = r.reply.send(result);
        }
    }

    /// Reads every stored message from `from` through `to` (or the stream's
    /// end) and gives each request its user's events. Returns the sequence
    /// the read reached: `to`, or `u64::MAX` when it found the stream's end.
    async fn scan(
        &self,
        from: u64,
        to: u64,
        round: &[Request],
        by_subject: &HashMap<&str, Vec<usize>>,
        found: &mut [Collect],
        budget: &mut usize,
    ) -> Result<u64, StreamError> {
        let err = |e: &dyn std::fmt::Display| StreamError::Nats(format!("history scan from {from}: {e}"));
        let consumer = self
            .stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
                ..Default::default()
            })
            .await
            .map_err(|e| err(&e))?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(u64::MAX);
        }
        let mut messages = consumer.messages().await.map_err(|e| err(&e))?;
        let mut read = 0u64;
        let reached = loop {
            let msg = match tokio::time::timeout(SCAN_STALL, messages.next()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => return Err(StreamError::Nats(format!("history scan from {from} ended early"))),
                Err(_) => {
                    return Err(StreamError::Nats(format!("history scan from {from} stalled after {read} messages")));
                }
            };
            let msg = msg.map_err(|e| err(&e))?;
            let info = msg.info().map_err(|e| err(&e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            read += 1;
            if let Some(idx) = by_subject.get(msg.subject.as_str()) {
                for &i in idx {
                    let r = &round[i];
                    if seq > r.after && seq < r.before {
                        found[i].push(seq, &msg.payload, r.max, budget);
                    }
                }
            }
            if seq >= to {
                break seq;
            }
            if pending == 0 {
                break u64::MAX;
            }
        };
        metrics::counter!(m::HISTORY_SCAN_MESSAGES).increment(read);
        Ok(reached)
    }
}

#[derive(Default)]
struct Collect {
    events: Vec<Stored>,
    bytes: usize,
    capped: bool,
}

impl Collect {
    /// Takes the event unless the request or the round (`budget`, what is
    /// left of [`MAX_SCAN_ROUND_BYTES`]) is full. A request's first event is
    /// taken however large (up to the stream's event size limit) while the
    /// round has room for it, so every round moves a request forward.
    fn push(&mut self, seq: u64, payload: &Bytes, max: usize, budget: &mut usize) {
        if self.capped {
            return;
        }
        let full = self.events.len() >= max
            || (!self.events.is_empty() && self.bytes + payload.len() > MAX_SCAN_BYTES_PER_REQUEST)
            || payload.len() > *budget;
        if full {
            self.capped = true;
            return;
        }
        self.bytes += payload.len();
        *budget -= payload.len();
        // A copy: the received payload shares a read buffer with its
        // neighbours, which a kept slice would keep alive.
        self.events.push(Stored { seq, payload: Bytes::copy_from_slice(payload) });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections only push and drain: a panic leaves the list whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_budget_caps_requests_and_one_without_room_for_its_first_event_gets_none() {
        let payload = |n: usize| Bytes::from(vec![b'x'; n]);
        let mut budget = 100;
        let (mut a, mut b) = (Collect::default(), Collect::default());
        a.push(1, &payload(60), 64, &mut budget);
        b.push(2, &payload(60), 64, &mut budget);
        a.push(3, &payload(30), 64, &mut budget);
        a.push(4, &payload(30), 64, &mut budget);
        assert_eq!(a.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 3]);
        assert!(a.capped, "the round had 10 bytes left for event 4");
        // b's first event did not fit: no events, capped, so its round
        // answers it with an error and it reads with direct gets.
        assert!(b.events.is_empty() && b.capped);
        assert_eq!(budget, 10);
        // A capped request takes nothing more, even what would fit.
        b.push(5, &payload(1), 64, &mut budget);
        assert!(b.events.is_empty());
    }

    #[test]
    fn a_request_takes_one_large_first_event_then_stops_at_its_own_cap() {
        let mut budget = MAX_SCAN_ROUND_BYTES;
        let mut c = Collect::default();
        c.push(1, &Bytes::from(vec![0; 2 * MAX_SCAN_BYTES_PER_REQUEST]), 64, &mut budget);
        c.push(2, &Bytes::from_static(b"{}"), 64, &mut budget);
        assert_eq!(c.events.len(), 1);
        assert!(c.capped);
    }
}
