//! Public keys that device tokens may be signed with: PEM files (`--auth-public-key`) and
//! the keys of a JWKS document (`--auth-jwks`), each bound to the algorithms its type
//! allows. A token's `alg` must be one of its key's: an RSA key never verifies an HS256
//! token (the HS/RS confusion), an HMAC key never comes from a JWKS, and `none` is no
//! algorithm at all.

use std::collections::HashMap;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// What kind of key, and so which algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl Family {
    pub(crate) fn algorithms(self) -> &'static [Algorithm] {
        match self {
            Family::Rsa => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            Family::EcP256 => &[Algorithm::ES256],
            Family::EcP384 => &[Algorithm::ES384],
            Family::Ed25519 => &[Algorithm::EdDSA],
        }
    }
}

/// One public key.
#[derive(Clone)]
pub(crate) struct PublicKey {
    pub(crate) kid: Option<String>,
    pub(crate) key: DecodingKey,
    pub(crate) family: Family,
    /// The one algorithm a JWK names (`alg`), if it names one.
    pub(crate) only: Option<Algorithm>,
}

impl PublicKey {
    pub(crate) fn allows(&self, alg: Algorithm) -> bool {
        self.family.algorithms().contains(&alg) && self.only.is_none_or(|a| a == alg)
    }
}

/// Keys by `kid`, and those without one.
#[derive(Default)]
pub(crate) struct KeySet {
    pub(crate) by_kid: HashMap<String, PublicKey>,
    pub(crate) unnamed: Vec<PublicKey>,
}

impl KeySet {
    pub(crate) fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    pub(crate) fn insert(&mut self, k: PublicKey) {
        match k.kid.clone() {
            Some(kid) => {
                self.by_kid.insert(kid, k);
            }
            None => self.unnamed.push(k),
        }
    }

    /// A key that tokens with its `kid` and tokens without one may both use (a PEM
    /// file's key: its kid is the file's name).
    pub(crate) fn insert_unnamed_too(&mut self, k: PublicKey) {
        if k.kid.is_some() {
            self.unnamed.push(PublicKey {
                kid: None,
                ..k.clone()
            });
        }
        self.insert(k);
    }

    /// The keys a token with `kid` (or none) may be verified with.
    pub(crate) fn candidates<'a>(
        &'a self,
        kid: Option<&str>,
    ) -> Box<dyn Iterator<Item = &'a PublicKey> + 'a> {
        match kid {
            Some(kid) => Box::new(self.by_kid.get(kid).into_iter()),
            None => Box::new(self.unnamed.iter()),
        }
    }
}

/// A public key from PEM text: `PUBLIC KEY` (SubjectPublicKeyInfo: RSA, EC P-256 or
/// P-384, Ed25519) or `RSA PUBLIC KEY` (PKCS#1). `kid` names it for tokens that carry one.
pub(crate) fn from_pem(pem: &[u8], kid: Option<String>) -> Result<PublicKey, String> {
    use x509_parser::prelude::FromDer;
    let (label, der) = pem_block(pem)?;
    if label == "RSA PUBLIC KEY" {
        return Ok(PublicKey {
            kid,
            key: DecodingKey::from_rsa_der(&der),
            family: Family::Rsa,
            only: None,
        });
    }
    if label != "PUBLIC KEY" {
        return Err(format!(
            "a `{label}` block: expected a public key (`PUBLIC KEY` or `RSA PUBLIC KEY`)"
        ));
    }
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der)
        .map_err(|e| format!("not a SubjectPublicKeyInfo: {e}"))?;
    let bits = spki.subject_public_key.data.as_ref();
    let oid = spki.algorithm.algorithm.to_id_string();
    let (family, key) = match oid.as_str() {
        "1.2.840.113549.1.1.1" => (Family::Rsa, DecodingKey::from_rsa_der(bits)),
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            let family = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => Family::EcP256,
                Some("1.3.132.0.34") => Family::EcP384,
                other => {
                    return Err(format!(
                        "EC curve {other:?} not supported (P-256 and P-384 are)"
                    ))
                }
            };
            (family, DecodingKey::from_ec_der(bits))
        }
        "1.3.101.112" => (Family::Ed25519, DecodingKey::from_ed_der(bits)),
        other => return Err(format!("key algorithm {other} not supported")),
    };
    Ok(PublicKey {
        kid,
        key,
        family,
        only: None,
    })
}

