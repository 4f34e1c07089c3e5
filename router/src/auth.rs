//! Device authentication: HS256 JWT tokens verified locally (no database round trip).
//! Owns the key material; never logs a token.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
}

impl AuthError {
    pub(crate) const ALL: [AuthError; 7] = [
        AuthError::Missing,
        AuthError::Expired,
        AuthError::Invalid,
        AuthError::Timeout,
        AuthError::NotYetValid,
        AuthError::Replayed,
        AuthError::WeakAlgorithm,
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
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &str) -> Self {
        // Only HS256: a token claiming `alg: none` or RS256 is refused by the header check.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        // A token that is not valid yet (`nbf` in the future) is refused too.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data =
            decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid,
            })?;
        let device = Uuid::parse_str(&data.claims.sub).map_err(|_| AuthError::Invalid)?;
        let account = Uuid::parse_str(&data.claims.acc).map_err(|_| AuthError::Invalid)?;
        Ok(Identity { device, account })
    }
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
        assert_eq!(
            v.verify(&ok),
            Ok(Identity {
                device: d,
                account: a
            })
        );
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
}
