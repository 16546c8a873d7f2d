//! Streamed text (docs/protocol.md, "Streamed text"): delta events merged
//! for sockets that are behind and in replays, and the slow-close rule in
//! bytes. Real nats-server, real node, real WebSocket clients.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// One published event, as the checks below need it.
#[derive(Debug, Clone)]
struct Published {
    kind: String,
    /// (message id, delta) of a delta event.
    delta: Option<(String, String)>,
}

/// Publishes `events` pipelined, as an agent streaming tokens does: acks
/// awaited in windows of [`ACK_WINDOW`] (async-nats bounds the acks in
/// flight, and waits for a slot past it). Returns each stored seq with its
/// event.
async fn publish_all(nats: &NatsServer, user: &str, events: Vec<Value>) -> BTreeMap<u64, Published> {
    const ACK_WINDOW: usize = 1000;
    publish_paced(nats, user, events, ACK_WINDOW, Duration::ZERO).await
}

/// As [`publish_all`], in windows of `window` events, each begun `pause`
/// after the previous one's acks.
async fn publish_paced(
    nats: &NatsServer,
    user: &str,
    events: Vec<Value>,
    window: usize,
    pause: Duration,
) -> BTreeMap<u64, Published> {
    let js = async_nats::jetstream::new(nats.client().await);
    let mut out = BTreeMap::new();
    for (i, window) in events.chunks(window).enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        let mut acks = Vec::with_capacity(window.len());
        for e in window {
            let ack = js.publish(format!("agentcast.events.{user}"), e.to_string().into()).await.expect("publish");
            acks.push(ack);
        }
        for (ack, e) in acks.into_iter().zip(window) {
            let seq = ack.await.expect("ack").sequence;
            let delta = match (e["message_id"].as_str(), e["delta"].as_str()) {
                (Some(id), Some(d)) => Some((id.to_owned(), d.to_owned())),
                _ => None,
            };
            out.insert(seq, Published { kind: e["type"].as_str().unwrap_or_default().to_owned(), delta });
        }
    }
    out
}

fn delta(kind: &str, id: &str, text: &str) -> Value {
    // Padded like a real envelope (run and agent ids, a timestamp): the
    // frame is mostly envelope, the text a few bytes.
    json!({"type": kind, "message_id": id, "delta": text, "run_id": "r".repeat(1500)})
}

/// Checks the event frames of one socket against what was published after
/// `after`, up to its last frame: every event is covered once, in order; a merged frame covers
/// consecutive delta events of one type and message id, its `delta` their
/// concatenation; an unmerged frame has no `first_seq`/`merged`. Returns
/// the merged frames' count and each message's text as assembled by a
/// client that ignores the new fields and appends `delta`.
fn check(frames: &[Value], published: &BTreeMap<u64, Published>, after: u64) -> (usize, BTreeMap<String, String>) {
    let through = frames.iter().filter_map(|f| f["seq"].as_u64()).max().unwrap_or(after).max(after);
    let mut expected = published.range(after + 1..through + 1).peekable();
    let mut merged = 0;
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    for f in frames.iter().filter(|f| f["type"] == "event") {
        let seq = f["seq"].as_u64().unwrap();
        let first = f["first_seq"].as_u64().unwrap_or(seq);
        let covered: Vec<(u64, &Published)> =
            std::iter::from_fn(|| expected.next_if(|(s, _)| **s <= seq)).map(|(s, p)| (*s, p)).collect();
        assert_eq!(covered.first().map(|c| c.0), Some(first), "frame {f} starts where the last ended");
        assert_eq!(covered.last().map(|c| c.0), Some(seq));
        if covered.len() == 1 {
            assert!(f.get("first_seq").is_none() && f.get("merged").is_none(), "{f}");
        } else {
            merged += 1;
            assert_eq!(f["merged"].as_u64(), Some(covered.len() as u64), "{f}");
            let (kind, id) = (&covered[0].1.kind, &covered[0].1.delta.as_ref().expect("a delta").0);
            for (s, p) in &covered {
                assert_eq!((&p.kind, p.delta.as_ref().map(|d| &d.0)), (kind, Some(id)), "seq {s} merged across");
            }
            let text: String = covered.iter().map(|(_, p)| p.delta.as_ref().unwrap().1.as_str()).collect();
            assert_eq!(f["event"]["delta"], text.as_str());
        }
        if let (Some(id), Some(d)) = (f["event"]["message_id"].as_str(), f["event"]["delta"].as_str()) {
            texts.entry(id.to_owned()).or_default().push_str(d);
        }
    }
    assert!(expected.next().is_none(), "every event was delivered");
    (merged, texts)
}

