//! Users partitioned over several streams (`--stream-partitions`): the
//! account's subject mapping spreads publishers' subjects, each partition's
//! stream stores its users, and a node reads each user from the stream the
//! mapping stores it in; a mapping that disagrees keeps the node not ready.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use agentcast::partition;
use common::*;

const PARTITIONS: u32 = 4;

/// A nats-server whose account maps the event subjects as `text` says.
fn server_mapping(text: &str) -> (NatsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mapping.conf");
    std::fs::write(&conf, text).unwrap();
    (NatsServer::start_with(&["-c", conf.to_str().unwrap()]), dir)
}

/// The account's mapping into `n` partitions, none for one.
fn mapping_into(n: u32) -> String {
    if n == 1 {
        return String::new();
    }
    format!("mappings = {{ {} }}\n", agentcast::partition::mapping("agentcast.events", n))
}

/// A mapping onto the node's four partitions' subjects that spreads users
/// by another count: three of the four streams get users, not the node's.
const DISAGREEING: &str =
    "mappings = { \"agentcast.events.*\": \"agentcast.events.4.{{partition(3,1)}}.{{wildcard(1)}}\" }\n";

fn stream_of(user: &str) -> String {
    format!("AGENTCAST-{}", partition::of_token(user, PARTITIONS))
}

