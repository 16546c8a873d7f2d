//! The live console: a page that shows one user's stream as the browser
//! client sees it (connection state, node, position, events grouped by run,
//! gaps). Served at `/console/` when `--console` is set.
//!
//! The files are embedded in the binary with `include_str!`, so there is no
//! build step and nothing to deploy beside the binary. The page's client is
//! `clients/js/agentcast.js` itself, embedded from its one copy, so the
//! console always runs the client this node ships with.
//!
//! The page takes its token from the URL fragment (`#token=...`), which
//! browsers never send to the server, so the token stays out of access logs.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/console.js");
const CONSOLE_CSS: &str = include_str!("../console/console.css");
const CLIENT_JS: &str = include_str!("../clients/js/agentcast.js");

/// Longest `Host` header copied into the page's `connect-src`. Host names
/// are at most 253 characters, plus `:` and a 5-digit port and IPv6
/// brackets; anything longer is not a host this node serves.
const MAX_HOST_LEN: usize = 263;

/// The console's routes, to be merged into the node's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/console", get(|| async { Redirect::permanent("/console/") }))
        .route("/console/", get(index))
        .route("/console/index.html", get(index))
        .route("/console/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
        .route("/console/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
        .route("/console/agentcast.js", get(|| async { asset("text/javascript; charset=utf-8", CLIENT_JS) }))
}

/// A static file. `no-cache` makes the browser revalidate, so a node
/// upgraded behind the same address serves its own page and client.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn index(req: Request) -> Response {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).filter(|h| plain_host(h));
    let Ok(csp) = HeaderValue::from_str(&content_security_policy(host)) else {
        // Unreachable with a host that passed `plain_host`; refuse rather
        // than serve the page without its policy.
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut res = asset("text/html; charset=utf-8", INDEX_HTML);
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

/// The page's policy: its own scripts and styles only, no inline code, and
/// sockets only to this node. CSP3's `'self'` covers `ws:`/`wss:` to the
/// same host, but older browsers do not apply it to sockets, so the host the
/// page was loaded from is listed too when it is a plain host name.
pub fn content_security_policy(host: Option<&str>) -> String {
    let sockets = host.map(|h| format!(" ws://{h} wss://{h}")).unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// A `Host` header safe to copy into a policy: a name or address and a
/// port, nothing that could end a directive or add a source.
fn plain_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HOST_LEN
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_lists_a_plain_host_and_nothing_else() {
        assert!(plain_host("127.0.0.1:8080"));
        assert!(plain_host("[::1]:8080"));
        assert!(plain_host("agentcast.example.com"));
        assert!(!plain_host("a.com; script-src *"));
        assert!(!plain_host("a.com *"));
        assert!(!plain_host(""));
        assert!(!plain_host(&"a".repeat(MAX_HOST_LEN + 1)));
        let csp = content_security_policy(Some("127.0.0.1:8080"));
        assert!(csp.contains("connect-src 'self' ws://127.0.0.1:8080 wss://127.0.0.1:8080;"));
        assert!(csp.contains("script-src 'self';"));
        assert!(content_security_policy(None).contains("connect-src 'self';"));
    }
}
