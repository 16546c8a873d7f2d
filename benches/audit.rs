//! The audit's cost at scale: `cargo bench --bench audit -- [USERS] [SECONDS]`.
//!
//! The audit ([`agentcast::hub::AUDIT_INTERVAL`]) checks every quiet user of
//! a node against the stream while the stream moves. Its cost grows with the
//! users a node holds, which sockets cannot show here (this machine allows
//! 20,000 open files a process; bench/audit/audit_cost.py measures 15,000
//! over real sockets). So this joins USERS (50,000) users to a real
//! [`agentcast::hub::Hub`] through channels, as a socket joins it, with one
//! stored event each, keeps the stream moving with 50 events/s of users not
//! joined (so every user is due at every audit: the worst case), and
//! measures for SECONDS (30) the users checked per second
//! (`agentcast_audit_checks_total`), the messages nats-server received per
//! second (its /varz `in_msgs`: the audit's requests and the trickle) and
//! the CPU of nats-server and of this process, against the trickle alone.
//! On nats-server 2.11+ the audit asks in batches, before one request a user.
//!
//! nats-server: `$AGENTCAST_BENCH_NATS_SERVER`, else `nats-server` on PATH.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentcast::hub::{Hub, Kicker};
use agentcast::user::UserId;
use futures_util::StreamExt;
use tokio::sync::mpsc;

/// Events of users that are not joined, per second: the stream moves, so
/// every quiet user is due at every audit.
const TRICKLE_PER_S: u64 = 50;

struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    common::cpu_ticks(pid) as f64 / common::clock_ticks_per_s()
}

async fn in_msgs(monitor: u16) -> u64 {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], monitor));
    let body = common::http_get(addr, "/varz").await;
    let json = body.find('{').and_then(|i| serde_json::from_str::<serde_json::Value>(&body[i..]).ok());
    json.and_then(|v| v["in_msgs"].as_u64()).unwrap_or(0)
}

fn counter(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let users: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(30);
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let nats_bin = std::env::var("AGENTCAST_BENCH_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    let port = 20_000 + rand::random_range(0..10_000u16);
    let monitor = port + 10_000;
    let nats = Proc(
        Command::new(&nats_bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts"),
    );
    let url = format!("nats://127.0.0.1:{port}");
    let client = loop {
        match async_nats::connect(&url).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let version = client.server_info().version;
    let settings = agentcast::config::StreamSettings {
        name: "AGENTCAST".into(),
        partitions: 1,
        previous: None,
        subject_prefix: "agentcast.events".into(),
        live_prefix: "agentcast.live".into(),
        external: false,
        replicas: 1,
        max_age: Duration::from_secs(3600),
        max_bytes: 1 << 30,
        max_per_user: 100,
        max_event_bytes: 256 * 1024,
        duplicate_window: Duration::from_secs(120),
    };
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(agentcast::stream::desired(&settings, 0)).await.unwrap();
    let payload = format!(r#"{{"type":"agent_completed","data":{{"text":"{}"}}}}"#, "x".repeat(200));
    let mut acks = futures_util::stream::FuturesUnordered::new();
    for u in 0..users {
        acks.push(js.publish(format!("agentcast.events.q{u}"), payload.clone().into()).await.unwrap().into_future());
        while acks.len() >= 1024 {
            acks.next().await.unwrap().unwrap();
        }
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    println!("agentcast audit benchmark: nats-server {version}, {users} quiet users, {seconds} s per phase");

    let mut readers = Vec::new();
    for _ in 0..agentcast::nats::READ_CONNECTIONS {
        readers.push(async_nats::connect(&url).await.unwrap());
    }
    let live = agentcast::live::Live::plain(&url).await.unwrap();
    let hub = Hub::new(async_nats::connect(&url).await.unwrap(), live, readers, settings);

    let stop = tokio_util::sync::CancellationToken::new();
    let trickle = tokio::spawn({
        let (js, stop) = (js.clone(), stop.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / TRICKLE_PER_S));
            for i in 0u64.. {
                tokio::select! { _ = stop.cancelled() => return, _ = tick.tick() => {} }
                let _ = js.publish(format!("agentcast.events.busy{}", i % 100), "{}".into()).await;
            }
        }
    });
    let me = std::process::id();
    let nats_pid = nats.0.id();
    let measure = |label: String| {
        let metrics = metrics.clone();
        async move {
            let (c0, m0, n0, s0) = (
                counter(&metrics.render(), "agentcast_audit_checks_total"),
                in_msgs(monitor).await,
                cpu_seconds(nats_pid),
                cpu_seconds(me),
            );
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            let (c1, m1, n1, s1) = (
                counter(&metrics.render(), "agentcast_audit_checks_total"),
                in_msgs(monitor).await,
                cpu_seconds(nats_pid),
                cpu_seconds(me),
            );
            let dt = t0.elapsed().as_secs_f64();
            let r = serde_json::json!({
                "phase": label,
                "seconds": (dt * 10.0).round() / 10.0,
                "users_checked_per_s": ((c1 - c0) / dt).round(),
                "nats_in_msgs_per_s": ((m1 - m0) as f64 / dt).round(),
                "nats_server_cpu_pct": (1000.0 * (n1 - n0) / dt).round() / 10.0,
                "hub_process_cpu_pct": (1000.0 * (s1 - s0) / dt).round() / 10.0,
                "hub_process_rss_mib": common::rss_kb(me) / 1024,
            });
            println!("{r}");
            r
        }
    };
    let base = measure("trickle only, no users".into()).await;

    let started = Instant::now();
    let joined: Vec<_> = futures_util::stream::iter(0..users)
        .map(|u| {
            let hub = hub.clone();
            async move {
                let user = UserId::parse(&format!("q{u}")).unwrap();
                let (tx, rx) = mpsc::unbounded_channel();
                let m = hub.join(&user, u as u64, tx, Arc::new(Kicker::default()), usize::MAX).await.unwrap();
                (m, rx)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    println!("{}", serde_json::json!({ "joined": joined.len(), "in_s": started.elapsed().as_secs_f64().round() }));
    // Let the first audits, which find every user new, pass.
    tokio::time::sleep(agentcast::hub::AUDIT_INTERVAL * 3).await;
    let loaded = measure(format!("{users} quiet users")).await;
    stop.cancel();
    let _ = trickle.await;
    let per_user_us =
        (loaded["nats_server_cpu_pct"].as_f64().unwrap() - base["nats_server_cpu_pct"].as_f64().unwrap()) / 100.0 * 1e6
            / loaded["users_checked_per_s"].as_f64().unwrap().max(1.0);
    println!("{}", serde_json::json!({ "nats_server_cpu_us_per_user_checked": (per_user_us * 100.0).round() / 100.0 }));
    drop(joined);
}
