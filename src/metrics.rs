//! Metric names, their help texts, and the Prometheus recorder.
//!
//! Names are constants so the code, the tests and (later) the dashboard and
//! alert rules agree. No label ever carries a user id: labels are fixed,
//! low-cardinality reasons.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SOCKETS_OPEN: &str = "agentcast_sockets_open";
pub const USERS_SUBSCRIBED: &str = "agentcast_users_subscribed";
pub const CONNECTIONS_ACCEPTED: &str = "agentcast_connections_accepted_total";
pub const CONNECTIONS_REFUSED: &str = "agentcast_connections_refused_total";
pub const DISCONNECTS: &str = "agentcast_disconnects_total";
pub const EVENTS_RECEIVED: &str = "agentcast_events_received_total";
pub const EVENTS_REJECTED: &str = "agentcast_events_rejected_total";
pub const FRAMES_SENT: &str = "agentcast_frames_sent_total";
pub const BYTES_SENT: &str = "agentcast_bytes_sent_total";
pub const WRITE_BATCH: &str = "agentcast_write_batch_frames";
pub const CLIENT_FRAMES_REJECTED: &str = "agentcast_client_frames_rejected_total";
pub const NATS_CONNECTED: &str = "agentcast_nats_connected";
pub const NATS_EVENTS: &str = "agentcast_nats_events_total";
pub const READY: &str = "agentcast_ready";
pub const RESUMES: &str = "agentcast_resumes_total";
pub const REPLAYED_EVENTS: &str = "agentcast_replayed_events_total";
pub const GAPS_DETECTED: &str = "agentcast_live_gaps_detected_total";
pub const GAPS_REPAIRED: &str = "agentcast_live_gaps_repaired_total";
pub const GAPS_ANNOUNCED: &str = "agentcast_live_gaps_announced_total";
pub const GAPS_SENT: &str = "agentcast_gap_frames_sent_total";
pub const STREAM_RESETS: &str = "agentcast_stream_resets_total";
pub const SHARED_REPLAYS: &str = "agentcast_shared_replays_total";
pub const HISTORY_SCANS: &str = "agentcast_history_scans_total";
pub const HISTORY_SCAN_MESSAGES: &str = "agentcast_history_scan_messages_total";

/// How often histogram buckets are folded; the exporter needs it to be called.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle. A second
/// call (tests that run several servers in one process) gets the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(WRITE_BATCH.into()), &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
                .expect("non-empty bucket list")
                .install_recorder()
                .expect("metrics recorder installed once");
            describe();
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
    describe_gauge!(SOCKETS_OPEN, Unit::Count, "WebSocket connections open on this node.");
    describe_gauge!(USERS_SUBSCRIBED, Unit::Count, "Users with a live NATS subscription on this node.");
    describe_counter!(CONNECTIONS_ACCEPTED, Unit::Count, "WebSocket upgrades accepted.");
    describe_counter!(CONNECTIONS_REFUSED, Unit::Count, "Connection attempts refused before the upgrade, by reason.");
    describe_counter!(DISCONNECTS, Unit::Count, "Sockets closed, by reason.");
    describe_counter!(EVENTS_RECEIVED, Unit::Count, "Events received from NATS live subjects.");
    describe_counter!(
        EVENTS_REJECTED,
        Unit::Count,
        "Events not forwarded, by reason (payload not a JSON object, missing sequence)."
    );
    describe_counter!(FRAMES_SENT, Unit::Count, "Frames written to sockets.");
    describe_counter!(BYTES_SENT, Unit::Bytes, "Frame payload bytes written to sockets.");
    describe_histogram!(WRITE_BATCH, Unit::Count, "Frames written per socket flush.");
    describe_counter!(
        CLIENT_FRAMES_REJECTED,
        Unit::Count,
        "Client frames answered with an error or a close, by reason."
    );
    describe_gauge!(NATS_CONNECTED, Unit::Count, "1 while the NATS connection is up.");
    describe_counter!(NATS_EVENTS, Unit::Count, "NATS client events (connected, disconnected, slow_consumer, ...).");
    describe_gauge!(READY, Unit::Count, "1 while /readyz answers 200.");
    describe_counter!(RESUMES, Unit::Count, "Resumes from a last_seq, by outcome (complete, gap, failed).");
    describe_counter!(REPLAYED_EVENTS, Unit::Count, "Events sent from history on resume.");
    describe_counter!(
        GAPS_DETECTED,
        Unit::Count,
        "Holes seen on the live path (Nats-Last-Sequence not the last delivered)."
    );
    describe_counter!(
        GAPS_REPAIRED,
        Unit::Count,
        "Live-path holes filled from JetStream, by trigger: sequence (Nats-Last-Sequence) or catchup (after a NATS reconnect or dropped messages)."
    );
    describe_counter!(
        GAPS_ANNOUNCED,
        Unit::Count,
        "Live-path holes that could not be filled and were announced, by reason."
    );
    describe_counter!(GAPS_SENT, Unit::Count, "Gap frames written to sockets, by reason.");
    describe_counter!(STREAM_RESETS, Unit::Count, "Times the stream was seen recreated (a new epoch).");
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
}
