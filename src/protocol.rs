//! The socket protocol: frames, close codes and the checks on what crosses it.
//! docs/protocol.md is the reference for clients; keep the two in step.

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};

/// WebSocket close codes the node sends, and what a client should do.
pub mod close {
    /// A binary frame: the protocol is JSON text only. Do not retry as is.
    pub const UNSUPPORTED: u16 = 1003;
    /// A frame that breaks RFC 6455 (reserved bits or opcodes, unmasked,
    /// fragmented or oversized control frames). Do not retry as is.
    pub const PROTOCOL: u16 = 1002;
    /// A text frame, or a close frame's reason, that is not valid UTF-8.
    /// Do not retry as is.
    pub const NOT_UTF8: u16 = 1007;
    /// A client frame over [`super::MAX_CLIENT_FRAME`]. Do not retry as is.
    pub const TOO_BIG: u16 = 1009;
    /// Unexpected server error. Reconnect with backoff and resume.
    pub const INTERNAL: u16 = 1011;
    /// The node is draining (restart, deploy, scale-in). Reconnect now, to
    /// any node, and resume from the last `seq`.
    pub const DRAIN: u16 = 1012;
    /// The client fell behind its outbound queue bound. Reconnect and resume
    /// from the last `seq`; the missed events are replayed.
    pub const SLOW: u16 = 4000;
    /// The token's `exp` has passed. Reconnect with a fresh token and resume.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// No frame or pong from the client within the ping timeout.
    pub const PING_TIMEOUT: u16 = 4002;
    /// The stream was deleted and created again. Reconnect and resume with
    /// the last `seq` and `epoch`: the node answers with a `stream_reset` gap.
    pub const STREAM_RESET: u16 = 4003;
    /// `resume=frame` was asked for but no `resume` frame came first.
    pub const POLICY: u16 = 1008;
}

/// Largest frame a client may send, in bytes; anything bigger is a bug or
/// an attack and closes the socket with [`close::TOO_BIG`]. Also bounds
/// tungstenite's read buffer. Sized for `control` frames
/// ([`crate::control`]), the only big ones: an answer to an agent typed or
/// pasted by a person (a few paragraphs, or 5,000 characters of CJK text at
/// 3 bytes each) fits, where 4 KiB (the limit before control requests)
/// held 1,300 CJK characters. The read buffer grows to it only on a socket
/// that sends such a frame; the others keep [`crate::socket::READ_BUFFER`].
pub const MAX_CLIENT_FRAME: usize = 16 * 1024;

/// Largest sequence that crosses the socket, in either direction: 2^53 - 1,
/// the largest integer a JSON number holds exactly in JavaScript
/// (`Number.MAX_SAFE_INTEGER`). A browser would round anything larger and
/// resume from a position the node never sent. A client `last_seq` above it
/// is refused; a stream would need 2^53 messages to stamp one.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// Why a client's resume position is refused, for the `400` body and the
/// `1008` close reason (at most 123 bytes).
pub const BAD_POSITION: &str = "last_seq must be an integer from 0 to 9007199254740991 (2^53-1)";

/// Parses a client's `last_seq` (query or `resume` frame): decimal digits,
/// at most [`MAX_SEQ`].
pub fn parse_position(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&n| n <= MAX_SEQ)
}

/// Control frames from server to client. Events are built by [`event_frame`]
/// without going through serde so the payload is copied byte for byte.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame on every socket.
    Welcome {
        node: &'a str,
        user: &'a str,
        /// How far the user's history is accounted for: the user's newest
        /// event, or a horizon, or the end of a gap
        /// ([`crate::resume::Position`]).
        position: u64,
        /// Identifies the stream; changes when it is recreated.
        epoch: &'a str,
        /// The token's `exp` (Unix seconds): refresh before it
        /// (docs/protocol.md section 4), or the socket closes with 4001.
        exp: u64,
    },
    /// Events in `from..=to` may be missing; see docs/protocol.md.
    Gap {
        reason: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<u64>,
        /// The user's oldest event still stored, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        earliest: Option<u64>,
    },
    /// The node is going away; reconnect (to any node) and resume.
    Reconnect { reason: &'a str },
    /// Something the client sent was not understood; the socket stays open.
    Error { code: &'a str, message: &'a str },
    /// Answer to a client `ping` frame.
    Pong,
    /// A `refresh` frame's token was taken: the socket now closes at its
    /// `exp` (Unix seconds).
    Refreshed { exp: u64 },
    /// An agent's reply to a client's `control` frame ([`crate::control`]),
    /// embedded as the agent sent it.
    ControlReply { id: &'a str, data: &'a serde_json::value::RawValue },
    /// Why a `control` frame got no reply; `code` is a
    /// [`crate::control::Outcome`] label, `message` set for `bad_frame`.
    ControlError {
        id: &'a str,
        code: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<&'a str>,
    },
}

