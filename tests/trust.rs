//! What a publisher (or anyone who can reach a live subject) can make a node
//! send: only the sequences the stream itself stamped, never one a publisher
//! wrote into its own headers, and no position a browser cannot hold.

mod common;

use std::time::Duration;

use agentcast::metrics as m;

/// Spelled out so this file also builds against the code before the metric existed.
const RESERVED_HEADERS: &str = "agentcast_events_reserved_headers_total";
use async_nats::HeaderMap;
use common::*;
use futures_util::StreamExt;
use serde_json::Value;

const FORGED_SEQ: &str = "18446744073709551615";
const FORGED_LAST: &str = "18446744073709551614";

/// A JetStream publish to the user's event subject with extra headers.
async fn publish_with(js: &async_nats::jetstream::Context, user: &str, headers: &[(&str, &str)], body: &str) -> u64 {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    js.publish_with_headers(format!("agentcast.events.{user}"), h, body.to_owned().into())
        .await
        .expect("publish")
        .await
        .expect("ack")
        .sequence
}

/// The header layout the node relies on: nats-server keeps a publisher's
/// `Nats-*` headers and appends its own, so the stream's value is the last.
#[tokio::test]
async fn republish_appends_the_streams_headers_after_a_publishers() {
    let nats = NatsServer::start();
    let _node = Node::start(&nats, &[]).await;
    let nc = nats.client().await;
    let js = async_nats::jetstream::new(nc.clone());
    let mut live = nc.subscribe("agentcast.live.victim").await.unwrap();
    nc.flush().await.unwrap();
    let forged = [
        ("Nats-Sequence", FORGED_SEQ),
        ("Nats-Last-Sequence", FORGED_LAST),
        ("Nats-Stream", "EVIL"),
        ("Nats-Subject", "agentcast.events.other"),
    ];
    let seq = publish_with(&js, "victim", &forged, r#"{"type":"x"}"#).await;
    let msg = tokio::time::timeout(RECV_TIMEOUT, live.next()).await.unwrap().unwrap();
    let h = msg.headers.unwrap();
    let all = |name: &str| h.get_all(name).map(|v| v.as_str().to_owned()).collect::<Vec<_>>();
    assert_eq!(all("Nats-Sequence"), [FORGED_SEQ.to_owned(), seq.to_string()]);
    assert_eq!(all("Nats-Last-Sequence"), [FORGED_LAST, "0"]);
    assert_eq!(all("Nats-Stream"), ["EVIL", "AGENTCAST"]);
    assert_eq!(all("Nats-Subject"), ["agentcast.events.other", "agentcast.events.victim"]);
}

#[tokio::test]
async fn forged_sequence_headers_are_ignored_and_counted() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let (mut a, _) = Client::join(&node, "victim").await;
    let forged = [("Nats-Sequence", FORGED_SEQ), ("Nats-Last-Sequence", FORGED_LAST), ("Nats-Stream", "EVIL")];
    let s1 = publish_with(&js, "victim", &forged, r#"{"type":"forged"}"#).await;
    let s2 = publish(&js, "victim", r#"{"type":"next"}"#).await;
    let got = a.events(2).await;
    assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [s1, s2]);
    assert_eq!(got[0].1["type"], "forged");
    // Nothing else follows: no gap up to the forged number, no event with it
    // (the node's repair gives up after three reads 200 ms apart).
    a.quiet_for(Duration::from_secs(2)).await;
    // A later socket of the user starts from the true position.
    let (_b, w) = Client::join(&node, "victim").await;
    assert_eq!(w["position"], s2);
    assert_eq!(node.metric(RESERVED_HEADERS, "").await, 1.0);
    let logged = node.log_text().matches("publisher set headers the stream stamps").count();
    assert_eq!(logged, 1, "{}", node.log_text());
    // Once per subject: a second forgery is counted, not logged again.
    let s3 = publish_with(&js, "victim", &forged, r#"{"type":"again"}"#).await;
    assert_eq!(a.events(1).await[0].0, s3);
    assert_eq!(node.metric(RESERVED_HEADERS, "").await, 2.0);
    assert_eq!(node.log_text().matches("publisher set headers the stream stamps").count(), 1);
}

/// A forged `Nats-Last-Sequence` alone used to announce an `unavailable`
/// gap up to it and black the user out.
#[tokio::test]
async fn a_forged_last_sequence_makes_no_gap() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let (mut a, _) = Client::join(&node, "victim").await;
    let s1 = publish_with(&js, "victim", &[("Nats-Last-Sequence", FORGED_LAST)], r#"{"type":"a"}"#).await;
    let s2 = publish(&js, "victim", r#"{"type":"b"}"#).await;
    let f1 = a.next_json().await;
    assert_eq!((f1["type"].as_str(), f1["seq"].as_u64()), (Some("event"), Some(s1)), "{f1}");
    let f2 = a.next_json().await;
    assert_eq!((f2["type"].as_str(), f2["seq"].as_u64()), (Some("event"), Some(s2)), "{f2}");
}

/// A low forged `Nats-Sequence` used to make the node take the event for
/// one already delivered and hold it back until the user's next event.
#[tokio::test]
async fn a_low_forged_sequence_does_not_hold_an_event_back() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let (mut a, _) = Client::join(&node, "victim").await;
    let s1 = publish(&js, "victim", r#"{"type":"a"}"#).await;
    assert_eq!(a.events(1).await[0].0, s1);
    let s2 = publish_with(&js, "victim", &[("Nats-Sequence", "1")], r#"{"type":"b"}"#).await;
    // No later event is published: the held-back event must come by itself.
    assert_eq!(a.events(1).await[0].0, s2);
}

/// History reads (a resume's direct gets) take the stream's sequence too.
#[tokio::test]
async fn a_resume_replays_a_forged_event_with_its_stream_seq() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let forged = [("Nats-Sequence", FORGED_SEQ), ("Nats-Last-Sequence", FORGED_LAST)];
    let s1 = publish_with(&js, "victim", &forged, r#"{"type":"a"}"#).await;
    let s2 = publish_with(&js, "victim", &forged, r#"{"type":"b"}"#).await;
    let stream = js.get_stream("AGENTCAST").await.unwrap();
    assert_eq!(stream.direct_get(s1).await.unwrap().sequence, s1);
    let next = stream.direct_get_next_for_subject("agentcast.events.victim", Some(s1 + 1)).await.unwrap();
    assert_eq!(next.sequence, s2);
    let url = format!("{}&last_seq=0", node.ws_url(&token("victim")));
    let (mut c, _) = Client::join_url(&url).await;
    let got = c.events(2).await;
    assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [s1, s2]);
}

/// A message published straight to a live subject (the shipped permissions
/// forbid it) with a full set of stamps that name another stream, or a
/// sequence past 2^53, is not delivered.
#[tokio::test]
async fn live_messages_not_from_this_stream_or_past_2_53_are_refused() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let nc = nats.client().await;
    let (mut a, _) = Client::join(&node, "victim").await;
    for (stream, seq) in [("OTHER", "5"), ("AGENTCAST", "9007199254740992")] {
        let mut h = HeaderMap::new();
        h.insert("Nats-Stream", stream);
        h.insert("Nats-Sequence", seq);
        h.insert("Nats-Last-Sequence", "0");
        nc.publish_with_headers("agentcast.live.victim", h, r#"{"type":"fake"}"#.into()).await.unwrap();
    }
    nc.flush().await.unwrap();
    a.quiet_for(Duration::from_millis(500)).await;
    assert_eq!(node.metric(m::EVENTS_REJECTED, "reason=\"no_sequence\"").await, 2.0);
}

/// Positions above 2^53-1 are refused with the documented JSON refusal (a
/// browser cannot hold them exactly); 2^53-1 itself is accepted.
#[tokio::test]
async fn a_last_seq_above_2_53_is_refused() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let base = node.ws_url(&token("u1"));
    for bad in ["18446744073709551615", "9007199254740992", "18446744073709552000", "-1", "1e3", ""] {
        let (status, body) = refused(&format!("{base}&last_seq={bad}"), &[]).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request", "{bad}: {body}");
        assert!(body["message"].as_str().unwrap().contains("2^53-1"), "{bad}: {body}");
    }
    let (mut c, _) = Client::join_url(&format!("{base}&last_seq=9007199254740991")).await;
    let gap = c.next_json().await;
    assert_eq!(gap["reason"], "stream_reset", "{gap}");
}

#[tokio::test]
async fn a_resume_frame_above_2_53_is_closed_with_the_reason() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let url = format!("{}&resume=frame", node.ws_url(&token("u1")));
    for bad in ["18446744073709552000", "9007199254740992", "18446744073709551615"] {
        let mut c = Client::connect(&url).await;
        c.send_text(&format!(r#"{{"type":"resume","last_seq":{bad},"epoch":"1"}}"#)).await;
        let (frames, close) = c.until_close().await;
        assert!(frames.is_empty(), "{frames:?}");
        let close = close.expect("a close frame");
        assert_eq!(u16::from(close.code), 1008);
        assert!(close.reason.contains("2^53-1"), "{bad}: {}", close.reason);
    }
    let mut c = Client::connect(&url).await;
    c.send_text(r#"{"type":"resume","last_seq":9007199254740991}"#).await;
    let w: Value = c.next_json().await;
    assert_eq!(w["type"], "welcome");
}
