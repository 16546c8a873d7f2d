//! The node's async-nats connections: options from the configuration, and
//! the client events turned into logs and metrics.
//!
//! A node has one connection for requests and publishes (control requests,
//! stream checks, positions), [`READ_CONNECTIONS`] for history reads, and
//! its live subscriptions on a connection of its own ([`crate::live`]).
//! nats-server answers the requests of one connection one after another, so
//! reads on separate connections run at once (see [`crate::history`]), and
//! a storm of reads never queues in front of live events.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};

use crate::config::{NatsLogin, NatsSettings};
use crate::metrics as m;

/// Default for the messages queued per live subscription before one is
/// dropped and counted as `slow_consumer` ([`crate::live::Inbox`]; the hub
/// reads the dropped events from JetStream: at the user's next event, or at
/// the next audit). Messages queue only while the user's task reads a hole
/// or the audit's finding from JetStream (waiting for a live-read slot,
/// apart from the resumes' slots: [`crate::hub::LIVE_READ_CONCURRENCY`]);
/// 8192 absorbs several seconds of a busy user meanwhile (async-nats's
/// default, 65,536, would let one user pin ~20 MB of small events). In bytes the
/// subscription is bounded by `--nats-subscription-bytes`, which lowers this
/// count when events may be large ([`crate::config::subscription_capacity`]).
pub const SUBSCRIPTION_CAPACITY: usize = 8192;

/// Commands (publish, subscribe, request) queued to the connection task. The
/// async-nats default, kept explicit: when full, callers wait.
pub const CLIENT_CAPACITY: usize = 2048;

/// Time allowed for one JetStream API request (stream info, direct get).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects without waiting for the server: the client retries in the
/// background, and /readyz says not-ready until it is connected. Its events
/// are logged and counted; the live connection's are what the hub acts on
/// ([`crate::live::Signals`]).
pub async fn connect(s: &NatsSettings, name: &str) -> anyhow::Result<Client> {
    let opts = options(s, name).await?.event_callback(|event| async move { on_event(event) });
    Ok(opts.connect(s.login.urls.clone()).await?)
}

/// Connections for history reads (direct gets and scans). Four let a
/// resume's read run as four chains at once: measured with 1M events over
/// 10k users on 2 cores, 20 spread-out events took p50 7.1 ms on four
/// connections against 11.0 ms on one (2.15.1), 12.4 against 20.4 ms (2.9.10);
/// four chains on one connection were no faster than one.
pub const READ_CONNECTIONS: usize = 4;

/// Opens [`READ_CONNECTIONS`] connections for history reads, without waiting
/// for the server, like [`connect`]. Their state is not tracked: a read that
/// fails on a reconnecting reader is retried or reported like any other.
pub async fn connect_readers(s: &NatsSettings, name: &str) -> anyhow::Result<Vec<Client>> {
    let mut readers = Vec::with_capacity(READ_CONNECTIONS);
    for i in 0..READ_CONNECTIONS {
        readers.push(options(s, &format!("{name}-read-{i}")).await?.connect(s.login.urls.clone()).await?);
    }
    Ok(readers)
}

/// What every connection of a node shares: name, login, the inbox prefix
/// its permissions are written for, timeouts, and retrying in the background.
async fn options(s: &NatsSettings, name: &str) -> anyhow::Result<ConnectOptions> {
    let opts = ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(&s.inbox_prefix)
        .client_capacity(CLIENT_CAPACITY)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .retry_on_initial_connect()
        .max_reconnects(None);
    with_login(opts, &s.login).await
}

/// Adds the login (user and password, token, credentials file, TLS) to
/// connect options; the node's connections and the tools' use it alike.
pub async fn with_login(mut opts: ConnectOptions, l: &NatsLogin) -> anyhow::Result<ConnectOptions> {
    if let Some((user, pass)) = &l.user {
        opts = opts.user_and_password(user.clone(), pass.clone());
    }
    if let Some(token) = &l.token {
        opts = opts.token(token.clone());
    }
    if let Some(creds) = &l.creds {
        opts =
            opts.credentials_file(creds).await.map_err(|e| anyhow::anyhow!("--nats-creds {}: {e}", creds.display()))?;
    }
    if let Some(ca) = &l.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &l.tls_client {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if l.tls_required {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

fn on_event(event: Event) {
    let name = match &event {
        Event::Connected => "connected",
        Event::Disconnected => "disconnected",
        Event::LameDuckMode => "lame_duck",
        Event::Draining => "draining",
        Event::Closed => "closed",
        Event::SlowConsumer(_) => "slow_consumer",
        Event::ServerError(_) => "server_error",
        Event::ClientError(_) => "client_error",
    };
    metrics::counter!(m::NATS_EVENTS, "event" => name).increment(1);
    match event {
        Event::Connected => tracing::info!("NATS connected"),
        other => tracing::warn!("NATS event: {other}"),
    }
}
