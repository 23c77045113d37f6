//! This node's mesh IPv6 address: put on the TUN when it is known (from the
//! stored enrolment at start, or the coordinator's `Welcome`), replaced when
//! it changes, and what decrypted IPv6 packets must be addressed to. A host
//! that cannot have it (IPv6 off, no IPv6 in the kernel) runs IPv4-only,
//! said once.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

use super::{tun_device, DataPlane};

/// This node's mesh IPv6 address and the mesh's IPv6 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh6 {
    pub addr: Ipv6Addr,
    pub network: Ipv6Net,
}

impl Mesh6 {
    /// The address of the node with mesh IPv4 address `mesh_ip` in `network`
    /// (the coordinator's mapping, `overlay_proto::coord::mesh_ip6`).
    pub fn of(network: Ipv6Net, mesh_ip: std::net::Ipv4Addr) -> Mesh6 {
        Mesh6 {
            addr: overlay_proto::coord::mesh_ip6(network, mesh_ip),
            network,
        }
    }
}

/// What the TUN has, and what the coordinator last asked for (which the host
/// may have refused: then `applied` is `None` and it is not tried again
/// until the coordinator says something else).
#[derive(Debug, Default)]
pub(super) struct Mesh6State {
    applied: Option<Mesh6>,
    wanted: Option<Mesh6>,
}

impl DataPlane {
    /// The mesh IPv6 address the TUN has, and the prefix; `None` while the
    /// mesh has none or the host cannot have it.
    pub fn mesh6(&self) -> Option<Mesh6> {
        self.mesh6.read().unwrap_or_else(|e| e.into_inner()).applied
    }

    /// Gives the TUN this mesh IPv6 address (replacing the one it had), or
    /// takes it away with `None`; decrypted IPv6 packets are accepted for
    /// the address it has from here on.
    pub fn set_mesh6(&self, wanted: Option<Mesh6>) {
        let mut state = self.mesh6.write().unwrap_or_else(|e| e.into_inner());
        if state.wanted == wanted {
            return;
        }
        state.wanted = wanted;
        let old = state.applied.map(|m| (m.addr, m.network.prefix_len()));
        let new = wanted.map(|m| (m.addr, m.network.prefix_len()));
        match tun_device::set_ipv6(&self.tun_name, self.tun_mtu, old, new) {
            Ok(()) => {
                state.applied = wanted;
                match wanted {
                    Some(m) => tracing::info!(
                        "interface {} has mesh IPv6 {}/{}",
                        self.tun_name,
                        m.addr,
                        m.network.prefix_len()
                    ),
                    None if old.is_some() => tracing::info!(
                        "the mesh has no IPv6 prefix any more: interface {} is IPv4-only",
                        self.tun_name
                    ),
                    None => {}
                }
            }
            Err(e) => {
                state.applied = None;
                tracing::info!("{e}: this node uses the mesh over IPv4 only");
            }
        }
        self.destinations.set_v6(state.applied.map(|m| m.addr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_the_coordinators_mapping() {
        let net: Ipv6Net = "fd7a:115c:a1e0::/48".parse().unwrap();
        let m = Mesh6::of(net, std::net::Ipv4Addr::new(100, 64, 0, 5));
        assert_eq!(
            m.addr,
            "fd7a:115c:a1e0::6440:5".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(m.network.prefix_len(), 48);
    }
}
