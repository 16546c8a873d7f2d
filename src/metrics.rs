//! Metric names, their help texts, and the Prometheus recorder.
//!
//! Names are constants so the code, the tests, the dashboard
//! (grafana/dashboards/agentcast.json) and the alert rules
//! (deploy/prometheus/alerts.yml) agree; tests/observability.rs checks that
//! every series those query is one a node exports. No label ever carries a
//! user id: labels are fixed, low-cardinality reasons.
//!
//! Every series with a known label set is registered at zero on start
//! ([`register_known`]), so dashboards and `rate()` in alert rules see a
//! series from the first scrape rather than "no data" until the first event.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SOCKETS_OPEN: &str = "agentcast_sockets_open";
pub const USERS_SUBSCRIBED: &str = "agentcast_users_subscribed";
pub const CONNECTIONS_ACCEPTED: &str = "agentcast_connections_accepted_total";
pub const CONNECTIONS_REFUSED: &str = "agentcast_connections_refused_total";
pub const DISCONNECTS: &str = "agentcast_disconnects_total";
pub const SLOW_SOCKETS: &str = "agentcast_slow_sockets_total";
pub const EVENTS_RECEIVED: &str = "agentcast_events_received_total";
pub const EVENTS_REJECTED: &str = "agentcast_events_rejected_total";
pub const RESERVED_HEADERS: &str = "agentcast_events_reserved_headers_total";
pub const FRAMES_SENT: &str = "agentcast_frames_sent_total";
pub const BYTES_SENT: &str = "agentcast_bytes_sent_total";
pub const WRITE_BATCHES: &str = "agentcast_write_batches_total";
pub const CLIENT_FRAMES_REJECTED: &str = "agentcast_client_frames_rejected_total";
pub const NATS_CONNECTED: &str = "agentcast_nats_connected";
pub const NATS_EVENTS: &str = "agentcast_nats_events_total";
pub const READY: &str = "agentcast_ready";
pub const RESUMES: &str = "agentcast_resumes_total";
pub const RESUME_DURATION: &str = "agentcast_resume_duration_seconds";
pub const REPLAYED_EVENTS: &str = "agentcast_replayed_events_total";
pub const MERGED_EVENTS: &str = "agentcast_merged_events_total";
pub const SOCKETS_BEHIND: &str = "agentcast_sockets_behind_total";
pub const GAPS_DETECTED: &str = "agentcast_live_gaps_detected_total";
pub const GAPS_REPAIRED: &str = "agentcast_live_gaps_repaired_total";
pub const GAPS_ANNOUNCED: &str = "agentcast_live_gaps_announced_total";
pub const GAPS_SENT: &str = "agentcast_gap_frames_sent_total";
pub const STREAM_RESETS: &str = "agentcast_stream_resets_total";
pub const STREAM_LAST_SEQUENCE: &str = "agentcast_stream_last_sequence";
pub const SHARED_REPLAYS: &str = "agentcast_shared_replays_total";
pub const HISTORY_SCANS: &str = "agentcast_history_scans_total";
pub const HISTORY_SCAN_MESSAGES: &str = "agentcast_history_scan_messages_total";
pub const DELIVERY_LATENCY: &str = "agentcast_delivery_latency_seconds";
pub const QUEUE_DEPTH: &str = "agentcast_socket_queue_depth";
pub const JETSTREAM_ERRORS: &str = "agentcast_jetstream_errors_total";
pub const NATS_RECONNECTS: &str = "agentcast_nats_reconnects_total";
pub const AUDIT_CHECKS: &str = "agentcast_audit_checks_total";
pub const CONTROL_REQUESTS: &str = "agentcast_control_requests_total";
pub const CONTROL_REPLY_TIME: &str = "agentcast_control_reply_seconds";

