//! Per-user interest, continuity and fan-out.
//!
//! The hub holds one entry per user with at least one socket on this node.
//! The first socket of a user subscribes to the user's live subject; the last
//! one to leave unsubscribes, so a node's NATS interest is exactly the users
//! it serves.
//!
//! The user's events are kept continuous: every republished event carries
//! `Nats-Last-Sequence`, the previous sequence of the same user. While it
//! is the user's position here, the live connection's task delivers the
//! event as it reads it ([`crate::live::Inbox`]). When it is not (a message
//! lost while NATS reconnected, dropped from a full queue, or a republish
//! lost on a route), the message goes to the user's own task, which reads
//! the missing events from JetStream and delivers them first
//! ([`crate::resume::read`]); what comes meanwhile waits for it, in order.
//!
//! A republish lost with nothing after it (the last event of a run) shows no
//! hole. So an audit checks the users here that are quiet against the
//! stream's newest event of the user ([`AUDIT_INTERVAL`]), and runs
//! at once after a NATS reconnect: a stored event reaches its user's sockets
//! within two intervals and a read even when no later event comes and no
//! connection event fires. A user whose subscription was not yet known to the server that
//! stored an event (interest crosses a cluster asynchronously) is made whole
//! the same way. When a hole cannot be filled, a gap notice is queued in its
//! place.
//!
//! Delivery builds each event frame once (and finds once whether it is a
//! delta event, [`crate::merge`]) and hands a reference-counted copy to
//! every socket's queue: a socket whose queue, after merging, holds more
//! than its bytes (`--socket-queue-bytes`, [`Kicker::charge`]) is closed as
//! slow ([`crate::protocol::close::SLOW`]) and resumes; nobody waits.
//!
//! # Memory
//!
//! What a node holds for events is bounded in bytes, each bound from a flag
//! or a constant here (docs/operations.md adds them up):
//! - per socket, its queued frames and the batch it is writing
//!   (`--socket-queue-bytes`);
//! - per user, its NATS subscription (`--nats-subscription-bytes`);
//! - live reads: [`LIVE_READ_CONCURRENCY`] reads of at most [`READ_BYTES`]
//!   each, held from the request until their frames are queued;
//! - resume replays: reads within their slots ([`RESUME_READ_CONCURRENCY`]
//!   of at most [`READ_BYTES`]) or a shared scan's round ([`crate::scan`]),
//!   then [`REPLAY_BYTES`] for every replay's chunk together until its
//!   frames are written or dropped.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, OnceCell, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::StreamSettings;
use crate::history::{Batched, History, NEWEST_BATCH, Stored};
use crate::metrics as m;
use crate::protocol::{Delta, MAX_SEQ, event_frame_timed};
use crate::resume::{Gap, GapReason, Position, acquire};
use crate::scan::Scanner;
use crate::stream::StreamError;
use crate::user::UserId;

/// Distinct publisher subjects remembered for "log once per subject" of bad
/// payloads. Past this, further subjects are still counted in the metric but
/// logged only once more, as a group, so a flood cannot grow memory.
pub const MAX_LOGGED_BAD_SUBJECTS: usize = 10_000;

/// History reads for resumes under way at once on a node (one chunk each).
/// A storm of resumes after a node dies would otherwise send NATS more
/// requests than it answers within their timeout, failing all of them (seen
/// in benches/resume.rs before this bound); queued here, they wait instead.
/// These slots bound requests, not memory: a slot is released once its read
/// is answered, before the frames are written. [`REPLAY_BYTES`] bounds the
/// memory.
pub const RESUME_READ_CONCURRENCY: usize = 32;

/// Reads for live delivery under way at once: hole repairs, the audit's
/// repairs, and first positions of users. Apart from the resumes' slots, so
/// a storm of resumes never holds back live delivery (a user task waiting
/// for a slot does not drain its subscription, which then drops messages).
/// A live read's slot is held until its events are queued to the sockets
/// (where their bytes count against each socket's budget), so live reads
/// hold at most this many times [`READ_BYTES`].
pub const LIVE_READ_CONCURRENCY: usize = 32;

/// Bytes of events one history read may return: a read asks for at most
/// this many bytes of events of the largest size (`--max-event-bytes`), and
/// never more than its count ([`READ_CHUNK`], [`crate::resume::REPLAY_CHUNK`]).
/// 8 MiB keep the counts whole for events up to 128 KiB and give 32 events
/// of the default largest size (256 KiB, a storm resume of 20 in one read),
/// 8 of the largest allowed (1 MiB).
pub const READ_BYTES: usize = 8 * 1024 * 1024;

/// Bytes the chunks of every resume replay may hold together, from the end
/// of their read until their frames are written or dropped: one read's
/// worth ([`READ_BYTES`]) per resume-read slot. A replay takes its share
/// when its read is proven, still holding its read slot
/// ([`crate::resume::read_for_resume`]), and keeps what its frames take
/// while the client takes them; a replay that finds the budget taken waits,
/// and with it its slot. A client that reads a large replay slowly holds
/// its chunk's bytes until written or [`crate::socket::WRITE_TIMEOUT`].
pub const REPLAY_BYTES: usize = RESUME_READ_CONCURRENCY * READ_BYTES;

/// Bytes a frame adds to its event: `{"type":"event","seq":N,"event":...}`.
pub const FRAME_OVERHEAD: usize = 64;

/// What a gap item is counted as in a socket's byte budget: its frame, with
/// both bounds and the earliest event, is under 120 bytes.
const GAP_BYTES: usize = 128;

/// How often the audit checks every user here against the stream leader's
/// newest event of the user ([`Hub::audit`]): the bound, with one read, on
/// how late a stored event whose republish was lost reaches its sockets.
/// Users are checked only when the stream has stored anything since their
/// last check, so an idle stream costs one request per interval.
pub const AUDIT_INTERVAL: Duration = Duration::from_secs(2);

/// Leader requests the audit makes per second at most, one user each (before
/// nats-server 2.11). Each costs the leader about 77 us of CPU for a user
/// with a stored event (measured here on 2.9.10 with 50,000 users:
/// `cargo bench --bench audit`), so this caps a node's audit at about 0.4 of
/// a core of the leader. With more quiet users than this times
/// [`AUDIT_INTERVAL`], a sweep takes longer than the interval: 50,000 quiet
/// users on a busy stream are each checked every 10 s.
pub const AUDIT_RATE: usize = 5_000;

