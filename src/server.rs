//! HTTP routes, the upgrade, readiness and the drain.
//!
//! [`run`] takes an already-bound listener (tests pass port 0) and a
//! cancellation token; cancelling it starts the drain. Connections are
//! accepted here rather than by `axum::serve`, which runs hyper without a
//! timer (so without a header-read timeout), does not bound connections that
//! have not finished their request, and waits for every one of them on
//! shutdown. Here each HTTP connection is counted and bounded
//! ([`Limits`]), a request's headers must arrive within
//! [`HEADER_READ_TIMEOUT`], and the drain ends on time whatever the
//! connections do ([`DRAIN_GRACE`]). Upgraded sockets are tracked with a
//! [`TaskTracker`] and a registry of their kickers, and closed by the drain.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::FutureExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::AuthError;
use crate::config::Config;
use crate::hub::{Hub, Kick, Kicker};
use crate::metrics as m;
use crate::protocol::{BAD_POSITION, MAX_CLIENT_FRAME, parse_position};
use crate::socket::{self, MAX_WRITE_BUFFER, READ_BUFFER, Session, Start, WRITE_BUFFER};
use crate::stream::{self, StreamError};
use crate::user::UserId;

/// Longest a client may take to send a request line and its headers,
/// counted from when the node starts waiting for them (a new connection, or
/// a kept-alive one after its previous response). Browsers, proxies and
/// health checkers send them in one packet right away; ten seconds covers a
/// slow mobile link many times over. A connection that is silent, or drips
/// its headers (slowloris), is closed without an answer when it passes.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// File descriptors kept for everything but client connections: stdio, the
/// runtime's epoll and wakers, the listener, the NATS connections (the live
/// one, one for requests, [`crate::nats::READ_CONNECTIONS`]), and what
/// libraries open (DNS, TLS files, a NATS reconnect's second socket). An idle
/// node used 15 with one NATS connection fewer (measured: 3 stdio, 3 for the
/// runtime, 9 sockets); the rest is headroom.
/// Connections are bounded to the process's
/// RLIMIT_NOFILE minus this, so an accept never fails with EMFILE (which
/// made `/healthz` and `/ws` unanswerable).
pub const FD_RESERVE: usize = 64;

/// Largest request head (request line and headers) read, in bytes: hyper's
/// read buffer per connection grows up to this. Tokens are at most 8 KiB
/// ([`crate::auth::MAX_TOKEN_LEN`]) and browsers' cookies for the origin a
/// few KiB more; nginx allows 32 KiB, Node.js 16 KiB. hyper's default (about
/// 400 KiB) would let [`MAX_HTTP_CONNECTIONS`] slow senders pin 400 MiB; at
/// this bound they pin about 64 MiB (hyper checks it between reads, so a
/// head that arrives in one read may overshoot it by that read). A bigger
/// head is answered 431 (414 when the request line alone is too long) with
/// an empty body.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Bytes a connection's kernel send buffer may hold not yet sent before the
/// socket stops being writable (`TCP_NOTSENT_LOWAT`, Linux). Without it,
/// Linux grows a send buffer up to `tcp_wmem`'s maximum (4 MiB by default):
/// a slow client's backlog would sit there as single frames, out of reach of
/// merging ([`crate::merge`]) and of the byte bound, and writes would seem
/// done long before the client could take them. Bytes already sent and
/// waiting for the client's acknowledgement do not count, so a client that
/// keeps up is not slowed. The smaller, the sooner a socket on a slow link
/// is found behind and the less stale text waits in the kernel for it; the
/// cost is a wake-up per this many bytes while a fast client's link is
/// full (a long replay). In `--preset tokens` (slow sockets reading
/// 1 KB/s, 2026-11-26): 16 KiB left their text 13 s old (p50) at 34 bytes
/// a token, 4 KiB 3.3 s at 21, 1 KiB 1.0 s at 18.
pub const NOTSENT_LOWAT: usize = 4 * 1024;

/// After an accept fails (out of file descriptors despite [`FD_RESERVE`],
/// or out of memory), the next attempt waits this long: the failure repeats
/// at once while the cause lasts, and a loop around it would spin a core.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// When the drain is over, HTTP connections still open (a scrape, a health
/// check, a half-sent request) get this long to finish before they are
/// dropped.
pub const CONNECTION_CLOSE_GRACE: Duration = Duration::from_millis(500);

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

/// Time allowed to flush pending NATS commands on exit.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Share of the drain window over which closes are spread; the rest is left
/// for the last sockets' close frames (bounded by the socket's close
/// timeout), so the process exits within the window (plus [`DRAIN_GRACE`]).
pub const DRAIN_SPREAD: f64 = 0.8;

/// What [`run`] may take past `--drain-window` after the drain began:
/// [`CONNECTION_CLOSE_GRACE`] for the HTTP connections, then
/// [`FLUSH_TIMEOUT`] for NATS. Sockets still open at the end of the window
/// are not waited for. A process manager should allow the window plus this
/// (and its own margin) before it kills the node.
pub const DRAIN_GRACE: Duration = Duration::from_millis(1500);

/// Connections that have not finished their request (or are between
/// requests), at most, unless the open-file limit allows fewer
/// ([`Limits`]). Each costs a file descriptor and a read buffer of 8 KiB,
/// up to [`MAX_REQUEST_HEAD`] for a client sending a big head. When the
/// bound is reached, the oldest of them is closed to make room for the new
/// one: a flood of silent connections then cannot lock out health checks
/// and honest clients, who send their request at once.
///
/// Socket slots not in use count too ([`AppState::admit`]): in a reconnect
/// storm (10,000 sockets at once after a node dies) thousands of honest
/// upgrades are under way together while the node's CPU catches up, and a
/// bound of this alone closed 777 of 10,000 in `cargo bench --bench resume`.
/// Every pending connection is still an upgrade that would take a slot.
pub const MAX_HTTP_CONNECTIONS: usize = 1024;

