//! `GET /sse`: the socket protocol as Server-Sent Events, against real
//! nats-server processes and nodes, read by an HTTP/1.1 client that parses
//! the stream as a browser's EventSource does (tests/common/sse.rs).

mod common;

use std::time::Duration;

use common::sse::{SseClient, SseEvent};
use common::*;
use serde_json::Value;

/// Opens `/sse` for `user` with extra query text and headers; expects 200.
async fn open(node: &Node, user: &str, query: &str, headers: &[(&str, &str)]) -> (SseClient, Value) {
    let path = format!("/sse?token={}{query}", token(user));
    let mut c = SseClient::open(node.addr, &path, headers).await;
    assert_eq!(c.status, 200, "headers {:?}", c.headers);
    let welcome = c.next().await.expect("welcome");
    assert_eq!((welcome.event.as_str(), welcome.id.as_deref()), ("welcome", None));
    (c, welcome.json())
}

/// The next `n` events of type `event`: their frames and ids.
async fn events(c: &mut SseClient, n: usize) -> Vec<(Value, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev: SseEvent = c.next().await.expect("the response ended early");
        assert_ne!(ev.event, "gap", "{ev:?}");
        if ev.event == "event" {
            let frame = ev.json();
            assert_eq!(frame["type"], "event");
            out.push((frame, ev.id.expect("event frames carry an id")));
        }
    }
    out
}

async fn publish_n(js: &async_nats::jetstream::Context, user: &str, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        seqs.push(publish(js, user, format!(r#"{{"type":"agent_thinking","data":{{"i":{i}}}}}"#)).await);
    }
    seqs
}

#[tokio::test]
async fn events_arrive_in_order_and_a_reconnect_with_last_event_id_misses_and_repeats_nothing() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let (mut c, welcome) = open(&node, "alice", "", &[]).await;
    assert_eq!(c.header("content-type"), Some("text/event-stream"));
    assert_eq!(c.header("cache-control"), Some("no-cache"));
    assert_eq!(c.header("x-accel-buffering"), Some("no"));
    assert_eq!(c.header("connection"), Some("close"));
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let first = publish_n(&js, "alice", 5).await;
    let got = events(&mut c, 5).await;
    assert_eq!(got.iter().map(|(f, _)| f["seq"].as_u64().unwrap()).collect::<Vec<_>>(), first);
    assert_eq!(got[4].1, format!("{epoch}:{}", first[4]));
    assert_eq!(got[2].0["event"]["data"]["i"], 2);
    drop(c);

    // Away: three more, then back with the browser's header.
    let missed = publish_n(&js, "alice", 3).await;
    let (mut c, _) = open(&node, "alice", "", &[("Last-Event-ID", &got[4].1)]).await;
    let again = events(&mut c, 3).await;
    assert_eq!(again.iter().map(|(f, _)| f["seq"].as_u64().unwrap()).collect::<Vec<_>>(), missed);
    let live = publish_n(&js, "alice", 1).await;
    assert_eq!(events(&mut c, 1).await[0].0["seq"].as_u64(), Some(live[0]), "then live, nothing twice");
    drop(c);

    // The query parameters resume the same way (a first connection that
    // stored its position); the header wins over them when both are sent.
    let q = format!("&last_seq={}&epoch={epoch}", missed[0]);
    let (mut c, _) = open(&node, "alice", &q, &[]).await;
    let from_query = events(&mut c, 3).await;
    assert_eq!(
        from_query.iter().map(|(f, _)| f["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        [missed[1], missed[2], live[0]]
    );
    drop(c);
    let (mut c, _) = open(&node, "alice", &q, &[("Last-Event-ID", &format!("{epoch}:{}", missed[2]))]).await;
    assert_eq!(events(&mut c, 1).await[0].0["seq"].as_u64(), Some(live[0]));
}

#[tokio::test]
async fn a_node_killed_under_a_client_and_a_reconnect_to_another_node_lose_and_repeat_nothing() {
    let nats = NatsServer::start();
    let mut a = Node::start(&nats, &[]).await;
    let b = Node::start(&nats, &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let (mut c, _) = open(&a, "bob", "", &[]).await;
    let mut published = publish_n(&js, "bob", 10).await;
    let mut seen = events(&mut c, 10).await;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5));
    // The response ends with the node; meanwhile events keep coming.
    while c.next().await.is_some() {}
    published.extend(publish_n(&js, "bob", 10).await);
    let last = seen.last().unwrap().1.clone();
    let (mut c, _) = open(&b, "bob", "", &[("Last-Event-ID", &last)]).await;
    seen.extend(events(&mut c, 10).await);
    published.extend(publish_n(&js, "bob", 5).await);
    seen.extend(events(&mut c, 5).await);
    assert_eq!(seen.iter().map(|(f, _)| f["seq"].as_u64().unwrap()).collect::<Vec<_>>(), published);
}

#[tokio::test]
async fn expired_history_and_another_stream_give_the_sockets_gap_frames() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--stream-max-per-user", "5"]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    // The stream's epoch, from another user's stream: had carol one open,
    // the node would take her events live as they are stored (before the
    // limit removes them) and rightly send them without a gap.
    let (_other, welcome) = open(&node, "dan", "", &[]).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let seqs = publish_n(&js, "carol", 12).await;
    // Last saw seqs[1]; the limit kept the newest five.
    let (mut c, _) = open(&node, "carol", "", &[("Last-Event-ID", &format!("{epoch}:{}", seqs[1]))]).await;
    let gap = c.next().await.expect("gap");
    assert_eq!(gap.event, "gap", "{gap:?}");
    let frame = gap.json();
    assert_eq!(frame["reason"], "expired");
    assert_eq!((frame["from"].as_u64(), frame["to"].as_u64()), (Some(seqs[2]), Some(seqs[6])));
    assert_eq!(gap.id, Some(format!("{epoch}:{}", seqs[6])), "a gap's id resumes after it");
    let rest = events(&mut c, 5).await;
    assert_eq!(rest.iter().map(|(f, _)| f["seq"].as_u64().unwrap()).collect::<Vec<_>>(), seqs[7..]);
    drop(c);

    // An id from another stream (as after the stream was deleted and
    // created again): stream_reset, then everything stored, from 0.
    let (mut c, _) = open(&node, "carol", "", &[("Last-Event-ID", "1:3")]).await;
    let reset = c.next().await.expect("gap");
    assert_eq!((reset.event.as_str(), reset.json()["reason"].as_str()), ("gap", Some("stream_reset")));
    assert_eq!(reset.id, Some(format!("{epoch}:0")));
    // From 0 of this stream: what the limit removed is a gap too.
    let expired = c.next().await.expect("gap");
    assert_eq!(expired.event, "gap");
    assert_eq!((expired.json()["from"].as_u64(), expired.json()["to"].as_u64()), (Some(1), Some(seqs[6])));
    let all = events(&mut c, 5).await;
    assert_eq!(all.iter().map(|(f, _)| f["seq"].as_u64().unwrap()).collect::<Vec<_>>(), seqs[7..]);
}

#[tokio::test]
async fn keepalive_comments_flow_and_the_client_is_not_taken_for_dead() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--ping-interval", "300ms"]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let (mut c, _) = open(&node, "dave", "", &[]).await;
    // Well past two ping intervals, after which a socket that sent nothing
    // would be closed for ping timeout: the client of a response sends
    // nothing, ever.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seq = publish_n(&js, "dave", 1).await;
    assert_eq!(events(&mut c, 1).await[0].0["seq"].as_u64(), Some(seq[0]));
    assert!(c.comments >= 3, "keepalive comments every 300 ms: {}", c.comments);
}

