//! What a Hivekit connection is judged against and keeps between frames: the device
//! and its realm, and its pubsub subscriptions.

use uuid::Uuid;

use super::{MAX_SUBSCRIPTIONS, REQUEST_EVENT};
use crate::protocol::hive::Meta;

/// What an action is judged against: who the device is and its realm.
pub struct Session<'a> {
    pub meta: &'a Meta,
    pub realm: &'a str,
}

/// A connection's pubsub subscriptions: (event name, id pattern), in the order made.
#[derive(Debug, Default)]
pub struct Subscriptions {
    subs: Vec<(Box<str>, Box<str>)>,
}

impl Subscriptions {
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// The subscriptions a backend event of type `ty` (or a request) reaches: the event
    /// named exactly, or `*` for every backend event (requests excluded), with the id
    /// pattern `*` or the device's own id.
    pub(super) fn receiving<'s>(
        &'s self,
        ty: &'s str,
        device: &'s str,
    ) -> impl Iterator<Item = (&'s str, &'s str)> + 's {
        self.subs.iter().filter_map(move |(eve, idp)| {
            let by_name = &**eve == ty || (&**eve == "*" && ty != REQUEST_EVENT);
            (by_name && (&**idp == "*" || &**idp == device)).then_some((&**eve, &**idp))
        })
    }

    /// Does the connection receive requests?
    pub(super) fn receives_requests(&self, device: &Uuid) -> bool {
        let mut buf = Uuid::encode_buffer();
        let own = device.hyphenated().encode_lower(&mut buf);
        let found = self.receiving(REQUEST_EVENT, own).next().is_some();
        found
    }

    /// Add a subscription unless the connection holds it already; false when that
    /// would make more than [`MAX_SUBSCRIPTIONS`].
    pub(super) fn add(&mut self, eve: &str, idp: &str) -> bool {
        if self.position(eve, idp).is_none() {
            if self.subs.len() >= MAX_SUBSCRIPTIONS {
                return false;
            }
            self.subs.push((eve.into(), idp.into()));
        }
        true
    }

    /// Drop a subscription, if the connection holds it.
    pub(super) fn remove(&mut self, eve: &str, idp: &str) {
        if let Some(i) = self.position(eve, idp) {
            self.subs.remove(i);
        }
    }

    fn position(&self, eve: &str, idp: &str) -> Option<usize> {
        self.subs
            .iter()
            .position(|(e, p)| **e == *eve && **p == *idp)
    }
}
