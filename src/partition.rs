//! Which partition a user belongs to, as NATS's subject mapping computes it.
//!
//! With `--stream-partitions N`, the account mapping [`mapping`],
//! `"agentcast.events.*": "agentcast.events.N.{{partition(N,1)}}.{{wildcard(1)}}"`,
//! has nats-server assign each user's events to one of N partitions, and a
//! node must find the same one for the user's history. The stored subjects
//! carry N, so two layouts with different counts never store the same
//! subjects and can exist side by side while a deployment moves from one to
//! the other. nats-server (2.8 and
//! later) hashes the mapped tokens, concatenated, with 32-bit FNV-1a and
//! takes the remainder by N (`getHashPartition` in its
//! `server/subject_transform.go`); tests/partition.rs checks this against
//! the real servers.

use crate::user::UserId;

/// Partitions a node takes at most (`--stream-partitions`). Each is a
/// stream the node checks every readiness interval, a scan task and a
/// position check; 64 streams spread the busiest deployment we size for
/// (docs/operations.md) over more servers than a JetStream cluster has.
pub const MAX_PARTITIONS: u32 = 64;

/// FNV-1a, 32 bits: the offset basis and prime of the published algorithm.
const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// The partition, `0..partitions`, that `{{partition(partitions,1)}}` maps
/// the subject token `token` to. `partitions` is at least 1.
pub fn of_token(token: &str, partitions: u32) -> u32 {
    hash(token) % partitions.max(1)
}

fn hash(token: &str) -> u32 {
    token.bytes().fold(FNV_OFFSET, |h, b| (h ^ u32::from(b)).wrapping_mul(FNV_PRIME))
}

/// The name of partition `k`'s stream of `partitions`: `stream` itself
/// with one partition, `<stream>-<k>` with more.
pub fn stream_name(stream: &str, partitions: u32, k: u32) -> String {
    if partitions == 1 { stream.to_owned() } else { format!("{stream}-{k}") }
}

/// The prefix of the subjects partition `k`'s stream stores events under,
/// one subject per user: the event subjects themselves with one partition;
/// with more, the subjects the account mapping sends them to,
/// `<subject-prefix>.<partitions>.<k>.<user>`.
pub fn stored_prefix(subject_prefix: &str, partitions: u32, k: u32) -> String {
    if partitions == 1 { subject_prefix.to_owned() } else { format!("{subject_prefix}.{partitions}.{k}") }
}

/// The account mapping that spreads the event subjects `<subject_prefix>.*`
/// over `partitions` streams, as nats-server's configuration writes it
/// inside `mappings = { ... }`.
pub fn mapping(subject_prefix: &str, partitions: u32) -> String {
    format!("\"{p}.*\": \"{p}.{n}.{{{{partition({n},1)}}}}.{{{{wildcard(1)}}}}\"", p = subject_prefix, n = partitions)
}

/// Subject tokens to check a mapping into `partitions` with, each with its
/// partition: at least one for every partition, and, for every other count
/// up to [`MAX_PARTITIONS`], one that count's mapping would send elsewhere.
/// A mapping that stores each of them in its partition's stream is the
/// node's, or one that agrees with it on every user within the counts
/// allowed ([`crate::stream::check_mapping`]). `%` is no character of a
/// user id ([`crate::user::UserId::parse`]): no user's subject is among them.
pub fn check_tokens(partitions: u32) -> Vec<(String, u32)> {
    let n = partitions.max(1);
    let mut reached = vec![false; n as usize];
    let mut told_apart: Vec<u32> = (1..=MAX_PARTITIONS).filter(|&m| m != n).collect();
    let mut tokens = Vec::new();
    // A bound no search needs (about 2n + 10 tokens are enough): the
    // hash spreads consecutive tokens evenly.
    for i in 0..100_000 {
        if told_apart.is_empty() && reached.iter().all(|&r| r) {
            break;
        }
        let token = format!("%partition-check-{i}");
        let h = hash(&token);
        let k = h % n;
        let before = told_apart.len();
        told_apart.retain(|&m| h % m == k);
        if told_apart.len() < before || !reached[k as usize] {
            reached[k as usize] = true;
            tokens.push((token, k));
        }
    }
    tokens
}

/// The partition of `user`, whose id is its subject token ([`crate::user`]).
pub fn of(user: &UserId, partitions: u32) -> u32 {
    of_token(user.as_str(), partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv_1a_32() {
        // Published FNV-1a test vectors, read through a remainder that
        // keeps the whole hash.
        assert_eq!(of_token("", u32::MAX), 0x811c_9dc5);
        assert_eq!(of_token("a", u32::MAX), 0xe40c_292c);
        assert_eq!(of_token("foobar", u32::MAX), 0xbf9c_f968);
    }

    #[test]
    fn the_check_tokens_reach_every_partition_and_tell_every_other_count_apart() {
        for n in [1, 2, 3, 4, 8, 16, MAX_PARTITIONS] {
            let tokens = check_tokens(n);
            for k in 0..n {
                assert!(tokens.iter().any(|(_, p)| *p == k), "n {n}: partition {k} reached");
            }
            for (t, p) in &tokens {
                assert_eq!(of_token(t, n), *p);
            }
            for m in (1..=MAX_PARTITIONS).filter(|&m| m != n) {
                assert!(tokens.iter().any(|(t, p)| of_token(t, m) != *p), "n {n}: a mapping into {m} is told apart");
            }
            assert!(tokens.len() <= 2 * n as usize + 40, "n {n}: {} tokens", tokens.len());
        }
    }

    #[test]
    fn one_partition_is_partition_zero_and_every_partition_is_reached() {
        let users: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        assert!(users.iter().all(|u| of_token(u, 1) == 0));
        let mut seen = [0u32; 8];
        for u in &users {
            seen[of_token(u, 8) as usize] += 1;
        }
        // 1,000 users over 8 partitions: each gets some, none most.
        assert!(seen.iter().all(|n| (50..250).contains(n)), "{seen:?}");
    }
}
