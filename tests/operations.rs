//! What operators see: exit codes, health and readiness, the stream check.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Runs the binary to completion and returns (exit code, stderr).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(args)
        .env_remove("AGENTCAST_JWT_SECRET")
        .output()
        .expect("run agentcast");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_configuration_exits_64_with_one_clear_line() {
    let secret = ["--jwt-secret", SECRET];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["serve"], "AGENTCAST_JWT_SECRET"),
        (vec!["serve", "--jwt-secret", "short"], "at least 32"),
        (vec!["serve", "--jwt-public-key", "/nonexistent.pem"], "/nonexistent.pem"),
        ([&["serve", "--listen", "nowhere"][..], &secret].concat(), "--listen"),
        ([&["serve", "--socket-queue-bytes", "0"][..], &secret].concat(), "--socket-queue-bytes"),
        ([&["serve", "--subject-prefix", "a.>"][..], &secret].concat(), "--subject-prefix"),
        ([&["serve", "--stream", "has.dot"][..], &secret].concat(), "--stream"),
        ([&["serve", "--stream-max-age", "soon"][..], &secret].concat(), "--stream-max-age"),
        ([&["serve", "--no-such-flag"][..], &secret].concat(), "--no-such-flag"),
        ([&["serve", "--nats-creds", "/nonexistent.creds"][..], &secret].concat(), "--nats-creds"),
    ];
    for (args, needle) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: one line, got {stderr:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr:?} should mention {needle}");
    }
    let (code, out) = run(&["--help"]);
    assert_eq!(code, Some(0), "{out}");
}

