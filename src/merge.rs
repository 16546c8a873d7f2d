//! Merging streamed text: consecutive delta events of one message delivered
//! as one frame (docs/protocol.md, "Streamed text").
//!
//! Agents publish model output a few tokens per event. A socket that falls
//! behind, or a replay, would carry a 150-byte frame per 4 bytes of text; a
//! [`Run`] carries the same text in one frame instead. Merging is the only
//! change made to what a client receives: nothing is dropped or reordered,
//! and a run of one event is the event's own frame, byte for byte.
//!
//! Events of a run are consecutive (nothing else between them), each a delta
//! event ([`Delta`]), with the same raw `type` and `message_id`. The raw JSON
//! is compared, not the decoded value: two spellings of one id (`"a"` and
//! `"\u0061"`) are not merged, which is allowed (merging is never required).
//! The merged delta is the concatenation of the deltas' contents between
//! their quotes: JSON escapes never span a quote, so that is the JSON string
//! of the concatenated text.

use axum::extract::ws::Utf8Bytes;

use crate::hub::EventFrame;
use crate::metrics::Origin;
use crate::protocol::Delta;

/// Largest merged frame, in bytes: the largest event the node accepts
/// ([`crate::config::MAX_EVENT_BYTES`]). A client sized for the largest
/// event takes any merged frame, and the socket's write buffer bound
/// ([`crate::socket::MAX_WRITE_BUFFER`]) holds it. An event that would take
/// a run past it starts a new run.
pub const MAX_MERGED_FRAME: usize = crate::config::MAX_EVENT_BYTES;

/// Consecutive delta events of one message, delivered as one frame.
#[derive(Debug, Clone)]
pub struct Run {
    first_seq: u64,
    count: u64,
    /// The first event's origin, for the delivery latency metric.
    first_origin: Option<Origin>,
    /// The newest event: its object is the merged frame's, with its delta
    /// replaced.
    last: EventFrame,
    last_delta: Delta,
    /// The deltas before `last`'s, concatenated as raw JSON string contents.
    before: String,
}

impl Run {
    /// A run of one delta event, `None` for any other event.
    pub fn start(f: &EventFrame) -> Option<Run> {
        let last_delta = f.delta?;
        Some(Run {
            first_seq: f.seq,
            count: 1,
            first_origin: f.origin,
            last: f.clone(),
            last_delta,
            before: String::new(),
        })
    }

    /// Whether `f` continues this run: a later delta event of the same
    /// `type` and `message_id`, and the merged frame stays within
    /// [`MAX_MERGED_FRAME`].
    pub fn accepts(&self, f: &EventFrame) -> bool {
        f.seq > self.last.seq
            && same_message(&self.last, f)
            && f.text.len()
                + self.before.len()
                + self.last_delta.text_range().len()
                + extra(self.first_seq, self.count + 1)
                <= MAX_MERGED_FRAME
    }

    /// Adds `f`, which must be [accepted](Run::accepts).
    pub fn push(&mut self, f: &EventFrame) {
        let Some(d) = f.delta else { return };
        self.before.push_str(&self.last.text.as_str()[self.last_delta.text_range()]);
        self.last = f.clone();
        self.last_delta = d;
        self.count += 1;
    }

    /// How many events it holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The seq of the newest event: the frame's `seq`.
    pub fn seq(&self) -> u64 {
        self.last.seq
    }

    pub fn first_origin(&self) -> Option<Origin> {
        self.first_origin
    }

    /// The frame's length in bytes, without building it.
    pub fn bytes(&self) -> usize {
        match self.count {
            1 => self.last.text.len(),
            n => self.last.text.len() + self.before.len() + extra(self.first_seq, n),
        }
    }

