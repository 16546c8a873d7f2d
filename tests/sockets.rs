//! Socket behaviour: client frames, slow clients, pings, token expiry, drain.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn client_frames_are_answered_or_closed_as_documented() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    c.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(c.next_json().await, json!({"type":"pong"}));
    // Bigger than the read buffer (256 B), within the limit (16 KiB): read
    // whole, and the socket goes on reading small ones.
    c.send_text(&format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(12_000))).await;
    assert_eq!(c.next_json().await, json!({"type":"pong"}));
    c.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(c.next_json().await, json!({"type":"pong"}));
    c.send_text("hello").await;
    let e = c.next_json().await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_frame")), "{e}");
    // A frame asking for someone else's events is just a bad frame.
    c.send_text(r#"{"type":"subscribe","user":"u2"}"#).await;
    assert_eq!(c.next_json().await["code"], "bad_frame");
    // The socket still works.
    let js = async_nats::jetstream::new(nats.client().await);
    let s = publish(&js, "u1", r#"{"a":1}"#).await;
    assert_eq!(c.events(1).await, vec![(s, json!({"a":1}))]);

    c.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    let (_, close) = c.until_close().await;
    assert_eq!(u16::from(close.expect("close frame").code), 1003);

    // Invalid UTF-8 in a text frame: 1007.
    let (mut bad, _) = Client::join(&node, "u1").await;
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let frame = Frame::message(vec![b'{', 0xff, b'}'], OpCode::Data(Data::Text), true);
    bad.ws.send(Message::Frame(frame)).await.unwrap();
    let (_, close) = bad.until_close().await;
    assert_eq!(u16::from(close.expect("close frame").code), 1007);

    let (mut big, _) = Client::join(&node, "u1").await;
    big.send_text(&format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(agentcast::protocol::MAX_CLIENT_FRAME))).await;
    let (_, close) = big.until_close().await;
    assert_eq!(u16::from(close.expect("close frame").code), 1009);
    assert_eq!(node.metric("agentcast_client_frames_rejected_total", "").await, 5.0);

    // A client's close is answered with a close.
    let (mut leaving, _) = Client::join(&node, "u1").await;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    leaving.ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).await.unwrap();
    let (_, close) = leaving.until_close().await;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1000), "the server answers the close handshake");
}