/// Every metric a node exports, for the tests that check the dashboard and
/// the alert rules against them.
pub const ALL: &[&str] = &[
    SOCKETS_OPEN,
    USERS_SUBSCRIBED,
    CONNECTIONS_ACCEPTED,
    CONNECTIONS_REFUSED,
    DISCONNECTS,
    SLOW_SOCKETS,
    EVENTS_RECEIVED,
    EVENTS_REJECTED,
    RESERVED_HEADERS,
    FRAMES_SENT,
    BYTES_SENT,
    WRITE_BATCHES,
    CLIENT_FRAMES_REJECTED,
    NATS_CONNECTED,
    NATS_EVENTS,
    READY,
    RESUMES,
    RESUME_DURATION,
    REPLAYED_EVENTS,
    MERGED_EVENTS,
    SOCKETS_BEHIND,
    GAPS_DETECTED,
    GAPS_REPAIRED,
    GAPS_ANNOUNCED,
    GAPS_SENT,
    STREAM_RESETS,
    STREAM_LAST_SEQUENCE,
    SHARED_REPLAYS,
    DELIVERY_LATENCY,
    QUEUE_DEPTH,
    JETSTREAM_ERRORS,
    NATS_RECONNECTS,
    HISTORY_SCANS,
    HISTORY_SCAN_MESSAGES,
    AUDIT_CHECKS,
    CONTROL_REQUESTS,
    CONTROL_REPLY_TIME,
];

/// The histograms among [`ALL`] (exported as `_bucket`, `_sum`, `_count`).
pub const HISTOGRAMS: &[&str] = &[DELIVERY_LATENCY, QUEUE_DEPTH, RESUME_DURATION, CONTROL_REPLY_TIME];

/// Buckets of [`DELIVERY_LATENCY`], [`RESUME_DURATION`] and [`CONTROL_REPLY_TIME`], in seconds: fine below 10 ms, where a
/// healthy node delivers (p99 of a few ms measured here, see
/// ../shared/nats-facts.md), and coarse up to 10 s, where repairs after a
/// NATS reconnect land. Prometheus interpolates inside a bucket, so the
/// steps bound the error of a percentile read from them.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Buckets of [`QUEUE_DEPTH`]: powers of four up to 65,536 items (a socket's
/// queue is bounded in bytes, `--socket-queue-bytes`, and its streamed text
/// merged, so a deep queue is of small non-delta events).
pub const QUEUE_BUCKETS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0];

/// Label values of `transport` on the per-connection series ([`SOCKETS_OPEN`],
/// [`CONNECTIONS_ACCEPTED`], [`CONNECTIONS_REFUSED`], [`DISCONNECTS`]): see
/// [`crate::server::Transport::label`]. Refusals at the HTTP connections'
/// bound, before any route, are `http`.
pub const TRANSPORTS: &[&str] = &["ws", "sse"];

/// Label values of [`DISCONNECTS`] (see [`crate::socket::End::label`]).
pub const DISCONNECT_REASONS: &[&str] =
    &["client", "slow", "drain", "ping_timeout", "token_expired", "too_big", "unsupported", "stream_reset", "error"];

/// Label values of [`CONNECTIONS_REFUSED`] that are not token failures.
pub const REFUSAL_REASONS: &[&str] =
    &["draining", "not_ready", "origin", "bad_request", "not_websocket", "user_capacity", "capacity"];

/// Label values of [`CONNECTIONS_REFUSED`] for token failures (see
/// [`crate::auth::AuthError::reason`]); the alert on auth failures sums these.
pub const AUTH_FAILURE_REASONS: &[&str] = &[
    "missing",
    "malformed",
    "expired",
    "not_yet_valid",
    "bad_signature",
    "algorithm",
    "missing_claim",
    "claim",
    "user_id",
];

/// Label values of [`NATS_EVENTS`]: every client event async-nats reports
/// (see [`crate::nats`]), so a rule on lame duck or server errors has a
/// series before the first one.
pub const NATS_EVENT_NAMES: &[&str] =
    &["connected", "disconnected", "lame_duck", "draining", "closed", "slow_consumer", "server_error", "client_error"];

