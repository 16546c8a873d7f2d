//! The resuming client against a scripted server: what it asks for when it
//! reconnects.

use std::time::Duration;

use agentcast::client::{Client, Delivery};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};

/// Accepts one socket, returns the request's query, sends `frames`, then
/// closes with `code`.
#[allow(clippy::result_large_err)] // the callback's type is tungstenite's
async fn serve_once(listener: &TcpListener, frames: &[&str], code: u16) -> String {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut query = String::new();
    let mut ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
        query = req.uri().query().unwrap_or("").to_owned();
        Ok(resp)
    })
    .await
    .unwrap();
    for f in frames {
        ws.send(Message::text(*f)).await.unwrap();
    }
    let _ = ws.close(Some(CloseFrame { code: CloseCode::from(code), reason: "".into() })).await;
    while ws.next().await.is_some() {}
    query
}

fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(&format!("{key}=")))
}

#[tokio::test]
async fn a_new_epoch_in_welcome_drops_the_old_position_before_the_reset_gap() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let mut c = Client::new(vec![url], || "t".into()).resume_from(1000, Some("E1".into()));
    let server = tokio::spawn(async move {
        // First socket: the new stream's welcome, then the node fails before
        // it could send the stream_reset gap.
        let q1 =
            serve_once(&listener, &[r#"{"type":"welcome","node":"n","user":"u","position":5,"epoch":"E2"}"#], 1011)
                .await;
        let q2 =
            serve_once(&listener, &[r#"{"type":"welcome","node":"n","user":"u","position":5,"epoch":"E2"}"#], 1000)
                .await;
        (q1, q2)
    });
    assert!(matches!(c.next().await.unwrap(), Delivery::Welcome { .. }));
    assert!(matches!(c.next().await.unwrap(), Delivery::Welcome { .. }));
    drop(c);
    let (q1, q2) = tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
    assert_eq!((param(&q1, "last_seq"), param(&q1, "epoch")), (Some("1000"), Some("E1")));
    // Never the old position with the new epoch.
    assert_eq!((param(&q2, "last_seq"), param(&q2, "epoch")), (Some("0"), Some("E2")));
}

#[tokio::test]
async fn duplicates_are_dropped_and_refusals_end_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let mut c = Client::new(vec![url], || "t".into());
    let server = tokio::spawn(async move {
        let frames = [
            r#"{"type":"welcome","node":"n","user":"u","position":3,"epoch":"E"}"#,
            r#"{"type":"event","seq":4,"event":{"a":1}}"#,
            r#"{"type":"event","seq":4,"event":{"a":1}}"#,
            r#"{"type":"event","seq":6,"event":{"a":2}}"#,
        ];
        let q = serve_once(&listener, &frames, 1000).await;
        // Then refuse with 401.
        let (mut tcp, _) = listener.accept().await.unwrap();
        use tokio::io::AsyncWriteExt;
        tcp.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}").await.unwrap();
        q
    });
    assert!(matches!(c.next().await.unwrap(), Delivery::Welcome { position: 3, .. }));
    assert_eq!(
        c.next().await.unwrap(),
        Delivery::Event { seq: 4, first_seq: 4, merged: 1, event: r#"{"a":1}"#.into() }
    );
    assert_eq!(
        c.next().await.unwrap(),
        Delivery::Event { seq: 6, first_seq: 6, merged: 1, event: r#"{"a":2}"#.into() }
    );
    assert_eq!(c.duplicates, 1);
    let err = c.next().await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let q = server.await.unwrap();
    assert_eq!(param(&q, "last_seq"), None, "the first connection is live");
}

const WELCOME: &str = r#"{"type":"welcome","node":"n","user":"u","position":0,"epoch":"E1"}"#;

fn event(seq: u64) -> String {
    format!(r#"{{"type":"event","seq":{seq},"event":{{"type":"agent_thinking","n":{seq}}}}}"#)
}

/// Accepts one socket and returns it with its request's query.
#[allow(clippy::result_large_err)] // the callback's type is tungstenite's
async fn accept(listener: &TcpListener) -> (tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, String) {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut query = String::new();
    let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
        query = req.uri().query().unwrap_or("").to_owned();
        Ok(resp)
    })
    .await
    .unwrap();
    (ws, query)
}

/// A connection that goes quiet (a half-open TCP connection looks the same
/// to the client): pinged after the stall timeout less the probe time, then
/// dropped, and the next one resumes from the last event.
#[tokio::test]
async fn a_quiet_connection_is_pinged_then_replaced_and_resumed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let mut c = Client::new(vec![url], || "t".into()).stall_timeout(Duration::from_secs(1));
    let server = tokio::spawn(async move {
        let (mut ws, _) = accept(&listener).await;
        ws.send(Message::text(WELCOME)).await.unwrap();
        ws.send(Message::text(event(7))).await.unwrap();
        // The client's ping, then silence: nothing answered, nothing read.
        let ping = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        let (mut second, query) = accept(&listener).await;
        second.send(Message::text(WELCOME)).await.unwrap();
        drop(ws);
        (ping, query, second)
    });
    assert!(matches!(c.next().await.unwrap(), Delivery::Welcome { .. }));
    assert!(matches!(c.next().await.unwrap(), Delivery::Event { seq: 7, .. }));
    let quiet = std::time::Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("a new connection");
    assert!(matches!(next.unwrap(), Delivery::Welcome { .. }));
    let waited = quiet.elapsed();
    let (ping, query, _second) = tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
    assert_eq!(ping, Message::text(r#"{"type":"ping"}"#));
    assert_eq!(param(&query, "last_seq"), Some("7"), "the new connection resumes");
    assert_eq!((c.stalls, c.reconnects), (1, 1));
    // The stall timeout (1 s) and a reconnect's jitter (at most 100 ms).
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
}

/// Anything received proves the connection alive: frames slower than the
/// probe time but within the stall timeout never make it dead, and a
/// `pong` answering the probe keeps a quiet one.
#[tokio::test]
async fn slow_frames_and_an_answered_ping_keep_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let mut c = Client::new(vec![url], || "t".into()).stall_timeout(Duration::from_secs(1));
    let server = tokio::spawn(async move {
        let (mut ws, _) = accept(&listener).await;
        ws.send(Message::text(WELCOME)).await.unwrap();
        for seq in 1..=8 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            ws.send(Message::text(event(seq))).await.unwrap();
        }
        // Then quiet for 3 s, each ping answered.
        let mut pings = 0;
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while let Some(Ok(m)) = ws.next().await {
                if m == Message::text(r#"{"type":"ping"}"#) {
                    pings += 1;
                    ws.send(Message::text(r#"{"type":"pong"}"#)).await.unwrap();
                }
            }
        })
        .await;
        ws.send(Message::text(event(9))).await.unwrap();
        (pings, ws)
    });
    assert!(matches!(c.next().await.unwrap(), Delivery::Welcome { .. }));
    for seq in 1..=9 {
        assert!(matches!(c.next().await.unwrap(), Delivery::Event { seq: s, .. } if s == seq));
    }
    assert_eq!((c.stalls, c.reconnects), (0, 0));
    let (pings, _ws) = server.await.unwrap();
    // One ping each 0.5 s of quiet (the stall timeout less the probe time).
    assert!((4..=7).contains(&pings), "{pings} pings answered in 3 s");
}
