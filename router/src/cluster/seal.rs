//! Authenticated envelopes between nodes: every message a node sends on `hive.nodes`,
//! `hive.presence` or a direct link carries a seal, an HMAC-SHA256 under the cluster key
//! over what it says and where it goes, and a node drops what does not verify
//! (`router_cluster_envelopes_forged_total`). The broker's credentials are not enough to
//! command a device: a backend consumer, or anyone else who can publish on the broker,
//! cannot write an envelope a node accepts, nor edit one it captured (the seal covers the
//! whole envelope and the node it is addressed to, so it cannot be sent to another node
//! either).
//!
//! Sealed bytes: `message | sent_unix_ms (u64 LE) | HMAC-SHA256(key, domain | len(to) as
//! u16 LE | to | message | sent_unix_ms)`. `domain` tells a node's envelope from a presence
//! message and from a link hello, so none can be passed off as another.
//!
//! What a seal does not stop: a broker user can publish again an envelope it saw, to the
//! node it was for. A request then reaches its device again under the same request UUID
//! within its deadline (the device sees a duplicate, as with any at-least-once delivery);
//! a presence message older than [`PRESENCE_MAX_AGE_MS`] by the receiver's clock is
//! dropped, so a node that died cannot be kept alive by replaying its heartbeats.
//!
//! The key is `--cluster-key-file` (or `ROUTER_CLUSTER_KEY`), at least 32 bytes; without
//! one it is derived from the token secret (HMAC-SHA256(secret, "hive-router cluster key
//! v1")), which every node of a cluster shares already.

use ring::hmac;

/// Bytes a seal adds to a message.
pub(crate) const SEAL_LEN: usize = 8 + TAG_LEN;
const TAG_LEN: usize = 32;
/// A presence message older than this (or this far ahead) by the receiver's clock is
/// dropped: heartbeats are sent every second and never wait in a queue.
pub(crate) const PRESENCE_MAX_AGE_MS: u64 = 60_000;

/// What a sealed message is, so that one cannot be passed off as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// An envelope for one node (`hive.nodes`, direct links); `to` is that node's id.
    Node,
    /// A presence message (`hive.presence`, to every node); `to` is empty.
    Presence,
    /// A direct link's hello; `to` is the connecting node's id.
    LinkHello,
    /// A deny-list entry on the `hive.denylist` stream; `to` is empty.
    Revocation,
}

impl Domain {
    fn label(self) -> &'static [u8] {
        match self {
            Domain::Node => b"hive-node-envelope-v1",
            Domain::Presence => b"hive-presence-v1",
            Domain::LinkHello => b"hive-link-hello-v1",
            Domain::Revocation => b"hive-denylist-entry-v1",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("too short to hold a seal")]
    Short,
    #[error("the seal does not verify under this cluster's key")]
    Forged,
}

/// The cluster key (see the module doc).
#[derive(Clone)]
pub struct ClusterKey(hmac::Key);

impl ClusterKey {
    pub fn new(key: &[u8]) -> Self {
        ClusterKey(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    /// The key derived from the token secret, for clusters that give none of their own.
    pub fn derived(secret: &[u8]) -> Self {
        let k = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, secret),
            b"hive-router cluster key v1",
        );
        ClusterKey::new(k.as_ref())
    }

    /// This key for the cluster named `name`: clusters with another name (or another
    /// key) on the same broker and vhost cannot read each other's messages, so they
    /// never merge.
    pub fn for_cluster(&self, name: &str) -> Self {
        let mut label = b"hive-router cluster name v1\0".to_vec();
        label.extend_from_slice(name.as_bytes());
        ClusterKey::new(hmac::sign(&self.0, &label).as_ref())
    }

    fn tag(&self, domain: Domain, to: &str, message: &[u8], sent_ms: u64) -> hmac::Tag {
        let to = &to.as_bytes()[..to.len().min(u16::MAX as usize)];
        hmac::sign(&self.0, &signed_input(domain, to, message, sent_ms))
    }

    /// Append the seal of `message`, sent now to `to`.
    pub fn seal(&self, domain: Domain, to: &str, mut message: Vec<u8>) -> Vec<u8> {
        self.seal_at(domain, to, &mut message, crate::unix_ms());
        message
    }