/// Label values of [`JETSTREAM_ERRORS`]: which request failed.
/// `resume`: a history read for a resume; `repair`: a live-path hole read
/// (every failed attempt); `join`: the user's position for a first socket;
/// `stream_check`: the readiness check of the stream; `audit`: the audit's
/// requests for users' newest events.
pub const JETSTREAM_OPS: &[&str] = &["resume", "repair", "join", "stream_check", "audit"];

/// Which clock an event's origin time came from, the label `clock` of
/// [`DELIVERY_LATENCY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// `Nats-Time-Stamp` of the republished message (nats-server 2.10+): when
    /// the stream stored it.
    Stream,
    /// The event's own `timestamp` field, set by the publisher (2.9, and
    /// events read back from history): includes the publisher's clock skew.
    Envelope,
}

impl Clock {
    pub fn label(self) -> &'static str {
        match self {
            Clock::Stream => "stream",
            Clock::Envelope => "envelope",
        }
    }
}

/// When an event was stored or published, carried with its frame so the
/// latency is measured at the socket write without parsing anything there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub at: SystemTime,
    pub clock: Clock,
}

impl Origin {
    /// From an RFC 3339 time (`Nats-Time-Stamp`, or an envelope `timestamp`
    /// such as `2026-11-24T10:00:00.123Z` or `...+01:00`); `None` when it is
    /// not one, since the latency metric is best effort.
    pub fn parse(text: &str, clock: Clock) -> Option<Self> {
        let t = time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339).ok()?;
        let nanos = u64::try_from(t.unix_timestamp_nanos()).ok()?;
        Some(Origin { at: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos), clock })
    }
}

/// Counts one failed JetStream request; `op` is one of [`JETSTREAM_OPS`].
pub fn jetstream_error(op: &'static str) {
    metrics::counter!(JETSTREAM_ERRORS, "op" => op).increment(1);
}

/// Handles of the series touched for every event or every write, resolved
/// once: `counter!` resolves its name in the registry (a hash and a map
/// lookup) at each call, which showed in a profile of the node under load
/// (bench/results/profile-2026-11-26-*). Resolved by [`install`] right after
/// the recorder is: a process that never installs one (an in-process test)
/// gets no-op handles.
pub struct Hot {
    pub events_received: metrics::Counter,
    pub frames_sent: metrics::Counter,
    pub bytes_sent: metrics::Counter,
    /// A counter, not a histogram of frames per batch: a histogram sample
    /// per write cost about 3% of the node's CPU under `--preset chat`
    /// (every socket records into one shared bucket list), and the queue
    /// depth histogram, sampled at the same writes, shows the spread.
    pub write_batches: metrics::Counter,
}

static HOT: OnceLock<Hot> = OnceLock::new();

/// The per-event and per-write handles ([`Hot`]).
pub fn hot() -> &'static Hot {
    HOT.get_or_init(|| Hot {
        events_received: metrics::counter!(EVENTS_RECEIVED),
        frames_sent: metrics::counter!(FRAMES_SENT),
        bytes_sent: metrics::counter!(BYTES_SENT),
        write_batches: metrics::counter!(WRITE_BATCHES),
    })
}

/// Shards of a [`Bucketed`] histogram. A thread records into one of its own
/// (threads are dealt shards in turn), so a node's worker threads do not
/// fight over one cache line per sample.
const SHARDS: usize = 8;

/// A histogram recorded at every socket write: fixed buckets of atomic
/// counts in per-thread shards, rendered by [`render_bucketed`] beside the
/// exporter's output in the same text format.
///
/// The exporter's own histograms keep every sample in one list shared by
/// all sockets, with a generation count bumped per sample, and fold them
/// into buckets later: the two recorded per write (delivery latency, queue
/// depth) cost about 7% of the node's CPU under `--preset chat`
/// (bench/results/ab-2026-11-26-hotpath/README.txt). Histograms recorded
/// rarely (resume duration, control reply time) stay with the exporter.
pub struct Bucketed<const N: usize> {
    /// Upper bounds (`le`) of the first `N - 1` buckets; the last is `+Inf`.
    bounds: &'static [f64],
    /// The sum is kept as an integer: value times this.
    scale: f64,
    shards: [Shard<N>; SHARDS],
}

