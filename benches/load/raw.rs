//! The ceiling: a WebSocket fan-out server with no broker, as small as a
//! correct one can be. Sockets connect to `/ws?user=U` and get a `welcome`;
//! the publisher connects to `/publish` and sends text frames `U\n<event>`;
//! each event goes to every socket of U as the frame agentcast would send,
//! `{"type":"event","seq":N,"event":<event>}`, with a per-user `seq`.
//!
//! It uses the same per-socket buffer sizes and queue bound as an agentcast
//! node, so memory and throughput compare like with like.
//!
//! With `--nats <url>` (the `raw-js` target) its input is the stream's
//! republish instead: one async-nats subscription to `agentcast.live.>`,
//! each message fanned out to the sockets of the user its subject names.
//! That is the same fan-out behind the same JetStream hop as an agentcast
//! node, with no per-user subscriptions, checks, history or auth: what a
//! bare fan-out fed by the stream gets on the same machine.

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

pub async fn run(nats: Option<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("raw server binds");
    let users: Users = Arc::default();
    if let Some(url) = nats {
        let client = async_nats::connect(url).await.expect("raw-js connects to nats-server");
        let mut sub = client.subscribe("agentcast.live.>").await.expect("raw-js subscribes");
        // A round trip, so the subscription is in place before "listening".
        client.flush().await.expect("raw-js flush");
        let users = users.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(user) = msg.subject.as_str().rsplit('.').next() else { continue };
                let Ok(event) = std::str::from_utf8(&msg.payload) else { continue };
                fan_out(&users, user, event);
            }
        });
    }
    println!("listening on {}", listener.local_addr().unwrap());
    let mut next_id = 0u64;
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        next_id += 1;
        tokio::spawn(serve(tcp, users.clone(), next_id));
    }
}

/// One event to every socket of `user`, framed as agentcast frames it.
fn fan_out(users: &Users, user: &str, event: &str) {
    let mut map = users.lock().unwrap();
    let Some(u) = map.get_mut(user) else { return };
    u.seq += 1;
    let frame: Utf8Bytes = format!(r#"{{"type":"event","seq":{},"event":{event}}}"#, u.seq).into();
    // A full queue drops the socket, as agentcast closes a slow one.
    u.sockets.retain(|(_, tx)| tx.try_send(frame.clone()).is_ok());
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
            fan_out(&users, user, event);
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
