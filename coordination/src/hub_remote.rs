//! The hub and the other replicas: where a node's session is when it is not
//! here, applied from what the bus says (`replica_nats.rs`).
//!
//! Each node has at most one session that counts: the highest [`Claim`]
//! (epoch, then replica id) heard for it. A claim below the highest epoch
//! the hub has seen for the node is stale and ignored; a claim above a
//! session here closes that session as replaced, so a node that moved to
//! another replica is reached there at once. A replica that goes quiet
//! (`replica::REPLICA_TIMEOUT`) keeps its claims for `replica::MOVE_GRACE`
//! while its nodes move: one that reconnects meanwhile takes over its claim
//! without ever showing offline; the claims left after the grace are dropped
//! and those nodes go offline for everyone until they reconnect elsewhere.

use std::collections::HashSet;

use super::*;
use crate::bus::ReplicaId;

/// Most claims kept for nodes not known yet; beyond, they wait for the next
/// presence refresh.
pub const MAX_PENDING_CLAIMS: usize = 65_536;

impl Hub {
    /// `node` has a session on `replica` opened with `epoch`.
    pub fn remote_online(&self, replica: ReplicaId, node: NodeId, epoch: u64) {
        let mut inner = self.write();
        self.claim(&mut inner, Claim { epoch, replica }, node);
    }

    /// The session of `node` on `replica` opened with `epoch` ended.
    pub fn remote_offline(&self, replica: ReplicaId, node: NodeId, epoch: u64) {
        let mut inner = self.write();
        let claim = Claim { epoch, replica };
        let Some(entry) = inner.nodes.get_mut(&node) else {
            if inner.pending.get(&node) == Some(&claim) {
                inner.pending.remove(&node);
            }
            return;
        };
        if entry.remote == Some(claim) {
            entry.remote = None;
            self.went_offline(node, entry);
        }
    }

    /// Every session `replica` has: claims it no longer makes are dropped.
    pub fn remote_presence(&self, replica: ReplicaId, nodes: &[(NodeId, u64)]) {
        let mut inner = self.write();
        let listed: HashSet<NodeId> = nodes.iter().map(|(n, _)| *n).collect();
        for (node, epoch) in nodes {
            self.claim(
                &mut inner,
                Claim {
                    epoch: *epoch,
                    replica,
                },
                *node,
            );
        }
        self.drop_claims(&mut inner, |id, claim| {
            claim.replica == replica && !listed.contains(&id)
        });
    }

    /// `replica` is gone (or this one lost the bus): its nodes are offline
    /// until they are heard of again.
    pub fn replica_gone(&self, replica: ReplicaId) {
        let mut inner = self.write();
        self.drop_claims(&mut inner, |_, claim| claim.replica == replica);
    }

    /// The sessions here, `(node, epoch)`, for the other replicas.
    pub fn local_presence(&self) -> Vec<(NodeId, u64)> {
        let inner = self.read();
        inner
            .nodes
            .iter()
            .filter_map(|(id, e)| e.live.as_ref().map(|l| (*id, l.epoch)))
            .collect()
    }

