//! The `agentcast-sse` target's client: `GET /sse` over HTTP/1.1, the
//! chunked body decoded and the event stream parsed as an EventSource parses
//! it (events end at a blank line, `data:` lines joined with `\n`, lines
//! starting with `:` are comments). Errors are returned, never panics: one
//! bad stream is counted by the worker, not the end of the run.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Read buffer per stream: as the WebSocket clients' (`CLIENT_READ_BUFFER`),
/// so the workers hold as many streams as sockets.
const READ_BUFFER: usize = 4 * 1024;

/// Longest chunk accepted: an event frame is at most the node's largest
/// event (256 KiB by default) plus its envelope.
const MAX_CHUNK: usize = 1024 * 1024;

/// One event of the stream.
#[derive(Debug, Default)]
pub struct Event {
    pub event: String,
    pub data: String,
}

pub struct Stream {
    reader: BufReader<TcpStream>,
    /// The decoded body not yet parsed into events (bytes: a chunk may end
    /// inside a character).
    body: Vec<u8>,
}

impl Stream {
    /// Sends the request on `tcp` and reads the response head; anything but
    /// 200 is an error.
    pub async fn open(mut tcp: TcpStream, addr: SocketAddr, token: &str) -> Result<Stream, String> {
        let req = format!("GET /sse?token={token} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.map_err(|e| format!("request: {e}"))?;
        let mut reader = BufReader::with_capacity(READ_BUFFER, tcp);
        let mut line = String::new();
        reader.read_line(&mut line).await.map_err(|e| format!("status line: {e}"))?;
        if line.split_whitespace().nth(1) != Some("200") {
            return Err(format!("status: {}", line.trim_end()));
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).await.map_err(|e| format!("headers: {e}"))? == 0 {
                return Err("the response ended in its headers".into());
            }
            if line.trim_end().is_empty() {
                return Ok(Stream { reader, body: Vec::new() });
            }
        }
    }

    /// The next event; `None` once the response has ended.
    pub async fn next(&mut self) -> Result<Option<Event>, String> {
        loop {
            if let Some(end) = self.body.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.body.drain(..end + 2).collect();
                let block = std::str::from_utf8(&block).map_err(|_| "an event is not UTF-8".to_string())?;
                let mut ev = Event::default();
                let mut data: Vec<&str> = Vec::new();
                for line in block.lines() {
                    if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value);
                        match field {
                            "event" => value.clone_into(&mut ev.event),
                            "data" => data.push(value),
                            _ => {}
                        }
                    }
                }
                ev.data = data.join("\n");
                if !ev.data.is_empty() {
                    return Ok(Some(ev));
                }
                continue;
            }
            if !self.chunk().await? {
                return Ok(None);
            }
        }
    }

    /// Reads one chunk of the body into `body`; false at its end.
    async fn chunk(&mut self) -> Result<bool, String> {
        let mut size = String::new();
        if self.reader.read_line(&mut size).await.map_err(|e| format!("chunk size: {e}"))? == 0 {
            return Ok(false);
        }
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| format!("chunk size {size:?}"))?;
        if n > MAX_CHUNK {
            return Err(format!("chunk of {n} bytes"));
        }
        let mut buf = vec![0; n + 2];
        self.reader.read_exact(&mut buf).await.map_err(|e| format!("chunk: {e}"))?;
        if n == 0 {
            return Ok(false);
        }
        self.body.extend_from_slice(&buf[..n]);
        Ok(true)
    }
}