#[tokio::test]
async fn readiness_follows_nats_and_sockets_survive_an_outage() {
    let mut nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    assert_eq!(node.get("/healthz").await.0, 200);
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (mut c, _) = Client::join(&node, "u1").await;

    nats.stop();
    eventually("not ready without NATS", || async { node.get("/readyz").await.0 == 503 }).await;
    assert_eq!(node.get("/healthz").await.0, 200, "the process is still healthy");
    let (status, body) = refused(&node.ws_url(&token("u2")), &[]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("not_ready")));

    nats.restart();
    eventually("ready again", || async { node.get("/readyz").await.0 == 200 }).await;
    // The socket stayed open and its subscription came back with the connection.
    let js = async_nats::jetstream::new(nats.client().await);
    let s = publish(&js, "u1", r#"{"after":"restart"}"#).await;
    assert_eq!(c.events(1).await, vec![(s, json!({"after":"restart"}))]);
    assert!(node.metric("agentcast_nats_events_total", r#"event="disconnected""#).await >= 1.0);
}

#[tokio::test]
async fn a_node_stays_ready_through_a_short_stream_outage_then_is_not_ready() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    // A frozen server keeps the TCP connection up: the node stays connected
    // while every stream check times out, as in a stream leader election.
    nats.signal("STOP");
    let frozen = Instant::now();
    eventually("a stream check fails", || async {
        node.metric("agentcast_jetstream_errors_total", r#"op="stream_check""#).await >= 1.0
    })
    .await;
    assert_eq!(node.get("/readyz").await.0, 200, "ready within the grace");
    assert!(frozen.elapsed() < agentcast::server::STREAM_CHECK_GRACE);
    // Past the grace it is not ready.
    let deadline = frozen + agentcast::server::STREAM_CHECK_GRACE + Duration::from_secs(15);
    while node.get("/readyz").await.0 == 200 {
        assert!(Instant::now() < deadline, "still ready {:?} after the freeze", frozen.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(frozen.elapsed() >= agentcast::server::STREAM_CHECK_GRACE, "not ready only after the grace");
    nats.signal("CONT");
    node.wait_ready().await;
    // The socket was kept through it and still gets events.
    let js = async_nats::jetstream::new(nats.client().await);
    let seq = publish(&js, "u1", r#"{"after":"thaw"}"#).await;
    assert_eq!(c.events(1).await[0].0, seq);
}

#[tokio::test]
async fn sigterm_exits_promptly_even_without_nats() {
    let mut nats = NatsServer::start();
    let mut node = Node::start(&nats, &["--drain-window", "1s"]).await;
    let (_c, _) = Client::join(&node, "u1").await;
    nats.stop();
    eventually("not ready", || async { node.get("/readyz").await.0 == 503 }).await;
    node.signal("TERM");
    assert_eq!(node.wait_exit(Duration::from_secs(4)), Some(0), "{}", node.log_text());
}

#[tokio::test]
async fn the_node_creates_the_stream_and_reports_its_config() {
    let nats = NatsServer::start();
    let _node = Node::start(&nats, &["--stream-max-per-user", "500", "--stream-max-age", "1h"]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("AGENTCAST").await.unwrap();
    let c = stream.info().await.unwrap().config.clone();
    assert_eq!(c.subjects, vec!["agentcast.events.*"]);
    assert_eq!(c.max_messages_per_subject, 500);
    assert_eq!(c.max_age, Duration::from_secs(3600));
    assert!(c.allow_direct);
    let r = c.republish.expect("republish");
    assert_eq!((r.source.as_str(), r.destination.as_str()), ("agentcast.events.*", "agentcast.live.{{wildcard(1)}}"));
    // A second node with other limits updates them in place.
    let _b = Node::start(&nats, &["--stream-max-per-user", "800"]).await;
    let c = js.get_stream("AGENTCAST").await.unwrap().info().await.unwrap().config.clone();
    assert_eq!(c.max_messages_per_subject, 800);
}

#[tokio::test]
async fn an_external_stream_is_only_checked_and_differences_are_named() {
    let nats = NatsServer::start();
    // Missing: exit 64 and say so.
    let mut node = Node::spawn(&nats.url, &["--stream-external"]);
    assert_eq!(node.wait_exit(Duration::from_secs(10)), Some(64), "{}", node.log_text());
    assert!(node.log_text().contains("does not exist"), "{}", node.log_text());

    // Present but without republish: exit 64 naming the field.
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "AGENTCAST".into(),
        subjects: vec!["agentcast.events.*".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut node = Node::spawn(&nats.url, &["--stream-external"]);
    assert_eq!(node.wait_exit(Duration::from_secs(10)), Some(64), "{}", node.log_text());
    assert!(node.log_text().contains("republish is None"), "{}", node.log_text());
    // A managing node cannot fix republish in place either, and says so.
    let mut node = Node::spawn(&nats.url, &[]);
    assert_eq!(node.wait_exit(Duration::from_secs(10)), Some(64), "{}", node.log_text());

    // Right structure, other limits: the node runs, reports, changes nothing.
    js.delete_stream("AGENTCAST").await.unwrap();
    let settings =
        agentcast::config::StreamSettings { external: true, max_age: Duration::from_secs(7200), ..stream_settings(42) };
    create_after_delete(&js, agentcast::stream::desired(&settings, 0), "external").await;
    let node = Node::start(&nats, &["--stream-external"]).await;
    let log = node.log_text();
    assert!(
        log.contains("managed externally") && log.contains("max_messages_per_subject is 42, configured 10000"),
        "{log}"
    );
    let c = js.get_stream("AGENTCAST").await.unwrap().info().await.unwrap().config.clone();
    assert_eq!(c.max_messages_per_subject, 42, "unchanged");
}

#[tokio::test]
async fn nats_credentials_are_used_and_wrong_ones_leave_the_node_not_ready() {
    // User and password.
    let nats = NatsServer::start_with(&["--user", "agentcast", "--pass", "s3cret"]);
    let node = Node::start(&nats, &["--nats-user", "agentcast", "--nats-password", "s3cret"]).await;
    let (mut c, _) = Client::join(&node, "u1").await;
    let admin = async_nats::ConnectOptions::with_user_and_password("agentcast".into(), "s3cret".into())
        .connect(&nats.url)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(admin);
    let s = publish(&js, "u1", r#"{"ok":1}"#).await;
    assert_eq!(c.events(1).await, vec![(s, json!({"ok":1}))]);
    let wrong = Node::spawn(&nats.url, &["--nats-user", "agentcast", "--nats-password", "nope"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = wrong.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""nats_connected":false"#), "{body}");
    assert!(wrong.log_text().to_lowercase().contains("authorization"), "{}", wrong.log_text());
    // A token.
    let nats = NatsServer::start_with(&["--auth", "t0ken"]);
    let node = Node::start(&nats, &["--nats-token", "t0ken"]).await;
    assert_eq!(node.get("/readyz").await.0, 200);
}

/// Permissions written before positions were asked of the stream leader
/// lack `$JS.API.STREAM.MSG.GET.<stream>`: every user's first socket would
/// fail after a timeout. The node stays not ready and its log says what to
/// grant; with the permission it is ready.
#[tokio::test]
async fn a_node_user_that_may_not_ask_the_leader_for_positions_leaves_the_node_not_ready_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let conf = |extra: &str| {
        format!(
            r#"accounts: {{ APP: {{ jetstream: enabled, users: [ {{ user: node, password: pw, permissions: {{
                publish: {{ allow: ["$JS.API.STREAM.INFO.AGENTCAST", "$JS.API.STREAM.CREATE.AGENTCAST",
                    "$JS.API.STREAM.UPDATE.AGENTCAST", "$JS.API.DIRECT.GET.AGENTCAST",
                    "$JS.API.DIRECT.GET.AGENTCAST.>"{extra}] }},
                subscribe: {{ allow: ["agentcast.live.*", "_INBOX.>"] }} }} }} ] }} }}"#
        )
    };
    let login = ["--nats-user", "node", "--nats-password", "pw"];
    let without = dir.path().join("without.conf");
    std::fs::write(&without, conf("")).unwrap();
    let nats = NatsServer::start_with(&["-c", without.to_str().unwrap()]);
    let node = Node::spawn(&nats.url, &login);
    // The request times out (5 s) before the check can say so.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !node.log_text().contains("must be allowed to publish to $JS.API.STREAM.MSG.GET.AGENTCAST") {
        assert!(std::time::Instant::now() < deadline, "no hint in the log:\n{}", node.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503, "{body}");

    let with = dir.path().join("with.conf");
    std::fs::write(&with, conf(r#", "$JS.API.STREAM.MSG.GET.AGENTCAST""#)).unwrap();
    let nats = NatsServer::start_with(&["-c", with.to_str().unwrap()]);
    let node = Node::start(&nats, &login).await;
    let (mut c, welcome) = Client::join(&node, "u1").await;
    assert_eq!(welcome["position"], 0, "{welcome}");
    c.ws.close(None).await.unwrap();
}

/// Settings under which the stream can remove an event that is not the
/// user's oldest, or store it under another subject, make the node exit 64
/// naming each. A setting the server under test does not know (it drops it
/// on create: TTLs before 2.11, transforms before 2.10) cannot be set there,
/// and is not asserted on that server.
#[tokio::test]
async fn stream_settings_that_break_continuity_are_refused_by_name() {
    use async_nats::jetstream::stream::{Config, SubjectTransform};
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(nats.client().await);
    let settings = agentcast::config::StreamSettings { external: true, ..stream_settings(10_000) };
    let want = agentcast::stream::desired(&settings, 0);
    // A setting, how to set it, and whether the server kept it.
    type Case = (&'static str, fn(&mut Config), fn(&Config) -> bool);
    let cases: Vec<Case> = vec![
        ("allow_rollup_hdrs", |c| c.allow_rollup = true, |c| c.allow_rollup),
        ("allow_msg_ttl", |c| c.allow_message_ttl = true, |c| c.allow_message_ttl),
        (
            "subject_transform",
            |c| {
                c.subject_transform = Some(SubjectTransform {
                    source: "agentcast.events.*".into(),
                    destination: "agentcast.events.{{wildcard(1)}}".into(),
                })
            },
            |c| c.subject_transform.is_some(),
        ),
        (
            "subject_delete_marker_ttl",
            |c| {
                c.allow_message_ttl = true;
                c.subject_delete_marker_ttl = Some(Duration::from_secs(60));
            },
            |c| c.subject_delete_marker_ttl.is_some(),
        ),
        ("allow_msg_schedules", |c| c.allow_message_schedules = true, |c| c.allow_message_schedules),
    ];
    let mut refused = 0;
    for (name, set, kept) in &cases {
        let mut config = want.clone();
        set(&mut config);
        create_after_delete(&js, config, name).await;
        let info = js.get_stream("AGENTCAST").await.unwrap().info().await.unwrap().config.clone();
        if kept(&info) {
            let mut node = Node::spawn(&nats.url, &["--stream-external"]);
            assert_eq!(node.wait_exit(Duration::from_secs(10)), Some(64), "{name}: {}", node.log_text());
            assert!(node.log_text().contains(name), "{name}: {}", node.log_text());
            refused += 1;
        } else {
            eprintln!("{name}: this nats-server does not keep it; not asserted");
        }
        js.delete_stream("AGENTCAST").await.unwrap();
    }
    // Rollups exist on every supported server.
    assert!(refused >= 1);

    // A stream the node manages, edited by someone to allow rollups while
    // the node runs: the periodic check finds it and the node exits 64.
    let mut node = Node::start(&nats, &[]).await;
    let mut edited = js.get_stream("AGENTCAST").await.unwrap().info().await.unwrap().config.clone();
    edited.allow_rollup = true;
    js.update_stream(edited).await.unwrap();
    assert_eq!(node.wait_exit(Duration::from_secs(10)), Some(64), "{}", node.log_text());
    assert!(node.log_text().contains("allow_rollup_hdrs"), "{}", node.log_text());
}

/// `deny_delete: false` is not refused, but named in a warning at start.
#[tokio::test]
async fn a_stream_that_allows_deletes_is_named_in_a_warning() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let warned = |log: &str| log.matches("deny_delete is false").count();
    // The node's log is read by a thread of its own: a line logged before
    // the node was ready can still be on its way.
    eventually("the warning logged", || async { warned(&node.log_text()) >= 1 }).await;
    assert_eq!(warned(&node.log_text()), 1, "once: {}", node.log_text());
    drop(node);
    let js = async_nats::jetstream::new(nats.client().await);
    let mut config = js.get_stream("AGENTCAST").await.unwrap().info().await.unwrap().config.clone();
    config.deny_delete = true;
    js.update_stream(config).await.unwrap();
    let node = Node::start(&nats, &[]).await;
    assert_eq!(warned(&node.log_text()), 0, "{}", node.log_text());
}

/// Creates a stream whose namesake was just deleted. nats-server (2.15.1,
/// under load in CI) may still be removing the old one's store and answer
/// "error creating store for stream" (10049): that answer is retried, for
/// at most 5 s; any other error fails the test.
async fn create_after_delete(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
    what: &str,
) {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => return,
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(e.kind(), CreateStreamErrorKind::JetStream(je)
                    if je.error_code() == async_nats::jetstream::ErrorCode::STREAM_CREATE) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: creating stream {}: {e}", config.name),
        }
    }
}
