//! Command line and environment configuration, checked before anything runs.
//!
//! Every flag has a matching `AGENTCAST_*` variable. [`NodeArgs::into_config`]
//! turns the raw values into a [`Config`] or a [`ConfigError`] that names the
//! offending setting; `main` prints it on one line and exits with code 64
//! (EX_USAGE), as linkerd2-proxy does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::auth::{Authenticator, ClaimRules, KeyError};

/// Process exit code for unusable configuration (sysexits.h EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Default of `--max-sockets-per-user`. A person has a socket per tab and
/// device; 32 covers a heavy user (a dozen tabs on two or three devices)
/// with room to spare, while one token, leaked or scripted, can hold at
/// most 32 of a node's 100,000 sockets instead of all of them. A user at
/// the bound gets 429 until one of its sockets ends; its other nodes count
/// their own.
pub const DEFAULT_SOCKETS_PER_USER: usize = 32;

/// Largest event accepted into the stream, in bytes (the stream's
/// `max_msg_size`; NATS's own default max_payload is 1 MiB).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Default of `--socket-queue-bytes`: frame bytes queued for one socket
/// (including the batch it is writing) before it counts as slow and is
/// closed with 4000, to resume. Frames are counted in bytes because they
/// range from 100 bytes to [`MAX_EVENT_BYTES`]: 1,024 frames of 256 KiB
/// pinned 258 MiB for one socket that never read. 4 MiB hold 16 events of
/// the default largest size, or 1,024 events of 4 KiB; a client that reads
/// keeps its backlog far below either. It is the only bound on a socket's
/// queue: a socket that is behind merges the streamed text waiting in it
/// ([`crate::merge`]), and is closed only when what is left after merging
/// exceeds this (a client that cannot carry the text itself). A single frame
/// larger than the budget is still queued when the queue is empty.
pub const DEFAULT_SOCKET_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Default of `--nats-subscription-bytes`: what one user's NATS
/// subscription may buffer, in bytes. async-nats bounds a subscription in
/// messages, so the node turns this into a message count:
/// `--nats-subscription-bytes / (--max-event-bytes + MESSAGE_OVERHEAD)`, at
/// most `--nats-subscription-capacity` ([`subscription_capacity`]). 64 MiB
/// give 254 messages of the default largest event (8192 of them would be 2
/// GiB per user), and the full 8192 for events up to 6 KiB. Beyond it
/// async-nats drops the message and the hub reads it from JetStream.
pub const DEFAULT_SUBSCRIPTION_BYTES: usize = 64 * 1024 * 1024;

/// Bytes a buffered NATS message may take beyond its payload: the five
/// headers the stream stamps on a republish (names and values under 250
/// bytes with a 40-byte user id), the subject, and async-nats's message
/// struct and header map. An upper estimate, not a measurement; the
/// publisher's own headers count in the stream's `max_msg_size`, so in the
/// payload's share.
pub const MESSAGE_OVERHEAD: usize = 2048;

/// Messages one user's subscription may buffer: `bytes` of messages as
/// large as `max_event_bytes` can be, at most `capacity`, at least one.
pub fn subscription_capacity(capacity: usize, bytes: usize, max_event_bytes: usize) -> usize {
    (bytes / (max_event_bytes + MESSAGE_OVERHEAD)).clamp(1, capacity.max(1))
}

#[derive(Debug, Parser)]
#[command(name = "agentcast", version, about = "NATS-fronted WebSocket emitter for AI-agent event streams")]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "AGENTCAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: WebSocket fan-out of per-user NATS events.
    Serve(ServeArgs),
    /// Zero-setup trial: NATS at the default URL or a local nats-server, a dev token and a ready URL.
    Dev(DevArgs),
    /// Publish one event (--type), or JSON envelopes from stdin, one per line.
    Publish(crate::tools::PublishArgs),
    /// Print a user's events as they come, resuming across reconnects.
    Tail(crate::tools::TailArgs),
    /// Mint an HS256 token for a user.
    Token(crate::tools::TokenArgs),
    /// Show the stream's config and state, and a user's position.
    Stream(crate::tools::StreamArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub jwt: JwtArgs,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// User the printed dev token is for.
    #[arg(long, default_value = "dev")]
    pub user: String,
    /// Publish a demo agent run to the dev user every few seconds.
    #[arg(long)]
    pub demo: bool,
    /// Do not serve the console page (dev serves it by default).
    #[arg(long)]
    pub no_console: bool,
    /// nats-server binary to start when no NATS answers at --nats-url.
    #[arg(long, env = "AGENTCAST_NATS_SERVER_BIN", default_value = "nats-server")]
    pub nats_server_bin: PathBuf,
}

