//! Token checks before the WebSocket upgrade.
//!
//! A client proves who it is with a JWT, in `Authorization: Bearer …` or in
//! the `token` query parameter (browsers cannot set headers on a WebSocket).
//! The node accepts exactly one algorithm, fixed by its configuration: HS256
//! with a shared secret, or one public-key algorithm with a PEM key. Pinning
//! the algorithm is what defeats `alg: none` and algorithm confusion (an
//! attacker signing HS256 with the RSA public key as the secret): a token
//! whose header names any other algorithm is refused before its signature is
//! looked at.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::user::{UserId, UserIdError};

/// Shortest HS256 secret accepted. RFC 7518 §3.2 requires a key at least as
/// long as the hash output (256 bits); shorter secrets are brute-forceable.
pub const MIN_SECRET_LEN: usize = 32;

/// Longest token accepted, in bytes. Real tokens are well under 2 KiB; the
/// bound keeps a hostile query string from costing base64 and JSON work.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The claims agentcast reads. Others are ignored.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
}

/// Why a connection was refused before the upgrade. `UserId` is answered with
/// HTTP 403 (the token is valid, the id is not allowed); all others with 401.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send Authorization: Bearer <jwt> or ?token=<jwt>")]
    Missing,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm {0} is not accepted here (expected {1:?})")]
    Algorithm(String, Algorithm),
    #[error("token lacks the required claim {0:?}")]
    MissingClaim(String),
    #[error("token claim {0} is not acceptable")]
    Claim(&'static str),
    /// RFC 7515 4.1.11: a recipient must refuse a token whose `crit` header
    /// names an extension it does not understand; this node understands none.
    #[error("token header lists critical extensions (crit: {0}) this node does not understand")]
    Critical(String),
    #[error("user id is not allowed: {0}")]
    UserId(#[from] UserIdError),
}

impl AuthError {
    /// A short, fixed label for metrics and the JSON error body.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadSignature => "bad_signature",
            AuthError::Algorithm(..) => "algorithm",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::Claim(_) => "claim",
            AuthError::Critical(_) => "crit",
            AuthError::UserId(_) => "user_id",
        }
    }
}

/// Why the key configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("JWT secret is {0} bytes; at least {MIN_SECRET_LEN} are required for HS256")]
    SecretTooShort(usize),
    #[error("cannot read JWT public key {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("JWT public key {0} is not an RSA, EC or Ed25519 public key in PEM form")]
    Unrecognised(String),
    #[error("JWT algorithm {alg:?} does not fit the {kind} key in {path}")]
    Mismatch { alg: Algorithm, kind: &'static str, path: String },
    #[error("HS* algorithms need --jwt-secret, not a public key")]
    HmacWithPublicKey,
}

/// An authenticated connection request.
#[derive(Debug)]
pub struct Identity {
    pub user: UserId,
    /// When the socket is closed: the token's `exp` plus the leeway that
    /// admitted it, in seconds since the Unix epoch.
    pub close_at: u64,
    /// The token's `exp`, as it says.
    pub exp: u64,
}

/// Verifies tokens with one pinned key and algorithm.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

