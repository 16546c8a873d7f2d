//! Control requests (docs/protocol.md section 9): from a socket, through a
//! real node and nats-server, to a responder written with async-nats here,
//! and back.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};

/// What a responder saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    subject: String,
    headers: HashMap<String, Vec<String>>,
    payload: String,
}

/// Answers every request on `agentcast.control.>` with what `answer`
/// returns for it (`None`: no answer), after `delay`; reports what it saw.
/// Subscribed to `>` rather than `*`, so a subject any longer than
/// `<prefix>.<user>` would be seen too.
async fn responder(
    nats: &NatsServer,
    delay: Duration,
    answer: impl Fn(&Seen) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<Seen> {
    let client = nats.client().await;
    let mut sub = client.subscribe("agentcast.control.>").await.unwrap();
    nats.wait_subscribed("agentcast.control.>").await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let mut headers: HashMap<String, Vec<String>> = HashMap::new();
            for (k, vs) in msg.headers.iter().flat_map(|h| h.iter()) {
                headers.entry(k.to_string()).or_default().extend(vs.iter().map(|v| v.as_str().to_owned()));
            }
            let seen = Seen {
                subject: msg.subject.to_string(),
                headers,
                payload: String::from_utf8_lossy(&msg.payload).into_owned(),
            };
            let _ = tx.send(seen.clone());
            let (client, answer) = (client.clone(), answer.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let (Some(reply), Some(body)) = (msg.reply, answer(&seen)) {
                    client.publish(reply, body.into()).await.unwrap();
                }
            });
        }
    });
    rx
}

fn echo(seen: &Seen) -> Option<Vec<u8>> {
    let data: Value = serde_json::from_str(&seen.payload).unwrap();
    Some(serde_json::to_vec(&json!({"echo": data, "user": seen.headers["Agentcast-User"][0]})).unwrap())
}

fn control(id: &str, data: Value) -> String {
    json!({"type":"control","id":id,"data":data}).to_string()
}

/// Reads frames until one of each id in `ids` answers; returns them by id.
async fn answers(c: &mut Client, ids: &[&str]) -> HashMap<String, Value> {
    let mut got = HashMap::new();
    while got.len() < ids.len() {
        let f = c.next_json().await;
        assert!(matches!(f["type"].as_str(), Some("control_reply" | "control_error")), "{f}");
        let id = f["id"].as_str().unwrap().to_owned();
        assert!(ids.contains(&id.as_str()), "unexpected answer {f}");
        assert!(got.insert(id, f.clone()).is_none(), "answered twice: {f}");
    }
    got
}

fn code(f: &Value) -> &str {
    assert_eq!(f["type"], "control_error", "{f}");
    f["code"].as_str().unwrap()
}

#[tokio::test]
async fn a_request_reaches_the_agent_with_the_tokens_user_and_comes_back() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--node-id", "node-a"]).await;
    for outcome in ["ok", "no_agent", "timeout", "rate_limited", "too_many_pending", "bad_reply", "disabled"] {
        let series = format!("agentcast_control_requests_total{{outcome=\"{outcome}\"}} 0");
        assert!(node.get("/metrics").await.1.contains(&series), "{series} exported at zero");
    }
    let mut seen = responder(&nats, Duration::ZERO, echo).await;
    let (mut c, welcome) = Client::join(&node, "alice").await;
    assert_eq!(welcome["node"], "node-a");
    // Whatever the frame says about users, the token's user is what counts.
    let data = r#"{ "action":"cancel", "run_id":"r-1", "user":"bob", "n":1.50 }"#;
    c.send_text(&format!(
        r#"{{"type":"control","id":"req-1","user":"bob","subject":"agentcast.control.bob","data":{data}}}"#
    ))
    .await;
    let f = c.next_json().await;
    assert_eq!(f["type"], "control_reply", "{f}");
    assert_eq!(f["id"], "req-1");
    assert_eq!(f["data"]["user"], "alice");
    assert_eq!(f["data"]["echo"]["run_id"], "r-1");
    let s = seen.recv().await.unwrap();
    assert_eq!(s.subject, "agentcast.control.alice");
    assert_eq!(s.headers["Agentcast-User"], vec!["alice"]);
    assert_eq!(s.headers["Agentcast-Node"], vec!["node-a"]);
    assert_eq!(s.headers["Agentcast-Request"], vec!["req-1"]);
    assert_eq!(s.headers.len(), 3, "{:?}", s.headers);
    assert_eq!(s.payload, data, "the data object is sent byte for byte");
    assert_eq!(node.metric("agentcast_control_requests_total", "outcome=\"ok\"").await, 1.0);
    assert_eq!(node.metric("agentcast_control_reply_seconds_count", "").await, 1.0);
    // The socket goes on with events as before.
    let js = async_nats::jetstream::new(nats.client().await);
    let seq = publish(&js, "alice", r#"{"a":1}"#).await;
    assert_eq!(c.events(1).await, vec![(seq, json!({"a":1}))]);
}

