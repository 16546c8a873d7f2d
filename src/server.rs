//! HTTP routes, the upgrade, readiness and the drain.
//!
//! [`run`] takes an already-bound listener (tests pass port 0) and a
//! cancellation token; cancelling it starts the drain. axum's graceful
//! shutdown stops accepting but does not wait for upgraded WebSockets, so
//! sockets are tracked with a [`TaskTracker`] and closed by the drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::FutureExt;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::AuthError;
use crate::config::Config;
use crate::hub::{Hub, Kick, Kicker};
use crate::metrics as m;
use crate::protocol::MAX_CLIENT_FRAME;
use crate::socket::{self, MAX_WRITE_BUFFER, READ_BUFFER, Session, Start, WRITE_BUFFER};
use crate::stream::{self, StreamError};

/// How often readiness re-checks the stream (and creates it if missing).
pub const READY_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How long a node that had the stream, and is still connected to NATS,
/// stays ready while stream checks fail. A stream leader election (4 to 8 s
/// in tests/cluster.rs) times the check out on every node at once; dropping
/// them all from the load balancer would refuse every new socket meanwhile,
/// while open sockets go on being served. Past this, the node is not ready.
pub const STREAM_CHECK_GRACE: Duration = Duration::from_secs(10);

/// How soon to look again while not ready: checking the connection state is
/// free, and a node should take traffic as soon as NATS is back.
pub const NOT_READY_RETRY: Duration = Duration::from_millis(100);

/// The user the readiness check asks the position of ([`position_check`]):
/// `%` is no character of a user id ([`crate::user::UserId::parse`]), so
/// the subject holds no one's events.
const POSITION_CHECK_USER: &str = "%position-check";

/// Slow-consumer reports come in bursts while a node is overloaded; a
/// catch-up of every user (a request to the stream leader each) runs at most
/// this often for them.
pub const DROP_CATCHUP_INTERVAL: Duration = Duration::from_secs(1);

/// Time allowed to flush pending NATS commands on exit.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Share of the drain window over which closes are spread; the rest is left
/// for the last sockets' close frames (bounded by the socket's close
/// timeout), so the process exits within the window.
pub const DRAIN_SPREAD: f64 = 0.8;

/// Shared by every request and socket.
pub struct AppState {
    pub config: Config,
    pub node_id: Arc<str>,
    pub hub: Arc<Hub>,
    pub client: async_nats::Client,
    pub metrics: PrometheusHandle,
    stream_ok: AtomicBool,
    draining: AtomicBool,
    sockets: AtomicUsize,
    next_conn: AtomicU64,
    tracker: TaskTracker,
}

impl AppState {
    /// `readers`: the connections for history reads ([`crate::nats::connect_readers`]).
    pub fn new(
        config: Config,
        client: async_nats::Client,
        readers: Vec<async_nats::Client>,
        metrics: PrometheusHandle,
    ) -> Arc<Self> {
        let hub = Hub::new(client.clone(), readers, config.stream.clone());
        Arc::new(Self {
            node_id: config.node_id.as_str().into(),
            config,
            hub,
            client,
            metrics,
            stream_ok: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            sockets: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            tracker: TaskTracker::new(),
        })
    }

    fn nats_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// NATS connected, the stream checked, and not draining.
    pub fn ready(&self) -> bool {
        self.nats_connected() && self.stream_ok.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text));
    if state.config.console {
        router = router.merge(crate::console::routes());
    }
    router.with_state(state)
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    let body = serde_json::json!({
        "ready": st.ready(),
        "nats_connected": st.nats_connected(),
        "stream_ok": st.stream_ok.load(Ordering::Acquire),
        "draining": st.draining.load(Ordering::Acquire),
        "node": &*st.node_id,
    });
    let code = if st.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}

#[derive(Debug, Deserialize)]
struct WsParams {
    token: Option<String>,
    /// Resume after this sequence (0: everything still stored).
    last_seq: Option<u64>,
    /// The epoch the client's `last_seq` belongs to.
    epoch: Option<String>,
    /// `frame`: the client sends its resume position as the first frame.
    resume: Option<String>,
}