/// The audit's requests go out in steps of this length, [`AUDIT_RATE`] per
/// second spread over them, all of a step's at once.
const AUDIT_STEP: Duration = Duration::from_millis(10);

/// Users the audit checks per second at most with batched reads
/// ([`History::newest_many`], nats-server 2.11+). Each user costs the server
/// that answers about 12 us of CPU (measured here on 2.15.1 with 50,000
/// users, each with a stored event: `cargo bench --bench audit`), so this
/// caps a node's audit at about 0.3 of a core, in about 100 requests a
/// second: 50,000 quiet users are each checked every interval.
pub const AUDIT_BATCHED_RATE: usize = 25_000;

/// One batched read per step of this length, [`AUDIT_BATCHED_RATE`] users a
/// second.
const AUDIT_BATCH_STEP: Duration = Duration::from_micros((NEWEST_BATCH as u64) * 1_000_000 / AUDIT_BATCHED_RATE as u64);

/// `UserEntry::seen` of a user the audit has not looked at yet.
const NOT_AUDITED: u64 = u64::MAX;

/// Bytes of one replay kept for the user's other sockets that resume from
/// the same position (two tabs of a user coming back after a node died):
/// they are served from memory instead of reading JetStream again. A storm
/// resume of 20 events of 300 bytes needs 6 KB; a longer replay is not kept.
/// It lives as long as the user has sockets on the node, so the bound is per
/// user: 10k users hold at most 160 MiB, typically a few KB each.
pub const MAX_SHARED_REPLAY_BYTES: usize = 16 * 1024;

/// Attempts to read a hole from JetStream before announcing it as a gap.
const REPAIR_ATTEMPTS: u32 = 3;
/// Pause between those attempts.
const REPAIR_BACKOFF: Duration = Duration::from_millis(200);
/// Events read from JetStream per repair round before they are
/// delivered, fewer when they may be large ([`READ_BYTES`]).
const READ_CHUNK: usize = 32;

/// How many events a read may ask for: `count`, or fewer so that events of
/// `max_event_bytes` fill at most [`READ_BYTES`]; at least one.
pub fn read_count(count: usize, max_event_bytes: usize) -> usize {
    (READ_BYTES / (max_event_bytes + FRAME_OVERHEAD)).clamp(1, count)
}

/// One event, ready to write: the stream sequence and the frame text shared
/// by every socket of the user, and when it was stored or published (for
/// the delivery latency metric), found once here rather than per socket.
#[derive(Debug, Clone)]
pub struct EventFrame {
    pub seq: u64,
    pub text: Utf8Bytes,
    pub origin: Option<m::Origin>,
    /// Where its delta fields lie in `text`, when it is a delta event
    /// ([`crate::merge`]): found once here, not per socket.
    pub delta: Option<Delta>,
}

/// What a socket's queue carries, in the user's order.
#[derive(Debug, Clone)]
pub enum Item {
    Event(EventFrame),
    /// Events up to `to` (or up to the next event) may be missing.
    Gap(Gap),
    /// The answer to one of this socket's control requests
    /// ([`crate::control`]): queued by the socket's own requests, never
    /// fanned out, and outside the user's sequence.
    Control(Utf8Bytes),
}

impl Item {
    /// What the item counts in a socket's byte budget: its frame's length.
    pub fn bytes(&self) -> usize {
        match self {
            Item::Event(f) => f.text.len(),
            Item::Gap(_) => GAP_BYTES,
            Item::Control(text) => text.len(),
        }
    }
}

/// An item as queued: built once, shared by every socket of the user.
///
/// A pointer per queue slot: tokio's bounded channel allocates its first
/// block of 32 slots when the channel is made, and with the item inline
/// (72 bytes) that block cost every idle socket 2.3 KB. Fan-out also only
/// bumps a count per socket instead of copying the item.
pub type Queued = Arc<Item>;

/// Why the hub or the server asks a socket to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kick {
    /// Its queue overflowed.
    Slow = 1,
    /// The node is draining.
    Drain = 2,
    /// The stream was recreated; positions from before mean nothing now.
    StreamReset = 3,
}

/// What the hub and the server share with one socket: its close request
/// (the first reason set wins) and the bytes of its queued frames.
///
/// One waiter, the socket's own task, so an `AtomicWaker`: a `Notify`
/// locks its list of waiters to register and again to drop a waiter, and
/// the socket registers once per batch (2% of the node's CPU under
/// `--preset chat`); a `CancellationToken` adds a tree node per socket
/// (112 bytes). The byte count lives here too rather than in an
/// allocation of its own.
#[derive(Debug, Default)]
pub struct Kicker {
    waker: futures_util::task::AtomicWaker,
    reason: AtomicU8,
    /// Bytes of the frames queued for the socket and of the batch it is
    /// writing: added by fan-out, taken off by the socket once a batch is
    /// written or dropped.
    queued: AtomicUsize,
}

impl Kicker {
    /// Counts `bytes` more queued unless that takes the socket past
    /// `budget` bytes; an item is always taken into an empty queue, so one
    /// frame larger than the budget still goes out. `false`: over budget,
    /// nothing counted (the caller closes the socket as slow).
    ///
    /// One atomic add on the socket's own counter per delivery: no lock,
    /// and only the socket's own task touches the same cache line.
    pub fn charge(&self, bytes: usize, budget: usize) -> bool {
        let before = self.queued.fetch_add(bytes, Ordering::Relaxed);
        if before > 0 && before.saturating_add(bytes) > budget {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Takes `bytes` off the count: their frames were written or dropped.
    pub fn release(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Asks the socket to close; `true` when this is the first reason set.
    pub fn kick(&self, why: Kick) -> bool {
        let first = self.reason.compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if first {
            self.waker.wake();
        }
        first
    }

    /// Closes the socket as slow, counting the `bound` its queue reached.
    pub fn overflowed(&self, bound: &'static str) {
        if self.kick(Kick::Slow) {
            metrics::counter!(m::SLOW_SOCKETS, "bound" => bound).increment(1);
        }
    }

    /// Resolves once the socket is asked to close. Awaited by the socket's
    /// own task only (one waiter at a time).
    pub fn kicked(&self) -> impl Future<Output = Kick> + '_ {
        wait_for(&self.waker, || self.reason())
    }

    fn reason(&self) -> Option<Kick> {
        match self.reason.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Kick::Slow),
            2 => Some(Kick::Drain),
            _ => Some(Kick::StreamReset),
        }
    }
}

