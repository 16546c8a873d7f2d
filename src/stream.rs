//! The JetStream stream that stores every event, and reads of it.
//!
//! One stream holds all users: subjects `<prefix>.*`, one subject per user.
//! The stream republishes each stored message to `<live-prefix>.<user>` with
//! `Nats-Sequence` and `Nats-Last-Sequence` headers (since nats-server 2.9.0),
//! so a node needs only a plain core subscription per user to receive every
//! event with its stream sequence and the previous sequence of that user.

use std::fmt::Write as _;

use async_nats::jetstream::{
    self, ErrorCode,
    context::GetStreamErrorKind,
    stream::{Config, DiscardPolicy, Info, Republish, RetentionPolicy, StorageType},
};

use crate::config::StreamSettings;

/// Why the stream cannot be used as is.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    /// The stream exists with settings the node cannot work with or change.
    /// This is a configuration problem: the node exits with code 64.
    #[error("stream {name} does not match what agentcast needs: {diff}")]
    Mismatch { name: String, diff: String },
    #[error("stream {0} does not exist and --stream-external is set: create it first (see docs/operations.md)")]
    Missing(String),
    /// NATS did not answer, or answered with an error: retried.
    #[error("JetStream: {0}")]
    Nats(String),
    /// Two answers of the stream leader contradicted each other (see
    /// [`crate::history::Span::Contradicted`]): the read is made again.
    #[error("JetStream answers disagree: {0}")]
    Inconsistent(String),
}

impl StreamError {
    /// True when retrying cannot help and the operator must act.
    pub fn is_config(&self) -> bool {
        !matches!(self, StreamError::Nats(_) | StreamError::Inconsistent(_))
    }
}

