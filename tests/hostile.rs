//! Hostile clients: connections that never finish their request, floods of
//! half-open connections under a low open-file limit, a drain with sockets
//! that have not joined yet, frames that break RFC 6455, one token opening
//! socket after socket, and a socket kept busy by a continuous stream.
//! Clients here speak raw TCP where a WebSocket library would refuse to
//! misbehave.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The node's header-read timeout (`agentcast::server::HEADER_READ_TIMEOUT`).
const HEADER_TIMEOUT: Duration = agentcast::server::HEADER_READ_TIMEOUT;

/// Slack for a shared, busy test machine on top of a stated bound.
const SLACK: Duration = Duration::from_secs(2);

/// Waits until the peer closes the connection (EOF or reset); returns when.
async fn closed_by_peer(s: &mut TcpStream, within: Duration) -> Option<Instant> {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => {}
        }
    }
}

/// An HTTP GET over a fresh connection, bounded in time: `None` when the
/// node does not answer within `within`.
async fn get_within(node: &Node, path: &str, within: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(within, node.get(path)).await.ok()
}

fn ws_request(node: &Node, path_and_query: &str, version: &str, key: &str) -> String {
    format!(
        "GET {path_and_query} {version}\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n",
        node.addr
    )
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends a raw request and reads the whole answer (the node closes after a
/// refusal, or we stop at the end of a 101's headers). Returns status,
/// headers and body.
async fn raw_exchange(node: &Node, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
            Err(_) => panic!("no answer; got {:?}", String::from_utf8_lossy(&buf)),
        };
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok());
            if status == 101 || len.is_some_and(|l| body.len() >= l) || n == 0 {
                return (status, head.to_owned(), body.to_owned());
            }
        } else if n == 0 {
            return (0, text, String::new());
        }
    }
}

#[tokio::test]
async fn half_sent_requests_do_not_hold_up_the_exit() {
    let nats = NatsServer::start();
    let window = Duration::from_secs(2);
    let mut node = Node::start(&nats, &["--drain-window", "2s"]).await;
    let mut half = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        half.push(s);
    }
    // And a socket, so there is something to drain.
    let (mut c, _) = Client::join(&node, "u1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    node.signal("TERM");
    let (frames, close) = c.until_close().await;
    assert_eq!(frames, vec![json!({"type":"reconnect","reason":"drain"})]);
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1012));
    let bound = window + agentcast::server::DRAIN_GRACE;
    let code = node.wait_exit(bound + SLACK);
    let took = started.elapsed();
    eprintln!("exit {code:?} {took:?} after SIGTERM (window {window:?}, grace {:?})", agentcast::server::DRAIN_GRACE);
    assert_eq!(code, Some(0), "exited 0 within the window plus the grace; log:\n{}", node.log_text());
    for s in &mut half {
        assert!(closed_by_peer(s, Duration::from_millis(100)).await.is_some(), "half-sent connection closed");
    }
}

