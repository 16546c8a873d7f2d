//! `agentcast dev`: starts its own nats-server when none answers, prints a
//! working URL and token, and the demo publisher's run reaches the socket.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test]
async fn dev_starts_nats_prints_a_working_url_and_runs_the_demo() {
    // Nothing listens on port 1: dev must start its own nats-server.
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(["dev", "--listen", "127.0.0.1:0", "--nats-url", "nats://127.0.0.1:1", "--demo", "--user", "alice"])
        .arg("--nats-server-bin")
        .arg(nats_server_bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.trim().strip_prefix("WebSocket:") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(20)).expect("dev prints a WebSocket URL");
    let mut client = None;
    // The URL is printed once the node listens; it turns ready a moment later.
    for _ in 0..100 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
            client = Some(Client { ws });
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = client.expect("connect with the printed URL");
    let w = c.next_json().await;
    assert_eq!((w["type"].as_str(), w["user"].as_str()), (Some("welcome"), Some("alice")), "{w}");
    // The demo's next run arrives in order.
    let mut types = Vec::new();
    while types.len() < 5 {
        let f = c.next_json().await;
        let t = f["event"]["type"].as_str().unwrap().to_owned();
        if types.is_empty() && t != "agent_started" {
            continue; // joined mid-run: wait for the next one
        }
        types.push(t);
    }
    assert_eq!(types, ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"]);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
