//! Device authentication: HS256 JWT tokens verified locally (no database round trip).
//! Owns the key material; never logs a token.
//!
//! What a token must be to pass: signed HS256 with the configured secret (at least
//! [`MIN_SECRET_LEN`] bytes, checked at start), `sub` and `acc` UUIDs, an `exp` in the
//! future but no further than the configured maximum lifetime, `nbf` (if any) past, and no
//! `crit` header parameter (RFC 7515 §4.1.11: a recipient that does not understand a
//! critical extension must refuse the token; this one understands none).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) mod jwks;
pub(crate) mod keys;

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
    /// The token's id, if it has one (what the deny-list revokes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) jti: Option<String>,
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
    #[error("token signed with a key the router does not know (kid)")]
    UnknownKey,
    #[error("token issuer or audience is not the configured one")]
    WrongAudience,
    #[error("device blocked or token revoked (deny-list)")]
    Revoked,
    #[error("the device's account is at its limit of connected devices")]
    AccountLimit,
}

impl AuthError {
    pub(crate) const ALL: [AuthError; 13] = [
        AuthError::Missing,
        AuthError::Expired,
        AuthError::Invalid,
        AuthError::Timeout,
        AuthError::NotYetValid,
        AuthError::Replayed,
        AuthError::WeakAlgorithm,
        AuthError::Lifetime,
        AuthError::Critical,
        AuthError::UnknownKey,
        AuthError::WrongAudience,
        AuthError::Revoked,
        AuthError::AccountLimit,
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
            AuthError::UnknownKey => "unknown_key",
            AuthError::WrongAudience => "issuer_audience",
            AuthError::Revoked => "revoked",
            AuthError::AccountLimit => "account_limit",
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

/// Checks device tokens: HS256 with the shared secret, and RS*/PS*/ES256/ES384/EdDSA
/// with public keys (PEM files and a JWKS document), each key bound to the algorithms
/// of its type.
pub struct Verifier {
    /// The HS256 secret; None: no HS256 token is accepted.
    hmac: Option<DecodingKey>,
    /// `--auth-public-key` files (fixed for the process).
    pem: keys::KeySet,
    /// `--auth-jwks` (replaced as it is fetched or read again).
    jwks: Option<Arc<jwks::Jwks>>,
    /// One validation per algorithm accepted (`iss`, `aud`, leeway set on each).
    validations: Vec<(Algorithm, Validation)>,
    max_lifetime: u64,
    /// Devices blocked and token ids revoked (see `revocation`).
    deny: Option<Arc<crate::revocation::DenyList>>,
}

/// The protected header as the router reads it before any signature check.
#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    crit: Option<&'a serde_json::value::RawValue>,
}

/// What a token's claims are checked against besides the signature.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's, when it holds a list).
    pub audience: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway: u64,
}

