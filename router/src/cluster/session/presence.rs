//! Presence: heartbeats, joins and leaves of the other nodes, this node's own heartbeat,
//! and the broker probes that decide whether a silent node is gone.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use lapin::{Channel, Connection};

use super::super::envelope::{ArchivedPresenceBody, PresenceBody, Received};
use super::super::membership::NodeId;
use super::super::seal::{Domain, PRESENCE_MAX_AGE_MS};
use super::super::Cluster;
use super::publisher::Publisher;
use super::state::{Served, State};
use super::topology::timed_probe;

pub(super) type ProbeFut<'a> = Pin<Box<dyn Future<Output = (NodeId, Option<bool>)> + 'a>>;

/// A message on this node's presence queue.
pub(super) async fn on_presence(
    st: &mut State,
    pubr: &mut Publisher,
    c: &Cluster,
    data: &[u8],
) -> lapin::Result<()> {
    let data = match c.key.open(Domain::Presence, "", data) {
        Ok((message, sent_ms)) if sent_ms.abs_diff(crate::unix_ms()) <= PRESENCE_MAX_AGE_MS => {
            message
        }
        _ => {
            let n = c.metrics.forged.fetch_add(1, Relaxed);
            // Said at the first and then every 1,000th: another deployment on this broker
            // and vhost sends its heartbeats here too (every second per node).
            if n.is_multiple_of(1000) {
                tracing::warn!(
                    unverified = n + 1,
                    "presence messages on hive.presence this node cannot verify: another \
                     deployment (another --cluster-name or secret) shares this broker and \
                     vhost, or someone forges them; they are ignored (give each deployment \
                     its own vhost)"
                );
            }
            return Ok(());
        }
    };
    let r = Received::new(data);
    let Ok(m) = r.presence() else {
        c.metrics.bad_envelopes.fetch_add(1, Relaxed);
        return Ok(());
    };
    if m.node.as_str() == st.me() {
        return Ok(()); // our own fanout copy
    }
    c.metrics.presence_received.fetch_add(1, Relaxed);
    let (inc, sess) = (m.incarnation.to_native(), m.session.to_native());
    match &m.body {
        ArchivedPresenceBody::Heartbeat { devices, accounts } => {
            if st
                .heard(m.node.as_str(), inc, sess, Some(devices.to_native()))
                .is_some()
            {
                st.heard_link(m.node.as_str(), m.link.as_str(), m.link_token.to_native());
                st.shared.tenants.heard(
                    m.node.as_str(),
                    accounts.iter().map(|a| (a.0.to_native(), a.1.to_native())),
                );
            }
        }
        ArchivedPresenceBody::Join => {
            if st.heard(m.node.as_str(), inc, sess, None).is_none() {
                return Ok(());
            }
            st.heard_link(m.node.as_str(), m.link.as_str(), m.link_token.to_native());
            // Answer at once so the newcomer knows us before it is ready (at most one
            // extra heartbeat per 100 ms, whoever joins).
            let recent = st
                .last_heartbeat
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100));
            if !recent {
                heartbeat(st, pubr, c).await?;
            }
        }
        ArchivedPresenceBody::Leaving => {
            if let Some(id) = st.members.id(m.node.as_str()) {
                c.metrics.nodes_left.fetch_add(1, Relaxed);
                st.gone(id);
            }
        }
    }
    Ok(())
}

async fn heartbeat(st: &mut State, pubr: &mut Publisher, c: &Cluster) -> lapin::Result<()> {
    st.last_heartbeat = Some(Instant::now());
    let devices = c.local_count();
    let tenants = &st.shared.tenants;
    let accounts = if tenants.max_devices > 0 {
        tenants.largest(crate::tenants::SHARED_ACCOUNTS)
    } else {
        Vec::new()
    };
    pubr.presence(st, PresenceBody::Heartbeat { devices, accounts })
        .await
}

/// Every [`super::super::HEARTBEAT`]: our heartbeat, probes of silent nodes, expiry of
/// what is remembered, and readiness once the join has waited long enough. Returns
/// false when the connection or channel is no longer up.
pub(super) async fn on_beat<'a>(
    st: &mut State,
    pubr: &mut Publisher,
    c: &Cluster,
    (conn, ch): (&'a Connection, &Channel),
    probes: &mut FuturesUnordered<ProbeFut<'a>>,
    joined_at: Instant,
) -> lapin::Result<bool> {
    heartbeat(st, pubr, c).await?;
    for (id, name) in st.members.suspects(Instant::now()) {
        tracing::info!(node = %name, "router node silent: asking the broker whether its queue exists");
        probes.push(Box::pin(timed_probe(conn, id, name)));
    }
    let now = Instant::now();
    st.dir.expire(now);
    st.served.retain(|_, s| match s {
        Served::InFlight { .. } => true,
        Served::Done(_, until) => *until > now,
    });
    if !c.joined() && now >= joined_at {
        c.joined.store(true, Relaxed);
        st.shared.update_ready();
        c.bump();
    }
    st.gauges();
    Ok(ch.status().connected() && conn.status().connected())
}

/// A probe's verdict on a silent node: gone (its queue is), alive, or undecided.
pub(super) fn on_probe(st: &mut State, c: &Cluster, id: NodeId, verdict: Option<bool>) {
    let m = &c.metrics;
    match verdict {
        Some(true) => m.probes_alive.fetch_add(1, Relaxed),
        Some(false) => m.probes_gone.fetch_add(1, Relaxed),
        None => m.probes_failed.fetch_add(1, Relaxed),
    };
    let name = st.members.name(id).map(str::to_string);
    if let Some(p) = st.members.probed(id, verdict, Instant::now()) {
        tracing::warn!(node = %p.name, "router node's queue is gone: removing it");
        m.nodes_expired.fetch_add(1, Relaxed);
        st.forget(id, &p.name);
    } else if verdict == Some(true) {
        tracing::info!(node = ?name, "router node silent but its queue exists: kept");
    }
}
