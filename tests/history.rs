//! History reads split into parallel chains over several connections
//! ([`agentcast::resume::read`]), against a real nats-server: the
//! joined parts must be exactly the user's events in order, and a part that
//! hit `max`, or found nothing because a lagging responder answered it, must
//! stop the join there, never skip to a later part.

mod common;

use agentcast::history::History;
use common::*;
use futures_util::StreamExt;

/// A stream as a node creates it, with `users_events` events of user `x`
/// spread evenly among `noise` events of other users (wide enough for the
/// read to be split), and a History over four connections.
async fn setup(nats: &NatsServer, users_events: usize, noise: usize) -> (History, Vec<u64>) {
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(agentcast::stream::desired(&stream_settings(10_000), 0)).await.unwrap();
    let x = fill(&js, users_events, noise).await;
    let mut readers = Vec::new();
    for _ in 0..4 {
        readers.push(nats.client().await);
    }
    (History::new(&js.client(), readers, "AGENTCAST", "agentcast.events".into()).unwrap(), x)
}

/// Publishes `users_events` events of user `x` spread evenly among `noise`
/// events of other users; returns x's sequences.
async fn fill(js: &async_nats::jetstream::Context, users_events: usize, noise: usize) -> Vec<u64> {
    let every = noise / users_events;
    let is_x = |i: usize| i % (every + 1) == every;
    // Pipelined, with at most 1024 acks outstanding (async-nats holds back
    // publishes beyond its own in-flight limit until acks are read).
    let mut acks = futures_util::stream::FuturesOrdered::new();
    let mut x = Vec::new();
    for i in 0..users_events + noise {
        let subject = if is_x(i) { "agentcast.events.x".to_owned() } else { format!("agentcast.events.n{}", i % 50) };
        let ack = js.publish(subject, format!(r#"{{"i":{i}}}"#).into()).await.unwrap();
        acks.push_back(async move { (i, ack.await.unwrap().sequence) });
        while acks.len() >= 1024 || (i + 1 == users_events + noise && !acks.is_empty()) {
            let (j, seq) = acks.next().await.unwrap();
            if is_x(j) {
                x.push(seq);
            }
        }
    }
    x
}

#[tokio::test]
async fn a_split_read_joins_its_parts_in_order_and_stops_at_the_first_capped_part() {
    let nats = NatsServer::start();
    let (history, x) = setup(&nats, 40, 8000).await;
    assert_eq!(x.len(), 40);
    let before = Some(x[39] + 1);
    let seqs = |r: &agentcast::resume::Read| r.events.iter().map(|e| e.seq).collect::<Vec<_>>();

    let all = agentcast::resume::read(&history, "x", 0, before, 64).await.unwrap();
    assert_eq!((all.gap, all.done), (None, true));
    assert_eq!(seqs(&all), x);

    // The first event is read alone, then four parts of about 10 each: with
    // max 10 the first part is capped and nothing of the later ones is taken.
    let ten = agentcast::resume::read(&history, "x", 0, before, 10).await.unwrap();
    assert!(!ten.done);
    assert_eq!(seqs(&ten), x[..10]);

    // With max 15 the join takes the first part whole and the start of the
    // second.
    let fifteen = agentcast::resume::read(&history, "x", 0, before, 15).await.unwrap();
    assert!(!fifteen.done);
    assert_eq!(seqs(&fifteen), x[..15]);

    // From the middle, up to an event in the middle.
    let mid = agentcast::resume::read(&history, "x", x[9], Some(x[30]), 64).await.unwrap();
    assert_eq!((mid.gap, mid.done), (None, true));
    assert_eq!(seqs(&mid), x[10..30]);
}

#[tokio::test]
async fn a_resume_from_just_before_the_oldest_stored_event_is_complete() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(agentcast::stream::desired(&stream_settings(5), 0)).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..8 {
        seqs.push(publish(&js, "lim", format!(r#"{{"i":{i}}}"#)).await);
    }
    let history = History::new(&client, vec![client.clone()], "AGENTCAST", "agentcast.events".into()).unwrap();
    // The limit kept the newest 5: the oldest stored is seqs[3], right after
    // the client's position. Nothing the client needs is gone.
    let read = agentcast::resume::read(&history, "lim", seqs[2], None, 64).await.unwrap();
    assert_eq!((read.gap, read.done), (None, true));
    assert_eq!(read.events.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[3..]);
    // One further back, seqs[2] itself is gone: that is a gap of exactly it.
    let read = agentcast::resume::read(&history, "lim", seqs[1], None, 64).await.unwrap();
    let gap = read.gap.expect("gap");
    assert_eq!((gap.from, gap.to, gap.earliest), (Some(seqs[2]), Some(seqs[2]), Some(seqs[3])));
    assert_eq!(read.events.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[3..]);
}

/// Rule 3's look at a stretch (`History::span`) must tell a removed
/// message (a gap, maybe of the user's events) from a message of the user's
/// inside a stretch the caller believed held none: the second means the
/// caller's earlier answer (the user's oldest event) was wrong, and it is
/// reported as a contradiction, which `resume::read` answers by reading
/// again rather than by announcing a gap.
#[tokio::test]
async fn a_users_event_inside_a_stretch_said_to_hold_none_is_a_contradiction_not_a_gap() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(agentcast::stream::desired(&stream_settings(2), 0)).await.unwrap();
    // 1 o, 2 a, 3 a, 4 x, 5 a: a's limit of 2 removes 2, an interior delete,
    // so the look reads the stretch rather than trusting the stream's state.
    let mut seqs = Vec::new();
    for user in ["o", "a", "a", "x", "a"] {
        seqs.push(publish(&js, user, r#"{"type":"t"}"#).await);
    }
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let history = History::new(&client, vec![client.clone()], "AGENTCAST", "agentcast.events".into()).unwrap();
    use agentcast::history::Span;
    assert_eq!(history.span("x", 3, 4).await.unwrap(), Span::Whole);
    assert_eq!(history.span("x", 1, 4).await.unwrap(), Span::Broken(2));
    assert_eq!(history.span("x", 3, 6).await.unwrap(), Span::Contradicted(4));
    // The rule itself, asked with the leader's true answers, finds x whole
    // from 2 (its oldest, 4, follows 3, which is stored and not x's).
    let read = agentcast::resume::read(&history, "x", 2, None, 64).await.unwrap();
    assert_eq!((read.gap, read.done), (None, true));
    assert_eq!(read.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [4]);
}

/// A direct-get responder that lags behind the stream (a mirror with
/// `mirror_direct` that stopped after the user's 20th event: it shares the
/// stream's direct-get subject, so it answers some of the gets, with "not
/// found" past its end) must never make a split read skip events. A part it
/// answers ends the join there: what is returned is always a gap-free run of
/// the user's events from the start, and a read cut short says it is not
/// done. (When it answers the very first get, the read returns nothing; the
/// socket's replay then finds its position unreached and closes for the
/// client to retry: see tests/resume.rs.)
#[tokio::test]
async fn a_lagging_direct_get_responder_cuts_a_split_read_short_and_never_leaves_a_hole() {
    let nats = NatsServer::start();
    let (history, mut x) = setup(&nats, 20, 4000).await;
    // The mirror answers direct gets once it has caught up, and goes on
    // answering when it falls behind.
    let js = async_nats::jetstream::new(nats.client().await);
    lagging_mirror(&js, 4020).await;
    x.extend(fill(&js, 20, 4000).await);
    let before = Some(x[39] + 1);
    let mut short = 0;
    for _ in 0..60 {
        let read = agentcast::resume::read(&history, "x", 0, before, 64).await.unwrap();
        let got: Vec<u64> = read.events.iter().map(|e| e.seq).collect();
        assert_eq!(got, x[..got.len()], "a read returned the user's events with a hole");
        assert_eq!(read.gap, None);
        if !got.is_empty() && got.len() < x.len() {
            assert!(!read.done, "a read cut short by a lagging responder claimed to be done");
            short += 1;
        }
    }
    // nats-server 2.9 drops a mirror's direct-get subscription once it falls
    // far behind (not always at once); 2.10+ keep it, and there the mirror
    // must have cut reads short for the checks above to mean anything.
    let version = js.client().server_info().version;
    eprintln!("nats-server {version}: {short} of 60 reads cut short by the lagging mirror");
    if !version.starts_with("2.9.") {
        assert!(short > 0, "no read was cut short: the mirror answered no part");
    }
}

/// Whether the server the client is connected to knows batched direct gets
/// (nats-server 2.11+).
fn batches(client: &async_nats::Client) -> bool {
    let v = client.server_info().version;
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (2, 11)
}

/// The audit's batched read (issue 14, item 3): each user's newest event in
/// one request, 0 for a user with none, and how far the answering server
/// reached. Before 2.11 the server says it does not know the request, and
/// the audit asks per user instead.
#[tokio::test]
async fn newest_many_reads_each_users_newest_event_or_says_it_cannot() {
    use agentcast::history::Batched;
    let nats = NatsServer::start();
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(agentcast::stream::desired(&stream_settings(100), 0)).await.unwrap();
    let history = History::new(&client, vec![client.clone()], "AGENTCAST", "agentcast.events".into()).unwrap();
    let a1 = publish(&js, "a", r#"{"i":1}"#).await;
    let b1 = publish(&js, "b", r#"{"i":2}"#).await;
    let a2 = publish(&js, "a", r#"{"i":3}"#).await;
    let last = publish(&js, "other", r#"{"i":4}"#).await;
    assert!(a1 < b1 && b1 < a2 && a2 < last);
    let got = history.newest_many(&["a", "b", "none"]).await.unwrap();
    if !batches(&client) {
        assert!(matches!(got, Batched::Unsupported), "{got:?}");
        return;
    }
    let Batched::Read(newest) = got else { panic!("2.11+ answers batched reads: {got:?}") };
    assert_eq!(newest.seqs, vec![a2, b1, 0]);
    assert_eq!(newest.through, last);
    // No user with an event: nothing says how far the server reached.
    let Batched::Read(none) = history.newest_many(&["none", "nobody"]).await.unwrap() else { panic!() };
    assert_eq!((none.seqs, none.through), (vec![0, 0], 0));
}

/// An answer stops after NEWEST_BATCH_BYTES (the payloads come along): the
/// users it did not reach are asked again until every one is answered.
#[tokio::test]
async fn newest_many_asks_again_for_the_users_past_the_byte_limit() {
    use agentcast::history::{Batched, NEWEST_BATCH_BYTES};
    let nats = NatsServer::start();
    let client = nats.client().await;
    if !batches(&client) {
        return;
    }
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(agentcast::stream::desired(&stream_settings(100), 0)).await.unwrap();
    let history = History::new(&client, vec![client.clone()], "AGENTCAST", "agentcast.events".into()).unwrap();
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(200 * 1024));
    let users: Vec<String> = (0..3 * NEWEST_BATCH_BYTES / big.len()).map(|i| format!("u{i}")).collect();
    let mut want = Vec::new();
    for u in &users {
        want.push(publish(&js, u, big.clone()).await);
    }
    let last = *want.last().unwrap();
    let names: Vec<&str> = users.iter().map(|u| u.as_str()).collect();
    let Batched::Read(newest) = history.newest_many(&names).await.unwrap() else { panic!() };
    assert_eq!(newest.seqs, want);
    assert_eq!(newest.through, last);
}