    fn seal_at(&self, domain: Domain, to: &str, message: &mut Vec<u8>, sent_ms: u64) {
        let tag = self.tag(domain, to, message, sent_ms);
        message.reserve(SEAL_LEN);
        message.extend_from_slice(&sent_ms.to_le_bytes());
        message.extend_from_slice(tag.as_ref());
    }

    /// The message of sealed bytes addressed to `to`, and when it was sent (Unix ms), if
    /// the seal verifies.
    pub fn open<'a>(
        &self,
        domain: Domain,
        to: &str,
        sealed: &'a [u8],
    ) -> Result<(&'a [u8], u64), SealError> {
        let (message, sent_ms, tag) = split(sealed)?;
        let to = &to.as_bytes()[..to.len().min(u16::MAX as usize)];
        // ring compares in constant time.
        hmac::verify(&self.0, &signed_input(domain, to, message, sent_ms), tag)
            .map_err(|_| SealError::Forged)?;
        Ok((message, sent_ms))
    }
}

/// The bytes a tag covers (for `hmac::verify`, which takes them whole).
fn signed_input(domain: Domain, to: &[u8], message: &[u8], sent_ms: u64) -> Vec<u8> {
    let label = domain.label();
    let mut v = Vec::with_capacity(label.len() + 2 + to.len() + message.len() + 8);
    v.extend_from_slice(label);
    v.extend_from_slice(&(to.len() as u16).to_le_bytes());
    v.extend_from_slice(to);
    v.extend_from_slice(message);
    v.extend_from_slice(&sent_ms.to_le_bytes());
    v
}

fn split(sealed: &[u8]) -> Result<(&[u8], u64, &[u8]), SealError> {
    if sealed.len() < SEAL_LEN {
        return Err(SealError::Short);
    }
    let (message, seal) = sealed.split_at(sealed.len() - SEAL_LEN);
    let (ts, tag) = seal.split_at(8);
    let sent_ms = u64::from_le_bytes(ts.try_into().map_err(|_| SealError::Short)?);
    Ok((message, sent_ms, tag))
}

/// The message of sealed bytes without checking the seal: only for this node's own
/// envelopes that the broker returned.
pub(crate) fn unsealed(sealed: &[u8]) -> &[u8] {
    split(sealed).map_or(sealed, |(m, _, _)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_verifies_only_unchanged_for_its_node_and_domain_under_its_key() {
        let k = ClusterKey::new(b"0123456789abcdef0123456789abcdef");
        let sealed = k.seal(Domain::Node, "node-a", b"hello".to_vec());
        assert_eq!(sealed.len(), 5 + SEAL_LEN);
        let (m, ts) = k.open(Domain::Node, "node-a", &sealed).unwrap();
        assert_eq!(m, b"hello");
        assert!(ts.abs_diff(crate::unix_ms()) < 5_000);
        // Another node, another domain, another key: refused.
        assert_eq!(
            k.open(Domain::Node, "node-b", &sealed),
            Err(SealError::Forged)
        );
        assert_eq!(
            k.open(Domain::Presence, "node-a", &sealed),
            Err(SealError::Forged)
        );
        let other = ClusterKey::new(b"0123456789abcdef0123456789abcdeF");
        assert_eq!(
            other.open(Domain::Node, "node-a", &sealed),
            Err(SealError::Forged)
        );
        // Any byte changed, the time included: refused.
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(
                k.open(Domain::Node, "node-a", &bad),
                Err(SealError::Forged),
                "byte {i}"
            );
        }
        assert_eq!(
            k.open(Domain::Node, "node-a", b"short"),
            Err(SealError::Short)
        );
        assert_eq!(unsealed(&sealed), b"hello");
        // The derived key is the same on every node that shares the secret.
        let (a, b) = (ClusterKey::derived(b"s"), ClusterKey::derived(b"s"));
        let s = a.seal(Domain::Presence, "", b"p".to_vec());
        assert!(b.open(Domain::Presence, "", &s).is_ok());
        assert!(ClusterKey::derived(b"t")
            .open(Domain::Presence, "", &s)
            .is_err());
        // Another cluster name, the same secret: another key.
        let named = a.for_cluster("blue");
        assert!(named.open(Domain::Presence, "", &s).is_err());
        let s2 = named.seal(Domain::Presence, "", b"p".to_vec());
        assert!(b
            .for_cluster("blue")
            .open(Domain::Presence, "", &s2)
            .is_ok());
        assert!(b
            .for_cluster("green")
            .open(Domain::Presence, "", &s2)
            .is_err());
    }
}
