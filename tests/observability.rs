//! Observability: a scenario through every path a node counts, then its
//! /metrics checked series by series, with exact values where the scenario
//! fixes them; and the dashboard and alert rules checked against what a node
//! exports.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboards/agentcast.json");
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");

/// The series a node exports, by name (histograms as `_bucket`, `_sum` and
/// `_count`), each with the `# HELP` text it was described with.
fn exported(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut series = BTreeSet::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            if !help.trim().is_empty() {
                helped.insert(name.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            series.insert(name.to_owned());
        }
    }
    (series, helped)
}

async fn nats_version(nats: &NatsServer) -> String {
    let (_, body) = http_get(&format!("{}/varz", nats.monitor)).await;
    let v: Value = serde_json::from_str(&body).expect("varz json");
    v["version"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_exported_and_counts_what_the_scenario_did() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--stream-max-per-user", "5"]).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());

    // Refusals before the upgrade: 3 bad signatures, 1 missing token, 1 bad
    // user id, 1 bad request.
    let forged =
        agentcast::auth::mint_hs256(b"another-secret-another-secret-another", "u1", Duration::from_secs(60)).unwrap();
    for _ in 0..3 {
        assert_eq!(refused(&node.ws_url(&forged), &[]).await.0, 401);
    }
    assert_eq!(refused(&format!("ws://{}/ws", node.addr), &[]).await.0, 401);
    assert_eq!(refused(&node.ws_url(&token("a.b")), &[]).await.0, 403);
    let both = format!("{}&last_seq=1&resume=frame", node.ws_url(&token("u1")));
    assert_eq!(refused(&both, &[]).await.0, 400);

    // Three sockets of two users; events for both.
    let (mut a1, _) = Client::join(&node, "u1").await;
    let (mut a2, _) = Client::join(&node, "u1").await;
    let (mut b, _) = Client::join(&node, "u2").await;
    assert_eq!(node.metric("agentcast_sockets_open", "").await, 3.0);
    assert_eq!(node.metric("agentcast_users_subscribed", "").await, 2.0);
    let stamp = || humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let mut u1 = Vec::new();
    for i in 0..4 {
        u1.push(publish(&js, "u1", json!({"type": "tick", "i": i, "timestamp": stamp()}).to_string()).await);
    }
    for i in 0..2 {
        publish(&js, "u2", json!({"type": "tick", "i": i, "timestamp": stamp()}).to_string()).await;
    }
    assert_eq!(a1.events(4).await.len(), 4);
    assert_eq!(a2.events(4).await.len(), 4);
    assert_eq!(b.events(2).await.len(), 2);
    // 4 events to 2 sockets and 2 to 1 socket, all through batched writes.
    eventually("frames counted", || async { node.metric("agentcast_frames_sent_total", "").await == 10.0 }).await;
    assert_eq!(node.metric("agentcast_events_received_total", "").await, 6.0);
    let batches = node.metric("agentcast_write_batches_total", "").await;
    assert!((3.0..=10.0).contains(&batches), "write batches {batches}");
    assert!(node.metric("agentcast_bytes_sent_total", "").await > 10.0 * 40.0);
    // One queue-depth sample and one latency sample per write batch.
    assert_eq!(node.metric("agentcast_socket_queue_depth_count", "").await, batches);
    assert_eq!(node.metric("agentcast_delivery_latency_seconds_count", "").await, batches);
    // 2.10+ stamp the republished message (Nats-Time-Stamp); 2.9 does not,
    // and the envelope's timestamp is used.
    let version = nats_version(&nats).await;
    let (used, unused) = if version.starts_with("2.9.") { ("envelope", "stream") } else { ("stream", "envelope") };
    assert_eq!(node.metric("agentcast_delivery_latency_seconds_count", &format!(r#"clock="{used}""#)).await, batches);
    assert_eq!(node.metric("agentcast_delivery_latency_seconds_count", &format!(r#"clock="{unused}""#)).await, 0.0);
    let latency = node.metric("agentcast_delivery_latency_seconds_sum", "").await;
    assert!(latency > 0.0 && latency < batches * 5.0, "latency sum {latency} s on nats-server {version}");

    // A complete resume of 3 events.
    let (mut r, _) = Client::join_url(&format!("{}&last_seq={}", node.ws_url(&token("u1")), u1[0])).await;
    assert_eq!(r.events(3).await.iter().map(|(s, _)| *s).collect::<Vec<_>>(), u1[1..].to_vec());
    // A resume across expired history: u3 keeps only its newest 5 of 7.
    let mut u3 = Vec::new();
    for i in 0..7 {
        u3.push(publish(&js, "u3", json!({"i": i}).to_string()).await);
    }
    let (mut g, _) = Client::join_url(&format!("{}&last_seq={}", node.ws_url(&token("u3")), u3[0])).await;
    let gap = g.next_json().await;
    assert_eq!((gap["type"].as_str(), gap["reason"].as_str()), (Some("gap"), Some("expired")), "{gap}");
    assert_eq!(g.events(5).await.len(), 5);
    assert_eq!(node.metric("agentcast_resumes_total", r#"outcome="complete""#).await, 1.0);
    assert_eq!(node.metric("agentcast_resumes_total", r#"outcome="gap""#).await, 1.0);
    assert_eq!(node.metric("agentcast_resumes_total", r#"outcome="failed""#).await, 0.0);
    // Both are timed, the one with a gap too.
    assert_eq!(node.metric("agentcast_resume_duration_seconds_count", "").await, 2.0);
    assert_eq!(node.metric("agentcast_replayed_events_total", "").await, 8.0);
    assert_eq!(node.metric("agentcast_gap_frames_sent_total", r#"reason="expired""#).await, 1.0);

    // A live message whose Nats-Last-Sequence names an event u2 does not
    // have (u3's): a hole is detected, nothing is found, and it is announced.
    let prev = *u3.last().unwrap();
    // Sent straight to the live subject with the stamps a republish of the
    // stream carries (the node takes only messages that name its stream).
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Stream", "AGENTCAST");
    h.insert("Nats-Sequence", (prev + 1000).to_string().as_str());
    h.insert("Nats-Last-Sequence", prev.to_string().as_str());
    client.publish_with_headers("agentcast.live.u2", h, r#"{"forged":true}"#.into()).await.unwrap();
    client.flush().await.unwrap();
    let notice = b.next_json().await;
    assert_eq!((notice["type"].as_str(), notice["reason"].as_str()), (Some("gap"), Some("unavailable")), "{notice}");
    assert_eq!(b.events(1).await[0].0, prev + 1000);
    assert_eq!(node.metric("agentcast_live_gaps_detected_total", "").await, 1.0);
    assert_eq!(node.metric("agentcast_live_gaps_announced_total", r#"reason="unavailable""#).await, 1.0);
    assert_eq!(node.metric("agentcast_live_gaps_repaired_total", "").await, 0.0);
    assert_eq!(node.metric("agentcast_gap_frames_sent_total", r#"reason="unavailable""#).await, 1.0);

    // Closes: a binary frame (unsupported), then 4 clients leave.
    a2.ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    let (_, close) = a2.until_close().await;
    assert_eq!(u16::from(close.expect("close frame").code), 1003);
    for mut c in [a1, b, r, g] {
        c.ws.close(None).await.unwrap();
        let _ = c.until_close().await;
    }
    eventually("every socket gone", || async {
        node.metric("agentcast_sockets_open", "").await == 0.0
            && node.metric("agentcast_users_subscribed", "").await == 0.0
    })
    .await;
    assert_eq!(node.metric("agentcast_disconnects_total", r#"reason="client""#).await, 4.0);
    assert_eq!(node.metric("agentcast_disconnects_total", r#"reason="unsupported""#).await, 1.0);
    assert_eq!(node.metric("agentcast_disconnects_total", "").await, 5.0);
    assert_eq!(node.metric("agentcast_connections_accepted_total", "").await, 5.0);
    assert_eq!(node.metric("agentcast_client_frames_rejected_total", r#"reason="binary""#).await, 1.0);
    assert_eq!(node.metric("agentcast_connections_refused_total", r#"reason="bad_signature""#).await, 3.0);
    assert_eq!(node.metric("agentcast_connections_refused_total", r#"reason="missing""#).await, 1.0);
    assert_eq!(node.metric("agentcast_connections_refused_total", r#"reason="user_id""#).await, 1.0);
    assert_eq!(node.metric("agentcast_connections_refused_total", r#"reason="bad_request""#).await, 1.0);
    assert_eq!(node.metric("agentcast_connections_refused_total", "").await, 6.0);
    assert_eq!(node.metric("agentcast_jetstream_errors_total", "").await, 0.0);
    assert_eq!(node.metric("agentcast_ready", "").await, 1.0);
    assert_eq!(node.metric("agentcast_nats_connected", "").await, 1.0);
    assert_eq!(node.metric("agentcast_nats_reconnects_total", "").await, 0.0);

    // NATS goes away and comes back: one reconnect, and the node is ready again.
    let mut nats = nats;
    nats.restart();
    eventually("reconnected", || async { node.metric("agentcast_nats_reconnects_total", "").await == 1.0 }).await;
    node.wait_ready().await;
    assert!(node.metric("agentcast_nats_events_total", r#"event="disconnected""#).await >= 1.0);
    eventually("ready gauge", || async { node.metric("agentcast_ready", "").await == 1.0 }).await;
    assert_eq!(node.metric("agentcast_nats_connected", "").await, 1.0);

    // Every series is there, and every metric is described.
    let (_, text) = node.get("/metrics").await;
    let (series, helped) = exported(&text);
    for name in agentcast::metrics::ALL {
        let base = name.trim_end_matches("_total");
        let present = series.contains(*name) || series.contains(&format!("{name}_count"));
        assert!(present, "{name} missing from /metrics:\n{text}");
        assert!(helped.contains(*name) || helped.contains(base), "{name} has no help text");
    }
    // No label value names a user.
    for user in ["u1", "u2", "u3"] {
        assert!(!text.contains(&format!("\"{user}\"")), "a label carries user {user}");
    }
}

/// Metric names a PromQL expression refers to (identifiers that start with
/// `agentcast_`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("agentcast_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Every series name a node can export: `ALL`, with histograms expanded.
fn exportable() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for name in agentcast::metrics::ALL {
        out.insert(name.to_string());
        if agentcast::metrics::HISTOGRAMS.contains(name) {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{suffix}"));
            }
        }
    }
    out
}

fn panels(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

#[test]
fn the_dashboard_queries_only_exported_series_and_has_its_selectors() {
    let text = std::fs::read_to_string(DASHBOARD).expect("dashboard file");
    let dash: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()), "a stable uid for provisioning");
    assert!(dash["schemaVersion"].as_u64().unwrap_or(0) >= 36, "a schema current Grafana imports as is");
    let vars = dash["templating"]["list"].as_array().expect("template variables");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("variable {name}"));
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("instance")["type"], "query");
    assert!(var("instance")["includeAll"].as_bool().unwrap_or(false), "total over all nodes");
    assert!(var("instance")["multi"].as_bool().unwrap_or(false));

    let all = panels(&dash);
    let rows: BTreeSet<&str> = all.iter().filter(|p| p["type"] == "row").filter_map(|p| p["title"].as_str()).collect();
    for row in ["Traffic", "Latency", "Delivery and recovery", "Connections", "NATS"] {
        assert!(rows.contains(row), "row {row} missing: {rows:?}");
    }
    let exportable = exportable();
    let mut used = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for p in all.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate id at {title}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title} uses the datasource variable");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{title}: no query"));
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: target without expr"));
            assert!(expr.contains(r#"instance=~"$instance""#), "{title}: not filtered by the node selector: {expr}");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: queries no agentcast metric: {expr}");
            for n in names {
                assert!(exportable.contains(&n), "{title} queries {n}, which a node does not export");
                used.insert(n);
            }
        }
    }
    // The dashboard shows every metric the issue asks an operator to see.
    for name in agentcast::metrics::ALL {
        let shown = used.contains(*name) || used.iter().any(|u| u.starts_with(&format!("{name}_")));
        assert!(shown, "no panel shows {name}");
    }
}

#[test]
fn the_alert_rules_query_only_exported_series_and_have_runbooks() {
    let text = std::fs::read_to_string(ALERTS).expect("alerts file");
    let exportable = exportable();
    let mut alerts = 0;
    let mut runbooks = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("- alert:") {
            alerts += 1;
        }
        if line.starts_with("runbook:") {
            runbooks += 1;
        }
        for n in metric_names(line) {
            assert!(exportable.contains(&n), "an alert queries {n}, which a node does not export: {line}");
        }
    }
    assert!(alerts >= 5, "{alerts} alerts");
    assert_eq!(runbooks, alerts, "every alert has a runbook line");
}

/// Every PromQL expression of the dashboard and the alert rules.
fn queries() -> Vec<String> {
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard file")).unwrap();
    let mut out: Vec<String> = panels(&dash)
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let alerts = std::fs::read_to_string(ALERTS).expect("alerts file");
    out.extend(alerts.lines().filter_map(|l| l.trim().strip_prefix("expr:")).map(|e| e.trim().to_owned()));
    out
}

/// The label matchers on agentcast metrics in an expression, as (metric,
/// label, values): `reason="slow"` gives one value, `reason=~"a|b"` each
/// alternative. Matchers on `instance` (the scrape's) and on dashboard
/// variables are left out.
fn matchers(expr: &str) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for name in metric_names(expr) {
        for (i, _) in expr.match_indices(&format!("{name}{{")) {
            let body = &expr[i + name.len() + 1..];
            let body = &body[..body.find('}').expect("closing brace")];
            for m in body.split(',') {
                let (label, rest) = m.split_once('=').expect("a matcher");
                let (regex, value) = match rest.strip_prefix('~') {
                    Some(v) => (true, v),
                    None => (false, rest),
                };
                let (label, value) = (label.trim(), value.trim().trim_matches('"'));
                if label == "instance" || value.contains('$') {
                    continue;
                }
                let values = if regex { value.split('|').map(str::to_owned).collect() } else { vec![value.to_owned()] };
                out.push((name.clone(), label.to_owned(), values));
            }
        }
    }
    out
}

/// A node that has served nothing (no socket, no event, no resume) already
/// exports every series the dashboard and the alert rules query, with the
/// label values they select, and every histogram with its buckets at zero:
/// a panel or rule over a histogram that only appeared after its first
/// sample (the resume duration did) would show "no data" on a fresh node.
#[tokio::test]
async fn a_fresh_node_exports_what_the_dashboard_and_the_alert_rules_query() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let (_, text) = node.get("/metrics").await;
    assert_eq!(node.metric("agentcast_resumes_total", "").await, 0.0, "no resume ran");
    let (series, _) = exported(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();

    for name in agentcast::metrics::ALL {
        if agentcast::metrics::HISTOGRAMS.contains(name) {
            for suffix in ["_bucket", "_sum", "_count"] {
                assert!(series.contains(&format!("{name}{suffix}")), "{name}{suffix} missing on a fresh node:\n{text}");
            }
            assert_eq!(node.metric(&format!("{name}_count"), "").await, 0.0, "{name}");
        } else {
            assert!(series.contains(*name), "{name} missing on a fresh node:\n{text}");
        }
    }
    // The resume duration's buckets are the documented ones, each at zero.
    let buckets = lines.iter().filter(|l| l.starts_with("agentcast_resume_duration_seconds_bucket{")).count();
    assert_eq!(buckets, agentcast::metrics::LATENCY_BUCKETS.len() + 1, "with +Inf:\n{text}");
    // Both clocks of the delivery latency, and every NATS event a rule may count.
    for clock in ["stream", "envelope"] {
        let selector = format!(r#"clock="{clock}""#);
        assert!(
            lines.iter().any(|l| l.starts_with("agentcast_delivery_latency_seconds_count") && l.contains(&selector))
        );
    }
    for event in agentcast::metrics::NATS_EVENT_NAMES {
        let selector = format!(r#"event="{event}""#);
        assert!(
            lines.iter().any(|l| l.starts_with("agentcast_nats_events_total{") && l.contains(&selector)),
            "{event}"
        );
    }

    let queries = queries();
    assert!(queries.len() > 40, "{} queries found", queries.len());
    for expr in &queries {
        for name in metric_names(expr) {
            assert!(series.contains(&name), "{expr}: {name} is not exported by a fresh node");
        }
        for (name, label, values) in matchers(expr) {
            for value in values {
                let selector = format!(r#"{label}="{value}""#);
                let found = lines.iter().any(|l| l.starts_with(&format!("{name}{{")) && l.contains(&selector));
                assert!(found, "{expr}: no series {name}{{{selector}}} on a fresh node");
            }
        }
    }
}