struct SocketTx {
    tx: mpsc::UnboundedSender<Queued>,
    kicker: Arc<Kicker>,
    /// Bytes the socket may have queued (`--socket-queue-bytes`).
    budget: usize,
}

/// Guarded together so that a joining socket reads the position atomically
/// with respect to deliveries: everything after the position it reads reaches its
/// queue.
struct Shared {
    /// By connection id, so a socket leaves in O(1): a user with thousands
    /// of sockets (with `--max-sockets-per-user 0`) closing them one by one
    /// would otherwise scan its list for each, holding the users' lock.
    sockets: HashMap<u64, SocketTx>,
    /// How far the user's history is accounted for on this node: live
    /// delivery continues after it, and a joining socket starts from it.
    position: Position,
}

/// A replay done for one socket, kept for the user's others.
#[derive(Debug, Default)]
pub struct SharedReplay {
    /// The position the replay started after.
    pub after: u64,
    /// The position it reached: the range (`after`, `through`] was proven
    /// complete or announced, and `frames` is exactly what was sent for it.
    pub through: u64,
    pub frames: Vec<Utf8Bytes>,
    /// How many of `frames` are events.
    pub events: u64,
    pub gapped: bool,
}

struct UserEntry {
    user: UserId,
    /// The partition that stores the user's events ([`Hub::part`]).
    part: u32,
    shared: Mutex<Shared>,
    /// Serialises the replays of this user's sockets and keeps the last one.
    replay: Arc<tokio::sync::Mutex<Option<SharedReplay>>>,
    /// Set once the live subscription exists and the position is
    /// initialised; later sockets wait on it.
    ready: OnceCell<()>,
    /// Stops the user's task, or wakes it to read what the audit found.
    signal: UserSignal,
    /// The stream's last sequence when the audit last asked for this user's
    /// newest event: every event of the user up to it was then known.
    audited: AtomicU64,
    /// The user's newest event as the audit found it, when beyond the
    /// position; the user's task reads up to it when woken.
    behind: AtomicU64,
    /// The position when the audit last looked ([`NOT_AUDITED`] before).
    seen: AtomicU64,
}

/// What a user's task is told besides its events: stop (its last socket
/// left, or the stream was reset), or read up to what the audit found.
///
/// Its one waiter is the user's task, which polls it before every event: an
/// `AtomicWaker` and two flags cost a few atomics there, where a
/// `CancellationToken` and a `Notify` each took a lock per event.
#[derive(Debug, Default)]
struct UserSignal {
    waker: futures_util::task::AtomicWaker,
    stopped: AtomicBool,
    /// Set by the audit, taken by the task: a wake before the task waits
    /// is kept, as `Notify::notify_one` keeps a permit.
    woken: AtomicBool,
}

/// What [`UserSignal::next`] reports.
enum Signalled {
    Stop,
    Wake,
}

impl UserSignal {
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// The next signal: a stop first, then a wake.
    fn next(&self) -> impl Future<Output = Signalled> + '_ {
        wait_for(&self.waker, || {
            if self.is_stopped() {
                Some(Signalled::Stop)
            } else if self.woken.swap(false, Ordering::AcqRel) {
                Some(Signalled::Wake)
            } else {
                None
            }
        })
    }
}

/// The wait of a signal with one waiter ([`Kicker`], [`UserSignal`]):
/// resolves with what `check` finds, registering the waiter's waker
/// between two looks, so a signal set in between still wakes it.
fn wait_for<'a, T>(
    waker: &'a futures_util::task::AtomicWaker,
    mut check: impl FnMut() -> Option<T> + 'a,
) -> impl Future<Output = T> + 'a {
    std::future::poll_fn(move |cx| {
        if let Some(v) = check() {
            return std::task::Poll::Ready(v);
        }
        waker.register(cx.waker());
        check().map_or(std::task::Poll::Pending, std::task::Poll::Ready)
    })
}

pub struct Hub {
    /// The users' live subscriptions.
    live: crate::live::Live,
    settings: StreamSettings,
    /// One per stream (`--stream-partitions`), in partition order.
    parts: Box<[Part]>,
    /// The previous layout's streams (`--stream-previous`), in partition order.
    previous: Box<[Previous]>,
    users: Mutex<HashMap<UserId, Arc<UserEntry>>>,
    bad_subjects: Mutex<HashSet<String>>,
    /// Starts an audit now (after a NATS reconnect).
    audit_now: Arc<Notify>,
    /// Set when a server answered that it does not know batched reads
    /// ([`crate::history::Batched::Unsupported`]): the audit then asks per
    /// user. Cleared at a reconnect, which may reach an upgraded server.
    unbatched: AtomicBool,
    resume_slots: Semaphore,
    live_slots: Semaphore,
    /// [`REPLAY_BYTES`], one permit a byte.
    replay_bytes: Semaphore,
    /// Stops the scanners' and the audit's tasks when the hub is dropped.
    stop_tasks: CancellationToken,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop_tasks.cancel();
    }
}

/// One of the streams the users are partitioned over (the only one without
/// partitions): its reads, its shared scans, and what the node last learned
/// of it. Positions, epochs and the resume rule are per stream: each user's
/// events are all in one ([`Hub::part`]).
pub struct Part {
    /// The stream's name.
    name: String,
    history: History,
    scanner: Arc<Scanner>,
    state: Mutex<StreamState>,
}

impl Part {
    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn scanner(&self) -> &Scanner {
        &self.scanner
    }

    /// The stream's epoch, empty until the stream was first checked.
    pub fn epoch(&self) -> String {
        lock(&self.state).epoch.clone()
    }