/// The bounds on connections in force: `--max-connections` and
/// [`MAX_HTTP_CONNECTIONS`], lowered when the process may not open that
/// many files. Together, sockets and HTTP connections never need more than
/// RLIMIT_NOFILE minus [`FD_RESERVE`] descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Upgraded sockets (and upgrades under way); more get 503 `capacity`.
    pub sockets: usize,
    /// Connections that are not sockets; at the bound the oldest is closed.
    pub http: usize,
}

impl Limits {
    /// `open_files`: the soft RLIMIT_NOFILE, if known. Returns the limits
    /// and, when they are lower than asked for, why.
    pub fn new(max_connections: usize, open_files: Option<u64>) -> (Self, Option<String>) {
        let asked = Self { sockets: max_connections, http: MAX_HTTP_CONNECTIONS };
        let Some(files) = open_files else { return (asked, None) };
        let budget = usize::try_from(files).unwrap_or(usize::MAX).saturating_sub(FD_RESERVE).max(2);
        if asked.sockets.saturating_add(asked.http) <= budget {
            return (asked, None);
        }
        // HTTP connections get at most half: health checks need only a few,
        // and sockets are what the node is for.
        let http = asked.http.min(budget / 2);
        let limits = Self { sockets: asked.sockets.min(budget - http), http };
        let why = format!(
            "the open-file limit ({files}) allows {budget} connections after {FD_RESERVE} kept for the node itself; \
             serving at most {} sockets (--max-connections {}) and {} other HTTP connections: \
             raise the limit (ulimit -n, systemd LimitNOFILE=) to at least {} for the configured bounds",
            limits.sockets,
            asked.sockets,
            limits.http,
            asked.sockets as u128 + asked.http as u128 + FD_RESERVE as u128,
        );
        (limits, Some(why))
    }
}

/// Raises the soft open-file limit to the hard one (as Go and nginx do: the
/// soft default of 1024 is a leftover of `select`, which this process does
/// not use) and returns the soft limit in force.
fn open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// Shared by every request and socket.
pub struct AppState {
    pub config: Config,
    pub node_id: Arc<str>,
    pub hub: Arc<Hub>,
    pub client: async_nats::Client,
    pub metrics: PrometheusHandle,
    pub limits: Limits,
    /// What sockets need to send control requests.
    pub control: Arc<crate::control::Node>,
    /// `POST /control`'s per-user budgets.
    http_control: crate::control::Http,
    stream_ok: AtomicBool,
    draining: AtomicBool,
    /// The reserved sockets, from the reservation before the upgrade to the
    /// socket's end.
    sockets: Mutex<Reserved>,
    next_conn: AtomicU64,
    tracker: TaskTracker,
    /// HTTP connections that are not sockets.
    http: Mutex<HttpConns>,
    /// Told when an HTTP connection is gone.
    http_freed: tokio::sync::Notify,
    next_http: AtomicU64,
    /// The HTTP connections' tasks (not the sockets': those are `tracker`'s).
    connections: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AppState {
    /// `live`: the users' subscriptions ([`crate::live`]); `readers`: the
    /// connections for history reads ([`crate::nats::connect_readers`]).
    pub fn new(
        config: Config,
        client: async_nats::Client,
        live: crate::live::Live,
        readers: Vec<async_nats::Client>,
        metrics: PrometheusHandle,
    ) -> Arc<Self> {
        let hub = Hub::new(client.clone(), live, readers, config.stream.clone());
        let (limits, lowered) = Limits::new(config.max_connections, open_file_limit());
        if let Some(why) = lowered {
            tracing::warn!("{why}");
        }
        let node_id: Arc<str> = config.node_id.as_str().into();
        let control = Arc::new(crate::control::Node {
            settings: config.control.clone(),
            client: client.clone(),
            node_id: node_id.clone(),
        });
        Arc::new(Self {
            limits,
            node_id,
            http_control: crate::control::Http::new(control.clone()),
            control,
            config,
            hub,
            client,
            metrics,
            stream_ok: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            sockets: Mutex::default(),
            next_conn: AtomicU64::new(1),
            tracker: TaskTracker::new(),
            http: Mutex::new(HttpConns::default()),
            http_freed: tokio::sync::Notify::new(),
            next_http: AtomicU64::new(1),
            connections: TaskTracker::new(),
        })
    }

    /// Counts a new HTTP connection. The bound is [`MAX_HTTP_CONNECTIONS`]
    /// plus the socket slots not in use, so that sockets and HTTP
    /// connections together stay within the open-file budget ([`Limits`]).
    /// At the bound the oldest one is asked to close, and this waits until it
    /// has (its file descriptor is released), so the bound holds for
    /// descriptors, not only for tasks. `None` if `stop` comes first.
    async fn admit(self: &Arc<Self>, stop: &CancellationToken) -> Option<HttpConn> {
        let id = self.next_http.fetch_add(1, Ordering::Relaxed);
        loop {
            let freed = self.http_freed.notified();
            let mut freed = std::pin::pin!(freed);
            {
                let mut h = lock(&self.http);
                let bound = self.limits.http + self.limits.sockets.saturating_sub(lock(&self.sockets).kickers.len());
                // Closing ones still hold their descriptor: they count.
                let need = (h.open.len() + h.closing + 1).saturating_sub(bound);
                while h.closing < need {
                    let Some((_, oldest)) = h.open.pop_first() else { break };
                    oldest.cancel();
                    h.closing += 1;
                    let http = "http";
                    metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "http_capacity", "transport" => http)
                        .increment(1);
                }
                if h.open.len() + h.closing < bound {
                    let close = CancellationToken::new();
                    h.open.insert(id, close.clone());
                    return Some(HttpConn { st: self.clone(), id, close });
                }
                // Registered before the lock is released: a release in
                // between still wakes us.
                freed.as_mut().enable();
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = freed => {}
            }
        }
    }