#[tokio::test]
async fn without_an_agent_or_a_reply_the_client_is_told_why() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--control-timeout", "500ms"]).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    c.send_text(&control("a", json!({}))).await;
    assert_eq!(code(&c.next_json().await), "no_agent");

    // A responder that never answers: timeout. The socket is not held up
    // meanwhile: an event published after the request arrives before it.
    let mut seen = responder(&nats, Duration::ZERO, |_| None).await;
    c.send_text(&control("b", json!({"action":"cancel"}))).await;
    seen.recv().await.unwrap();
    let js = async_nats::jetstream::new(nats.client().await);
    let seq = publish(&js, "u1", r#"{"e":1}"#).await;
    assert_eq!(c.events(1).await, vec![(seq, json!({"e":1}))]);
    let f = c.next_json().await;
    assert_eq!((f["id"].as_str(), code(&f)), (Some("b"), "timeout"));
    assert_eq!(node.metric("agentcast_control_requests_total", "outcome=\"no_agent\"").await, 1.0);
    assert_eq!(node.metric("agentcast_control_requests_total", "outcome=\"timeout\"").await, 1.0);
}

#[tokio::test]
async fn replies_that_are_not_json_objects_are_bad_replies() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let _seen = responder(&nats, Duration::ZERO, |s| {
        let data: Value = serde_json::from_str(&s.payload).unwrap();
        Some(data["reply"].as_str().unwrap().as_bytes().to_vec())
    })
    .await;
    let (mut c, _) = Client::join(&node, "u1").await;
    for (i, reply) in ["[1,2]", "\"yes\"", "not json", "{\"a\":", "null"].iter().enumerate() {
        c.send_text(&control(&i.to_string(), json!({"reply": reply}))).await;
        let f = c.next_json().await;
        assert_eq!((f["id"].as_str(), code(&f)), (Some(i.to_string().as_str()), "bad_reply"), "{reply}");
    }
    // An empty reply is `{}`; an object comes back as sent.
    c.send_text(&control("empty", json!({"reply": ""}))).await;
    assert_eq!(c.next_json().await, json!({"type":"control_reply","id":"empty","data":{}}));
    c.send_text(&control("obj", json!({"reply": "{\"approved\": true}"}))).await;
    assert_eq!(c.next_json().await, json!({"type":"control_reply","id":"obj","data":{"approved":true}}));
    assert_eq!(node.metric("agentcast_control_requests_total", "outcome=\"bad_reply\"").await, 5.0);
}