impl ServerFrame<'_> {
    pub fn to_text(&self) -> Utf8Bytes {
        // Serialising these plain structs cannot fail.
        Utf8Bytes::from(serde_json::to_string(self).unwrap_or_default())
    }
}

/// Frames a client may send.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Application-level keepalive for clients that cannot send WebSocket
    /// pings (browsers); answered with `pong`.
    Ping,
    /// In-band resume, the first frame of a socket opened with `resume=frame`.
    Resume {
        /// Up to [`MAX_SEQ`]; a larger number (or one serde cannot hold in a
        /// u64) fails the parse with [`BAD_POSITION`].
        #[serde(default, deserialize_with = "position")]
        last_seq: Option<u64>,
        #[serde(default)]
        epoch: Option<String>,
    },
    /// A fresh token for the socket's user: the socket then closes at its
    /// `exp` instead of the first token's.
    Refresh { token: String },
}

/// A `last_seq` in a frame: `null`, or an integer up to [`MAX_SEQ`].
fn position<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => parse_position(&n.to_string()).map(Some).ok_or_else(|| serde::de::Error::custom(BAD_POSITION)),
    }
}

/// Why a publisher payload was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadError {
    NotUtf8,
    NotJson,
    NotObject,
}

impl PayloadError {
    pub fn reason(self) -> &'static str {
        match self {
            PayloadError::NotUtf8 => "not_utf8",
            PayloadError::NotJson => "not_json",
            PayloadError::NotObject => "not_object",
        }
    }
}

/// Builds `{"type":"event","seq":N,"event":<payload>}` once per event; every
/// socket of the user then shares the same bytes. The payload must be a JSON
/// object and is embedded exactly as published.
pub fn event_frame(seq: u64, payload: &[u8]) -> Result<Utf8Bytes, PayloadError> {
    event_frame_timed(seq, payload).map(|f| f.text)
}

/// The envelope fields the node reads, in the one pass that checks the
/// payload is JSON, so they cost no second parse: the publisher's
/// `timestamp`, used only for the delivery latency metric, and what makes a
/// delta event (`type`, `message_id`, `delta`), used only to merge
/// ([`crate::merge`]). Kept raw: nothing is decoded unless needed.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    timestamp: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    message_id: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    delta: Option<&'a serde_json::value::RawValue>,
}

/// An event's frame and what the one parse found in its envelope.
#[derive(Debug, PartialEq)]
pub struct Framed<'a> {
    pub text: Utf8Bytes,
    /// The envelope's `timestamp` when it is a plain JSON string (no
    /// escapes); parsing it as a time is left to the caller.
    pub timestamp: Option<&'a str>,
    /// Where its delta fields lie in `text`, when it is a delta event.
    pub delta: Option<Delta>,
}

/// How every event frame begins, merged or not: its `seq` follows.
pub const EVENT_HEAD: &str = r#"{"type":"event","seq":"#;
const MID: &str = r#","event":"#;

/// Where the event object starts in the frame of event `seq`.
fn payload_offset(seq: u64) -> usize {
    EVENT_HEAD.len() + itoa::Buffer::new().format(seq).len() + MID.len()
}

/// [`event_frame`], plus the envelope's `timestamp` and delta fields.
pub fn event_frame_timed(seq: u64, payload: &[u8]) -> Result<Framed<'_>, PayloadError> {
    let text = std::str::from_utf8(payload).map_err(|_| PayloadError::NotUtf8)?;
    if !text.trim_start().starts_with('{') {
        // Catches non-JSON too, but report it precisely.
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => PayloadError::NotObject,
            Err(_) => PayloadError::NotJson,
        });
    }
    let (timestamp, delta) = match serde_json::from_str::<Envelope>(text) {
        Ok(env) => (
            env.timestamp.and_then(|raw| plain_string(raw.get())),
            Delta::find(text, payload_offset(seq), env.kind, env.message_id, env.delta),
        ),
        // Valid JSON the struct refuses (a repeated `timestamp` key) is
        // still forwarded, untimed and unmerged.
        Err(_) => {
            serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|_| PayloadError::NotJson)?;
            (None, None)
        }
    };
    let mut out = String::with_capacity(EVENT_HEAD.len() + 20 + MID.len() + text.len() + 1);
    out.push_str(EVENT_HEAD);
    out.push_str(itoa::Buffer::new().format(seq));
    out.push_str(MID);
    out.push_str(text);
    out.push('}');
    Ok(Framed { text: Utf8Bytes::from(out), timestamp, delta })
}

