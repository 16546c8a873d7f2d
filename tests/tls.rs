//! TLS to NATS: a node and the tools reach a nats-server that requires TLS
//! with `--nats-tls-ca`, and without it they fail with a clear error.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// A certificate for 127.0.0.1 and its key, written as PEM into `dir`;
/// self-signed, so it is also the CA file clients are given.
fn write_certificate(dir: &Path) -> (String, String) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server-key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    (cert_path.display().to_string(), key_path.display().to_string())
}

fn agentcast(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentcast"))
        .args(args)
        .env_remove("AGENTCAST_JWT_SECRET")
        .env_remove("AGENTCAST_NATS_URL")
        .output()
        .expect("run agentcast")
}

#[tokio::test]
async fn node_and_tools_reach_a_tls_only_nats_server_with_the_ca_and_fail_clearly_without() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_certificate(dir.path());
    let nats = NatsServer::start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key]);

    // The node: ready over TLS, and events published over TLS reach a socket.
    let node = Node::start(&nats, &["--nats-tls-ca", &cert]).await;
    let (mut client, _) = Client::join(&node, "u1").await;
    let publish = |ca: Option<&str>| {
        let mut args = vec!["publish", "--nats-url", &nats.url, "--user", "u1", "--type", "agent_started"];
        args.extend(ca.map(|c| ["--nats-tls-ca", c]).into_iter().flatten());
        agentcast(&args)
    };
    let out = publish(Some(&cert));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let got = client.events(1).await;
    assert_eq!(got[0].1["type"], "agent_started");

    // The other tools take the same flags.
    let out = agentcast(&["stream", "--nats-url", &nats.url, "--nats-tls-ca", &cert, "--user", "u1"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["user"]["last_seq"], 1, "{v}");

    // Without the CA the server's certificate is not trusted: a runtime
    // failure (exit 1) that names the server.
    let out = publish(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect to NATS at"), "{stderr}");
    // A CA file that does not exist is a usage error (exit 64).
    let out = publish(Some("/nonexistent-ca.pem"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--nats-tls-ca"), "{stderr}");
}
