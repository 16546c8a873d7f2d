//! Which partition a user belongs to, as NATS's subject mapping computes it.
//!
//! Groundwork for partitioned streams (issue 21): with `--stream-partitions
//! N`, an account mapping such as
//! `"agentcast.events.*": "agentcast.events.{{partition(N,1)}}.{{wildcard(1)}}"`
//! has nats-server assign each user's events to one of N partitions, and a
//! node must find the same one for the user's history. nats-server (2.8 and
//! later) hashes the mapped tokens, concatenated, with 32-bit FNV-1a and
//! takes the remainder by N (`getHashPartition` in its
//! `server/subject_transform.go`); tests/partition.rs checks this against
//! the real servers.

use crate::user::UserId;

/// FNV-1a, 32 bits: the offset basis and prime of the published algorithm.
const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// The partition, `0..partitions`, that `{{partition(partitions,1)}}` maps
/// the subject token `token` to. `partitions` is at least 1.
pub fn of_token(token: &str, partitions: u32) -> u32 {
    let hash = token.bytes().fold(FNV_OFFSET, |h, b| (h ^ u32::from(b)).wrapping_mul(FNV_PRIME));
    hash % partitions.max(1)
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
