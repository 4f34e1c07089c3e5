//! NervesHub shared-secret authentication: the four `x-nh-*` headers a stock NervesHub
//! device sends on its upgrade request, verified against the keys of `--nerves-keys`.
//!
//! What the device computes (and the router recomputes):
//! - `x-nh-alg` = `NH1-HMAC-<digest>-<iterations>-<length>` (default
//!   `NH1-HMAC-sha256-1000-32`), `x-nh-key` = its key, `x-nh-time` = unix seconds;
//! - salt = `NH1:device-socket:shared-secret:connect\n\nx-nh-alg=A\nx-nh-key=K\nx-nh-time=T\n`;
//! - K = PBKDF2-HMAC-<digest>(the secret's bytes, salt, iterations, length);
//! - `x-nh-signature` = `P.B.S`: `P` names the MAC (`SFMyNTY`, base64 of `HS256`; or
//!   `SFMzODQ`/`SFM1MTI`), `B` = base64url (no padding) of the Erlang term
//!   `{Identifier, SignedAtMs, MaxAge}` (external term format), `S` = base64url of
//!   HMAC(K, `P.B`).
//!
//! The router checks, in this order: the key is in the key file (before any hashing, so
//! an unknown key costs nothing); the algorithm is one the key accepts: by default HMAC
//! with sha256/384/512, at least `--nerves-min-iterations` and at most 100,000
//! iterations, a key of 32 to 64 bytes, and per key in the file `digests` (adding `sha`
//! and `sha224`, which NervesHub accepts too), `min_iterations` and `min_key_length` for
//! devices configured otherwise; the MAC; the signing time is not in the future and at
//! most `--nerves-max-age` seconds old (the `MaxAge` inside the token is ignored, as
//! NervesHub does); the identifier matches a device key's. A signature used before within
//! that window ([`Reuse::Again`]) is accepted only while no connection of that device is
//! open on this node (the listener looks): a device that reconnects within the second it
//! signed presents the same signature again, as NervesHub allows, while a copy of the
//! signature cannot join beside the device. A device key names its device; a product key (`nhp_...`) admits any
//! identifier of its product, and the device's UUID is then derived from it (UUID v5 of
//! the identifier in the product's account namespace): the same serial number always
//! gets the same device UUID.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine;
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::{AuthError, Identity};

/// Most PBKDF2 iterations accepted: a bound on the CPU an upgrade request can ask for.
const MAX_ITERATIONS: u32 = 100_000;
/// Signatures remembered for replay detection; past this, expired ones are purged.
const REPLAY_PURGE_AT: usize = 100_000;

/// The headers, as the upgrade request carried them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Headers {
    pub(crate) alg: String,
    pub(crate) key: String,
    pub(crate) time: String,
    pub(crate) signature: String,
}

/// The key file (`--nerves-keys`, TOML).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    pub(crate) device: Vec<DeviceKey>,
    #[serde(default)]
    pub(crate) product: Vec<ProductKey>,
}

/// A device key: one device, which must sign with its identifier.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceKey {
    pub(crate) key: String,
    pub(crate) secret: String,
    pub(crate) identifier: String,
    pub(crate) device: Uuid,
    pub(crate) account: Uuid,
    #[serde(flatten)]
    pub(crate) accept: AcceptFile,
}

/// What a key accepts besides the defaults (`digests`, `min_iterations`,
/// `min_key_length`), for devices whose `nerves_hub_link` is configured so.
#[derive(Debug, Default, Deserialize)]
struct AcceptFile {
    digests: Option<Vec<String>>,
    min_iterations: Option<u32>,
    min_key_length: Option<usize>,
}

/// A product key: any identifier; the device UUID derived from it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductKey {
    pub(crate) key: String,
    pub(crate) secret: String,
    pub(crate) account: Uuid,
    #[serde(flatten)]
    pub(crate) accept: AcceptFile,
}

/// A PBKDF2 digest a device may name in `x-nh-alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Digest {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Digest {
    fn parse(s: &str) -> Option<Digest> {
        Some(match s.to_ascii_lowercase().as_str() {
            "sha" | "sha1" => Digest::Sha1,
            "sha224" => Digest::Sha224,
            "sha256" => Digest::Sha256,
            "sha384" => Digest::Sha384,
            "sha512" => Digest::Sha512,
            _ => return None,
        })
    }
    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The algorithms one key accepts.