#[derive(Debug, Args)]
pub struct JwtArgs {
    /// HS256 shared secret (at least 32 bytes).
    #[arg(long, env = "AGENTCAST_JWT_SECRET", hide_env_values = true, conflicts_with = "jwt_public_key")]
    pub jwt_secret: Option<String>,
    /// PEM file with an RSA, EC (P-256/P-384) or Ed25519 public key.
    #[arg(long, env = "AGENTCAST_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<String>,
    /// Algorithm for --jwt-public-key (default: RS256, ES256 or EdDSA after the key type).
    #[arg(long, env = "AGENTCAST_JWT_ALGORITHM", value_parser = parse_algorithm)]
    pub jwt_algorithm: Option<jsonwebtoken::Algorithm>,
    /// Accepted clock skew on exp and nbf.
    #[arg(long, env = "AGENTCAST_JWT_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,
    /// Required `iss` claim, if set.
    #[arg(long, env = "AGENTCAST_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, if set.
    #[arg(long, env = "AGENTCAST_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

/// Where NATS is and how to log in: the node's flags, and the tools' (see
/// [`crate::tools`]), which take the same flags and variables.
#[derive(Debug, Args)]
pub struct NatsArgs {
    /// NATS server URLs, comma-separated. Credentials may be written in them
    /// (user:password@ or token@), so `--help` does not show the variable's value.
    #[arg(long, env = "AGENTCAST_NATS_URL", hide_env_values = true, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[arg(long, env = "AGENTCAST_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    #[arg(long, env = "AGENTCAST_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    #[arg(long, env = "AGENTCAST_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT and nkey seed).
    #[arg(long, env = "AGENTCAST_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server; implies TLS.
    #[arg(long, env = "AGENTCAST_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --nats-tls-key.
    #[arg(long, env = "AGENTCAST_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    #[arg(long, env = "AGENTCAST_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Require TLS to NATS even without a CA file.
    #[arg(long, env = "AGENTCAST_NATS_TLS")]
    pub nats_tls: bool,
}

impl NatsArgs {
    /// Checks the URLs and that the named files exist.
    pub fn login(&self) -> Result<NatsLogin, ConfigError> {
        check_file("--nats-creds", &self.nats_creds)?;
        check_file("--nats-tls-ca", &self.nats_tls_ca)?;
        check_file("--nats-tls-cert", &self.nats_tls_cert)?;
        check_file("--nats-tls-key", &self.nats_tls_key)?;
        let mut urls = Vec::new();
        let mut in_urls: Option<UrlLogin> = None;
        for u in self.nats_url.split(',').map(str::trim) {
            let shown = redact_urls(u);
            let (addr, login) = split_login(u).map_err(|e| ConfigError::NatsUrl(format!("{shown:?}: {e}")))?;
            if in_urls.is_some() && login != in_urls {
                return Err(ConfigError::NatsUrl(
                    "every URL must carry the same credentials, or none (a connection has one login)".into(),
                ));
            }
            in_urls = login;
            urls.push(addr);
        }
        let mut user = self.nats_user.clone().zip(self.nats_password.clone());
        let mut token = self.nats_token.clone();
        match in_urls {
            Some(_) if user.is_some() || token.is_some() || self.nats_creds.is_some() => {
                return Err(ConfigError::NatsUrl(
                    "credentials in the URL and --nats-user, --nats-token or --nats-creds: give them once".into(),
                ));
            }
            Some(UrlLogin::User(u, p)) => user = Some((u, p)),
            Some(UrlLogin::Token(t)) => token = Some(t),
            None => {}
        }
        Ok(NatsLogin {
            urls,
            shown: redact_urls(&self.nats_url),
            user,
            token,
            creds: self.nats_creds.clone(),
            tls_required: self.nats_tls || self.nats_tls_ca.is_some() || self.nats_tls_cert.is_some(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_client: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
        })
    }
}

/// Credentials written into a NATS URL.
#[derive(PartialEq, Eq)]
enum UrlLogin {
    /// `nats://user:password@host`
    User(String, String),
    /// `nats://token@host`, as the NATS clients read a user name without a
    /// password.
    Token(String),
}

/// The URL without its credentials, and the credentials. async-nats 0.51
/// ignores credentials in a URL (it sends only those of its options) and
/// prints the URL, password and all, in its debug lines; so they are taken
/// out here and passed as options.
fn split_login(url: &str) -> Result<(async_nats::ServerAddr, Option<UrlLogin>), String> {
    let addr: async_nats::ServerAddr = url.parse().map_err(|e: std::io::Error| e.to_string())?;
    if addr.username().is_none() && addr.password().is_none() {
        return Ok((addr, None));
    }
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let login = match (addr.username(), addr.password()) {
        (Some(user), Some(pass)) => UrlLogin::User(decode(user), decode(pass)),
        (Some(token), None) => UrlLogin::Token(decode(token)),
        _ => return Err("a password without a user".into()),
    };
    let mut bare = addr.into_inner();
    // Both only fail for URLs that cannot have credentials, which this had.
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    let addr = async_nats::ServerAddr::from_url(bare).map_err(|e| e.to_string())?;
    Ok((addr, Some(login)))
}

/// A comma-separated list of NATS URLs as logs and error lines show it:
/// each password, or a token written as the user name, replaced by `***`.
/// Works on text, so a URL that does not parse is shown redacted too.
pub fn redact_urls(list: &str) -> String {
    list.split(',').map(redact_url).collect::<Vec<_>>().join(",")
}

fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    let Some(at) = url[start..end].rfind('@').map(|i| start + i) else {
        return url.to_owned();
    };
    let shown = match url[start..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{shown}{}", &url[..start], &url[at..])
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Address for HTTP and WebSocket (port 0 picks a free port).
    #[arg(long, env = "AGENTCAST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Node id shown to clients and in logs (default: hostname and a random suffix).
    #[arg(long, env = "AGENTCAST_NODE_ID")]
    pub node_id: Option<String>,
    /// Origins allowed to open sockets, comma-separated; unset allows any.
    /// Requests without an Origin header (non-browser clients) are always allowed.
    #[arg(long, env = "AGENTCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,

    #[command(flatten)]
    pub nats: NatsArgs,
    /// Messages buffered per user subscription before async-nats drops them
    /// (dropped messages are then read from JetStream).
    #[arg(long, env = "AGENTCAST_NATS_SUBSCRIPTION_CAPACITY", default_value_t = crate::nats::SUBSCRIPTION_CAPACITY)]
    pub nats_subscription_capacity: usize,
    /// Bytes buffered per user subscription: lowers the message capacity to
    /// this many bytes of the largest events (--max-event-bytes).
    #[arg(long, env = "AGENTCAST_NATS_SUBSCRIPTION_BYTES", default_value_t = DEFAULT_SUBSCRIPTION_BYTES)]
    pub nats_subscription_bytes: usize,
    /// Prefix of the node's reply subjects (JetStream API replies, scan
    /// deliveries). A prefix of its own lets NATS permissions keep other
    /// users, such as publishers allowed `_INBOX.>`, from reading them.
    #[arg(long, env = "AGENTCAST_NATS_INBOX_PREFIX", default_value = "_INBOX")]
    pub nats_inbox_prefix: String,

    /// Subjects publishers write to: <prefix>.<user_id>.
    #[arg(long, env = "AGENTCAST_SUBJECT_PREFIX", default_value = "agentcast.events")]
    pub subject_prefix: String,
    /// Subjects the stream republishes to and nodes subscribe on: <live-prefix>.<user_id>.
    #[arg(long, env = "AGENTCAST_LIVE_PREFIX", default_value = "agentcast.live")]
    pub live_prefix: String,
    /// JetStream stream name.
    #[arg(long, env = "AGENTCAST_STREAM", default_value = "AGENTCAST")]
    pub stream: String,
    /// Streams the users are spread over: 1 is one stream named --stream;
    /// N > 1 is streams <stream>-0 .. <stream>-(N-1), each storing the users
    /// NATS's account mapping `{{partition(N,1)}}` assigns it (docs/operations.md).
    #[arg(long, env = "AGENTCAST_STREAM_PARTITIONS", default_value_t = 1)]
    pub stream_partitions: u32,
    /// The stream (with --stream-previous-partitions, the prefix of the
    /// streams) of the layout before this one: a client that resumes from a
    /// position in it gets the rest of its events there, then everything of
    /// the new layout, with nothing lost or repeated. Used only once sealed
    /// (docs/operations.md, changing the number of partitions).
    #[arg(long, env = "AGENTCAST_STREAM_PREVIOUS")]
    pub stream_previous: Option<String>,
    /// Partitions of the previous layout (--stream-previous).
    #[arg(long, env = "AGENTCAST_STREAM_PREVIOUS_PARTITIONS", default_value_t = 1)]
    pub stream_previous_partitions: u32,
    /// The operator manages the stream: only check it and report differences.
    #[arg(long, env = "AGENTCAST_STREAM_EXTERNAL")]
    pub stream_external: bool,
    #[arg(long, env = "AGENTCAST_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// How long events are kept.
    #[arg(long, env = "AGENTCAST_STREAM_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub stream_max_age: Duration,
    /// Total stream size limit in bytes; oldest events go first. With
    /// partitions, of all of them together: each stream gets its share.
    #[arg(long, env = "AGENTCAST_STREAM_MAX_BYTES", default_value_t = 1 << 30)]
    pub stream_max_bytes: i64,
    /// Events kept per user; oldest go first.
    #[arg(long, env = "AGENTCAST_STREAM_MAX_PER_USER", default_value_t = 10_000)]
    pub stream_max_per_user: i64,
    /// Largest event in bytes (the stream's max_msg_size).
    #[arg(long, env = "AGENTCAST_MAX_EVENT_BYTES", default_value_t = 256 * 1024)]
    pub max_event_bytes: usize,
    /// Window in which a retried publish with the same Nats-Msg-Id is stored once.
    #[arg(long, env = "AGENTCAST_STREAM_DUPLICATE_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub stream_duplicate_window: Duration,

    /// Frame bytes queued per socket, after merging streamed text, before the client counts as slow and is closed (code 4000).
    #[arg(long, env = "AGENTCAST_SOCKET_QUEUE_BYTES", default_value_t = DEFAULT_SOCKET_QUEUE_BYTES)]
    pub socket_queue_bytes: usize,
    /// Open sockets per node; more are refused with HTTP 503.
    #[arg(long, env = "AGENTCAST_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Open sockets of one user (one token's `sub`) on this node; more are
    /// refused with HTTP 429 (user_capacity). 0: no bound but --max-connections.
    #[arg(long, env = "AGENTCAST_MAX_SOCKETS_PER_USER", default_value_t = DEFAULT_SOCKETS_PER_USER)]
    pub max_sockets_per_user: usize,
    /// Interval of server pings; a client silent for two intervals is closed.
    #[arg(long, env = "AGENTCAST_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,
    /// On SIGTERM/SIGINT, closes are spread over this window; the process exits
    /// within it plus a grace of 1.5 s (server::DRAIN_GRACE).
    #[arg(long, env = "AGENTCAST_DRAIN_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_window: Duration,
    /// Name users in logs. Off by default: logs then carry a per-process tag
    /// (u:xxxxxxxx) instead, and connection lines only their connection id.
    #[arg(long, env = "AGENTCAST_LOG_USER_IDS")]
    pub log_user_ids: bool,
    /// Serve the live console page at /console/ (a browser view of one
    /// user's stream; it needs that user's token). Off by default for
    /// `serve` so a production node exposes no page it was not asked for;
    /// `agentcast dev` turns it on.
    #[arg(long, env = "AGENTCAST_CONSOLE")]
    pub console: bool,

    /// Control requests from clients go to <control-prefix>.<user_id>, the
    /// user taken from the socket's token (docs/protocol.md).
    #[arg(long, env = "AGENTCAST_CONTROL_PREFIX", default_value = crate::control::DEFAULT_PREFIX)]
    pub control_prefix: String,
    /// How long a control request waits for an agent's reply before the
    /// client is answered `timeout`.
    #[arg(long, env = "AGENTCAST_CONTROL_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub control_timeout: Duration,
    /// Control requests per second one socket may send on average; more are
    /// answered `rate_limited`.
    #[arg(long, env = "AGENTCAST_CONTROL_RATE", default_value_t = crate::control::DEFAULT_RATE)]
    pub control_rate: u32,
    /// Control requests one socket may send at once after a quiet spell
    /// (the token bucket's size).
    #[arg(long, env = "AGENTCAST_CONTROL_BURST", default_value_t = crate::control::DEFAULT_BURST)]
    pub control_burst: u32,
    /// Control requests of one socket waiting for their reply at most; more
    /// are answered `too_many_pending`.
    #[arg(long, env = "AGENTCAST_CONTROL_PENDING", default_value_t = crate::control::DEFAULT_PENDING)]
    pub control_pending: usize,
    /// Answer every control request `disabled` instead of sending it on.
    #[arg(long, env = "AGENTCAST_NO_CONTROL")]
    pub no_control: bool,
}

fn parse_algorithm(s: &str) -> Result<jsonwebtoken::Algorithm, String> {
    s.parse().map_err(|_| format!("unknown JWT algorithm {s:?}"))
}

/// Why the configuration cannot be used. Each message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("set AGENTCAST_JWT_SECRET (--jwt-secret) or AGENTCAST_JWT_PUBLIC_KEY (--jwt-public-key)")]
    NoJwtKey,
    #[error("--jwt-algorithm only applies with --jwt-public-key")]
    AlgorithmWithoutKey,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{flag} {value:?} is not a valid NATS subject prefix: {why}")]
    Subject { flag: &'static str, value: String, why: &'static str },
    #[error(
        "--subject-prefix and --live-prefix must not overlap ({0:?} and {1:?}): the stream would republish into itself"
    )]
    Overlap(String, String),
    #[error(
        "--stream {0:?} is not a valid stream name (no whitespace, '.', '*', '>', '/' or '\\', at most 64 characters)"
    )]
    StreamName(String),
    #[error(
        "--stream-previous {0:?} names a stream of this layout: a new layout needs new stream names (docs/operations.md)"
    )]
    PreviousOverlap(String),
    #[error(
        "--stream-previous-partitions and --stream-partitions are both {0}: the two layouts would store the same subjects; a new layout has another number of partitions (docs/operations.md)"
    )]
    PreviousSameCount(u32),
    #[error("{flag} must be between {min} and {max}, got {value}")]
    Range { flag: &'static str, value: u128, min: u128, max: u128 },
    #[error(
        "--control-prefix {control:?} must not overlap {flag} {other:?}: control requests would land on those subjects"
    )]
    ControlOverlap { flag: &'static str, control: String, other: String },
    #[error("--nats-url: {0}")]
    NatsUrl(String),
    #[error("{flag} {path}: file not found")]
    MissingFile { flag: &'static str, path: String },
}

/// Validated settings for one node.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub node_id: String,
    pub allowed_origins: Option<Vec<String>>,
    pub nats: NatsSettings,
    pub stream: StreamSettings,
    pub auth: Arc<Authenticator>,
    /// Frame bytes queued per socket at most ([`DEFAULT_SOCKET_QUEUE_BYTES`]).
    pub socket_queue_bytes: usize,
    pub max_connections: usize,
    /// Sockets of one user on this node at most; `None`: no bound of its own.
    pub max_sockets_per_user: Option<usize>,
    pub ping_interval: Duration,
    pub drain_window: Duration,
    pub log_user_ids: bool,
    /// Serve the console page at /console/ ([`crate::console`]).
    pub console: bool,
    pub control: crate::control::Settings,
}