#[repr(align(128))]
struct Shard<const N: usize> {
    counts: [AtomicU64; N],
    sum: AtomicU64,
}

impl<const N: usize> Bucketed<N> {
    const fn new(bounds: &'static [f64], scale: f64) -> Self {
        assert!(bounds.len() + 1 == N, "one more slot than bounds, for +Inf");
        Bucketed {
            bounds,
            scale,
            shards: [const { Shard { counts: [const { AtomicU64::new(0) }; N], sum: AtomicU64::new(0) } }; SHARDS],
        }
    }

    pub fn record(&self, value: f64) {
        thread_local! {
            static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
        }
        let shard = &self.shards[SHARD.with(|s| *s)];
        // The first bucket whose bound is at or above the value (`le`).
        let i = self.bounds.partition_point(|b| *b < value);
        shard.counts[i].fetch_add(1, Ordering::Relaxed);
        shard.sum.fetch_add((value.max(0.0) * self.scale) as u64, Ordering::Relaxed);
    }

    /// Appends the series of one label set (`labels` as `k="v"`, or empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        let mut cumulative = 0u64;
        let sep = if labels.is_empty() { "" } else { "," };
        for slot in 0..N {
            cumulative += self.shards.iter().map(|s| s.counts[slot].load(Ordering::Relaxed)).sum::<u64>();
            let le = self.bounds.get(slot).map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let sum = self.shards.iter().map(|s| s.sum.load(Ordering::Relaxed)).sum::<u64>() as f64 / self.scale;
        let braces = |l: &str| if l.is_empty() { String::new() } else { format!("{{{l}}}") };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

const LATENCY_SLOTS: usize = LATENCY_BUCKETS.len() + 1;
const QUEUE_SLOTS: usize = QUEUE_BUCKETS.len() + 1;

/// [`DELIVERY_LATENCY`] by origin clock, in seconds. The sum is kept in
/// microseconds: 40,000 samples a second of 100 ms each take 146 years to
/// wrap it; in nanoseconds it would wrap within two months.
static LATENCY_STREAM: Bucketed<LATENCY_SLOTS> = Bucketed::new(LATENCY_BUCKETS, 1e6);
static LATENCY_ENVELOPE: Bucketed<LATENCY_SLOTS> = Bucketed::new(LATENCY_BUCKETS, 1e6);
/// [`QUEUE_DEPTH`].
pub static QUEUE_DEPTH_HISTOGRAM: Bucketed<QUEUE_SLOTS> = Bucketed::new(QUEUE_BUCKETS, 1.0);

/// The [`DELIVERY_LATENCY`] histogram of one origin clock.
pub fn delivery_latency(clock: Clock) -> &'static Bucketed<LATENCY_SLOTS> {
    match clock {
        Clock::Stream => &LATENCY_STREAM,
        Clock::Envelope => &LATENCY_ENVELOPE,
    }
}

/// Appends the [`Bucketed`] histograms to the exporter's `text`.
pub fn render_bucketed(text: &mut String) {
    use std::fmt::Write;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = writeln!(
        text,
        "# HELP {DELIVERY_LATENCY} From the event's origin time (clock: stream = Nats-Time-Stamp, envelope = the event's timestamp) to its socket write; one sample per write batch, for its oldest event."
    );
    let _ = writeln!(text, "# TYPE {DELIVERY_LATENCY} histogram");
    for clock in [Clock::Stream, Clock::Envelope] {
        delivery_latency(clock).render(text, DELIVERY_LATENCY, &format!("clock=\"{}\"", clock.label()));
    }
    let _ =
        writeln!(text, "# HELP {QUEUE_DEPTH} Items waiting in a socket's outbound queue, sampled at each write batch.");
    let _ = writeln!(text, "# TYPE {QUEUE_DEPTH} histogram");
    QUEUE_DEPTH_HISTOGRAM.render(text, QUEUE_DEPTH, "");
}

/// How often histogram buckets are folded; the exporter needs it to be called.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle. A second
/// call (tests that run several servers in one process) gets the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(RESUME_DURATION.into()), LATENCY_BUCKETS)
                .expect("non-empty bucket list")
                .set_buckets_for_metric(Matcher::Full(CONTROL_REPLY_TIME.into()), LATENCY_BUCKETS)
                .expect("non-empty bucket list")
                .install_recorder()
                .expect("metrics recorder installed once");
            describe();
            register_known();
            hot();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    describe_gauge!(SOCKETS_OPEN, Unit::Count, "Client connections open on this node, by transport (ws, sse).");
    describe_gauge!(USERS_SUBSCRIBED, Unit::Count, "Users with a live NATS subscription on this node.");
    describe_counter!(
        CONNECTIONS_ACCEPTED,
        Unit::Count,
        "WebSocket upgrades and event streams accepted, by transport."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        Unit::Count,
        "Connection attempts refused before the upgrade or stream, by reason and transport (http: the HTTP connections' bound)."
    );
    describe_counter!(DISCONNECTS, Unit::Count, "Sockets and event streams closed, by reason and transport.");
    describe_counter!(
        SLOW_SOCKETS,
        Unit::Count,
        "Sockets asked to close as slow when their queue, after merging streamed text, overflowed its bytes (bound=bytes, --socket-queue-bytes)."
    );
    describe_counter!(EVENTS_RECEIVED, Unit::Count, "Events received from NATS live subjects.");
    describe_counter!(
        EVENTS_REJECTED,
        Unit::Count,
        "Events not forwarded, by reason (payload not a JSON object, missing sequence)."
    );
    describe_counter!(
        RESERVED_HEADERS,
        Unit::Count,
        "Live events whose publisher set headers the stream stamps (Nats-Sequence, Nats-Last-Sequence, Nats-Stream, Nats-Subject, Nats-Time-Stamp); delivered with the stream's values, the publisher's ignored."
    );
    describe_counter!(FRAMES_SENT, Unit::Count, "Frames written to sockets.");
    describe_counter!(BYTES_SENT, Unit::Bytes, "Frame payload bytes written to sockets.");
    describe_counter!(
        WRITE_BATCHES,
        Unit::Count,
        "Socket flushes (write batches); frames sent over this is the mean batch."
    );
    describe_counter!(
        JETSTREAM_ERRORS,
        Unit::Count,
        "Failed JetStream requests, by op (resume, repair, join, stream_check, audit)."
    );
    describe_counter!(NATS_RECONNECTS, Unit::Count, "Times the NATS connection came back after being lost.");
    describe_counter!(
        CLIENT_FRAMES_REJECTED,
        Unit::Count,
        "Client frames answered with an error or a close, by reason."
    );
    describe_gauge!(NATS_CONNECTED, Unit::Count, "1 while the live NATS connection (the users' subscriptions) is up.");
    describe_counter!(NATS_EVENTS, Unit::Count, "NATS client events (connected, disconnected, slow_consumer, ...).");
    describe_gauge!(READY, Unit::Count, "1 while /readyz answers 200.");
    describe_counter!(RESUMES, Unit::Count, "Resumes from a last_seq, by outcome (complete, gap, failed).");
    describe_histogram!(
        RESUME_DURATION,
        Unit::Seconds,
        "From a resuming socket joining its user's stream to its last replayed event written, for resumes that ended complete or with a gap."
    );
    describe_counter!(REPLAYED_EVENTS, Unit::Count, "Events sent from history on resume.");
    describe_counter!(
        MERGED_EVENTS,
        Unit::Count,
        "Delta events sent inside merged frames (two or more to a frame), by path: live (a socket behind) or replay."
    );
    describe_counter!(
        SOCKETS_BEHIND,
        Unit::Count,
        "Times a socket fell behind during a streamed message (its deltas waited while a write was pending); the rest of that message reached it in merged frames held up to 1 s."
    );
    describe_counter!(
        GAPS_DETECTED,
        Unit::Count,
        "Holes seen on the live path (Nats-Last-Sequence not the last delivered)."
    );
    describe_counter!(
        GAPS_REPAIRED,
        Unit::Count,
        "Live-path holes filled from JetStream, by trigger: sequence (Nats-Last-Sequence) or audit (the leader held a newer event of the user than delivered)."
    );
    describe_counter!(
        GAPS_ANNOUNCED,
        Unit::Count,
        "Live-path holes that could not be filled and were announced, by reason."
    );
    describe_counter!(GAPS_SENT, Unit::Count, "Gap frames written to sockets, by reason.");
    describe_counter!(STREAM_RESETS, Unit::Count, "Times the stream was seen recreated (a new epoch).");
    describe_gauge!(
        STREAM_LAST_SEQUENCE,
        Unit::Count,
        "Each stream's last sequence at the node's last readiness check, by stream (one per partition): its rate is the events the stream stores per second."
    );
    describe_counter!(
        SHARED_REPLAYS,
        Unit::Count,
        "Resumes served from another socket's replay of the same user, without reading JetStream."
    );
    describe_counter!(
        HISTORY_SCANS,
        Unit::Count,
        "Shared tail scans run for resumes while every history-read slot was busy, by outcome (ok, failed)."
    );
    describe_counter!(HISTORY_SCAN_MESSAGES, Unit::Count, "Stream messages read by shared tail scans.");
    describe_counter!(
        AUDIT_CHECKS,
        Unit::Count,
        "Requests to the stream leader for a user's newest event, made by the audit that finds events whose republish was lost."
    );
    describe_counter!(
        CONTROL_REQUESTS,
        Unit::Count,
        "Control requests from clients, by outcome (ok, no_agent, timeout, rate_limited, too_many_pending, bad_reply, disabled, bad_frame, unavailable); those whose socket closed before the answer are not counted."
    );
    describe_histogram!(
        CONTROL_REPLY_TIME,
        Unit::Seconds,
        "From a control request sent to NATS to an agent's reply (outcomes ok and bad_reply)."
    );
}

