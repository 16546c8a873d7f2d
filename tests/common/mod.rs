//! Real parts for integration tests: a nats-server process on a random port
//! with its own JetStream directory, agentcast nodes as real processes on
//! port 0, and real WebSocket clients. Everything is killed on drop.
#![allow(dead_code)]

pub mod nats_cluster;
pub mod oracle;
pub mod sse;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest, protocol::CloseFrame};

pub const SECRET: &str = "test-secret-test-secret-test-secret!";
const START_TIMEOUT: Duration = Duration::from_secs(15);
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// The nats-server binary under test: $AGENTCAST_TEST_NATS_SERVER, else
/// `nats-server` on PATH, else Debian's /usr/sbin/nats-server.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("AGENTCAST_TEST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("nats-server")).find(|p| p.is_file()))
    {
        return p;
    }
    PathBuf::from("/usr/sbin/nats-server")
}

pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub url: String,
    pub monitor: String,
    port: u16,
    extra: Vec<String>,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra nats-server arguments (for example `--user u --pass p`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, url, monitor) = Self::spawn(dir.path(), None, &extra);
        let port = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in url");
        Self { child: Some(child), dir, url, monitor, port, extra }
    }

    // The child is returned to the caller, which kills and waits on drop.
    #[allow(clippy::zombie_processes)]
    fn spawn(dir: &Path, port: Option<u16>, extra: &[String]) -> (Child, String, String) {
        let ports_dir = dir.join(format!("ports-{}", rand_suffix()));
        std::fs::create_dir_all(&ports_dir).unwrap();
        let port = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
        let bin = nats_server_bin();
        let mut child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port, "-m", "-1", "-js", "-sd"])
            .arg(dir.join("jetstream"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nats.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ports = std::fs::read_dir(&ports_dir).unwrap().flatten().next();
            // The file may be caught half-written: parse failures are retried.
            if let Some(v) =
                ports.and_then(|e| serde_json::from_str::<Value>(&std::fs::read_to_string(e.path()).ok()?).ok())
            {
                let url = v["nats"][0].as_str().unwrap().to_owned();
                let monitor = v["monitoring"][0].as_str().unwrap().to_owned();
                return (child, url, monitor);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nats-server did not start: see {}", dir.join("nats.log").display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        let (child, url, monitor) = Self::spawn(self.dir.path(), Some(self.port), &self.extra);
        self.child = Some(child);
        self.url = url;
        self.monitor = monitor;
    }

    /// Sends a signal to the server process (STOP and CONT freeze and thaw it).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("nats-server running").id();
        let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill -{sig} nats-server");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url).await.expect("connect to test nats-server")
    }

    /// Every client subscription the server holds, from its monitoring endpoint.
    pub async fn subscriptions(&self) -> Vec<String> {
        let (_, body) = http_get(&format!("{}/connz?subs=1", self.monitor)).await;
        let v: Value = serde_json::from_str(&body).expect("connz json");
        let mut subs: Vec<String> = v["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["subscriptions_list"].as_array().cloned().unwrap_or_default())
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect();
        subs.sort();
        subs
    }

    /// Live-subject subscriptions the server holds.
    pub async fn live_subscriptions(&self) -> Vec<String> {
        self.subscriptions().await.into_iter().filter(|s| s.starts_with("agentcast.live.")).collect()
    }

    /// Waits until a subscription to `subject` is the server's. A client's
    /// `flush` only writes its buffer out: a request another connection
    /// sends meanwhile may reach the server first and find no responder.
    pub async fn wait_subscribed(&self, subject: &str) {
        eventually(&format!("the server holds a subscription to {subject}"), || async {
            self.subscriptions().await.iter().any(|s| s == subject)
        })
        .await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rand_suffix() -> u32 {
    rand::random()
}

/// An agentcast node as a real process.
pub struct Node {
    child: Option<Child>,
    pub addr: std::net::SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    pub async fn start(nats: &NatsServer, extra: &[&str]) -> Self {
        let node = Self::spawn(&nats.url, extra);
        node.wait_ready().await;
        node
    }

    /// Starts a node on the given NATS URL(s) and waits until it is ready.
    pub async fn start_url(nats_url: &str, extra: &[&str]) -> Self {
        let node = Self::spawn(nats_url, extra);
        node.wait_ready().await;
        node
    }

    /// Starts a node and returns once it listens, ready or not.
    pub fn spawn(nats_url: &str, extra: &[&str]) -> Self {
        Self::spawn_limited(nats_url, extra, None)
    }

    /// Starts a node allowed `open_files` open files (soft and hard
    /// RLIMIT_NOFILE), and waits until it is ready.
    pub async fn start_limited(nats: &NatsServer, extra: &[&str], open_files: u64) -> Self {
        let node = Self::spawn_limited(&nats.url, extra, Some(open_files));
        node.wait_ready().await;
        node
    }

    fn spawn_limited(nats_url: &str, extra: &[&str], open_files: Option<u64>) -> Self {
        let mut args: Vec<String> =
            ["serve", "--listen", "127.0.0.1:0", "--nats-url", nats_url].map(String::from).to_vec();
        if !extra.iter().any(|a| *a == "--jwt-secret" || *a == "--jwt-public-key") {
            args.extend(["--jwt-secret".into(), SECRET.into()]);
        }
        if !extra.contains(&"--drain-window") {
            args.extend(["--drain-window".into(), "1s".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentcast"));
        cmd.args(&args).env("AGENTCAST_LOG", "info,agentcast=debug").stdout(Stdio::null()).stderr(Stdio::piped());
        if let Some(n) = open_files {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit { rlim_cur: n as libc::rlim_t, rlim_max: n as libc::rlim_t };
            // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = cmd.spawn().expect("start agentcast");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => panic!("node did not start; log:\n{}", log.lock().unwrap().join("\n")),
        };
        Self { child: Some(child), addr, log }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while self.get("/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "node not ready; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://{}{path}", self.addr)).await
    }

    /// A metric's value from /metrics (sum over label sets matching `labels`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap().success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the process to exit and returns its code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The stream settings a node uses by default, with another per-user limit.
pub fn stream_settings(max_per_user: i64) -> agentcast::config::StreamSettings {
    agentcast::config::StreamSettings {
        name: "AGENTCAST".into(),
        partitions: 1,
        previous: None,
        subject_prefix: "agentcast.events".into(),
        live_prefix: "agentcast.live".into(),
        external: false,
        replicas: 1,
        max_age: Duration::from_secs(3600),
        max_bytes: 1 << 30,
        max_per_user,
        max_event_bytes: 256 * 1024,
        duplicate_window: Duration::from_secs(120),
    }
}

/// Runs an `agentcast` tool with `args` and no NATS URL or JWT secret from
/// the environment, and returns what it printed and its exit status.
pub fn run_tool(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(args)
        .env_remove("AGENTCAST_JWT_SECRET")
        .env_remove("AGENTCAST_NATS_URL")
        .output()
        .expect("run agentcast")
}

/// Writes a NATS credentials file (a user JWT and its nkey seed, as `nsc`
/// writes them) to `path`.
pub fn write_creds(path: &Path, jwt: &str, seed: &str) {
    std::fs::write(
        path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .unwrap();
}

pub fn token(user: &str) -> String {
    agentcast::auth::mint_hs256(SECRET.as_bytes(), user, Duration::from_secs(600)).unwrap()
}

/// Minimal HTTP/1.0 GET: status and body.
pub async fn http_get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    // A refused connection reads as status 0: the process is gone.
    let Ok(mut s) = tokio::net::TcpStream::connect(host).await else {
        return (0, String::new());
    };
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client that reads JSON frames.
pub struct Client {
    pub ws: Ws,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Self { ws }
    }

    /// Connects to a full socket URL and reads the welcome frame.
    pub async fn join_url(url: &str) -> (Self, Value) {
        let mut c = Self::connect(url).await;
        let w = c.next_json().await;
        assert_eq!(w["type"], "welcome", "{w}");
        (c, w)
    }

    /// Connects and reads the welcome frame.
    pub async fn join(node: &Node, user: &str) -> (Self, Value) {
        let mut c = Self::connect(&node.ws_url(&token(user))).await;
        let w = c.next_json().await;
        assert_eq!(w["type"], "welcome", "{w}");
        (c, w)
    }

    /// Next text frame as JSON; panics on timeout, close or error.
    pub async fn next_json(&mut self) -> Value {
        loop {
            match tokio::time::timeout(RECV_TIMEOUT, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    return serde_json::from_str(t.as_str()).expect("json frame");
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads `n` event frames, returning (seq, event) pairs.
    pub async fn events(&mut self, n: usize) -> Vec<(u64, Value)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let f = self.next_json().await;
            assert_eq!(f["type"], "event", "{f}");
            out.push((f["seq"].as_u64().unwrap(), f["event"].clone()));
        }
        out
    }

    /// Reads frames until the close frame; returns (frames before it, close).
    pub async fn until_close(&mut self) -> (Vec<Value>, Option<CloseFrame>) {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(RECV_TIMEOUT * 3, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => frames.push(serde_json::from_str(t.as_str()).unwrap()),
                Ok(Some(Ok(Message::Close(c)))) => return (frames, c),
                Ok(Some(Ok(_))) => {}
                Ok(None) | Ok(Some(Err(_))) => return (frames, None),
                Err(_) => panic!("no close within the timeout"),
            }
        }
    }

    /// Expects no frame for `d` (pings aside).
    pub async fn quiet_for(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }
}

/// Tries to open a socket; returns the HTTP status and JSON body of a refusal.
pub async fn refused(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => panic!("connection to {url} was accepted"),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body =
                resp.body().as_ref().map(|b| serde_json::from_slice(b).unwrap_or(Value::Null)).unwrap_or(Value::Null);
            (status, body)
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Publishes through JetStream and returns the stored sequence.
pub async fn publish(js: &async_nats::jetstream::Context, user: &str, payload: impl Into<bytes::Bytes>) -> u64 {
    js.publish(format!("agentcast.events.{user}"), payload.into()).await.expect("publish").await.expect("ack").sequence
}

/// Polls `f` until it returns true or the timeout passes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + RECV_TIMEOUT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Creates a mirror of the AGENTCAST stream that answers the stream's direct
/// gets (`mirror_direct`) but holds only its first `held` messages (it
/// discards new ones): a direct-get responder that lags behind the stream
/// for good, as a replica can for a moment. Returns once it holds them.
pub async fn lagging_mirror(js: &async_nats::jetstream::Context, held: u64) {
    use async_nats::jetstream::stream::{Config, DiscardPolicy, Source};
    js.create_stream(Config {
        name: "LAGGING".into(),
        mirror: Some(Source { name: "AGENTCAST".into(), ..Default::default() }),
        mirror_direct: true,
        max_messages: held as i64,
        discard: DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .expect("create the lagging mirror");
    eventually("the mirror holds its share", || async {
        let mut s = js.get_stream("LAGGING").await.expect("mirror");
        s.info().await.expect("mirror info").state.messages == held
    })
    .await;
    // It joins the stream's direct-get responders once it has caught up.
    let client = js.client();
    eventually("the mirror answers direct gets", || mirror_answered(&client)).await;
}

/// Sends one direct get of the AGENTCAST stream; true when the lagging
/// mirror answered it (answers name the stream that gave them).
pub async fn mirror_answered(client: &async_nats::Client) -> bool {
    let r = client.request("$JS.API.DIRECT.GET.AGENTCAST", r#"{"seq":1}"#.into()).await.expect("direct get");
    r.headers.and_then(|h| h.get("Nats-Stream").map(|v| v.as_str() == "LAGGING")).unwrap_or(false)
}