/// Where NATS is and how to log in (user and password, token, credentials,
/// TLS), checked: what the node and the tools share. Its `Debug` leaves the
/// password and token out, so no log line can carry them.
#[derive(Clone)]
pub struct NatsLogin {
    /// The servers, without credentials (those are in `user` or `token`).
    pub urls: Vec<async_nats::ServerAddr>,
    /// The URLs as given, with passwords redacted: what logs show.
    pub shown: String,
    pub user: Option<(String, String)>,
    pub token: Option<String>,
    pub creds: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_client: Option<(PathBuf, PathBuf)>,
    pub tls_required: bool,
}

impl NatsLogin {
    /// One server with no login and no TLS: for tests and benchmarks.
    pub fn plain(url: &str) -> Result<Self, ConfigError> {
        let (addr, login) = split_login(url).map_err(ConfigError::NatsUrl)?;
        if login.is_some() {
            return Err(ConfigError::NatsUrl("a plain login has no credentials in its URL".into()));
        }
        Ok(Self {
            urls: vec![addr],
            shown: redact_urls(url),
            user: None,
            token: None,
            creds: None,
            tls_ca: None,
            tls_client: None,
            tls_required: false,
        })
    }
}

impl std::fmt::Debug for NatsLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLogin")
            .field("urls", &self.shown)
            .field("user", &self.user.as_ref().map(|(user, _)| user))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("creds", &self.creds)
            .field("tls_ca", &self.tls_ca)
            .field("tls_client", &self.tls_client)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub login: NatsLogin,
    /// Messages per user subscription: `--nats-subscription-capacity`,
    /// lowered to fit `--nats-subscription-bytes` ([`subscription_capacity`]).
    pub subscription_capacity: usize,
    pub inbox_prefix: String,
}