/// The configuration agentcast creates the stream with.
pub fn desired(s: &StreamSettings) -> Config {
    let events = format!("{}.*", s.subject_prefix);
    Config {
        name: s.name.clone(),
        description: Some("agentcast: per-user AI-agent events".into()),
        subjects: vec![events.clone()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age: s.max_age,
        max_bytes: s.max_bytes,
        max_messages: -1,
        max_messages_per_subject: s.max_per_user,
        max_message_size: s.max_event_bytes as i32,
        max_consumers: -1,
        num_replicas: s.replicas,
        duplicate_window: s.duplicate_window,
        allow_direct: true,
        republish: Some(Republish {
            source: events,
            destination: format!("{}.{{{{wildcard(1)}}}}", s.live_prefix),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// Differences that make the stream unusable: events would not be stored
/// where publishers send them, not be republished where nodes listen, or not
/// be readable by direct get.
fn structural_diff(have: &Config, want: &Config) -> String {
    let mut d = String::new();
    if !have.subjects.iter().any(|s| want.subjects.contains(s)) {
        let _ = write!(d, "subjects are {:?}, need {:?}; ", have.subjects, want.subjects);
    }
    if have.republish.as_ref().map(|r| (&r.source, &r.destination, r.headers_only))
        != want.republish.as_ref().map(|r| (&r.source, &r.destination, r.headers_only))
    {
        let _ = write!(
            d,
            "republish is {:?}, need {:?} (nats-server 2.9 cannot change it: recreate the stream); ",
            have.republish, want.republish
        );
    }
    if !have.allow_direct {
        d.push_str("allow_direct is false, need true; ");
    }
    if have.retention != want.retention {
        let _ = write!(d, "retention is {:?}, need {:?}; ", have.retention, want.retention);
    }
    continuity_diff(have, &mut d);
    d.trim_end_matches("; ").to_owned()
}

/// Settings under which the stream can remove an event that is not the
/// user's oldest, or store events under a subject other than the one they
/// were published to. The resume rule (docs/protocol.md §8) proves a replay
/// complete from what the stream holds only because events leave oldest
/// first, per user or as a prefix of the stream; with any of these a replay
/// could skip an event without a gap. Named by their JSON field, as `nats
/// stream info` shows them. Servers older than a field never set it.
fn continuity_diff(have: &Config, d: &mut String) {
    if have.allow_rollup {
        d.push_str("allow_rollup_hdrs is true, need false (a Nats-Rollup publish removes a user's earlier events or the whole stream's); ");
    }
    if have.allow_message_ttl {
        d.push_str(
            "allow_msg_ttl is true, need false (a Nats-TTL publish expires that event before older ones; 2.11+); ",
        );
    }
    if have.subject_delete_marker_ttl.is_some() {
        d.push_str("subject_delete_marker_ttl is set, need unset (the server writes marker messages into users' subjects; 2.11+); ");
    }
    if let Some(t) = &have.subject_transform {
        let _ = write!(
            d,
            "subject_transform is {:?} -> {:?}, need none (events are stored under a subject other than the one published to; 2.10+); ",
            t.source, t.destination
        );
    }
    if have.allow_message_schedules {
        d.push_str("allow_msg_schedules is true, need false (a schedule is stored as a rollup of its subject, and the server publishes into the stream on its own; 2.12+); ");
    }
}

/// Settings that do not break the resume rule by themselves but let an
/// operator do what it cannot see; logged as warnings when the node starts.
pub fn warnings(have: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if !have.deny_delete {
        w.push(
            "stream setting deny_delete is false: an operator can delete any single event (nats stream rmm), and a resume across it is not told of a gap; set deny_delete true to close this (nats-server cannot turn it off again, see docs/operations.md)"
                .to_owned(),
        );
    }
    w
}

/// Differences in limits: updated in place when agentcast manages the stream,
/// reported when the operator does.
fn limits_diff(have: &Config, want: &Config) -> String {
    let mut d = String::new();
    macro_rules! cmp {
        ($field:ident) => {
            if have.$field != want.$field {
                let _ = write!(d, "{} is {:?}, configured {:?}; ", stringify!($field), have.$field, want.$field);
            }
        };
    }
    cmp!(max_age);
    cmp!(max_bytes);
    cmp!(max_messages_per_subject);
    cmp!(max_message_size);
    cmp!(num_replicas);
    cmp!(duplicate_window);
    cmp!(discard);
    cmp!(storage);
    d.trim_end_matches("; ").to_owned()
}

/// What [`ensure`] found or did.
pub struct Ensured {
    /// A line for the log.
    pub line: String,
    /// True when nothing differs or was changed.
    pub as_configured: bool,
    pub info: Info,
}

/// Creates the stream if it is missing; checks it otherwise, and updates its
/// limits unless `external`.
pub async fn ensure(js: &jetstream::Context, s: &StreamSettings) -> Result<Ensured, StreamError> {
    let nats = |what: &str, e: &dyn std::fmt::Display| StreamError::Nats(format!("{what} {}: {e}", s.name));
    let want = desired(s);
    let mut existing = match js.get_stream(&s.name).await {
        Ok(stream) => stream,
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(je) if je.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                if s.external {
                    return Err(StreamError::Missing(s.name.clone()));
                }
                let created = js.create_stream(want).await.map_err(|e| nats("creating stream", &e))?;
                let info = created.cached_info().clone();
                return Ok(Ensured { line: format!("created stream {}", s.name), as_configured: false, info });
            }
            _ => return Err(nats("looking up stream", &e)),
        },
    };
    let info = existing.info().await.map_err(|e| nats("stream info", &e))?.clone();
    let have = info.config.clone();
    let structural = structural_diff(&have, &want);
    if !structural.is_empty() {
        return Err(StreamError::Mismatch { name: s.name.clone(), diff: structural });
    }
    let limits = limits_diff(&have, &want);
    if limits.is_empty() {
        return Ok(Ensured { line: format!("stream {} is as configured", s.name), as_configured: true, info });
    }
    if s.external {
        let line = format!("stream {} is managed externally and differs from this node's flags: {limits}", s.name);
        return Ok(Ensured { line, as_configured: false, info });
    }
    if have.storage != want.storage {
        let diff = format!("storage is {:?}, need {:?} (cannot be changed in place)", have.storage, want.storage);
        return Err(StreamError::Mismatch { name: s.name.clone(), diff });
    }
    let mut update = have;
    update.max_age = want.max_age;
    update.max_bytes = want.max_bytes;
    update.max_messages_per_subject = want.max_messages_per_subject;
    update.max_message_size = want.max_message_size;
    update.num_replicas = want.num_replicas;
    update.duplicate_window = want.duplicate_window;
    update.discard = want.discard;
    let info = js.update_stream(update).await.map_err(|e| nats("updating stream", &e))?;
    Ok(Ensured { line: format!("updated stream {} limits: {limits}", s.name), as_configured: false, info })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> StreamSettings {
        StreamSettings {
            name: "S".into(),
            subject_prefix: "ev".into(),
            live_prefix: "live".into(),
            external: false,
            replicas: 1,
            max_age: Duration::from_secs(60),
            max_bytes: 1 << 20,
            max_per_user: 10,
            max_event_bytes: 1024,
            duplicate_window: Duration::from_secs(1),
        }
    }

    #[test]
    fn desired_config_republishes_each_user_subject() {
        let c = desired(&settings());
        assert_eq!(c.subjects, vec!["ev.*".to_string()]);
        let r = c.republish.unwrap();
        assert_eq!((r.source.as_str(), r.destination.as_str()), ("ev.*", "live.{{wildcard(1)}}"));
        assert!(c.allow_direct);
    }

    #[test]
    fn diffs_name_each_field() {
        let want = desired(&settings());
        let mut have = want.clone();
        assert_eq!(structural_diff(&have, &want), "");
        assert_eq!(limits_diff(&have, &want), "");
        have.republish = None;
        have.allow_direct = false;
        let d = structural_diff(&have, &want);
        assert!(d.contains("republish") && d.contains("allow_direct"), "{d}");
        have.max_messages_per_subject = 5;
        let d = limits_diff(&have, &want);
        assert!(d.contains("max_messages_per_subject is 5, configured 10"), "{d}");
    }

    #[test]
    fn settings_that_remove_events_out_of_order_are_named() {
        let want = desired(&settings());
        assert!(warnings(&want)[0].contains("deny_delete is false"));
        let mut have = want.clone();
        have.allow_rollup = true;
        have.allow_message_ttl = true;
        have.subject_delete_marker_ttl = Some(Duration::from_secs(60));
        have.subject_transform = Some(async_nats::jetstream::stream::SubjectTransform {
            source: "ev.*".into(),
            destination: "other.{{wildcard(1)}}".into(),
        });
        have.allow_message_schedules = true;
        have.deny_delete = true;
        let d = structural_diff(&have, &want);
        for name in [
            "allow_rollup_hdrs",
            "allow_msg_ttl",
            "subject_delete_marker_ttl",
            "subject_transform",
            "allow_msg_schedules",
        ] {
            assert!(d.contains(name), "{name}: {d}");
        }
        assert!(warnings(&have).is_empty());
    }
}
