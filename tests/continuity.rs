//! Issue 14: tests that try to break continuity. Whatever the stream's
//! limits do and whatever an operator removes (always a user's oldest
//! events, or the stream's oldest), a resuming client gets every event of
//! its user exactly once, in order, or a `gap` frame that covers what it did
//! not get. Never silence. The oracle is tests/common/oracle.rs.
//!
//! - Scenario 1 of the issue, twice: a per-user limit raised by restarting
//!   the node with another `--stream-max-per-user`, and a user's oldest
//!   events deleted by hand from an external stream without that limit.
//! - A property test: random interleaved publishes for several users,
//!   per-user limit changes up and down (by `update_stream` on an external
//!   stream, or by restarting nodes with another flag, two nodes possibly
//!   disagreeing), operator removals (purge a user's subject with `keep`,
//!   delete a user's oldest events, purge the stream's oldest as `max_age`
//!   would, `max_msgs` set and lifted), SIGKILLed and restarted nodes, and
//!   sessions opened on random nodes, live or resuming from positions the
//!   test's own sessions legitimately hold (a `seq` received, a gap's `to`,
//!   a welcome's `position`, or 0). Fixed seed (`AGENTCAST_TEST_SEED`).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentcast::config::StreamSettings;
use common::oracle::{Published, Session};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
    js.create_stream(agentcast::stream::desired(&settings, 0)).await.expect("create the stream");
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

// ---------------------------------------------------------------------------
// The property test.

const USERS: usize = 5;
/// Steps of the random schedule; the run also stops adding steps after
/// `BUDGET`, then finishes every open session (within `BOUND` each; after
/// one session has timed out, within 2 s). About 10 to 30 s per test here.
const STEPS: usize = 600;
const BUDGET: Duration = Duration::from_secs(25);
const MAX_OPEN: usize = 8;
const NODES: usize = 2;
/// Per-user limits the schedule picks from (-1: none, external streams only).
const LIMITS: [i64; 6] = [2, 3, 5, 8, 20, 1000];

