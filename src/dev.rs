//! `agentcast dev`: try agentcast with nothing set up.
//!
//! Uses NATS at `--nats-url` when it answers; otherwise starts a local
//! nats-server (JetStream in a temporary directory, removed on exit). Mints a
//! random HS256 secret and a token for the dev user, prints a ready `ws://`
//! URL, a publish example and the console's URL (the console is on unless
//! `--no-console`), and with `--demo` publishes a sample agent run every few
//! seconds, its answer streamed token by token through the coalescing
//! [`crate::publisher::TextStream`], which the dev user can stop with a control request
//! (`{"action":"cancel","run_id":...}`, docs/protocol.md section 9).

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, ClaimRules, mint_hs256};
use crate::config::{DevArgs, EXIT_CONFIG, NatsLogin};
use crate::control::Listener;
use crate::publisher::{Coalesce, Event, Publisher};
use crate::user::UserId;

/// How long to wait for NATS at the configured URL before starting one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a started nats-server may take to write its ports file.
const NATS_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of the printed dev token.
const DEV_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long the box waits for the node to be ready before it is printed
/// anyway, with a pointer to /readyz: NATS at a URL that needs other
/// credentials, say, never lets it be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Interval of the readiness polls before the box.
const READY_POLL: Duration = Duration::from_millis(50);
/// Pause between demo agent runs.
const DEMO_INTERVAL: Duration = Duration::from_secs(5);
/// Pause between the steps of a demo run: long enough to press Stop.
const DEMO_STEP: Duration = Duration::from_millis(400);
/// The demo run's answer, streamed a token (word) at a time.
const DEMO_ANSWER: &str = "It is 18 °C in Paris right now, with a light breeze from the west and a few clouds; \
    the afternoon should stay dry, so a light jacket is enough.";
/// Pause between the answer's tokens: 40 tokens a second, a model's pace.
const DEMO_TOKEN: Duration = Duration::from_millis(25);
/// Queue group of the demo's control listener.
const DEMO_GROUP: &str = "agentcast-demo";

pub async fn run(mut args: DevArgs) -> i32 {
    let user = match UserId::parse(&args.user) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("agentcast: --user: {e}");
            return EXIT_CONFIG;
        }
    };
    let login = match args.node.nats.login() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("agentcast: {e}");
            return EXIT_CONFIG;
        }
    };
    let _nats_dir;
    let mut _nats_child: Option<Child> = None;
    if !nats_answers(&login).await {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("agentcast: cannot create a temporary directory: {e}");
                return 1;
            }
        };
        match start_nats(&args.nats_server_bin, dir.path(), &[]).await {
            Ok((child, url)) => {
                eprintln!(
                    "agentcast dev: no NATS at {}; started {} at {url}",
                    login.shown,
                    args.nats_server_bin.display()
                );
                args.node.nats.nats_url = url;
                _nats_child = Some(child);
                _nats_dir = dir;
            }
            Err(e) => {
                eprintln!("agentcast: no NATS at {} and could not start one: {e}", login.shown);
                return 1;
            }
        }
    }
    let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let auth = match Authenticator::hs256(secret.as_bytes(), &ClaimRules { leeway_secs: 30, ..Default::default() }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("agentcast: {e}");
            return 1;
        }
    };
    let token = match mint_hs256(secret.as_bytes(), user.as_str(), DEV_TOKEN_LIFETIME) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agentcast: minting the dev token: {e}");
            return 1;
        }
    };
    let demo = args.demo;
    // The console is the quickest way to see a stream, so dev serves it
    // unless told not to (`serve` needs --console).
    args.node.console = !args.no_console;
    let console = args.node.console;
    let config = match args.node.into_config(auth) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentcast: {e}");
            return EXIT_CONFIG;
        }
    };
    let subject = config.stream.event_subject(user.as_str());
    let subject_prefix = config.stream.subject_prefix.clone();
    let control_prefix = config.control.prefix.clone();
    let login = config.nats.login.clone();
    let shutdown = crate::server::shutdown_on_signals();
    let result = crate::server::start(config, shutdown.clone(), move |addr| {
        use std::fmt::Write;
        let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
        let port = addr.port();
        let nats_url = &login.shown;
        let mut text = String::new();
        let _ = writeln!(text);
        let _ = writeln!(text, "  agentcast dev is running");
        let _ = writeln!(text, "  JWT secret (HS256):  {secret}");
        let _ = writeln!(text, "  token for {:<10} {token}", user.as_str());
        let _ = writeln!(text, "  WebSocket:           ws://{host}:{port}/ws?token={token}");
        let _ = writeln!(text, "  publish an event:    subject {subject} on {nats_url}, payload a JSON object, e.g.");
        let _ = writeln!(text, "                       {{\"type\":\"agent_started\",\"run_id\":\"r1\",\"data\":{{}}}}");
        let _ = writeln!(text, "  metrics:             http://{host}:{port}/metrics");
        if console {
            // The token goes in the fragment, which the browser keeps to itself.
            let _ = writeln!(text, "  console:             http://{host}:{port}/console/#token={token}");
        }
        tokio::spawn(async move {
            if !wait_ready(&format!("{host}:{port}")).await {
                let _ = writeln!(text, "  not ready yet:       http://{host}:{port}/readyz says what it waits for");
            }
            println!("{text}");
            if demo {
                tokio::spawn(demo_publisher(login, subject_prefix, control_prefix, user));
            }
        });
    })
    .await;
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agentcast: {e}");
            e.exit_code()
        }
    }
}

