//! Device tokens, minted exactly as `router token` does (HS256: sub, acc, exp).

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use uuid::Uuid;

pub fn mint(secret: &str, device: Uuid, account: Uuid) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 86_400;
    let claims = serde_json::json!({"sub": device, "acc": account, "exp": exp});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}
