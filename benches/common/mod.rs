//! What both benchmark targets need to watch the processes they start:
//! their resident memory, and a node's HTTP endpoints.

use std::net::SocketAddr;

/// Resident memory of a process, in KiB (0 once it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The whole HTTP/1.0 response to a GET, or nothing if the node is not there.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return String::new() };
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf).await;
    buf
}

/// The status code of a GET, 0 if there was no answer.
pub async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    http_get(addr, path).await.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}