#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// The stream's name; with partitions, the prefix of each one's
    /// ([`StreamSettings::stream_name`]).
    pub name: String,
    /// Streams the users are spread over (`--stream-partitions`), at least 1.
    pub partitions: u32,
    /// The layout before this one (`--stream-previous`, its partitions),
    /// whose positions resuming clients may still hold.
    pub previous: Option<(String, u32)>,
    pub subject_prefix: String,
    pub live_prefix: String,
    pub external: bool,
    pub replicas: usize,
    pub max_age: Duration,
    pub max_bytes: i64,
    pub max_per_user: i64,
    pub max_event_bytes: usize,
    pub duplicate_window: Duration,
}

impl StreamSettings {
    /// The subject a user's events are published to.
    pub fn event_subject(&self, user: &str) -> String {
        format!("{}.{user}", self.subject_prefix)
    }

    /// The subject a user's stored events are republished to.
    pub fn live_subject(&self, user: &str) -> String {
        format!("{}.{user}", self.live_prefix)
    }

    /// The partition that stores `user`'s events, `0..partitions`
    /// ([`crate::partition::of_token`]).
    pub fn partition_of(&self, user: &str) -> u32 {
        crate::partition::of_token(user, self.partitions)
    }

    /// The name of partition `k`'s stream ([`crate::partition::stream_name`]).
    pub fn stream_name(&self, k: u32) -> String {
        crate::partition::stream_name(&self.name, self.partitions, k)
    }