/// Optional claim checks, and the leeway for clock skew.
#[derive(Debug, Clone, Default)]
pub struct ClaimRules {
    pub leeway_secs: u64,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl Authenticator {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8], rules: &ClaimRules) -> Result<Self, KeyError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(KeyError::SecretTooShort(secret.len()));
        }
        Ok(Self::new(DecodingKey::from_secret(secret), Algorithm::HS256, rules))
    }

    /// A public key in PEM form. The algorithm defaults to RS256, ES256 or
    /// EdDSA after the key's type; `alg` overrides it within that family.
    pub fn public_key(path: &str, alg: Option<Algorithm>, rules: &ClaimRules) -> Result<Self, KeyError> {
        let pem = std::fs::read(path).map_err(|err| KeyError::Read { path: path.into(), err })?;
        let (key, kind, default_alg, family): (_, _, _, &[Algorithm]) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
            (
                k,
                "RSA",
                Algorithm::RS256,
                &[
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
            )
        } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
            (k, "EC", Algorithm::ES256, &[Algorithm::ES256, Algorithm::ES384])
        } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
            (k, "Ed25519", Algorithm::EdDSA, &[Algorithm::EdDSA])
        } else {
            return Err(KeyError::Unrecognised(path.into()));
        };
        let alg = alg.unwrap_or(default_alg);
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(KeyError::HmacWithPublicKey);
        }
        if !family.contains(&alg) {
            return Err(KeyError::Mismatch { alg, kind, path: path.into() });
        }
        Ok(Self::new(key, alg, rules))
    }

    fn new(key: DecodingKey, alg: Algorithm, rules: &ClaimRules) -> Self {
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        // A configured issuer or audience must be present, not only right
        // when present (jsonwebtoken checks them only if the token has them).
        let mut required = vec!["exp", "sub"];
        if rules.issuer.is_some() {
            required.push("iss");
        }
        if rules.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.leeway = rules.leeway_secs;
        validation.validate_nbf = true;
        match &rules.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &rules.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Self { key, validation }
    }

    /// The algorithm this node accepts.
    pub fn algorithm(&self) -> Algorithm {
        self.validation.algorithms[0]
    }

    /// Checks a token and maps its subject to a user id.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let expected = self.algorithm();
        // Read the header's `alg` ourselves first: jsonwebtoken reports an
        // unknown name such as "none" as a JSON error, which would hide an
        // attack behind "malformed".
        let header = jose_header(token).ok_or(AuthError::Malformed)?;
        let header_alg = header.alg;
        if header_alg != format!("{expected:?}") {
            return Err(AuthError::Algorithm(header_alg, expected));
        }
        if let Some(crit) = header.crit {
            return Err(AuthError::Critical(crit.to_string()));
        }
        // Both claims are optional here so their absence is reported as such
        // (jsonwebtoken would otherwise fail on deserialising first).
        #[derive(Deserialize)]
        struct Decoded {
            sub: Option<String>,
            exp: Option<u64>,
            /// Read to check its type: jsonwebtoken accepts an array and
            /// matches any member, but RFC 7519 4.1.1 makes `iss` one string.
            iss: Option<serde_json::Value>,
        }
        let data = jsonwebtoken::decode::<Decoded>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
                AuthError::Algorithm(header_alg.clone(), expected)
            }
            ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
            ErrorKind::InvalidIssuer => AuthError::Claim("iss"),
            ErrorKind::InvalidAudience => AuthError::Claim("aud"),
            ErrorKind::InvalidSubject => AuthError::Claim("sub"),
            ErrorKind::InvalidClaimFormat(_) => AuthError::Malformed,
            _ => AuthError::Malformed,
        })?;
        if self.validation.iss.is_some() && data.claims.iss.as_ref().is_some_and(|iss| !iss.is_string()) {
            return Err(AuthError::Malformed);
        }
        let sub = data.claims.sub.ok_or_else(|| AuthError::MissingClaim("sub".into()))?;
        let exp = data.claims.exp.ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
        let user = UserId::parse(&sub)?;
        Ok(Identity { user, close_at: exp.saturating_add(self.validation.leeway), exp })
    }
}

/// The header fields checked before jsonwebtoken sees the token.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    /// Any value: its presence alone refuses the token.
    crit: Option<serde_json::Value>,
}

/// A compact JWT's header, if it decodes.
fn jose_header(token: &str) -> Option<JoseHeader> {
    let header = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()?;
    serde_json::from_slice(&json).ok()
}

