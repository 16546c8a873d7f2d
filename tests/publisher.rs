//! The Rust `Publisher` against a real nats-server and node: order, acks
//! and their sequences, exactly-once by message id, and its errors.

mod common;

use std::time::Duration;

use agentcast::publisher::{Coalesce, Event, MAX_IN_FLIGHT, PublishError, Publisher};
use common::*;
use serde_json::{Value, json};

/// Messages the stream holds for a user, from the server's own count.
async fn stored_for(nats: &NatsServer, user: &str) -> u64 {
    let js = async_nats::jetstream::new(nats.client().await);
    let stream = js.get_stream("AGENTCAST").await.unwrap();
    let subject = format!("agentcast.events.{user}");
    let mut info = stream.info_with_subjects(subject.as_str()).await.unwrap();
    let mut n = 0;
    use futures_util::TryStreamExt;
    while let Some((s, c)) = info.try_next().await.unwrap() {
        if s == subject {
            n = c as u64;
        }
    }
    n
}

/// A publisher that reconnects quickly and gives up on an ack after 800 ms,
/// so a NATS restart of about a second fails at least one attempt.
async fn restartable_publisher(nats: &NatsServer) -> Publisher {
    let nc = async_nats::ConnectOptions::new()
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(&nats.url)
        .await
        .unwrap();
    Publisher::new(nc).ack_timeout(Duration::from_millis(800))
}

#[tokio::test]
async fn a_pipelined_batch_is_stored_and_delivered_in_order() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut client, welcome) = Client::join(&node, "u1").await;
    assert_eq!(welcome["position"], 0);
    let publisher = Publisher::new(nats.client().await);
    // More than the in-flight window, so the window fills and drains.
    let n = MAX_IN_FLIGHT + 44;
    let events: Vec<Event> = (0..n)
        .map(|i| match i % 3 {
            0 => Event::agent_thinking("r1", &format!("step {i}")),
            1 => Event::tool_executing("r1", "calc", json!({"i": i})).agent("a1").thread("t1"),
            _ => Event::custom("acme.progress", "r1", json!({"i": i})).unwrap(),
        })
        .collect();
    let results = publisher.publish_batch("u1", &events).await;
    let seqs: Vec<u64> = results.iter().map(|r| r.as_ref().unwrap().seq).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
    assert!(results.iter().all(|r| !r.as_ref().unwrap().duplicate));
    for (r, e) in results.iter().zip(&events) {
        assert_eq!(r.as_ref().unwrap().msg_id, e.msg_id);
    }
    let got = client.events(n).await;
    for ((seq, ev), (want_seq, want)) in got.iter().zip(seqs.iter().zip(&events)) {
        assert_eq!(seq, want_seq);
        let want: Value = serde_json::from_slice(&want.to_bytes()).unwrap();
        assert_eq!(ev, &want);
    }
    assert_eq!(got[1].1["thread_id"], "t1");
    assert_eq!(got[2].1["type"], "acme.progress");
}

