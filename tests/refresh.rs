//! In-band token refresh on a WebSocket (`{"type":"refresh","token":...}`),
//! against a real nats-server and node: a socket lives past its first
//! token's `exp` on a fresh token of its own user, and a refresh that would
//! widen or forge it is refused while the socket stays open.

mod common;

use std::time::{Duration, Instant};

use agentcast::auth::mint_hs256;
use common::*;

fn token_for(user: &str, lifetime: Duration) -> String {
    mint_hs256(SECRET.as_bytes(), user, lifetime).unwrap()
}

#[tokio::test]
async fn a_refresh_carries_a_socket_past_its_first_tokens_exp() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--jwt-leeway", "0s"]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let first = token_for("alice", Duration::from_secs(2));
    let (mut c, welcome) = Client::join_url(&node.ws_url(&first)).await;
    let exp = welcome["exp"].as_u64().expect("welcome carries exp");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!((now..=now + 3).contains(&exp), "exp {exp} is the token's, about 2 s away");

    c.send_text(
        &serde_json::json!({"type": "refresh", "token": token_for("alice", Duration::from_secs(60))}).to_string(),
    )
    .await;
    let refreshed = c.next_json().await;
    assert_eq!(refreshed["type"], "refreshed", "{refreshed}");
    let new_exp = refreshed["exp"].as_u64().unwrap();
    assert!(new_exp >= exp + 50, "{new_exp} vs {exp}");

    // Well past the first token's exp: still open, still delivering.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seq = publish(&js, "alice", r#"{"type":"agent_thinking","data":{}}"#).await;
    assert_eq!(c.events(1).await[0].0, seq);
}

#[tokio::test]
async fn refreshes_with_another_user_a_bad_signature_or_an_expired_token_are_refused_and_the_socket_stays() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--jwt-leeway", "0s"]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let (mut c, _) = Client::join_url(&node.ws_url(&token_for("bob", Duration::from_secs(4)))).await;
    let opened = Instant::now();
    let other_secret = mint_hs256(b"another-secret-another-secret-another!", "bob", Duration::from_secs(60)).unwrap();
    let expired = mint_hs256(SECRET.as_bytes(), "bob", Duration::ZERO).unwrap();
    // Its exp is this second: past it once the clock has moved on.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refusals = [
        (token_for("mallory", Duration::from_secs(60)), "another user"),
        (other_secret, "signature"),
        (expired, "expired"),
        ("not a token".to_owned(), "well-formed"),
    ];
    for (token, why) in refusals {
        c.send_text(&serde_json::json!({"type": "refresh", "token": token}).to_string()).await;
        let f = c.next_json().await;
        assert_eq!((f["type"].as_str(), f["code"].as_str()), (Some("error"), Some("refresh_refused")), "{why}: {f}");
        assert!(f["message"].as_str().unwrap_or_default().contains(why), "{why}: {f}");
    }
    // Still open and delivering, to bob only.
    let seq = publish(&js, "bob", r#"{"type":"agent_thinking","data":{}}"#).await;
    publish(&js, "mallory", r#"{"type":"agent_thinking","data":{}}"#).await;
    assert_eq!(c.events(1).await[0].0, seq);
    // And the first token's expiry still stands.
    let (_, close) = c.until_close().await;
    assert_eq!(close.as_ref().map(|c| u16::from(c.code)), Some(4001), "{close:?}");
    let lived = opened.elapsed();
    assert!(lived < Duration::from_secs(6), "closed at the first token's exp, after {lived:?}");
    assert_eq!(node.metric("agentcast_client_frames_rejected_total", r#"reason="refresh_refused""#).await, 4.0);
}