    /// The stream's last sequence when last checked.
    pub fn stream_last(&self) -> u64 {
        lock(&self.state).last_seq
    }
}

/// A stream of the layout before this one (`--stream-previous`): clients
/// may resume from positions in it ([`Hub::previous_for`]).
pub struct Previous {
    name: String,
    history: History,
    /// Set by the readiness loop while the stream is found sealed
    /// ([`crate::server`]): a sealed stream stores nothing more, so its
    /// tail, once sent, is the whole of it.
    epoch: Mutex<Option<String>>,
}

impl Previous {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_epoch(&self, epoch: String) {
        *lock(&self.epoch) = Some(epoch);
    }

    /// No longer continued from: missing, or (unexpectedly) not sealed.
    pub fn forget(&self) {
        *lock(&self.epoch) = None;
    }
}

/// What the node last learned of a stream (refreshed by the readiness loop).
#[derive(Debug, Clone, Default)]
struct StreamState {
    epoch: String,
    last_seq: u64,
}

/// A socket's place in the hub; leaving happens on drop.
pub struct Membership {
    hub: Arc<Hub>,
    user: UserId,
    id: u64,
    /// The user's position when this socket joined: every later event of the
    /// user reaches the socket's queue.
    pub position: Position,
    /// The user's replay lock and last replay, shared by its sockets here.
    pub replay: Arc<tokio::sync::Mutex<Option<SharedReplay>>>,
}

impl Membership {
    pub fn user(&self) -> &str {
        self.user.as_str()
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.user, self.id);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a push, retain, lookup or a loop of
    // try_send: a panic inside one leaves the data consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// `live` carries the users' subscriptions; `client` the rest of what
    /// the hub asks of NATS, `readers` (at least one) history reads and scans.
    pub fn new(client: Client, live: crate::live::Live, readers: Vec<Client>, settings: StreamSettings) -> Arc<Self> {
        let stop_tasks = CancellationToken::new();
        let parts = (0..settings.partitions)
            .map(|k| {
                let name = settings.stream_name(k);
                let history = History::new(&client, readers.clone(), &name, settings.stored_prefix(k))
                    .expect("stream name validated by config");
                // Scans of a stream run one at a time, on one of the read
                // connections, away from the live subscriptions.
                let scanner = Arc::new(Scanner::new(history.stream().clone()));
                tokio::spawn({
                    let (scanner, stop) = (scanner.clone(), stop_tasks.clone());
                    async move { scanner.run(stop).await }
                });
                Part { name, history, scanner, state: Mutex::default() }
            })
            .collect();
        let previous = match &settings.previous {
            None => Box::default(),
            Some((base, n)) => (0..*n)
                .map(|k| {
                    let name = crate::partition::stream_name(base, *n, k);
                    let prefix = crate::partition::stored_prefix(&settings.subject_prefix, *n, k);
                    let history =
                        History::new(&client, readers.clone(), &name, prefix).expect("stream name validated by config");
                    Previous { name, history, epoch: Mutex::default() }
                })
                .collect(),
        };
        let hub = Arc::new(Self {
            live,
            settings,
            parts,
            previous,
            users: Mutex::default(),
            bad_subjects: Mutex::default(),
            audit_now: Arc::default(),
            unbatched: AtomicBool::new(false),
            resume_slots: Semaphore::new(RESUME_READ_CONCURRENCY),
            live_slots: Semaphore::new(LIVE_READ_CONCURRENCY),
            replay_bytes: Semaphore::new(REPLAY_BYTES),
            stop_tasks: stop_tasks.clone(),
        });
        // Holds only a weak reference, so dropping the hub stops it.
        tokio::spawn(audit_loop(Arc::downgrade(&hub), hub.audit_now.clone(), stop_tasks));
        hub
    }

    /// Records partition `k`'s stream's epoch and last sequence. When the
    /// epoch changed from a known one, the stream was recreated: every socket
    /// of its users is closed with [`Kick::StreamReset`] and `true` is returned.
    pub fn observe_stream(&self, k: u32, epoch: String, last_seq: u64) -> bool {
        let mut st = lock(&self.parts[k as usize].state);
        let reset = !st.epoch.is_empty() && st.epoch != epoch;
        st.epoch = epoch;
        st.last_seq = last_seq;
        drop(st);
        if reset {
            self.reset(k);
        }
        reset
    }

    /// Whether the live connection is up ([`crate::live::Live::is_connected`]).
    pub fn live_connected(&self) -> bool {
        self.live.is_connected()
    }

    /// The stream that stores `user`'s events, its reads and what is known of it.
    pub fn part(&self, user: &str) -> &Part {
        &self.parts[self.settings.partition_of(user) as usize]
    }

    /// Every partition's stream, in partition order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The previous layout's streams (`--stream-previous`), in partition order.
    pub fn previous(&self) -> &[Previous] {
        &self.previous
    }

    /// The previous layout's stream of `user`, when `epoch` is its epoch
    /// and it is sealed: a position the client holds in it.
    pub fn previous_for(&self, user: &str, epoch: &str) -> Option<&History> {
        let (_, n) = self.settings.previous.as_ref()?;
        let p = self.previous.get(crate::partition::of_token(user, *n) as usize)?;
        (lock(&p.epoch).as_deref() == Some(epoch)).then_some(&p.history)
    }

    /// The slots of resume reads ([`RESUME_READ_CONCURRENCY`]).
    pub fn resume_slots(&self) -> &Semaphore {
        &self.resume_slots
    }

    /// The bytes resume replays may hold together ([`REPLAY_BYTES`]).
    pub fn replay_bytes(&self) -> &Semaphore {
        &self.replay_bytes
    }

    /// The largest event the stream takes (`--max-event-bytes`).
    pub fn max_event_bytes(&self) -> usize {
        self.settings.max_event_bytes
    }

    /// Starts an audit of every user now: after a NATS reconnect, anything
    /// stored meanwhile was not received.
    pub fn audit_all_now(&self) {
        self.unbatched.store(false, Ordering::Relaxed);
        self.audit_now.notify_one();
    }