#[tokio::test]
async fn the_same_message_id_is_stored_once() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut client, _) = Client::join(&node, "u1").await;
    let publisher = Publisher::new(nats.client().await);
    let event = Event::agent_completed("r1", "done").id("r1-final");
    let first = publisher.publish("u1", &event).await.unwrap();
    let again = publisher.publish("u1", &event).await.unwrap();
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!((again.seq, again.duplicate), (1, true));
    // The same id inside a batch is also stored once.
    let batch = publisher.publish_batch("u1", &[event.clone(), Event::agent_thinking("r2", "next")]).await;
    assert_eq!(batch[0].as_ref().unwrap().seq, 1);
    assert!(batch[0].as_ref().unwrap().duplicate);
    assert_eq!(batch[1].as_ref().unwrap().seq, 2);
    assert_eq!(stored_for(&nats, "u1").await, 2);
    let got = client.events(2).await;
    assert_eq!((got[0].0, got[0].1["type"].as_str()), (1, Some("agent_completed")));
    assert_eq!((got[1].0, got[1].1["type"].as_str()), (2, Some("agent_thinking")));
    client.quiet_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_publish_retried_across_a_nats_restart_is_stored_once() {
    let mut nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let publisher = restartable_publisher(&nats).await;
    assert_eq!(publisher.publish("u1", &Event::agent_started("r1", "go")).await.unwrap().seq, 1);
    nats.stop();
    let event = Event::agent_thinking("r1", "during the outage");
    let task = {
        let publisher = publisher.clone();
        let event = event.clone();
        tokio::spawn(async move { publisher.publish("u1", &event).await })
    };
    // Longer than one ack timeout: at least one attempt fails and is retried.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    nats.restart();
    let published = task.await.unwrap().expect("stored once NATS is back");
    assert_eq!(published.seq, 2);
    assert_eq!(published.msg_id, event.msg_id);
    // However many attempts reached the stream, it holds the event once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored_for(&nats, "u1").await, 2);
    drop(node);
}

#[tokio::test]
async fn errors_say_what_is_wrong() {
    let nats = NatsServer::start();
    let publisher = Publisher::new(nats.client().await).max_event_bytes(1024);
    // No node has created the stream yet.
    let e = publisher.publish("u1", &Event::agent_thinking("r", "x")).await.unwrap_err();
    assert!(matches!(&e, PublishError::StreamUnavailable { subject } if subject == "agentcast.events.u1"), "{e}");
    let e = publisher.publish("a.b", &Event::agent_thinking("r", "x")).await.unwrap_err();
    assert!(matches!(e, PublishError::UserId(_)), "{e}");
    let big = Event::agent_thinking("r", &"x".repeat(2000));
    let e = publisher.publish("u1", &big).await.unwrap_err();
    assert!(matches!(e, PublishError::TooLarge { max: 1024, .. }), "{e}");
    assert!(matches!(Event::custom("progress", "r", json!({})), Err(PublishError::EventType(_))));

    // The stream's own limit is smaller than the publisher's: the stream refuses, once.
    let _node = Node::start(&nats, &["--max-event-bytes", "512"]).await;
    let e = publisher.publish("u1", &Event::agent_thinking("r", &"y".repeat(700))).await.unwrap_err();
    assert!(matches!(&e, PublishError::Rejected(m) if m.contains("maximum")), "{e}");

    // In a batch, each event gets its own result, in order, and nothing is
    // sent after a failed event: the stream holds no event beyond the hole.
    let results =
        publisher.publish_batch("u1", &[Event::agent_thinking("r", "a"), big, Event::agent_thinking("r", "b")]).await;
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].as_ref().unwrap().seq, 1);
    assert!(matches!(results[1], Err(PublishError::TooLarge { .. })));
    assert!(matches!(results[2], Err(PublishError::NotSent)));
    assert_eq!(stored_for(&nats, "u1").await, 1);
}

/// The message id is the only header a publish carries. An id with a line
/// break would start another header line (a forged `Nats-Sequence`); before
/// this check async-nats panicked on it inside `publish`.
#[tokio::test]
async fn a_message_id_that_is_not_one_header_value_is_refused() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut client, _) = Client::join(&node, "u1").await;
    let publisher = Publisher::new(nats.client().await);
    let long = "x".repeat(257);
    for id in ["r1\r\nNats-Sequence: 18446744073709551615", "r1\nx", "", "r 1", long.as_str()] {
        let event = Event::agent_thinking("r1", "x").id(id);
        // Spelled by its message so this test also builds against the code before the variant.
        let e = publisher.publish("u1", &event).await.unwrap_err();
        assert!(e.to_string().starts_with("message id"), "{id:?}: {e}");
        let batch = publisher.publish_batch("u1", &[event]).await;
        assert!(batch[0].as_ref().unwrap_err().to_string().starts_with("message id"), "{id:?}");
    }
    assert_eq!(stored_for(&nats, "u1").await, 0);
    let ok = publisher.publish("u1", &Event::agent_thinking("r1", "x").id(&"y".repeat(256))).await.unwrap();
    assert_eq!(client.events(1).await[0].0, ok.seq);
}

