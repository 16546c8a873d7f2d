//! User ids and the one NATS subject token each maps to.
//!
//! A user id comes from a token's `sub` claim and becomes one token of a NATS
//! subject (`<prefix>.<user>`). NATS gives `.`, `*`, `>` and whitespace a
//! meaning inside subjects, so an id holding any of them could address other
//! users' subjects. Rather than encode, we accept only a conservative alphabet
//! and refuse everything else: publishers in any language can then build the
//! subject by plain concatenation (docs/publishing.md), and a refused id is
//! visible (HTTP 403) instead of silently rewritten.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Longest accepted user id, in bytes. Long enough for UUIDs, ULIDs, e-mail
/// hashes and provider ids like `auth0|64b…`; short enough that a subject
/// stays far below NATS's limits and log lines stay readable.
pub const MAX_USER_ID_LEN: usize = 128;

/// Characters allowed besides ASCII letters and digits. None of them has a
/// meaning in NATS subjects, HTTP query strings need no escaping for them
/// except `+` and `|` (which URL encoders handle), and they cover common id
/// schemes (`auth0|abc`, `user:42`, `a-b_c`, `x@y`, base64url `=`).
const EXTRA_CHARS: &[u8] = b"-_=@:|+~";

/// A user id that is safe to use as exactly one NATS subject token.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

/// Why a user id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("user id is empty")]
    Empty,
    #[error("user id is longer than {MAX_USER_ID_LEN} bytes")]
    TooLong,
    #[error("user id contains {0:?}; allowed are ASCII letters, digits and - _ = @ : | + ~")]
    BadChar(char),
}

impl UserId {
    pub fn parse(id: &str) -> Result<Self, UserIdError> {
        if id.is_empty() {
            return Err(UserIdError::Empty);
        }
        if id.len() > MAX_USER_ID_LEN {
            return Err(UserIdError::TooLong);
        }
        if let Some(c) =
            id.chars().find(|c| !(c.is_ascii_alphanumeric() || (c.is_ascii() && EXTRA_CHARS.contains(&(*c as u8)))))
        {
            return Err(UserIdError::BadChar(c));
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether logs may name users (`--log-user-ids`). Process-wide, like the
/// log subscriber it governs; off unless the operator turns it on, since a
/// user id is personal data in many deployments.
static LOG_USER_IDS: AtomicBool = AtomicBool::new(false);

/// Key of the tags logged in place of user ids, random per process.
static TAG_KEY: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();

/// Lets logs name users (or stops them).
pub fn set_log_user_ids(on: bool) {
    LOG_USER_IDS.store(on, Ordering::Relaxed);
}

pub fn log_user_ids() -> bool {
    LOG_USER_IDS.load(Ordering::Relaxed)
}

impl UserId {
    /// The id for a log line: itself when the operator allows it, else a tag
    /// (`u:` and 8 hex digits) from a keyed hash that is stable within this
    /// process, so lines about one user can be matched up, but that cannot be
    /// turned back into the id without the process's random key.
    pub fn for_log(&self) -> LogUser<'_> {
        LogUser(self)
    }
}

/// See [`UserId::for_log`].
pub struct LogUser<'a>(&'a UserId);

impl fmt::Display for LogUser<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if log_user_ids() {
            return f.write_str(self.0.as_str());
        }
        let hash = TAG_KEY.get_or_init(Default::default).hash_one(self.0.as_str());
        write!(f, "u:{:08x}", hash as u32)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_name_users_only_when_allowed() {
        let u = UserId::parse("alice").unwrap();
        let tag = u.for_log().to_string();
        assert!(tag.starts_with("u:") && tag.len() == 10 && !tag.contains("alice"), "{tag}");
        assert_eq!(u.for_log().to_string(), tag, "stable within the process");
        set_log_user_ids(true);
        assert_eq!(u.for_log().to_string(), "alice");
        set_log_user_ids(false);
    }

    #[test]
    fn accepts_common_id_schemes() {
        for id in ["u1", "42", "auth0|64b1f", "user:42", "a-b_c", "x@y", "YWJj=", "~tilde+plus"] {
            assert_eq!(UserId::parse(id).unwrap().as_str(), id);
        }
        let longest = "a".repeat(MAX_USER_ID_LEN);
        assert!(UserId::parse(&longest).is_ok());
    }

    #[test]
    fn refuses_anything_that_could_widen_a_subject() {
        assert_eq!(UserId::parse(""), Err(UserIdError::Empty));
        for (id, c) in [
            ("a.b", '.'),
            ("*", '*'),
            (">", '>'),
            ("a b", ' '),
            ("a\tb", '\t'),
            ("a\nb", '\n'),
            ("é", 'é'),
            ("a/b", '/'),
            ("$SYS", '$'),
        ] {
            assert_eq!(UserId::parse(id), Err(UserIdError::BadChar(c)), "{id:?}");
        }
        assert_eq!(UserId::parse(&"a".repeat(MAX_USER_ID_LEN + 1)), Err(UserIdError::TooLong));
    }
}