#[tokio::test]
async fn each_socket_is_held_to_its_rate_and_its_requests_in_flight() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--control-rate", "2", "--control-burst", "3", "--control-pending", "8"]).await;
    let _seen = responder(&nats, Duration::ZERO, echo).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    for id in ["r1", "r2", "r3", "r4"] {
        c.send_text(&control(id, json!({}))).await;
    }
    let got = answers(&mut c, &["r1", "r2", "r3", "r4"]).await;
    for id in ["r1", "r2", "r3"] {
        assert_eq!(got[id]["type"], "control_reply", "{}", got[id]);
    }
    assert_eq!(code(&got["r4"]), "rate_limited");
    // Another socket of the same user has a bucket of its own.
    let (mut other, _) = Client::join(&node, "u1").await;
    other.send_text(&control("o1", json!({}))).await;
    assert_eq!(other.next_json().await["type"], "control_reply");
    // At 2 a second, one more is allowed after half a second.
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.send_text(&control("r5", json!({}))).await;
    assert_eq!(c.next_json().await["type"], "control_reply");
    assert_eq!(node.metric("agentcast_control_requests_total", "outcome=\"rate_limited\"").await, 1.0);

    // In flight: an agent that takes 700 ms, two allowed at once.
    let nats2 = NatsServer::start();
    let node2 = Node::start(&nats2, &["--control-pending", "2"]).await;
    let _slow = responder(&nats2, Duration::from_millis(700), echo).await;
    let (mut c, _) = Client::join(&node2, "u1").await;
    for id in ["a", "b", "c"] {
        c.send_text(&control(id, json!({}))).await;
    }
    let f = c.next_json().await;
    assert_eq!((f["id"].as_str(), code(&f)), (Some("c"), "too_many_pending"), "refused at once, before the replies");
    let got = answers(&mut c, &["a", "b"]).await;
    assert!(got.values().all(|f| f["type"] == "control_reply"), "{got:?}");
    // Answered requests no longer count.
    c.send_text(&control("d", json!({}))).await;
    assert_eq!(c.next_json().await["type"], "control_reply");
    assert_eq!(node2.metric("agentcast_control_requests_total", "outcome=\"too_many_pending\"").await, 1.0);
}

