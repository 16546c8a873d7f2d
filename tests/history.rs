//! History reads split into parallel chains over several connections
//! ([`agentcast::history::History::read`]), against a real nats-server: the
//! joined parts must be exactly the user's events in order, and a part that
//! hit `max` must stop the join there, never skip to a later part.

mod common;

use agentcast::history::History;
use common::*;
use futures_util::StreamExt;

/// A stream as a node creates it, with `users_events` events of user `x`
/// spread evenly among `noise` events of other users (wide enough for the
/// read to be split), and a History over four connections.
async fn setup(nats: &NatsServer, users_events: usize, noise: usize) -> (History, Vec<u64>) {
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(agentcast::stream::desired(&stream_settings(10_000))).await.unwrap();
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
    let mut streams = Vec::new();
    for _ in 0..4 {
        let c = nats.client().await;
        streams.push(async_nats::jetstream::new(c).get_stream_no_info("AGENTCAST").await.unwrap());
    }
    let live = js.get_stream_no_info("AGENTCAST").await.unwrap();
    (History::new(live, streams, "agentcast.events".into()), x)
}

#[tokio::test]
async fn a_split_read_joins_its_parts_in_order_and_stops_at_the_first_capped_part() {
    let nats = NatsServer::start();
    let (history, x) = setup(&nats, 40, 8000).await;
    assert_eq!(x.len(), 40);
    let before = Some(x[39] + 1);
    let seqs = |r: &agentcast::history::Read| r.events.iter().map(|e| e.seq).collect::<Vec<_>>();

    let all = history.read("x", 0, before, 64).await.unwrap();
    assert_eq!((all.gap, all.done), (None, true));
    assert_eq!(seqs(&all), x);

    // The first event is read alone, then four parts of about 10 each: with
    // max 10 the first part is capped and nothing of the later ones is taken.
    let ten = history.read("x", 0, before, 10).await.unwrap();
    assert!(!ten.done);
    assert_eq!(seqs(&ten), x[..10]);

    // With max 15 the join takes the first part whole and the start of the
    // second.
    let fifteen = history.read("x", 0, before, 15).await.unwrap();
    assert!(!fifteen.done);
    assert_eq!(seqs(&fifteen), x[..15]);

    // From the middle, up to an event in the middle.
    let mid = history.read("x", x[9], Some(x[30]), 64).await.unwrap();
    assert_eq!((mid.gap, mid.done), (None, true));
    assert_eq!(seqs(&mid), x[10..30]);
}

#[tokio::test]
async fn a_resume_from_just_before_the_oldest_stored_event_is_complete() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(agentcast::stream::desired(&stream_settings(5))).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..8 {
        seqs.push(publish(&js, "lim", format!(r#"{{"i":{i}}}"#)).await);
    }
    let stream = js.get_stream_no_info("AGENTCAST").await.unwrap();
    let history = History::new(stream.clone(), vec![stream], "agentcast.events".into());
    // The limit kept the newest 5: the oldest stored is seqs[3], right after
    // the client's position. Nothing the client needs is gone.
    let read = history.read("lim", seqs[2], None, 64).await.unwrap();
    assert_eq!((read.gap, read.done), (None, true));
    assert_eq!(read.events.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[3..]);
    // One further back, seqs[2] itself is gone: that is a gap of exactly it.
    let read = history.read("lim", seqs[1], None, 64).await.unwrap();
    let gap = read.gap.expect("gap");
    assert_eq!((gap.from, gap.to, gap.earliest), (Some(seqs[2]), Some(seqs[2]), Some(seqs[3])));
    assert_eq!(read.events.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[3..]);
}
