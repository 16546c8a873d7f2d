//! A Server-Sent Events client for the tests: HTTP/1.1 over a TCP stream,
//! the chunked body decoded, and the `text/event-stream` format parsed as a
//! browser's EventSource parses it (events end at a blank line; `data:`
//! lines are joined with `\n`; lines starting with `:` are comments).

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::RECV_TIMEOUT;

#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }
}

pub struct SseClient {
    reader: BufReader<TcpStream>,
    pub status: u16,
    /// Response headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The decoded body not yet parsed into events.
    text: String,
    ended: bool,
    /// Comment lines seen (keepalives).
    pub comments: usize,
}

impl SseClient {
    /// `GET path` (with its query) on `addr`, with extra request headers.
    pub async fn open(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await.expect("write request");
        let mut reader = BufReader::new(tcp);
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("status line");
        let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut got = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).await.expect("header line");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                got.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        Self { reader, status, headers: got, text: String::new(), ended: false, comments: 0 }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The whole body of a response that is not a stream (a refusal).
    pub async fn body(mut self) -> String {
        if let Some(n) = self.header("content-length").and_then(|n| n.parse::<usize>().ok()) {
            let mut buf = vec![0; n];
            self.reader.read_exact(&mut buf).await.expect("body");
            return String::from_utf8_lossy(&buf).into_owned();
        }
        while self.chunk(RECV_TIMEOUT).await {}
        std::mem::take(&mut self.text)
    }

    /// Reads one chunk of the body into `text`; false at its end.
    async fn chunk(&mut self, wait: Duration) -> bool {
        if self.ended {
            return false;
        }
        let mut size = String::new();
        match tokio::time::timeout(wait, self.reader.read_line(&mut size)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.ended = true;
                return false;
            }
            Ok(Ok(_)) => {}
            Err(_) => panic!("no SSE data within {wait:?}; so far: {:?}", self.text),
        }
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("chunk size {size:?}"));
        let mut buf = vec![0; n + 2];
        self.reader.read_exact(&mut buf).await.expect("chunk");
        if n == 0 {
            self.ended = true;
            return false;
        }
        self.text.push_str(std::str::from_utf8(&buf[..n]).expect("UTF-8 body"));
        true
    }

    /// The next event; `None` once the response has ended. Panics when
    /// nothing arrives within the test timeout.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                let mut data: Vec<&str> = Vec::new();
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value);
                        match field {
                            "event" => ev.event = value.to_owned(),
                            "id" => ev.id = Some(value.to_owned()),
                            "data" => data.push(value),
                            _ => {}
                        }
                    }
                }
                if !data.is_empty() {
                    ev.data = data.join("\n");
                    return Some(ev);
                }
            }
            if !self.chunk(RECV_TIMEOUT).await {
                return None;
            }
        }
    }

    /// The next event that is not `skip` (by its `event:` name).
    pub async fn next_except(&mut self, skip: &[&str]) -> Option<SseEvent> {
        loop {
            let ev = self.next().await?;
            if !skip.contains(&ev.event.as_str()) {
                return Some(ev);
            }
        }
    }
}

/// `POST path` with a body on a new connection: the status and the body.
pub async fn post(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tcp.write_all(req.as_bytes()).await.expect("write request");
    let mut out = Vec::new();
    tokio::time::timeout(RECV_TIMEOUT, tcp.read_to_end(&mut out)).await.expect("answer in time").expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}