    /// Where partition `k`'s stream stores events ([`crate::partition::stored_prefix`]).
    pub fn stored_prefix(&self, k: u32) -> String {
        crate::partition::stored_prefix(&self.subject_prefix, self.partitions, k)
    }

    /// The account mapping NATS needs with more than one partition, as a
    /// line of nats-server's configuration (`mappings = { ... }`).
    pub fn mapping(&self) -> String {
        crate::partition::mapping(&self.subject_prefix, self.partitions)
    }
}

/// A JetStream stream name: no whitespace, '.', '*', '>', '/' or '\\', at
/// most 64 characters.
fn valid_stream_name(s: &str) -> bool {
    !(s.is_empty() || s.len() > 64 || s.contains(['.', '*', '>', '/', '\\']) || s.chars().any(char::is_whitespace))
}

fn range(flag: &'static str, value: u128, min: u128, max: u128) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::Range { flag, value, min, max });
    }
    Ok(())
}

fn check_prefix(flag: &'static str, value: &str) -> Result<(), ConfigError> {
    let bad = |why| Err(ConfigError::Subject { flag, value: value.to_owned(), why });
    if value.is_empty() {
        return bad("it is empty");
    }
    if value.split('.').any(str::is_empty) {
        return bad("it has an empty token");
    }
    if value.contains(['*', '>']) {
        return bad("it contains a wildcard");
    }
    if value.chars().any(char::is_whitespace) {
        return bad("it contains whitespace");
    }
    if value.starts_with('$') {
        return bad("subjects starting with '$' are reserved by NATS");
    }
    Ok(())
}

