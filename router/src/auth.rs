//! Device authentication: HS256 JWT tokens verified locally (no database round trip).
//! Owns the key material; never logs a token.
//!
//! What a token must be to pass: signed HS256 with the configured secret (at least
//! [`MIN_SECRET_LEN`] bytes, checked at start), `sub` and `acc` UUIDs, an `exp` in the
//! future but no further than the configured maximum lifetime, `nbf` (if any) past, and no
//! `crit` header parameter (RFC 7515 §4.1.11: a recipient that does not understand a
//! critical extension must refuse the token; this one understands none).

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Fewest bytes an HS256 secret may have: the size of the hash output (RFC 7518 §3.2
/// requires a key of at least 256 bits for HS256). A shorter or guessable secret can be
/// found offline from one captured token, after which every device can be impersonated.
pub const MIN_SECRET_LEN: usize = 32;

/// Longest a token may still be valid when it is presented, by default: 30 days.
pub const DEFAULT_MAX_TOKEN_LIFETIME: u64 = 30 * 86_400;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Claims {
    /// Device UUID.
    pub(crate) sub: String,
    /// Account UUID.
    pub(crate) acc: String,
    /// Expiry, seconds since the Unix epoch.
    pub(crate) exp: u64,
}

/// Why a token was refused. Each maps to close code 4401 and a metric label.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
    #[error("token not valid yet (nbf in the future)")]
    NotYetValid,
    #[error("no authentication within the auth timeout")]
    Timeout,
    #[error("signature already used")]
    Replayed,
    #[error("signature algorithm not accepted (weaker than configured, or unknown)")]
    WeakAlgorithm,
    #[error("token lives longer than the router's maximum token lifetime")]
    Lifetime,
    #[error("token has a critical header extension the router does not understand")]
    Critical,
}

impl AuthError {
    pub(crate) const ALL: [AuthError; 9] = [
        AuthError::Missing,
        AuthError::Expired,
        AuthError::Invalid,
        AuthError::Timeout,
        AuthError::NotYetValid,
        AuthError::Replayed,
        AuthError::WeakAlgorithm,
        AuthError::Lifetime,
        AuthError::Critical,
    ];
    pub(crate) fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Expired => "expired",
            AuthError::Invalid => "invalid",
            AuthError::Timeout => "timeout",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Replayed => "replayed",
            AuthError::WeakAlgorithm => "weak_algorithm",
            AuthError::Lifetime => "lifetime",
            AuthError::Critical => "crit",
        }
    }
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Who a verified token says the peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub(crate) device: Uuid,
    pub(crate) account: Uuid,
    /// When the credential stops being valid (a token's `exp`, Unix seconds); 0: it does
    /// not expire while connected (a client certificate, a NervesHub signature).
    pub(crate) expires: u64,
}

impl Identity {
    pub(crate) fn new(device: Uuid, account: Uuid) -> Self {
        Identity {
            device,
            account,
            expires: 0,
        }
    }
}

pub struct Verifier {
    /// None: no token is accepted (devices authenticate by certificate or NervesHub
    /// signature only).
    key: Option<DecodingKey>,
    validation: Validation,
    max_lifetime: u64,
}

/// The header members looked at before the signature: only whether `crit` is there.
#[derive(Deserialize)]
struct CritHeader<'a> {
    #[serde(borrow, default)]
    crit: Option<&'a serde_json::value::RawValue>,
}

impl Verifier {
    /// Tokens signed with `secret`, valid for at most [`DEFAULT_MAX_TOKEN_LIFETIME`].
    /// The secret's length is checked where it is configured
    /// ([`crate::config::ServeConfig::secret`]), not here.
    pub fn new(secret: &str) -> Self {
        // Only HS256: a token claiming `alg: none` or RS256 is refused by the header check.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        // A token that is not valid yet (`nbf` in the future) is refused too.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier {
            key: Some(DecodingKey::from_secret(secret.as_bytes())),
            validation,
            max_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
        }
    }

    /// No token is accepted (refused as `invalid`).
    pub fn no_tokens() -> Self {
        let mut v = Verifier::new("");
        v.key = None;
        v
    }

    /// Refuse tokens whose `exp` is more than `secs` seconds away when presented.
    pub fn with_max_lifetime(mut self, secs: u64) -> Self {
        self.max_lifetime = secs;
        self
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_at(token, unix_now())
    }

    pub(crate) fn verify_at(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let key = self.key.as_ref().ok_or(AuthError::Invalid)?;
        if has_crit(token)? {
            return Err(AuthError::Critical);
        }
        let data = decode::<Claims>(token, key, &self.validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            _ => AuthError::Invalid,
        })?;
        if data.claims.exp.saturating_sub(now) > self.max_lifetime {
            return Err(AuthError::Lifetime);
        }
        let device = Uuid::parse_str(&data.claims.sub).map_err(|_| AuthError::Invalid)?;
        let account = Uuid::parse_str(&data.claims.acc).map_err(|_| AuthError::Invalid)?;
        Ok(Identity {
            device,
            account,
            expires: data.claims.exp,
        })
    }
}