#[tokio::test]
async fn a_node_without_control_and_bad_control_frames_say_so() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--no-control"]).await;
    let mut seen = responder(&nats, Duration::ZERO, echo).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    c.send_text(&control("x", json!({"action":"cancel"}))).await;
    assert_eq!(c.next_json().await, json!({"type":"control_error","id":"x","code":"disabled"}));

    // Bad frames, with an id to answer: control_error with a message.
    for (frame, message) in [
        (r#"{"type":"control","id":"b1","data":[1]}"#, "control frame: data must be a JSON object"),
        (r#"{"type":"control","id":"b2"}"#, "control frame: data must be a JSON object"),
    ] {
        c.send_text(frame).await;
        let f = c.next_json().await;
        assert_eq!(code(&f), "bad_frame", "{frame}");
        assert_eq!(f["message"], message);
    }
    // Without one: an `error` frame, as for any frame not understood.
    let long = "x".repeat(65);
    for frame in [
        r#"{"type":"control","data":{}}"#.to_owned(),
        r#"{"type":"control","id":7,"data":{}}"#.to_owned(),
        format!(r#"{{"type":"control","id":"{long}","data":{{}}}}"#),
        r#"{"type":"control","id":"a\r\nAgentcast-User: bob","data":{}}"#.to_owned(),
    ] {
        c.send_text(&frame).await;
        let f = c.next_json().await;
        assert_eq!((f["type"].as_str(), f["code"].as_str()), (Some("error"), Some("bad_frame")), "{frame}: {f}");
    }
    // The socket stays open and nothing reached an agent.
    c.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(c.next_json().await, json!({"type":"pong"}));
    assert!(seen.try_recv().is_err());
    assert_eq!(node.metric("agentcast_control_requests_total", "outcome=\"disabled\"").await, 1.0);
    assert_eq!(node.metric("agentcast_control_requests_total", "outcome=\"bad_frame\"").await, 6.0);

    // On a node with control, the same bad frames are refused the same way.
    let node2 = Node::start(&nats, &[]).await;
    let (mut c, _) = Client::join(&node2, "u1").await;
    c.send_text(r#"{"type":"control","id":"b1","data":"{}"}"#).await;
    assert_eq!(code(&c.next_json().await), "bad_frame");
    c.send_text(r#"{"type":"control","id":"a\nb","data":{}}"#).await;
    assert_eq!(c.next_json().await["type"], "error");
    assert!(seen.try_recv().is_err(), "a bad frame reached an agent");
}

#[tokio::test]
async fn fifty_users_at_once_are_each_answered_on_their_own_socket() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    // The agent answers with the user it was told, and takes a little time,
    // so the requests overlap.
    let _seen = responder(&nats, Duration::from_millis(50), |s| {
        Some(serde_json::to_vec(&json!({"user": s.headers["Agentcast-User"][0], "subject": s.subject})).unwrap())
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..50 {
        clients.push((format!("user-{i}"), Client::join(&node, &format!("user-{i}")).await.0));
    }
    // Every socket uses the same ids: an answer on the wrong socket would
    // match one of them.
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(user, mut c)| {
            tokio::spawn(async move {
                for id in ["1", "2"] {
                    c.send_text(&control(id, json!({"user": "user-0"}))).await;
                }
                let got = answers(&mut c, &["1", "2"]).await;
                for f in got.values() {
                    assert_eq!(f["type"], "control_reply", "{f}");
                    assert_eq!(f["data"]["user"], user.as_str(), "{f}");
                    assert_eq!(f["data"]["subject"], format!("agentcast.control.{user}"));
                }
                c.quiet_for(Duration::from_millis(300)).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(node.metric("agentcast_control_requests_total", "outcome=\"ok\"").await, 100.0);
}

#[tokio::test]
async fn a_wildcard_or_dotted_user_never_widens_the_subject() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let mut seen = responder(&nats, Duration::ZERO, echo).await;
    // Such users never get a socket, so never a control subject.
    for user in ["*", ">", "a.b", "a.*", "a.>", "a b"] {
        let url = node.ws_url(&token(user));
        let (status, body) = refused(&url, &[]).await;
        assert_eq!((status, body["error"].as_str()), (403, Some("user_id")), "{user:?}");
    }
    // Users with every other allowed character stay one subject token.
    for user in ["a-b_c", "auth0|x", "u:1", "x@y", "b64=", "p+q~"] {
        let (mut c, _) = Client::join(&node, user).await;
        c.send_text(&control("r", json!({}))).await;
        assert_eq!(c.next_json().await["type"], "control_reply");
        let s = seen.recv().await.unwrap();
        assert_eq!(s.subject, format!("agentcast.control.{user}"));
        assert_eq!(s.subject.split('.').count(), 3, "{}", s.subject);
    }
    assert!(seen.try_recv().is_err());
}

#[tokio::test]
async fn the_library_listener_hands_each_request_to_one_agent_of_the_group() {
    use agentcast::control::Listener;
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    // Two agents in one queue group: each request is handled by one of them.
    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    for agent in ["agent-1", "agent-2"] {
        let mut listener = Listener::subscribe(nats.client().await, "agentcast.control", "agents").await.unwrap();
        let handled_tx = handled_tx.clone();
        tokio::spawn(async move {
            while let Some(req) = listener.next().await {
                let answer =
                    json!({"stopped": req.data["run_id"], "user": req.user.as_str(), "id": req.id, "by": agent});
                // Counted before the reply, so the count is complete once
                // the client has every answer.
                handled_tx.send((agent, req.user.as_str().to_owned(), req.node.clone())).unwrap();
                assert!(req.reply(&json!([1])).await.is_err(), "only objects are replies");
                req.reply(&answer).await.unwrap();
            }
        });
    }
    eventually("both agents subscribed", || async {
        nats.subscriptions().await.iter().filter(|s| *s == "agentcast.control.*").count() == 2
    })
    .await;
    // A message that is not a node's request (no headers) is skipped.
    let other = nats.client().await;
    other.publish("agentcast.control.alice", r#"{"run_id":"x"}"#.into()).await.unwrap();
    other.flush().await.unwrap();

    let (mut c, welcome) = Client::join(&node, "alice").await;
    // As many as a socket may have in flight (--control-pending, 8).
    let ids: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    for id in &ids {
        c.send_text(&control(id, json!({"action":"cancel","run_id":format!("run-{id}")}))).await;
    }
    let got = answers(&mut c, &ids.iter().map(String::as_str).collect::<Vec<_>>()).await;
    for id in &ids {
        let data = &got[id]["data"];
        assert_eq!(got[id]["type"], "control_reply", "{}", got[id]);
        assert_eq!(
            (data["stopped"].as_str(), data["user"].as_str()),
            (Some(format!("run-{id}").as_str()), Some("alice"))
        );
        assert_eq!(data["id"], id.as_str());
    }
    let mut count = 0;
    while let Ok((_, user, from)) = handled.try_recv() {
        assert_eq!((user.as_str(), Some(from.as_str())), ("alice", welcome["node"].as_str()));
        count += 1;
    }
    assert_eq!(count, 8, "each request handled once");
}

#[tokio::test]
async fn the_shipped_nats_accounts_let_nodes_ask_and_agents_answer() {
    use agentcast::control::Listener;
    // deploy/nats/accounts.conf as it ships, with passwords in place of the
    // environment variables it reads.
    let dir = tempfile::tempdir().unwrap();
    let accounts = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nats/accounts.conf")).unwrap();
    let accounts = accounts
        .replace("$AGENTCAST_AGENT_PASSWORD", "pa")
        .replace("$AGENTCAST_NODE_PASSWORD", "pn")
        .replace("$NATS_SYS_PASSWORD", "ps");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, accounts).unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let node = Node::start(
        &nats,
        &["--nats-user", "node", "--nats-password", "pn", "--nats-inbox-prefix", "_INBOX_agentcast_node"],
    )
    .await;
    let violations = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let v = violations.clone();
    let agent = async_nats::ConnectOptions::new()
        .user_and_password("agent".into(), "pa".into())
        .event_callback(move |e| {
            let v = v.clone();
            async move { v.lock().unwrap().push(e.to_string()) }
        })
        .connect(&nats.url)
        .await
        .unwrap();
    let mut listener = Listener::subscribe(agent.clone(), "agentcast.control", "agents").await.unwrap();
    nats.wait_subscribed("agentcast.control.*").await;
    tokio::spawn(async move {
        while let Some(req) = listener.next().await {
            req.reply(&json!({"stopped": req.data["run_id"]})).await.unwrap();
        }
    });
    let (mut c, _) = Client::join(&node, "alice").await;
    c.send_text(&control("r1", json!({"action":"cancel","run_id":"run-1"}))).await;
    assert_eq!(c.next_json().await, json!({"type":"control_reply","id":"r1","data":{"stopped":"run-1"}}));
    // The agent may answer requests, not send them.
    agent.publish("agentcast.control.alice", "{}".into()).await.unwrap();
    agent.flush().await.unwrap();
    eventually("the agent's request refused", || {
        let v = violations.clone();
        async move { v.lock().unwrap().iter().any(|e| e.contains("Publish to \"agentcast.control.alice\"")) }
    })
    .await;
    let v = violations.lock().unwrap().clone();
    assert_eq!(v.iter().filter(|e| e.contains("Violation")).count(), 1, "{v:?}");
}

#[tokio::test]
async fn answers_a_client_does_not_read_fill_its_queue_and_close_it_as_slow() {
    let nats = NatsServer::start();
    let node =
        Node::start(&nats, &["--control-rate", "1000", "--control-burst", "1000", "--control-pending", "64"]).await;
    // Answers of 900 KB: the first fills what the kernel takes for the
    // connection (the client's receive buffer and the node's unsent bound),
    // then the socket's writer waits. Answers pile up in its queue until
    // the byte bound, or the write times out: either closes it as slow.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(900_000));
    let _seen = responder(&nats, Duration::ZERO, move |_| Some(big.clone().into_bytes())).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    let deadline = std::time::Instant::now() + agentcast::socket::WRITE_TIMEOUT + Duration::from_secs(10);
    let mut sent = 0;
    // Until a send fails (the node closed) or waits (the node reads no
    // more while its write waits, and the client's buffers are full).
    let mut sending = true;
    while node.metric("agentcast_disconnects_total", "reason=\"slow\"").await == 0.0 {
        assert!(std::time::Instant::now() < deadline, "never closed as slow after {sent} requests");
        for _ in 0..32 {
            if !sending {
                break;
            }
            sent += 1;
            let frame = tokio_tungstenite::tungstenite::Message::text(control(&sent.to_string(), json!({})));
            sending = matches!(tokio::time::timeout(Duration::from_millis(100), c.ws.send(frame)).await, Ok(Ok(())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection ends; its close frame (4000) is often lost, as
    // docs/protocol.md says of slow clients: the node cannot write it
    // behind the backlog within 2 s.
    let (frames, close) = c.until_close().await;
    assert!(close.as_ref().is_none_or(|c| u16::from(c.code) == 4000), "{close:?}");
    assert!(frames.iter().all(|f| f["type"] == "control_reply"), "only answers were queued");
    assert_eq!(node.metric("agentcast_disconnects_total", "reason=\"slow\"").await, 1.0);
}