fn check_file(flag: &'static str, path: &Option<PathBuf>) -> Result<(), ConfigError> {
    match path {
        Some(p) if !p.is_file() => Err(ConfigError::MissingFile { flag, path: p.display().to_string() }),
        _ => Ok(()),
    }
}

impl JwtArgs {
    pub fn authenticator(&self) -> Result<Authenticator, ConfigError> {
        let rules = ClaimRules {
            leeway_secs: self.jwt_leeway.as_secs(),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
        };
        match (&self.jwt_secret, &self.jwt_public_key) {
            (Some(secret), None) => {
                if self.jwt_algorithm.is_some() {
                    return Err(ConfigError::AlgorithmWithoutKey);
                }
                Ok(Authenticator::hs256(secret.as_bytes(), &rules)?)
            }
            (None, Some(path)) => Ok(Authenticator::public_key(path, self.jwt_algorithm, &rules)?),
            _ => Err(ConfigError::NoJwtKey),
        }
    }
}

impl NodeArgs {
    pub fn into_config(self, auth: Authenticator) -> Result<Config, ConfigError> {
        check_prefix("--subject-prefix", &self.subject_prefix)?;
        check_prefix("--live-prefix", &self.live_prefix)?;
        check_prefix("--nats-inbox-prefix", &self.nats_inbox_prefix)?;
        let (a, b) = (&self.subject_prefix, &self.live_prefix);
        if a == b || a.starts_with(&format!("{b}.")) || b.starts_with(&format!("{a}.")) {
            return Err(ConfigError::Overlap(a.clone(), b.clone()));
        }
        let s = &self.stream;
        if !valid_stream_name(s) {
            return Err(ConfigError::StreamName(s.clone()));
        }
        range("--stream-partitions", self.stream_partitions as u128, 1, crate::partition::MAX_PARTITIONS as u128)?;
        // "-<k>" is added to the name of each partition's stream.
        let n = self.stream_partitions;
        if !(0..n).all(|k| valid_stream_name(&crate::partition::stream_name(s, n, k))) {
            return Err(ConfigError::StreamName(s.clone()));
        }
        range(
            "--stream-previous-partitions",
            self.stream_previous_partitions as u128,
            1,
            crate::partition::MAX_PARTITIONS as u128,
        )?;
        if let Some(p) = &self.stream_previous {
            let names = |base: &str, n: u32| -> Vec<String> {
                (0..n).map(|k| crate::partition::stream_name(base, n, k)).collect()
            };
            let previous = names(p, self.stream_previous_partitions);
            if previous.iter().any(|name| !valid_stream_name(name)) {
                return Err(ConfigError::StreamName(p.clone()));
            }
            if names(s, self.stream_partitions).iter().any(|name| previous.contains(name)) {
                return Err(ConfigError::PreviousOverlap(p.clone()));
            }
            if self.stream_previous_partitions == self.stream_partitions {
                return Err(ConfigError::PreviousSameCount(self.stream_partitions));
            }
        }
        range("--stream-replicas", self.stream_replicas as u128, 1, 5)?;
        range("--nats-subscription-capacity", self.nats_subscription_capacity as u128, 1, 1 << 20)?;
        range("--nats-subscription-bytes", self.nats_subscription_bytes as u128, 1 << 20, 1 << 40)?;
        range("--socket-queue-bytes", self.socket_queue_bytes as u128, 64 * 1024, 1 << 40)?;
        range("--max-connections", self.max_connections as u128, 1, 10_000_000)?;
        range("--max-sockets-per-user", self.max_sockets_per_user as u128, 0, 10_000_000)?;
        range("--max-event-bytes", self.max_event_bytes as u128, 64, MAX_EVENT_BYTES as u128)?;
        range("--stream-max-bytes", self.stream_max_bytes as u128, 1 << 20, i64::MAX as u128)?;
        range("--stream-max-per-user", self.stream_max_per_user as u128, 1, i64::MAX as u128)?;
        range("--stream-max-age (seconds)", self.stream_max_age.as_secs() as u128, 1, u64::MAX as u128)?;
        range(
            "--stream-duplicate-window (ms)",
            self.stream_duplicate_window.as_millis(),
            100,
            self.stream_max_age.as_millis(),
        )?;
        range("--ping-interval (ms)", self.ping_interval.as_millis(), 100, 3_600_000)?;
        range("--drain-window (ms)", self.drain_window.as_millis(), 0, 3_600_000)?;
        check_prefix("--control-prefix", &self.control_prefix)?;
        // A control prefix inside the events' subjects would let a client
        // publish events into its own stream; inside the live or inbox ones,
        // reach nodes' subscriptions.
        for (flag, other) in [
            ("--subject-prefix", &self.subject_prefix),
            ("--live-prefix", &self.live_prefix),
            ("--nats-inbox-prefix", &self.nats_inbox_prefix),
        ] {
            let c = &self.control_prefix;
            if c == other || c.starts_with(&format!("{other}.")) || other.starts_with(&format!("{c}.")) {
                return Err(ConfigError::ControlOverlap { flag, control: c.clone(), other: other.clone() });
            }
        }
        // At most a minute: nobody waits longer for a button to answer.
        range("--control-timeout (ms)", self.control_timeout.as_millis(), 10, 60_000)?;
        range("--control-rate", self.control_rate as u128, 1, 10_000)?;
        range("--control-burst", self.control_burst as u128, 1, 10_000)?;
        range("--control-pending", self.control_pending as u128, 1, 1024)?;
        let login = self.nats.login()?;
        let node_id = self.node_id.unwrap_or_else(default_node_id);
        Ok(Config {
            listen: self.listen,
            node_id,
            allowed_origins: normalise_origins(self.allowed_origins),
            nats: NatsSettings {
                login,
                subscription_capacity: subscription_capacity(
                    self.nats_subscription_capacity,
                    self.nats_subscription_bytes,
                    self.max_event_bytes,
                ),
                inbox_prefix: self.nats_inbox_prefix,
            },
            stream: StreamSettings {
                name: self.stream,
                partitions: self.stream_partitions,
                previous: self.stream_previous.map(|name| (name, self.stream_previous_partitions)),
                subject_prefix: self.subject_prefix,
                live_prefix: self.live_prefix,
                external: self.stream_external,
                replicas: self.stream_replicas,
                max_age: self.stream_max_age,
                max_bytes: self.stream_max_bytes,
                max_per_user: self.stream_max_per_user,
                max_event_bytes: self.max_event_bytes,
                duplicate_window: self.stream_duplicate_window,
            },
            auth: Arc::new(auth),
            socket_queue_bytes: self.socket_queue_bytes,
            max_connections: self.max_connections,
            max_sockets_per_user: (self.max_sockets_per_user > 0).then_some(self.max_sockets_per_user),
            ping_interval: self.ping_interval,
            drain_window: self.drain_window,
            log_user_ids: self.log_user_ids,
            console: self.console,
            control: crate::control::Settings {
                enabled: !self.no_control,
                prefix: self.control_prefix,
                timeout: self.control_timeout,
                rate: self.control_rate,
                burst: self.control_burst,
                pending: self.control_pending,
            },
        })
    }
}

