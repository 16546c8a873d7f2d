//! `agentcast dev`: starts its own nats-server when none answers, prints a
//! working URL and token, and the demo publisher's run reaches the socket.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// The lines of `agentcast dev`'s screen so far: stdout and stderr go to one
/// file, as both go to one terminal.
fn screen(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// `agentcast dev` as a child that gets SIGTERM when dropped, also when an
/// assertion fails: it then stops the nats-server it started (a SIGKILL
/// would leave that running).
struct Dev(std::process::Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        for _ in 0..100 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn dev_starts_nats_prints_a_working_url_and_runs_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("screen");
    let file = std::fs::File::create(&out).unwrap();
    // Nothing listens on port 1: dev must start its own nats-server.
    let mut dev = Dev(Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(["dev", "--listen", "127.0.0.1:0", "--nats-url", "nats://127.0.0.1:1", "--demo", "--user", "alice"])
        .arg("--nats-server-bin")
        .arg(nats_server_bin())
        .env_remove("AGENTCAST_LOG")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let url = loop {
        let found = screen(&out).iter().find_map(|l| l.trim().strip_prefix("WebSocket:").map(|u| u.trim().to_owned()));
        if let Some(url) = found {
            break url;
        }
        assert!(std::time::Instant::now() < deadline, "dev prints a WebSocket URL:\n{}", screen(&out).join("\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The box is printed once the node is ready.
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect with the printed URL");
    let mut c = Client { ws };
    let w = c.next_json().await;
    assert_eq!((w["type"].as_str(), w["user"].as_str()), (Some("welcome"), Some("alice")), "{w}");
    // The demo's next run arrives in order, its answer streamed as deltas
    // (merged by a node or not) that make the completed output.
    let (mut types, mut answer) = (Vec::<String>::new(), String::new());
    while types.last().map(String::as_str) != Some("agent_completed") {
        let f = c.next_json().await;
        let t = f["event"]["type"].as_str().unwrap().to_owned();
        if types.is_empty() && t != "agent_started" {
            continue; // joined mid-run: wait for the next one
        }
        if t == "message_delta" {
            answer.push_str(f["event"]["delta"].as_str().unwrap());
            assert_eq!(f["event"]["message_id"], format!("{}-answer", f["event"]["run_id"].as_str().unwrap()));
        }
        if t == "agent_completed" {
            assert_eq!(f["event"]["data"]["output"].as_str(), Some(answer.as_str()), "{f}");
        }
        if types.last() != Some(&t) {
            types.push(t);
        }
    }
    assert_eq!(
        types,
        ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "message_delta", "agent_completed"]
    );
    assert!(answer.starts_with("It is 18 °C in Paris"), "{answer}");

    // The dev user stops the next run: it ends with a cancelled agent_completed.
    let run_id = loop {
        let f = c.next_json().await;
        if f["event"]["type"] == "agent_started" {
            break f["event"]["run_id"].as_str().unwrap().to_owned();
        }
    };
    let cancel = serde_json::json!({"type":"control","id":"stop","data":{"action":"cancel","run_id":run_id}});
    c.send_text(&cancel.to_string()).await;
    let (mut reply, mut completed) = (None, None);
    while reply.is_none() || completed.is_none() {
        let f = c.next_json().await;
        match f["type"].as_str() {
            Some("control_reply") => reply = Some(f),
            Some("event") if f["event"]["type"] == "agent_completed" => completed = Some(f),
            Some("event") => assert_eq!(f["event"]["run_id"], run_id.as_str(), "{f}"),
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert_eq!(reply.unwrap()["data"], serde_json::json!({"status":"cancelled","run_id":run_id}));
    let completed = completed.unwrap();
    assert_eq!(completed["event"]["run_id"], run_id.as_str());
    assert_eq!(completed["event"]["data"], serde_json::json!({"status":"cancelled"}));
    // Stopping it again: it is over.
    c.send_text(&cancel.to_string()).await;
    assert_eq!(c.next_json().await["data"], serde_json::json!({"status":"finished","run_id":run_id}));

    // After the start, a socket and a demo run, the box is still the last
    // thing on the screen, and what came before it is the node's own
    // lines: no dependency's (async-nats logged a dozen at info), and the
    // NATS server as a URL, not a Debug dump of it.
    let lines = screen(&out);
    let text = lines.join("\n");
    let last = lines.iter().rev().find(|l| !l.trim().is_empty()).expect("a screen");
    assert!(last.trim().starts_with("console:"), "the box is not last:\n{text}");
    let start = lines.iter().position(|l| l.contains("agentcast dev is running")).expect("the box");
    for line in &lines[..start] {
        assert!(
            line.trim().is_empty() || line.contains(" agentcast::") || line.starts_with("agentcast dev:"),
            "a line that is not the node's before the box:\n{text}"
        );
    }
    assert!(start <= 8, "{start} lines before the box:\n{text}");
    let listening = lines.iter().find(|l| l.contains("listening on")).expect("the listening line");
    assert!(listening.contains(" nats=nats://127.0.0.1:") && !text.contains("ServerAddr"), "{listening}");
    assert!(text.contains("  token for alice      eyJ"), "{text}");

    Command::new("kill").args(["-TERM", &dev.0.id().to_string()]).status().unwrap();
    let status = dev.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