const ALGORITHMS: [Algorithm; 10] = [
    Algorithm::HS256,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl Verifier {
    /// Tokens signed with `secret` (HS256), valid for at most
    /// [`DEFAULT_MAX_TOKEN_LIFETIME`], no leeway, no `iss`/`aud` required. The secret's
    /// length is checked where it is configured ([`crate::config::ServeConfig::secret`]).
    pub fn new(secret: &str) -> Self {
        Verifier::with(Some(secret), &Checks::default())
    }

    /// HS256 with `secret` (None: no HS256 token is accepted), checked as `checks` say;
    /// public keys are added with [`Verifier::with_public_keys`] and
    /// [`Verifier::with_jwks`].
    pub fn with(secret: Option<&str>, checks: &Checks) -> Self {
        let validations = ALGORITHMS
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = checks.leeway;
                v.validate_exp = true;
                // A token that is not valid yet (`nbf` in the future) is refused too.
                v.validate_nbf = true;
                let mut required = vec!["exp", "sub"];
                match &checks.issuer {
                    Some(iss) => {
                        v.set_issuer(&[iss]);
                        required.push("iss");
                    }
                    None => v.iss = None,
                }
                match &checks.audience {
                    Some(aud) => {
                        v.set_audience(&[aud]);
                        required.push("aud");
                    }
                    // No audience configured: a token's `aud` is not looked at.
                    None => v.validate_aud = false,
                }
                v.set_required_spec_claims(&required);
                (alg, v)
            })
            .collect();
        Verifier {
            hmac: secret.map(|s| DecodingKey::from_secret(s.as_bytes())),
            pem: keys::KeySet::default(),
            jwks: None,
            validations,
            max_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
            deny: None,
        }
    }

    /// No token is accepted (refused as `invalid`).
    pub fn no_tokens() -> Self {
        Verifier::with(None, &Checks::default())
    }

    /// Refuse tokens whose `exp` is more than `secs` seconds away when presented.
    pub fn with_max_lifetime(mut self, secs: u64) -> Self {
        self.max_lifetime = secs;
        self
    }

    /// Refuse tokens of blocked devices and revoked token ids.
    pub(crate) fn with_deny_list(mut self, d: Arc<crate::revocation::DenyList>) -> Self {
        self.deny = Some(d);
        self
    }

    /// Accept tokens signed by these keys (`--auth-public-key`).
    pub(crate) fn with_public_keys(mut self, keys: keys::KeySet) -> Self {
        self.pem = keys;
        self
    }

    /// Accept tokens signed by the keys of this set (`--auth-jwks`).
    pub(crate) fn with_jwks(mut self, jwks: Arc<jwks::Jwks>) -> Self {
        self.jwks = Some(jwks);
        self
    }

    pub(crate) fn jwks(&self) -> Option<&Arc<jwks::Jwks>> {
        self.jwks.as_ref()
    }

    /// A JWKS file is read again (SIGHUP); None: the key set is not a file.
    pub fn reload_jwks_file(&self) -> Option<anyhow::Result<usize>> {
        self.jwks
            .as_ref()
            .filter(|j| matches!(j.source, jwks::Source::File(_)))
            .map(|j| j.reload_file())
    }

    pub fn jwks_is_file(&self) -> bool {
        self.jwks
            .as_ref()
            .is_some_and(|j| matches!(j.source, jwks::Source::File(_)))
    }

    /// The key sets' metrics, in Prometheus text.
    pub(crate) fn render_metrics(&self, o: &mut String) {
        use crate::metrics::{counter, gauge};
        gauge(
            o,
            "router_auth_public_keys",
            "Public keys device tokens may be signed with (--auth-public-key files and the JWKS).",
            self.pem.len() + self.jwks.as_ref().map_or(0, |j| j.keys().len()),
        );
        // Rendered without a JWKS too (zeros, age -1), so dashboards need no special case.
        let none = jwks::JwksMetrics::default();
        let m = self.jwks.as_ref().map_or(&none, |j| &j.metrics);
        counter(
            o,
            "router_auth_jwks_loads_total",
            "JWKS documents fetched or read and put in use.",
            m.fetches_ok.load(std::sync::atomic::Ordering::Relaxed),
        );
        counter(
            o,
            "router_auth_jwks_failures_total",
            "JWKS fetches or reads that failed (the keys of the last good one stay in use).",
            m.fetches_failed.load(std::sync::atomic::Ordering::Relaxed),
        );
        counter(
            o,
            "router_auth_jwks_refetches_limited_total",
            "Fetches asked for by tokens naming an unknown kid that the rate limit (one per 10 s) turned down.",
            m.refetches_limited.load(std::sync::atomic::Ordering::Relaxed),
        );
        gauge(
            o,
            "router_auth_jwks_age_seconds",
            "Seconds since the JWKS in use was loaded (-1: never loaded, or no JWKS).",
            self.jwks
                .as_ref()
                .and_then(|j| j.age_secs())
                .unwrap_or(-1.0),
        );
    }

    /// Whether any token can be accepted at all.
    pub fn accepts_tokens(&self) -> bool {
        self.hmac.is_some() || self.pem.len() > 0 || self.jwks.is_some()
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_at(token, unix_now())
    }

    /// As [`Verifier::verify`], but a token naming a `kid` the JWKS does not have asks
    /// for the set to be fetched again (rate-limited) and is checked once more when it
    /// arrives (within [`jwks::REFETCH_WAIT`]).
    pub(crate) async fn verify_fresh(&self, token: &str) -> Result<Identity, AuthError> {
        match self.verify(token) {
            Err(AuthError::UnknownKey) => {
                if let Some(j) = self.jwks.as_ref().filter(|j| j.request_refetch()) {
                    j.changed(jwks::REFETCH_WAIT).await;
                    return self.verify(token);
                }
                Err(AuthError::UnknownKey)
            }
            other => other,
        }
    }

    pub(crate) fn verify_at(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let claims = self.check(token)?;
        if claims.exp.saturating_sub(now) > self.max_lifetime {
            return Err(AuthError::Lifetime);
        }
        let device = Uuid::parse_str(&claims.sub).map_err(|_| AuthError::Invalid)?;
        let account = Uuid::parse_str(&claims.acc).map_err(|_| AuthError::Invalid)?;
        if self
            .deny
            .as_ref()
            .is_some_and(|d| d.denies(&device, claims.jti.as_deref(), now))
        {
            return Err(AuthError::Revoked);
        }
        Ok(Identity {
            device,
            account,
            expires: claims.exp,
        })
    }

    /// The claims of a token whose signature verifies under a key its header may use.
    fn check(&self, token: &str) -> Result<Claims, AuthError> {
        let mut buf = [0u8; 768];
        let header = raw_header(token, &mut buf)?;
        if header.crit.is_some() {
            return Err(AuthError::Critical);
        }
        // `none`, HS384/HS512 and names no key here serves are refused as `invalid`.
        let alg: Algorithm = header.alg.parse().map_err(|_| AuthError::Invalid)?;
        let validation = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
            .ok_or(AuthError::Invalid)?;
        if alg == Algorithm::HS256 {
            let key = self.hmac.as_ref().ok_or(AuthError::WeakAlgorithm)?;
            return decode_with(token, key, validation);
        }
        let kid = header.kid.as_deref();
        let jwks = self.jwks.as_ref().map(|j| j.keys());
        let mut known = false;
        let mut last = AuthError::WeakAlgorithm;
        let candidates = self
            .pem
            .candidates(kid)
            .chain(jwks.iter().flat_map(|set| set.candidates(kid)));
        for k in candidates {
            known = true;
            if !k.allows(alg) {
                continue;
            }
            match decode_with(token, &k.key, validation) {
                Ok(c) => return Ok(c),
                // Another key may have signed it (tokens without a kid).
                Err(AuthError::Invalid) => last = AuthError::Invalid,
                Err(e) => return Err(e),
            }
        }
        if !known && kid.is_some() {
            return Err(AuthError::UnknownKey);
        }
        Err(last)
    }
}

fn decode_with(token: &str, key: &DecodingKey, v: &Validation) -> Result<Claims, AuthError> {
    use jsonwebtoken::errors::ErrorKind;
    decode::<Claims>(token, key, v)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" || c == "aud" => {
                AuthError::WrongAudience
            }
            _ => AuthError::Invalid,
        })
}

/// The token's protected header, decoded into `buf` (a JWS header is small; a huge one
/// is not worth decoding). jsonwebtoken decodes it again: its `Header` has no `crit`.
fn raw_header<'b>(token: &str, buf: &'b mut [u8; 768]) -> Result<RawHeader<'b>, AuthError> {
    use base64::Engine;
    let head = token.split('.').next().unwrap_or("");
    if head.len() > 1024 {
        return Err(AuthError::Invalid);
    }
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode_slice(head, buf)
        .map_err(|_| AuthError::Invalid)?;
    serde_json::from_slice(&buf[..n]).map_err(|_| AuthError::Invalid)
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
        jti: None,
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
        // No secret: an HS256 token's algorithm is not accepted at all.
        assert_eq!(
            Verifier::no_tokens().verify(&mint("s3cret", d, a, 60)),
            Err(AuthError::WeakAlgorithm)
        );
    }
}
