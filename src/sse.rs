//! Server-Sent Events: the socket protocol over a plain HTTP response, for
//! networks whose proxies drop WebSocket upgrades.
//!
//! `GET /sse` is admitted exactly as `/ws` is ([`crate::server`]: the same
//! token, origin check, refusals and capacity), and is then served by the
//! same loop as a socket ([`crate::socket::run`]) through [`Transport`],
//! which turns each frame into one SSE event:
//!
//! ```text
//! event: event
//! id: 1795630756808123901:42
//! data: {"type":"event","seq":42,"event":{...}}
//! ```
//!
//! Every `event` frame and every `gap` carries an `id` of `<epoch>:<seq>`
//! (the epoch from the socket's `welcome`), the position a client that
//! received it has reached; the browser's `EventSource` sends the last one
//! back as `Last-Event-ID` when it reconnects, and the node resumes from it
//! exactly as from `last_seq` and `epoch` ([`last_event_id`]). Pings become
//! comment lines (keepalive), and a close becomes a `close` event with the
//! WebSocket close code and reason, after which the response ends. The
//! client sends nothing on this transport: control requests go to
//! `POST /control`, and liveness is the response taking the node's writes
//! (a reader that stops taking them is closed as slow, as a socket is).

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::ws::{CloseFrame, Message};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::socket::WRITE_BUFFER;

/// Chunks of the response body waiting for hyper to write them. Each chunk
/// is what the socket loop wrote between two flushes, cut at
/// [`WRITE_BUFFER`] bytes where a batch is larger (one frame may pass it):
/// with tungstenite's own write buffer on `/ws`, this is what a slow reader
/// holds beyond its queue's byte budget, at most this many chunks of
/// [`WRITE_BUFFER`] plus one frame each. When full, the loop's write waits,
/// and after [`crate::socket::WRITE_TIMEOUT`] the reader is closed as slow.
pub const BODY_CHUNKS: usize = 4;

/// Why a write to the response failed: the client went away (hyper dropped
/// the body).
#[derive(Debug, thiserror::Error)]
#[error("the SSE response was closed")]
pub struct Closed;

/// The response side of an SSE connection, as the socket loop sees its
/// transport: a sink of WebSocket messages, and a stream of client messages
/// that yields none (it ends once the response is closed).
pub struct Transport {
    body: PollSender<Bytes>,
    buf: BytesMut,
    /// The stream's epoch, from the `welcome` frame: the first half of `id`.
    epoch: Option<String>,
    closed: bool,
}

impl Transport {
    /// The transport, and the body to give hyper.
    pub fn new() -> (Self, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(BODY_CHUNKS);
        (Self { body: PollSender::new(tx), buf: BytesMut::new(), epoch: None, closed: false }, rx)
    }

    fn push(&mut self, msg: Message) {
        match msg {
            Message::Text(text) => {
                let head = Head::of(text.as_str());
                if let Some(epoch) = head.epoch.filter(|_| head.kind == "welcome") {
                    self.epoch = Some(epoch);
                }
                let id = match (head.kind.as_str(), &self.epoch) {
                    ("event", Some(epoch)) => head.seq.map(|s| format!("{epoch}:{s}")),
                    // A gap's end is where its reader stands; a stream
                    // reset's gap has none: its reader starts the new
                    // epoch from 0.
                    ("gap", Some(epoch)) => Some(format!("{epoch}:{}", head.to.unwrap_or(0))),
                    _ => None,
                };
                write_event(&mut self.buf, &head.kind, id.as_deref(), text.as_str());
            }
            // Keepalive: a comment line, which EventSource ignores.
            Message::Ping(_) => self.buf.put_slice(b": ping\n\n"),
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map_or((1000, String::new()), |CloseFrame { code, reason }| (code, reason.as_str().to_owned()));
                let reason = serde_json::Value::from(reason);
                let data = format!(r#"{{"type":"close","code":{code},"reason":{reason}}}"#);
                write_event(&mut self.buf, "close", None, &data);
                self.closed = true;
            }
            Message::Pong(_) | Message::Binary(_) => {}
        }
    }