/// Does the token's protected header name critical extensions (`crit`)? Its header is
/// decoded once more here (jsonwebtoken's `Header` has no `crit` member and ignores
/// unknown ones); a header that does not decode is `Invalid`.
fn has_crit(token: &str) -> Result<bool, AuthError> {
    use base64::Engine;
    let head = token.split('.').next().unwrap_or("");
    // A JWS header is small; a huge one is not worth decoding.
    if head.len() > 1024 {
        return Err(AuthError::Invalid);
    }
    let mut buf = [0u8; 768];
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode_slice(head, &mut buf)
        .map_err(|_| AuthError::Invalid)?;
    let h: CritHeader = serde_json::from_slice(&buf[..n]).map_err(|_| AuthError::Invalid)?;
    Ok(h.crit.is_some())
}

/// The token of an `Authorization: Bearer <token>` value: the scheme in any case
/// (HTTP auth schemes are case-insensitive), then spaces or tabs. None: another scheme,
/// or no token.
pub(crate) fn bearer_token(v: &str) -> Option<&str> {
    let v = v.trim_matches([' ', '\t']);
    let (scheme, rest) = v.split_once([' ', '\t'])?;
    let token = rest.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Mint a token (what `router token` prints).
pub fn mint(secret: &str, device: Uuid, account: Uuid, ttl_secs: u64) -> String {
    mint_with_exp(secret, device, account, unix_now() + ttl_secs)
}

pub fn mint_with_exp(secret: &str, device: Uuid, account: Uuid, exp: u64) -> String {
    let claims = Claims {
        sub: device.to_string(),
        acc: account.to_string(),
        exp,
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn round_trip_and_refusals() {
        let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
        let v = Verifier::new("s3cret");
        let ok = mint("s3cret", d, a, 60);
        let ident = v.verify(&ok).unwrap();
        assert_eq!((ident.device, ident.account), (d, a));
        assert!(ident.expires >= unix_now() + 59 && ident.expires <= unix_now() + 60);
        assert_eq!(v.verify(&mint("other", d, a, 60)), Err(AuthError::Invalid));
        assert_eq!(
            v.verify(&mint_with_exp("s3cret", d, a, unix_now() - 5)),
            Err(AuthError::Expired)
        );
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        // Signed right, but not valid for another minute.
        let early = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": d.to_string(), "acc": a.to_string(),
                "exp": unix_now() + 600, "nbf": unix_now() + 60}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(v.verify(&early), Err(AuthError::NotYetValid));
        assert_eq!(v.verify("garbage"), Err(AuthError::Invalid));
        // alg: none with the same claims and an empty signature.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64
            .encode(format!(r#"{{"sub":"{d}","acc":"{a}","exp":{}}}"#, unix_now() + 60).as_bytes());
        assert_eq!(
            v.verify(&format!("{header}.{body}.")),
            Err(AuthError::Invalid)
        );
    }

    fn signed(header: &serde_json::Value, claims: &serde_json::Value, secret: &[u8]) -> String {
        use ring::hmac;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
        format!("{input}.{}", b64.encode(tag.as_ref()))
    }

    #[test]
    fn a_critical_header_extension_is_refused() {
        let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
        let claims = serde_json::json!({"sub": d.to_string(), "acc": a.to_string(),
            "exp": unix_now() + 60});
        let v = Verifier::new("s3cret");
        let plain = signed(
            &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
            &claims,
            b"s3cret",
        );
        assert!(v.verify(&plain).is_ok());
        let crit = signed(
            &serde_json::json!({"alg": "HS256", "crit": ["exp-ext"], "exp-ext": 1}),
            &claims,
            b"s3cret",
        );
        assert_eq!(v.verify(&crit), Err(AuthError::Critical));
    }

    #[test]
    fn a_token_living_past_the_maximum_lifetime_is_refused() {
        let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
        let v = Verifier::new("s3cret").with_max_lifetime(3600);
        assert!(v.verify(&mint("s3cret", d, a, 3600)).is_ok());
        assert_eq!(
            v.verify(&mint("s3cret", d, a, 3602)),
            Err(AuthError::Lifetime)
        );
        // `exp` = 2^64-1: refused by the default maximum too.
        assert_eq!(
            Verifier::new("s3cret").verify(&mint_with_exp("s3cret", d, a, u64::MAX)),
            Err(AuthError::Lifetime)
        );
        assert_eq!(
            Verifier::no_tokens().verify(&mint("s3cret", d, a, 60)),
            Err(AuthError::Invalid)
        );
    }
}