/// The stored payloads of the given sequences, read from the stream itself.
async fn stored_events(nats: &NatsServer, seqs: &[u64]) -> Vec<Value> {
    let js = async_nats::jetstream::new(nats.client().await);
    let stream = js.get_stream("AGENTCAST").await.unwrap();
    let mut out = Vec::new();
    for &seq in seqs {
        let msg = stream.get_raw_message(seq).await.unwrap();
        out.push(serde_json::from_slice(&msg.payload).unwrap());
    }
    out
}

/// Checks the deltas the stream holds at `seqs` and returns their texts.
async fn stored_deltas(nats: &NatsServer, seqs: &[u64], message_id: &str) -> Vec<String> {
    let events = stored_events(nats, seqs).await;
    events
        .iter()
        .map(|e| {
            assert_eq!(e["message_id"], message_id, "{e}");
            assert_eq!(e["type"], "message_delta", "{e}");
            assert_eq!(e["run_id"], "r1", "{e}");
            e["delta"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_text_stream_coalesces_tokens_into_deltas_that_concatenate_to_the_text() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut client, _) = Client::join(&node, "u1").await;
    let publisher = Publisher::new(nats.client().await);
    let template = Event::new("message_delta", json!({})).unwrap().run("r1");
    let stream = publisher.text_stream("u1", &template, "m1", Coalesce::default()).unwrap();
    let tokens: Vec<String> = (0..200).map(|i| format!("t{i} ")).collect();
    // 200 tokens in about 1 s (5 ms apart): with a 50 ms delay about 20 deltas.
    for t in &tokens {
        stream.push(t.as_str()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked = stream.finish().await.unwrap();
    let seqs: Vec<u64> = acked.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "one delta after another, in order");
    assert!(acked.iter().all(|p| !p.duplicate));
    assert!((8..=60).contains(&seqs.len()), "{} deltas for 200 tokens in ~1 s", seqs.len());
    let deltas = stored_deltas(&nats, &seqs, "m1").await;
    assert_eq!(deltas.concat(), tokens.concat());
    assert!(deltas.iter().all(|d| !d.is_empty()));
    assert_eq!(stored_for(&nats, "u1").await, seqs.len() as u64);
    // The socket's frames: each appends its delta, whether or not the node merged them.
    let mut text = String::new();
    while text.len() < tokens.concat().len() {
        let f = client.next_json().await;
        assert_eq!(f["type"], "event", "{f}");
        text.push_str(f["event"]["delta"].as_str().unwrap());
    }
    assert_eq!(text, tokens.concat());
}

#[tokio::test]
async fn a_text_stream_publishes_on_time_on_size_and_on_finish() {
    let nats = NatsServer::start();
    let _node = Node::start(&nats, &[]).await;
    let publisher = Publisher::new(nats.client().await);
    let template = Event::new("message_delta", json!({})).unwrap().run("r1");

    // Time: one token waits for the delay, not for more tokens or the finish.
    let delay = Duration::from_millis(200);
    let stream = publisher.text_stream("u1", &template, "m-time", Coalesce { delay, max_bytes: 1 << 20 }).unwrap();
    stream.push("a").await.unwrap();
    stream.push("b").await.unwrap();
    tokio::time::sleep(delay / 2).await;
    assert_eq!(stored_for(&nats, "u1").await, 0, "published before the delay");
    tokio::time::sleep(delay * 2).await;
    assert_eq!(stored_for(&nats, "u1").await, 1, "not published after the delay");
    stream.push("c").await.unwrap();
    let acked = stream.finish().await.unwrap();
    let seqs: Vec<u64> = acked.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(stored_deltas(&nats, &seqs, "m-time").await, ["ab", "c"]);

    // Size: with a delay far away, every 10 bytes buffered are a delta; the
    // finish publishes the rest.
    let coalesce = Coalesce { delay: Duration::from_secs(3600), max_bytes: 10 };
    let stream = publisher.text_stream("u1", &template, "m-size", coalesce).unwrap();
    for i in 0..25 {
        stream.push(((b'a' + i as u8) as char).to_string()).await.unwrap();
    }
    let acked = stream.finish().await.unwrap();
    let seqs: Vec<u64> = acked.iter().map(|p| p.seq).collect();
    assert_eq!(stored_deltas(&nats, &seqs, "m-size").await, ["abcdefghij", "klmnopqrst", "uvwxy"]);

    // Nothing pushed (or only empty tokens): nothing published.
    let stream = publisher.text_stream("u1", &template, "m-empty", Coalesce::default()).unwrap();
    stream.push("").await.unwrap();
    assert!(stream.finish().await.unwrap().is_empty());
    assert_eq!(stored_for(&nats, "u1").await, 5);
}

#[tokio::test]
async fn a_text_stream_checks_its_message_id_user_and_type() {
    let nats = NatsServer::start();
    let publisher = Publisher::new(nats.client().await);
    let template = Event::new("message_delta", json!({})).unwrap();
    let err = |user: &str, t: &Event, id: &str| publisher.text_stream(user, t, id, Coalesce::default()).err().unwrap();
    let e = err("u1", &template, "");
    assert!(matches!(e, PublishError::Delta(_)) && e.to_string().contains("1 to 128 characters"), "{e}");
    assert!(matches!(err("u1", &template, &"m".repeat(129)), PublishError::Delta(_)));
    assert!(matches!(err("a.b", &template, "m1"), PublishError::UserId(_)));
    let bad_type = Event { kind: "nope".into(), ..template.clone() };
    assert!(matches!(err("u1", &bad_type, "m1"), PublishError::EventType(_)));
    // No node: the first delta fails for good, later pushes are refused,
    // and the finish says why.
    let stream =
        publisher.text_stream("u1", &template, "m1", Coalesce { delay: Duration::ZERO, max_bytes: 1 }).unwrap();
    stream.push("a").await.unwrap();
    let mut refused = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if matches!(stream.push("b").await, Err(PublishError::NotSent)) {
            refused = true;
            break;
        }
    }
    assert!(refused, "pushes after a failed delta are refused");
    assert!(matches!(stream.finish().await, Err(PublishError::StreamUnavailable { .. })));
}

/// NATS goes away in the middle of a message: the delta in flight is
/// retried under its id, tokens pushed meanwhile wait, and the stream ends
/// with the exact text, each delta stored once and in order.
#[tokio::test]
async fn a_text_stream_retried_across_a_nats_restart_neither_duplicates_nor_reorders() {
    let mut nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let publisher = restartable_publisher(&nats).await;
    let template = Event::new("message_delta", json!({})).unwrap().run("r1");
    let coalesce = Coalesce { delay: Duration::from_millis(20), max_bytes: 8 };
    let stream = publisher.text_stream("u1", &template, "m1", coalesce).unwrap();
    let tokens: Vec<String> = (0..300).map(|i| format!("{i},")).collect();
    let mut stopped = false;
    for (i, t) in tokens.iter().enumerate() {
        if i == 100 {
            nats.stop();
            stopped = true;
        }
        if stopped && i == 150 {
            // Longer than one ack timeout: at least one attempt fails and is retried.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            nats.restart();
            stopped = false;
        }
        stream.push(t.as_str()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let acked = stream.finish().await.expect("stored once NATS is back");
    let seqs: Vec<u64> = acked.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "in order, none twice: {seqs:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored_for(&nats, "u1").await, seqs.len() as u64, "a retried delta was stored twice");
    assert_eq!(stored_deltas(&nats, &seqs, "m1").await.concat(), tokens.concat());
    drop(node);
}
