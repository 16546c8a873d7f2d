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
