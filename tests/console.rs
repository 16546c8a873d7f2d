//! The console page (src/console.rs, console/): off unless `--console`,
//! served with its content types and policy when on, and, end to end in
//! headless Chromium driven by playwright-core, against real nats-server and
//! agentcast processes (console/test). Chromium (Debian's `chromium`, at
//! /usr/bin/chromium or $AGENTCAST_TEST_CHROMIUM) and playwright-core (`npm
//! ci` in console/) must be installed: their absence fails, it does not skip.

mod common;

use std::path::Path;
use std::process::Command;

use common::{NatsServer, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Per-test limit inside node, so a hung browser test fails instead of
/// blocking. A takeover waits out up to a 5 s backoff and a node start; the
/// demo run test waits for up to two demo runs (5 s apart).
const NODE_TEST_TIMEOUT: &str = "--test-timeout=120000";

/// A GET over HTTP/1.0: status, headers (names lower-cased) and body.
async fn get(node: &Node, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = tokio::net::TcpStream::connect(node.addr).await.expect("connect to the node");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", node.addr).as_bytes()).await.expect("send");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read the answer");
    let (head, body) = buf.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("")
}

#[tokio::test]
async fn the_console_is_off_by_default_and_served_with_its_types_and_policy_when_on() {
    let nats = NatsServer::start();
    let off = Node::start(&nats, &[]).await;
    for path in ["/console", "/console/", "/console/console.js", "/console/agentcast.js"] {
        assert_eq!(get(&off, path).await.0, 404, "{path} without --console");
    }

    let on = Node::start(&nats, &["--console"]).await;
    let (status, headers, _) = get(&on, "/console").await;
    assert_eq!(status, 308);
    assert_eq!(header(&headers, "location"), "/console/");

    let (status, headers, body_html) = get(&on, "/console/").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    assert_eq!(body_html, include_str!("../console/index.html"));
    let csp = header(&headers, "content-security-policy");
    let host = on.addr.to_string();
    assert_eq!(csp, agentcast::console::content_security_policy(Some(&host)));
    assert!(csp.contains("script-src 'self';") && csp.contains("default-src 'none';"), "{csp}");
    assert!(csp.contains(&format!("connect-src 'self' ws://{host} wss://{host};")), "{csp}");
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    assert_eq!(header(&headers, "referrer-policy"), "no-referrer");

    for (path, content_type, file) in [
        ("/console/console.js", "text/javascript; charset=utf-8", include_str!("../console/console.js")),
        ("/console/console.css", "text/css; charset=utf-8", include_str!("../console/console.css")),
        // The client itself, from its one copy.
        ("/console/agentcast.js", "text/javascript; charset=utf-8", include_str!("../clients/js/agentcast.js")),
    ] {
        let (status, headers, body) = get(&on, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), content_type, "{path}");
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff", "{path}");
        assert_eq!(body, file, "{path}");
    }
    // The page references nothing outside the node.
    for text in [include_str!("../console/index.html"), include_str!("../console/console.js")] {
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "an external resource"
        );
    }
    // The rest of the node is unchanged.
    assert_eq!(get(&on, "/healthz").await.0, 200);
    assert_eq!(get(&on, "/console/nothing").await.0, 404);
}

#[test]
fn the_console_works_end_to_end_in_headless_chromium() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/console");
    let chromium = std::env::var("AGENTCAST_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).is_file(),
        "no Chromium at {chromium}: install Debian's chromium (apt-get install -y chromium) or set AGENTCAST_TEST_CHROMIUM"
    );
    assert!(
        Path::new(dir).join("node_modules/playwright-core/package.json").is_file(),
        "playwright-core is not installed: run `npm ci` in console/"
    );
    let nats = common::nats_server_bin();
    let out = Command::new("node")
        .args(["--test", NODE_TEST_TIMEOUT, "test/"])
        .current_dir(dir)
        .env("AGENTCAST_BIN", env!("CARGO_BIN_EXE_agentcast"))
        .env("AGENTCAST_TEST_NATS_SERVER", &nats)
        .env("AGENTCAST_TEST_CHROMIUM", &chromium)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node (Node.js 20+ is needed for the console's tests): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the console's browser tests failed against {}:\n{stdout}\n{stderr}", nats.display());
    // Node exits 0 when it finds no tests: insist that they ran.
    assert!(stdout.contains("# pass ") && !stdout.contains("# pass 0\n"), "no console tests ran:\n{stdout}");
    assert!(stdout.contains("# fail 0\n"), "{stdout}");
}
