//! The continuity rule ([`agentcast::resume::prove`]) on real streams: each
//! case builds a history with a real nats-server, removes messages the ways
//! JetStream and operators do, and checks the judgement of a read from a
//! position. A removal the rule cannot see past is a gap; nothing removed is
//! no gap.

mod common;

use agentcast::history::History;
use agentcast::resume::{Gap, GapReason, read};
use common::*;

async fn setup(nats: &NatsServer, max_per_user: i64) -> (async_nats::jetstream::Context, History) {
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(agentcast::stream::desired(&stream_settings(max_per_user), 0)).await.unwrap();
    let client = js.client();
    (js, History::new(&client, vec![client.clone()], "AGENTCAST", "agentcast.events".into()).unwrap())
}

fn expired(from: u64, to: u64, earliest: Option<u64>) -> Option<Gap> {
    Some(Gap { reason: GapReason::Expired, from: Some(from), to: Some(to), earliest })
}

async fn set_per_user_limit(js: &async_nats::jetstream::Context, limit: i64) {
    let mut stream = js.get_stream("AGENTCAST").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_messages_per_subject = limit;
    js.update_stream(config).await.unwrap();
}

/// Issue 14, scenario 1: a raised per-user limit must not turn a loss into
/// a complete read. Another user's event first (seq 1), then 30 of alice's
/// (2 to 31) under a limit of 20 (2 to 11 removed); the limit is raised to
/// 1000; a client that last saw 6 must be told 7 to 11 may be missing.
#[tokio::test]
async fn a_raised_per_user_limit_does_not_hide_what_it_removed() {
    let nats = NatsServer::start();
    let (js, history) = setup(&nats, 20).await;
    assert_eq!(publish(&js, "bob", "{}").await, 1);
    let mut alice = Vec::new();
    for i in 0..30 {
        alice.push(publish(&js, "alice", format!(r#"{{"i":{i}}}"#)).await);
    }
    assert_eq!((alice[0], alice[29]), (2, 31));
    set_per_user_limit(&js, 1000).await;
    let r = read(&history, "alice", 6, None, 64).await.unwrap();
    assert_eq!(r.gap, expired(7, 11, Some(12)));
    assert_eq!(r.events.iter().map(|e| e.seq).collect::<Vec<_>>(), (12..=31).collect::<Vec<_>>());
    // Lowered again: removed up to 21 now.
    set_per_user_limit(&js, 10).await;
    let r = read(&history, "alice", 11, None, 64).await.unwrap();
    assert_eq!(r.gap, expired(12, 21, Some(22)));
}

/// The same loss on a stream without a per-user limit, where an operator
/// deleted alice's oldest events by hand.
#[tokio::test]
async fn oldest_events_deleted_by_hand_are_a_gap() {
    let nats = NatsServer::start();
    let (js, history) = setup(&nats, -1).await;
    publish(&js, "bob", "{}").await;
    let mut alice = Vec::new();
    for i in 0..10 {
        alice.push(publish(&js, "alice", format!(r#"{{"i":{i}}}"#)).await);
    }
    let stream = js.get_stream("AGENTCAST").await.unwrap();
    for seq in &alice[..5] {
        assert!(stream.delete_message(*seq).await.unwrap());
    }
    // The client saw alice[2]; alice[3] and alice[4] are gone too.
    let r = read(&history, "alice", alice[2], None, 64).await.unwrap();
    assert_eq!(r.gap, expired(alice[3], alice[4], Some(alice[5])));
    assert_eq!(r.events.iter().map(|e| e.seq).collect::<Vec<_>>(), alice[5..]);
    // A purge of alice's subject that keeps 2.
    stream.purge().filter("agentcast.events.alice").keep(2).await.unwrap();
    let r = read(&history, "alice", alice[5], None, 64).await.unwrap();
    assert_eq!(r.gap, expired(alice[6], alice[7], Some(alice[8])));
}

/// A horizon (a sequence of the stream, not the user's) with other users'
/// events after it: nothing was removed, so the read is whole, both on a
/// stream without interior deletes (one stream info settles it) and on one
/// whose other users' per-user limits removed messages elsewhere (the
/// stretch is read and found whole).
#[tokio::test]
async fn a_horizon_with_nothing_removed_is_whole() {
    let nats = NatsServer::start();
    let (js, history) = setup(&nats, 3).await;
    let horizon = publish(&js, "bob", "{}").await;
    for _ in 0..5 {
        publish(&js, "carol", "{}").await;
    }
    let alice = publish(&js, "alice", "{}").await;
    // carol's 5 under a limit of 3: 2 removed, inside the stretch.
    let r = read(&history, "alice", horizon, None, 64).await.unwrap();
    assert_eq!(r.gap, expired(horizon + 1, alice - 1, Some(alice)), "a removed message in the stretch is a gap");
    // Past the stretch, removals elsewhere do not matter.
    let horizon = alice;
    for _ in 0..3 {
        publish(&js, "dave", "{}").await;
    }
    let alice2 = publish(&js, "alice", "{}").await;
    for _ in 0..5 {
        publish(&js, "erin", "{}").await;
    }
    let r = read(&history, "alice", horizon, None, 64).await.unwrap();
    assert_eq!(r.gap, None, "the stretch before alice's next event is whole");
    assert_eq!(r.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![alice2]);
}

/// A user that holds nothing: whole when nothing after the position was
/// removed, a gap through the stream's end when something was.
#[tokio::test]
async fn a_user_with_nothing_stored() {
    let nats = NatsServer::start();
    let (js, history) = setup(&nats, -1).await;
    let horizon = publish(&js, "bob", "{}").await;
    publish(&js, "bob", "{}").await;
    let r = read(&history, "alice", horizon, None, 64).await.unwrap();
    assert_eq!((r.gap, r.events.len()), (None, 0));
    let a = publish(&js, "alice", "{}").await;
    let last = publish(&js, "bob", "{}").await;
    let stream = js.get_stream("AGENTCAST").await.unwrap();
    stream.purge().filter("agentcast.events.alice").await.unwrap();
    let r = read(&history, "alice", horizon, None, 64).await.unwrap();
    assert_eq!(r.gap, expired(a, last, None));
}