/// Registers every series whose labels are known in advance, at zero.
fn register_known() {
    for transport in TRANSPORTS {
        for reason in DISCONNECT_REASONS {
            metrics::counter!(DISCONNECTS, "reason" => *reason, "transport" => *transport).absolute(0);
        }
        for reason in REFUSAL_REASONS.iter().chain(AUTH_FAILURE_REASONS) {
            metrics::counter!(CONNECTIONS_REFUSED, "reason" => *reason, "transport" => *transport).absolute(0);
        }
        metrics::counter!(CONNECTIONS_ACCEPTED, "transport" => *transport).absolute(0);
        metrics::gauge!(SOCKETS_OPEN, "transport" => *transport).increment(0.0);
    }
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => "http_capacity", "transport" => "http").absolute(0);
    metrics::counter!(SLOW_SOCKETS, "bound" => "bytes").absolute(0);
    for path in ["live", "replay"] {
        metrics::counter!(MERGED_EVENTS, "path" => path).absolute(0);
    }
    metrics::counter!(SOCKETS_BEHIND).absolute(0);
    for reason in ["not_json", "not_object", "not_utf8", "no_sequence", "wrong_partition"] {
        metrics::counter!(EVENTS_REJECTED, "reason" => reason).absolute(0);
    }
    for reason in ["late_resume", "bad_frame", "binary", "too_big", "not_utf8", "refresh_refused"] {
        metrics::counter!(CLIENT_FRAMES_REJECTED, "reason" => reason).absolute(0);
    }
    for outcome in ["complete", "gap", "failed"] {
        metrics::counter!(RESUMES, "outcome" => outcome).absolute(0);
    }
    for trigger in ["sequence", "audit"] {
        metrics::counter!(GAPS_REPAIRED, "trigger" => trigger).absolute(0);
    }
    for reason in ["expired", "stream_reset", "unavailable"] {
        metrics::counter!(GAPS_SENT, "reason" => reason).absolute(0);
    }
    metrics::counter!(GAPS_ANNOUNCED, "reason" => "unavailable", "path" => "live").absolute(0);
    metrics::counter!(GAPS_ANNOUNCED, "reason" => "expired", "path" => "live").absolute(0);
    for op in JETSTREAM_OPS {
        metrics::counter!(JETSTREAM_ERRORS, "op" => *op).absolute(0);
    }
    for event in NATS_EVENT_NAMES {
        metrics::counter!(NATS_EVENTS, "event" => *event).absolute(0);
    }
    for name in [EVENTS_RECEIVED, FRAMES_SENT, BYTES_SENT, WRITE_BATCHES, REPLAYED_EVENTS, GAPS_DETECTED] {
        metrics::counter!(name).absolute(0);
    }
    for name in [STREAM_RESETS, SHARED_REPLAYS, NATS_RECONNECTS, HISTORY_SCAN_MESSAGES, AUDIT_CHECKS, RESERVED_HEADERS]
    {
        metrics::counter!(name).absolute(0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!(HISTORY_SCANS, "outcome" => outcome).absolute(0);
    }
    for name in [USERS_SUBSCRIBED, NATS_CONNECTED, READY] {
        metrics::gauge!(name).increment(0.0);
    }
    // A histogram is exported once it is registered, with every bucket at
    // zero: metrics-exporter-prometheus 0.18 builds an empty distribution
    // for each registered handle when it renders, samples or not. Without
    // this a histogram has no series until its first sample (a fresh node's
    // resume-duration panel would say "no data").
    for outcome in crate::control::OUTCOMES {
        metrics::counter!(CONTROL_REQUESTS, "outcome" => outcome.label()).absolute(0);
    }
    for name in [RESUME_DURATION, CONTROL_REPLY_TIME] {
        let _ = metrics::histogram!(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucketed_histogram_renders_cumulative_buckets_sum_and_count_across_threads() {
        static H: Bucketed<4> = Bucketed::new(&[0.5, 1.0, 2.5], 1e9);
        // From several threads, so several shards hold samples.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for v in [0.25, 0.5, 0.75, 2.0, 7.0, -1.0] {
                        H.record(v);
                    }
                });
            }
        });
        let mut out = String::new();
        H.render(&mut out, "x_seconds", r#"clock="stream""#);
        // Per thread: -1.0, 0.25 and 0.5 are at or below 0.5; 0.75 below 1;
        // 2.0 below 2.5; 7.0 only in +Inf. Negative values count as zero.
        let want = [
            r#"x_seconds_bucket{clock="stream",le="0.5"} 12"#,
            r#"x_seconds_bucket{clock="stream",le="1"} 16"#,
            r#"x_seconds_bucket{clock="stream",le="2.5"} 20"#,
            r#"x_seconds_bucket{clock="stream",le="+Inf"} 24"#,
            r#"x_seconds_sum{clock="stream"} 42"#,
            r#"x_seconds_count{clock="stream"} 24"#,
        ];
        assert_eq!(out.lines().collect::<Vec<_>>(), want, "{out}");
        let mut bare = String::new();
        QUEUE_DEPTH_HISTOGRAM.render(&mut bare, "q", "");
        assert!(bare.starts_with("q_bucket{le=\"1\"} "), "{bare}");
        assert!(bare.contains("\nq_count "), "{bare}");
    }
}