    /// Adds a socket for `user`, subscribing to the user's live subject if it
    /// is the first. Returns once the subscription is registered and the
    /// user's position known. The socket's queue holds at most `budget`
    /// bytes of frames ([`Kicker::charge`]).
    pub async fn join(
        self: &Arc<Self>,
        user: &UserId,
        id: u64,
        tx: mpsc::UnboundedSender<Queued>,
        kicker: Arc<Kicker>,
        budget: usize,
    ) -> Result<Membership, StreamError> {
        let entry = {
            let mut users = lock(&self.users);
            let entry = users
                .entry(user.clone())
                .or_insert_with(|| {
                    Arc::new(UserEntry {
                        user: user.clone(),
                        part: self.settings.partition_of(user.as_str()),
                        shared: Mutex::new(Shared { sockets: HashMap::new(), position: Position::Horizon(0) }),
                        replay: Arc::default(),
                        ready: OnceCell::new(),
                        signal: UserSignal::default(),
                        audited: AtomicU64::new(0),
                        behind: AtomicU64::new(0),
                        seen: AtomicU64::new(NOT_AUDITED),
                    })
                })
                .clone();
            lock(&entry.shared).sockets.insert(id, SocketTx { tx, kicker, budget });
            entry
        };
        let mut membership = Membership {
            hub: self.clone(),
            user: user.clone(),
            id,
            position: Position::Horizon(0),
            replay: entry.replay.clone(),
        };
        entry.ready.get_or_try_init(|| self.start_user(entry.clone())).await?;
        membership.position = lock(&entry.shared).position;
        Ok(membership)
    }

    /// Subscribes, then reads the user's position ([`History::last`]): the
    /// subscription returns once the server answered a PING sent after the
    /// SUB ([`crate::live::Live::subscribe`]), so the read is made after the
    /// SUB took effect and no event falls between the two.
    ///
    /// A user with nothing stored starts at the stream's last sequence, asked
    /// of the leader once the SUB took effect ([`Position::Horizon`]): every
    /// later event reaches the subscription, and whatever the user had up to
    /// it was removed before this node served the user. Not the last
    /// sequence the readiness check saw (up to 2 s old): events of the user
    /// stored and removed since would lie after the position a socket is
    /// welcomed with, and it would never hear of them.
    ///
    /// In a cluster the SUB reaches the server that stores events only
    /// later, through a route: an event stored meanwhile is after the
    /// position and is not republished here. The audit finds it: a new user
    /// is audited at its first sweep.
    async fn start_user(self: &Arc<Self>, entry: Arc<UserEntry>) -> Result<(), StreamError> {
        // Most messages are handled on the live connection's task as they
        // come: one task wake-up fewer per event. One that reveals a hole
        // goes to the user's task, which reads it from JetStream.
        let handler: crate::live::Handler = {
            let (hub, entry) = (Arc::downgrade(self), entry.clone());
            Box::new(move |msg| match hub.upgrade() {
                Some(hub) if hub.hole(&entry, msg).is_none() => {
                    hub.accept(&entry, msg);
                    true
                }
                _ => false,
            })
        };
        let sub = self.live.subscribe(self.settings.live_subject(entry.user.as_str()), handler).await;
        let position = {
            let _permit = acquire(&self.live_slots).await;
            let (user, history) = (entry.user.as_str(), &self.parts[entry.part as usize].history);
            match history.last(user).await.inspect_err(|_| m::jetstream_error("join"))? {
                0 => Position::Horizon(history.stream_last().await.inspect_err(|_| m::jetstream_error("join"))?),
                last => Position::Event(last),
            }
        };
        lock(&entry.shared).position = position;
        metrics::gauge!(m::USERS_SUBSCRIBED).increment(1.0);
        tokio::spawn(self.clone().run_user(entry, sub));
        Ok(())
    }

    fn leave(&self, user: &UserId, id: u64) {
        let mut users = lock(&self.users);
        let Some(entry) = users.get(user) else { return };
        let mut shared = lock(&entry.shared);
        // Not there: this socket's entry was dropped (its subscription
        // ended, or the stream was reset) and the user's entry now is
        // another's.
        if shared.sockets.remove(&id).is_some() && shared.sockets.is_empty() {
            drop(shared);
            entry.signal.stop();
            users.remove(user);
        }
    }

    /// Partition `k`'s stream was recreated: close every socket of its users
    /// (they resume and learn of the reset) and forget those users, whose
    /// positions are now meaningless.
    fn reset(&self, k: u32) {
        // Taken out first: the users' lock is not held while every socket is kicked.
        let users: Vec<Arc<UserEntry>> = {
            let mut all = lock(&self.users);
            let gone: Vec<UserId> = all.values().filter(|e| e.part == k).map(|e| e.user.clone()).collect();
            gone.iter().filter_map(|u| all.remove(u)).collect()
        };
        for entry in &users {
            entry.signal.stop();
            for s in lock(&entry.shared).sockets.values() {
                s.kicker.kick(Kick::StreamReset);
            }
        }
    }

    /// The user's task: takes the messages the live connection's task
    /// gave back (a hole to read first, or messages queued behind one) and
    /// the audit's findings. While it works, the subscription is busy and
    /// later messages queue for it, in order ([`crate::live::Inbox`]).
    async fn run_user(self: Arc<Self>, entry: Arc<UserEntry>, sub: crate::live::Subscription) {
        // The position is set: what came since the SUB is queued, and is
        // taken first.
        sub.release();
        loop {
            tokio::select! {
                biased;
                signal = entry.signal.next() => {
                    if let Signalled::Stop = signal {
                        break;
                    }
                    sub.claim();
                    let expect = entry.behind.load(Ordering::Acquire);
                    // Boxed here and below: a read from JetStream is rare
                    // and would otherwise size every user's task (3.5 KB).
                    Box::pin(async {
                        let _permit = acquire(&self.live_slots).await;
                        self.fill(&entry, expect + 1, expect, "audit").await;
                    })
                    .await;
                    sub.release();
                }
                msg = sub.next() => {
                    self.on_message(&entry, msg).await;
                    sub.release();
                }
            }
        }
        // Dropping the subscription unsubscribes.
        drop(sub);
        metrics::gauge!(m::USERS_SUBSCRIBED).decrement(1.0);
    }

