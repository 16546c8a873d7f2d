//! The JetStream stream that stores every event, and reads of it.
//!
//! One stream holds all users: subjects `<prefix>.*`, one subject per user.
//! The stream republishes each stored message to `<live-prefix>.<user>` with
//! `Nats-Sequence` and `Nats-Last-Sequence` headers (since nats-server 2.9.0),
//! so a node needs only a plain core subscription per user to receive every
//! event with its stream sequence and the previous sequence of that user.
//!
//! With `--stream-partitions N` (N > 1) there are N such streams,
//! `<stream>-k` storing `<prefix>.N.k.*`: the account's subject mapping sends
//! each user's events there ([`StreamSettings::mapping`]), and every
//! partition republishes to the same live subjects. [`check_mapping`] proves
//! the mapping in force stores each user where the node reads it.

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
    /// NATS stores some user's events in another partition's stream than
    /// the one the node reads them from ([`check_mapping`]). Not a reason
    /// to exit: the account's mapping can be mended while the node runs,
    /// and it stays not ready until then.
    #[error("partition mapping: {0}")]
    Mapping(String),
    /// The stream is sealed (`agentcast stream --seal`): it stores nothing
    /// more, because a new layout replaced this node's (docs/operations.md).
    /// The node stays up, not ready, until it is drained.
    #[error(
        "stream {0} is sealed: a new layout replaced this node's (docs/operations.md, changing the number of partitions); drain this node"
    )]
    Sealed(String),
    /// A stream of the previous layout (`--stream-previous`) that is not
    /// sealed: events could still be stored there after a client moved on.
    #[error("previous stream {0} is not sealed: seal it first (agentcast stream --seal, docs/operations.md)")]
    PreviousUnsealed(String),
}

impl StreamError {
    /// True when retrying cannot help and the operator must act.
    pub fn is_config(&self) -> bool {
        !matches!(
            self,
            StreamError::Nats(_)
                | StreamError::Inconsistent(_)
                | StreamError::Mapping(_)
                | StreamError::Sealed(_)
                | StreamError::PreviousUnsealed(_)
        )
    }

    /// True when the stream is usable again only after an operator acts,
    /// though the node keeps running: not ready at once, without the grace
    /// a failing check gets while a stream elects a leader.
    pub fn is_layout(&self) -> bool {
        matches!(self, StreamError::Mapping(_) | StreamError::Sealed(_) | StreamError::PreviousUnsealed(_))
    }
}