#[tokio::test]
async fn users_spread_over_four_streams_get_exactly_their_events_live_and_on_resume() {
    let (nats, _conf) = server_mapping(&mapping_into(PARTITIONS));
    let node = Node::start(&nats, &["--stream-partitions", "4"]).await;
    let js = async_nats::jetstream::new(nats.client().await);

    // Users in every partition.
    let users: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    let mut per_partition = [0; PARTITIONS as usize];
    for u in &users {
        per_partition[partition::of_token(u, PARTITIONS) as usize] += 1;
    }
    assert!(per_partition.iter().all(|n| *n > 0), "{per_partition:?}");

    // Two sockets per user; each welcome carries its user's stream's epoch.
    let mut clients = Vec::new();
    let mut epochs = BTreeMap::new();
    for u in &users {
        let (a, wa) = Client::join(&node, u).await;
        let (b, wb) = Client::join(&node, u).await;
        assert_eq!(wa["epoch"], wb["epoch"]);
        let mut stream = js.get_stream(stream_of(u)).await.expect("the user's partition stream");
        let created = stream.info().await.unwrap().created.unix_timestamp_nanos().to_string();
        assert_eq!(wa["epoch"].as_str(), Some(created.as_str()), "user {u}: the epoch of {}", stream_of(u));
        epochs.insert(u.clone(), created);
        clients.push((u.clone(), a, b));
    }

    // Published to the unchanged event subjects, interleaved; each ack
    // names the user's partition stream, whose sequences each user gets.
    let mut published: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for i in 0..6 {
        for u in &users {
            let ack = js
                .publish(format!("agentcast.events.{u}"), format!(r#"{{"type":"n","user":"{u}","i":{i}}}"#).into())
                .await
                .unwrap()
                .await
                .unwrap();
            assert_eq!(ack.stream, stream_of(u), "user {u}");
            published.entry(u.clone()).or_default().push(ack.sequence);
        }
    }
    for (u, a, b) in &mut clients {
        for c in [a, b] {
            let got = c.events(6).await;
            let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
            assert_eq!(&seqs, &published[u.as_str()], "user {u}");
            assert!(got.iter().all(|(_, e)| e["user"] == u.as_str()), "user {u} got another's event: {got:?}");
            c.quiet_for(Duration::from_millis(100)).await;
        }
    }

    // One socket per user leaves; more events; it resumes from its last
    // sequence and epoch and gets exactly the missed ones.
    let mut resuming = Vec::new();
    for (u, a, b) in clients {
        drop(a);
        let last = *published[&u].last().unwrap();
        resuming.push((u, b, last));
    }
    let mut missed: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for i in 6..9 {
        for u in &users {
            let seq = publish(&js, u, format!(r#"{{"type":"n","user":"{u}","i":{i}}}"#)).await;
            missed.entry(u.clone()).or_default().push(seq);
        }
    }
    for (u, mut stayed, last) in resuming {
        let url = format!("{}&last_seq={last}&epoch={}", node.ws_url(&token(&u)), epochs[&u]);
        let (mut back, _) = Client::join_url(&url).await;
        for c in [&mut back, &mut stayed] {
            let got: Vec<u64> = c.events(3).await.into_iter().map(|(s, _)| s).collect();
            assert_eq!(got, missed[&u], "user {u}");
            c.quiet_for(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(node.metric("agentcast_events_rejected_total", "").await, 0.0);

    // `agentcast stream` shows every partition's stream and the user's.
    let u = &users[0];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(["stream", "--nats-url", &nats.url, "--stream-partitions", "4", "--user", u])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["partitions"], 4);
    let names: Vec<&str> = v["streams"].as_array().unwrap().iter().map(|s| s["stream"].as_str().unwrap()).collect();
    assert_eq!(names, ["AGENTCAST-0", "AGENTCAST-1", "AGENTCAST-2", "AGENTCAST-3"]);
    let total: u64 = v["streams"].as_array().unwrap().iter().map(|s| s["state"]["messages"].as_u64().unwrap()).sum();
    assert_eq!(total, 9 * users.len() as u64);
    // --stream-max-bytes (1 GiB by default) bounds the four together.
    for st in v["streams"].as_array().unwrap() {
        assert_eq!(st["config"]["max_bytes"], (1u64 << 30) / 4, "{st}");
    }
    assert_eq!(v["user"]["stream"], stream_of(u).as_str());
    assert_eq!(v["user"]["partition"], partition::of_token(u, PARTITIONS));
    assert_eq!(v["user"]["events"], 9);
    assert_eq!(v["user"]["last_seq"].as_u64(), missed[u].last().copied());
    assert_eq!(v["user"]["subject"], format!("agentcast.events.4.{}.{u}", partition::of_token(u, PARTITIONS)));
}

#[tokio::test]
async fn a_mapping_that_disagrees_keeps_the_node_not_ready_and_says_what_differs() {
    // Users spread by three in the account, by four on the node.
    let (nats, _conf) = server_mapping(DISAGREEING);
    let node = Node::spawn(&nats.url, &["--stream-partitions", "4"]);
    eventually("the mismatch logged", || async {
        node.log_text().contains("partition mapping: NATS stores agentcast.events.%partition-check-")
    })
    .await;
    let log = node.log_text();
    assert!(log.contains("this node reads it from AGENTCAST-"), "{log}");
    assert!(
        log.contains(
            r#"set the account mapping "agentcast.events.*": "agentcast.events.4.{{partition(4,1)}}.{{wildcard(1)}}""#
        ),
        "{log}"
    );
    // Checked again and again: not ready all along.
    for _ in 0..5 {
        assert_eq!(node.get("/readyz").await.0, 503);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing the checks published was stored.
    let js = async_nats::jetstream::new(nats.client().await);
    for k in 0..PARTITIONS {
        let mut s = js.get_stream(format!("AGENTCAST-{k}")).await.unwrap();
        assert_eq!(s.info().await.unwrap().state.messages, 0, "AGENTCAST-{k}");
    }

    // No mapping at all: the partitions' subjects catch nothing.
    let (bare, _conf) = server_mapping("");
    let node = Node::spawn(&bare.url, &["--stream-partitions", "4"]);
    eventually("the missing mapping logged", || async {
        node.log_text().contains("partition mapping: no stream stores agentcast.events.%partition-check-")
    })
    .await;
    assert_eq!(node.get("/readyz").await.0, 503);
}

#[tokio::test]
async fn one_partition_needs_no_mapping_and_names_the_stream_as_before() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--stream-partitions", "1"]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    assert!(js.get_stream("AGENTCAST").await.is_ok());
    assert!(js.get_stream("AGENTCAST-0").await.is_err());
    let (mut c, _) = Client::join(&node, "u1").await;
    let seq = publish(&js, "u1", r#"{"type":"n"}"#).await;
    assert_eq!(c.events(1).await[0].0, seq);
}

#[tokio::test]
async fn a_mapping_changed_under_a_running_node_turns_it_not_ready_and_its_sockets_are_told() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mapping.conf");
    std::fs::write(&conf, mapping_into(PARTITIONS)).unwrap();
    let mut nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let node = Node::start(&nats, &["--stream-partitions", "4"]).await;
    // A user that a mapping into three partitions stores elsewhere.
    let user = (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| partition::of_token(u, 3) != partition::of_token(u, PARTITIONS))
        .unwrap();
    let (mut c, _) = Client::join(&node, &user).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let seq = publish(&js, &user, r#"{"type":"n"}"#).await;
    assert_eq!(c.events(1).await[0].0, seq);

    // The operator changes the mapping (a restart with the new file).
    std::fs::write(&conf, DISAGREEING).unwrap();
    nats.restart();
    // Not ready at once while it reconnects; then for the mapping.
    eventually("the node names the mapping", || async { node.log_text().contains("partition mapping: NATS stores") })
        .await;
    assert_eq!(node.get("/readyz").await.0, 503);

    // An event now stored in another partition's stream: the socket is
    // told that what follows its position may be missing.
    let js = async_nats::jetstream::new(nats.client().await);
    let ack = js.publish(format!("agentcast.events.{user}"), r#"{"type":"n"}"#.into()).await.unwrap().await.unwrap();
    assert_ne!(ack.stream, stream_of(&user));
    let gap = c.next_json().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_eq!(gap["reason"], "unavailable", "{gap}");
    assert_eq!(gap["from"].as_u64(), Some(seq + 1), "{gap}");
    assert!(gap.get("to").is_none_or(|t| t.is_null()), "{gap}");
    assert_eq!(node.metric("agentcast_events_rejected_total", r#"reason="wrong_partition""#).await, 1.0);
}

/// Publishes the user's `i`th event, retrying while no stream takes it (the
/// old stream sealed, the mapping not yet in force), as publishers do.
async fn publish_until_stored(js: &async_nats::jetstream::Context, user: &str, i: usize) -> (String, u64) {
    let payload = format!(r#"{{"type":"n","i":{i}}}"#);
    loop {
        if let Ok(ack) = js.publish(format!("agentcast.events.{user}"), payload.clone().into()).await
            && let Ok(ack) = ack.await
        {
            return (ack.stream, ack.sequence);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn going_from_one_stream_to_four_loses_and_repeats_nothing() {
    migrate(1, &["--stream-partitions", "4", "--stream-previous", "AGENTCAST"], 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn going_back_from_four_streams_to_one_loses_and_repeats_nothing() {
    let new = ["--stream", "AGENTCAST2", "--stream-previous", "AGENTCAST", "--stream-previous-partitions", "4"];
    migrate(4, &new, 1).await;
}

/// Changes a deployment from `from` partitions (stream names from
/// `AGENTCAST`) to the layout of a node started with `to_args`, which has
/// `to` partitions, as docs/operations.md says, while clients read.
async fn migrate(from: u32, to_args: &[&str], to: u32) {
    use agentcast::client::{Client as Resuming, Delivery};
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, mapping_into(from)).unwrap();
    let mut nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let from_arg = from.to_string();
    let old = Node::start(&nats, &["--stream-partitions", &from_arg]).await;
    // The new layout's node, told of the old one: not ready until the
    // account's mapping is the new layout's.
    let new = Node::spawn(&nats.url, to_args);
    let js = async_nats::jetstream::new(nats.client().await);
    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();

    // Reads events until it has the user's `until`th; returns their `i`s.
    async fn read(c: &mut Resuming, who: &str, until: u64) -> (Vec<u64>, usize) {
        let (mut got, mut gaps) = (Vec::new(), 0);
        while got.last() != Some(&until) {
            match tokio::time::timeout(Duration::from_secs(20), c.next()).await {
                Ok(Ok(Delivery::Event { event, .. })) => {
                    let v: serde_json::Value = serde_json::from_str(&event).unwrap();
                    got.push(v["i"].as_u64().unwrap());
                }
                Ok(Ok(Delivery::Gap { .. })) => gaps += 1,
                Ok(Ok(Delivery::Welcome { .. })) => {}
                Ok(Err(e)) => panic!("{who}: {e}"),
                Err(_) => panic!("{who}: nothing within 20 s after {got:?}"),
            }
        }
        (got, gaps)
    }
    let publish_round = |i: usize| {
        let (js, users) = (js.clone(), users.clone());
        async move {
            for u in &users {
                publish_until_stored(&js, u, i).await;
            }
        }
    };

    // Each user has a client that stays throughout (it moves to the new
    // node when the old one drains) and one that leaves after event 2 and
    // comes back after the migration with its position in the old stream.
    let mut stays = Vec::new();
    for u in &users {
        let t = token(u);
        stays.push(Resuming::new(vec![old.ws_url(&t), new.ws_url(&t)], move || t.clone()).resume_from(0, None));
    }
    for i in 0..3 {
        publish_round(i).await;
    }
    let mut left = Vec::new();
    for u in &users {
        let (_, w) = Client::join(&old, u).await;
        left.push((w["position"].as_u64().unwrap(), w["epoch"].as_str().unwrap().to_owned()));
    }
    for i in 3..6 {
        publish_round(i).await;
    }
    for (c, u) in stays.iter_mut().zip(&users) {
        let (got, gaps) = read(c, &format!("the client of {u} that stays"), 5).await;
        assert_eq!((got, gaps), ((0..6).collect(), 0), "{u} before the migration");
    }

    // The migration (docs/operations.md): the old stream sealed (publishes
    // fail and are retried), the mapping in force, events flow into the
    // partitions, the old node drained.
    // The new node has made its streams and waits for the mapping.
    eventually("the new layout's node checked the mapping", || async {
        new.log_text().contains("partition mapping: ")
    })
    .await;
    assert_eq!(new.get("/readyz").await.0, 503, "{}", new.log_text());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(["stream", "--nats-url", &nats.url, "--stream-partitions", &from_arg, "--seal"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sealed: Vec<bool> = match v["streams"].as_array() {
        Some(all) => all.iter().map(|s| s["config"]["sealed"] == true).collect(),
        None => vec![v["config"]["sealed"] == true],
    };
    assert_eq!(sealed, vec![true; from as usize], "{v}");
    // A node of the old layout takes no new sockets once its streams are
    // sealed; its open sockets stay until it is drained.
    eventually("the old node not ready", || async { old.get("/readyz").await.0 == 503 }).await;
    assert!(old.log_text().contains("is sealed: a new layout replaced this node's"), "{}", old.log_text());
    std::fs::write(&conf, mapping_into(to)).unwrap();
    nats.restart();
    let js = async_nats::jetstream::new(nats.client().await);
    new.wait_ready().await;
    for i in 6..9 {
        for u in &users {
            let (stream, _) = publish_until_stored(&js, u, i).await;
            let base = if to == 1 { "AGENTCAST2" } else { "AGENTCAST" };
            assert_eq!(stream, agentcast::partition::stream_name(base, to, partition::of_token(u, to)));
        }
    }
    old.signal("TERM");

    // Every client ends with every event of its user once, in order, and
    // was told of no gap.
    for ((u, mut stayed), (last, epoch)) in users.iter().zip(stays).zip(left) {
        let (got, gaps) = read(&mut stayed, &format!("the client of {u} that stayed"), 8).await;
        assert_eq!((got, gaps), ((6..9).collect(), 0), "the client of {u} that stayed");
        assert_eq!(stayed.duplicates, 0);
        let t = token(u);
        let mut back = Resuming::new(vec![new.ws_url(&t)], move || t.clone()).resume_from(last, Some(epoch));
        let (got, gaps) = read(&mut back, &format!("the client of {u} that came back"), 8).await;
        assert_eq!((got, gaps), ((3..9).collect(), 0), "the client of {u} that came back");
        assert_eq!(back.duplicates, 0);
    }
    assert!(new.log_text().contains(" is sealed (epoch "), "{}", new.log_text());
}

/// A client whose position in the old stream is not one of its user's
/// events, where messages after it were removed: nothing proves that none
/// of the user's was among them, so it is told of a `stream_reset`, not
/// continued in silence.
#[tokio::test]
async fn a_position_the_old_stream_cannot_prove_whole_gets_a_stream_reset() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "").unwrap();
    let mut nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    // One event kept per user: a user's older events leave the stream.
    let old = Node::start(&nats, &["--stream-max-per-user", "1"]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    publish(&js, "other", r#"{"type":"n"}"#).await;
    // A user with nothing stored: welcomed at the stream's horizon.
    let (_, w) = Client::join(&old, "quiet").await;
    let (horizon, epoch) = (w["position"].as_u64().unwrap(), w["epoch"].as_str().unwrap().to_owned());
    assert!(horizon >= 1);
    // Messages after the horizon, then removed (another user's, here).
    for _ in 0..3 {
        publish(&js, "other", r#"{"type":"n"}"#).await;
    }
    let new = Node::spawn(&nats.url, &["--stream-partitions", "4", "--stream-previous", "AGENTCAST"]);
    let mut stream = js.get_stream("AGENTCAST").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.sealed = true;
    js.update_stream(config).await.expect("seal");
    std::fs::write(&conf, mapping_into(4)).unwrap();
    nats.restart();
    new.wait_ready().await;
    let url = format!("{}&last_seq={horizon}&epoch={epoch}", new.ws_url(&token("quiet")));
    let (mut c, w) = Client::join_url(&url).await;
    assert_ne!(w["epoch"].as_str(), Some(epoch.as_str()), "{w}");
    let gap = c.next_json().await;
    assert_eq!((gap["type"].as_str(), gap["reason"].as_str()), (Some("gap"), Some("stream_reset")), "{gap}");
}
