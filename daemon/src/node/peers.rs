//! The netmap side of the node: peers added, changed and removed, and what the
//! node reports about a peer (`overlayctl status`/`why`).

use std::net::IpAddr;
use std::time::Instant;

use overlay_proto::coord::PeerInfo;
use overlay_proto::filter::NodeFilter;
use overlay_proto::signal::NatSummary;
use overlay_proto::NodeId;

use super::access;
use super::netmap::{self, Change};
use super::path::{IceStatus, PathState};
use super::{Node, Output, PathView, PeerEntry};
use crate::identity::decode_public_key;

/// What the node knows about one peer, for `overlayctl why`.
#[derive(Debug, Clone)]
pub struct PeerReport {
    pub info: PeerInfo,
    pub controlling: bool,
    pub view: PathView,
    /// An ICE session is checking right now.
    pub checking: bool,
    /// When the next attempt at ICE is due, if one is scheduled.
    pub next_attempt: Option<Instant>,
    pub remote_nat: Option<NatSummary>,
    pub coordinator_connected: bool,
}

impl Node {
    /// Applies a complete netmap: peers added, changed and gone.
    pub(super) fn apply_netmap(&mut self, peers: &[PeerInfo], now: Instant) {
        for change in netmap::diff(&self.netmap, peers, self.me) {
            self.apply(change, now);
        }
    }

    pub(super) fn apply(&mut self, change: Change, now: Instant) {
        match change {
            Change::Add(info) => self.add_peer(info, now),
            Change::Update(info) => {
                self.update_peer(&info, now);
                self.netmap.insert(info.id, info);
            }
            Change::Remove(id) => {
                self.end_session(id);
                if let Some(info) = self.netmap.remove(&id) {
                    tracing::info!("peer {} ({}) removed", info.name, info.mesh_ip);
                }
                self.awake.remove(&id);
                if self.peers.remove(&id).is_some() {
                    self.outputs.push_back(Output::PeerRemoved(id));
                }
                self.signaling.forget(id, now);
            }
        }
    }

    fn add_peer(&mut self, info: PeerInfo, now: Instant) {
        let Some(key) = decode_public_key(&info.public_key) else {
            tracing::warn!(
                peer = info.id,
                "ignoring peer {} with a malformed public key",
                info.name
            );
            return;
        };
        // Role by key order: the smaller key controls ICE.
        let controlling = self.public_key < key;
        // With laziness on, a new peer starts idle: no ICE, no keepalives
        // until the first packet to or from it (see `idle.rs`).
        let lazy = self.idle_timeout.is_some();
        tracing::info!(
            "peer {} ({}) added{}",
            info.name,
            info.mesh_ip,
            match (info.online, lazy) {
                (false, _) => ", offline",
                (true, true) => ", idle until traffic",
                (true, false) => "",
            }
        );
        let id = info.id;
        let mut path = PathState::new(controlling, info.online, now);
        if lazy {
            path.sleep();
        } else {
            self.awake.insert(id);
        }
        let mut entry = PeerEntry {
            info: info.clone(),
            controlling,
            path,
            session: None,
            route: None,
            remote_nat: None,
            activity: super::idle::Activity::new(now, lazy),
        };
        // An idle peer is never polled: its route is set here, and logged
        // with the line above.
        let route = lazy.then(|| entry.current_route());
        entry.route = route.clone();
        self.peers.insert(id, entry);
        self.outputs.push_back(Output::PeerAdded {
            access: access::compile(self.filter.as_ref(), &info),
            info: info.clone(),
            public_key: key,
        });
        if let Some(route) = route {
            self.outputs.push_back(Output::Idle {
                peer: id,
                idle: true,
            });
            self.outputs.push_back(Output::Path { peer: id, route });
        }
        if info.online && !lazy {
            self.send_nat(id, now);
        }
        self.netmap.insert(id, info);
    }

    fn update_peer(&mut self, info: &PeerInfo, now: Instant) {
        let Some(entry) = self.peers.get_mut(&info.id) else {
            return;
        };
        let was_online = entry.info.online;
        let idle = entry.activity.is_idle();
        let tags_changed = entry.info.tags != info.tags;
        entry.info = info.clone();
        if tags_changed && self.filter.is_some() {
            self.outputs.push_back(Output::Access {
                peer: info.id,
                access: access::compile(self.filter.as_ref(), info),
            });
        }
        if was_online != info.online {
            tracing::info!(
                "peer {} ({}) is {}",
                info.name,
                info.mesh_ip,
                if info.online { "online" } else { "offline" }
            );
            if entry.path.set_online(info.online, now) {
                self.end_session(info.id);
            }
            if info.online && !idle {
                self.send_nat(info.id, now);
            }
        }
        self.outputs.push_back(Output::PeerUpdated(info.clone()));
        self.sync_path(info.id);
    }

