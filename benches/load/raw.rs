//! The ceiling: a WebSocket fan-out server with no broker, as small as a
//! correct one can be. Sockets connect to `/ws?user=U` and get a `welcome`;
//! the publisher connects to `/publish` and sends text frames `U\n<event>`;
//! each event goes to every socket of U as the frame agentcast would send,
//! `{"type":"event","seq":N,"event":<event>}`, with a per-user `seq`.
//!
//! It uses the same per-socket buffer sizes and queue bound as an agentcast
//! node, so memory and throughput compare like with like.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Per-socket queue of the raw fan-out, in frames (agentcast's default
/// before its queues were bounded in bytes): a socket that falls this far
/// behind is closed, so it never slows the others.
const QUEUE: usize = 1024;

#[derive(Default)]
struct User {
    seq: u64,
    sockets: Vec<(u64, mpsc::Sender<Utf8Bytes>)>,
}

type Users = Arc<Mutex<HashMap<String, User>>>;

pub async fn run() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("raw server binds");
    println!("listening on {}", listener.local_addr().unwrap());
    let users: Users = Arc::default();
    let mut next_id = 0u64;
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        next_id += 1;
        tokio::spawn(serve(tcp, users.clone(), next_id));
    }
}

async fn serve(tcp: tokio::net::TcpStream, users: Users, id: u64) {
    let mut path = String::new();
    let config = WebSocketConfig::default()
        .read_buffer_size(agentcast::socket::READ_BUFFER)
        .write_buffer_size(agentcast::socket::WRITE_BUFFER)
        .max_write_buffer_size(agentcast::socket::MAX_WRITE_BUFFER);
    // The callback's error type is tungstenite's, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let cb = |req: &Request, resp: Response| {
        path = req.uri().to_string();
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(tcp, cb, Some(config)).await else { return };
    if path == "/publish" {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let Some((user, event)) = t.as_str().split_once('\n') else { continue };
            let mut map = users.lock().unwrap();
            let Some(u) = map.get_mut(user) else { continue };
            u.seq += 1;
            let frame: Utf8Bytes = format!(r#"{{"type":"event","seq":{},"event":{event}}}"#, u.seq).into();
            // A full queue drops the socket, as agentcast closes a slow one.
            u.sockets.retain(|(_, tx)| tx.try_send(frame.clone()).is_ok());
        }
        return;
    }
    let Some(user) = path.split_once("user=").map(|(_, u)| u.to_owned()) else { return };
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(QUEUE);
    users.lock().unwrap().entry(user.clone()).or_default().sockets.push((id, tx));
    if ws.send(Message::text(r#"{"type":"welcome"}"#)).await.is_ok() {
        loop {
            tokio::select! {
                frame = rx.recv() => {
                    let Some(frame) = frame else { break };
                    if ws.feed(Message::Text(frame)).await.is_err() {
                        break;
                    }
                    // Write what is queued in one flush, as a node batches.
                    for _ in 1..agentcast::socket::MAX_WRITE_BATCH {
                        let Ok(more) = rx.try_recv() else { break };
                        if ws.feed(Message::Text(more)).await.is_err() {
                            break;
                        }
                    }
                    if ws.flush().await.is_err() {
                        break;
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    _ => {}
                },
            }
        }
    }
    let mut map = users.lock().unwrap();
    if let Some(u) = map.get_mut(&user) {
        u.sockets.retain(|(i, _)| *i != id);
    }
}