#[derive(Debug, Clone, Copy)]
struct Accept {
    digests: u8,
    /// None: `--nerves-min-iterations`.
    min_iterations: Option<u32>,
    min_length: usize,
}

impl Accept {
    fn from_file(a: AcceptFile, key: &str) -> anyhow::Result<Accept> {
        let digests = match a.digests {
            None => Digest::Sha256.bit() | Digest::Sha384.bit() | Digest::Sha512.bit(),
            Some(list) => list.iter().try_fold(0u8, |bits, d| {
                Digest::parse(d).map(|d| bits | d.bit()).ok_or_else(|| {
                    anyhow::anyhow!(
                        "key {key}: digest {d:?} is none of sha, sha224, sha256, sha384, sha512"
                    )
                })
            })?,
        };
        let min_length = a.min_key_length.unwrap_or(32);
        anyhow::ensure!(
            (1..=64).contains(&min_length),
            "key {key}: min_key_length is 1 to 64"
        );
        Ok(Accept {
            digests,
            min_iterations: a.min_iterations,
            min_length,
        })
    }
}

enum Entry {
    Device {
        secret: String,
        identifier: String,
        ident: Identity,
        accept: Accept,
    },
    Product {
        secret: String,
        account: Uuid,
        accept: Accept,
    },
}

/// Whether a verified signature was seen before (within its window, on this node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reuse {
    First,
    Again,
}

/// The keys by key string.
#[derive(Default)]
struct Keys(HashMap<String, Entry>);

impl Keys {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--nerves-keys {}: {e}", path.display()))?;
        let file: KeyFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("--nerves-keys {}: {e}", path.display()))?;
        let mut keys = HashMap::new();
        let bad = |e: anyhow::Error| anyhow::anyhow!("--nerves-keys {}: {e}", path.display());
        for d in file.device {
            let e = Entry::Device {
                accept: Accept::from_file(d.accept, &d.key).map_err(bad)?,
                secret: d.secret,
                identifier: d.identifier,
                ident: Identity::new(d.device, d.account),
            };
            if keys.insert(d.key.clone(), e).is_some() {
                anyhow::bail!("--nerves-keys {}: key {} twice", path.display(), d.key);
            }
        }
        for p in file.product {
            if !p.key.starts_with("nhp_") {
                anyhow::bail!(
                    "--nerves-keys {}: product key {} must start with nhp_",
                    path.display(),
                    p.key
                );
            }
            let e = Entry::Product {
                accept: Accept::from_file(p.accept, &p.key).map_err(bad)?,
                secret: p.secret,
                account: p.account,
            };
            if keys.insert(p.key.clone(), e).is_some() {
                anyhow::bail!("--nerves-keys {}: key {} twice", path.display(), p.key);
            }
        }
        Ok(Keys(keys))
    }
}

/// The verifier: keys (replaced whole on reload), policy, recent signatures.
pub struct NervesAuth {
    path: PathBuf,
    keys: RwLock<Arc<Keys>>,
    min_iterations: u32,
    max_age_ms: u64,
    /// Signature MAC -> when it stops being valid (ms): a second use before is a replay.
    seen: Mutex<HashMap<Vec<u8>, u64>>,
}

/// The parameters of `x-nh-alg`.
struct Alg {
    digest: Digest,
    iterations: NonZeroU32,
    length: usize,
}

impl Alg {
    /// PBKDF2 of `secret` and `salt` into `out` (its length is the key's).
    fn derive(&self, salt: &[u8], secret: &[u8], out: &mut [u8]) {
        let ring_alg = match self.digest {
            Digest::Sha1 => Some(&ring::pbkdf2::PBKDF2_HMAC_SHA1),
            Digest::Sha256 => Some(&ring::pbkdf2::PBKDF2_HMAC_SHA256),
            Digest::Sha384 => Some(&ring::pbkdf2::PBKDF2_HMAC_SHA384),
            Digest::Sha512 => Some(&ring::pbkdf2::PBKDF2_HMAC_SHA512),
            // ring has no SHA-224: RustCrypto's PBKDF2 for it.
            Digest::Sha224 => None,
        };
        match ring_alg {
            Some(a) => ring::pbkdf2::derive(*a, self.iterations, salt, secret, out),
            None => pbkdf2::pbkdf2_hmac::<sha2::Sha224>(secret, salt, self.iterations.get(), out),
        }
    }
}

