//! `agentcast publish`, `tail`, `token` and `stream` as real processes
//! against a real nats-server and nodes.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use agentcast::publisher::{Event, Publisher};
use common::*;
use serde_json::Value;

fn agentcast(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(args)
        .env_remove("AGENTCAST_JWT_SECRET")
        .env_remove("AGENTCAST_NATS_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout_json(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn stream_json(nats: &NatsServer, user: &str) -> Value {
    let out = agentcast(&["stream", "--nats-url", &nats.url, "--user", user], "");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn publish_from_stdin_arrives_in_order_and_a_repeated_msg_id_is_stored_once() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut client, _) = Client::join(&node, "u1").await;
    let lines = [
        r#"{"type":"agent_started","run_id":"r1","data":{"input":"hi"}}"#,
        r#"{"type":"agent_thinking","run_id":"r1","data":{"text":"hmm"}}"#,
        "",
        r#"{"type":"acme.chart","run_id":"r1","thread_id":"t","agent":"a","timestamp":"2026-01-01T00:00:00.000Z","data":{"p":[1,2]}}"#,
        r#"{"type":"agent_completed","run_id":"r1"}"#,
    ];
    let out = agentcast(&["publish", "--nats-url", &nats.url, "--user", "u1"], &lines.join("\n"));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let acks = stdout_json(&out);
    assert_eq!(acks.iter().map(|a| a["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(acks.iter().all(|a| a["duplicate"] == false));
    let got = client.events(4).await;
    let types: Vec<_> = got.iter().map(|(s, e)| (*s, e["type"].as_str().unwrap().to_owned())).collect();
    assert_eq!(
        types,
        [(1, "agent_started"), (2, "agent_thinking"), (3, "acme.chart"), (4, "agent_completed")]
            .map(|(s, t)| (s, t.to_owned()))
    );
    assert_eq!(got[2].1["timestamp"], "2026-01-01T00:00:00.000Z");
    assert_eq!(got[2].1["thread_id"], "t");
    assert_eq!(got[3].1["data"], serde_json::json!({}));

    // One event from flags, twice with the same --msg-id: stored once.
    let args = [
        "publish",
        "--nats-url",
        &nats.url,
        "--user",
        "u1",
        "--type",
        "tool_executing",
        "--run-id",
        "r1",
        "--data",
        r#"{"tool":"calc"}"#,
        "--msg-id",
        "r1-tool-1",
    ];
    let first = stdout_json(&agentcast(&args, ""));
    let again = stdout_json(&agentcast(&args, ""));
    assert_eq!(first[0], serde_json::json!({"seq": 5, "duplicate": false, "msg_id": "r1-tool-1"}));
    assert_eq!(again[0], serde_json::json!({"seq": 5, "duplicate": true, "msg_id": "r1-tool-1"}));
    let (seq, ev) = client.events(1).await.remove(0);
    assert_eq!((seq, ev["data"]["tool"].as_str()), (5, Some("calc")));
    client.quiet_for(Duration::from_millis(300)).await;
    assert_eq!(stream_json(&nats, "u1")["user"]["events"], 5);
}

#[tokio::test]
async fn publish_publishes_stdin_lines_as_they_come_without_waiting_for_more() {
    let nats = NatsServer::start();
    // The node creates the stream.
    let _node = Node::start(&nats, &[]).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(["publish", "--nats-url", &nats.url, "--user", "u1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, acks) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Each ack must come before the next line is written: a tool that waited
    // for a full batch or the end of input would time out here.
    for i in 1..=3u64 {
        writeln!(stdin, r#"{{"type":"agent_thinking","data":{{"i":{i}}}}}"#).unwrap();
        stdin.flush().unwrap();
        let line = acks.recv_timeout(RECV_TIMEOUT).expect("the ack of a line while stdin stays open");
        let ack: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(ack["seq"], i);
    }
    // A bad line after them says how many were published before it.
    writeln!(stdin, "not json").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "agentcast: stdin line 4: event is not a valid envelope: expected ident at line 1 column 2 \
         (3 events before it were published)\n"
    );
}

#[tokio::test]
async fn stream_shows_config_state_and_the_users_position() {
    let nats = NatsServer::start();
    let _node = Node::start(&nats, &["--stream-max-per-user", "50"]).await;
    let p = Publisher::new(nats.client().await);
    for user in ["u1", "u2", "u1"] {
        p.publish(user, &Event::agent_thinking("r", "x")).await.unwrap();
    }
    let v = stream_json(&nats, "u1");
    assert_eq!(v["stream"], "AGENTCAST");
    assert_eq!(v["config"]["subjects"], serde_json::json!(["agentcast.events.*"]));
    assert_eq!(v["config"]["max_msgs_per_subject"], 50);
    assert_eq!(v["config"]["duplicate_window"], "2m");
    assert_eq!(v["state"]["messages"], 3);
    assert_eq!(v["state"]["last_seq"], 3);
    assert_eq!(v["state"]["users"], 2);
    assert_eq!(
        v["user"],
        serde_json::json!({"id": "u1", "subject": "agentcast.events.u1", "events": 2, "first_seq": 1, "last_seq": 3})
    );
    assert!(v["epoch"].as_str().unwrap().parse::<u128>().is_ok());
    let nobody = stream_json(&nats, "nobody");
    assert_eq!(nobody["user"]["events"], 0);
    assert_eq!(nobody["user"]["last_seq"], 0);
    assert_eq!(nobody["user"]["first_seq"], Value::Null);
}

#[tokio::test]
async fn token_mints_a_token_the_node_accepts() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let out = agentcast(&["token", "--user", "auth0|42", "--jwt-secret", SECRET, "--lifetime", "10m"], "");
    assert_eq!(out.status.code(), Some(0));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let auth =
        agentcast::auth::Authenticator::hs256(SECRET.as_bytes(), &agentcast::auth::ClaimRules::default()).unwrap();
    let id = auth.verify(&token).unwrap();
    assert_eq!(id.user.as_str(), "auth0|42");
    let now = jsonwebtoken::get_current_timestamp();
    assert!((now + 595..=now + 600).contains(&id.close_at), "exp {} now {now}", id.close_at);
    let mut c = Client::connect(&node.ws_url(&token.replace('|', "%7C"))).await;
    let w = c.next_json().await;
    assert_eq!((w["type"].as_str(), w["user"].as_str()), (Some("welcome"), Some("auth0|42")));
}

/// A running `agentcast tail`: stdout lines arrive on a channel.
struct Tail {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    connected: mpsc::Receiver<String>,
}

impl Tail {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
            .arg("tail")
            .args(args)
            .env_remove("AGENTCAST_JWT_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let (tx, connected) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Self { child, lines, connected }
    }

    fn welcome(&self) -> String {
        self.connected.recv_timeout(RECV_TIMEOUT).expect("tail connects")
    }

    fn events(&self, n: usize) -> Vec<(u64, Value)> {
        (0..n)
            .map(|_| {
                let l = self.lines.recv_timeout(RECV_TIMEOUT).expect("tail prints an event");
                let v: Value = serde_json::from_str(&l).unwrap();
                (v["seq"].as_u64().unwrap(), v["event"].clone())
            })
            .collect()
    }

    fn exit_code(mut self) -> Option<i32> {
        for _ in 0..200 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn tail_prints_what_was_published_and_resumes_after_a_node_restart() {
    let nats = NatsServer::start();
    let node_a = Node::start(&nats, &[]).await;
    let node_b = Node::start(&nats, &[]).await;
    let p = Publisher::new(nats.client().await);
    let (url_a, url_b) = (format!("ws://{}/ws", node_a.addr), format!("ws://{}/ws", node_b.addr));
    let tail = Tail::start(&["--url", &url_a, "--url", &url_b, "--user", "u1", "--jwt-secret", SECRET, "--count", "6"]);
    let welcome = tail.welcome();
    assert!(welcome.contains("(user position 0, epoch ") && welcome.ends_with("), live"), "{welcome}");
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(p.publish("u1", &Event::agent_thinking("r", &format!("{i}"))).await.unwrap().seq);
    }
    let first = tail.events(3);
    assert_eq!(first.iter().map(|e| e.0).collect::<Vec<_>>(), seqs);
    assert_eq!(first[2].1["data"]["text"], "2");
    // Node A goes away; what is published meanwhile arrives through node B.
    drop(node_a);
    for i in 3..6 {
        seqs.push(p.publish("u1", &Event::agent_thinking("r", &format!("{i}"))).await.unwrap().seq);
    }
    let rest = tail.events(3);
    assert_eq!(rest.iter().map(|e| e.0).collect::<Vec<_>>(), seqs[3..]);
    assert_eq!(rest.iter().map(|e| e.1["data"]["text"].as_str().unwrap()).collect::<Vec<_>>(), ["3", "4", "5"]);
    let welcome = tail.welcome();
    assert!(welcome.ends_with("), resuming after seq 3"), "{welcome}");
    assert_eq!(tail.exit_code(), Some(0), "exits after --count events");

    // A new tail resumes from a given seq with a given token.
    let token = token("u1");
    let resumed = Tail::start(&["--url", &url_b, "--token", &token, "--from-seq", "4", "--count", "2"]);
    assert_eq!(resumed.events(2).iter().map(|e| e.0).collect::<Vec<_>>(), [5, 6]);
    assert_eq!(resumed.exit_code(), Some(0));
}

#[tokio::test]
async fn bad_input_exits_nonzero_with_one_clear_line() {
    let nats = NatsServer::start();
    let bare = NatsServer::start(); // no node: no stream
    let node = Node::start(&nats, &["--max-event-bytes", "1024"]).await;
    let url = nats.url.as_str();
    let ws = format!("ws://{}/ws", node.addr);
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(300));
    let cases: Vec<(Vec<&str>, &str, i32, String)> = vec![
        (
            vec!["publish", "--nats-url", url, "--user", "a.b", "--type", "acme.x"],
            "",
            64,
            "agentcast: --user \"a.b\": user id contains '.'; allowed are ASCII letters, digits and - _ = @ : | + ~".into(),
        ),
        (
            vec!["publish", "--nats-url", url, "--user", "u1", "--type", "progress"],
            "",
            64,
            "agentcast: event type \"progress\" is not valid: use a built-in type or <namespace>.<name> of ASCII lower-case letters, digits, '_' and '-' (at most 64 bytes)".into(),
        ),
        (
            vec!["publish", "--nats-url", url, "--user", "u1", "--type", "acme.x", "--data", "[1]"],
            "",
            64,
            "agentcast: --data must be a JSON object".into(),
        ),
        (
            vec!["publish", "--nats-url", url, "--user", "u1"],
            "\nnot json\n",
            64,
            "agentcast: stdin line 2: event is not a valid envelope: expected ident at line 1 column 2".into(),
        ),
        (
            vec!["publish", "--nats-url", url, "--user", "u1"],
            "{\"type\":\"agent_started\",\"user\":\"u2\"}\n",
            64,
            "agentcast: stdin line 1: event is not a valid envelope: unknown field `user`, expected one of `type`, `run_id`, `thread_id`, `agent`, `message_id`, `delta`, `timestamp`, `data` at line 1 column 30".into(),
        ),
        (
            vec!["publish", "--nats-url", url, "--user", "u1"],
            "{\"type\":\"message_delta\",\"message_id\":\"\",\"delta\":\"Hel\"}\n",
            64,
            "agentcast: stdin line 1: delta event is not valid: `message_id` is 0 characters (a delta event has a string `message_id` of 1 to 128 characters and a string `delta`)".into(),
        ),
        (
            vec!["publish", "--nats-url", url, "--user", "u1", "--max-event-bytes", "200", "--type", "acme.x", "--data", &big],
            "",
            64,
            "agentcast: event is 375 bytes; the limit is 200".into(),
        ),
        (
            vec!["publish", "--nats-url", &bare.url, "--user", "u1", "--type", "acme.x"],
            "",
            1,
            "agentcast: no stream stores agentcast.events.u1: is an agentcast node running against this NATS, or the stream created?".into(),
        ),
        (
            vec!["stream", "--nats-url", &bare.url],
            "",
            1,
            format!("agentcast: stream AGENTCAST does not exist on {}: a node (agentcast serve) creates it", bare.url),
        ),
        (
            vec!["stream", "--nats-url", url, "--user", "a b"],
            "",
            64,
            "agentcast: --user \"a b\": user id contains ' '; allowed are ASCII letters, digits and - _ = @ : | + ~".into(),
        ),
        (
            vec!["token", "--user", "u1", "--jwt-secret", "short"],
            "",
            64,
            "agentcast: --jwt-secret is 5 bytes; at least 32 are required for HS256".into(),
        ),
        (
            vec!["token", "--user", "u1", "--jwt-secret", SECRET, "--lifetime", "90days"],
            "",
            64,
            "agentcast: --lifetime must be between 1s and 30days".into(),
        ),
        (
            vec!["token", "--user", "u1", "--jwt-secret", SECRET, "--lifetime", "soon"],
            "",
            64,
            "agentcast: invalid value 'soon' for '--lifetime <LIFETIME>': expected number at 0 (see 'agentcast token --help')".into(),
        ),
        (
            vec!["tail", "--url", "http://127.0.0.1:1/ws", "--token", "t"],
            "",
            64,
            "agentcast: --url \"http://127.0.0.1:1/ws\" must start with ws:// or wss://".into(),
        ),
        (vec!["tail", "--url", &ws], "", 64, "agentcast: give --token, or --user with --jwt-secret".into()),
        (
            vec!["tail", "--url", &ws, "--token", "not-a-jwt"],
            "",
            1,
            "agentcast: refused with HTTP 401: {\"error\":\"malformed\",\"message\":\"token is not a well-formed JWT\"}".into(),
        ),
    ];
    for (args, stdin, code, stderr) in cases {
        let out = agentcast(&args, stdin);
        assert_eq!(String::from_utf8_lossy(&out.stderr), format!("{stderr}\n"), "{args:?}");
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // A bad line means nothing of its batch (here the whole input) was published.
    assert_eq!(stream_json(&nats, "u1")["user"]["events"], 0);

    // NATS not reachable: a runtime failure.
    let out = agentcast(&["publish", "--nats-url", "nats://127.0.0.1:1", "--user", "u1", "--type", "acme.x"], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("agentcast: cannot connect to NATS at nats://127.0.0.1:1: "), "{err}");
    assert_eq!((err.lines().count(), out.status.code()), (1, Some(1)), "{err}");
}

/// The node refuses a position above 2^53-1, so `tail` refuses it at once
/// instead of being refused on every reconnect (before, it kept retrying).
#[test]
fn tail_refuses_a_from_seq_the_node_would_refuse() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(["tail", "--url", "ws://127.0.0.1:1/ws", "--token", "t", "--from-seq", "9007199254740992"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("tail was still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--from-seq") && err.contains("0..=9007199254740991"), "{err}");
}

/// Usage errors (clap's) are one line that names the flag and where to read
/// more, exit 64, and print nothing on stdout: clap's message is several
/// lines, and its first alone ("the following required arguments were not
/// provided:") names nothing.
#[test]
fn usage_errors_name_the_flag_and_point_to_help() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["tail"],
            "agentcast: the following required arguments were not provided: --url <URLS> (see 'agentcast tail --help')",
        ),
        (
            &["tail", "--url", "ws://127.0.0.1:1/ws", "--user", "u1"],
            "agentcast: the following required arguments were not provided: --jwt-secret <JWT_SECRET> (see 'agentcast tail --help')",
        ),
        (
            &["publish", "--user", "u1", "--frobnicate"],
            "agentcast: unexpected argument '--frobnicate' found (see 'agentcast publish --help')",
        ),
        (
            &["serve", "--ping-interval", "often"],
            "agentcast: invalid value 'often' for '--ping-interval <PING_INTERVAL>': expected number at 0 (see 'agentcast serve --help')",
        ),
        (
            &["--log-format", "xml", "stream"],
            "agentcast: invalid value 'xml' for '--log-format <LOG_FORMAT>' [possible values: human, json] (see 'agentcast stream --help')",
        ),
        (&["frobnicate"], "agentcast: unrecognized subcommand 'frobnicate' (see 'agentcast --help')"),
    ];
    for (args, line) in cases {
        let out = agentcast(args, "");
        assert_eq!(String::from_utf8_lossy(&out.stderr), format!("{line}\n"), "{args:?}");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn tail_from_a_runs_first_seq_gets_the_run_so_far_with_its_text_merged() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let started = publish(&js, "u1", r#"{"type":"agent_started","run_id":"r"}"#).await;
    let mut text = String::new();
    for i in 0..50 {
        let d = format!("t{i} ");
        publish(&js, "u1", format!(r#"{{"type":"message_delta","message_id":"m","delta":"{d}"}}"#)).await;
        text.push_str(&d);
    }
    let url = format!("ws://{}/ws", node.addr);
    let from = (started - 1).to_string();
    let tail = Tail::start(&["--url", &url, "--token", &token("u1"), "--from-seq", &from, "--count", "2"]);
    let first: Value = serde_json::from_str(&tail.lines.recv_timeout(RECV_TIMEOUT).unwrap()).unwrap();
    assert_eq!((first["seq"].as_u64(), &first["event"]["type"]), (Some(started), &Value::from("agent_started")));
    let run: Value = serde_json::from_str(&tail.lines.recv_timeout(RECV_TIMEOUT).unwrap()).unwrap();
    assert_eq!((run["first_seq"].as_u64(), run["merged"].as_u64()), (Some(started + 1), Some(50)), "{run}");
    assert_eq!(run["seq"].as_u64(), Some(started + 50));
    assert_eq!(run["event"]["delta"], text.as_str());
    assert_eq!(tail.exit_code(), Some(0));
}
