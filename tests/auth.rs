//! Refusals before the upgrade: tokens, origins, user ids. No socket is
//! opened and no subscription is made for any of them.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs256(claims: serde_json::Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn bad_tokens_get_401_with_a_reason_and_no_socket() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    let url = |t: &str| node.ws_url(t);
    let s = SECRET.as_bytes();
    let exp = now() + 600;
    let none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(json!({"sub":"u1","exp":exp}).to_string())
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("missing", format!("ws://{}/ws", node.addr), "missing"),
        ("malformed", url("not.a.jwt"), "malformed"),
        ("expired", url(&hs256(json!({"sub":"u1","exp":now() - 3600}), s)), "expired"),
        (
            "wrong signature",
            url(&hs256(json!({"sub":"u1","exp":exp}), b"some-other-secret-some-other-secret")),
            "bad_signature",
        ),
        ("alg none", url(&none), "algorithm"),
        ("no exp", url(&hs256(json!({"sub":"u1"}), s)), "missing_claim"),
        ("no sub", url(&hs256(json!({"exp":exp}), s)), "missing_claim"),
    ];
    for (what, u, reason) in &cases {
        let (status, body) = refused(u, &[]).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], *reason, "{what}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    }
    // The Authorization header is read too, and wins over the query.
    let good = token("u1");
    let (status, body) = refused(&url(&good), &[("authorization", "Bearer not.a.jwt")]).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("malformed")));
    let (mut c, _) = {
        let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws",
            node.addr
        ))
        .unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {good}").parse().unwrap());
        tokio_tungstenite::connect_async(req).await.unwrap()
    };
    let w = futures_util::StreamExt::next(&mut c).await.unwrap().unwrap();
    assert!(w.to_text().unwrap().contains(r#""type":"welcome""#));
    assert_eq!(node.metric("agentcast_connections_refused_total", "").await, cases.len() as f64 + 1.0);
    assert_eq!(node.metric("agentcast_connections_refused_total", r#"reason="missing_claim""#).await, 2.0);
    assert_eq!(node.metric("agentcast_connections_accepted_total", "").await, 1.0);
    assert!(nats.live_subscriptions().await == vec!["agentcast.live.u1"]);
}

#[tokio::test]
async fn public_key_nodes_verify_their_algorithm_and_refuse_confusion() {
    let nats = NatsServer::start();
    let key = fixture("rsa-public.pem");
    let node = Node::start(&nats, &["--jwt-public-key", &key]).await;
    let private = std::fs::read(fixture("rsa-private.pem")).unwrap();
    let claims = json!({"sub":"u1","exp":now() + 600});
    let good =
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &EncodingKey::from_rsa_pem(&private).unwrap())
            .unwrap();
    let (_c, w) = {
        let mut c = Client::connect(&node.ws_url(&good)).await;
        let w = c.next_json().await;
        (c, w)
    };
    assert_eq!(w["user"], "u1");
    // Algorithm confusion: an HS256 token keyed with the public key's bytes.
    let forged = hs256(claims, &std::fs::read(&key).unwrap());
    let (status, body) = refused(&node.ws_url(&forged), &[]).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("algorithm")), "{body}");
    // The node's HS256 secret is not accepted either.
    let (status, _) = refused(&node.ws_url(&token("u1")), &[]).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn user_ids_that_could_widen_a_subscription_get_403() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &[]).await;
    for sub in ["*", ">", "a.b", "u1.>", "a b", "", "é", &"x".repeat(129)] {
        let t = hs256(json!({"sub":sub,"exp":now() + 600}), SECRET.as_bytes());
        let (status, body) = refused(&node.ws_url(&t), &[]).await;
        assert_eq!(status, 403, "{sub:?}: {body}");
        assert_eq!(body["error"], "user_id", "{sub:?}: {body}");
    }
    assert!(nats.live_subscriptions().await.is_empty(), "no subscription was made");
    // Events of a user called "a" do not reach anybody else through tricks.
    let (mut a, _) = Client::join(&node, "a").await;
    let js = async_nats::jetstream::new(nats.client().await);
    let s = publish(&js, "a", r#"{"x":1}"#).await;
    assert_eq!(a.events(1).await, vec![(s, json!({"x":1}))]);
}

#[tokio::test]
async fn origins_outside_the_allowed_list_get_403() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--allowed-origins", "https://app.example.com,https://admin.example.com"]).await;
    let url = node.ws_url(&token("u1"));
    let (status, body) = refused(&url, &[("origin", "https://evil.example.com")]).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("origin")), "{body}");
    for ok in ["https://app.example.com", "https://ADMIN.example.com"] {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).unwrap();
        req.headers_mut().insert("origin", ok.parse().unwrap());
        assert!(tokio_tungstenite::connect_async(req).await.is_ok(), "{ok}");
    }
    // Non-browser clients send no Origin and are allowed.
    let _ = Client::join(&node, "u1").await;
    assert_eq!(node.metric("agentcast_connections_refused_total", r#"reason="origin""#).await, 1.0);
}

/// A header that is there but empty or not `Bearer <token>` is refused, not
/// passed over for a good `?token=`; a token header with `crit` is refused
/// (RFC 7515: this node understands no extension); `iss` must be one string.
#[tokio::test]
async fn malformed_authorization_crit_headers_and_issuer_lists_are_refused() {
    let nats = NatsServer::start();
    let node = Node::start(&nats, &["--jwt-issuer", "idp"]).await;
    let exp = now() + 600;
    let good = hs256(json!({"sub":"u1","exp":exp,"iss":"idp"}), SECRET.as_bytes());
    let url = node.ws_url(&good);
    for header in ["Bearer", "Bearer ", "Bearer    ", "Basic dTE6cGFzcw==", "bearer-token", "Token abc"] {
        let (status, body) = refused(&url, &[("authorization", header)]).await;
        assert_eq!((status, body["error"].as_str()), (401, Some("malformed")), "{header:?}: {body}");
    }
    // `crit` naming an extension, even in an otherwise valid token.
    let header = B64.encode(r#"{"alg":"HS256","typ":"JWT","crit":["b64"],"b64":true}"#);
    let claims = B64.encode(json!({"sub":"u1","exp":exp,"iss":"idp"}).to_string());
    let input = format!("{header}.{claims}");
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
    let (status, body) = refused(&node.ws_url(&format!("{input}.{sig}")), &[]).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("crit")), "{body}");
    // `iss` as a list that holds the configured issuer.
    let listed = hs256(json!({"sub":"u1","exp":exp,"iss":["idp","other"]}), SECRET.as_bytes());
    let (status, body) = refused(&node.ws_url(&listed), &[]).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("malformed")), "{body}");
    // The good token in a well-formed header, or in the query alone, opens a socket.
    let (_c, w) = Client::join_url(&url).await;
    assert_eq!(w["user"], "u1");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/ws",
        node.addr
    ))
    .unwrap();
    req.headers_mut().insert("authorization", format!("bearer {good}").parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok(), "scheme matched case-insensitively");
}
