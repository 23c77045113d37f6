//! Which netmap this node holds, as a digest the coordinator can check
//! (`NETMAP_DIGEST_HEADER`): when the node reconnects, to the same replica
//! or another, a coordinator that finds the node's netmap current answers
//! with a `Welcome` that says `resumed` instead of sending the mesh again.
//!
//! Sans-IO: [`HeldNetmap::observe`] sees every message the node core is
//! handed, in the same order, and follows the netmap the node core builds
//! from them (a whole netmap replaces what was held, deltas change one peer).
//! The node's own record is never part of it, as the server leaves it out.

use std::collections::HashMap;

use overlay_proto::coord::{peer_digest, ServerMsg};
use overlay_proto::NodeId;

#[derive(Debug)]
pub struct HeldNetmap {
    me: NodeId,
    /// Each held peer's `peer_digest`; `None` until a whole netmap arrived.
    peers: Option<HashMap<NodeId, u64>>,
    /// A netmap arriving in parts, not applied until its last one.
    incoming: Option<HashMap<NodeId, u64>>,
}

impl HeldNetmap {
    pub fn new(me: NodeId) -> HeldNetmap {
        HeldNetmap {
            me,
            peers: None,
            incoming: None,
        }
    }

    /// The digest to send when connecting; `None` before the first whole
    /// netmap.
    pub fn digest(&self) -> Option<u64> {
        let peers = self.peers.as_ref()?;
        Some(overlay_proto::coord::combine_digests(
            peers.values().copied(),
        ))
    }

    /// The session ended: a netmap cut short is dropped, as the node core
    /// drops it.
    pub fn session_ended(&mut self) {
        self.incoming = None;
    }

    /// A message the node core is handed.
    pub fn observe(&mut self, msg: &ServerMsg) {
        let me = self.me;
        let digests = |peers: &[overlay_proto::coord::PeerInfo]| {
            peers
                .iter()
                .filter(|p| p.id != me)
                .map(|p| (p.id, peer_digest(p)))
                .collect::<Vec<_>>()
        };
        match msg {
            // The node keeps what it holds, and so do we.
            ServerMsg::Welcome { resumed: true, .. } => self.incoming = None,
            ServerMsg::Welcome { peers, more, .. } => {
                let incoming: HashMap<NodeId, u64> = digests(peers).into_iter().collect();
                if *more {
                    self.incoming = Some(incoming);
                } else {
                    self.incoming = None;
                    self.peers = Some(incoming);
                }
            }
            ServerMsg::PeerBatch { peers, last } => {
                let Some(incoming) = self.incoming.as_mut() else {
                    return;
                };
                incoming.extend(digests(peers));
                if *last {
                    self.peers = self.incoming.take();
                }
            }
            ServerMsg::PeerUpsert { peer } if peer.id != me => {
                if let Some(peers) = self.peers.as_mut() {
                    peers.insert(peer.id, peer_digest(peer));
                }
            }
            ServerMsg::PeerRemoved { id } => {
                if let Some(peers) = self.peers.as_mut() {
                    peers.remove(id);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_proto::coord::{netmap_digest, IceConfig, PeerInfo};

    fn peer(id: NodeId, online: bool) -> PeerInfo {
        PeerInfo {
            id,
            name: format!("n{id}"),
            mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
            mesh_ip6: None,
            public_key: format!("k{id}"),
            online,
            tags: Vec::new(),
        }
    }

    fn welcome(peers: Vec<PeerInfo>, more: bool, resumed: bool) -> ServerMsg {
        ServerMsg::Welcome {
            protocol: overlay_proto::PROTOCOL_VERSION,
            node: peer(1, true),
            network: "100.64.0.0/10".parse().unwrap(),
            network6: None,
            peers,
            ice: IceConfig {
                stun: vec![],
                turn: vec![],
                netcheck: vec![],
            },
            more,
            filter: None,
            resumed,
        }
    }

    #[test]
    fn the_digest_follows_the_netmap_and_its_deltas() {
        let mut held = HeldNetmap::new(1);
        assert_eq!(held.digest(), None, "nothing held yet");
        held.observe(&welcome(vec![peer(2, true), peer(3, false)], false, false));
        assert_eq!(
            held.digest(),
            Some(netmap_digest(&[peer(2, true), peer(3, false)]))
        );
        held.observe(&ServerMsg::PeerUpsert {
            peer: peer(3, true),
        });
        held.observe(&ServerMsg::PeerUpsert {
            peer: peer(4, true),
        });
        held.observe(&ServerMsg::PeerRemoved { id: 2 });
        // Our own record is not part of it.
        held.observe(&ServerMsg::PeerUpsert {
            peer: peer(1, false),
        });
        let expected = Some(netmap_digest(&[peer(3, true), peer(4, true)]));
        assert_eq!(held.digest(), expected);
        // Resumed: kept as it is.
        held.observe(&welcome(vec![], false, true));
        assert_eq!(held.digest(), expected);
        // A whole netmap replaces it.
        held.observe(&welcome(vec![peer(5, false)], false, false));
        assert_eq!(held.digest(), Some(netmap_digest(&[peer(5, false)])));
    }

    #[test]
    fn a_netmap_in_parts_counts_once_complete_and_not_when_cut_short() {
        let mut held = HeldNetmap::new(1);
        held.observe(&welcome(vec![peer(2, true)], true, false));
        assert_eq!(held.digest(), None, "only the first part");
        held.observe(&ServerMsg::PeerBatch {
            peers: vec![peer(3, true)],
            last: true,
        });
        let whole = Some(netmap_digest(&[peer(2, true), peer(3, true)]));
        assert_eq!(held.digest(), whole);

        // The next session's netmap is cut short: the old one is still held.
        held.observe(&welcome(vec![peer(2, false)], true, false));
        held.session_ended();
        held.observe(&ServerMsg::PeerBatch {
            peers: vec![peer(4, true)],
            last: true,
        });
        assert_eq!(held.digest(), whole);
    }
}
