//! Delivery, isolation and per-user interest, with real nats-server and nodes.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn every_socket_of_a_user_on_any_node_gets_every_event_in_order() {
    let nats = NatsServer::start();
    let a = Node::start(&nats, &[]).await;
    let b = Node::start(&nats, &[]).await;
    let (mut a1, w) = Client::join(&a, "u1").await;
    assert_eq!(w["position"], 0, "no events yet: {w}");
    assert_eq!(w["user"], "u1");
    let (mut a2, _) = Client::join(&a, "u1").await;
    let (mut b1, _) = Client::join(&b, "u1").await;
    let js = async_nats::jetstream::new(nats.client().await);
    let mut sent = Vec::new();
    for i in 0..200 {
        // Whitespace and key order are kept byte for byte.
        let payload = format!(r#"{{ "type":"agent_thinking","i":{i}, "data":{{"x":1.50}} }}"#);
        let seq = publish(&js, "u1", payload.clone()).await;
        sent.push((seq, payload));
    }
    for c in [&mut a1, &mut a2, &mut b1] {
        let mut got = Vec::new();
        for _ in 0..sent.len() {
            let msg = tokio::time::timeout(RECV_TIMEOUT, futures_util::StreamExt::next(&mut c.ws))
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got.push(msg.into_text().unwrap().to_string());
        }
        let want: Vec<String> =
            sent.iter().map(|(seq, p)| format!(r#"{{"type":"event","seq":{seq},"event":{p}}}"#)).collect();
        assert_eq!(got, want);
    }
}

#[tokio::test]
async fn welcome_reports_the_users_position_and_live_starts_after_it() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    publish(&js, "u1", r#"{"n":1}"#).await;
    let last = publish(&js, "u1", r#"{"n":2}"#).await;
    publish(&js, "u2", r#"{"n":3}"#).await;
    let (mut c, w) = Client::join(&node, "u1").await;
    assert_eq!(w["position"], last, "{w}");
    assert!(w["node"].as_str().is_some_and(|n| !n.is_empty()), "{w}");
    // A user with nothing stored starts at a recent stream sequence (the
    // horizon): no event of the user exists up to it.
    let (_, w2) = Client::join(&node, "nobody").await;
    assert!(w2["position"].as_u64().unwrap() <= last + 1, "{w2}");
    // Stored events are not replayed to a fresh connection; new ones arrive.
    let next = publish(&js, "u1", r#"{"n":4}"#).await;
    let ev = c.events(1).await;
    assert_eq!(ev, vec![(next, json!({"n":4}))]);
}

#[tokio::test]
async fn no_event_ever_crosses_users() {
    let nats = NatsServer::start();
    let a = Node::start(&nats, &[]).await;
    let b = Node::start(&nats, &[]).await;
    const USERS: usize = 20;
    const PER_USER: usize = 50;
    let mut clients = Vec::new();
    for u in 0..USERS {
        for node in [&a, &b] {
            let (c, _) = Client::join(node, &format!("user-{u}")).await;
            clients.push((u, c));
        }
    }
    // Every user publishes concurrently from its own task.
    let client = nats.client().await;
    let mut tasks = Vec::new();
    for u in 0..USERS {
        let js = async_nats::jetstream::new(client.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_USER {
                publish(&js, &format!("user-{u}"), format!(r#"{{"user":"user-{u}","i":{i}}}"#)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for (u, c) in &mut clients {
        let events = c.events(PER_USER).await;
        let mut last = 0;
        for (i, (seq, ev)) in events.iter().enumerate() {
            assert_eq!(ev["user"], format!("user-{u}"), "socket of user-{u} got {ev}");
            assert_eq!(ev["i"], i, "order for user-{u}");
            assert!(*seq > last);
            last = *seq;
        }
        c.quiet_for(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn subscribes_on_first_socket_and_unsubscribes_on_last() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    assert_eq!(nats.live_subscriptions().await, Vec::<String>::new());
    let (c1, _) = Client::join(&node, "u1").await;
    let (c2, _) = Client::join(&node, "u1").await;
    let (c3, _) = Client::join(&node, "u2").await;
    // One subscription per user, not per socket.
    assert_eq!(nats.live_subscriptions().await, vec!["agentcast.live.u1", "agentcast.live.u2"]);
    assert_eq!(node.metric("agentcast_users_subscribed", "").await, 2.0);
    assert_eq!(node.metric("agentcast_sockets_open", "").await, 3.0);
    drop(c1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(nats.live_subscriptions().await, vec!["agentcast.live.u1", "agentcast.live.u2"]);
    drop(c2);
    eventually("u1 unsubscribed", || async { nats.live_subscriptions().await == vec!["agentcast.live.u2"] }).await;
    drop(c3);
    eventually("all unsubscribed", || async { nats.live_subscriptions().await.is_empty() }).await;
    eventually("gauges at zero", || async {
        node.metric("agentcast_users_subscribed", "").await == 0.0
            && node.metric("agentcast_sockets_open", "").await == 0.0
    })
    .await;
    // A user coming back subscribes again.
    let (_c4, _) = Client::join(&node, "u1").await;
    assert_eq!(nats.live_subscriptions().await, vec!["agentcast.live.u1"]);
}

#[tokio::test]
async fn payloads_that_are_not_json_objects_are_counted_logged_once_and_skipped() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    let js = async_nats::jetstream::new(nats.client().await);
    publish(&js, "u1", "hello").await;
    publish(&js, "u1", "[1,2]").await;
    publish(&js, "u1", "not json either").await;
    let good = publish(&js, "u1", r#"{"type":"agent_started"}"#).await;
    assert_eq!(c.events(1).await, vec![(good, json!({"type":"agent_started"}))]);
    assert_eq!(node.metric("agentcast_events_rejected_total", r#"reason="not_json""#).await, 2.0);
    assert_eq!(node.metric("agentcast_events_rejected_total", r#"reason="not_object""#).await, 1.0);
    let warnings = node.log_text().lines().filter(|l| l.contains("not forwarded")).count();
    assert_eq!(warnings, 1, "logged once per subject:\n{}", node.log_text());
    // Other users are unaffected.
    let (mut other, _) = Client::join(&node, "u2").await;
    let s = publish(&js, "u2", r#"{"ok":true}"#).await;
    assert_eq!(other.events(1).await, vec![(s, json!({"ok":true}))]);
}

#[tokio::test]
async fn core_nats_publishes_are_stored_and_delivered_too() {
    // Publishers that use plain NATS publish (fire and forget) still land in
    // the stream, which captures the subject, and reach sockets with a seq.
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    let client = nats.client().await;
    for i in 0..10 {
        client.publish("agentcast.events.u1", format!(r#"{{"i":{i}}}"#).into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let got = c.events(10).await;
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<u64>>());
    let is: Vec<i64> = got.iter().map(|(_, e)| e["i"].as_i64().unwrap()).collect();
    assert_eq!(is, (0..10).collect::<Vec<i64>>());
}

#[tokio::test]
async fn a_retried_publish_with_the_same_msg_id_is_stored_and_delivered_once() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    let js = async_nats::jetstream::new(nats.client().await);
    let mut acks = Vec::new();
    for _ in 0..3 {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", "run-7-step-1");
        let ack = js
            .publish_with_headers("agentcast.events.u1", h, r#"{"type":"agent_started"}"#.into())
            .await
            .unwrap()
            .await
            .unwrap();
        acks.push((ack.sequence, ack.duplicate));
    }
    assert_eq!(acks, vec![(acks[0].0, false), (acks[0].0, true), (acks[0].0, true)]);
    let next = publish(&js, "u1", r#"{"type":"agent_completed"}"#).await;
    let got = c.events(2).await;
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![acks[0].0, next], "delivered once");
}