    /// A message the live connection's task gave back: a hole is read from
    /// JetStream first, then the message is taken as any other.
    async fn on_message(&self, entry: &UserEntry, msg: crate::live::LiveMsg) {
        if let Some((seq, prev)) = self.hole(entry, &msg) {
            let last = lock(&entry.shared).position.seq();
            metrics::counter!(m::GAPS_DETECTED).increment(1);
            tracing::debug!(user = %entry.user.for_log(), last, prev, seq, "hole on the live path; reading it from JetStream");
            Box::pin(async {
                let _permit = acquire(&self.live_slots).await;
                self.fill(entry, seq, prev, "sequence").await;
            })
            .await;
        }
        self.accept(entry, &msg);
    }

    /// `(seq, prev)` when the message is the user's stream's event `seq`,
    /// after the user's position, and its `Nats-Last-Sequence` (`prev`) says
    /// events lie between the two: only the user's task may read them
    /// ([`Hub::on_message`]). Counts and logs nothing: [`Hub::accept`] does.
    fn hole(&self, entry: &UserEntry, msg: &crate::live::LiveMsg) -> Option<(u64, u64)> {
        if msg.stream() != Some(self.parts[entry.part as usize].name.as_str()) {
            return None;
        }
        let seq = msg.seq.filter(|s| *s <= MAX_SEQ)?;
        let prev = msg.last_seq?;
        let last = lock(&entry.shared).position.seq();
        (seq > last && prev > last && prev < seq).then_some((seq, prev))
    }

    /// Checks a live message and delivers it, or skips it (counted, logged
    /// once per subject); with no hole before it ([`Hub::hole`]).
    fn accept(&self, entry: &UserEntry, msg: &crate::live::LiveMsg) {
        m::hot().events_received.increment(1);
        let stream = msg.stream();
        let ours = self.parts[entry.part as usize].name.as_str();
        if let Some(other) = stream.filter(|s| *s != ours && self.parts.iter().any(|p| p.name == *s)) {
            self.misplaced(entry, other, ours);
            return;
        }
        let Some(seq) = msg.seq.filter(|_| stream == Some(ours)) else {
            // Not a republished message of the user's stream: someone
            // published to the live subject directly, or another stream (or
            // another partition's, under a mapping that disagrees with the
            // node's) republishes there. It has no place in the user's history.
            metrics::counter!(m::EVENTS_REJECTED, "reason" => "no_sequence").increment(1);
            self.log_bad_once(
                &entry.user,
                &self.settings.live_subject(entry.user.as_str()),
                "message on a live subject without this stream's Nats-Stream and Nats-Sequence (publish to the event subject instead)",
            );
            return;
        };
        if seq > MAX_SEQ {
            // A JSON number past 2^53 loses precision in a browser; the
            // stream would need 2^53 messages to get here.
            metrics::counter!(m::EVENTS_REJECTED, "reason" => "no_sequence").increment(1);
            self.log_bad_once(
                &entry.user,
                &self.settings.live_subject(entry.user.as_str()),
                &format!("stream sequence {seq} is above 2^53-1"),
            );
            return;
        }
        if msg.repeated {
            // The publisher set headers the stream stamps; the stream's own
            // values (the last ones) were taken above, the publisher's ignored.
            metrics::counter!(m::RESERVED_HEADERS).increment(1);
            let subject = self.settings.event_subject(entry.user.as_str());
            self.log_bad_once(
                &entry.user,
                &subject,
                &format!(
                    "publisher set headers the stream stamps ({}); ignored, the event is delivered with the stream's seq {seq}",
                    crate::live::STAMPS.join(", ")
                ),
            );
        }
        let last = lock(&entry.shared).position.seq();
        if seq <= last {
            // Already delivered by a repair read.
            return;
        }
        // 2.10+ stamp the republished message; 2.9 does not (the envelope's
        // timestamp is used then, and a publisher's own Nats-Time-Stamp is
        // the only value: it moves this metric and nothing else).
        let stored_at = msg.time().and_then(|v| m::Origin::parse(v, m::Clock::Stream));
        self.deliver(entry, Stored { seq, payload: msg.payload.clone() }, stored_at);
    }

    /// An event of the user stored by another partition's stream than the
    /// one the node reads the user from: the account's mapping no longer
    /// agrees with the node's (the readiness check turns the node not ready
    /// within [`crate::server::READY_CHECK_INTERVAL`]), or a publisher wrote
    /// to a partition's subject directly. The event has no sequence in the
    /// user's stream, and a resume would never find it: the sockets are told
    /// now, with a gap that has no end, rather than never.
    fn misplaced(&self, entry: &UserEntry, stored_in: &str, ours: &str) {
        metrics::counter!(m::EVENTS_REJECTED, "reason" => "wrong_partition").increment(1);
        self.log_bad_once(
            &entry.user,
            &self.settings.live_subject(entry.user.as_str()),
            &format!(
                "an event of this user was stored in {stored_in}, this node reads the user from {ours}: the account's subject mapping disagrees with this node's (--stream-partitions {}), or a publisher wrote to a partition's subject directly; announced as a gap",
                self.settings.partitions
            ),
        );
        let from = lock(&entry.shared).position.seq() + 1;
        let gap = Gap { reason: GapReason::Unavailable, from: Some(from), to: None, earliest: None };
        self.announce(entry, gap, 0);
    }

