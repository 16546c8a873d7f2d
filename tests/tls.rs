//! TLS to NATS: a node and the tools reach a nats-server that requires TLS
//! with `--nats-tls-ca`, and without it they fail with a clear error.

mod common;

use std::path::Path;

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
        run_tool(&args)
    };
    let out = publish(Some(&cert));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let got = client.events(1).await;
    assert_eq!(got[0].1["type"], "agent_started");

    // The other tools take the same flags.
    let out = run_tool(&["stream", "--nats-url", &nats.url, "--nats-tls-ca", &cert, "--user", "u1"]);
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

/// A CA, a server certificate for 127.0.0.1 and a client certificate, both
/// signed by the CA, written as PEM into `dir`: (ca, server cert, server
/// key, client cert, client key).
fn write_mutual_tls(dir: &Path) -> [String; 5] {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = Issuer::new(ca_params, ca_key);
    let signed = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, &ca).unwrap(), key)
    };
    let (server, server_key) = signed(vec!["127.0.0.1".to_owned()], ExtendedKeyUsagePurpose::ServerAuth);
    let (client, client_key) = signed(vec!["agentcast-node".to_owned()], ExtendedKeyUsagePurpose::ClientAuth);
    let files = [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server.pem()),
        ("server-key.pem", server_key.serialize_pem()),
        ("client.pem", client.pem()),
        ("client-key.pem", client_key.serialize_pem()),
    ];
    files.map(|(name, pem)| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    })
}

/// The live connection (src/live.rs) presents the client certificate too:
/// the event reaches the socket only through it.
#[tokio::test]
async fn node_and_tools_reach_a_server_that_verifies_client_certificates_and_fail_clearly_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, server, server_key, client, client_key] = write_mutual_tls(dir.path());
    let nats =
        NatsServer::start_with(&["--tlsverify", "--tlscert", &server, "--tlskey", &server_key, "--tlscacert", &ca]);
    let tls = ["--nats-tls-ca", ca.as_str(), "--nats-tls-cert", client.as_str(), "--nats-tls-key", client_key.as_str()];

    let node = Node::start(&nats, &tls).await;
    let (mut socket, _) = Client::join(&node, "u1").await;
    let publish = |tls: &[&str]| {
        let mut args = vec!["publish", "--nats-url", &nats.url, "--user", "u1", "--type", "agent_started"];
        args.extend(tls);
        run_tool(&args)
    };
    let out = publish(&tls);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let got = socket.events(1).await;
    assert_eq!(got[0].1["type"], "agent_started");

    // The CA alone is not enough: the server refuses a client without a
    // certificate, a runtime failure (exit 1) that names the server.
    let out = publish(&tls[..2]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect to NATS at"), "{stderr}");
}