fn seed() -> u64 {
    std::env::var("AGENTCAST_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

struct World {
    nats: NatsServer,
    js: async_nats::jetstream::Context,
    /// The stream is the test's (`--stream-external`), or the nodes manage it.
    external: bool,
    nodes: Vec<Option<Node>>,
    /// The `--stream-max-per-user` each node slot was started with (managed).
    flags: Vec<i64>,
    published: Published,
    /// Legitimate resume positions per user (0 always is one).
    positions: HashMap<String, Vec<u64>>,
    epoch: Option<String>,
    open: Vec<Session>,
    checked: usize,
    timeouts: usize,
    failures: Vec<String>,
    log: Vec<String>,
    t0: Instant,
    rng: StdRng,
}

impl World {
    fn note(&mut self, what: String) {
        self.log.push(format!("[{:>5.1}s] {what}", self.t0.elapsed().as_secs_f64()));
    }

    fn user(&mut self) -> String {
        format!("u{}", self.rng.random_range(0..USERS))
    }

    async fn start_node(&mut self, slot: usize) {
        let limit = self.flags[slot].to_string();
        let args: Vec<&str> =
            if self.external { vec!["--stream-external"] } else { vec!["--stream-max-per-user", &limit] };
        let node = Node::start(&self.nats, &args).await;
        self.note(format!("node {slot} started at {} {args:?}", node.addr));
        self.nodes[slot] = Some(node);
    }

    async fn stream(&self) -> async_nats::jetstream::stream::Stream {
        self.js.get_stream("AGENTCAST").await.expect("stream")
    }

    /// Reads what has arrived on every open session, so that no socket
    /// fills up while the schedule goes on.
    async fn pump(&mut self) {
        for s in &mut self.open {
            s.drain_for(Duration::from_millis(2)).await;
        }
        // Sessions the node closed (killed, slow, 1011) are checked as far
        // as they got.
        let mut i = 0;
        while i < self.open.len() {
            if self.open[i].is_open() {
                i += 1;
            } else {
                let s = self.open.remove(i);
                let upto = s.accounted();
                self.note(format!("session {} from {} ended by the node at {upto}", s.user, s.start));
                self.settle(s, upto);
            }
        }
    }

    fn settle(&mut self, s: Session, upto: u64) {
        self.checked += 1;
        if let Err(d) = s.check(&self.published, upto) {
            self.note(format!("FAILED: {}", d.lines().next().unwrap_or("")));
            self.failures.push(d);
        }
        self.positions.entry(s.user.clone()).or_default().extend(s.positions());
    }

    async fn open_session(&mut self) {
        let live: Vec<usize> = (0..NODES).filter(|i| self.nodes[*i].is_some()).collect();
        let slot = live[self.rng.random_range(0..live.len())];
        let user = self.user();
        let base = base(self.nodes[slot].as_ref().unwrap());
        let known = self.positions.get(&user).cloned().unwrap_or_default();
        // A quarter of the sessions are new sockets (live from the welcome).
        let from = if known.is_empty() || self.rng.random_bool(0.25) {
            None
        } else if self.rng.random_bool(0.15) {
            Some(0)
        } else {
            Some(known[self.rng.random_range(0..known.len())])
        };
        match Session::open(&base, &user, from, self.epoch.as_deref()).await {
            Ok(s) => {
                self.epoch = self.epoch.take().or_else(|| s.epoch());
                self.note(format!("open {user} on node {slot} from {:?}: {}", from, s.frames[0]));
                self.open.push(s);
            }
            Err(e) => self.note(format!("open {user} on node {slot} refused: {e}")),
        }
    }

    async fn finish_session(&mut self) {
        let s = self.rng.random_range(0..self.open.len());
        let mut s = self.open.remove(s);
        let upto = self.published.newest(&s.user);
        let began = Instant::now();
        // The full bound until one session has waited in vain, then 2 s: on
        // code that loses events, the run must stay bounded.
        let wait = if self.timeouts < 1 { BOUND } else { Duration::from_secs(2) };
        let reached = s.read_until(upto, wait).await;
        self.timeouts += usize::from(!reached);
        s.drain_for(Duration::from_millis(20)).await;
        s.close().await;
        self.note(format!(
            "finish {} from {}: accounted {} of newest {upto} after {:?}",
            s.user,
            s.start,
            s.accounted(),
            began.elapsed()
        ));
        if !reached {
            self.note(format!("  {} did not reach {upto} within {wait:?}", s.user));
        }
        self.settle(s, upto);
    }

    async fn step(&mut self) {
        let roll = self.rng.random_range(0..100);
        match roll {
            // Publishes for a few users, interleaved.
            0..=29 => {
                let users: Vec<String> = (0..self.rng.random_range(1..=3)).map(|_| self.user()).collect();
                let n = self.rng.random_range(1..=6);
                let mut seqs = Vec::new();
                for _ in 0..n {
                    for u in &users {
                        seqs.push(self.published.publish(&self.js, u).await);
                    }
                }
                self.note(format!("publish {n} each for {users:?}: {}", common::oracle::ranges(&seqs)));
            }
            30..=49 if self.open.len() < MAX_OPEN => self.open_session().await,
            30..=63 if !self.open.is_empty() => self.finish_session().await,
            30..=63 => {}
            64..=70 => {
                let limit = LIMITS[self.rng.random_range(0..LIMITS.len())];
                if self.external {
                    let limit = if self.rng.random_bool(0.2) { -1 } else { limit };
                    let mut config = self.stream().await.cached_info().config.clone();
                    config.max_messages_per_subject = limit;
                    self.js.update_stream(config).await.expect("update the per-subject limit");
                    self.note(format!("external stream: max_msgs_per_subject {limit}"));
                } else {
                    // The documented way: restart a node with the new flag
                    // (the other may still run with its own and put its own
                    // back within 2 s, as in a roll).
                    let slot = self.rng.random_range(0..NODES);
                    self.kill(slot).await;
                    self.flags[slot] = limit;
                    self.start_node(slot).await;
                }
            }
            71..=75 => {
                let user = self.user();
                let keep = self.rng.random_range(1..=4);
                let r = self.stream().await.purge().filter(format!("agentcast.events.{user}")).keep(keep).await;
                self.note(format!("purge {user} keep {keep}: {:?}", r.map(|r| r.purged)));
            }
            78..=83 => {
                // An operator deletes a user's oldest events by hand.
                let user = self.user();
                let n = self.rng.random_range(1..=3);
                let stream = self.stream().await;
                let mut deleted = Vec::new();
                for _ in 0..n {
                    let subject = format!("agentcast.events.{user}");
                    let Ok(first) = stream.get_first_raw_message_by_subject(&subject, 0).await else { break };
                    // Keep the newest.
                    if first.sequence == self.published.newest(&user) {
                        break;
                    }
                    stream.delete_message(first.sequence).await.expect("delete the oldest");
                    deleted.push(first.sequence);
                }
                self.note(format!("deleted {user}'s oldest by hand: {deleted:?}"));
            }
            84..=88 if self.js.client().server_info().version.starts_with("2.9.") => {
                // nats-server 2.9.10's purge up to a sequence (a compaction)
                // can leave a user's older events stored while it removes
                // newer ones (seen here with interior deletes present), which
                // no rule built on what the stream holds can see: it is
                // documented as unsupported on 2.9 (docs/operations.md). The
                // stream's limits remove the same prefix correctly.
                self.note("purge up to a sequence skipped on 2.9".into());
            }
            84..=88 => {
                // The stream's oldest go, as max_age or max_bytes would take them.
                let mut stream = self.stream().await;
                let state = stream.info().await.expect("info").state.clone();
                if state.messages > 4 {
                    let upto = state.first_sequence + self.rng.random_range(1..=state.messages / 3);
                    let r = stream.purge().sequence(upto).await;
                    self.note(format!("purge the stream below {upto}: {:?}", r.map(|r| r.purged)));
                }
            }
            89..=91 => {
                // max_msgs: the stream's oldest go, then the limit is lifted.
                let mut stream = self.stream().await;
                let info = stream.info().await.expect("info").clone();
                let keep = (info.state.messages * 2 / 3).max(1) as i64;
                let mut config = info.config.clone();
                config.max_messages = keep;
                self.js.update_stream(config.clone()).await.expect("set max_msgs");
                config.max_messages = -1;
                self.js.update_stream(config).await.expect("lift max_msgs");
                self.note(format!("max_msgs {keep} then lifted (first was {})", info.state.first_sequence));
            }
            92..=99 => {
                // A node is killed; half the time it stays down for a while
                // (clients resume on the other), and a node that is down is
                // started again.
                let slot = self.rng.random_range(0..NODES);
                let live = self.nodes.iter().filter(|n| n.is_some()).count();
                if self.nodes[slot].is_none() {
                    self.start_node(slot).await;
                } else if live > 1 && self.rng.random_bool(0.5) {
                    self.kill(slot).await;
                } else {
                    self.kill(slot).await;
                    self.start_node(slot).await;
                }
            }
            _ => {}
        }
        self.pump().await;
    }

    async fn kill(&mut self, slot: usize) {
        if let Some(mut node) = self.nodes[slot].take() {
            node.signal("KILL");
            node.wait_exit(Duration::from_secs(5));
            self.note(format!("SIGKILL node {slot} ({})", node.addr));
        }
        // Its sessions see the close.
        self.pump().await;
    }
}

async fn property(external: bool) {
    let seed = seed();
    eprintln!("seed {seed} (AGENTCAST_TEST_SEED overrides), external stream: {external}");
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(nats.client().await);
    if external {
        let settings = StreamSettings { external: true, ..stream_settings(20) };
        js.create_stream(agentcast::stream::desired(&settings, 0)).await.expect("create the stream");
    }
    let mut w = World {
        nats,
        js,
        external,
        nodes: (0..NODES).map(|_| None).collect(),
        flags: vec![20; NODES],
        published: Published::default(),
        positions: (0..USERS).map(|u| (format!("u{u}"), vec![0])).collect(),
        epoch: None,
        open: Vec::new(),
        checked: 0,
        timeouts: 0,
        failures: Vec::new(),
        log: Vec::new(),
        t0: Instant::now(),
        rng: StdRng::seed_from_u64(seed),
    };
    for slot in 0..NODES {
        w.start_node(slot).await;
    }
    let mut steps = 0;
    while steps < STEPS && w.t0.elapsed() < BUDGET {
        w.step().await;
        steps += 1;
    }
    while !w.open.is_empty() {
        w.finish_session().await;
    }
    let state = w.stream().await.info().await.expect("info").state.clone();
    eprintln!(
        "{steps} steps, {} sessions checked, {} events published, stream holds {} ({}..{}), {:.1}s",
        w.checked,
        w.published.seqs.values().map(Vec::len).sum::<usize>(),
        state.messages,
        state.first_sequence,
        state.last_sequence,
        w.t0.elapsed().as_secs_f64()
    );
    if !w.failures.is_empty() {
        eprintln!("schedule:\n{}", w.log.join("\n"));
        panic!(
            "seed {seed}: {} of {} sessions broke continuity:\n  {}",
            w.failures.len(),
            w.checked,
            w.failures.join("\n  ")
        );
    }
}

/// Random publishes, limit changes by `update_stream`, operator removals
/// and node kills against a stream the test manages (`--stream-external`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schedules_never_lose_an_event_silently_external_stream() {
    property(true).await;
}

/// The same with nodes that manage the stream themselves: limits change
/// by restarting a node with another `--stream-max-per-user`, and the two
/// nodes may hold different flags for a while (as in a roll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schedules_never_lose_an_event_silently_managed_stream() {
    property(false).await;
}