// Multi-threaded so the fast reader, the publisher and the test's clients do
// not take turns on one thread; the publisher is paced at about 25 MB/s, a
// rate any client that reads its socket keeps up with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_closed_while_a_fast_one_keeps_up() {
    let nats = NatsServer::start();
    // 1 MiB: 32 of the events below, which a reader keeps below; the slow
    // socket, never read, passes it once the kernel's buffers are full.
    let node = Node::start(&nats, &["--socket-queue-bytes", "1048576"]).await;
    let (mut fast, _) = Client::join(&node, "u1").await;
    let (mut slow, _) = Client::join(&node, "u1").await;
    let (mut other, _) = Client::join(&node, "u2").await;
    // 400 events of 32 KiB: 12.5 MiB, more than the kernel buffers of the
    // slow socket, which is never read until the end.
    let pad = "x".repeat(32 * 1024);
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    const N: usize = 400;
    let publisher = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for i in 0..N {
            seqs.push(publish(&js, "u1", format!(r#"{{"i":{i},"pad":"{pad}"}}"#)).await);
            tokio::time::sleep(Duration::from_millis(1)).await;
            if i % 50 == 0 {
                publish(&js, "u2", format!(r#"{{"i":{i}}}"#)).await;
            }
        }
        seqs
    });
    let started = Instant::now();
    let got = fast.events(N).await;
    let seqs = publisher.await.unwrap();
    assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), seqs, "fast socket got everything in order");
    let elapsed = started.elapsed();
    assert_eq!(other.events(N / 50).await.len(), N / 50, "another user is unaffected");

    let (frames, close) = slow.until_close().await;
    let close = close.expect("slow socket gets a close frame");
    assert_eq!(u16::from(close.code), 4000, "{close:?}");
    assert!(frames.len() < N, "slow socket was cut short ({} frames)", frames.len());
    // What it did get is an in-order prefix.
    let slow_seqs: Vec<u64> =
        frames.iter().filter(|f| f["type"] == "event").map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(slow_seqs, seqs[..slow_seqs.len()].to_vec());
    // Counted when the socket ends: after the client's close reply (the node waits for it).
    eventually("the disconnect counted", || async {
        node.metric("agentcast_disconnects_total", r#"reason="slow""#).await == 1.0
    })
    .await;
    eprintln!("fast socket received {N} events of 32 KiB in {elapsed:?} while the slow one was closed");
}

#[tokio::test]
async fn a_silent_client_is_closed_after_two_ping_intervals() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--ping-interval", "200ms"]).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    // A tungstenite client answers pings only while it is read: stay away.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, close) = c.until_close().await;
    assert_eq!(u16::from(close.expect("close frame").code), 4002);
    // Counted when the socket ends: after the client's close reply (the node waits for it).
    eventually("the disconnect counted", || async {
        node.metric("agentcast_disconnects_total", r#"reason="ping_timeout""#).await == 1.0
    })
    .await;
    // A client that is read (and so answers pings) stays open.
    let (mut live, _) = Client::join(&node, "u1").await;
    live.quiet_for(Duration::from_millis(800)).await;
    live.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(live.next_json().await["type"], "pong");
}

#[tokio::test]
async fn the_socket_closes_when_the_token_expires() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--jwt-leeway", "0s"]).await;
    let t = agentcast::auth::mint_hs256(SECRET.as_bytes(), "u1", Duration::from_secs(2)).unwrap();
    let mut c = Client::connect(&node.ws_url(&t)).await;
    assert_eq!(c.next_json().await["type"], "welcome");
    let start = Instant::now();
    let (_, close) = c.until_close().await;
    assert_eq!(u16::from(close.expect("close frame").code), 4001);
    assert!(start.elapsed() <= Duration::from_secs(3), "{:?}", start.elapsed());
    // Counted when the socket ends: after the client's close reply (the node waits for it).
    eventually("the disconnect counted", || async {
        node.metric("agentcast_disconnects_total", r#"reason="token_expired""#).await == 1.0
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_every_socket_and_exits_zero_within_the_window() {
    let nats = NatsServer::start();
    let mut node = Node::start(&nats, &["--drain-window", "2s"]).await;
    let mut clients = Vec::new();
    for u in 0..10 {
        clients.push(Client::join(&node, &format!("u{u}")).await.0);
    }
    let started = Instant::now();
    node.signal("TERM");
    // Readiness goes first, so the load balancer stops sending sockets.
    eventually("not ready while draining", || async {
        let (status, _) = node.get("/readyz").await;
        status == 503 || status == 0
    })
    .await;
    // Read every socket at once, noting when each close arrives.
    let closes = futures_util::future::join_all(clients.iter_mut().map(|c| async move {
        let (frames, close) = c.until_close().await;
        (started.elapsed(), frames, close)
    }))
    .await;
    let mut close_times = Vec::new();
    for (at, frames, close) in closes {
        assert_eq!(frames, vec![json!({"type":"reconnect","reason":"drain"})]);
        assert_eq!(u16::from(close.expect("close frame").code), 1012);
        close_times.push(at);
    }
    let code = node.wait_exit(Duration::from_secs(4));
    assert_eq!(code, Some(0), "exit code; log:\n{}", node.log_text());
    assert!(started.elapsed() < Duration::from_millis(2500), "exited within the window: {:?}", started.elapsed());
    // Closes were spread out, not all at once.
    close_times.sort();
    let spread = *close_times.last().unwrap() - close_times[0];
    assert!(spread >= Duration::from_millis(800), "closes spread over the window: {close_times:?}");
}

#[tokio::test]
async fn a_draining_node_refuses_new_sockets() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--drain-window", "5s"]).await;
    // Several sockets, so the drain (closes spread over the window) lasts.
    let mut clients = Vec::new();
    for u in 0..5 {
        clients.push(Client::join(&node, &format!("u{u}")).await);
    }
    node.signal("TERM");
    eventually("not ready", || async { node.get("/readyz").await.0 == 503 }).await;
    let (status, body) = refused(&node.ws_url(&token("u2")), &[]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("draining")));
    assert_eq!(node.metric("agentcast_connections_refused_total", r#"reason="draining""#).await, 1.0);
    assert_eq!(node.metric("agentcast_ready", "").await, 0.0);
    // The drain's closes are counted as they happen, and HTTP stays up
    // meanwhile: read while the last socket (closed about 1 s after the
    // others, and the node exits after it) is still open.
    let mut closing: futures_util::stream::FuturesUnordered<_> =
        clients.iter_mut().map(|(c, _)| async move { c.until_close().await }).collect();
    for _ in 0..4 {
        let (_, close) = closing.next().await.expect("a socket closes");
        assert_eq!(u16::from(close.expect("close frame").code), 1012);
    }
    eventually("drain closes counted", || async {
        node.metric("agentcast_disconnects_total", r#"reason="drain""#).await == 4.0
    })
    .await;
}