    /// The frame: `{"type":"event","seq":S,"first_seq":F,"merged":N,"event":...}`
    /// with the newest event's object and the whole text as its `delta`; a
    /// run of one is that event's frame as is.
    pub fn frame(&self) -> Utf8Bytes {
        if self.count == 1 {
            return self.last.text.clone();
        }
        let text = self.last.text.as_str();
        let payload = Delta::payload_offset(self.last.seq);
        let open = self.last_delta.text_range().start;
        let mut out = String::with_capacity(self.bytes());
        let mut num = itoa::Buffer::new();
        out.push_str(crate::protocol::EVENT_HEAD);
        out.push_str(num.format(self.last.seq));
        out.push_str(r#","first_seq":"#);
        out.push_str(num.format(self.first_seq));
        out.push_str(r#","merged":"#);
        out.push_str(num.format(self.count));
        out.push_str(r#","event":"#);
        // The object up to the delta's opening quote, the earlier deltas,
        // then the newest delta and the rest of the frame.
        out.push_str(&text[payload..open]);
        out.push_str(&self.before);
        out.push_str(&text[open..]);
        Utf8Bytes::from(out)
    }
}

/// Whether `a` and `b` are both delta events of one message: the same raw
/// `type` and `message_id`.
fn same_message(a: &EventFrame, b: &EventFrame) -> bool {
    let (Some(da), Some(db)) = (a.delta, b.delta) else { return false };
    let (ta, tb) = (a.text.as_str(), b.text.as_str());
    da.message_id(ta) == db.message_id(tb) && da.kind(ta) == db.kind(tb)
}

/// A hash of the message a delta event belongs to (its raw `type` and
/// `message_id`), `None` for any other event: what a socket that fell
/// behind remembers of the message ([`crate::socket`]), in 8 bytes rather
/// than a frame kept alive. Two messages that hash alike only keep a socket
/// holding its deltas; merging itself compares the fields ([`Run::accepts`]).
pub fn message_hash(f: &EventFrame) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let d = f.delta?;
    let text = f.text.as_str();
    let mut h = std::hash::DefaultHasher::new();
    (d.kind(text), d.message_id(text)).hash(&mut h);
    Some(h.finish())
}

/// Bytes a merged frame adds for `first_seq` and `merged`.
fn extra(first_seq: u64, count: u64) -> usize {
    let mut num = itoa::Buffer::new();
    r#","first_seq":"#.len() + num.format(first_seq).len() + r#","merged":"#.len() + num.format(count).len()
}

/// Merges a sequence of frames in order, for a replay: events go through
/// [`Merger::event`], anything else (a gap) through [`Merger::other`], which
/// ends the run before it.
#[derive(Debug, Default)]
pub struct Merger {
    run: Option<Run>,
    pub out: Vec<Utf8Bytes>,
    /// Events written out inside merged frames.
    pub merged: u64,
}

impl Merger {
    /// Continues `run`, carried over from an earlier part of the sequence.
    pub fn continuing(run: Option<Run>) -> Merger {
        Merger { run, out: Vec::new(), merged: 0 }
    }

    /// The run not yet written, to continue later.
    pub fn take_run(&mut self) -> Option<Run> {
        self.run.take()
    }

    pub fn event(&mut self, f: &EventFrame) {
        if let Some(run) = self.run.as_mut()
            && run.accepts(f)
        {
            return run.push(f);
        }
        self.flush();
        match Run::start(f) {
            Some(run) => self.run = Some(run),
            None => self.out.push(f.text.clone()),
        }
    }

    pub fn other(&mut self, frame: Utf8Bytes) {
        self.flush();
        self.out.push(frame);
    }

    /// Ends the current run, if any, writing its frame out.
    pub fn flush(&mut self) {
        if let Some(run) = self.run.take() {
            if run.count > 1 {
                self.merged += run.count;
            }
            self.out.push(run.frame());
        }
    }

    /// The run not yet written and its frame's size.
    pub fn pending_bytes(&self) -> usize {
        self.run.as_ref().map_or(0, Run::bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::event_frame_timed;

    fn frame(seq: u64, payload: &str) -> EventFrame {
        let f = event_frame_timed(seq, payload.as_bytes()).unwrap();
        EventFrame { seq, text: f.text, origin: None, delta: f.delta }
    }

    fn merge(frames: &[EventFrame]) -> Vec<String> {
        let mut m = Merger::default();
        for f in frames {
            m.event(f);
        }
        m.flush();
        m.out.iter().map(|f| f.as_str().to_owned()).collect()
    }

    #[test]
    fn a_message_hash_is_its_type_and_id_whatever_the_delta() {
        let h = |seq, p: &str| message_hash(&frame(seq, p));
        let m1 = h(1, r#"{"type":"message_delta","message_id":"m1","delta":"a"}"#);
        assert!(m1.is_some());
        assert_eq!(m1, h(2, r#"{"delta":"bc","message_id":"m1","type":"message_delta","n":2}"#));
        assert_ne!(m1, h(3, r#"{"type":"message_delta","message_id":"m2","delta":"a"}"#));
        assert_ne!(m1, h(4, r#"{"type":"agent_thinking","message_id":"m1","delta":"a"}"#));
        assert_eq!(h(5, r#"{"type":"tool_call","message_id":"m1"}"#), None);
    }

    #[test]
    fn a_run_is_one_frame_with_the_text_and_the_last_event() {
        let a = frame(3, r#"{"type":"message_delta","message_id":"m1","delta":"Hel","n":1}"#);
        let b = frame(5, r#"{"type":"message_delta","message_id":"m1","delta":"lo \"x\"","n":2}"#);
        let c = frame(9, r#"{"type":"message_delta", "delta" : "!", "message_id":"m1","n":3}"#);
        let out = merge(&[a, b, c]);
        assert_eq!(
            out,
            [
                r#"{"type":"event","seq":9,"first_seq":3,"merged":3,"event":{"type":"message_delta", "delta" : "Hello \"x\"!", "message_id":"m1","n":3}}"#
            ]
        );
        let run = {
            let mut r = Run::start(&frame(3, r#"{"message_id":"m","delta":"a"}"#)).unwrap();
            r.push(&frame(4, r#"{"message_id":"m","delta":"b"}"#));
            r
        };
        assert_eq!(run.bytes(), run.frame().len());
    }

    #[test]
    fn an_unmerged_frame_is_the_event_frame_byte_for_byte() {
        let a = frame(3, r#"{"type":"t","message_id":"m1","delta":"a"}"#);
        let b = frame(4, r#"{"type":"t","message_id":"m2","delta":"b"}"#);
        assert_eq!(merge(&[a.clone(), b.clone()]), [a.text.as_str(), b.text.as_str()]);
    }

    #[test]
    fn what_is_not_a_delta_event_is_never_merged() {
        for payload in [
            r#"{"type":"t","message_id":"m","delta":1}"#,
            r#"{"type":"t","message_id":"","delta":"x"}"#,
            r#"{"type":"t","message_id":7,"delta":"x"}"#,
            r#"{"type":"t","delta":"x"}"#,
            r#"{"type":"t","message_id":"m"}"#,
            r#"{"type":"t","data":{"message_id":"m","delta":"x"}}"#,
            r#"{"type":"t","message_id":"m","delta":"x","delta":"y"}"#,
        ] {
            assert_eq!(frame(1, payload).delta, None, "{payload}");
        }
        let long = "é".repeat(MAX_MESSAGE_ID);
        assert!(frame(1, &format!(r#"{{"message_id":"{long}","delta":"x"}}"#)).delta.is_some());
        let longer = "é".repeat(MAX_MESSAGE_ID + 1);
        assert!(frame(1, &format!(r#"{{"message_id":"{longer}","delta":"x"}}"#)).delta.is_none());
        assert!(frame(1, r#"{"message_id":"\u00e9","delta":"x"}"#).delta.is_some());
    }

    const MAX_MESSAGE_ID: usize = crate::protocol::MAX_MESSAGE_ID_CHARS;

    #[test]
    fn a_run_stops_at_the_largest_frame() {
        let pad = "x".repeat(MAX_MERGED_FRAME / 3);
        let frames: Vec<EventFrame> =
            (1..=4).map(|i| frame(i, &format!(r#"{{"message_id":"m","delta":"{pad}"}}"#))).collect();
        let out = merge(&frames);
        assert_eq!(out.len(), 2, "two of three fit in one frame");
        assert!(out.iter().all(|f| f.len() <= MAX_MERGED_FRAME));
    }

    /// A small deterministic generator: no dependency for one test.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// What an input event is, for the property below.
    #[derive(Debug, Clone, PartialEq)]
    struct Ev {
        seq: u64,
        kind: String,
        id: Option<String>,
        delta: Option<String>,
    }

    #[test]
    fn random_sequences_keep_their_text_order_and_boundaries() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let pieces = ["a", "bc", "\\\"", "é", "\\n", " ", "\\u00e9", "z"];
        for round in 0..500 {
            let mut seq = rng.below(5);
            let n = 1 + rng.below(40);
            let mut input: Vec<Ev> = Vec::new();
            for _ in 0..n {
                seq += 1 + rng.below(3);
                let kind = ["t1", "t2"][rng.below(2) as usize].to_owned();
                let ev = match rng.below(4) {
                    0 => Ev { seq, kind, id: None, delta: None },
                    _ => Ev {
                        seq,
                        kind,
                        id: Some(["m1", "m2"][rng.below(2) as usize].to_owned()),
                        delta: Some((0..rng.below(3)).map(|_| pieces[rng.below(8) as usize]).collect()),
                    },
                };
                input.push(ev);
            }
            let frames: Vec<EventFrame> = input
                .iter()
                .map(|e| match (&e.id, &e.delta) {
                    (Some(id), Some(d)) => {
                        frame(e.seq, &format!(r#"{{"type":"{}","message_id":"{id}","delta":"{d}"}}"#, e.kind))
                    }
                    _ => frame(e.seq, &format!(r#"{{"type":"{}","n":{}}}"#, e.kind, e.seq)),
                })
                .collect();
            let out = merge(&frames);
            let mut i = 0;
            for text in &out {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                let last = v["seq"].as_u64().unwrap();
                let first = v["first_seq"].as_u64().unwrap_or(last);
                let covered: Vec<&Ev> = input[i..].iter().take_while(|e| e.seq <= last).collect();
                assert_eq!(covered.first().map(|e| e.seq), Some(first), "round {round}: {text}");
                assert_eq!(covered.last().map(|e| e.seq), Some(last));
                if covered.len() == 1 {
                    assert!(v.get("merged").is_none() && v.get("first_seq").is_none(), "{text}");
                    assert_eq!(text, frames[i].text.as_str(), "an unmerged frame is the event's");
                } else {
                    assert_eq!(v["merged"].as_u64(), Some(covered.len() as u64));
                    // Same type and id, each a delta event.
                    assert!(
                        covered.iter().all(|e| e.delta.is_some() && e.id == covered[0].id && e.kind == covered[0].kind)
                    );
                    let text: String = covered
                        .iter()
                        .map(|e| serde_json::from_str::<String>(&format!("\"{}\"", e.delta.as_ref().unwrap())).unwrap())
                        .collect();
                    assert_eq!(v["event"]["delta"], text.as_str());
                    assert_eq!(v["event"]["type"], covered[0].kind.as_str());
                    assert_eq!(v["event"]["message_id"], covered[0].id.as_deref().unwrap());
                }
                i += covered.len();
            }
            assert_eq!(i, input.len(), "every event is delivered");
            // Maximal: two neighbouring frames are never mergeable.
            for w in input.windows(2).enumerate() {
                let (k, pair) = w;
                let boundary = out.iter().any(|t| {
                    serde_json::from_str::<serde_json::Value>(t).unwrap()["seq"].as_u64() == Some(pair[0].seq)
                });
                if boundary {
                    let mergeable = pair[0].delta.is_some()
                        && pair[1].delta.is_some()
                        && pair[0].id == pair[1].id
                        && pair[0].kind == pair[1].kind;
                    assert!(!mergeable, "round {round}: events {k} and {} could have merged", k + 1);
                }
            }
        }
    }
}