    /// The peer that `target` names: a mesh address (IPv4 or IPv6) or a name.
    pub fn find_peer(&self, target: &str) -> Option<NodeId> {
        match target.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => self.peers.values().find(|p| p.info.mesh_ip == ip),
            Ok(IpAddr::V6(ip)) => self.peers.values().find(|p| p.info.mesh_ip6 == Some(ip)),
            Err(_) => {
                let mut named: Vec<_> = self
                    .peers
                    .values()
                    .filter(|p| p.info.name == target)
                    .collect();
                named.sort_by_key(|p| p.info.mesh_ip);
                named.into_iter().next()
            }
        }
        .map(|p| p.info.id)
    }

    pub fn peer_report(&self, id: NodeId) -> Option<PeerReport> {
        let entry = self.peers.get(&id)?;
        // A retry is scheduled only once a session failed (or none ran yet); a
        // disconnected pair may still recover by itself.
        let scheduled = matches!(entry.path.status(), IceStatus::Failed | IceStatus::Idle)
            && !entry.activity.is_idle();
        let view = entry.current_route().view;
        let next_attempt =
            (view.kind != overlay_proto::api::PathKind::Direct && entry.info.online && scheduled)
                .then(|| entry.path.next_attempt());
        Some(PeerReport {
            info: entry.info.clone(),
            controlling: entry.controlling,
            view,
            checking: entry.checking(),
            next_attempt,
            remote_nat: entry.remote_nat.clone(),
            coordinator_connected: self.coordinator_connected,
        })
    }

    /// Our latest netcheck summary.
    pub fn nat(&self) -> Option<&NatSummary> {
        self.nat.as_ref()
    }

    /// The session currently open with `id`, if any.
    pub fn session(&self, id: NodeId) -> Option<u64> {
        self.peers.get(&id)?.session.as_ref().map(|s| s.id)
    }

    /// Whether `id` is in the netmap with a usable key.
    pub fn has_peer(&self, id: NodeId) -> bool {
        self.peers.contains_key(&id)
    }

    /// The access rules in force; `None`: no policy, everything allowed.
    pub fn filter(&self) -> Option<&NodeFilter> {
        self.filter.as_ref()
    }

    /// What the policy lets through with `id` (`None`: no policy).
    pub fn access(&self, id: NodeId) -> Option<access::PeerAccess> {
        access::compile(self.filter.as_ref(), &self.peers.get(&id)?.info)
    }

    /// A new filter from the coordinator: every peer's access is resolved
    /// again and handed to the data plane.
    pub(super) fn set_filter(&mut self, filter: Option<NodeFilter>) {
        if filter == self.filter {
            return;
        }
        match &filter {
            Some(f) => tracing::info!(
                "access policy in force: {} inbound and {} outbound rules",
                f.inbound.len(),
                f.outbound.len()
            ),
            None => tracing::info!("no access policy: every peer may reach every port"),
        }
        self.filter = filter;
        let mut ids: Vec<NodeId> = self.peers.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let access = access::compile(self.filter.as_ref(), &self.peers[&id].info);
            self.outputs.push_back(Output::Access { peer: id, access });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use overlay_proto::coord::IceConfig;

    use super::super::testkit::{info, new_node, welcome};

    #[test]
    fn a_peer_is_found_by_name_or_either_mesh_address() {
        let t0 = Instant::now();
        let mut node = new_node(1, t0, 7);
        let mut b = info(2, true);
        b.mesh_ip6 = Some("fd7a:115c:a1e0::6440:2".parse().unwrap());
        let peers = vec![b, info(3, true)];
        node.handle_server_msg(welcome(peers, IceConfig::default(), false), t0, 0);
        assert_eq!(node.find_peer("100.64.0.2"), Some(2));
        assert_eq!(node.find_peer("fd7a:115c:a1e0::6440:2"), Some(2));
        assert_eq!(node.find_peer("n3"), Some(3));
        assert_eq!(node.find_peer("fd7a:115c:a1e0::6440:3"), None, "3 has none");
        assert_eq!(node.find_peer("100.64.0.9"), None);
    }
}