/// The first PEM block's label and bytes.
fn pem_block(pem: &[u8]) -> Result<(String, Vec<u8>), String> {
    use base64::Engine;
    let text = std::str::from_utf8(pem).map_err(|_| "PEM is not text".to_string())?;
    let start = text
        .find("-----BEGIN ")
        .ok_or_else(|| "no PEM block".to_string())?;
    let rest = &text[start + 11..];
    let end_label = rest
        .find("-----")
        .ok_or_else(|| "bad PEM header".to_string())?;
    let label = rest[..end_label].to_string();
    let body_start = end_label + 5;
    let footer = format!("-----END {label}-----");
    let body_end = rest.find(&footer).ok_or_else(|| format!("no `{footer}`"))?;
    let b64: String = rest[body_start..body_end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("bad PEM base64: {e}"))?;
    Ok((label, der))
}

/// The keys of a JWKS document (`{"keys":[...]}`) that can verify device tokens, and a
/// line for each one left out and why (a symmetric key, an encryption key, a curve or
/// algorithm not supported, a JWK that does not parse).
pub(crate) fn from_jwks(text: &[u8]) -> Result<(KeySet, Vec<String>), String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut set = KeySet::default();
    let mut skipped = Vec::new();
    for (i, v) in doc.keys.into_iter().enumerate() {
        match from_jwk(v) {
            Ok(k) => set.insert(k),
            Err(e) => skipped.push(format!("key {i}: {e}")),
        }
    }
    Ok((set, skipped))
}

fn from_jwk(v: serde_json::Value) -> Result<PublicKey, String> {
    let jwk: Jwk = serde_json::from_value(v).map_err(|e| format!("not a JWK: {e}"))?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (`use: enc`)".into());
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Family::EcP256,
            EllipticCurve::P384 => Family::EcP384,
            ref c => return Err(format!("curve {c:?} not supported")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => Family::Ed25519,
            ref c => return Err(format!("curve {c:?} not supported")),
        },
        // A shared secret published in a key set is no secret: never accepted.
        AlgorithmParameters::OctetKey(_) => return Err("a symmetric key (`kty: oct`)".into()),
    };
    let only = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(
            signing_algorithm(a)
                .ok_or_else(|| format!("`alg` {a:?} is not a signature algorithm"))?,
        ),
    };
    if let Some(a) = only {
        if !family.algorithms().contains(&a) {
            return Err(format!("`alg` {a:?} does not fit the key's type"));
        }
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(PublicKey {
        kid: jwk.common.key_id.clone(),
        key,
        family,
        only,
    })
}

fn signing_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sets_keep_what_verifies_tokens_and_say_what_they_left_out() {
        let doc = br#"{"keys":[
            {"kty":"EC","crv":"P-256","kid":"ec1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"OKP","crv":"Ed25519","kid":"ed1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"oct","kid":"sym","k":"c2VjcmV0"},
            {"kty":"EC","crv":"P-256","kid":"enc","use":"enc","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"EC","crv":"P-256","kid":"wrongalg","alg":"RS256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","alg":"RS256"},
            {"kty":"XYZ"}
        ]}"#;
        let (set, skipped) = from_jwks(doc).unwrap();
        assert_eq!(set.len(), 3, "{skipped:?}");
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert_eq!(set.by_kid["ec1"].family, Family::EcP256);
        assert!(set.by_kid["ec1"].allows(Algorithm::ES256));
        assert!(!set.by_kid["ec1"].allows(Algorithm::HS256));
        assert!(!set.by_kid["ec1"].allows(Algorithm::ES384));
        assert!(set.by_kid["ed1"].allows(Algorithm::EdDSA));
        let rsa = &set.unnamed[0];
        assert!(rsa.allows(Algorithm::RS256));
        assert!(!rsa.allows(Algorithm::PS256), "its JWK names RS256 only");
        assert_eq!(set.candidates(Some("ec1")).count(), 1);
        assert_eq!(set.candidates(Some("nope")).count(), 0);
        assert_eq!(set.candidates(None).count(), 1);
        assert!(from_jwks(b"[]").is_err());
    }

    #[test]
    fn pem_keys_by_type() {
        // Ed25519 and P-256 keys made by rcgen, as `openssl pkey -pubout` writes them.
        for (alg, family) in [
            (&rcgen::PKCS_ED25519, Family::Ed25519),
            (&rcgen::PKCS_ECDSA_P256_SHA256, Family::EcP256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, Family::EcP384),
        ] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let k = from_pem(kp.public_key_pem().as_bytes(), Some("k".into())).unwrap();
            assert_eq!(k.family, family);
        }
        assert!(from_pem(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            None
        )
        .is_err());
        assert!(from_pem(b"nothing", None).is_err());
    }
}