/// The configuration agentcast creates partition `k`'s stream with (the
/// only one, `k` = 0, without partitions).
pub fn desired(s: &StreamSettings, k: u32) -> Config {
    let events = format!("{}.*", s.stored_prefix(k));
    Config {
        name: s.stream_name(k),
        description: Some("agentcast: per-user AI-agent events".into()),
        subjects: vec![events.clone()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age: s.max_age,
        // The flag bounds all partitions together: each stream takes its
        // share (users spread evenly over them).
        max_bytes: (s.max_bytes as u64).div_ceil(u64::from(s.partitions)) as i64,
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

/// Creates partition `k`'s stream (the only one, `k` = 0, without
/// partitions) if it is missing; checks it otherwise, and updates its limits
/// unless `external`.
pub async fn ensure(js: &jetstream::Context, s: &StreamSettings, k: u32) -> Result<Ensured, StreamError> {
    let name = s.stream_name(k);
    let nats = |what: &str, e: &dyn std::fmt::Display| StreamError::Nats(format!("{what} {name}: {e}"));
    let want = desired(s, k);
    let mut existing = match js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(je) if je.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                if s.external {
                    return Err(StreamError::Missing(name));
                }
                let created = js.create_stream(want).await.map_err(|e| nats("creating stream", &e))?;
                let info = created.cached_info().clone();
                return Ok(Ensured { line: format!("created stream {name}"), as_configured: false, info });
            }
            _ => return Err(nats("looking up stream", &e)),
        },
    };
    let info = existing.info().await.map_err(|e| nats("stream info", &e))?.clone();
    let have = info.config.clone();
    if have.sealed {
        return Err(StreamError::Sealed(name));
    }
    let structural = structural_diff(&have, &want);
    if !structural.is_empty() {
        return Err(StreamError::Mismatch { name, diff: structural });
    }
    let limits = limits_diff(&have, &want);
    if limits.is_empty() {
        return Ok(Ensured { line: format!("stream {name} is as configured"), as_configured: true, info });
    }
    if s.external {
        let line = format!("stream {name} is managed externally and differs from this node's flags: {limits}");
        return Ok(Ensured { line, as_configured: false, info });
    }
    if have.storage != want.storage {
        let diff = format!("storage is {:?}, need {:?} (cannot be changed in place)", have.storage, want.storage);
        return Err(StreamError::Mismatch { name, diff });
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
    Ok(Ensured { line: format!("updated stream {name} limits: {limits}"), as_configured: false, info })
}

/// Checks that NATS stores each user's events in the partition stream the
/// node computes for it ([`crate::partition`]): with more than one
/// partition, publishers' subjects are spread by the account's mapping,
/// which the node cannot read, so it publishes to the event subject of each
/// of [`crate::partition::check_tokens`] and sees which stream takes it.
/// Nothing is stored: each check expects one stream (`Nats-Expected-Stream`)
/// and a last sequence no stream has, so the stream it reaches refuses it,
/// saying which refusal. The node's NATS user must be allowed to publish to
/// the event subjects (as mapped). One partition needs no mapping and is
/// not checked, unless a previous layout is named (`--stream-previous`):
/// going back from partitions to one stream, the node must not be ready
/// while the account still maps users to the partitions.
pub async fn check_mapping(client: &async_nats::Client, s: &StreamSettings) -> Result<(), StreamError> {
    if s.partitions == 1 && s.previous.is_none() {
        return Ok(());
    }
    for (token, k) in crate::partition::check_tokens(s.partitions) {
        if lands_in(client, s, &token, k).await? {
            continue;
        }
        let mut found = None;
        for j in (0..s.partitions).filter(|&j| j != k) {
            if lands_in(client, s, &token, j).await? {
                found = Some(j);
                break;
            }
        }
        let subject = s.event_subject(&token);
        let (n, want) = (s.partitions, mapping_advice(s));
        return Err(StreamError::Mapping(match found {
            Some(j) => format!(
                "NATS stores {subject} in {} (partition {j}), this node reads it from {} (partition {k} of {n}, FNV-1a as nats-server's partition()): {want}",
                s.stream_name(j),
                s.stream_name(k)
            ),
            None if n == 1 => format!("NATS stores {subject} in a stream other than {}: {want}", s.stream_name(0)),
            None => format!(
                "NATS stores {subject} in a stream other than {}..{}: {want}",
                s.stream_name(0),
                s.stream_name(n - 1)
            ),
        }));
    }
    Ok(())
}

/// What the account's mapping must be for this node's layout.
fn mapping_advice(s: &StreamSettings) -> String {
    if s.partitions == 1 {
        format!("remove the account's mapping of {}.* (one stream needs none)", s.subject_prefix)
    } else {
        format!("set the account mapping {}", s.mapping())
    }
}

/// Whether a publish to `token`'s event subject reaches partition `k`'s
/// stream, which then refuses it ([`check_mapping`]).
async fn lands_in(client: &async_nats::Client, s: &StreamSettings, token: &str, k: u32) -> Result<bool, StreamError> {
    let subject = s.event_subject(token);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Stream", s.stream_name(k).as_str());
    // No stream reaches this sequence (JetStream's are below 2^63).
    headers.insert("Nats-Expected-Last-Sequence", i64::MAX.to_string().as_str());
    let answer = match client.request_with_headers(subject.clone(), headers, bytes::Bytes::new()).await {
        Ok(answer) => answer,
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Err(StreamError::Mapping(format!(
                "no stream stores {subject}: {} (docs/operations.md)",
                mapping_advice(s)
            )));
        }
        Err(e) => return Err(StreamError::Nats(format!("partition check on {subject}: {e}"))),
    };
    let reply: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap_or_default();
    match reply.pointer("/error/err_code").and_then(|c| c.as_u64()) {
        // Wrong last sequence: the expected stream took it, and refused it.
        Some(10071) => Ok(true),
        // Another stream took it (and refused it, as not the one expected).
        Some(10060) => Ok(false),
        _ => Err(StreamError::Nats(format!(
            "partition check on {subject}: unexpected answer {}",
            String::from_utf8_lossy(&answer.payload)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> StreamSettings {
        StreamSettings {
            name: "S".into(),
            partitions: 1,
            previous: None,
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
        let c = desired(&settings(), 0);
        assert_eq!(c.subjects, vec!["ev.*".to_string()]);
        let r = c.republish.unwrap();
        assert_eq!((r.source.as_str(), r.destination.as_str()), ("ev.*", "live.{{wildcard(1)}}"));
        assert!(c.allow_direct);
    }

    #[test]
    fn diffs_name_each_field() {
        let want = desired(&settings(), 0);
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
        let want = desired(&settings(), 0);
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