/// Waits until the node answers `/readyz` with 200 (NATS connected, stream
/// checked), at most [`READY_TIMEOUT`]; false if it did not. The box is
/// printed after that so that the node's start-up lines come before it and
/// it stays the last thing on the screen.
async fn wait_ready(host_port: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(host_port).await {
            let mut answer = Vec::new();
            if s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await.is_ok()
                && s.read_to_end(&mut answer).await.is_ok()
                && answer.split(|&b| b == b' ').nth(1) == Some(b"200")
            {
                return true;
            }
        }
        tokio::time::sleep(READY_POLL).await;
    }
    false
}

async fn nats_answers(login: &NatsLogin) -> bool {
    let opts = async_nats::ConnectOptions::new().connection_timeout(PROBE_TIMEOUT);
    let Ok(opts) = crate::nats::with_login(opts, login).await else {
        return false;
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT * 2, opts.connect(login.urls.clone())).await, Ok(Ok(_)))
}

/// Starts nats-server with JetStream in `dir` on a random loopback port;
/// returns the process (killed when dropped) and its client URL.
pub async fn start_nats(bin: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
        .arg(dir.join("jetstream"))
        .arg("--ports_file_dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("{}: {e}", bin.display()))?;
    let deadline = tokio::time::Instant::now() + NATS_START_TIMEOUT;
    loop {
        if let Some(url) = read_ports_file(dir) {
            return Ok((child, url));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("nats-server exited with {status}");
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("nats-server did not start within {NATS_START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The client URL from nats-server's `--ports_file_dir` output.
pub fn read_ports_file(dir: &Path) -> Option<String> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "ports") {
            let text = std::fs::read_to_string(entry.path()).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            return v["nats"][0].as_str().map(str::to_owned);
        }
    }
    None
}

/// The demo's runs: how many have started, and the one in progress, if any,
/// with what stops it.
#[derive(Default)]
struct Runs {
    started: u64,
    current: Option<(String, CancellationToken)>,
}

type CurrentRun = Arc<Mutex<Runs>>;

fn lock(runs: &CurrentRun) -> std::sync::MutexGuard<'_, Runs> {
    // Only assignments and lookups happen under the lock.
    runs.lock().unwrap_or_else(|e| e.into_inner())
}

/// Publishes a small agent run every [`DEMO_INTERVAL`] through the
/// [`Publisher`], and stops the one in progress when the dev user asks
/// ([`demo_control`]): it then ends with [`Event::agent_cancelled`].
async fn demo_publisher(login: NatsLogin, subject_prefix: String, control_prefix: String, user: UserId) {
    let connected = match crate::nats::with_login(async_nats::ConnectOptions::new(), &login).await {
        Ok(opts) => opts.connect(login.urls.clone()).await.map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    let Ok(client) = connected else {
        tracing::warn!("demo publisher could not connect to {}", login.shown);
        return;
    };
    let current: CurrentRun = Arc::default();
    match Listener::subscribe(client.clone(), &control_prefix, DEMO_GROUP).await {
        Ok(listener) => {
            tokio::spawn(demo_control(listener, user.clone(), current.clone()));
        }
        Err(e) => tracing::warn!(error = %e, "the demo cannot take control requests"),
    }
    let publisher = Publisher::new(client).subject_prefix(&subject_prefix);
    let publish = |event: Event| {
        let (publisher, user) = (&publisher, &user);
        async move {
            if let Err(e) = publisher.publish(user.as_str(), &event.agent("demo")).await {
                tracing::warn!(error = %e, "demo publish failed");
            }
        }
    };
    loop {
        let stop = CancellationToken::new();
        let run_id = {
            let mut runs = lock(&current);
            runs.started += 1;
            let run_id = format!("demo-{}", runs.started);
            runs.current = Some((run_id.clone(), stop.clone()));
            run_id
        };
        let steps = [
            Event::agent_started(&run_id, "What is the weather in Paris?"),
            Event::agent_thinking(&run_id, "I should call the weather tool."),
            Event::tool_executing(&run_id, "weather", json!({"city": "Paris"})),
            Event::tool_completed(&run_id, "weather", json!({"celsius": 18})),
        ];
        for step in steps {
            publish(step).await;
            tokio::select! {
                _ = tokio::time::sleep(DEMO_STEP) => {}
                _ = stop.cancelled() => {}
            }
            if stop.is_cancelled() {
                break;
            }
        }
        if !stop.is_cancelled() {
            stream_answer(&publisher, &user, &run_id, &stop).await;
        }
        // Over from here: a cancel that comes later is told `finished`.
        lock(&current).current = None;
        if stop.is_cancelled() {
            publish(Event::agent_cancelled(&run_id)).await;
        } else {
            publish(Event::agent_completed(&run_id, DEMO_ANSWER)).await;
        }
        tokio::time::sleep(DEMO_INTERVAL).await;
    }
}

/// Streams [`DEMO_ANSWER`] word by word as `message_delta` events of message
/// `<run_id>-answer`, coalesced (50 ms), until the end or a Stop; what was
/// pushed before a Stop is published before the cancelled completion.
async fn stream_answer(publisher: &Publisher, user: &UserId, run_id: &str, stop: &CancellationToken) {
    let template = match Event::new("message_delta", json!({})) {
        Ok(e) => e.run(run_id).agent("demo"),
        Err(e) => return tracing::warn!(error = %e, "demo answer not streamed"),
    };
    let answer = match publisher.text_stream(user.as_str(), &template, &format!("{run_id}-answer"), Coalesce::default())
    {
        Ok(a) => a,
        Err(e) => return tracing::warn!(error = %e, "demo answer not streamed"),
    };
    for token in DEMO_ANSWER.split_inclusive(' ') {
        if answer.push(token).await.is_err() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(DEMO_TOKEN) => {}
            _ = stop.cancelled() => break,
        }
    }
    if let Err(e) = answer.finish().await {
        tracing::warn!(error = %e, "demo answer publish failed");
    }
}

/// Answers the demo's control requests: `{"action":"cancel","run_id":..}`
/// from the dev user for the run in progress stops it (`cancelled`); any
/// other run, or another user's request, is `unknown_run`, a demo run
/// already over `finished`; another action `unknown_action`.
async fn demo_control(mut listener: Listener, user: UserId, current: CurrentRun) {
    while let Some(req) = listener.next().await {
        let action = req.data.get("action").and_then(|a| a.as_str());
        let run_id = req.data.get("run_id").and_then(|r| r.as_str()).unwrap_or_default();
        let reply = match action {
            Some("cancel") if req.user == user => {
                let runs = lock(&current);
                let past = run_id
                    .strip_prefix("demo-")
                    .and_then(|n| n.parse::<u64>().ok())
                    .filter(|n| (1..=runs.started).contains(n));
                match &runs.current {
                    Some((id, stop)) if id == run_id => {
                        stop.cancel();
                        json!({"status": "cancelled", "run_id": run_id})
                    }
                    _ if past.is_some() => json!({"status": "finished", "run_id": run_id}),
                    _ => json!({"status": "unknown_run", "run_id": run_id}),
                }
            }
            Some("cancel") => json!({"status": "unknown_run", "run_id": run_id}),
            _ => json!({"error": "unknown_action"}),
        };
        if let Err(e) = req.reply(&reply).await {
            tracing::warn!(error = %e, "the demo's control reply failed");
        }
    }
}