    /// Reserves a socket slot of `user` for `kicker`: refused while draining
    /// (checked under the registry's lock, so a reservation either is seen
    /// by the drain or sees the drain), at the user's bound
    /// (`--max-sockets-per-user`), and at the node's. Counted here, before
    /// the upgrade, so a burst of upgrades cannot pass either bound; O(1).
    fn reserve(self: &Arc<Self>, id: u64, user: &UserId, kicker: Arc<Kicker>) -> Result<Slot, NoSlot> {
        let mut reserved = lock(&self.sockets);
        if self.draining.load(Ordering::Acquire) {
            return Err(NoSlot::Draining);
        }
        let of_user = reserved.per_user.get(user).copied().unwrap_or(0);
        if let Some(max) = self.config.max_sockets_per_user
            && of_user >= max
        {
            return Err(NoSlot::UserCapacity(max));
        }
        if reserved.kickers.len() >= self.limits.sockets {
            return Err(NoSlot::Capacity);
        }
        reserved.kickers.insert(id, kicker);
        match reserved.per_user.get_mut(user) {
            Some(n) => *n += 1,
            None => {
                reserved.per_user.insert(user.clone(), 1);
            }
        }
        Ok(Slot { st: self.clone(), id, user: user.clone() })
    }

    /// The HTTP connection `id` now serves an event stream, counted with the
    /// sockets: it leaves the HTTP connections' bound, and is never closed to
    /// make room for them.
    fn held_by_stream(&self, id: u64) {
        let mut h = lock(&self.http);
        if h.open.remove(&id).is_some() {
            h.streams.insert(id);
        }
        drop(h);
        self.http_freed.notify_one();
    }

    /// Both the live connection and the one for everything else.
    fn nats_connected(&self) -> bool {
        self.hub.live_connected() && self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// NATS connected, the stream checked, and not draining.
    pub fn ready(&self) -> bool {
        self.nats_connected() && self.stream_ok.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws_handler))
        .route("/sse", get(sse_handler))
        .route("/control", axum::routing::post(control_handler))
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
    let mut text = st.metrics.render();
    m::render_bucketed(&mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[derive(Debug, Deserialize)]
struct WsParams {
    token: Option<String>,
    /// Resume after this sequence (0: everything still stored). Taken as
    /// text so that a bad value gets the documented JSON refusal rather
    /// than the framework's plain-text one.
    last_seq: Option<String>,
    /// The epoch the client's `last_seq` belongs to.
    epoch: Option<String>,
    /// `frame`: the client sends its resume position as the first frame.
    resume: Option<String>,
}

impl WsParams {
    fn start(&self) -> Result<Start, &'static str> {
        match (self.last_seq.as_deref(), self.resume.as_deref()) {
            (Some(_), Some(_)) => Err("give last_seq or resume=frame, not both"),
            (Some(text), None) => match parse_position(text) {
                Some(last_seq) => Ok(Start::After { last_seq, epoch: self.epoch.clone() }),
                None => Err(BAD_POSITION),
            },
            (None, Some("frame")) => Ok(Start::Frame),
            (None, Some(_)) => Err("resume takes the value frame"),
            (None, None) => Ok(Start::Live),
        }
    }
}

/// A refusal before the upgrade: status, a fixed reason and a message.
fn refuse(transport: Transport, status: StatusCode, reason: &'static str, message: String) -> Response {
    metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => reason, "transport" => transport.label()).increment(1);
    tracing::debug!(%status, reason, %message, "connection refused");
    (status, Json(serde_json::json!({ "error": reason, "message": message }))).into_response()
}

const DRAINING: &str = "this node is draining; connect to another";

/// The token from the `Authorization` header: `Ok(None)` without one. A
/// header that is there but is not one `Bearer <token>` is refused rather
/// than passed over for `?token=`: a client that sends it meant it.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, &'static str> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let Some(v) = all.next() else { return Ok(None) };
    if all.next().is_some() {
        return Err("give one Authorization header");
    }
    let v = v.to_str().map_err(|_| "the Authorization header is not ASCII")?;
    match v.trim().split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(Some(token.trim()))
        }
        _ => Err("the Authorization header must be `Bearer <token>`"),
    }
}

/// RFC 6455 4.2.1: the key is 16 random bytes in base64; anything else is
/// not a WebSocket client's handshake.
fn valid_key(headers: &HeaderMap) -> bool {
    use base64::Engine as _;
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k.as_bytes()).ok())
        .is_some_and(|k| k.len() == 16)
}

