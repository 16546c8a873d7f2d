//! No credential reaches a log line, at any level: the NATS password
//! (flags or URL), the NATS token, a credentials file's JWT and seed, the
//! JWT secret and the tokens signed with it. Nodes and tools run as real
//! processes at `AGENTCAST_LOG=trace`, every dependency included, against
//! real nats-servers; every line they write on stderr is searched.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// All levels of every target: the most a log can show.
const EVERYTHING: &str = "trace";
const MIN_TRACE_LINES: usize = 5;
const PASSWORD: &str = "S3cretPassw0rd";
const NATS_TOKEN: &str = "T0kenS3cretValue";
/// The first part of every token `agentcast token`, `tail` and the tests
/// sign (base64 of `{"typ":"JWT","alg":"HS256"}`): finds the tokens `tail`
/// mints itself, which the test never sees.
const TOKEN_HEADER: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9";

/// A credentials file of the NATS test suite (async-nats's TestUser.creds):
/// a user JWT and its nkey seed.
const CREDS_JWT: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJMN1dBT1hJU0tPSUZNM1QyNEhMQ09ENzJRT1czQkNVWEdETjRKVU1SSUtHTlQ3RzdZVFRRIiwiaWF0IjoxNjUxNzkwOTgyLCJpc3MiOiJBRFRRUzdaQ0ZWSk5XNTcyNkdPWVhXNVRTQ1pGTklRU0hLMlpHWVVCQ0Q1RDc3T1ROTE9PS1pPWiIsIm5hbWUiOiJUZXN0VXNlciIsInN1YiI6IlVBRkhHNkZVRDJVVTRTREZWQUZVTDVMREZPMlhNNFdZTTc2VU5YVFBKWUpLN0VFTVlSQkhUMlZFIiwibmF0cyI6eyJwdWIiOnt9LCJzdWIiOnt9LCJzdWJzIjotMSwiZGF0YSI6LTEsInBheWxvYWQiOi0xLCJ0eXBlIjoidXNlciIsInZlcnNpb24iOjJ9fQ.bp2-Jsy33l4ayF7Ku1MNdJby4WiMKUrG-rSVYGBusAtV3xP4EdCa-zhSNUaBVIL3uYPPCQYCEoM1pCUdOnoJBg";
const CREDS_SEED: &str = "SUACH75SWCM5D2JMJM6EKLR2WDARVGZT4QC6LX3AGHSWOMVAKERABBBRWM";

