//! A nats-server that checks credentials (operator mode): an operator signs
//! the accounts, an account signs its users, and a user proves its nkey by
//! signing the nonce the server sends. The node logs in with
//! `--nats-creds` on both its connections (its own live connection,
//! src/live.rs, and async-nats for JetStream), and a credentials file whose
//! seed is not the user's is refused with a clear error.

mod common;

use std::path::Path;

use base64::Engine;
use common::*;
use serde_json::{Value, json};

/// A JWT of nats-io/jwt v2: `claims` (`nats`) about `subject`, signed by
/// `issuer`'s nkey.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // The server checks the signature, not the id: unique is enough.
    let jti = format!("{:016X}{:016X}", rand::random::<u64>(), rand::random::<u64>());
    let claims =
        json!({"jti": jti, "iat": iat, "iss": issuer.public_key(), "name": name, "sub": subject, "nats": nats});
    let signed = format!("{header}.{}", b64.encode(claims.to_string()));
    let signature = issuer.sign(signed.as_bytes()).expect("sign the JWT");
    format!("{signed}.{}", b64.encode(signature))
}

/// An account's JWT, with JetStream when `jetstream`.
fn account(operator: &nkeys::KeyPair, account: &nkeys::KeyPair, name: &str, jetstream: bool) -> String {
    let storage = if jetstream { -1 } else { 0 };
    let limits = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": storage, "disk_storage": storage, "streams": storage,
        "consumer": storage});
    jwt(operator, &account.public_key(), name, json!({"type": "account", "version": 2, "limits": limits}))
}

/// A credentials file for `user` (its JWT signed by `account`), with `seed`
/// as its nkey seed.
fn creds(dir: &Path, file: &str, account: &nkeys::KeyPair, user: &nkeys::KeyPair, seed: &str) -> String {
    let claims = json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1});
    let user_jwt = jwt(account, &user.public_key(), "node", claims);
    let path = dir.join(file);
    write_creds(&path, &user_jwt, seed);
    path.display().to_string()
}

#[tokio::test]
async fn a_node_logs_in_with_a_credentials_file_to_a_server_that_checks_jwts() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let (system, app) = (nkeys::KeyPair::new_account(), nkeys::KeyPair::new_account());
    let operator_jwt = jwt(&operator, &operator.public_key(), "test", json!({"type": "operator", "version": 2}));
    let operator_file = dir.path().join("operator.jwt");
    std::fs::write(&operator_file, operator_jwt).unwrap();
    let config = dir.path().join("server.conf");
    std::fs::write(
        &config,
        format!(
            "operator: \"{}\"\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {sys}: \"{}\"\n  {app_key}: \"{}\"\n}}\n",
            operator_file.display(),
            account(&operator, &system, "SYS", false),
            account(&operator, &app, "APP", true),
            sys = system.public_key(),
            app_key = app.public_key(),
        ),
    )
    .unwrap();
    let nats = NatsServer::start_with(&["-c", config.to_str().unwrap()]);

    let user = nkeys::KeyPair::new_user();
    let good = creds(dir.path(), "node.creds", &app, &user, &user.seed().unwrap());
    let node = Node::start(&nats, &["--nats-creds", &good]).await;
    let (mut socket, _) = Client::join(&node, "u1").await;
    let tool = |args: &[&str], creds: &str| {
        let mut args = args.to_vec();
        args.extend(["--nats-url", &nats.url, "--nats-creds", creds]);
        run_tool(&args)
    };
    let out = tool(&["publish", "--user", "u1", "--type", "agent_started"], &good);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // Through the live connection: the only way an event reaches a socket.
    let got = socket.events(1).await;
    assert_eq!(got[0].1["type"], "agent_started");

    // The user's JWT with another key's seed: the nonce's signature does
    // not match, and the server refuses the login.
    let other = nkeys::KeyPair::new_user();
    let bad = creds(dir.path(), "wrong-seed.creds", &app, &user, &other.seed().unwrap());
    let out = tool(&["stream", "--user", "u1"], &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect to NATS at"), "{stderr}");
    assert!(stderr.contains("authorization violation"), "{stderr}");
}
