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