impl WsParams {
    fn start(&self) -> Result<Start, &'static str> {
        match (self.last_seq, self.resume.as_deref()) {
            (Some(_), Some(_)) => Err("give last_seq or resume=frame, not both"),
            (Some(last_seq), None) => Ok(Start::After { last_seq, epoch: self.epoch.clone() }),
            (None, Some("frame")) => Ok(Start::Frame),
            (None, Some(_)) => Err("resume takes the value frame"),
            (None, None) => Ok(Start::Live),
        }
    }
}

/// A refusal before the upgrade: status, a fixed reason and a message.
fn refuse(status: StatusCode, reason: &'static str, message: String) -> Response {
    metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
    tracing::debug!(%status, reason, %message, "connection refused");
    (status, Json(serde_json::json!({ "error": reason, "message": message }))).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn ws_handler(
    State(st): State<Arc<AppState>>,
    Query(params): Query<WsParams>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if st.draining.load(Ordering::Acquire) {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "draining", "this node is draining; connect to another".into());
    }
    if !st.ready() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "this node is not connected to NATS yet".into());
    }
    if let (Some(allowed), Some(origin)) = (&st.config.allowed_origins, headers.get(header::ORIGIN)) {
        let origin = origin.to_str().unwrap_or("");
        if !allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) {
            return refuse(StatusCode::FORBIDDEN, "origin", format!("origin {origin:?} is not allowed"));
        }
    }
    let start = match params.start() {
        Ok(s) => s,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, "bad_request", why.into()),
    };
    let token = bearer(&headers).or(params.token.as_deref()).unwrap_or("");
    let identity = match st.config.auth.verify(token) {
        Ok(id) => id,
        Err(e @ AuthError::UserId(_)) => {
            return refuse(StatusCode::FORBIDDEN, e.reason(), e.to_string());
        }
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, e.reason(), e.to_string()),
    };
    // Reserve a slot before upgrading so the bound holds under a burst.
    if st.sockets.fetch_add(1, Ordering::AcqRel) >= st.config.max_connections {
        st.sockets.fetch_sub(1, Ordering::AcqRel);
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "capacity", "this node is at its connection limit".into());
    }
    let slot = Slot(st.clone());
    let conn_id = st.next_conn.fetch_add(1, Ordering::Relaxed);
    let tracked = st.tracker.token();
    // Every line of the socket carries its connection id; the user only
    // when the operator allows user ids in logs (--log-user-ids).
    let span = tracing::info_span!("conn", id = conn_id, user = tracing::field::Empty);
    if crate::user::log_user_ids() {
        span.record("user", identity.user.as_str());
    }
    let session = Session {
        conn_id,
        user: identity.user,
        node_id: st.node_id.clone(),
        token_exp: identity.close_at,
        queue: st.config.socket_queue,
        ping_interval: st.config.ping_interval,
        kicker: Arc::new(Kicker::default()),
        start,
    };
    // Boxed for the callback: axum's task keeps the callback's captures for
    // the socket's life, even once they are moved out (184 bytes inline).
    let parts = Box::new((session, span, tracked, slot));
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |ws| {
            let (session, span, tracked, slot) = *parts;
            metrics::counter!(m::CONNECTIONS_ACCEPTED).increment(1);
            metrics::gauge!(m::SOCKETS_OPEN).increment(1.0);
            span.in_scope(|| tracing::debug!("socket open"));
            // A combinator rather than an async block around the socket's
            // future: a block would hold the transport and the session twice
            // (once for the call, once inside the future) for the socket's life.
            socket::run(ws, st.hub.clone(), session)
                .map(move |end| {
                    let _tracked = tracked;
                    let _slot = slot;
                    metrics::gauge!(m::SOCKETS_OPEN).decrement(1.0);
                    metrics::counter!(m::DISCONNECTS, "reason" => end.label()).increment(1);
                    tracing::debug!(reason = end.label(), "socket closed");
                })
                .instrument(span)
        })
}