    /// Reads the user's stored events after its position and below
    /// `before`, and delivers them. `expect` is the user's event the read
    /// must reach (the live message's `Nats-Last-Sequence`, or the leader's
    /// newest for the audit). A read that ends below it was answered by a
    /// replica that lags: it is tried again, and after [`REPAIR_ATTEMPTS`]
    /// the rest is announced as a gap. `trigger` labels [`m::GAPS_REPAIRED`].
    async fn fill(&self, entry: &UserEntry, before: u64, expect: u64, trigger: &'static str) {
        let user = entry.user.as_str();
        let mut attempts = 0;
        let e = loop {
            let after = lock(&entry.shared).position.seq();
            if after >= expect {
                return;
            }
            let max = read_count(READ_CHUNK, self.settings.max_event_bytes);
            let history = &self.parts[entry.part as usize].history;
            let e = match crate::resume::read(history, user, after, Some(before), max).await {
                Ok(read) => {
                    if let Some(gap) = read.gap {
                        self.announce(entry, gap, gap.to.unwrap_or(after));
                    }
                    if !read.events.is_empty() {
                        metrics::counter!(m::GAPS_REPAIRED, "trigger" => trigger).increment(1);
                    }
                    for ev in read.events {
                        self.deliver(entry, ev, None);
                    }
                    if lock(&entry.shared).position.seq() > after {
                        attempts = 0;
                        continue;
                    }
                    // Short: not a failed request, so not counted as one.
                    StreamError::Nats(format!("history read ended at {after}, before event {expect}"))
                }
                Err(e) => {
                    m::jetstream_error("repair");
                    e
                }
            };
            attempts += 1;
            if attempts >= REPAIR_ATTEMPTS {
                break e;
            }
            tokio::time::sleep(REPAIR_BACKOFF).await;
        };
        let last = lock(&entry.shared).position.seq();
        tracing::warn!(user = %entry.user.for_log(), error = %e, last, expect, "cannot read missing events from JetStream");
        let gap = Gap { reason: GapReason::Unavailable, from: Some(last + 1), to: Some(expect), earliest: None };
        self.announce(entry, gap, expect);
    }

    fn announce(&self, entry: &UserEntry, gap: Gap, through: u64) {
        metrics::counter!(m::GAPS_ANNOUNCED, "reason" => gap.reason.label(), "path" => "live").increment(1);
        let mut shared = lock(&entry.shared);
        if through > shared.position.seq() {
            shared.position = Position::GapEnd(through);
        }
        fan_out(&shared.sockets, Arc::new(Item::Gap(gap)));
    }

    /// Delivers one stored event to every socket of the user, or skips it
    /// (counted, logged once per subject) when it is not a JSON object; either
    /// way the user's position moves past it, so it is never taken for a hole.
    /// `stored_at` is the stream's time for the event when the message gave
    /// one; else the envelope's `timestamp`, if any, is the origin.
    fn deliver(&self, entry: &UserEntry, ev: Stored, stored_at: Option<m::Origin>) {
        let frame = match event_frame_timed(ev.seq, &ev.payload) {
            Ok(f) => {
                let origin = stored_at.or_else(|| f.timestamp.and_then(|t| m::Origin::parse(t, m::Clock::Envelope)));
                Some(EventFrame { seq: ev.seq, text: f.text, origin, delta: f.delta })
            }
            Err(e) => {
                metrics::counter!(m::EVENTS_REJECTED, "reason" => e.reason()).increment(1);
                let subject = self.settings.event_subject(entry.user.as_str());
                self.log_bad_once(
                    &entry.user,
                    &subject,
                    &format!("event payload is not a JSON object ({}), not forwarded; seq {}", e.reason(), ev.seq),
                );
                None
            }
        };
        let mut shared = lock(&entry.shared);
        if ev.seq <= shared.position.seq() {
            return;
        }
        shared.position = Position::Event(ev.seq);
        if let Some(frame) = frame {
            fan_out(&shared.sockets, Arc::new(Item::Event(frame)));
        }
    }

    /// Checks every user whose position may be behind what the stream holds
    /// against the stream's newest event of the user, and wakes the task of
    /// each user found behind to read up to it.
    ///
    /// Skipped: a user when the stream stored nothing since its last check,
    /// and a user whose position moved since the last audit: its live events
    /// are arriving, each proving the ones before it (`Nats-Last-Sequence`),
    /// and a lost last one is found at the first audit after it goes quiet.
    /// So a stored event reaches its sockets within two intervals and a read,
    /// while busy users cost nothing; only users that are quiet while the
    /// stream moves are asked for, once an interval.
    ///
    /// On nats-server 2.11+ users are asked for [`NEWEST_BATCH`] at a time
    /// ([`History::newest_many`]), one batch in flight, at most
    /// [`AUDIT_BATCHED_RATE`] users a second; before 2.11 one leader request
    /// each, at most [`AUDIT_RATE`] a second.
    ///
    /// With partitions, each stream's users are checked against that
    /// stream, one stream after another, within the same rates.
    async fn audit(&self) {
        if lock(&self.users).is_empty() {
            return;
        }
        // Asked before the users' newest events: any event of a user up to
        // it is then at or below the newest the answer reports, if the
        // server that answers has stored that far.
        let throughs: Vec<Option<u64>> =
            futures_util::future::join_all(self.parts.iter().map(|p| p.history.stream_last()))
                .await
                .into_iter()
                .zip(&self.parts)
                .map(|(r, p)| {
                    r.inspect_err(|e| {
                        m::jetstream_error("audit");
                        tracing::debug!(error = %e, stream = p.name, "audit of the stream's users skipped: its last sequence is unknown");
                    })
                    .ok()
                })
                .collect();
        let mut due: Vec<Vec<Arc<UserEntry>>> = vec![Vec::new(); self.parts.len()];
        for e in lock(&self.users).values() {
            let Some(through) = throughs[e.part as usize] else { continue };
            if !e.ready.initialized() || e.audited.load(Ordering::Acquire) >= through {
                continue;
            }
            let now = lock(&e.shared).position.seq();
            let before = e.seen.swap(now, Ordering::AcqRel);
            if before == NOT_AUDITED || now <= before {
                due[e.part as usize].push(e.clone());
            }
        }
        for ((part, due), through) in self.parts.iter().zip(&due).zip(throughs) {
            if let Some(through) = through.filter(|_| !due.is_empty()) {
                self.audit_part(part, due, through).await;
            }
        }
    }

    /// Checks `due`, users of `part`, against its stream ([`Hub::audit`]).
    async fn audit_part(&self, part: &Part, due: &[Arc<UserEntry>], through: u64) {
        let mut rest = due;
        if !self.unbatched.load(Ordering::Relaxed) {
            let mut step = tokio::time::interval(AUDIT_BATCH_STEP);
            while !rest.is_empty() {
                step.tick().await;
                let (batch, after) = rest.split_at(rest.len().min(NEWEST_BATCH));
                if !self.audit_batch(part, batch, through).await {
                    break;
                }
                rest = after;
            }
        }
        let per_step = (AUDIT_RATE as u128 * AUDIT_STEP.as_millis() / 1000).max(1) as usize;
        let mut step = tokio::time::interval(AUDIT_STEP);
        for batch in rest.chunks(per_step) {
            step.tick().await;
            futures_util::future::join_all(batch.iter().map(|e| self.audit_user(part, e, through))).await;
        }
    }