    /// A signal another replica routed here for `to`, already serialized.
    pub fn deliver_signal(&self, to: NodeId, text: &str) {
        let inner = self.read();
        let delivered = inner
            .nodes
            .get(&to)
            .and_then(|e| e.live.as_ref())
            .is_some_and(|live| {
                live.control
                    .try_send(Utf8Bytes::from(text.to_owned()))
                    .is_ok()
            });
        if delivered {
            self.metrics
                .signaling_messages
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.metrics
                .signaling_refused
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the node's records from the store again (after the bus was
    /// lost, enrolments made meanwhile through other replicas were missed).
    pub fn sync_nodes(&self, nodes: Vec<PeerInfo>) {
        for info in nodes {
            self.apply_upsert(info);
        }
    }

    /// Applies `claim` on `node` if it outbids what is known.
    fn claim(&self, inner: &mut Inner, claim: Claim, node: NodeId) {
        let Some(entry) = inner.nodes.get_mut(&node) else {
            let newer = inner.pending.get(&node).is_none_or(|c| claim > *c);
            if newer
                && (inner.pending.len() < MAX_PENDING_CLAIMS || inner.pending.contains_key(&node))
            {
                inner.pending.insert(node, claim);
            }
            return;
        };
        let me = self.bus.get().map_or(0, |b| b.replica);
        let current = match (&entry.live, entry.remote) {
            (Some(live), _) => Claim {
                epoch: live.epoch,
                replica: me,
            },
            (None, Some(remote)) => remote,
            // Offline: anything at or above the highest epoch seen.
            (None, None) => Claim {
                epoch: entry.epoch,
                replica: 0,
            },
        };
        if claim.replica == me || claim <= current {
            return;
        }
        let was_online = entry.is_online();
        if let Some(live) = entry.live.take() {
            let _ = live.close.send(CloseReason::Replaced);
            inner.online -= 1;
            self.record_presence(node, false);
        }
        entry.remote = Some(claim);
        entry.epoch = entry.epoch.max(claim.epoch);
        if !was_online {
            entry.set_online(true);
            let peer = entry.info.clone();
            let view = entry.view.clone();
            self.broadcast(node, &view, &ServerMsg::PeerUpsert { peer });
        }
    }

    fn drop_claims(&self, inner: &mut Inner, drop: impl Fn(NodeId, Claim) -> bool) {
        inner.pending.retain(|id, c| !drop(*id, *c));
        for (id, entry) in inner.nodes.iter_mut() {
            if entry.remote.is_some_and(|c| drop(*id, c)) {
                entry.remote = None;
                self.went_offline(*id, entry);
                // A replica that died cannot write its nodes offline in the
                // store (`nodes list`): every survivor does (the same row).
                if !entry.is_online() {
                    self.record_presence(*id, false);
                }
            }
        }
    }

    /// Tells everyone `entry` went offline, if it has no session left.
    fn went_offline(&self, id: NodeId, entry: &mut Entry) {
        if entry.is_online() {
            return;
        }
        entry.set_online(false);
        let peer = entry.info.clone();
        let view = entry.view.clone();
        self.broadcast(id, &view, &ServerMsg::PeerUpsert { peer });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::{BusLink, Outbound};

    const ME: ReplicaId = 100;

    fn hub(nodes: &[NodeId]) -> (Hub, crate::replica::Outbox) {
        let h = crate::hub::tests::hub(nodes, Limits::default());
        let (link, rx) = BusLink::new(ME);
        h.set_bus(Arc::new(link));
        (h, rx)
    }

    fn online_in_netmap(h: &Hub, id: NodeId) -> bool {
        h.read().nodes[&id].info.online
    }

    #[test]
    fn a_node_elsewhere_is_online_and_reached_over_the_bus() {
        let (h, mut out) = hub(&[1, 2]);
        let a = h.attach(1).unwrap();
        let mut deltas = a.deltas;
        h.remote_online(7, 2, 1);
        assert!(online_in_netmap(&h, 2));
        assert!(!h.is_online(2), "not a session here");
        // After its own session's upsert.
        assert!(matches!(
            deltas.try_recv(),
            Ok(Delta::Peer { about: 1, .. })
        ));
        assert!(matches!(
            deltas.try_recv(),
            Ok(Delta::Peer { about: 2, .. })
        ));
        while out.try_recv().is_ok() {}
        h.signal(1, 2, "hi".into()).unwrap();
        let Ok(Outbound::Inbox { to: 7, msg }) = out.try_recv() else {
            panic!("no inbox message for replica 7");
        };
        let crate::bus::Inbox::Signal { to: 2, text } = crate::bus::Inbox::parse(&msg).unwrap()
        else {
            panic!("not a signal for node 2");
        };
        assert!(text.contains(r#""from":1"#));
        h.relay_batch(1, &a.stats, [(2, &b"x"[..]), (2, &b"yz"[..])], 40);
        let Ok(Outbound::Inbox { to: 7, msg }) = out.try_recv() else {
            panic!("no relay message for replica 7");
        };
        assert!(
            out.try_recv().is_err(),
            "one bus message per batch and replica"
        );
        let crate::bus::Inbox::Relay(records) = crate::bus::Inbox::parse(&msg).unwrap() else {
            panic!("not relay");
        };
        let got: Vec<_> = crate::bus::relay_records(records).collect();
        assert_eq!(got, vec![(2, 1, &b"x"[..]), (2, 1, &b"yz"[..])]);
        h.remote_offline(7, 2, 1);
        assert!(!online_in_netmap(&h, 2));
        assert_eq!(h.signal(1, 2, "hi".into()), Err(SignalError::PeerOffline));
    }

    #[test]
    fn a_newer_claim_elsewhere_closes_the_session_here_and_stale_ones_are_ignored() {
        let (h, mut out) = hub(&[1]);
        let mut a = h.attach(1).unwrap();
        let Ok(Outbound::Event(Event::Online { node: 1, epoch })) = out.try_recv() else {
            panic!("attach not announced");
        };
        assert!(
            epoch >= crate::bus::epoch_now() - 60_000,
            "at least the clock"
        );
        h.remote_online(7, 1, epoch);
        assert!(h.is_online(1), "a tie at a lower replica id loses");
        h.remote_online(7, 1, epoch + 1);
        assert_eq!(a.close.try_recv(), Ok(CloseReason::Replaced));
        assert!(!h.is_online(1));
        assert!(online_in_netmap(&h, 1));
        assert!(
            !h.detach(1, a.session_id),
            "the replaced session's end changes nothing"
        );
        h.remote_online(8, 1, epoch);
        assert_eq!(h.read().nodes[&1].remote.unwrap().replica, 7, "stale claim");
        // Back here: the new session outbids what it heard.
        let b = h.attach(1).unwrap();
        assert!(h.read().nodes[&1].live.as_ref().unwrap().epoch > epoch + 1);
        h.remote_offline(7, 1, epoch + 1);
        assert!(h.is_online(1));
        drop(b);
    }

    #[test]
    fn a_gone_replica_or_a_presence_list_without_a_node_takes_it_offline() {
        let (h, _out) = hub(&[1, 2, 3]);
        h.remote_presence(7, &[(1, 1), (2, 1)]);
        h.remote_presence(8, &[(3, 1)]);
        assert!(online_in_netmap(&h, 1) && online_in_netmap(&h, 2) && online_in_netmap(&h, 3));
        h.remote_presence(7, &[(2, 1)]);
        assert!(!online_in_netmap(&h, 1));
        h.replica_gone(7);
        assert!(!online_in_netmap(&h, 2));
        assert!(online_in_netmap(&h, 3));
        // A node that reconnects elsewhere after its replica died comes back.
        h.remote_online(8, 2, 2);
        assert!(online_in_netmap(&h, 2));
    }

    #[test]
    fn a_session_announced_before_its_enrolment_counts_when_the_node_arrives() {
        let (h, _out) = hub(&[1]);
        let a = h.attach(1).unwrap();
        let mut deltas = a.deltas;
        while deltas.try_recv().is_ok() {}
        h.remote_online(7, 5, 10);
        h.remote_online(7, 6, 10);
        h.remote_offline(7, 6, 10);
        h.replica_gone(8);
        let peer = |id: NodeId| PeerInfo {
            id,
            name: format!("n{id}"),
            mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
            mesh_ip6: None,
            public_key: format!("k{id}"),
            online: false,
            tags: Vec::new(),
        };
        h.apply_upsert(peer(5));
        h.apply_upsert(peer(6));
        assert!(online_in_netmap(&h, 5), "the waiting claim applies");
        assert!(!online_in_netmap(&h, 6), "its session ended meanwhile");
        let Ok(Delta::Peer { about: 5, text, .. }) = deltas.try_recv() else {
            panic!("no upsert of node 5");
        };
        assert!(text.contains(r#""online":true"#), "{text}");
        assert!(h.read().pending.is_empty());
    }

    /// What `netmap_digest` must say: the digest of the netmap `me` would
    /// be sent now, read the way a session reads it.
    fn digest_of_pages(h: &Hub, me: NodeId) -> u64 {
        let mut peers = Vec::new();
        let mut from = 0;
        loop {
            let page = h.netmap_page(me, from, 1 << 20);
            peers.extend(
                page.peers
                    .iter()
                    .map(|j| serde_json::from_str::<PeerInfo>(j).unwrap()),
            );
            match page.next {
                Some(next) => from = next,
                None => return overlay_proto::coord::netmap_digest(&peers),
            }
        }
    }

    #[test]
    fn the_netmap_digest_follows_every_change() {
        let (h, _out) = hub(&[1, 2, 3]);
        let check = |h: &Hub| {
            for me in [1, 2, 3] {
                if h.contains(me) {
                    assert_eq!(
                        h.netmap_digest(me),
                        Some(digest_of_pages(h, me)),
                        "node {me}"
                    );
                }
            }
        };
        check(&h);
        let a = h.attach(1).unwrap();
        check(&h);
        h.remote_online(7, 2, 1);
        check(&h);
        h.replica_gone(7);
        check(&h);
        h.apply_upsert(PeerInfo {
            id: 4,
            name: "n4".into(),
            mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, 4),
            mesh_ip6: None,
            public_key: "k4".into(),
            online: false,
            tags: Vec::new(),
        });
        check(&h);
        h.remove(3);
        check(&h);
        h.detach(1, a.session_id);
        check(&h);
        assert_eq!(h.netmap_digest(3), None, "a removed node holds nothing");
    }

    #[test]
    fn an_upsert_from_the_bus_is_not_sent_back() {
        let (h, mut out) = hub(&[1]);
        let peer = PeerInfo {
            id: 5,
            name: "new".into(),
            mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, 5),
            mesh_ip6: None,
            public_key: "k5".into(),
            online: true,
            tags: Vec::new(),
        };
        h.apply_upsert(peer.clone());
        assert!(out.try_recv().is_err());
        assert!(h.contains(5));
        assert!(!online_in_netmap(&h, 5), "online only by a claim");
        h.upsert(PeerInfo { id: 6, ..peer });
        assert!(matches!(
            out.try_recv(),
            Ok(Outbound::Event(Event::Upsert { .. }))
        ));
    }
}