/// A socket whose client stopped reading, with megabytes queued behind a
/// full TCP window, cannot take its close frame: the exit does not wait for it.
#[tokio::test]
async fn a_stalled_socket_does_not_hold_up_the_exit() {
    let nats = NatsServer::start();
    let window = Duration::from_secs(2);
    // Queues large enough that the socket is not closed as slow first.
    let queue = ["--socket-queue-bytes", "1073741824"];
    let mut node = Node::start(&nats, &[&["--drain-window", "2s"][..], &queue].concat()).await;
    let (_stalled, _) = Client::join(&node, "u1").await;
    let js = async_nats::jetstream::new(nats.client().await);
    // 20 MiB: more than the kernel buffers on both ends of a loopback socket.
    let event = format!(r#"{{"pad":"{}"}}"#, "x".repeat(200 * 1024));
    for _ in 0..100 {
        publish(&js, "u1", event.clone()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    node.signal("TERM");
    let code = node.wait_exit(window + agentcast::server::DRAIN_GRACE + SLACK);
    let took = started.elapsed();
    eprintln!("exit {code:?} {took:?} after SIGTERM with a stalled socket (window {window:?})");
    assert_eq!(code, Some(0), "log:\n{}", node.log_text());
    assert!(node.log_text().contains("drain window passed with sockets still closing"), "the socket was stalled");
}

#[tokio::test]
async fn silent_and_dripping_connections_are_closed_by_the_header_timeout() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(node.addr).await.unwrap();
    let mut dripping = TcpStream::connect(node.addr).await.unwrap();
    dripping.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    // A kept-alive connection that went quiet after one answered request.
    let mut kept = TcpStream::connect(node.addr).await.unwrap();
    kept.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", node.addr).as_bytes()).await.unwrap();
    let mut answer = [0u8; 256];
    let n = kept.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"), "kept-alive request answered");
    let within = HEADER_TIMEOUT + SLACK * 2;
    let drip = async {
        // A header line every 2 s: each is progress, none completes the request.
        for i in 0.. {
            if dripping.write_all(format!("X-Drip-{i}: {i}\r\n").as_bytes()).await.is_err() {
                return Some(Instant::now());
            }
            if let Some(at) = closed_by_peer(&mut dripping, Duration::from_secs(2)).await {
                return Some(at);
            }
            if opened.elapsed() > within {
                return None;
            }
        }
        None
    };
    let (silent_at, drip_at, kept_at) =
        tokio::join!(closed_by_peer(&mut silent, within), drip, closed_by_peer(&mut kept, within));
    for (what, at) in [("silent", silent_at), ("dripping", drip_at), ("kept-alive", kept_at)] {
        let at = at.unwrap_or_else(|| panic!("{what} connection still open after {within:?}"));
        let after = at - opened;
        eprintln!("{what} connection closed after {after:?}");
        assert!(
            after >= HEADER_TIMEOUT - Duration::from_secs(1),
            "{what}: closed by the timeout, not before: {after:?}"
        );
    }
    // The node is fine.
    assert_eq!(node.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn health_checks_are_answered_with_many_half_open_connections_under_a_low_file_limit() {
    let nats = NatsServer::start();
    // 96 open files: after the node's reserve, room for 16 sockets and 16
    // HTTP connections.
    let node = Node::start_limited(&nats, &[], 96).await;
    assert!(node.log_text().contains("open-file limit (96)"), "the lowered bounds are logged:\n{}", node.log_text());
    // More bare connections than the process may open files.
    let mut bare = Vec::new();
    for _ in 0..150 {
        bare.push(TcpStream::connect(node.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..5 {
        let started = Instant::now();
        let answer = get_within(&node, "/healthz", Duration::from_secs(5)).await;
        assert_eq!(answer.map(|a| a.0), Some(200), "health check {i} answered; log:\n{}", node.log_text());
        eprintln!("health check {i} answered in {:?}", started.elapsed());
        // Another wave of bare connections between checks.
        for _ in 0..20 {
            bare.push(TcpStream::connect(node.addr).await.unwrap());
        }
    }
    // Sockets can still be opened, up to the lowered bound and no further.
    let mut sockets = Vec::new();
    for u in 0..16 {
        sockets.push(Client::join(&node, &format!("u{u}")).await);
    }
    let (status, body) = refused(&node.ws_url(&token("u99")), &[]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("capacity")), "{body}");
    assert_eq!(get_within(&node, "/readyz", Duration::from_secs(5)).await.map(|a| a.0), Some(200));
    assert!(!node.log_text().contains("Too many open files"), "no accept failed:\n{}", node.log_text());
    // The bare connections were closed, oldest first, to make room.
    let evicted = node.metric("agentcast_connections_refused_total", r#"reason="http_capacity""#).await;
    assert!(evicted >= 150.0, "{evicted} connections closed at the bound");
}

/// Late joiners: sockets that have not joined their user when the drain
/// starts (waiting for their `resume` frame), including one that sends it
/// only after the drain's closes were spread, each get `reconnect` and 1012.
#[tokio::test]
async fn late_joiners_during_a_drain_get_reconnect_and_1012() {
    let nats = NatsServer::start();
    let window = Duration::from_secs(3);
    let mut node = Node::start(&nats, &["--drain-window", "3s"]).await;
    let frame_url = |u: &str| format!("{}&resume=frame", node.ws_url(&token(u)));
    let mut waiting = Client::connect(&frame_url("u1")).await;
    let mut late = Client::connect(&frame_url("u2")).await;
    let (mut live, _) = Client::join(&node, "u3").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    node.signal("TERM");
    // `late` sends its resume frame after 80% of the window, when every
    // close has been scheduled; `waiting` never sends one.
    let late_resume = async {
        // Closed while still waiting (this node), or sends its frame late.
        if let Ok(closed) = tokio::time::timeout(window.mul_f64(0.85), late.until_close()).await {
            return closed;
        }
        let _ = futures_util::SinkExt::send(
            &mut late.ws,
            tokio_tungstenite::tungstenite::Message::text(r#"{"type":"resume","last_seq":null}"#),
        )
        .await;
        late.until_close().await
    };
    let (w, l, v) = tokio::join!(waiting.until_close(), late_resume, live.until_close());
    for (what, (frames, close)) in [("waiting", w), ("late", l), ("live", v)] {
        let frames: Vec<Value> = frames.into_iter().filter(|f| f["type"] != "welcome").collect();
        assert_eq!(frames, vec![json!({"type":"reconnect","reason":"drain"})], "{what}");
        assert_eq!(close.map(|c| u16::from(c.code)), Some(1012), "{what}");
    }
    let code = node.wait_exit(window + agentcast::server::DRAIN_GRACE + SLACK);
    assert_eq!(code, Some(0), "log:\n{}", node.log_text());
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
}

/// A raw WebSocket connection: handshake by hand, frames by hand.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

/// What the server sent: a text frame or the close frame that ends it.
#[derive(Debug, PartialEq)]
enum Got {
    Text(String),
    Close(u16, String),
    /// The connection ended without a close frame.
    Eof,
}

impl Raw {
    async fn open(node: &Node, query: &str) -> Self {
        let path = format!("/ws?token={}{query}", token("u1"));
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        s.write_all(ws_request(node, &path, "HTTP/1.1", KEY).as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            let n = tokio::time::timeout(RECV_TIMEOUT, s.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..head_end);
        Self { s, buf }
    }

    /// Opens a socket and reads its welcome.
    async fn joined(node: &Node) -> Self {
        let mut raw = Self::open(node, "").await;
        match raw.next().await {
            Got::Text(t) => assert!(t.contains(r#""type":"welcome""#), "{t}"),
            other => panic!("expected the welcome, got {other:?}"),
        }
        raw
    }

    /// Writes one frame: `first` is FIN, RSV and opcode; masked unless told not.
    async fn frame(&mut self, first: u8, payload: &[u8], masked: bool) {
        let mut f = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        // The node may close before reading all of it.
        let _ = self.s.write_all(&f).await;
    }

    /// The next text or close frame (pings skipped).
    async fn next(&mut self) -> Got {
        loop {
            if let Some((opcode, payload, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                match opcode {
                    0x1 => return Got::Text(String::from_utf8(payload).unwrap()),
                    0x8 => {
                        let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])).unwrap_or(1005);
                        let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).to_string();
                        return Got::Close(code, reason);
                    }
                    _ => continue,
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(RECV_TIMEOUT, self.s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Got::Eof,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("nothing from the node within {RECV_TIMEOUT:?}"),
            }
        }
    }

    /// The close frame that ends the socket, skipping text frames.
    async fn close(&mut self) -> Got {
        loop {
            match self.next().await {
                Got::Text(_) => continue,
                other => return other,
            }
        }
    }
}

/// One unmasked server frame from the front of `buf`: opcode, payload,
/// bytes used.
fn parse(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    let (len, at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    Some((b0 & 0x0f, payload, at + len))
}

const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

#[tokio::test]
async fn the_first_frame_of_a_resume_frame_socket_gets_the_documented_close() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let mut close_payload = 1000u16.to_be_bytes().to_vec();
    close_payload.extend_from_slice(b"bye");
    let big = format!(r#"{{"type":"resume","pad":"{}"}}"#, "x".repeat(agentcast::protocol::MAX_CLIENT_FRAME + 1));
    let cases: Vec<(&str, u8, Vec<u8>, u16)> = vec![
        ("binary", FIN | BINARY, b"{}".to_vec(), 1003),
        ("close", FIN | CLOSE, close_payload, 1000),
        ("invalid UTF-8", FIN | TEXT, vec![b'{', 0xff, b'}'], 1007),
        ("over 16 KiB", FIN | TEXT, big.into_bytes(), 1009),
        ("reserved bits", FIN | 0x40 | TEXT, br#"{"type":"resume"}"#.to_vec(), 1002),
        ("not a resume frame", FIN | TEXT, br#"{"type":"ping"}"#.to_vec(), 1008),
    ];
    for (what, first, payload, code) in cases {
        let mut raw = Raw::open(&node, "&resume=frame").await;
        raw.frame(first, &payload, true).await;
        match raw.close().await {
            Got::Close(c, reason) => assert_eq!(c, code, "{what}: {reason}"),
            other => panic!("{what}: expected a close frame with {code}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn frames_that_break_rfc_6455_are_closed_with_1002() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let ping = br#"{"type":"ping"}"#.to_vec();
    let cases: Vec<(&str, u8, Vec<u8>, bool)> = vec![
        ("RSV1 set", FIN | 0x40 | TEXT, ping.clone(), true),
        ("RSV3 set", FIN | 0x10 | TEXT, ping.clone(), true),
        ("reserved data opcode 0x3", FIN | 0x3, ping.clone(), true),
        ("reserved control opcode 0xB", FIN | 0xB, vec![], true),
        ("unmasked", FIN | TEXT, ping.clone(), false),
        ("ping over 125 bytes", FIN | PING, vec![b'x'; 126], true),
        ("fragmented ping", PING, b"x".to_vec(), true),
        ("continuation with nothing to continue", FIN, ping.clone(), true),
    ];
    for (what, first, payload, masked) in cases {
        let mut raw = Raw::joined(&node).await;
        raw.frame(first, &payload, masked).await;
        match raw.close().await {
            Got::Close(code, reason) => assert_eq!(code, 1002, "{what}: {reason}"),
            other => panic!("{what}: expected a close frame with 1002, got {other:?}"),
        }
    }
    // A close whose reason is not UTF-8: 1007, and the reason says what was wrong.
    let mut raw = Raw::joined(&node).await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0xff, 0xfe]);
    raw.frame(FIN | CLOSE, &payload, true).await;
    assert_eq!(raw.close().await, Got::Close(1007, "invalid UTF-8".into()));
    assert_eq!(node.metric("agentcast_client_frames_rejected_total", r#"reason="protocol""#).await, 8.0);
}

#[tokio::test]
async fn handshakes_that_are_not_websocket_get_json_refusals() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let path = format!("/ws?token={}", token("u1"));
    let json_error = |what: &str, body: &str| -> String {
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: not JSON: {body:?}"));
        v["error"].as_str().unwrap_or_default().to_owned()
    };
    // HTTP/1.0 cannot upgrade.
    let (status, _, body) = raw_exchange(&node, ws_request(&node, &path, "HTTP/1.0", KEY).as_bytes()).await;
    assert_eq!((status, json_error("HTTP/1.0", &body).as_str()), (426, "not_websocket"), "{body}");
    // A key that is not 16 bytes in base64.
    for key in ["not base64!", "c2hvcnQ=", "dGhlIHNhbXBsZSBub25jZSB0b28gbG9uZw=="] {
        let (status, _, body) = raw_exchange(&node, ws_request(&node, &path, "HTTP/1.1", key).as_bytes()).await;
        assert_eq!((status, json_error(key, &body).as_str()), (400, "not_websocket"), "{key}: {body}");
    }
    // No upgrade headers at all.
    let plain = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, body) = raw_exchange(&node, plain.as_bytes()).await;
    assert_eq!((status, json_error("plain GET", &body).as_str()), (400, "not_websocket"), "{body}");
    // A token given twice.
    let twice = ws_request(&node, &format!("{path}&token=x"), "HTTP/1.1", KEY);
    let (status, _, body) = raw_exchange(&node, twice.as_bytes()).await;
    assert_eq!((status, json_error("token twice", &body).as_str()), (400, "bad_request"), "{body}");
    // A token over 8 KiB is a JSON refusal; a request line or head over
    // 64 KiB is refused by the HTTP layer, with no body, as documented.
    let long = ws_request(&node, &format!("/ws?token={}", "a".repeat(9 * 1024)), "HTTP/1.1", KEY);
    let (status, _, body) = raw_exchange(&node, long.as_bytes()).await;
    assert_eq!((status, json_error("9 KiB token", &body).as_str()), (401, "malformed"), "{body}");
    let huge = ws_request(&node, &format!("/ws?token={}", "a".repeat(100 * 1024)), "HTTP/1.1", KEY);
    let (status, _, body) = raw_exchange(&node, huge.as_bytes()).await;
    assert_eq!((status, body.as_str()), (414, ""), "100 KB token");
    let cookie = format!("GET {path} HTTP/1.1\r\nHost: x\r\nCookie: {}\r\n\r\n", "c".repeat(200 * 1024));
    let (status, _, body) = raw_exchange(&node, cookie.as_bytes()).await;
    assert_eq!((status, body.as_str()), (431, ""), "200 KB header");
    // The valid key upgrades.
    let (status, head, _) = raw_exchange(&node, ws_request(&node, &path, "HTTP/1.1", KEY).as_bytes()).await;
    assert_eq!(status, 101, "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "RFC 6455's example accept value: {head}");
}

/// The default of `--max-sockets-per-user`.
const SOCKETS_PER_USER: usize = agentcast::config::DEFAULT_SOCKETS_PER_USER;

/// One token cannot take every socket of the node: past
/// `--max-sockets-per-user` a user's sockets are refused with 429 before
/// the upgrade, also when they all come at once, while other users still
/// connect; a socket that ends frees its slot.
#[tokio::test]
async fn one_user_cannot_take_every_socket_of_the_node() {
    use tokio_tungstenite::tungstenite;
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let url = node.ws_url(&token("u1"));
    // A burst: the bound must hold while upgrades are under way.
    let extra = 8;
    let attempts = futures_util::future::join_all(
        (0..SOCKETS_PER_USER + extra).map(|_| tokio_tungstenite::connect_async(url.clone())),
    )
    .await;
    let mut open = Vec::new();
    let mut refusals = Vec::new();
    for a in attempts {
        match a {
            Ok((ws, _)) => open.push(ws),
            Err(tungstenite::Error::Http(resp)) => {
                let body: Value = resp.body().as_ref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default();
                refusals.push((resp.status().as_u16(), body));
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!((open.len(), refusals.len()), (SOCKETS_PER_USER, extra), "refused: {refusals:?}");
    for (status, body) in &refusals {
        assert_eq!((*status, body["error"].as_str()), (429, Some("user_capacity")), "{body}");
        assert!(body["message"].as_str().is_some_and(|m| m.contains(&SOCKETS_PER_USER.to_string())), "{body}");
    }
    let counted = node.metric("agentcast_connections_refused_total", r#"reason="user_capacity""#).await;
    assert_eq!(counted, extra as f64);
    // Other users are not affected.
    let (mut other, _) = Client::join(&node, "u2").await;
    let js = async_nats::jetstream::new(nats.client().await);
    publish(&js, "u2", r#"{"type":"t"}"#).await;
    assert_eq!(other.events(1).await.len(), 1);
    // Still full for u1; a closed socket frees a slot.
    assert_eq!(refused(&url, &[]).await.0, 429);
    let mut gone = open.pop().expect("an open socket");
    futures_util::SinkExt::close(&mut gone).await.expect("close");
    while let Some(Ok(_)) = futures_util::StreamExt::next(&mut gone).await {}
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        match tokio_tungstenite::connect_async(url.clone()).await {
            Ok((ws, _)) => break open.push(ws),
            Err(tungstenite::Error::Http(resp)) if resp.status() == 429 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the freed slot was not given: {e}"),
        }
    }
    assert_eq!(node.metric("agentcast_sockets_open", "").await, (SOCKETS_PER_USER + 1) as f64);
    // Every slot comes back however its socket ends: dropped without a
    // close, or a handshake whose client went away before the upgrade.
    drop(open);
    for _ in 0..SOCKETS_PER_USER {
        let path = format!("/ws?token={}", token("u1"));
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        s.write_all(ws_request(&node, &path, "HTTP/1.1", KEY).as_bytes()).await.unwrap();
    }
    let mut again = Vec::new();
    let deadline = Instant::now() + RECV_TIMEOUT;
    while again.len() < SOCKETS_PER_USER {
        match tokio_tungstenite::connect_async(url.clone()).await {
            Ok((ws, _)) => again.push(ws),
            Err(tungstenite::Error::Http(resp)) if resp.status() == 429 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{} of u1's slots came back: {e}", again.len()),
        }
    }
}

/// Events a second of the stream in the test below, and what its client reads.
const STREAM_RATE: u64 = 1000;
const CLIENT_RATE: f64 = 800.0;

/// A socket whose outbound queue never runs dry still has its timers and
/// its client's frames served. The client reads a steady stream a little
/// slower than it comes, as one on a slow link does: the node always has
/// events queued for it (a large `--socket-queue-bytes` keeps it from being
/// closed as slow within the test). Its token expires mid-stream: it is
/// closed with 4001 within a second of `exp` plus the leeway; its `ping`
/// frames are answered while events flow; the node's WebSocket pings come
/// at their interval. The client's receive buffer is small, so what the
/// kernel holds between the two ends is a fraction of a second of events.
#[tokio::test]
async fn a_token_expiring_under_a_continuous_stream_is_closed_on_time() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    use tokio_tungstenite::tungstenite::Message;
    let nats = NatsServer::start();
    let leeway = Duration::from_secs(1);
    let ping_interval = Duration::from_millis(300);
    // Queues large enough that the client is not closed as slow first.
    let queue = ["--socket-queue-bytes", "1073741824"];
    let node = Node::start(&nats, &[&["--jwt-leeway", "1s", "--ping-interval", "300ms"][..], &queue].concat()).await;
    let lifetime = Duration::from_secs(5);
    let tok = agentcast::auth::mint_hs256(SECRET.as_bytes(), "u1", lifetime).unwrap();
    let exp = token_exp(&tok);
    let close_at = UNIX_EPOCH + Duration::from_secs(exp) + leeway;
    let tcp = small_window_socket();
    let tcp = tcp.connect(node.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(node.ws_url(&tok), tcp).await.expect("upgrade");

    // The stream: STREAM_RATE events a second, until the socket is closed
    // (or long after it should have been).
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn({
        let (js, stop) = (async_nats::jetstream::new(nats.client().await), stop.clone());
        let hard_stop = close_at + Duration::from_secs(10);
        async move {
            let payload = bytes::Bytes::from(format!(r#"{{"type":"t","pad":"{}"}}"#, "x".repeat(4000)));
            let step = Duration::from_millis(20);
            let mut tick = tokio::time::interval(step);
            while !stop.load(Ordering::Acquire) && SystemTime::now() < hard_stop {
                tick.tick().await;
                let mut acks = Vec::new();
                for _ in 0..STREAM_RATE * step.as_millis() as u64 / 1000 {
                    acks.push(js.publish("agentcast.events.u1", payload.clone()).await.expect("publish"));
                }
                for ack in acks {
                    ack.await.expect("ack");
                }
            }
        }
    });

    let mut events = 0u64;
    let mut event_times: Vec<Instant> = Vec::new();
    let mut node_pings: Vec<Instant> = Vec::new();
    let mut pings_sent: Vec<Instant> = Vec::new();
    let mut pong_delays: Vec<Duration> = Vec::new();
    let mut next_ping = tokio::time::Instant::now();
    let mut reading_since: Option<tokio::time::Instant> = None;
    let close = loop {
        // At most CLIENT_RATE frames a second once events flow.
        let allowed = reading_since.map(|t| t + Duration::from_secs_f64(events as f64 / CLIENT_RATE));
        let msg = tokio::select! {
            m = async {
                if let Some(at) = allowed {
                    tokio::time::sleep_until(at).await;
                }
                futures_util::StreamExt::next(&mut ws).await
            } => m,
            _ = tokio::time::sleep_until(next_ping) => {
                next_ping += Duration::from_millis(250);
                // Only once events flow: they are the load under test.
                if events > 0 {
                    futures_util::SinkExt::send(&mut ws, Message::text(r#"{"type":"ping"}"#)).await.unwrap();
                    pings_sent.push(Instant::now());
                }
                continue;
            }
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                match f["type"].as_str() {
                    Some("event") => {
                        events += 1;
                        event_times.push(Instant::now());
                        reading_since.get_or_insert_with(tokio::time::Instant::now);
                    }
                    Some("pong") => {
                        let sent = pings_sent.get(pong_delays.len()).expect("a pong for a ping sent");
                        pong_delays.push(sent.elapsed());
                    }
                    Some("welcome") => {}
                    _ => panic!("unexpected frame {f}"),
                }
            }
            Some(Ok(Message::Ping(_))) => node_pings.push(Instant::now()),
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => {
                eprintln!("the socket ended without a close frame: {other:?}");
                break None;
            }
        }
    };
    let closed = SystemTime::now();
    let closed_at = Instant::now();
    stop.store(true, Ordering::Release);
    publisher.await.unwrap();
    let late = closed.duration_since(close_at).unwrap_or_default();
    let early = close_at.duration_since(closed).unwrap_or_default();
    let streamed = |from: Instant| event_times.iter().filter(|t| **t >= from).count();
    let first_event = *event_times.first().expect("events flowed");
    let queued = node.metric("agentcast_events_received_total", "").await as u64 - events;
    eprintln!(
        "closed {late:?} late ({early:?} early), {events} events read, {queued} not read, {} in the last second; \
         {} node pings; {} client pings, {} pongs, slowest {:?}",
        streamed(closed_at - Duration::from_secs(1)),
        node_pings.len(),
        pings_sent.len(),
        pong_delays.len(),
        pong_delays.iter().max(),
    );
    assert_eq!(close.as_ref().map(|c| u16::from(c.code)), Some(4001), "{close:?}");
    // Same clock on both ends: not before exp plus leeway, and within a second of it.
    assert!(early <= Duration::from_millis(100) && late <= Duration::from_secs(1), "{late:?} late, {early:?} early");
    // The stream was running up to the close, and the node was ahead of the client.
    assert!(streamed(closed_at - Duration::from_secs(1)) >= 200, "events kept flowing up to the close");
    assert!(queued > 0, "the node had events queued for the client");
    // The node's pings came during the stream (one per 300 ms; at least half).
    let streaming = closed_at - first_event;
    let expected = (streaming.as_millis() / ping_interval.as_millis()) as usize;
    let during = node_pings.iter().filter(|t| **t > first_event).count();
    assert!(during >= expected / 2 && during >= 3, "{during} node pings in {streaming:?} of stream");
    // Every client ping sent more than a second before the close was
    // answered, within a second.
    let answerable = pings_sent.iter().filter(|t| **t < closed_at - Duration::from_secs(1)).count();
    assert!(answerable >= 5 && pong_delays.len() >= answerable, "{} pongs for {answerable} pings", pong_delays.len());
    assert!(pong_delays.iter().all(|d| *d < Duration::from_secs(1)), "pongs {pong_delays:?}");
}

/// A token that expires while its socket waits for its `resume` frame
/// closes it with 4001 then, not with 1008 at the frame's 10 s timeout.
#[tokio::test]
async fn a_token_expiring_before_the_resume_frame_closes_with_4001() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--jwt-leeway", "0s"]).await;
    let tok = agentcast::auth::mint_hs256(SECRET.as_bytes(), "u1", Duration::from_secs(2)).unwrap();
    let close_at = UNIX_EPOCH + Duration::from_secs(token_exp(&tok));
    let mut c = Client::connect(&format!("{}&resume=frame", node.ws_url(&tok))).await;
    let (frames, close) = c.until_close().await;
    let late = SystemTime::now().duration_since(close_at);
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(close.as_ref().map(|c| u16::from(c.code)), Some(4001), "{close:?}");
    assert!(late.as_ref().is_ok_and(|l| *l <= Duration::from_secs(1)), "{late:?} after exp");
}

/// The `exp` claim of a token.
fn token_exp(token: &str) -> u64 {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["exp"].as_u64().expect("exp")
}

/// A client socket shaped like one across a real network rather than
/// loopback: a 16 KiB receive buffer and a 1460-byte segment size (its SYN
/// tells the node, whose send buffer then stays at tens of KiB instead of
/// growing to megabytes for loopback's 64 KiB segments). So what the
/// kernels hold between the node and the client is a small part of a
/// second of a stream, and what the node has not written stays queued in it.
fn small_window_socket() -> tokio::net::TcpSocket {
    use std::os::fd::AsRawFd;
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(16 * 1024).unwrap();
    let mss: libc::c_int = 1460;
    // SAFETY: sets one option on a socket this function owns.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mss as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    tcp
}

/// Memory of a process in KiB from /proc: `VmRSS` (now) or `VmHWM` (peak).
fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in {status}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap()
}

/// An event of exactly `size` bytes (the default `--max-event-bytes`).
fn sized_event(n: usize, size: usize) -> bytes::Bytes {
    let head = format!(r#"{{"type":"flood","n":{n},"pad":""#);
    let pad = size - head.len() - 2;
    bytes::Bytes::from(format!("{head}{}\"}}", "x".repeat(pad)))
}

const STALLED_USERS: usize = 2;
/// Per stalled user: 30 MiB, more than everything the node may hold for it
/// (its socket budget, its write buffer and the kernel's buffers): before
/// byte bounds, a socket that never read held all of them.
const FLOOD_EVENTS: usize = 120;
const SOCKET_QUEUE_BYTES: u64 = 1 << 20;
const SUBSCRIPTION_BYTES: u64 = 4 << 20;

/// Sockets that never read while their users receive maximum-size events:
/// the node holds at most what its byte bounds allow (its peak RSS stays
/// under the sum the flags give, docs/operations.md), closes each with 4000,
/// and the resume that follows gets every event; meanwhile a reading socket
/// of another user gets all of its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_of_the_largest_events_are_closed_within_their_byte_bounds() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    const SIZE: usize = 256 * 1024;
    let nats = NatsServer::start();
    let node = Node::start(
        &nats,
        &[
            "--socket-queue-bytes",
            &SOCKET_QUEUE_BYTES.to_string(),
            "--nats-subscription-bytes",
            &SUBSCRIPTION_BYTES.to_string(),
        ],
    )
    .await;
    let js = async_nats::jetstream::new(nats.client().await);

    let mut stalled = Vec::new();
    for u in 0..STALLED_USERS {
        let user = format!("stalled{u}");
        let tcp = small_window_socket().connect(node.addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(node.ws_url(&token(&user)), tcp).await.expect("upgrade");
        let welcome = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(t.as_str()).unwrap(),
                Some(Ok(_)) => {}
                other => panic!("no welcome: {other:?}"),
            }
        };
        assert_eq!(welcome["type"], "welcome");
        stalled.push((user, ws, welcome["epoch"].as_str().unwrap().to_owned()));
    }
    let (mut fast, _) = Client::join(&node, "fast").await;
    // Counted once everything is connected: the bound is on what events add.
    let base = vm_kib(node.pid(), "VmRSS");

    // The flood, and a trickle to the reading socket alongside it.
    let trickle = tokio::spawn({
        let js = js.clone();
        async move {
            let mut seqs = Vec::new();
            for i in 0..100 {
                seqs.push(publish(&js, "fast", format!(r#"{{"type":"t","i":{i}}}"#)).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seqs
        }
    });
    let started = Instant::now();
    let flood = tokio::spawn({
        let js = js.clone();
        let users: Vec<String> = stalled.iter().map(|(user, _, _)| user.clone()).collect();
        async move {
            let mut published: Vec<Vec<u64>> = vec![Vec::new(); users.len()];
            for n in 0..FLOOD_EVENTS {
                let acks = futures_util::future::join_all(
                    users.iter().map(|user| js.publish(format!("agentcast.events.{user}"), sized_event(n, SIZE))),
                )
                .await;
                for (u, ack) in acks.into_iter().enumerate() {
                    published[u].push(ack.expect("publish").await.expect("a maximum-size event is stored").sequence);
                }
            }
            published
        }
    });
    // The node closes a socket as slow when its queue goes over its bytes:
    // the client, back to reading within the close handshake's 2 s, is
    // told so. (One that never reads again cannot be told anything.)
    let deadline = Instant::now() + RECV_TIMEOUT * 3;
    while node.metric("agentcast_slow_sockets_total", r#"bound="bytes""#).await < STALLED_USERS as f64 {
        assert!(Instant::now() < deadline, "the stalled sockets were not closed as slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kicked_after = started.elapsed();
    let drained: Vec<_> = stalled
        .into_iter()
        .map(|(user, mut ws, epoch)| {
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                let close = loop {
                    match tokio::time::timeout(RECV_TIMEOUT, ws.next()).await.expect("the stalled socket ends") {
                        Some(Ok(Message::Text(t))) => {
                            let f: Value = serde_json::from_str(t.as_str()).unwrap();
                            assert_eq!(f["type"], "event", "{f}");
                            seqs.push(f["seq"].as_u64().unwrap());
                        }
                        Some(Ok(Message::Close(c))) => break c,
                        Some(Ok(_)) => {}
                        other => panic!("{user}: the socket ended without a close frame: {other:?}"),
                    }
                };
                (user, epoch, seqs, close)
            })
        })
        .collect();
    let drained = futures_util::future::join_all(drained).await;
    let published = flood.await.unwrap();
    let flood_took = started.elapsed();
    let fast_seqs = trickle.await.unwrap();
    let got: Vec<u64> = fast.events(fast_seqs.len()).await.into_iter().map(|(seq, _)| seq).collect();
    assert_eq!(got, fast_seqs, "the reading socket of another user got every event, in order");

    let peak = vm_kib(node.pid(), "VmHWM");
    // The bound the flags give for this node (docs/operations.md), counting
    // only what can hold events here: three sockets (the fast one too),
    // three users' subscriptions, a live read per user.
    let sockets = STALLED_USERS as u64 + 1;
    let users = sockets;
    let bound_kib = base
        + (sockets * (SOCKET_QUEUE_BYTES + agentcast::socket::MAX_WRITE_BUFFER as u64)
            + users * SUBSCRIPTION_BYTES
            + users * agentcast::hub::READ_BYTES as u64)
            / 1024;
    let flooded_mib = (STALLED_USERS * FLOOD_EVENTS * SIZE) >> 20;
    eprintln!(
        "flood of {flooded_mib} MiB in {flood_took:?}, sockets closed as slow after {kicked_after:?}: \
         node RSS {} MiB before, peak {} MiB, bound {} MiB",
        base / 1024,
        peak / 1024,
        bound_kib / 1024
    );
    assert!(peak < bound_kib, "peak RSS {peak} KiB over the bound {bound_kib} KiB");

    // Each stalled client got what the kernel held, then 4000; its resume
    // from the last event it got brings every other one, no gap.
    for (u, drained) in drained.into_iter().enumerate() {
        let (user, epoch, mut seqs, close) = drained.unwrap();
        assert_eq!(close.as_ref().map(|c| u16::from(c.code)), Some(4000), "{user}: {close:?}");
        assert!(seqs.len() < FLOOD_EVENTS, "{user} was closed before it had everything");
        let last = seqs.last().copied().unwrap_or(0);
        let url = format!("{}&last_seq={last}&epoch={epoch}", node.ws_url(&token(&user)));
        let (mut resumed, _) = Client::join_url(&url).await;
        let rest = published[u].len() - seqs.len();
        seqs.extend(resumed.events(rest).await.into_iter().map(|(seq, _)| seq));
        assert_eq!(seqs, published[u], "{user}: every event once, in order, across the close");
    }
}
