//! The node's partition of a user (agentcast::partition) against the one a
//! real nats-server's subject mapping `{{partition(N,1)}}` picks, on the
//! server under test (2.9.10 and the current release in CI).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use agentcast::partition;
use common::*;
use futures_util::StreamExt;

/// Partitions in the mapping: not a power of two, so a remainder taken
/// from the wrong bits would show.
const PARTITIONS: u32 = 7;

#[tokio::test]
async fn the_node_computes_the_partition_nats_server_maps_each_user_to() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mapping.conf");
    std::fs::write(
        &conf,
        format!("mappings = {{ \"pt.*\": \"pt.{{{{partition({PARTITIONS},1)}}}}.{{{{wildcard(1)}}}}\" }}\n"),
    )
    .unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let client = nats.client().await;
    let mut sub = client.subscribe("pt.*.*").await.unwrap();
    nats.wait_subscribed("pt.*.*").await;

    // Ids of every allowed kind: short, with each extra character, and
    // longer than the 64 bytes nats-server hashes from a stack buffer.
    let mut users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    users.extend(["a", "Z9", "auth0|64b2f", "user:42", "a-b_c", "x@y_z", "dG9r=", "p+q~r"].map(String::from));
    users.push("u".repeat(65));
    users.push("x".repeat(agentcast::user::MAX_USER_ID_LEN));
    for u in &users {
        client.publish(format!("pt.{u}"), "x".into()).await.unwrap();
    }
    client.flush().await.unwrap();

    let mut mapped = BTreeMap::new();
    while mapped.len() < users.len() {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("every mapped message within 10 s")
            .expect("subscription open");
        let mut tokens = msg.subject.split('.').skip(1);
        let (p, user) = (tokens.next().unwrap().parse::<u32>().unwrap(), tokens.next().unwrap().to_owned());
        mapped.insert(user, p);
    }
    let mut per_partition = [0; PARTITIONS as usize];
    for u in &users {
        let id = agentcast::user::UserId::parse(u).expect("an allowed id");
        assert_eq!(Some(&partition::of(&id, PARTITIONS)), mapped.get(u), "user {u}");
        per_partition[mapped[u] as usize] += 1;
    }
    assert!(per_partition.iter().all(|n| *n > 0), "every partition used: {per_partition:?}");
}