/// One reserved connection slot, released on drop (also when an upgrade
/// fails and the callback never runs).
struct Slot(Arc<AppState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Keeps `stream_ok` current. A stream that cannot be used as configured is
/// a configuration error: it is returned and the node exits with code 64.
async fn watch_stream(st: Arc<AppState>, stop: CancellationToken) -> Result<(), StreamError> {
    let js = async_nats::jetstream::new(st.client.clone());
    let mut first = true;
    let mut last_line = String::new();
    // When checks began to fail while the node was ready.
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        if st.nats_connected() {
            // A failing check is dated from its start: a timeout takes 5 s.
            let checked_at = tokio::time::Instant::now();
            let checked = match stream::ensure(&js, &st.config.stream).await {
                Ok(ensured) => position_check(&st).await.map(|()| ensured),
                Err(e) => Err(e),
            };
            match checked {
                Ok(ensured) => {
                    if first || (!ensured.as_configured && ensured.line != last_line) {
                        tracing::info!("{}", ensured.line);
                    }
                    first = false;
                    last_line = ensured.line;
                    let epoch = crate::history::epoch(&ensured.info);
                    if st.hub.observe_stream(epoch.clone(), ensured.info.state.last_sequence) {
                        metrics::counter!(m::STREAM_RESETS).increment(1);
                        tracing::warn!(
                            epoch,
                            "the stream was recreated; closing every socket so clients resume against it"
                        );
                    }
                    st.stream_ok.store(true, Ordering::Release);
                    failing_since = None;
                }
                Err(e) if e.is_config() => return Err(e),
                Err(e) => {
                    m::jetstream_error("stream_check");
                    let was_ok = st.stream_ok.load(Ordering::Acquire);
                    let since = *failing_since.get_or_insert(checked_at);
                    if was_ok && since.elapsed() < STREAM_CHECK_GRACE {
                        if since == checked_at {
                            tracing::warn!(error = %e, grace = ?STREAM_CHECK_GRACE, "stream check failed; still ready for now");
                        }
                    } else if st.stream_ok.swap(false, Ordering::AcqRel) || first {
                        tracing::warn!(error = %e, "stream check failed; not ready");
                    }
                }
            }
        } else {
            st.stream_ok.store(false, Ordering::Release);
            failing_since = None;
        }
        metrics::gauge!(m::READY).set(if st.ready() { 1.0 } else { 0.0 });
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(if st.ready() { READY_CHECK_INTERVAL } else { NOT_READY_RETRY }) => {}
        }
    }
}

/// A user's position is asked of the stream's leader
/// ([`crate::history::History::last`]), a request the node's NATS user may
/// not be allowed to make (deployments whose permissions predate it). Every
/// first socket of a user would then fail after a timeout, so the node is
/// not ready instead, and says what to grant. The subject asked for is one
/// no user id can name.
async fn position_check(st: &AppState) -> Result<(), StreamError> {
    match st.hub.history().last(POSITION_CHECK_USER).await {
        Ok(_) => Ok(()),
        Err(StreamError::Nats(e)) => Err(StreamError::Nats(format!(
            "{e}; a user's position is asked of the stream leader, so the node's NATS user must be allowed to publish to $JS.API.STREAM.MSG.GET.{}",
            st.config.stream.name
        ))),
        Err(e) => Err(e),
    }
}

/// Why [`run`] ended other than by a clean drain.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves until `shutdown` is cancelled, then drains: readiness turns false,
/// new sockets are refused with 503, and every socket gets a `reconnect` frame and
/// a close (1012), spread evenly over the drain window so the other nodes
/// are not hit by all of them at once.
pub async fn run(listener: TcpListener, st: Arc<AppState>, shutdown: CancellationToken) -> Result<(), RunError> {
    let stop_watch = CancellationToken::new();
    let mut watcher = tokio::spawn(watch_stream(st.clone(), stop_watch.clone()));
    let http_stop = CancellationToken::new();
    let serve = {
        let http_stop = http_stop.clone();
        let router = app(st.clone());
        tokio::spawn(async move {
            axum::serve(listener, router).with_graceful_shutdown(async move { http_stop.cancelled().await }).await
        })
    };
    // Wait for a shutdown request or a fatal stream error.
    let watcher_result = tokio::select! {
        _ = shutdown.cancelled() => None,
        r = &mut watcher => Some(r),
    };
    st.draining.store(true, Ordering::Release);
    metrics::gauge!(m::READY).set(0.0);
    stop_watch.cancel();
    // HTTP stays up through the drain: /readyz answers 503, /ws refuses with
    // 503 "draining", /metrics can still be scraped.
    drain(&st).await;
    http_stop.cancel();
    let _ = serve.await;
    // Bounded: with NATS unreachable a flush would wait for a reconnect.
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, st.client.flush()).await;
    match watcher_result {
        Some(Ok(Err(e))) => Err(e.into()),
        _ => Ok(()),
    }
}