/// Longest `message_id` of a delta event, in characters.
pub const MAX_MESSAGE_ID_CHARS: usize = 128;

/// Where a delta event's fields lie in its frame's text, as byte ranges of
/// their raw JSON values (string literals with their quotes). Found once per
/// event, at delivery; 28 bytes, shared by every socket of the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    /// The `type` value, any JSON; `None` when the event has none.
    kind: Option<(u32, u32)>,
    message_id: (u32, u32),
    delta: (u32, u32),
}

impl Delta {
    /// A delta event has a top-level string `message_id` of 1 to
    /// [`MAX_MESSAGE_ID_CHARS`] characters and a top-level string `delta`.
    /// The raw values are slices of `payload`, which starts at `offset` in
    /// the frame.
    fn find(
        payload: &str,
        offset: usize,
        kind: Option<&serde_json::value::RawValue>,
        message_id: Option<&serde_json::value::RawValue>,
        delta: Option<&serde_json::value::RawValue>,
    ) -> Option<Delta> {
        let (message_id, delta) = (message_id?.get(), delta?.get());
        if !delta.starts_with('"') || !message_id.starts_with('"') {
            return None;
        }
        let inner = &message_id[1..message_id.len() - 1];
        let chars = if inner.contains('\\') {
            serde_json::from_str::<String>(message_id).ok()?.chars().count()
        } else {
            inner.chars().count()
        };
        if !(1..=MAX_MESSAGE_ID_CHARS).contains(&chars) {
            return None;
        }
        let range = |raw: &str| -> Option<(u32, u32)> {
            // The raw value borrows from `payload`: its place is its address
            // less the payload's, checked to be that slice.
            let at = (raw.as_ptr() as usize).checked_sub(payload.as_ptr() as usize)?;
            (payload.get(at..at + raw.len()) == Some(raw)).then_some(())?;
            Some((u32::try_from(offset + at).ok()?, u32::try_from(offset + at + raw.len()).ok()?))
        };
        Some(Delta {
            kind: match kind {
                Some(k) => Some(range(k.get())?),
                None => None,
            },
            message_id: range(message_id)?,
            delta: range(delta)?,
        })
    }

    /// The raw `type` value in `frame`, if any.
    pub fn kind<'f>(&self, frame: &'f str) -> Option<&'f str> {
        self.kind.and_then(|(a, b)| frame.get(a as usize..b as usize))
    }

    /// The raw `message_id` literal in `frame`, quotes included.
    pub fn message_id<'f>(&self, frame: &'f str) -> &'f str {
        frame.get(self.message_id.0 as usize..self.message_id.1 as usize).unwrap_or_default()
    }

    /// Where the delta's contents (between its quotes, escapes kept) lie in
    /// the frame.
    pub fn text_range(&self) -> std::ops::Range<usize> {
        self.delta.0 as usize + 1..self.delta.1 as usize - 1
    }

    /// Where the event object starts in the frame of event `seq`.
    pub fn payload_offset(seq: u64) -> usize {
        payload_offset(seq)
    }
}

