//! The JavaScript client's own tests (clients/js/test, node's test runner)
//! against real nats-server and agentcast processes: this binary and the
//! nats-server under test. `node` must be installed; a missing node fails.

mod common;

use std::process::Command;

/// Node 20 has a WebSocket only behind this flag; it is passed only to a node
/// without a global WebSocket, so a later node that drops the flag still runs.
const NODE_WEBSOCKET_FLAG: &str = "--experimental-websocket";
/// Per-test limit inside node, so a hung test fails instead of blocking.
const NODE_TEST_TIMEOUT: &str = "--test-timeout=60000";

#[test]
fn the_javascript_client_passes_its_tests_against_real_nodes() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js");
    let nats = common::nats_server_bin();
    let has_websocket = Command::new("node")
        .args(["-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run node (Node.js 20+ is needed for the JavaScript client's tests): {e}"))
        .success();
    let mut args = vec!["--test", NODE_TEST_TIMEOUT, "test/"];
    if !has_websocket {
        args.insert(0, NODE_WEBSOCKET_FLAG);
    }
    let out = Command::new("node")
        .args(&args)
        .current_dir(dir)
        .env("AGENTCAST_BIN", env!("CARGO_BIN_EXE_agentcast"))
        .env("AGENTCAST_TEST_NATS_SERVER", &nats)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node (Node.js 20+ is needed for the JavaScript client's tests): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the JavaScript client's tests failed against {}:\n{stdout}\n{stderr}",
        nats.display()
    );
    // Node exits 0 when it finds no tests: insist that they ran.
    assert!(stdout.contains("# pass ") && !stdout.contains("# pass 0\n"), "no JavaScript tests ran:\n{stdout}");
}
