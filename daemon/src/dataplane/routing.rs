//! Routing inside the mesh: which peer a packet read from the TUN goes to
//! (by its IPv4 or IPv6 destination), from the table of every peer under each
//! of its mesh addresses.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use overlay_proto::NodeId;

use super::peer::Peer;
use super::{icmp, ip6};

#[derive(Default)]
pub(super) struct PeerTable {
    pub(super) by_id: HashMap<NodeId, Arc<Peer>>,
    /// Every peer under each of its mesh addresses (IPv4, and IPv6 when it
    /// has one): cryptokey routing's table.
    pub(super) by_ip: HashMap<IpAddr, Arc<Peer>>,
    /// Peers whose selected ICE pair is on our shared UDP socket, by the pair's
    /// remote address: datagrams from there are theirs.
    pub(super) by_endpoint: HashMap<SocketAddr, Arc<Peer>>,
}

impl PeerTable {
    pub(super) fn insert(&mut self, peer: Arc<Peer>) {
        self.by_ip.insert(peer.mesh_ip.into(), peer.clone());
        if let Some(v6) = peer.mesh_ip6 {
            self.by_ip.insert(v6.into(), peer.clone());
        }
        self.by_id.insert(peer.id, peer);
    }

    /// Takes peer `id` out of the id and address tables (an address a newer
    /// peer took over stays that peer's).
    pub(super) fn remove(&mut self, id: NodeId) -> Option<Arc<Peer>> {
        let peer = self.by_id.remove(&id)?;
        let addrs = [
            Some(IpAddr::from(peer.mesh_ip)),
            peer.mesh_ip6.map(IpAddr::from),
        ];
        for ip in addrs.into_iter().flatten() {
            if self.by_ip.get(&ip).is_some_and(|p| p.id == id) {
                self.by_ip.remove(&ip);
            }
        }
        Some(peer)
    }
}

/// The destination to route a packet read from the TUN by: an IPv4 or a
/// (not link-scoped) IPv6 destination; `None` for anything else.
#[inline]
pub(super) fn route_dst(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => icmp::ipv4_addrs(packet).map(|(_, dst)| dst.into()),
        6 => ip6::addrs(packet)
            .map(|(_, dst)| dst)
            .filter(|dst| !ip6::link_scoped(*dst))
            .map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::icmp6;
    use crate::dataplane::peer::tests::peer_with;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v6(last: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0x6440, last)
    }

    #[test]
    fn packets_are_routed_by_their_ipv4_or_ipv6_destination() {
        let v4 = icmp::echo_request(
            Ipv4Addr::new(100, 64, 0, 1),
            Ipv4Addr::new(100, 64, 0, 2),
            1,
            1,
            b"",
        );
        assert_eq!(route_dst(&v4), Some(Ipv4Addr::new(100, 64, 0, 2).into()));
        let p = icmp6::echo_request(v6(1), v6(2), 1, 1, b"");
        assert_eq!(route_dst(&p), Some(v6(2).into()));
        // What the kernel sends on any interface stays here.
        let mld = icmp6::echo_request(v6(1), "ff02::16".parse().unwrap(), 1, 1, b"");
        assert_eq!(route_dst(&mld), None);
        let ll = icmp6::echo_request(v6(1), "fe80::2".parse().unwrap(), 1, 1, b"");
        assert_eq!(route_dst(&ll), None);
        assert_eq!(route_dst(&p[..39]), None);
        assert_eq!(route_dst(&[0x50; 40]), None);
        assert_eq!(route_dst(&[]), None);
    }

    #[test]
    fn the_table_finds_a_peer_by_either_address_and_forgets_both() {
        let mut table = PeerTable::default();
        table.insert(Arc::new(peer_with(2, Some(v6(2)))));
        table.insert(Arc::new(peer_with(3, None)));
        let id = |t: &PeerTable, ip: IpAddr| t.by_ip.get(&ip).map(|p| p.id);
        assert_eq!(id(&table, Ipv4Addr::new(100, 64, 0, 2).into()), Some(2));
        assert_eq!(id(&table, v6(2).into()), Some(2));
        assert_eq!(id(&table, Ipv4Addr::new(100, 64, 0, 3).into()), Some(3));
        assert_eq!(id(&table, v6(3).into()), None, "peer 3 has no IPv6 address");
        assert!(table.remove(2).is_some());
        assert_eq!(id(&table, v6(2).into()), None);
        assert_eq!(id(&table, Ipv4Addr::new(100, 64, 0, 2).into()), None);
        assert_eq!(table.by_ip.len(), 1);
    }

    #[test]
    fn a_replaced_peer_leaves_its_successors_addresses_alone() {
        let mut table = PeerTable::default();
        table.insert(Arc::new(peer_with(2, Some(v6(2)))));
        // Node 9 now has peer 2's addresses (2 was removed from the mesh
        // and its address reused; the removal comes after the addition).
        let mut nine = peer_with(9, Some(v6(2)));
        nine.mesh_ip = Ipv4Addr::new(100, 64, 0, 2);
        table.insert(Arc::new(nine));
        table.remove(2);
        assert_eq!(table.by_ip.get(&IpAddr::from(v6(2))).map(|p| p.id), Some(9));
        assert_eq!(
            table
                .by_ip
                .get(&IpAddr::from(Ipv4Addr::new(100, 64, 0, 2)))
                .map(|p| p.id),
            Some(9)
        );
    }
}