    /// Hands the buffered bytes to the body once there is room.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Closed>> {
        if self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match self.body.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                let chunk = self.buf.split().freeze();
                self.body.send_item(chunk).map_err(|_| Closed)?;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(Closed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Sink<Message> for Transport {
    type Error = Closed;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Closed>> {
        let this = self.get_mut();
        if this.buf.len() >= WRITE_BUFFER { this.poll_send(cx) } else { Poll::Ready(Ok(())) }
    }

    fn start_send(self: Pin<&mut Self>, msg: Message) -> Result<(), Closed> {
        let this = self.get_mut();
        if this.closed || this.body.is_closed() {
            return Err(Closed);
        }
        this.push(msg);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Closed>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_send(cx))?;
        if this.closed {
            // The close event is out: end the response.
            this.body.close();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Closed>> {
        let this = self.get_mut();
        let sent = this.poll_send(cx);
        this.body.close();
        sent
    }
}

impl Stream for Transport {
    type Item = Result<Message, Closed>;

    /// The client sends nothing here; the stream ends when the response
    /// does, so a close handshake does not wait for a reply.
    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.closed || self.body.is_closed() { Poll::Ready(None) } else { Poll::Pending }
    }
}

/// What [`Transport`] reads of a frame: its type, and where it leaves its
/// reader. Frames are the node's own JSON (an event frame's `event` object
/// is skipped over, not kept).
#[derive(serde::Deserialize, Default)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    seq: Option<u64>,
    to: Option<u64>,
    epoch: Option<String>,
}

impl Head {
    /// An event frame's head is read from its prefix, without a pass over
    /// its event (the most frames, and the largest); any other frame is
    /// parsed.
    fn of(frame: &str) -> Self {
        if let Some(rest) = frame.strip_prefix(crate::protocol::EVENT_HEAD) {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if let Ok(seq) = rest[..digits].parse() {
                return Head { kind: "event".to_owned(), seq: Some(seq), to: None, epoch: None };
            }
        }
        serde_json::from_str(frame).unwrap_or_default()
    }
}

/// One SSE event. The data's line breaks (possible only as whitespace in a
/// publisher's payload, which is forwarded as it was published) start new
/// `data:` lines, which the client joins with `\n`: the JSON stays the
/// same, a `\r` among its whitespace arrives as `\n`.
fn write_event(buf: &mut BytesMut, kind: &str, id: Option<&str>, data: &str) {
    buf.reserve(data.len() + kind.len() + 32);
    buf.put_slice(b"event: ");
    buf.put_slice(kind.as_bytes());
    buf.put_slice(b"\n");
    if let Some(id) = id {
        buf.put_slice(b"id: ");
        buf.put_slice(id.as_bytes());
        buf.put_slice(b"\n");
    }
    for line in data.split(['\n', '\r']).filter(|l| !l.is_empty()) {
        buf.put_slice(b"data: ");
        buf.put_slice(line.as_bytes());
        buf.put_slice(b"\n");
    }
    buf.put_slice(b"\n");
}

/// Where a `Last-Event-ID` of `<epoch>:<seq>` (as this module writes them)
/// resumes: `last_seq` and `epoch`. `None` when it is not one.
pub fn last_event_id(id: &str) -> Option<(u64, String)> {
    let (epoch, seq) = id.trim().rsplit_once(':')?;
    if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return None;
    }
    Some((crate::protocol::parse_position(seq)?, epoch.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};

    /// The prefix read gives what a full parse gives, for the frames the
    /// node writes; other frames are parsed.
    #[test]
    fn heads_read_from_the_prefix_match_a_parse() {
        let merged =
            r#"{"type":"event","seq":42,"first_seq":40,"merged":3,"event":{"type":"message_delta","delta":"abc"}}"#;
        for frame in [
            crate::protocol::event_frame(7, br#"{"type":"agent_started","data":{"seq":1}}"#).unwrap().to_string(),
            merged.to_owned(),
            r#"{"type":"gap","reason":"expired","from":3,"to":9,"earliest":10}"#.to_owned(),
            r#"{"type":"welcome","node":"n","user":"u","position":5,"epoch":"E1"}"#.to_owned(),
        ] {
            let fast = Head::of(&frame);
            let parsed: Head = serde_json::from_str(&frame).unwrap();
            assert_eq!(
                (fast.kind, fast.seq, fast.to, fast.epoch),
                (parsed.kind, parsed.seq, parsed.to, parsed.epoch),
                "{frame}"
            );
        }
    }

    async fn body(rx: &mut mpsc::Receiver<Bytes>) -> String {
        let mut out = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            out.extend_from_slice(&chunk);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn frames_become_events_with_resumable_ids() {
        let (mut t, mut rx) = Transport::new();
        let welcome = r#"{"type":"welcome","node":"n","user":"u","position":7,"epoch":"123"}"#;
        // Fed, then flushed once, as the socket loop writes a batch: one chunk.
        t.feed(Message::Text(welcome.into())).await.unwrap();
        t.feed(Message::Text(r#"{"type":"event","seq":9,"event":{"type":"t","seq":1}}"#.into())).await.unwrap();
        t.feed(Message::Text(r#"{"type":"gap","reason":"expired","from":10,"to":12}"#.into())).await.unwrap();
        t.feed(Message::Text(r#"{"type":"gap","reason":"stream_reset"}"#.into())).await.unwrap();
        t.feed(Message::Ping(Default::default())).await.unwrap();
        t.flush().await.unwrap();
        assert_eq!(rx.len(), 1);
        assert_eq!(
            body(&mut rx).await,
            format!(
                "event: welcome\ndata: {welcome}\n\n\
                 event: event\nid: 123:9\ndata: {{\"type\":\"event\",\"seq\":9,\"event\":{{\"type\":\"t\",\"seq\":1}}}}\n\n\
                 event: gap\nid: 123:12\ndata: {{\"type\":\"gap\",\"reason\":\"expired\",\"from\":10,\"to\":12}}\n\n\
                 event: gap\nid: 123:0\ndata: {{\"type\":\"gap\",\"reason\":\"stream_reset\"}}\n\n\
                 : ping\n\n"
            )
        );
    }

    #[tokio::test]
    async fn line_breaks_in_a_payload_become_data_lines_and_close_ends_the_body() {
        let (mut t, mut rx) = Transport::new();
        t.send(Message::Text("{\"type\":\"event\",\"seq\":1,\"event\":{\r\n\"a\": 1\n}}".into())).await.unwrap();
        let close = CloseFrame { code: 4000, reason: "slow: reconnect and resume".into() };
        t.send(Message::Close(Some(close))).await.unwrap();
        assert!(t.next().await.is_none(), "the client side ends with the response");
        assert!(t.send(Message::Text("{}".into())).await.is_err());
        assert_eq!(
            body(&mut rx).await,
            "event: event\ndata: {\"type\":\"event\",\"seq\":1,\"event\":{\ndata: \"a\": 1\ndata: }}\n\n\
             event: close\ndata: {\"type\":\"close\",\"code\":4000,\"reason\":\"slow: reconnect and resume\"}\n\n"
        );
        assert!(rx.recv().await.is_none(), "the body ended");
    }

    #[tokio::test]
    async fn a_reader_that_takes_nothing_stops_the_writer() {
        let (mut t, _rx) = Transport::new();
        let frame = format!(r#"{{"type":"event","seq":1,"event":{{"x":"{}"}}}}"#, "x".repeat(WRITE_BUFFER));
        let writes = async {
            for _ in 0..BODY_CHUNKS + 1 {
                t.send(Message::Text(frame.clone().into())).await.unwrap();
            }
        };
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(200), writes).await.is_err();
        assert!(blocked, "the body holds {BODY_CHUNKS} chunks; the next write waits");
    }

    #[test]
    fn last_event_ids_are_epoch_and_seq() {
        assert_eq!(last_event_id("1795630756808123901:42"), Some((42, "1795630756808123901".into())));
        assert_eq!(last_event_id(" 1:0 "), Some((0, "1".into())));
        for bad in ["", "42", ":42", "1:", "1:x", "1:-1", "a b:1", "1:99999999999999999999"] {
            assert_eq!(last_event_id(bad), None, "{bad:?}");
        }
    }
}