/// Mints an HS256 token: for `agentcast dev`, `agentcast token` and tests.
pub fn mint_hs256(
    secret: &[u8],
    user: &str,
    lifetime: std::time::Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let exp = jsonwebtoken::get_current_timestamp() + lifetime.as_secs();
    let claims = Claims { sub: user.to_owned(), exp };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn auth() -> Authenticator {
        Authenticator::hs256(SECRET, &ClaimRules { leeway_secs: 5, ..Default::default() }).unwrap()
    }

    fn sign(header: &str, claims: &str, secret: &[u8]) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let signing_input = format!("{}.{}", B64.encode(header), B64.encode(claims));
        let key = EncodingKey::from_secret(secret);
        let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{signing_input}.{sig}")
    }

    fn future() -> u64 {
        jsonwebtoken::get_current_timestamp() + 600
    }

    #[test]
    fn accepts_a_good_token() {
        let t = mint_hs256(SECRET, "u1", Duration::from_secs(60)).unwrap();
        let id = auth().verify(&t).unwrap();
        assert_eq!(id.user.as_str(), "u1");
    }

    #[test]
    fn refuses_bad_tokens_with_the_right_reason() {
        let a = auth();
        let reason = |t: &str| a.verify(t).unwrap_err().reason();
        assert_eq!(reason(""), "missing");
        assert_eq!(reason("not-a-jwt"), "malformed");
        assert_eq!(reason("a.b.c"), "malformed");
        let exp = future();
        let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
        assert_eq!(
            reason(&sign(hs, &format!(r#"{{"sub":"u","exp":{exp}}}"#), b"another-secret-another-secret-xx")),
            "bad_signature"
        );
        let past = jsonwebtoken::get_current_timestamp() - 60;
        assert_eq!(reason(&sign(hs, &format!(r#"{{"sub":"u","exp":{past}}}"#), SECRET)), "expired");
        assert_eq!(reason(&sign(hs, r#"{"sub":"u"}"#, SECRET)), "missing_claim");
        assert_eq!(reason(&sign(hs, &format!(r#"{{"exp":{exp}}}"#), SECRET)), "missing_claim");
        assert_eq!(reason(&sign(hs, &format!(r#"{{"sub":"a.b","exp":{exp}}}"#), SECRET)), "user_id");
        assert_eq!(reason(&sign(hs, &format!(r#"{{"sub":"u","exp":{exp},"nbf":{exp}}}"#), SECRET)), "not_yet_valid");
        // alg none, with or without a signature, and another HMAC size.
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let none =
            format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), B64.encode(format!(r#"{{"sub":"u","exp":{exp}}}"#)));
        assert_eq!(reason(&none), "algorithm");
        let hs512 = sign(r#"{"alg":"HS512"}"#, &format!(r#"{{"sub":"u","exp":{exp}}}"#), SECRET);
        assert_eq!(reason(&hs512), "algorithm");
        assert_eq!(reason(&"a".repeat(MAX_TOKEN_LEN + 1)), "malformed");
        // RFC 7515: an extension marked critical that is not understood.
        let crit =
            sign(r#"{"alg":"HS256","crit":["exp-ext"],"exp-ext":1}"#, &format!(r#"{{"sub":"u","exp":{exp}}}"#), SECRET);
        assert_eq!(reason(&crit), "crit");
    }

    #[test]
    fn leeway_admits_small_skew_only() {
        let a = auth();
        let hs = r#"{"alg":"HS256"}"#;
        let just_past = jsonwebtoken::get_current_timestamp() - 2;
        assert!(a.verify(&sign(hs, &format!(r#"{{"sub":"u","exp":{just_past}}}"#), SECRET)).is_ok());
        let long_past = jsonwebtoken::get_current_timestamp() - 30;
        assert!(a.verify(&sign(hs, &format!(r#"{{"sub":"u","exp":{long_past}}}"#), SECRET)).is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(Authenticator::hs256(b"short", &ClaimRules::default()), Err(KeyError::SecretTooShort(5))));
    }

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn sign_with(alg: Algorithm, key: EncodingKey, sub: &str) -> String {
        let claims = Claims { sub: sub.into(), exp: future() };
        jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap()
    }

    #[test]
    fn public_key_algorithms_verify_and_confusion_is_refused() {
        let rules = ClaimRules::default();
        let cases = [
            ("rsa", Algorithm::RS256, EncodingKey::from_rsa_pem as fn(&[u8]) -> _),
            ("ec", Algorithm::ES256, EncodingKey::from_ec_pem),
            ("ed", Algorithm::EdDSA, EncodingKey::from_ed_pem),
        ];
        for (kind, alg, load) in cases {
            let public = fixture(&format!("{kind}-public.pem"));
            let a = Authenticator::public_key(&public, None, &rules).unwrap();
            assert_eq!(a.algorithm(), alg);
            let private = std::fs::read(fixture(&format!("{kind}-private.pem"))).unwrap();
            let good = sign_with(alg, load(&private).unwrap(), "u1");
            assert_eq!(a.verify(&good).unwrap().user.as_str(), "u1");
            // Algorithm confusion: HS256 keyed with the public key's PEM.
            let pem = std::fs::read(&public).unwrap();
            let forged = sign_with(Algorithm::HS256, EncodingKey::from_secret(&pem), "u1");
            assert_eq!(a.verify(&forged).unwrap_err().reason(), "algorithm", "{kind}");
        }
    }

    #[test]
    fn public_key_configuration_errors_are_clear() {
        let rules = ClaimRules::default();
        let rsa = fixture("rsa-public.pem");
        assert!(matches!(
            Authenticator::public_key(&rsa, Some(Algorithm::ES256), &rules),
            Err(KeyError::Mismatch { .. })
        ));
        assert!(matches!(
            Authenticator::public_key(&rsa, Some(Algorithm::HS256), &rules),
            Err(KeyError::HmacWithPublicKey)
        ));
        assert!(matches!(
            Authenticator::public_key(&fixture("README.md"), None, &rules),
            Err(KeyError::Unrecognised(_))
        ));
        assert!(matches!(Authenticator::public_key("/nonexistent.pem", None, &rules), Err(KeyError::Read { .. })));
        let ps = Authenticator::public_key(&rsa, Some(Algorithm::PS256), &rules).unwrap();
        assert_eq!(ps.algorithm(), Algorithm::PS256);
    }

    #[test]
    fn a_configured_issuer_and_audience_are_required() {
        let rules = ClaimRules { leeway_secs: 0, issuer: Some("idp".into()), audience: Some("agentcast".into()) };
        let a = Authenticator::hs256(SECRET, &rules).unwrap();
        let hs = r#"{"alg":"HS256"}"#;
        let exp = future();
        let ok = sign(hs, &format!(r#"{{"sub":"u","exp":{exp},"iss":"idp","aud":"agentcast"}}"#), SECRET);
        assert!(a.verify(&ok).is_ok());
        let no_iss = sign(hs, &format!(r#"{{"sub":"u","exp":{exp},"aud":"agentcast"}}"#), SECRET);
        assert_eq!(a.verify(&no_iss).unwrap_err().reason(), "missing_claim");
        let no_aud = sign(hs, &format!(r#"{{"sub":"u","exp":{exp},"iss":"idp"}}"#), SECRET);
        assert_eq!(a.verify(&no_aud).unwrap_err().reason(), "missing_claim");
        let wrong = sign(hs, &format!(r#"{{"sub":"u","exp":{exp},"iss":"other","aud":"agentcast"}}"#), SECRET);
        assert_eq!(a.verify(&wrong).unwrap_err().reason(), "claim");
        // RFC 7519: `iss` is one string, not a list to pick from.
        let list = sign(hs, &format!(r#"{{"sub":"u","exp":{exp},"iss":["idp","x"],"aud":"agentcast"}}"#), SECRET);
        assert_eq!(a.verify(&list).unwrap_err().reason(), "malformed");
    }

    #[test]
    fn the_socket_may_live_until_exp_plus_leeway() {
        let a = auth();
        let t = mint_hs256(SECRET, "u1", Duration::from_secs(60)).unwrap();
        let id = a.verify(&t).unwrap();
        assert_eq!(id.close_at, jsonwebtoken::get_current_timestamp() + 60 + 5);
    }
}