impl NervesAuth {
    pub(crate) fn new(
        path: PathBuf,
        min_iterations: u32,
        max_age_secs: u64,
    ) -> anyhow::Result<Self> {
        let keys = Keys::load(&path)?;
        Ok(NervesAuth {
            path,
            keys: RwLock::new(Arc::new(keys)),
            min_iterations,
            max_age_ms: max_age_secs * 1000,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Read the key file again (SIGHUP). Connections already authenticated stay; a bad
    /// file keeps the keys in use and is reported.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let keys = Keys::load(&self.path)?;
        let n = keys.0.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    #[cfg(test)]
    fn key_count(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).0.len()
    }

    /// Verify the headers at `now_ms`; who the device is, and whether this signature
    /// was seen before within its window.
    pub(crate) fn verify(&self, h: &Headers, now_ms: u64) -> Result<(Identity, Reuse), AuthError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let entry = keys.0.get(&h.key).ok_or(AuthError::Invalid)?;
        let alg = parse_alg(&h.alg).ok_or(AuthError::WeakAlgorithm)?;
        let (secret, accept) = match entry {
            Entry::Device { secret, accept, .. } | Entry::Product { secret, accept, .. } => {
                (secret, accept)
            }
        };
        let min_iterations = accept.min_iterations.unwrap_or(self.min_iterations);
        if accept.digests & alg.digest.bit() == 0
            || alg.iterations.get() < min_iterations
            || alg.length < accept.min_length
        {
            return Err(AuthError::WeakAlgorithm);
        }
        h.time.parse::<u64>().map_err(|_| AuthError::Invalid)?;
        let salt = format!(
            "NH1:device-socket:shared-secret:connect\n\nx-nh-alg={}\nx-nh-key={}\nx-nh-time={}\n",
            h.alg, h.key, h.time
        );
        let mut k = vec![0u8; alg.length];
        alg.derive(salt.as_bytes(), secret.as_bytes(), &mut k);
        let (identifier, signed_ms, mac) =
            open_token(&k, &h.signature).ok_or(AuthError::Invalid)?;
        if signed_ms > now_ms {
            return Err(AuthError::NotYetValid);
        }
        if now_ms - signed_ms > self.max_age_ms {
            return Err(AuthError::Expired);
        }
        let ident = match entry {
            Entry::Device {
                identifier: id,
                ident,
                ..
            } => {
                if *id != identifier {
                    return Err(AuthError::Invalid);
                }
                *ident
            }
            Entry::Product { account, .. } => {
                Identity::new(Uuid::new_v5(account, identifier.as_bytes()), *account)
            }
        };
        let reuse = self.first_use(mac, signed_ms + self.max_age_ms, now_ms);
        Ok((ident, reuse))
    }

    /// Has this signature been seen within its window? (It is remembered either way.)
    fn first_use(&self, mac: Vec<u8>, valid_until: u64, now_ms: u64) -> Reuse {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(&mac).is_some_and(|until| *until >= now_ms) {
            return Reuse::Again;
        }
        if seen.len() >= REPLAY_PURGE_AT {
            seen.retain(|_, until| *until >= now_ms);
        }
        seen.insert(mac, valid_until);
        Reuse::First
    }
}

/// `NH1-HMAC-<digest>-<iterations>-<length>` with a digest of sha/sha1/224/256/384/512,
/// iterations up to [`MAX_ITERATIONS`], a key of 1 to 64 bytes. None: not that. (What a
/// key accepts of these is its own: [`Accept`].)
fn parse_alg(s: &str) -> Option<Alg> {
    let rest = s.strip_prefix("NH1-HMAC-")?;
    let mut parts = rest.split('-');
    let digest = Digest::parse(parts.next()?)?;
    let iterations: u32 = parts.next()?.parse().ok()?;
    let length: usize = parts.next()?.parse().ok()?;
    if parts.next().is_some() || iterations > MAX_ITERATIONS || !(1..=64).contains(&length) {
        return None;
    }
    Some(Alg {
        digest,
        iterations: NonZeroU32::new(iterations)?,
        length,
    })
}

/// Check the token's MAC with key `k`; its identifier, signing time (ms) and MAC.
fn open_token(k: &[u8], token: &str) -> Option<(String, u64, Vec<u8>)> {
    let mut parts = token.split('.');
    let (protected, body, sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let mac_alg = match protected {
        "SFMyNTY" => ring::hmac::HMAC_SHA256,
        "SFMzODQ" => ring::hmac::HMAC_SHA384,
        "SFM1MTI" => ring::hmac::HMAC_SHA512,
        _ => return None,
    };
    let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mac = b64.decode(sig).ok()?;
    let signed = &token[..protected.len() + 1 + body.len()];
    ring::hmac::verify(&ring::hmac::Key::new(mac_alg, k), signed.as_bytes(), &mac).ok()?;
    let (identifier, signed_ms) = read_term(&b64.decode(body).ok()?)?;
    Some((identifier, signed_ms, mac))
}

/// `{Identifier :: binary, SignedAtMs :: integer, MaxAge :: integer}` in Erlang's
/// external term format (what `:erlang.term_to_binary/1` writes).
fn read_term(b: &[u8]) -> Option<(String, u64)> {
    let mut r = Reader(b);
    if r.u8()? != 131 {
        return None;
    }
    match r.u8()? {
        104 if r.u8()? == 3 => {}
        105 if r.u32()? == 3 => {}
        _ => return None,
    }
    if r.u8()? != 109 {
        return None;
    }
    let n = r.u32()? as usize;
    let identifier = String::from_utf8(r.take(n)?.to_vec()).ok()?;
    let signed = r.integer()?;
    r.integer()?;
    (r.0.is_empty() && signed >= 0).then_some((identifier, signed as u64))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    /// SMALL_INTEGER_EXT, INTEGER_EXT or SMALL_BIG_EXT (up to 8 bytes).
    fn integer(&mut self) -> Option<i64> {
        match self.u8()? {
            97 => Some(self.u8()?.into()),
            98 => Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?).into()),
            110 => {
                let n = self.u8()? as usize;
                let sign = self.u8()?;
                if n > 8 {
                    return None;
                }
                let mut v: u64 = 0;
                for (i, byte) in self.take(n)?.iter().enumerate() {
                    v |= u64::from(*byte) << (8 * i);
                }
                let v = i64::try_from(v).ok()?;
                Some(if sign == 0 { v } else { -v })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature a device computes (the client's recipe, written from its
    /// description): for tests and for `router nerves-sign`-style tooling.
    fn sign(
        secret: &str,
        key: &str,
        alg: &str,
        time: u64,
        identifier: &str,
        signed_ms: u64,
    ) -> String {
        let a = parse_alg(alg).unwrap();
        let salt = format!(
            "NH1:device-socket:shared-secret:connect\n\nx-nh-alg={alg}\nx-nh-key={key}\nx-nh-time={time}\n"
        );
        let mut k = vec![0u8; a.length];
        a.derive(salt.as_bytes(), secret.as_bytes(), &mut k);
        let mut term = vec![131, 104, 3, 109];
        term.extend_from_slice(&(identifier.len() as u32).to_be_bytes());
        term.extend_from_slice(identifier.as_bytes());
        term.extend_from_slice(&[110, 8, 0]);
        term.extend_from_slice(&signed_ms.to_le_bytes());
        term.extend_from_slice(&[98, 0, 1, 81, 128]);
        let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let plain = format!("SFMyNTY.{}", b64.encode(term));
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k),
            plain.as_bytes(),
        );
        format!("{plain}.{}", b64.encode(mac.as_ref()))
    }

    #[test]
    fn a_published_vector_verifies() {
        // A token as the Erlang client computes it (term_to_binary + crypto), for
        // secret `s3cr3t`, key `nhp_abc`, identifier `serial-1`, time 1760000000.
        let k = {
            let salt = "NH1:device-socket:shared-secret:connect\n\nx-nh-alg=NH1-HMAC-sha256-1000-32\nx-nh-key=nhp_abc\nx-nh-time=1760000000\n";
            let mut k = [0u8; 32];
            ring::pbkdf2::derive(
                ring::pbkdf2::PBKDF2_HMAC_SHA256,
                NonZeroU32::new(1000).unwrap(),
                salt.as_bytes(),
                b"s3cr3t",
                &mut k,
            );
            k
        };
        let token = "SFMyNTY.g2gDbQAAAAhzZXJpYWwtMW4GAADALMiZAWIAAVGA.0Uu07iOXjlsg5M70DwpeaUUsUBDEo8QFgrZ4IdXflUQ";
        let (id, ms, _) = open_token(&k, token).expect("verifies");
        assert_eq!((id.as_str(), ms), ("serial-1", 1_760_000_000_000));
        // One bit off in the MAC.
        assert!(open_token(&k, &token.replace("0Uu07", "1Uu07")).is_none());
    }

    #[test]
    fn algorithms() {
        assert!(parse_alg("NH1-HMAC-sha256-1000-32").is_some());
        assert!(parse_alg("NH1-HMAC-SHA512-2000-64").is_some());
        // What NervesHub accepts parses (whether a key accepts it is its own: below).
        for named in ["NH1-HMAC-sha-1000-32", "NH1-HMAC-sha224-10-16"] {
            assert!(parse_alg(named).is_some(), "{named}");
        }
        for bad in [
            "NH1-HMAC-md5-1000-32",
            "NH1-HMAC-sha256-0-32",
            "NH1-HMAC-sha256-1000-0",
            "NH1-HMAC-sha256-1000-65",
            "NH1-HMAC-sha256-1000000-32",
            "NH2-HMAC-sha256-1000-32",
            "NH1-HMAC-sha256-1000",
        ] {
            assert!(parse_alg(bad).is_none(), "{bad}");
        }
    }

    /// The defaults refuse sha1, sha224, short keys and fewer iterations; a key that says
    /// it accepts them (devices configured so) verifies them, with the exact PBKDF2.
    #[test]
    fn per_key_algorithms() {
        let dir = std::env::temp_dir().join(format!("nerves-alg-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(
            &path,
            format!(
                "[[device]]\nkey = \"nhd_strict\"\nsecret = \"s1\"\nidentifier = \"a\"\ndevice = \"{d}\"\naccount = \"{d}\"\n\n\
                 [[device]]\nkey = \"nhd_old\"\nsecret = \"s2\"\nidentifier = \"b\"\ndevice = \"{d}\"\naccount = \"{d}\"\n\
                 digests = [\"sha\", \"sha224\", \"sha256\"]\nmin_iterations = 100\nmin_key_length = 16\n",
                d = Uuid::from_u128(1)
            ),
        )
        .unwrap();
        let a = NervesAuth::new(path.clone(), 1000, 90).unwrap();
        let now = 1_760_000_000_000u64;
        let h = |secret: &str, key: &str, id: &str, alg: &str, t: u64| Headers {
            alg: alg.into(),
            key: key.into(),
            time: t.to_string(),
            signature: sign(secret, key, alg, t, id, now),
        };
        for (i, alg) in [
            "NH1-HMAC-sha-1000-32",
            "NH1-HMAC-sha224-1000-32",
            "NH1-HMAC-sha256-500-32",
            "NH1-HMAC-sha256-1000-16",
        ]
        .iter()
        .enumerate()
        {
            let t = now / 1000 + i as u64;
            assert_eq!(
                a.verify(&h("s1", "nhd_strict", "a", alg, t), now),
                Err(AuthError::WeakAlgorithm),
                "{alg}"
            );
            assert!(
                a.verify(&h("s2", "nhd_old", "b", alg, t), now).is_ok(),
                "{alg}"
            );
        }
        // Still not below what the key says.
        assert_eq!(
            a.verify(&h("s2", "nhd_old", "b", "NH1-HMAC-sha512-1000-32", 9), now),
            Err(AuthError::WeakAlgorithm)
        );
        assert_eq!(
            a.verify(&h("s2", "nhd_old", "b", "NH1-HMAC-sha256-50-32", 9), now),
            Err(AuthError::WeakAlgorithm)
        );
        // A digest the file names wrong stops the load.
        std::fs::write(&path, "[[product]]\nkey = \"nhp_x\"\nsecret = \"s\"\naccount = \"00000000-0000-0000-0000-000000000003\"\ndigests = [\"md5\"]\n").unwrap();
        assert!(a.reload().is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    fn auth(dir: &Path) -> NervesAuth {
        let path = dir.join("keys.toml");
        std::fs::write(
            &path,
            format!(
                "[[device]]\nkey = \"nhd_1\"\nsecret = \"sec1\"\nidentifier = \"serial-1\"\ndevice = \"{}\"\naccount = \"{}\"\n\n[[product]]\nkey = \"nhp_p\"\nsecret = \"psec\"\naccount = \"{}\"\n",
                Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)
            ),
        )
        .unwrap();
        NervesAuth::new(path, 1000, 90).unwrap()
    }

    fn headers(secret: &str, key: &str, id: &str, time: u64, signed_ms: u64) -> Headers {
        let alg = "NH1-HMAC-sha256-1000-32";
        Headers {
            alg: alg.into(),
            key: key.into(),
            time: time.to_string(),
            signature: sign(secret, key, alg, time, id, signed_ms),
        }
    }

    #[test]
    fn device_and_product_keys_expiry_and_replay() {
        let dir = std::env::temp_dir().join(format!("nerves-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = auth(&dir);
        let now = 1_760_000_000_000u64;
        let h = headers("sec1", "nhd_1", "serial-1", now / 1000, now);
        let (ident, reuse) = a.verify(&h, now + 5).unwrap();
        assert_eq!((ident.device, reuse), (Uuid::from_u128(1), Reuse::First));
        // The same signature again is told apart (the listener decides: see handshake).
        assert_eq!(a.verify(&h, now + 6).unwrap().1, Reuse::Again);
        // Wrong secret, another identifier for a device key, expired, from the future.
        assert_eq!(
            a.verify(&headers("nope", "nhd_1", "serial-1", 1, now), now),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            a.verify(&headers("sec1", "nhd_1", "serial-2", 1, now), now),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            a.verify(&headers("sec1", "nhd_1", "serial-1", 2, now), now + 91_000),
            Err(AuthError::Expired)
        );
        assert_eq!(
            a.verify(&headers("sec1", "nhd_1", "serial-1", 3, now + 5000), now),
            Err(AuthError::NotYetValid)
        );
        // Unknown key; a product key names any identifier, always the same UUID for one.
        assert_eq!(
            a.verify(&headers("sec1", "nhd_9", "serial-1", 4, now), now),
            Err(AuthError::Invalid)
        );
        let p1 = a
            .verify(&headers("psec", "nhp_p", "serial-7", 5, now), now)
            .unwrap()
            .0;
        let p2 = a
            .verify(&headers("psec", "nhp_p", "serial-7", 6, now), now)
            .unwrap()
            .0;
        assert_eq!((p1, p1.account), (p2, Uuid::from_u128(3)));
        // Weaker than configured.
        let strict = NervesAuth::new(dir.join("keys.toml"), 5000, 90).unwrap();
        assert_eq!(
            strict.verify(&headers("sec1", "nhd_1", "serial-1", 7, now), now),
            Err(AuthError::WeakAlgorithm)
        );
        // Reload: a removed key stops working; a bad file keeps the old keys.
        std::fs::write(dir.join("keys.toml"), "[[product]]\nkey = \"nhp_q\"\nsecret = \"x\"\naccount = \"00000000-0000-0000-0000-000000000003\"\n").unwrap();
        assert_eq!(a.reload().unwrap(), 1);
        assert_eq!(
            a.verify(&headers("psec", "nhp_p", "serial-7", 8, now), now),
            Err(AuthError::Invalid)
        );
        std::fs::write(dir.join("keys.toml"), "nonsense = [").unwrap();
        assert!(a.reload().is_err());
        assert_eq!(a.key_count(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn terms() {
        let mut t = vec![131, 104, 3, 109, 0, 0, 0, 1, b'x', 98, 0, 0, 1, 0, 97, 5];
        assert_eq!(read_term(&t), Some(("x".into(), 256)));
        t.push(0);
        assert_eq!(read_term(&t), None);
        assert_eq!(read_term(&[131, 104, 2]), None);
    }
}