/// Trims entries and a trailing `/` (browsers send origins without one). An
/// empty list, as an empty environment variable gives, means unset.
fn normalise_origins(list: Option<Vec<String>>) -> Option<Vec<String>> {
    let list: Vec<String> =
        list?.into_iter().map(|o| o.trim().trim_end_matches('/').to_owned()).filter(|o| !o.is_empty()).collect();
    (!list.is_empty()).then_some(list)
}

/// `<hostname>-<4 hex digits>`: readable, and distinct for two nodes on one host.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    format!("{host}-{:04x}", rand::random::<u16>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut args = vec!["agentcast", "serve", "--jwt-secret", "0123456789abcdef0123456789abcdef"];
        args.extend_from_slice(extra);
        let Command::Serve(s) = Cli::try_parse_from(args).unwrap().command else { unreachable!() };
        let auth = s.jwt.authenticator()?;
        s.node.into_config(auth)
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.stream.event_subject("u1"), "agentcast.events.u1");
        assert_eq!(c.stream.live_subject("u1"), "agentcast.live.u1");
        assert_eq!(c.stream.name, "AGENTCAST");
        assert_eq!(c.max_sockets_per_user, Some(DEFAULT_SOCKETS_PER_USER));
        assert_eq!(parse(&["--max-sockets-per-user", "0"]).unwrap().max_sockets_per_user, None);
        assert_eq!(c.socket_queue_bytes, DEFAULT_SOCKET_QUEUE_BYTES);
        let control = &c.control;
        assert!(control.enabled);
        assert_eq!(control.subject(&crate::user::UserId::parse("u1").unwrap()), "agentcast.control.u1");
        assert_eq!((control.rate, control.burst, control.pending), (10, 20, 8));
        assert_eq!(control.timeout, Duration::from_secs(5));
        assert!(!parse(&["--no-control"]).unwrap().control.enabled);
    }

    #[test]
    fn the_subscription_capacity_fits_its_bytes() {
        // 64 MiB of 256 KiB events: 254 messages, not 8192 (2 GiB).
        assert_eq!(parse(&[]).unwrap().nats.subscription_capacity, 254);
        let small = parse(&["--max-event-bytes", "4096"]).unwrap();
        assert_eq!(small.nats.subscription_capacity, crate::nats::SUBSCRIPTION_CAPACITY);
        let c = |bytes: &str| {
            let c = parse(&["--max-event-bytes", "1048576", "--nats-subscription-bytes", bytes]).unwrap();
            c.nats.subscription_capacity
        };
        assert_eq!(c("1048576"), 1, "at least one message");
        assert_eq!(c("16777216"), 15);
        let msg = parse(&["--socket-queue-bytes", "100"]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("--socket-queue-bytes"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let msg = |a: &[&str]| parse(a).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(&["--subject-prefix", "a.*"]).contains("--subject-prefix"));
        assert!(msg(&["--subject-prefix", "a..b"]).contains("empty token"));
        assert!(msg(&["--live-prefix", "agentcast.events.live"]).contains("overlap"));
        assert!(msg(&["--stream", "a.b"]).contains("--stream"));
        assert!(msg(&["--stream-replicas", "9"]).contains("--stream-replicas"));
        assert!(msg(&["--nats-creds", "/nonexistent"]).contains("--nats-creds"));
        assert!(msg(&["--nats-url", "nats://a:b:c"]).contains("--nats-url"));
        assert!(msg(&["--nats-inbox-prefix", "_INBOX.>"]).contains("--nats-inbox-prefix"));
        assert!(msg(&["--control-prefix", "agentcast.control.*"]).contains("--control-prefix"));
        assert!(msg(&["--control-prefix", "agentcast.events"]).contains("--subject-prefix"));
        assert!(msg(&["--control-prefix", "agentcast.live.x"]).contains("--live-prefix"));
        assert!(msg(&["--control-prefix", "_INBOX"]).contains("--nats-inbox-prefix"));
        assert!(msg(&["--control-timeout", "0s"]).contains("--control-timeout"));
        assert!(msg(&["--control-rate", "0"]).contains("--control-rate"));
        assert!(msg(&["--control-pending", "0"]).contains("--control-pending"));
    }

    #[test]
    fn credentials_in_urls_become_the_login_and_are_redacted() {
        let login = |url: &str, extra: &[&str]| {
            let mut args = vec!["agentcast", "stream", "--nats-url", url];
            args.extend_from_slice(extra);
            let Command::Stream(s) = Cli::try_parse_from(args).unwrap().command else { unreachable!() };
            s.nats.login()
        };
        let l = login("nats://agent:S3cret%40pw@127.0.0.1:4555,nats://agent:S3cret%40pw@h2:4222", &[]).unwrap();
        assert_eq!(l.user, Some(("agent".into(), "S3cret@pw".into())));
        assert_eq!(l.shown, "nats://agent:***@127.0.0.1:4555,nats://agent:***@h2:4222");
        assert!(l.urls.iter().all(|u| !u.has_user_pass() && !format!("{u:?}").contains("S3cret")));
        assert!(!format!("{l:?}").contains("S3cret"), "{l:?}");
        let t = login("tls://t0ken@h:4222", &[]).unwrap();
        assert_eq!((t.token.as_deref(), t.shown.as_str()), (Some("t0ken"), "tls://***@h:4222"));
        assert!(!format!("{t:?}").contains("t0ken"));
        let err = |url: &str, extra: &[&str]| login(url, extra).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err("nats://a:x@h1,nats://a:y@h2", &[]).contains("same credentials"));
        assert!(err("nats://a:x@h1", &["--nats-token", "t"]).contains("give them once"));
        let bad = err("nats://agent:S3cret@h:port", &[]);
        assert!(bad.contains("nats://agent:***@h:port") && !bad.contains("S3cret"), "{bad}");
        assert!(err("nats://:S3cret@h:4222", &[]).contains("a password without a user"));
        assert_eq!(redact_urls("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_urls("a:b@h:1/x@y"), "a:***@h:1/x@y");
    }

    #[test]
    fn a_key_is_required() {
        let Command::Serve(s) = Cli::try_parse_from(["agentcast", "serve"]).unwrap().command else { unreachable!() };
        assert!(matches!(s.jwt.authenticator(), Err(ConfigError::NoJwtKey)));
    }
}