#[tokio::test]
async fn drain_sends_reconnect_then_ends_the_response() {
    let nats = NatsServer::start();
    let mut node = Node::start(&nats, &["--drain-window", "1s"]).await;
    let (mut c, _) = open(&node, "erin", "", &[]).await;
    node.signal("TERM");
    let reconnect = c.next().await.expect("reconnect");
    assert_eq!((reconnect.event.as_str(), reconnect.json()["reason"].as_str()), ("reconnect", Some("drain")));
    let close = c.next().await.expect("close");
    assert_eq!(close.event, "close");
    assert_eq!(close.json()["code"], 1012);
    assert!(c.next().await.is_none(), "the response ends");
    assert_eq!(node.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn an_expired_token_ends_the_response_with_4001() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--jwt-leeway", "0s"]).await;
    let short = agentcast::auth::mint_hs256(SECRET.as_bytes(), "frank", Duration::from_secs(2)).unwrap();
    let mut c = SseClient::open(node.addr, &format!("/sse?token={short}"), &[]).await;
    assert_eq!(c.status, 200);
    let close = c.next_except(&["welcome"]).await.expect("close");
    assert_eq!((close.event.as_str(), close.json()["code"].as_u64()), ("close", Some(4001)));
    assert!(c.next().await.is_none());
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_ended_as_slow_and_resumes_exactly() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--socket-queue-bytes", "65536"]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let (mut c, welcome) = open(&node, "gina", "", &[]).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    // 8 MB the reader does not read: more than the kernel's buffers, the
    // response's chunks and the 64 KiB queue together.
    let big = "x".repeat(100_000);
    let mut seqs = Vec::new();
    for i in 0..80 {
        seqs.push(publish(&js, "gina", format!(r#"{{"type":"t","data":{{"i":{i},"pad":"{big}"}}}}"#)).await);
    }
    eventually("the node ends the response as slow", || async {
        node.metric("agentcast_disconnects_total", r#"reason="slow""#).await >= 1.0
    })
    .await;
    // What arrived before the end is in order, with nothing missing.
    let mut got = Vec::new();
    while let Some(ev) = c.next().await {
        if ev.event == "event" {
            got.push(ev.json()["seq"].as_u64().unwrap());
        }
    }
    assert!(got.len() < seqs.len(), "it was cut off before the end");
    assert_eq!(got, seqs[..got.len()]);
    let last = got.last().map_or(format!("{epoch}:0"), |s| format!("{epoch}:{s}"));
    let (mut c, _) = open(&node, "gina", "", &[("Last-Event-ID", &last)]).await;
    let rest = events(&mut c, seqs.len() - got.len()).await;
    assert_eq!(rest.iter().map(|(f, _)| f["seq"].as_u64().unwrap()).collect::<Vec<_>>(), seqs[got.len()..]);
}

#[tokio::test]
async fn refusals_are_the_sockets() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--max-sockets-per-user", "1", "--allowed-origins", "https://app.example"]).await;
    let refused = |path: String, headers: Vec<(&'static str, String)>| {
        let addr = node.addr;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let c = SseClient::open(addr, &path, &h).await;
            let status = c.status;
            let body: Value = serde_json::from_str(&c.body().await).expect("JSON refusal");
            (status, body["error"].as_str().unwrap_or_default().to_owned())
        }
    };
    assert_eq!(refused("/sse".into(), vec![]).await, (401, "missing".into()));
    let t = token("hal");
    assert_eq!(
        refused(format!("/sse?token={t}"), vec![("Origin", "https://evil.example".into())]).await,
        (403, "origin".into())
    );
    assert_eq!(refused(format!("/sse?token={t}&last_seq=x"), vec![]).await, (400, "bad_request".into()));
    assert_eq!(
        refused(format!("/sse?token={t}"), vec![("Last-Event-ID", "not-an-id".into())]).await,
        (400, "bad_request".into())
    );
    // One stream and one socket are two of the user's connections.
    let (_held, _) = open(&node, "hal", "", &[]).await;
    assert_eq!(refused(format!("/sse?token={t}"), vec![]).await, (429, "user_capacity".into()));
    let ws = tokio_tungstenite::connect_async(node.ws_url(&t)).await;
    assert!(ws.is_err(), "the socket is refused too");
    // Counted per transport: five refused streams, one refused socket, one stream open.
    let refusals = |transport: &'static str| node.metric("agentcast_connections_refused_total", transport);
    assert_eq!(refusals(r#"transport="sse""#).await, 5.0);
    assert_eq!(refusals(r#"transport="ws""#).await, 1.0);
    assert_eq!(node.metric("agentcast_sockets_open", r#"transport="sse""#).await, 1.0);
    assert_eq!(node.metric("agentcast_sockets_open", r#"transport="ws""#).await, 0.0);
}

/// `POST /control`: a client on an event stream sends the socket's control
/// frame over HTTP and gets the frame a socket would, with a fitting status.
#[tokio::test]
async fn post_control_answers_as_a_socket_would() {
    use common::sse::post;
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--control-burst", "3", "--control-rate", "1"]).await;
    let agent = nats.client().await;
    let mut listener =
        agentcast::control::Listener::subscribe(agent.clone(), "agentcast.control", "agents").await.unwrap();
    nats.wait_subscribed("agentcast.control.*").await;
    tokio::spawn(async move {
        while let Some(req) = listener.next().await {
            let reply = serde_json::json!({"status": "cancelled", "for": req.user.as_str(), "run": req.data["run_id"]});
            req.reply(&reply).await.unwrap();
        }
    });
    let t = token("ivy");
    let auth = format!("Bearer {t}");
    let frame = r#"{"type":"control","id":"c1","data":{"action":"cancel","run_id":"r-9"}}"#;
    let (status, body) = post(node.addr, "/control", &[("Authorization", &auth)], frame).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"type": "control_reply", "id": "c1", "data": {"status": "cancelled", "for": "ivy", "run": "r-9"}})
    );
    // The token in the query works as on /sse; a bad frame is 400 with the socket's answer.
    let (status, body) =
        post(node.addr, &format!("/control?token={t}"), &[], r#"{"type":"control","id":"c2","data":[1]}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], "bad_frame");
    // A bad frame takes nothing from the user's burst of 3: two more pass,
    // and the one after is refused at once.
    for _ in 0..2 {
        assert_eq!(post(node.addr, "/control", &[("Authorization", &auth)], frame).await.0, 200);
    }
    let (status, body) = post(node.addr, "/control", &[("Authorization", &auth)], frame).await;
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()["code"].as_str()), (429, Some("rate_limited")));
    // No token: refused as a stream would be.
    let (status, body) = post(node.addr, "/control", &[], frame).await;
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()["error"].as_str()), (401, Some("missing")));
    // Too large: 413.
    let big = format!(r#"{{"type":"control","id":"c3","data":{{"x":"{}"}}}}"#, "x".repeat(20_000));
    assert_eq!(post(node.addr, "/control", &[("Authorization", &auth)], &big).await.0, 413);
}

#[tokio::test]
async fn post_control_without_an_agent_is_503_no_agent() {
    use common::sse::post;
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let frame = r#"{"type":"control","id":"c1","data":{"action":"cancel"}}"#;
    let (status, body) = post(node.addr, &format!("/control?token={}", token("jo")), &[], frame).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        serde_json::json!({"type": "control_error", "id": "c1", "code": "no_agent"})
    );
}
