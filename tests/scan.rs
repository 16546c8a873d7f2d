//! Resumes served by a shared tail scan ([`agentcast::scan`]), driven
//! deterministically: the test holds every history-read slot of an
//! in-process hub, which is what sends resumes to the scanner, against a real
//! nats-server and a real stream. Each test checks the scanner did the
//! reading through its metric, then that every user got exactly its own
//! events, proven complete or with the right gap.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentcast::hub::{Hub, RESUME_READ_CONCURRENCY};
use agentcast::resume::{GapReason, Read, acquire, read_for_resume};
use common::*;

async fn setup(nats: &NatsServer, max_per_user: i64) -> (async_nats::jetstream::Context, Arc<Hub>) {
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(agentcast::stream::desired(&stream_settings(max_per_user), 0)).await.unwrap();
    let live = agentcast::live::Live::plain(&nats.url).await.expect("live connection");
    (js, Hub::new(client.clone(), live, vec![client], stream_settings(max_per_user)))
}

/// The process-wide counter of shared scans that succeeded (this test binary
/// installs the recorder; tests in it run in parallel, so callers compare
/// before and after).
fn scans_ok() -> f64 {
    let text = agentcast::metrics::install().render();
    text.lines()
        .find_map(|l| l.strip_prefix(r#"agentcast_history_scans_total{outcome="ok"} "#))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Runs `reads` (user, after, before, max) through the hub while the test
/// holds every read slot, so they cannot use direct gets; the slots are let
/// go once the scan had time to run, for the proofs that follow it.
async fn read_while_slots_busy(hub: &Arc<Hub>, reads: Vec<(String, u64, u64, usize)>) -> Vec<Read> {
    let mut slots = Vec::new();
    for _ in 0..RESUME_READ_CONCURRENCY {
        slots.push(acquire(hub.resume_slots()).await);
    }
    let tasks: Vec<_> = reads
        .into_iter()
        .map(|(user, after, before, max)| {
            let hub = hub.clone();
            tokio::spawn(async move { read_for_resume(&hub, &user, after, before, max).await.unwrap().0 })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tasks.iter().all(|t| !t.is_finished()), "no read can finish without a slot for its proof");
    drop(slots);
    let mut out = Vec::new();
    for t in tasks {
        out.push(tokio::time::timeout(RECV_TIMEOUT, t).await.expect("read in time").unwrap());
    }
    out
}

#[tokio::test]
async fn a_storm_of_resumes_is_read_by_one_scan_and_each_user_gets_only_its_own_events() {
    let nats = NatsServer::start();
    let (js, hub) = setup(&nats, 1000).await;
    let users: Vec<String> = (0..40).map(|u| format!("u{u}")).collect();
    let mut seqs: Vec<Vec<u64>> = vec![Vec::new(); users.len()];
    for round in 0..30 {
        for (u, user) in users.iter().enumerate() {
            seqs[u].push(publish(&js, user, format!(r#"{{"user":"{user}","i":{round}}}"#)).await);
        }
    }
    let before_scans = scans_ok();
    // Each user missed its last 20 events.
    let reads = users.iter().enumerate().map(|(u, user)| (user.clone(), seqs[u][9], seqs[u][29] + 1, 64)).collect();
    let results = read_while_slots_busy(&hub, reads).await;
    assert!(scans_ok() > before_scans, "the reads went through the scanner");
    for (u, read) in results.iter().enumerate() {
        assert_eq!(read.gap, None, "user {u}: continuity proven");
        assert!(read.done, "user {u}: whole range read");
        let got: Vec<u64> = read.events.iter().map(|e| e.seq).collect();
        assert_eq!(got, seqs[u][10..], "user {u}: exactly its missed events, in order");
        for (i, ev) in read.events.iter().enumerate() {
            let want = format!(r#"{{"user":"{}","i":{}}}"#, users[u], i + 10);
            assert_eq!(std::str::from_utf8(&ev.payload).unwrap(), want);
        }
    }
}

#[tokio::test]
async fn a_scan_hands_out_at_most_max_events_and_the_rest_comes_next() {
    let nats = NatsServer::start();
    let (js, hub) = setup(&nats, 1000).await;
    let mut seqs = Vec::new();
    for i in 0..100 {
        seqs.push(publish(&js, "many", format!(r#"{{"i":{i}}}"#)).await);
        publish(&js, "other", r#"{"x":1}"#).await;
    }
    let before = seqs[99] + 1;
    let first = read_while_slots_busy(&hub, vec![("many".into(), 0, before, 64)]).await.remove(0);
    assert!(!first.done, "capped at 64 events");
    assert_eq!(first.gap, None);
    assert_eq!(first.events.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[..64]);
    let rest = read_while_slots_busy(&hub, vec![("many".into(), seqs[63], before, 64)]).await.remove(0);
    assert!(rest.done);
    assert_eq!(rest.gap, None);
    assert_eq!(rest.events.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[64..]);

    // Large events: a request collects at most MAX_SCAN_BYTES_PER_REQUEST.
    let pad = "x".repeat(4000);
    let mut big = Vec::new();
    for _ in 0..20 {
        big.push(publish(&js, "big", format!(r#"{{"pad":"{pad}"}}"#)).await);
    }
    let read = read_while_slots_busy(&hub, vec![("big".into(), 0, big[19] + 1, 64)]).await.remove(0);
    let fits = agentcast::scan::MAX_SCAN_BYTES_PER_REQUEST / (pad.len() + 10);
    assert!(!read.done);
    assert_eq!(read.events.iter().map(|e| e.seq).collect::<Vec<_>>(), big[..fits]);

    // An event larger than that cap is still taken when it comes first, so
    // every round moves the request forward.
    let huge = publish(&js, "huge", format!(r#"{{"pad":"{}"}}"#, "y".repeat(40_000))).await;
    let after = publish(&js, "huge", r#"{"small":1}"#).await;
    let read = read_while_slots_busy(&hub, vec![("huge".into(), 0, after + 1, 64)]).await.remove(0);
    assert!(!read.done);
    assert_eq!(read.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [huge]);
}

#[tokio::test]
async fn a_scan_of_expired_history_is_announced_as_a_gap() {
    let nats = NatsServer::start();
    let (js, hub) = setup(&nats, 5).await;
    let mut seqs = Vec::new();
    for i in 0..20 {
        seqs.push(publish(&js, "old", format!(r#"{{"i":{i}}}"#)).await);
        publish(&js, "noise", r#"{"x":1}"#).await;
    }
    // The client saw event 3; only the newest 5 are kept.
    let read = read_while_slots_busy(&hub, vec![("old".into(), seqs[2], seqs[19] + 1, 64)]).await.remove(0);
    let gap = read.gap.expect("gap");
    assert_eq!(gap.reason, GapReason::Expired);
    assert_eq!(gap.from, Some(seqs[2] + 1));
    assert_eq!(gap.to, Some(seqs[15] - 1));
    assert_eq!(gap.earliest, Some(seqs[15]));
    assert_eq!(read.events.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[15..]);
}