/// Each message's whole text, from what was published after `after`.
fn texts(published: &BTreeMap<u64, Published>, after: u64) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for p in published.range(after + 1..).map(|(_, p)| p) {
        if let Some((id, d)) = &p.delta {
            out.entry(id.clone()).or_default().push_str(d);
        }
    }
    out
}

/// A client whose socket has a small receive buffer (4 KiB, before the
/// kernel doubles it), as a phone on a slow link: the node's writes wait
/// for it as soon as it does not read.
async fn small_buffer_client(node: &Node, user: &str, query: &str) -> (Client, Value) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr).await.unwrap();
    let url = format!("{}{query}", node.ws_url(&token(user)));
    let (ws, _) = tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
        .expect("handshake");
    let mut c = Client { ws };
    let w = c.next_json().await;
    assert_eq!(w["type"], "welcome", "{w}");
    (c, w)
}

/// Reads event frames until one has `seq` `last`, at most `rate` bytes a
/// second (pausing after each frame), failing on a close.
async fn read_slowly(c: &mut Client, last: u64, rate: f64) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let msg = tokio::time::timeout(RECV_TIMEOUT, c.ws.next()).await.expect("a frame within the timeout");
        match msg {
            Some(Ok(Message::Text(t))) => {
                tokio::time::sleep(Duration::from_secs_f64(t.len() as f64 / rate)).await;
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                let done = f["seq"].as_u64() == Some(last);
                frames.push(f);
                if done {
                    return frames;
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("the slow reader was closed or failed: {other:?}"),
        }
    }
}

/// Deltas of two messages in blocks, with other events between some
/// blocks, and a second type of delta on one message id.
fn interleaved(n: usize) -> Vec<Value> {
    let mut events = vec![json!({"type": "agent_started", "run_id": "r1"})];
    for i in 0..n {
        let id = if (i / 37) % 3 == 2 { "m2" } else { "m1" };
        let kind = if (i / 101) % 4 == 3 { "agent_thinking" } else { "message_delta" };
        events.push(delta(kind, id, &format!("t{i} ")));
        if i % 97 == 0 {
            events.push(json!({"type": "tool_call", "n": i}));
        }
    }
    events.push(json!({"type": "run_finished", "run_id": "r1"}));
    events
}