/// Refuses a request that is not a WebSocket handshake, with axum's status
/// (400, or 426 for HTTP/1.0, which cannot upgrade) and a JSON body.
fn not_websocket(rejection: WebSocketUpgradeRejection) -> Response {
    let status = rejection.status();
    let message = match rejection {
        // hyper offers no upgrade on HTTP/1.0; axum's text does not say so.
        WebSocketUpgradeRejection::ConnectionNotUpgradable(_) => "WebSocket needs HTTP/1.1 or later".into(),
        other => other.body_text(),
    };
    refuse(Transport::WebSocket, status, "not_websocket", message)
}

async fn ws_handler(
    State(st): State<Arc<AppState>>,
    query: Result<Query<WsParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return not_websocket(rejection),
    };
    if !valid_key(&headers) {
        let why = "Sec-WebSocket-Key must be 16 bytes in base64";
        return refuse(Transport::WebSocket, StatusCode::BAD_REQUEST, "not_websocket", why.into());
    }
    let params = match query {
        Ok(Query(p)) => p,
        Err(e) => return refuse(Transport::WebSocket, StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    let Admitted { session, span, tracked, slot } =
        match admit_client(&st, &headers, params.token.as_deref(), params.start(), Transport::WebSocket) {
            Ok(a) => a,
            Err(refused) => return refused,
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
            let transport = Transport::WebSocket.label();
            metrics::counter!(m::CONNECTIONS_ACCEPTED, "transport" => transport).increment(1);
            metrics::gauge!(m::SOCKETS_OPEN, "transport" => transport).increment(1.0);
            span.in_scope(|| tracing::debug!("socket open"));
            // A combinator rather than an async block around the socket's
            // future: a block would hold the transport and the session twice
            // (once for the call, once inside the future) for the socket's life.
            socket::run(ws, st.hub.clone(), session)
                .map(move |end| {
                    let _tracked = tracked;
                    let _slot = slot;
                    metrics::gauge!(m::SOCKETS_OPEN, "transport" => transport).decrement(1.0);
                    metrics::counter!(m::DISCONNECTS, "reason" => end.label(), "transport" => transport).increment(1);
                    tracing::debug!(reason = end.label(), "socket closed");
                })
                .instrument(span)
        })
}

/// Which transport a client uses: its checks and its slot are the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    /// Server-Sent Events ([`crate::sse`]).
    Sse,
}

impl Transport {
    /// The `transport` label of the per-connection metrics.
    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// A client admitted to a slot, ready to be served.
struct Admitted {
    session: Session,
    span: tracing::Span,
    tracked: tokio_util::task::task_tracker::TaskTrackerToken,
    slot: Slot,
}

/// The checks `/ws` and `/sse` share, in order: not draining, ready, the
/// origin, the position (`start`, parsed by the caller), the token, and a
/// slot under the node's and the user's bounds. A refusal is the response
/// to send.
// A refusal is the response itself, returned once per connection attempt:
// boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
fn admit_client(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    query_token: Option<&str>,
    start: Result<Start, &'static str>,
    transport: Transport,
) -> Result<Admitted, Response> {
    if st.draining.load(Ordering::Acquire) {
        return Err(refuse(transport, StatusCode::SERVICE_UNAVAILABLE, "draining", DRAINING.into()));
    }
    if !st.ready() {
        let why = "this node is not connected to NATS yet";
        return Err(refuse(transport, StatusCode::SERVICE_UNAVAILABLE, "not_ready", why.into()));
    }
    check_origin(st, headers, transport)?;
    let start = start.map_err(|why| refuse(transport, StatusCode::BAD_REQUEST, "bad_request", why.into()))?;
    let identity = verify_token(st, headers, query_token, transport)?;
    let conn_id = st.next_conn.fetch_add(1, Ordering::Relaxed);
    let kicker = Arc::new(Kicker::default());
    // Reserved before upgrading so the bounds hold under a burst, and so the
    // drain reaches the socket however late its upgrade completes.
    let slot = st.reserve(conn_id, &identity.user, kicker.clone()).map_err(|no| no.refuse(transport))?;
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
        exp: identity.exp,
        auth: st.config.auth.clone(),
        queue_bytes: st.config.socket_queue_bytes,
        ping_interval: st.config.ping_interval,
        kicker,
        start,
        control: st.control.clone(),
        transport,
    };
    Ok(Admitted { session, span, tracked, slot })
}

/// `--allowed-origins` against the request's `Origin` (requests without one,
/// from programs rather than pages, pass).
#[allow(clippy::result_large_err)] // as admit_client
fn check_origin(st: &AppState, headers: &HeaderMap, transport: Transport) -> Result<(), Response> {
    if let (Some(allowed), Some(origin)) = (&st.config.allowed_origins, headers.get(header::ORIGIN)) {
        let origin = origin.to_str().unwrap_or("");
        if !allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) {
            return Err(refuse(
                transport,
                StatusCode::FORBIDDEN,
                "origin",
                format!("origin {origin:?} is not allowed"),
            ));
        }
    }
    Ok(())
}

/// The token (`Authorization: Bearer`, else `?token=`), verified.
#[allow(clippy::result_large_err)] // as admit_client
fn verify_token(
    st: &AppState,
    headers: &HeaderMap,
    query_token: Option<&str>,
    transport: Transport,
) -> Result<crate::auth::Identity, Response> {
    let token = match bearer(headers) {
        Ok(t) => t.or(query_token).unwrap_or(""),
        Err(why) => return Err(refuse(transport, StatusCode::UNAUTHORIZED, AuthError::Malformed.reason(), why.into())),
    };
    match st.config.auth.verify(token) {
        Ok(id) => Ok(id),
        Err(e @ AuthError::UserId(_)) => Err(refuse(transport, StatusCode::FORBIDDEN, e.reason(), e.to_string())),
        Err(e) => Err(refuse(transport, StatusCode::UNAUTHORIZED, e.reason(), e.to_string())),
    }
}

