//! Issue 14: tests that try to break continuity. Whatever the stream's
//! limits do and whatever an operator removes (always a user's oldest
//! events, or the stream's oldest), a resuming client gets every event of
//! its user exactly once, in order, or a `gap` frame that covers what it did
//! not get. Never silence. The oracle is tests/common/oracle.rs.

mod common;

use std::time::Duration;

use agentcast::config::StreamSettings;
use common::oracle::{Published, Session};
use common::*;

const BOUND: Duration = Duration::from_secs(15);

fn base(node: &Node) -> String {
    format!("ws://{}", node.addr)
}

async fn stream_info(js: &async_nats::jetstream::Context) -> async_nats::jetstream::stream::Info {
    js.get_stream("AGENTCAST").await.expect("stream").info().await.expect("info").clone()
}

/// Alice's socket receives her first five events (2..6) and goes away at 6;
/// the caller then publishes 25 more (7..31).
async fn alice_sees_up_to_6(node: &Node, js: &async_nats::jetstream::Context, p: &mut Published) -> String {
    assert_eq!(p.publish(js, "other").await, 1, "another user's event is stored first");
    let mut s = Session::open(&base(node), "alice", None, None).await.expect("alice joins");
    let seen = p.publish_n(js, "alice", 5).await;
    assert_eq!(seen, vec![2, 3, 4, 5, 6]);
    assert!(s.read_until(6, BOUND).await, "alice's socket received 2..6: {:?}", s.frames);
    s.check(p, 6).expect("live delivery before the test's point");
    s.close().await;
    s.epoch().expect("epoch")
}

/// Resumes alice from 6 and checks what arrives against the oracle: 7..11
/// are gone and must be covered by a gap, 12..31 must arrive once each.
async fn resume_alice_from_6(node: &Node, epoch: &str, p: &Published) {
    let mut s = Session::open(&base(node), "alice", Some(6), Some(epoch)).await.expect("resume");
    let reached = s.read_until(31, BOUND).await;
    // Anything more (a duplicate, say) would come right after.
    s.drain_for(Duration::from_millis(300)).await;
    let kinds: Vec<String> = s.frames[1..]
        .iter()
        .map(|f| match f["type"].as_str() {
            Some("event") => f["seq"].to_string(),
            _ => f.to_string(),
        })
        .collect();
    eprintln!("after the welcome ({}): {}", s.frames[0], kinds.join(" "));
    if let Err(diagnosis) = s.check(p, 31) {
        panic!("silent loss on resume:\n  {diagnosis}");
    }
    assert!(reached, "the resume reached 31 within {BOUND:?}");
    let got: Vec<u64> = s.frames.iter().filter(|f| f["type"] == "event").filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!(got, (12..=31).collect::<Vec<_>>(), "every stored event after the gap, once, in order");
}

/// Issue 14, scenario 1: `--stream-max-per-user 20` removes alice's 2..11;
/// while her client (last saw 6) is away the limit is raised to 1000 the
/// documented way (the node restarted with the new flag updates the
/// stream). Her resume from 6 must be told that 7..11 may be missing.
#[tokio::test]
async fn a_raised_per_user_limit_does_not_turn_a_loss_into_complete() {
    let nats = NatsServer::start();
    let mut first = Node::start(&nats, &["--stream-max-per-user", "20"]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let mut p = Published::default();
    let epoch = alice_sees_up_to_6(&first, &js, &mut p).await;
    let rest = p.publish_n(&js, "alice", 25).await;
    assert_eq!((rest[0], rest[24]), (7, 31));
    let state = stream_info(&js).await.state;
    assert_eq!((state.first_sequence, state.messages), (1, 21), "the limit removed 2..11");
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5));
    let node = Node::start(&nats, &["--stream-max-per-user", "1000"]).await;
    assert_eq!(stream_info(&js).await.config.max_messages_per_subject, 1000, "the new node raised the limit");
    resume_alice_from_6(&node, &epoch, &p).await;
}

/// The same with a stream the operator manages, without a per-subject
/// limit, where alice's oldest events (2..11) were deleted by hand.
#[tokio::test]
async fn oldest_events_deleted_by_hand_are_announced_as_a_gap() {
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(nats.client().await);
    let settings = StreamSettings { external: true, ..stream_settings(-1) };
    js.create_stream(agentcast::stream::desired(&settings)).await.expect("create the stream");
    let node = Node::start(&nats, &["--stream-external"]).await;
    let mut p = Published::default();
    let epoch = alice_sees_up_to_6(&node, &js, &mut p).await;
    p.publish_n(&js, "alice", 25).await;
    let stream = js.get_stream("AGENTCAST").await.unwrap();
    for seq in 2..=11 {
        assert!(stream.delete_message(seq).await.expect("delete"), "deleted {seq}");
    }
    let state = stream_info(&js).await.state;
    assert_eq!((state.first_sequence, state.messages), (1, 21), "alice's 2..11 deleted by hand");
    resume_alice_from_6(&node, &epoch, &p).await;
}