async fn drain(st: &AppState) {
    let window = st.config.drain_window;
    let kickers = st.hub.kickers();
    let n = kickers.len();
    tracing::info!(sockets = n, window = ?window, "draining");
    let start = tokio::time::Instant::now();
    let spread = window.mul_f64(DRAIN_SPREAD);
    // Closed first so `wait` completes as soon as the last socket is gone,
    // also when clients leave on their own before their slot.
    st.tracker.close();
    for (i, k) in kickers.iter().enumerate() {
        tokio::select! {
            _ = tokio::time::sleep_until(start + spread.mul_f64(i as f64 / n.max(1) as f64)) => k.kick(Kick::Drain),
            _ = st.tracker.wait() => break,
        }
    }
    // Sockets whose upgrade was under way when the drain began.
    for k in st.hub.kickers() {
        k.kick(Kick::Drain);
    }
    let deadline = start + window;
    if tokio::time::timeout_at(deadline, st.tracker.wait()).await.is_err() {
        tracing::warn!(left = st.tracker.len(), "drain window passed with sockets still closing");
    }
    tracing::info!(elapsed = ?start.elapsed(), "drained");
}

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {err}")]
    Bind { addr: std::net::SocketAddr, err: std::io::Error },
    #[error("NATS: {0}")]
    Nats(anyhow::Error),
    #[error(transparent)]
    Run(#[from] RunError),
}

impl StartError {
    /// Exit code: 64 for configuration the operator must fix, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Run(RunError::Stream(e)) if e.is_config() => crate::config::EXIT_CONFIG,
            StartError::Nats(_) => crate::config::EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// Binds, connects to NATS and serves until `shutdown`; `on_listen` is told
/// the bound address (port 0 resolves here).
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> Result<(), StartError> {
    let metrics = m::install();
    crate::user::set_log_user_ids(config.log_user_ids);
    let listener =
        TcpListener::bind(config.listen).await.map_err(|err| StartError::Bind { addr: config.listen, err })?;
    let addr = listener.local_addr().map_err(|err| StartError::Bind { addr: config.listen, err })?;
    let signals = Arc::new(crate::nats::Signals::default());
    let client =
        crate::nats::connect(&config.nats, &config.node_id, signals.clone()).await.map_err(StartError::Nats)?;
    let readers = crate::nats::connect_readers(&config.nats, &config.node_id).await.map_err(StartError::Nats)?;
    if config.allowed_origins.is_none() {
        tracing::warn!(
            "no --allowed-origins: browser pages from any origin may open sockets (tokens are still required)"
        );
    }
    tracing::info!(node = %config.node_id, nats = %config.nats.login.shown, stream = %config.stream.name, "listening on {addr}");
    on_listen(addr);
    let st = AppState::new(config, client, readers, metrics);
    let catchup = tokio::spawn(catch_up_on_signals(st.hub.clone(), signals));
    let result = run(listener, st, shutdown).await;
    catchup.abort();
    result?;
    Ok(())
}

/// Makes every user catch up when NATS events mean messages may have been
/// missed: at once after a (re)connect; after dropped messages at most once
/// per [`DROP_CATCHUP_INTERVAL`], delayed rather than skipped so that drops
/// at the very end of a burst, which no later event reveals, are read too.
async fn catch_up_on_signals(hub: Arc<Hub>, signals: Arc<crate::nats::Signals>) {
    let mut last_drop_round: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = signals.connected.notified() => hub.catch_up_all(),
            _ = signals.dropped.notified() => {
                if let Some(t) = last_drop_round {
                    tokio::time::sleep_until(t + DROP_CATCHUP_INTERVAL).await;
                }
                last_drop_round = Some(tokio::time::Instant::now());
                hub.catch_up_all();
            }
        }
    }
}

/// Cancels the returned token on SIGTERM or SIGINT; a second signal exits at once.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received: draining (send again to exit now)");
        t.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(130);
    });
    token
}
