//! Netmap diffing: from the peer list we have and the one the coordinator sent,
//! the changes to apply. Plain data in, plain data out.

use std::collections::HashMap;

use overlay_proto::coord::PeerInfo;
use overlay_proto::NodeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add(PeerInfo),
    Remove(NodeId),
    /// Same node and key; name or online state changed.
    Update(PeerInfo),
}

/// Changes that turn `current` into `next`. A node whose key or mesh IP (either
/// family) changed is a different WireGuard peer, so it is removed and added
/// again. `me` is skipped.
pub fn diff(current: &HashMap<NodeId, PeerInfo>, next: &[PeerInfo], me: NodeId) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for peer in next.iter().filter(|p| p.id != me) {
        seen.insert(peer.id);
        changes.extend(upsert(current.get(&peer.id), peer));
    }
    let mut gone: Vec<_> = current
        .keys()
        .filter(|id| !seen.contains(id))
        .copied()
        .collect();
    gone.sort_unstable();
    changes.extend(gone.into_iter().map(Change::Remove));
    changes
}

/// The changes one `PeerUpsert` makes.
pub fn upsert(current: Option<&PeerInfo>, next: &PeerInfo) -> Vec<Change> {
    match current {
        None => vec![Change::Add(next.clone())],
        Some(old)
            if old.public_key != next.public_key
                || old.mesh_ip != next.mesh_ip
                || old.mesh_ip6 != next.mesh_ip6 =>
        {
            vec![Change::Remove(old.id), Change::Add(next.clone())]
        }
        Some(old) if old != next => vec![Change::Update(next.clone())],
        Some(_) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: NodeId, key: &str, online: bool) -> PeerInfo {
        PeerInfo {
            id,
            name: format!("n{id}"),
            mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
            mesh_ip6: None,
            public_key: key.into(),
            online,
            tags: Vec::new(),
        }
    }

    #[test]
    fn adds_updates_and_removes() {
        let current: HashMap<_, _> = [(2, peer(2, "k2", true)), (3, peer(3, "k3", true))]
            .into_iter()
            .collect();
        let next = vec![
            peer(1, "me", true),
            peer(2, "k2", false),
            peer(4, "k4", true),
        ];
        let changes = diff(&current, &next, 1);
        assert_eq!(
            changes,
            vec![
                Change::Update(peer(2, "k2", false)),
                Change::Add(peer(4, "k4", true)),
                Change::Remove(3),
            ]
        );
    }

    #[test]
    fn new_key_is_a_new_peer_and_no_change_is_nothing() {
        let old = peer(2, "k2", true);
        assert_eq!(
            upsert(Some(&old), &peer(2, "other", true)),
            vec![Change::Remove(2), Change::Add(peer(2, "other", true))]
        );
        assert!(upsert(Some(&old), &old.clone()).is_empty());
    }

    #[test]
    fn a_new_mesh_ipv6_address_is_a_new_peer() {
        // The data plane's address table and cryptokey routing take a peer's
        // addresses when it is added; a coordinator that starts giving IPv6
        // (or another prefix) makes each peer anew.
        let old = peer(2, "k2", true);
        let mut next = old.clone();
        next.mesh_ip6 = Some("fd7a:115c:a1e0::6440:2".parse().unwrap());
        assert_eq!(
            upsert(Some(&old), &next),
            vec![Change::Remove(2), Change::Add(next.clone())]
        );
        assert!(upsert(Some(&next), &next.clone()).is_empty());
    }
}