/// The contents of a JSON string literal without escapes, else `None`.
fn plain_string(raw: &str) -> Option<&str> {
    let s = raw.strip_prefix('"')?.strip_suffix('"')?;
    (!s.contains('\\')).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_frame_embeds_the_payload_byte_for_byte() {
        let payload = br#"{ "type":"agent_thinking", "data":{"x":1.50,"s":"\u00e9"} }"#;
        let f = event_frame(42, payload).unwrap();
        assert_eq!(
            f.as_str(),
            r#"{"type":"event","seq":42,"event":{ "type":"agent_thinking", "data":{"x":1.50,"s":"\u00e9"} }}"#
        );
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["event"]["type"], "agent_thinking");
    }

    #[test]
    fn the_envelope_timestamp_is_read_in_the_same_pass() {
        let framed = event_frame_timed(3, br#"{"type":"x","timestamp":"2026-11-24T10:00:00.5Z"}"#).unwrap();
        let (f, ts) = (framed.text, framed.timestamp);
        assert_eq!(ts, Some("2026-11-24T10:00:00.5Z"));
        assert!(f.as_str().starts_with(r#"{"type":"event","seq":3,"#));
        assert_eq!(event_frame_timed(1, br#"{"timestamp":12}"#).unwrap().timestamp, None);
        assert_eq!(event_frame_timed(1, br#"{"timestamp":null}"#).unwrap().timestamp, None);
        assert_eq!(event_frame_timed(1, br#"{"a":{"timestamp":"x"}}"#).unwrap().timestamp, None);
        // A repeated key is still a forwardable object, just untimed.
        assert_eq!(event_frame_timed(1, br#"{"timestamp":"a","timestamp":"b"}"#).unwrap().timestamp, None);
    }

    #[test]
    fn payloads_that_are_not_json_objects_are_refused() {
        assert_eq!(event_frame(1, b"[1,2]"), Err(PayloadError::NotObject));
        assert_eq!(event_frame(1, b"\"s\""), Err(PayloadError::NotObject));
        assert_eq!(event_frame(1, b"hello"), Err(PayloadError::NotJson));
        assert_eq!(event_frame(1, b"{\"a\":"), Err(PayloadError::NotJson));
        assert_eq!(event_frame(1, b"{} {}"), Err(PayloadError::NotJson));
        assert_eq!(event_frame(1, b""), Err(PayloadError::NotJson));
        assert_eq!(event_frame(1, &[b'{', 0xff, b'}']), Err(PayloadError::NotUtf8));
    }

    #[test]
    fn control_frames_serialise_with_their_type() {
        let w = ServerFrame::Welcome { node: "n1", user: "u1", position: 7, epoch: "1", exp: 9 }.to_text();
        assert_eq!(w.as_str(), r#"{"type":"welcome","node":"n1","user":"u1","position":7,"epoch":"1","exp":9}"#);
        let g = ServerFrame::Gap { reason: "expired", from: Some(3), to: Some(9), earliest: Some(10) }.to_text();
        assert_eq!(g.as_str(), r#"{"type":"gap","reason":"expired","from":3,"to":9,"earliest":10}"#);
        let r = ServerFrame::Gap { reason: "stream_reset", from: None, to: None, earliest: None }.to_text();
        assert_eq!(r.as_str(), r#"{"type":"gap","reason":"stream_reset"}"#);
        assert_eq!(
            serde_json::from_str::<ClientFrame>(r#"{"type":"resume","last_seq":5,"epoch":"e"}"#).unwrap(),
            ClientFrame::Resume { last_seq: Some(5), epoch: Some("e".into()) }
        );
        assert_eq!(ServerFrame::Pong.to_text().as_str(), r#"{"type":"pong"}"#);
        assert_eq!(serde_json::from_str::<ClientFrame>(r#"{"type":"ping"}"#).unwrap(), ClientFrame::Ping);
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"subscribe","user":"other"}"#).is_err());
    }

    #[test]
    fn positions_stop_at_2_53_minus_1() {
        assert_eq!(parse_position("0"), Some(0));
        assert_eq!(parse_position("9007199254740991"), Some(MAX_SEQ));
        for bad in ["9007199254740992", "18446744073709551615", "18446744073709551616", "-1", "+1", "1.0", "", " 1"] {
            assert_eq!(parse_position(bad), None, "{bad}");
        }
        let frame = |n: &str| serde_json::from_str::<ClientFrame>(&format!(r#"{{"type":"resume","last_seq":{n}}}"#));
        assert_eq!(frame("9007199254740991").unwrap(), ClientFrame::Resume { last_seq: Some(MAX_SEQ), epoch: None });
        assert_eq!(frame("null").unwrap(), ClientFrame::Resume { last_seq: None, epoch: None });
        assert!(frame("\"7\"").is_err());
        for bad in ["9007199254740992", "18446744073709552000", "-1", "1.5"] {
            let e = frame(bad).unwrap_err().to_string();
            assert!(e.contains(BAD_POSITION), "{bad}: {e}");
        }
    }
}