/// The query of `POST /control`: the token, for clients that cannot set
/// headers (as on `/sse`).
#[derive(Deserialize)]
struct TokenParam {
    token: Option<String>,
}

/// `POST /control`: a control request (docs/protocol.md section 9) for a
/// client on an event stream, which sends no frames. The token and origin
/// are checked as for a socket; the body is the `control` frame a socket
/// would send, at most [`MAX_CLIENT_FRAME`] bytes; the answer is the frame a
/// socket would get, with an HTTP status for its outcome.
async fn control_handler(
    State(st): State<Arc<AppState>>,
    query: Result<Query<TokenParam>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let token = match &query {
        Ok(Query(p)) => p.token.as_deref(),
        Err(e) => return refuse(Transport::Sse, StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    if let Err(refused) = check_origin(&st, &headers, Transport::Sse) {
        return refused;
    }
    let identity = match verify_token(&st, &headers, token, Transport::Sse) {
        Ok(id) => id,
        Err(refused) => return refused,
    };
    let json = |status: StatusCode, frame: String| {
        (status, [(header::CONTENT_TYPE, "application/json")], frame).into_response()
    };
    let error = |status: StatusCode, message: String| {
        metrics::counter!(m::CONTROL_REQUESTS, "outcome" => crate::control::Outcome::BadFrame.label()).increment(1);
        json(status, crate::protocol::ServerFrame::Error { code: "bad_frame", message: &message }.to_text().to_string())
    };
    let bytes = match axum::body::to_bytes(body, MAX_CLIENT_FRAME).await {
        Ok(b) => b,
        Err(_) => {
            let why = format!("control requests are limited to {MAX_CLIENT_FRAME} bytes");
            return error(StatusCode::PAYLOAD_TOO_LARGE, why);
        }
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return error(StatusCode::BAD_REQUEST, "the body must be UTF-8 JSON".into());
    };
    let (outcome, frame) = st.http_control.handle(&identity.user, text).await;
    json(control_status(outcome), frame.to_string())
}

/// The HTTP status of a control request's outcome.
fn control_status(outcome: crate::control::Outcome) -> StatusCode {
    use crate::control::Outcome;
    match outcome {
        Outcome::Ok => StatusCode::OK,
        Outcome::BadFrame => StatusCode::BAD_REQUEST,
        Outcome::RateLimited | Outcome::TooManyPending => StatusCode::TOO_MANY_REQUESTS,
        Outcome::Disabled => StatusCode::NOT_IMPLEMENTED,
        Outcome::BadReply => StatusCode::BAD_GATEWAY,
        Outcome::Timeout => StatusCode::GATEWAY_TIMEOUT,
        Outcome::NoAgent | Outcome::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The query of `/sse`: as `/ws`'s, without `resume=frame` (the client of a
/// response sends no frames).
#[derive(Deserialize)]
struct SseParams {
    token: Option<String>,
    last_seq: Option<String>,
    epoch: Option<String>,
}

/// The connection a request came on, so that `/sse` can take its response's
/// connection out of the HTTP connections' bound ([`AppState::admit`]): a
/// stream is counted as a socket.
#[derive(Clone, Copy)]
struct ConnTag(u64);

async fn sse_handler(
    State(st): State<Arc<AppState>>,
    conn: Option<axum::Extension<ConnTag>>,
    query: Result<Query<SseParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let params = match query {
        Ok(Query(p)) => p,
        Err(e) => return refuse(Transport::Sse, StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    // The browser's own reconnect sends the last id it saw, which is newer
    // than the position in the URL it first opened.
    let start = match headers.get("last-event-id").map(|v| v.to_str().ok().and_then(crate::sse::last_event_id)) {
        Some(Some((last_seq, epoch))) => Ok(Start::After { last_seq, epoch: Some(epoch) }),
        Some(None) => Err("Last-Event-ID must be <epoch>:<seq>, as the node sent it"),
        None => match params.last_seq.as_deref() {
            Some(text) => parse_position(text)
                .map(|last_seq| Start::After { last_seq, epoch: params.epoch.clone() })
                .ok_or(BAD_POSITION),
            None => Ok(Start::Live),
        },
    };
    let Admitted { session, span, tracked, slot } =
        match admit_client(&st, &headers, params.token.as_deref(), start, Transport::Sse) {
            Ok(a) => a,
            Err(refused) => return refused,
        };
    if let Some(axum::Extension(ConnTag(id))) = conn {
        st.held_by_stream(id);
    }
    let (transport, body) = crate::sse::Transport::new();
    let sse = Transport::Sse.label();
    metrics::counter!(m::CONNECTIONS_ACCEPTED, "transport" => sse).increment(1);
    metrics::gauge!(m::SOCKETS_OPEN, "transport" => sse).increment(1.0);
    span.in_scope(|| tracing::debug!("event stream open"));
    let served = socket::run(transport, st.hub.clone(), session).map(move |end| {
        let _tracked = tracked;
        let _slot = slot;
        metrics::gauge!(m::SOCKETS_OPEN, "transport" => sse).decrement(1.0);
        metrics::counter!(m::DISCONNECTS, "reason" => end.label(), "transport" => sse).increment(1);
        tracing::debug!(reason = end.label(), "event stream closed");
    });
    tokio::spawn(served.instrument(span));
    let body = futures_util::stream::unfold(body, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    let headers = [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
        // nginx and others buffer responses unless told not to.
        (header::HeaderName::from_static("x-accel-buffering"), "no"),
        // The connection ends with the stream: it left the HTTP connections'
        // bound for the stream's life (`held_by_stream`), so it must not
        // serve further requests outside both bounds.
        (header::CONNECTION, "close"),
    ];
    (headers, axum::body::Body::from_stream(body)).into_response()
}

/// Why [`AppState::reserve`] gave no slot.
enum NoSlot {
    Draining,
    /// The user has this many sockets on the node, its bound.
    UserCapacity(usize),
    Capacity,
}

impl NoSlot {
    fn refuse(self, transport: Transport) -> Response {
        match self {
            NoSlot::Draining => refuse(transport, StatusCode::SERVICE_UNAVAILABLE, "draining", DRAINING.into()),
            NoSlot::UserCapacity(max) => refuse(
                transport,
                StatusCode::TOO_MANY_REQUESTS,
                "user_capacity",
                format!("this user has {max} sockets open on this node, the most allowed; close one first"),
            ),
            NoSlot::Capacity => refuse(
                transport,
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity",
                "this node is at its connection limit".into(),
            ),
        }
    }
}

/// The reserved sockets: each one's kicker, by connection id, so the drain
/// reaches sockets that have not joined their user yet (waiting for a
/// `resume` frame, or still upgrading); and how many each user holds, for
/// `--max-sockets-per-user`. A user is in `per_user` only while it holds
/// one, so the map is bounded by the sockets.
#[derive(Default)]
struct Reserved {
    kickers: HashMap<u64, Arc<Kicker>>,
    per_user: HashMap<UserId, usize>,
}

/// One reserved socket slot, released on drop (also when an upgrade fails
/// and the callback never runs).
struct Slot {
    st: Arc<AppState>,
    id: u64,
    user: UserId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut reserved = lock(&self.st.sockets);
        reserved.kickers.remove(&self.id);
        if let Some(n) = reserved.per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                reserved.per_user.remove(&self.user);
            }
        }
    }
}

/// One counted HTTP connection; uncounted on drop.
struct HttpConn {
    st: Arc<AppState>,
    id: u64,
    /// Cancelled to close the connection at once (it was the oldest when
    /// the bound was reached).
    close: CancellationToken,
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        {
            let mut h = lock(&self.st.http);
            if h.open.remove(&self.id).is_none() && !h.streams.remove(&self.id) {
                // Asked to close as the oldest: it was counted as closing.
                h.closing -= 1;
            }
        }
        self.st.http_freed.notify_one();
    }
}

/// The HTTP connections that are not sockets.
#[derive(Default)]
struct HttpConns {
    /// Oldest first, each with the token that closes it.
    open: BTreeMap<u64, CancellationToken>,
    /// Asked to close to make room, and not gone yet.
    closing: usize,
    /// Serving an event stream (`/sse`): counted as sockets (their slots),
    /// so neither here nor closed to make room.
    streams: std::collections::HashSet<u64>,
}

/// Accepts connections until `stop`, serving each with HTTP/1.1 (WebSocket
/// clients upgrade from it; HTTP/2 is not offered, so the header-read
/// timeout covers every connection). Each connection runs until it ends,
/// is upgraded, is closed as the oldest at the bound, or `stop` comes.
async fn serve(listener: TcpListener, st: Arc<AppState>, stop: CancellationToken) {
    let router = app(st.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_REQUEST_HEAD);
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    limit_unsent(&tcp);
                    tcp
                }
                Err(e) => {
                    tracing::warn!(error = %e, backoff = ?ACCEPT_ERROR_BACKOFF, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some(conn) = st.admit(&stop).await else { break };
        let tagged = router.clone().layer(axum::Extension(ConnTag(conn.id)));
        let serving = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(tagged)).with_upgrades();
        st.connections.spawn(run_connection(serving, conn, stop.clone()));
    }
}

/// Sets [`NOTSENT_LOWAT`] on an accepted connection; where it cannot be
/// set, the connection works as without it (writes complete into a bigger
/// kernel buffer), so a failure is logged at debug level only.
fn limit_unsent(tcp: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let value = libc::c_int::try_from(NOTSENT_LOWAT).unwrap_or(libc::c_int::MAX);
        // SAFETY: the descriptor is open (owned by `tcp`), and the option
        // value is a c_int of the given length, as setsockopt(2) reads it.
        let rc = unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&raw const value).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tcp;
}

type Serving = hyper::server::conn::http1::UpgradeableConnection<TokioIo<TcpStream>, TowerToHyperService<Router>>;

async fn run_connection(serving: Serving, conn: HttpConn, stop: CancellationToken) {
    let mut serving = std::pin::pin!(serving);
    tokio::select! {
        ended = serving.as_mut() => {
            // A header-read timeout ends here too.
            if let Err(e) = ended {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        }
        _ = conn.close.cancelled() => tracing::debug!("closed the oldest HTTP connection to make room"),
        _ = stop.cancelled() => {
            serving.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CONNECTION_CLOSE_GRACE, serving).await;
        }
    }
}

/// Keeps `stream_ok` current. A stream that cannot be used as configured is
/// a configuration error: it is returned and the node exits with code 64.
async fn watch_stream(st: Arc<AppState>, stop: CancellationToken) -> Result<(), StreamError> {
    let js = async_nats::jetstream::new(st.client.clone());
    let mut first = true;
    let mut last_lines = vec![String::new(); st.config.stream.partitions as usize];
    let mut previous_said = vec![String::new(); st.hub.previous().len()];
    // The last failure logged while not ready.
    let mut last_failure = String::new();
    // When checks began to fail while the node was ready.
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        if st.nats_connected() {
            // A failing check is dated from its start: a timeout takes 5 s.
            let checked_at = tokio::time::Instant::now();
            let checked = check_streams(&js, &st, &mut previous_said).await;
            match checked {
                Ok(streams) => {
                    for (k, ensured) in streams.into_iter().enumerate() {
                        let stream = ensured.info.config.name.as_str();
                        if first || (!ensured.as_configured && ensured.line != last_lines[k]) {
                            tracing::info!("{}", ensured.line);
                        }
                        if first {
                            for w in stream::warnings(&ensured.info.config) {
                                tracing::warn!(stream, "{w}");
                            }
                        }
                        let epoch = crate::history::epoch(&ensured.info);
                        let last = ensured.info.state.last_sequence;
                        // One series per stream: as many as partitions.
                        metrics::gauge!(m::STREAM_LAST_SEQUENCE, "stream" => stream.to_owned()).set(last as f64);
                        if st.hub.observe_stream(k as u32, epoch.clone(), last) {
                            metrics::counter!(m::STREAM_RESETS).increment(1);
                            tracing::warn!(
                                stream,
                                epoch,
                                "the stream was recreated; closing its users' sockets so their clients resume against it"
                            );
                        }
                        last_lines[k] = ensured.line;
                    }
                    first = false;
                    st.stream_ok.store(true, Ordering::Release);
                    failing_since = None;
                    last_failure.clear();
                }
                Err(e) if e.is_config() => return Err(e),
                Err(e) => {
                    m::jetstream_error("stream_check");
                    let was_ok = st.stream_ok.load(Ordering::Acquire);
                    let since = *failing_since.get_or_insert(checked_at);
                    // A mapping that disagrees or a sealed stream is not a
                    // passing election: it lasts until an operator acts.
                    if was_ok && !e.is_layout() && since.elapsed() < STREAM_CHECK_GRACE {
                        if since == checked_at {
                            tracing::warn!(error = %e, grace = ?STREAM_CHECK_GRACE, "stream check failed; still ready for now");
                        }
                    } else {
                        // Once per failure, not every retry (NOT_READY_RETRY).
                        let said = e.to_string();
                        if st.stream_ok.swap(false, Ordering::AcqRel) || said != last_failure {
                            tracing::warn!(error = %e, "stream check failed; not ready");
                            last_failure = said;
                        }
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

/// Checks each stream of the previous layout (`--stream-previous`) at
/// every readiness check: a sealed one's epoch is learned, so that clients
/// resuming from it are continued into this layout
/// ([`crate::hub::Hub::previous_for`]); one that is not sealed keeps the
/// node not ready (events could still land there after a client moved on);
/// a missing one (deleted once no position in it could be resumed) is
/// forgotten, and such clients are told of a `stream_reset` as before. Each
/// change is logged once.
async fn learn_previous(
    js: &async_nats::jetstream::Context,
    st: &AppState,
    said: &mut [String],
) -> Result<(), StreamError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    for (p, said) in st.hub.previous().iter().zip(said.iter_mut()) {
        let name = p.name();
        let epoch = match js.get_stream(name).await {
            Ok(mut stream) => {
                let info = stream.info().await.map_err(|e| StreamError::Nats(format!("stream info {name}: {e}")))?;
                if !info.config.sealed {
                    p.forget();
                    return Err(StreamError::PreviousUnsealed(name.to_owned()));
                }
                Some(crate::history::epoch(info))
            }
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(je)
                    if je.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    None
                }
                _ => return Err(StreamError::Nats(format!("looking up previous stream {name}: {e}"))),
            },
        };
        let line = match &epoch {
            Some(epoch) => format!(
                "previous stream {name} is sealed (epoch {epoch}): clients resuming from it get its rest, then this layout"
            ),
            None => format!("previous stream {name} not found: clients resuming from it are told of a stream_reset"),
        };
        match epoch {
            Some(epoch) => p.set_epoch(epoch),
            None => p.forget(),
        }
        if line != *said {
            tracing::info!("{line}");
            *said = line;
        }
    }
    Ok(())
}

/// Every partition's stream ensured ([`stream::ensure`]) and its position
/// check passed, in partition order; then the account's mapping checked
/// ([`stream::check_mapping`]) and the previous layout's streams
/// ([`learn_previous`]).
async fn check_streams(
    js: &async_nats::jetstream::Context,
    st: &AppState,
    previous_said: &mut [String],
) -> Result<Vec<stream::Ensured>, StreamError> {
    let mut streams = Vec::with_capacity(st.hub.parts().len());
    for (k, part) in st.hub.parts().iter().enumerate() {
        streams.push(stream::ensure(js, &st.config.stream, k as u32).await?);
        position_check(part.history(), part.name()).await?;
    }
    stream::check_mapping(&st.client, &st.config.stream).await?;
    learn_previous(js, st, previous_said).await?;
    Ok(streams)
}

/// A user's position is asked of the stream's leader
/// ([`crate::history::History::last`]), a request the node's NATS user may
/// not be allowed to make (deployments whose permissions predate it). Every
/// first socket of a user would then fail after a timeout, so the node is
/// not ready instead, and says what to grant. The subject asked for is one
/// no user id can name.
async fn position_check(history: &crate::history::History, name: &str) -> Result<(), StreamError> {
    match history.last(POSITION_CHECK_USER).await {
        Ok(_) => Ok(()),
        Err(StreamError::Nats(e)) => Err(StreamError::Nats(format!(
            "{e}; a user's position is asked of the stream leader, so the node's NATS user must be allowed to publish to $JS.API.STREAM.MSG.GET.{name}"
        ))),
        Err(e) => Err(e),
    }
}

/// Why [`run`] ended other than by a clean drain.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// Serves until `shutdown` is cancelled, then drains: readiness turns false,
/// new sockets are refused with 503, and every socket gets a `reconnect` frame and
/// a close (1012), spread evenly over the drain window so the other nodes
/// are not hit by all of them at once. Returns within the window plus
/// [`DRAIN_GRACE`].
pub async fn run(listener: TcpListener, st: Arc<AppState>, shutdown: CancellationToken) -> Result<(), RunError> {
    let stop_watch = CancellationToken::new();
    let mut watcher = tokio::spawn(watch_stream(st.clone(), stop_watch.clone()));
    let http_stop = CancellationToken::new();
    let serving = tokio::spawn(serve(listener, st.clone(), http_stop.clone()));
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
    // Whatever the HTTP connections do, they are gone within the grace;
    // sockets still closing are not waited for.
    http_stop.cancel();
    let _ = serving.await;
    st.connections.close();
    if tokio::time::timeout(CONNECTION_CLOSE_GRACE, st.connections.wait()).await.is_err() {
        tracing::debug!(left = st.connections.len(), "HTTP connections still closing at exit");
    }
    // Bounded: with NATS unreachable a flush would wait for a reconnect.
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, st.client.flush()).await;
    match watcher_result {
        Some(Ok(Err(e))) => Err(e.into()),
        _ => Ok(()),
    }
}

async fn drain(st: &AppState) {
    let window = st.config.drain_window;
    // Every socket reserved before `draining` was set, joined or not; later
    // ones are refused (see [`AppState::reserve`]). A socket kicked before it
    // runs sees the kick as soon as it waits for one.
    let kickers: Vec<Arc<Kicker>> = lock(&st.sockets).kickers.values().cloned().collect();
    let n = kickers.len();
    tracing::info!(sockets = n, window = ?window, "draining");
    let start = tokio::time::Instant::now();
    let spread = window.mul_f64(DRAIN_SPREAD);
    // Closed first so `wait` completes as soon as the last socket is gone,
    // also when clients leave on their own before their slot.
    st.tracker.close();
    for (i, k) in kickers.iter().enumerate() {
        tokio::select! {
            _ = tokio::time::sleep_until(start + spread.mul_f64(i as f64 / n.max(1) as f64)) => { k.kick(Kick::Drain); }
            _ = st.tracker.wait() => break,
        }
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
    let signals = Arc::new(crate::live::Signals::default());
    let client = crate::nats::connect(&config.nats, &config.node_id).await.map_err(StartError::Nats)?;
    let live = crate::live::Live::start(
        &config.nats.login,
        &format!("{}-live", config.node_id),
        config.nats.subscription_capacity,
        signals.clone(),
    )
    .await
    .map_err(StartError::Nats)?;
    let readers = crate::nats::connect_readers(&config.nats, &config.node_id).await.map_err(StartError::Nats)?;
    if config.allowed_origins.is_none() {
        tracing::warn!(
            "no --allowed-origins: browser pages from any origin may open sockets (tokens are still required)"
        );
    }
    tracing::info!(node = %config.node_id, nats = %config.nats.login.shown, stream = %config.stream.name, partitions = config.stream.partitions, "listening on {addr}");
    on_listen(addr);
    let st = AppState::new(config, client, live, readers, metrics);
    let audits = tokio::spawn(audit_on_reconnect(st.hub.clone(), signals));
    let result = run(listener, st, shutdown).await;
    audits.abort();
    result?;
    Ok(())
}

/// Audits every user at once after the live connection (re)connects: events
/// stored while it was down were not received. (Messages dropped for a slow
/// subscription show as a hole at the user's next event, and the
/// periodic audit finds a dropped last one: neither needs every user asked.)
async fn audit_on_reconnect(hub: Arc<Hub>, signals: Arc<crate::live::Signals>) {
    loop {
        signals.connected.notified().await;
        hub.audit_all_now();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grace_is_what_the_exit_waits_for() {
        assert_eq!(DRAIN_GRACE, CONNECTION_CLOSE_GRACE + FLUSH_TIMEOUT);
    }

    #[test]
    fn limits_fit_the_open_file_limit() {
        // Room for everything asked for: as configured.
        let (l, why) = Limits::new(1000, Some(1_048_576));
        assert_eq!(l, Limits { sockets: 1000, http: MAX_HTTP_CONNECTIONS });
        assert!(why.is_none());
        assert_eq!(Limits::new(100_000, None).0.sockets, 100_000);
        // Too few files: HTTP gets at most half, sockets the rest, and the
        // sum stays within the limit minus the reserve.
        for files in [96u64, 1024, 4096, 65_536] {
            let (l, why) = Limits::new(100_000, Some(files));
            assert!(l.sockets + l.http + FD_RESERVE <= files as usize, "{files}: {l:?}");
            assert!(l.http <= l.sockets.max(1), "{files}: {l:?}");
            assert!(why.is_some_and(|w| w.contains(&files.to_string())), "{files}");
        }
        assert_eq!(Limits::new(100_000, Some(96)).0, Limits { sockets: 16, http: 16 });
        // A limit below the reserve still leaves one of each.
        let (l, _) = Limits::new(100, Some(10));
        assert_eq!(l, Limits { sockets: 1, http: 1 });
    }
}
