//! The Python example publisher (examples/python, nats-py) against a real
//! nats-server and node; its events reach a WebSocket client.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

/// `$AGENTCAST_TEST_PYTHON`, else the CI venv's python (`.ci/install` installs
/// nats-py there), else `python3`.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("AGENTCAST_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("AGENTCAST_CI_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/agentcast-ci-venv")));
    match venv.map(|v| v.join("bin/python")) {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from("python3"),
    }
}

fn run_example(nats: &NatsServer, user: &str, run_id: &str) -> Vec<(u64, String, String)> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/publish_agent_run.py");
    let out = Command::new(python())
        .args([script, "--nats-url", &nats.url, "--user", user, "--run-id", run_id])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(out.status.success(), "example failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            let seq = f.next().unwrap().parse().unwrap();
            (seq, f.next().unwrap().to_owned(), f.next().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn the_python_example_reaches_a_websocket_client_once() {
    let py = python();
    let check = Command::new(&py).args(["-c", "import nats"]).output();
    assert!(
        check.as_ref().is_ok_and(|o| o.status.success()),
        "{} cannot import nats-py: install it (pip install nats-py) or set AGENTCAST_TEST_PYTHON",
        py.display()
    );
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut client, _) = Client::join(&node, "alice").await;
    let printed = run_example(&nats, "alice", "py-1");
    let types = [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "acme.forecast_chart",
        "agent_completed",
    ];
    assert_eq!(printed.iter().map(|p| p.0).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());
    assert_eq!(printed.iter().map(|p| p.1.as_str()).collect::<Vec<_>>(), types);
    assert!(printed.iter().all(|p| p.2 == "stored"));
    let got = client.events(6).await;
    for ((seq, ev), (want_seq, want_type, _)) in got.iter().zip(&printed) {
        assert_eq!((seq, ev["type"].as_str().unwrap()), (want_seq, want_type.as_str()));
        assert_eq!(ev["run_id"], "py-1");
        assert_eq!(ev["agent"], "weather-bot");
        assert!(ev["timestamp"].as_str().unwrap().ends_with('Z'), "{ev}");
        assert!(ev["data"].is_object());
    }
    assert_eq!(got[2].1["data"]["args"]["city"], "Paris");
    // The same run again: every Nats-Msg-Id is known, nothing new is stored.
    let again = run_example(&nats, "alice", "py-1");
    assert_eq!(
        again.iter().map(|p| (p.0, p.2.as_str())).collect::<Vec<_>>(),
        (1..=6).map(|s| (s, "duplicate")).collect::<Vec<_>>()
    );
    client.quiet_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn the_python_agent_stops_a_run_when_its_user_asks() {
    use serde_json::json;
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut alice, _) = Client::join(&node, "alice").await;
    let (mut bob, _) = Client::join(&node, "bob").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/control_agent.py");
    let agent = tokio::process::Command::new(python())
        .args([script, "--nats-url", &nats.url, "--user", "alice", "--run-id", "py-c1"])
        .args(["--steps", "200", "--step-interval", "0.05"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    // The run is under way.
    let started = alice.events(2).await;
    assert_eq!(started[0].1["type"], "agent_started");
    assert_eq!(started[1].1["type"], "agent_thinking");
    // Another user cannot stop it, even naming its run.
    let cancel = json!({"type":"control","id":"k1","data":{"action":"cancel","run_id":"py-c1"}}).to_string();
    bob.send_text(&cancel).await;
    assert_eq!(
        bob.next_json().await,
        json!({"type":"control_reply","id":"k1","data":{"status":"unknown_run","run_id":"py-c1"}})
    );
    // Its user can. The reply and the run's cancelled end may come in either
    // order: one is a NATS reply, the other an event through the stream.
    alice.send_text(&cancel).await;
    let (mut thinking, mut reply, mut completed) = (0, None, None);
    while reply.is_none() || completed.is_none() {
        let f = alice.next_json().await;
        match (f["type"].as_str(), f["event"]["type"].as_str()) {
            (Some("control_reply"), _) => reply = Some(f),
            (Some("event"), Some("agent_completed")) => completed = Some(f),
            (Some("event"), Some("agent_thinking")) if completed.is_none() => thinking += 1,
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert_eq!(
        reply.unwrap(),
        json!({"type":"control_reply","id":"k1","data":{"status":"cancelled","run_id":"py-c1"}})
    );
    // The run ends with a cancelled agent_completed, well before its 200 steps.
    let completed = completed.unwrap();
    assert_eq!(completed["event"]["data"], json!({"status":"cancelled"}));
    assert_eq!(completed["event"]["run_id"], "py-c1");
    assert!(thinking < 100, "{thinking} steps after the cancel was sent");
    let out =
        tokio::time::timeout(Duration::from_secs(10), agent.wait_with_output()).await.expect("agent exits").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("control bob k1 cancel unknown_run"), "{stdout}");
    assert!(stdout.contains("control alice k1 cancel cancelled"), "{stdout}");
    // The agent has exited with its run: nobody listens now.
    alice.send_text(&cancel).await;
    assert_eq!(alice.next_json().await["code"], "no_agent");
}

/// The Python package's own suite (clients/python/tests, pytest): it starts
/// its own nats-server (the same `$AGENTCAST_TEST_NATS_SERVER`) and nodes of
/// the binary cargo built, and talks to them with nats-py and a WebSocket
/// client. Run from the source tree, so what is tested is what is here.
#[test]
fn the_python_package_suite_passes() {
    let py = python();
    let check = Command::new(&py).args(["-c", "import nats, pytest, pytest_asyncio, websockets"]).output();
    assert!(
        check.as_ref().is_ok_and(|o| o.status.success()),
        "{} lacks nats-py, pytest, pytest-asyncio or websockets: run .ci/install, or set AGENTCAST_TEST_PYTHON",
        py.display()
    );
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/python");
    let out = Command::new(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .current_dir(&dir)
        .env("PYTHONPATH", format!("{}:{}", dir.join("src").display(), dir.join("tests").display()))
        .env("AGENTCAST_BIN", env!("CARGO_BIN_EXE_agentcast"))
        .env("AGENTCAST_TEST_NATS_SERVER", nats_server_bin())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pytest failed:\n{text}");
    // Every test ran: none was skipped or deselected.
    let summary = text.lines().rev().find(|l| l.contains(" passed")).unwrap_or_default().to_owned();
    assert!(!summary.contains("skipped") && !summary.contains("deselected"), "{summary}");
    eprintln!("{summary}");
}