    /// Checks `batch` in one batched read; false when the server does not
    /// answer those, so the rest is asked per user.
    async fn audit_batch(&self, part: &Part, batch: &[Arc<UserEntry>], through: u64) -> bool {
        let users: Vec<&str> = batch.iter().map(|e| e.user.as_str()).collect();
        match part.history.newest_many(&users).await {
            Ok(Batched::Read(newest)) => {
                // A replica (or mirror) that answered may not have stored
                // all the leader had: the check then reaches only as far.
                let reached = through.min(newest.through);
                metrics::counter!(m::AUDIT_CHECKS).increment(batch.len() as u64);
                for (entry, &seq) in batch.iter().zip(&newest.seqs) {
                    self.audited(entry, seq, reached);
                }
                true
            }
            Ok(Batched::Unsupported) => {
                if !self.unbatched.swap(true, Ordering::Relaxed) {
                    tracing::debug!(
                        "the stream's servers do not answer batched reads (nats-server before 2.11): the audit asks per user"
                    );
                }
                false
            }
            Err(e) => {
                m::jetstream_error("audit");
                tracing::debug!(error = %e, "audit: a batch of users' newest events is unknown");
                true
            }
        }
    }

    async fn audit_user(&self, part: &Part, entry: &UserEntry, through: u64) {
        if entry.signal.is_stopped() {
            return;
        }
        metrics::counter!(m::AUDIT_CHECKS).increment(1);
        match part.history.newest(entry.user.as_str()).await {
            // The leader answered: it has stored everything up to `through`.
            Ok(newest) => self.audited(entry, newest, through),
            Err(e) => {
                m::jetstream_error("audit");
                tracing::debug!(user = %entry.user.for_log(), error = %e, "audit: the user's newest event is unknown");
            }
        }
    }

    /// Records what the audit found of a user: its newest stored event is
    /// `newest`, every event up to `reached` accounted for. A user behind is
    /// woken to read up to it.
    fn audited(&self, entry: &UserEntry, newest: u64, reached: u64) {
        if newest > lock(&entry.shared).position.seq() {
            entry.behind.fetch_max(newest, Ordering::AcqRel);
            entry.signal.wake();
        }
        entry.audited.fetch_max(reached, Ordering::AcqRel);
    }

    /// The subject names the user, so it is logged only when user ids may be
    /// (see [`crate::user::set_log_user_ids`]); else the user's log tag is.
    fn log_bad_once(&self, user: &UserId, subject: &str, what: &str) {
        let mut seen = lock(&self.bad_subjects);
        if seen.contains(subject) {
            return;
        }
        if seen.len() < MAX_LOGGED_BAD_SUBJECTS {
            seen.insert(subject.to_owned());
            if crate::user::log_user_ids() {
                tracing::warn!(subject, "{what} (logged once per subject)");
            } else {
                tracing::warn!(user = %user.for_log(), "{what} (logged once per subject)");
            }
        } else if seen.len() == MAX_LOGGED_BAD_SUBJECTS {
            seen.insert(String::new());
            tracing::warn!(
                "bad payloads from more than {MAX_LOGGED_BAD_SUBJECTS} subjects; further subjects are only counted"
            );
        }
    }
}

/// Queues `item` to every socket of the user. A socket over its byte
/// budget is closed as slow: it resumes from the last event it got, so
/// nothing is lost, and nobody waits for it. The queue has no bound in
/// frames: its frames are counted in bytes, and a socket that is behind
/// merges the deltas waiting in it ([`crate::socket`]), so a client whose
/// link carries the text is never closed for the number of its tokens.
fn fan_out(sockets: &HashMap<u64, SocketTx>, item: Queued) {
    let bytes = item.bytes();
    for s in sockets.values() {
        if !s.kicker.charge(bytes, s.budget) {
            s.kicker.overflowed("bytes");
            continue;
        }
        if s.tx.send(item.clone()).is_err() {
            s.kicker.release(bytes);
        }
    }
}

/// Runs [`Hub::audit`] every [`AUDIT_INTERVAL`], and at once when asked,
/// until `stop` or the hub is gone.
async fn audit_loop(hub: std::sync::Weak<Hub>, now: Arc<Notify>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(AUDIT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = now.notified() => {}
        }
        let Some(hub) = hub.upgrade() else { return };
        hub.audit().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_kick_wakes_the_waiting_socket_and_the_first_reason_wins() {
        let kicker = Arc::new(Kicker::default());
        let waiting = tokio::spawn({
            let kicker = kicker.clone();
            async move { kicker.kicked().await }
        });
        // Long enough for the waiter to have registered and gone to sleep.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        assert!(kicker.kick(Kick::Drain));
        assert!(!kicker.kick(Kick::Slow), "the first reason wins");
        let woken = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(woken.expect("woken by the kick").unwrap(), Kick::Drain);
        // Kicked already: at once, every time.
        assert_eq!(kicker.kicked().await, Kick::Drain);
        assert_eq!(kicker.kicked().await, Kick::Drain);
    }

    #[tokio::test]
    async fn a_user_task_keeps_a_wake_sent_before_it_waits_and_a_stop_comes_first() {
        let signal = Arc::new(UserSignal::default());
        // Before the task waits: kept, taken once.
        signal.wake();
        assert!(matches!(signal.next().await, Signalled::Wake));
        let waiting = tokio::spawn({
            let signal = signal.clone();
            async move { signal.next().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the wake was taken once");
        signal.wake();
        let woken = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken");
        assert!(matches!(woken.unwrap(), Signalled::Wake));
        // A stop wins over a pending wake, and stays.
        signal.wake();
        signal.stop();
        assert!(matches!(signal.next().await, Signalled::Stop));
        assert!(matches!(signal.next().await, Signalled::Stop));
        assert!(signal.is_stopped());
    }
}