// Multi-threaded so the two readers and the publisher do not take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_merged_text_and_is_never_closed_while_a_fast_one_gets_every_frame() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut fast, _) = Client::join(&node, "u1").await;
    let (mut slow, _) = small_buffer_client(&node, "u1", "").await;
    let started = std::time::Instant::now();
    // About 1.3 MB of frames unmerged, published while the slow reader reads
    // nothing (a phone in a tunnel): the kernel holds a few KiB for its
    // connection (the node's NOTSENT_LOWAT and the small receive buffer), so
    // the node holds the rest, while the fast reader takes every frame. At
    // 2,500 events a second, in windows of 50: as agents stream, and
    // far below what a reader that keeps up can take. (Unpaced, the
    // publisher's bursts of 1,000 outrun a reader sharing two cores with
    // the node and nats-server, and it rightly gets merged frames.)
    let paced = publish_paced(&nats, "u1", interleaved(8000), 50, Duration::from_millis(20));
    let (published, fast_frames) = tokio::join!(paced, async {
        let mut frames: Vec<Value> = Vec::new();
        // Until the publisher's last event, which ends the stream below.
        while frames.last().is_none_or(|f| f["event"]["type"] != "run_finished") {
            frames.push(fast.next_json().await);
        }
        frames
    });
    let last = *published.keys().last().unwrap();
    eprintln!("published {} events in {:?}", published.len(), started.elapsed());
    // Then it reads at 2 MB/s.
    let slow_frames = read_slowly(&mut slow, last, 2_000_000.0).await;

    let (fast_merged, fast_texts) = check(&fast_frames, &published, 0);
    assert_eq!(fast_merged, 0, "a socket that keeps up gets every event as its own frame");
    let (slow_merged, slow_texts) = check(&slow_frames, &published, 0);
    eprintln!("slow socket: {} frames, {slow_merged} merged, read by {:?}", slow_frames.len(), started.elapsed());
    assert!(slow_merged > 0, "the slow socket got merged frames");
    assert_eq!(fast_texts, texts(&published, 0));
    assert_eq!(slow_texts, texts(&published, 0), "the slow reader has the exact text");
    assert_eq!(node.metric("agentcast_slow_sockets_total", r#"bound="bytes""#).await, 0.0);
    assert_eq!(node.metric("agentcast_disconnects_total", r#"reason="slow""#).await, 0.0);
    assert!(node.metric("agentcast_merged_events_total", r#"path="live""#).await > 0.0);
    eprintln!(
        "{} events: fast socket {} frames, slow socket {} frames ({slow_merged} merged)",
        published.len(),
        fast_frames.len(),
        slow_frames.len()
    );
    // Still open and live.
    let more = publish_all(&nats, "u1", vec![delta("message_delta", "m1", "end")]).await;
    let seq = *more.keys().next().unwrap();
    assert_eq!(slow.next_json().await["seq"].as_u64(), Some(seq));
}

#[tokio::test]
async fn replays_merge_consecutive_deltas_and_nothing_else() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let published = publish_all(&nats, "u1", interleaved(1000)).await;
    let last = *published.keys().last().unwrap();
    // A resume from the start: the whole history is a replay.
    let url = format!("{}&last_seq=0", node.ws_url(&token("u1")));
    let (mut c, _) = Client::join_url(&url).await;
    let mut frames = Vec::new();
    while frames.last().is_none_or(|f: &Value| f["seq"].as_u64() != Some(last)) {
        frames.push(c.next_json().await);
    }
    let (merged, got) = check(&frames, &published, 0);
    assert!(merged > 0);
    assert_eq!(got, texts(&published, 0));
    // Maximal: one frame per block of one message and type between others.
    let runs = published
        .values()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| {
            w[0].delta.is_none()
                || w[0].kind != w[1].kind
                || w[0].delta.as_ref().map(|d| &d.0) != w[1].delta.as_ref().map(|d| &d.0)
        })
        .count()
        + 1;
    assert_eq!(frames.len(), runs, "one frame per run of one message's deltas");
    assert!(node.metric("agentcast_merged_events_total", r#"path="replay""#).await > 0.0);
}

#[tokio::test]
async fn a_resume_in_the_middle_of_a_message_gets_the_text_so_far_merged_then_live() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let mut events = vec![json!({"type": "agent_started", "run_id": "r1"})];
    // 300 deltas: five replay chunks, carried into one frame.
    events.extend((0..300).map(|i| delta("message_delta", "m1", &format!("w{i} "))));
    let published = publish_all(&nats, "u1", events).await;
    let started = *published.keys().next().unwrap();
    let middle = started + 120;

    // Joining a run in progress: last_seq = (agent_started's seq) - 1.
    let url = format!("{}&last_seq={}", node.ws_url(&token("u1")), started - 1);
    let (mut joiner, _) = Client::join_url(&url).await;
    let first = joiner.next_json().await;
    assert_eq!(first["event"]["type"], "agent_started", "{first}");
    let run = joiner.next_json().await;
    assert_eq!(run["first_seq"].as_u64(), Some(started + 1), "{run}");
    assert_eq!(run["merged"].as_u64(), Some(300));
    assert_eq!(run["event"]["delta"], texts(&published, 0)["m1"].as_str(), "the answer so far in one frame");

    // A reload in the middle of the message.
    let url = format!("{}&last_seq={middle}", node.ws_url(&token("u1")));
    let (mut reloaded, _) = Client::join_url(&url).await;
    let run = reloaded.next_json().await;
    assert_eq!(run["first_seq"].as_u64(), Some(middle + 1), "{run}");
    let mut frames = vec![run];
    // Then live, each event as it comes.
    let live = publish_all(&nats, "u1", vec![delta("message_delta", "m1", "live.")]).await;
    let mut all = published.clone();
    all.extend(live.clone());
    let live_seq = *live.keys().next().unwrap();
    while frames.last().is_none_or(|f: &Value| f["seq"].as_u64() != Some(live_seq)) {
        frames.push(reloaded.next_json().await);
    }
    let (merged, got) = check(&frames, &all, middle);
    assert!(merged >= 1);
    assert_eq!(got, texts(&all, middle), "the exact text from the resume point on");
    assert_eq!(frames.last().unwrap().get("merged"), None, "the live event is its own frame");
}

/// Once a socket has fallen behind during a message, the rest of that
/// message reaches it in frames held up to a second (BEHIND_ROLLUP), even
/// when it reads fast again; the next message comes frame by frame, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_fell_behind_gets_the_rest_of_that_message_once_a_second_then_the_next_frame_by_frame() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut slow, _) = small_buffer_client(&node, "u1", "").await;
    // About 320 KB of frames while it reads nothing: more than the kernel
    // holds for it, so deltas wait behind a pending write.
    let burst = (0..200).map(|i| delta("message_delta", "m1", &format!("a{i} "))).collect();
    let mut published = publish_all(&nats, "u1", burst).await;
    eventually("the socket fell behind", || async { node.metric("agentcast_sockets_behind_total", "").await == 1.0 })
        .await;
    let burst_last = *published.keys().last().unwrap();

    // It reads as fast as it can from now on, while m1 goes on at 20
    // deltas a second, then ends, and m2 follows at the same pace.
    let reader = async {
        let mut frames: Vec<(std::time::Instant, Value)> = Vec::new();
        while frames.last().is_none_or(|(_, f)| f["event"]["delta"].as_str().is_none_or(|d| !d.ends_with("b19 "))) {
            let f = slow.next_json().await;
            frames.push((std::time::Instant::now(), f));
        }
        frames
    };
    let writer = async {
        let started = std::time::Instant::now();
        let m1: Vec<Value> = (0..60).map(|i| delta("message_delta", "m1", &format!("p{i} "))).collect();
        let mut out = publish_paced(&nats, "u1", m1, 1, Duration::from_millis(50)).await;
        let m1_took = started.elapsed();
        let done = vec![json!({"type": "agent_completed", "run_id": "r1"})];
        out.extend(publish_all(&nats, "u1", done).await);
        let m2: Vec<Value> = (0..20).map(|i| delta("message_delta", "m2", &format!("b{i} "))).collect();
        out.extend(publish_paced(&nats, "u1", m2, 1, Duration::from_millis(50)).await);
        (out, m1_took)
    };
    let (frames, (more, m1_took)) = tokio::join!(reader, writer);
    published.extend(more);
    let frames: Vec<Value> = frames.into_iter().map(|(_, f)| f).collect();
    let (_, got) = check(&frames, &published, 0);
    assert_eq!(got, texts(&published, 0), "the exact text of both messages");

    let completed = published.iter().find(|(_, p)| p.kind == "agent_completed").map(|(s, _)| *s).unwrap();
    let in_range =
        |lo: u64, hi: u64| frames.iter().filter(move |f| f["seq"].as_u64().is_some_and(|s| s > lo && s < hi));
    // m1's 60 paced deltas: about one frame a second, not one per delta.
    let m1_frames = in_range(burst_last, completed).count();
    eprintln!("m1's 60 paced deltas over {m1_took:?} came in {m1_frames} frames");
    assert!(m1_frames as f64 <= m1_took.as_secs_f64() + 2.0, "{m1_frames} frames in {m1_took:?}");
    // m2: every delta its own frame.
    let m2: Vec<&Value> = in_range(completed, u64::MAX).collect();
    assert_eq!(m2.len(), 20, "m2 frame by frame: {m2:?}");
    assert!(m2.iter().all(|f| f.get("merged").is_none()));
    assert_eq!(node.metric("agentcast_sockets_behind_total", "").await, 1.0);
    assert_eq!(node.metric("agentcast_disconnects_total", r#"reason="slow""#).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_cannot_carry_the_text_is_closed_by_bytes_and_resumes_exactly() {
    let nats = NatsServer::start();
    // The smallest budget: 64 KiB of frames after merging.
    let node = Node::start(&nats, &["--socket-queue-bytes", "65536"]).await;
    let (mut stalled, welcome) = small_buffer_client(&node, "u1", "").await;
    // 6 MB of text, more than the kernel buffers (4 MiB at most, tcp_wmem)
    // and the budget, never read until the node gives up on the socket.
    let chunk = "x".repeat(10_000);
    let events: Vec<Value> = (0..600).map(|i| delta("message_delta", "m1", &format!("{i}:{chunk}"))).collect();
    let published = publish_all(&nats, "u1", events).await;
    let last = *published.keys().last().unwrap();
    eventually("the stalled socket asked to close as slow", || async {
        node.metric("agentcast_slow_sockets_total", r#"bound="bytes""#).await == 1.0
    })
    .await;
    let (frames, close) = stalled.until_close().await;
    // The close frame comes behind what the kernel holds, within 2 s, or
    // the connection drops without it (docs/protocol.md section 5).
    assert!(close.as_ref().is_none_or(|c| u16::from(c.code) == 4000), "closed as slow: {close:?}");
    eprintln!("close frame: {close:?}");
    eventually("the slow disconnect counted", || async {
        node.metric("agentcast_disconnects_total", r#"reason="slow""#).await == 1.0
    })
    .await;
    let got_to = frames.iter().filter_map(|f| f["seq"].as_u64()).max().unwrap_or(welcome["position"].as_u64().unwrap());
    assert!(got_to < last, "cut short");
    eprintln!("the stalled socket got {} frames, through seq {got_to} of {last}", frames.len());
    let (_, mut text) = check(&frames, &published, 0);

    // The resume from the last seq received is exact.
    let url = format!("{}&last_seq={got_to}&epoch={}", node.ws_url(&token("u1")), welcome["epoch"].as_str().unwrap());
    let (mut resumed, _) = Client::join_url(&url).await;
    let mut rest = Vec::new();
    while rest.last().is_none_or(|f: &Value| f["seq"].as_u64() != Some(last)) {
        rest.push(resumed.next_json().await);
    }
    let (merged, more) = check(&rest, &published, got_to);
    assert!(merged > 0, "the replay is merged");
    for (id, t) in more {
        text.entry(id).or_default().push_str(&t);
    }
    assert_eq!(text, texts(&published, 0), "what was received before and after the close is the text, exactly");
}

#[tokio::test]
async fn the_rust_client_assembles_merged_and_unmerged_frames_alike() {
    use agentcast::client::{Client as Resuming, Delivery, Messages};
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let published =
        publish_all(&nats, "u1", (0..100).map(|i| delta("message_delta", "m1", &format!("a{i} "))).collect()).await;
    let first = *published.keys().next().unwrap();
    let url = format!("ws://{}/ws", node.addr);
    // A second device joining the run from its start.
    let mut c = Resuming::new(vec![url], || token("u1")).resume_from(first - 1, None);
    let mut messages = Messages::default();
    let mut all = published.clone();
    let (mut merged_frames, mut live_frames) = (0, 0);
    let mut live_sent = false;
    loop {
        let d = tokio::time::timeout(RECV_TIMEOUT, c.next()).await.expect("a delivery").expect("no error");
        let Delivery::Event { seq, merged, event, .. } = d else { continue };
        let update = messages.apply(&event).expect("a delta event");
        assert_eq!(update.message_id, "m1");
        // The text so far is every delta up to this seq, merged or not.
        let expected: String = all.range(..=seq).filter_map(|(_, p)| p.delta.as_ref().map(|d| d.1.as_str())).collect();
        assert_eq!(update.text, expected);
        if merged > 1 {
            merged_frames += 1;
        } else {
            live_frames += 1;
        }
        if !live_sent && seq == *published.keys().last().unwrap() {
            // Then live tokens, one by one.
            for i in 0..3 {
                all.extend(publish_all(&nats, "u1", vec![delta("message_delta", "m1", &format!("live{i} "))]).await);
            }
            live_sent = true;
        }
        if live_sent && seq == *all.keys().last().unwrap() {
            break;
        }
    }
    assert_eq!(merged_frames, 1, "the run so far came in one frame");
    assert!(live_frames >= 3);
    assert_eq!(messages.text("m1"), Some(texts(&all, 0)["m1"].as_str()));
    assert_eq!(messages.apply(r#"{"type":"tool_call"}"#), None);
}