/// A node at trace level, its stderr collected line by line.
struct LoggedNode {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl LoggedNode {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
            .args(["serve", "--listen", "127.0.0.1:0", "--jwt-secret", SECRET])
            .args(args)
            .env_remove("AGENTCAST_NATS_URL")
            .env("AGENTCAST_LOG", EVERYTHING)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agentcast");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr = loop {
            let found = log.lock().unwrap().iter().find_map(|l| {
                l.split("listening on ").nth(1).and_then(|a| a.split_whitespace().next()).map(str::to_owned)
            });
            if let Some(a) = found {
                break a;
            }
            assert!(Instant::now() < deadline, "node did not start:\n{}", log.lock().unwrap().join("\n"));
            std::thread::sleep(Duration::from_millis(20));
        };
        Self { child, addr, log }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while http_get(&format!("http://{}/readyz", self.addr)).await.0 != 200 {
            assert!(Instant::now() < deadline, "node not ready:\n{}", self.text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for LoggedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a tool at trace level; returns its exit code and stderr.
fn tool(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(args)
        .env_remove("AGENTCAST_NATS_URL")
        .env_remove("AGENTCAST_JWT_SECRET")
        .env("AGENTCAST_LOG", EVERYTHING)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run agentcast");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Fails naming the first line that carries any of `secrets`. Anything that
/// talked to NATS or a node at trace level wrote dozens of lines; fewer than
/// [`MIN_TRACE_LINES`] would mean the level did not take and the check
/// proves nothing.
fn assert_clean(what: &str, log: &str, secrets: &[&str]) {
    assert!(log.lines().count() >= MIN_TRACE_LINES, "{what}: too few lines to mean anything:\n{log}");
    for line in log.lines() {
        for s in secrets {
            assert!(!line.contains(s), "{what} logged a secret ({s}):\n{line}");
        }
    }
}

fn secrets_in(log: &str, secrets: &[&str]) -> bool {
    secrets.iter().any(|s| log.contains(s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_nats_url_is_used_and_never_logged() {
    let nats = NatsServer::start_with(&["--user", "agent", "--pass", PASSWORD]);
    let port = nats.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("nats://agent:{PASSWORD}@127.0.0.1:{port}");
    let shown = format!("nats://agent:***@127.0.0.1:{port}");
    let env = [("AGENTCAST_NATS_URL", url.as_str())];
    let node = LoggedNode::start(&[], &env);
    // The URL's credentials log in: the node gets ready.
    node.wait_ready().await;
    let listening = node.text().lines().find(|l| l.contains("listening on")).unwrap().to_owned();
    assert!(listening.contains(&format!("nats={shown}")), "{listening}");

    // A socket, a published event, and the tools, all logging everything.
    let ws = format!("ws://{}/ws", node.addr);
    let socket_token = token("u1");
    let (mut c, _) = Client::join_url(&format!("{ws}?token={socket_token}")).await;
    let (code, publish) = tool(&["publish", "--user", "u1", "--type", "acme.ping"], &env);
    assert_eq!(code, Some(0), "{publish}");
    assert_eq!(c.events(1).await.len(), 1);
    let (code, stream) = tool(&["stream", "--user", "u1"], &env);
    assert_eq!(code, Some(0), "{stream}");
    let (code, tail) =
        tool(&["tail", "--url", &ws, "--user", "u1", "--jwt-secret", SECRET, "--from-seq", "0", "--count", "1"], &[]);
    assert_eq!(code, Some(0), "{tail}");
    let (code, minted) = tool(&["token", "--user", "u1", "--jwt-secret", SECRET], &[]);
    assert_eq!(code, Some(0), "{minted}");
    c.ws.close(None).await.unwrap();
    let _ = c.until_close().await;

    // A wrong password in the URL: the node keeps failing to log in.
    let wrong =
        LoggedNode::start(&[], &[("AGENTCAST_NATS_URL", &format!("nats://agent:Wr0ngPassw0rd@127.0.0.1:{port}"))]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(wrong.text().contains("authorization violation"), "{}", wrong.text());
    // Failing connections from a tool: refused, and no server at all.
    let (code, refused) =
        tool(&["stream"], &[("AGENTCAST_NATS_URL", &format!("nats://agent:Wr0ngPassw0rd@127.0.0.1:{port}"))]);
    assert_eq!(code, Some(1), "{refused}");
    assert!(refused.contains("authorization violation"), "{refused}");
    let (code, absent) = tool(
        &["publish", "--user", "u1", "--type", "acme.x", "--nats-url", &format!("nats://agent:{PASSWORD}@127.0.0.1:1")],
        &[],
    );
    assert_eq!(code, Some(1), "{absent}");
    assert!(absent.contains("cannot connect to NATS at nats://agent:***@127.0.0.1:1: "), "{absent}");
    // `--help` shows no variable's value that may hold a password.
    for command in ["serve", "stream", "publish"] {
        let help = Command::new(env!("CARGO_BIN_EXE_agentcast")).args([command, "--help"]).envs(env).output().unwrap();
        assert!(help.status.success());
        assert!(!String::from_utf8_lossy(&help.stdout).contains(PASSWORD), "{command} --help shows the password");
    }
    // A URL that does not parse is shown redacted in the error too.
    let (code, unparsed) = tool(&["stream", "--nats-url", &format!("nats://agent:{PASSWORD}@127.0.0.1:port")], &[]);
    assert_eq!(code, Some(64), "{unparsed}");
    assert!(unparsed.contains("nats://agent:***@127.0.0.1:port"), "{unparsed}");

    // These two talk to nothing and log nothing but their one line.
    for (what, log) in [("token", &minted), ("a bad URL", &unparsed)] {
        assert!(!secrets_in(log, &[PASSWORD, SECRET, TOKEN_HEADER]), "{what}: {log}");
    }
    let secrets = [PASSWORD, "Wr0ngPassw0rd", SECRET, TOKEN_HEADER, &socket_token];
    assert_clean("the node", &node.text(), &secrets);
    assert_clean("the node with a wrong password", &wrong.text(), &secrets);
    for (what, log) in [
        ("publish", publish),
        ("stream", stream),
        ("tail", tail),
        ("stream refused", refused),
        ("publish to no server", absent),
    ] {
        assert_clean(&format!("tool {what}"), &log, &secrets);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_token_and_a_credentials_file_are_never_logged() {
    let nats = NatsServer::start_with(&["--auth", NATS_TOKEN]);
    let node = LoggedNode::start(&["--nats-url", &nats.url, "--nats-token", NATS_TOKEN], &[]);
    node.wait_ready().await;
    let (code, stream) = tool(&["stream", "--nats-url", &nats.url], &[("AGENTCAST_NATS_TOKEN", NATS_TOKEN)]);
    assert_eq!(code, Some(0), "{stream}");
    // The token as the URL's user name.
    let in_url = nats.url.replace("nats://", &format!("nats://{NATS_TOKEN}@"));
    let (code, from_url) = tool(&["stream", "--nats-url", &in_url], &[]);
    assert_eq!(code, Some(0), "{from_url}");
    let (code, wrong) = tool(&["stream", "--nats-url", &nats.url, "--nats-token", "Wr0ngT0kenValue"], &[]);
    assert_eq!(code, Some(1), "{wrong}");
    let secrets = [NATS_TOKEN, "Wr0ngT0kenValue", SECRET];
    assert_clean("the node", &node.text(), &secrets);
    for (what, log) in [("stream", stream), ("stream, token in URL", from_url), ("stream, wrong token", wrong)] {
        assert_clean(&format!("tool {what}"), &log, &secrets);
    }

    // A credentials file, sent to a server that asks for no login (it
    // ignores the JWT and signature): the node connects and logs neither.
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("user.creds");
    write_creds(&creds, CREDS_JWT, CREDS_SEED);
    let open = NatsServer::start();
    let node = LoggedNode::start(&["--nats-url", &open.url, "--nats-creds", creds.to_str().unwrap()], &[]);
    node.wait_ready().await;
    let (code, stream) = tool(&["stream", "--nats-url", &open.url, "--nats-creds", creds.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{stream}");
    let secrets = [CREDS_JWT, CREDS_SEED, &CREDS_JWT[..40], &CREDS_JWT[CREDS_JWT.len() - 40..]];
    assert_clean("the node with a credentials file", &node.text(), &secrets);
    assert_clean("tool stream with a credentials file", &stream, &secrets);
}
