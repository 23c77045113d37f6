//! Which addresses are ICE candidates: the local ones we offer as host
//! candidates, the remote ones a peer may make us check, and how a candidate's
//! address is written. Pure functions of an address and the mesh networks.
//!
//! IPv6 adds three rules to IPv4's: link-local addresses (`fe80::/10`) are
//! neither offered nor accepted, since without the interface scope they name
//! whichever neighbour answers on our link; IPv4 written as IPv6
//! (`::ffff:a.b.c.d`) is refused, or it would slip past the IPv4 rules; and the
//! mesh's IPv6 prefix (from the coordinator's `Welcome`) is excluded like the
//! IPv4 mesh network, since those addresses route into the tunnel.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Why a remote candidate's address is refused: a peer must not aim our
/// connectivity checks (STUN requests from our socket) at this host, its local
/// networks' broadcast or multicast groups, or through the tunnel itself.
pub fn refuse_remote_addr(
    ip: IpAddr,
    port: u16,
    mesh: Ipv4Net,
    mesh6: Option<Ipv6Net>,
) -> Option<&'static str> {
    if port == 0 {
        return Some("port 0");
    }
    match ip {
        IpAddr::V4(ip) => refuse_remote_v4(ip, mesh),
        IpAddr::V6(ip) => refuse_remote_v6(ip, mesh6).or_else(|| match translated_v4(ip) {
            Translated::V4(v4) => refuse_remote_v4(v4, mesh),
            Translated::Unknown => Some("NAT64 local-use address"),
            Translated::No => None,
        }),
    }
}

enum Translated {
    No,
    V4(Ipv4Addr),
    /// A translator's prefix whose IPv4 address we cannot locate.
    Unknown,
}

/// The IPv4 address an IPv6 address stands for through a translator: the
/// NAT64 well-known prefix (`64:ff9b::/96`, RFC 6052) and 6to4
/// (`2002:a.b.c.d::/48`, RFC 3056). Its checks go to that IPv4 address, so
/// it must pass the IPv4 rules (no loopback, no mesh address). A NAT64
/// local-use prefix (`64:ff9b:1::/48`, RFC 8215) can embed it anywhere.
fn translated_v4(ip: Ipv6Addr) -> Translated {
    let s = ip.segments();
    let bits = u128::from(ip);
    if bits >> 32 == 0x0064_ff9b << 64 {
        Translated::V4(Ipv4Addr::from(bits as u32))
    } else if s[0] == 0x2002 {
        Translated::V4(Ipv4Addr::from((u32::from(s[1]) << 16) | u32::from(s[2])))
    } else if s[..3] == [0x64, 0xff9b, 1] {
        Translated::Unknown
    } else {
        Translated::No
    }
}

fn refuse_remote_v4(ip: Ipv4Addr, mesh: Ipv4Net) -> Option<&'static str> {
    if ip.is_unspecified() || ip.octets()[0] == 0 {
        Some("unspecified address")
    } else if ip.is_loopback() {
        Some("loopback address")
    } else if ip.is_multicast() {
        Some("multicast address")
    } else if ip.is_broadcast() {
        Some("broadcast address")
    } else if ip.is_link_local() {
        Some("link-local address")
    } else if mesh.contains(&ip) {
        Some("address inside the mesh network")
    } else {
        None
    }
}

/// IPv6 beside [`refuse_remote_v4`]: also no link-local address (without the
/// peer's interface scope it names a neighbour of ours, not the peer) and no
/// IPv4 in IPv6 clothing (`::ffff:a.b.c.d`, `::a.b.c.d`), which would slip
/// past the IPv4 checks.
fn refuse_remote_v6(ip: Ipv6Addr, mesh6: Option<Ipv6Net>) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified address")
    } else if ip.is_loopback() {
        Some("loopback address")
    } else if ip.is_multicast() {
        Some("multicast address")
    } else if ip.is_unicast_link_local() {
        Some("link-local address")
    } else if ip.to_ipv4_mapped().is_some() || u128::from(ip) >> 32 == 0 {
        Some("IPv4 address written as IPv6")
    } else if mesh6.is_some_and(|net| net.contains(&ip)) {
        Some("address inside the mesh network")
    } else {
        None
    }
}

/// Whether to offer a local address as a host candidate. webrtc-ice lists
/// every address of every interface but the TUN; of IPv6 only global and
/// unique-local addresses can be reached by a peer (link-local needs a scope
/// the peer does not know; mesh addresses would route into the tunnel).
pub fn gather_addr(ip: IpAddr, mesh: Ipv4Net, mesh6: Option<Ipv6Net>) -> bool {
    match ip {
        IpAddr::V4(ip) => !ip.is_loopback() && !mesh.contains(&ip),
        IpAddr::V6(ip) => refuse_remote_v6(ip, mesh6).is_none(),
    }
}

/// `host:port`, with brackets around an IPv6 host.
pub fn host_port(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH6: &str = "fd7a:115c:a1e0::/48";

    fn refused(ip: &str, port: u16) -> Option<&'static str> {
        let mesh: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        refuse_remote_addr(ip.parse().unwrap(), port, mesh, MESH6.parse().ok())
    }

    #[test]
    fn ordinary_addresses_are_accepted() {
        for ip in [
            "10.77.1.3",
            "192.168.1.20",
            "203.0.113.9",
            "172.16.0.1",
            "100.128.0.1",
            "2001:db8:1::2",
            "2a00:1450:4001:82b::200e",
            "fd12:3456:789a::1",
            "fd7a:115c:a1e1::1",
            "64:ff9b::cb00:7109",
            "2002:cb00:7109::1",
        ] {
            assert_eq!(refused(ip, 41641), None, "{ip}");
        }
    }

    #[test]
    fn local_special_and_mesh_addresses_are_refused() {
        let cases = [
            ("0.0.0.0", "unspecified address"),
            ("0.1.2.3", "unspecified address"),
            ("127.0.0.1", "loopback address"),
            ("127.8.9.10", "loopback address"),
            ("224.0.0.251", "multicast address"),
            ("239.255.255.250", "multicast address"),
            ("255.255.255.255", "broadcast address"),
            ("169.254.169.254", "link-local address"),
            ("100.64.0.1", "address inside the mesh network"),
            ("100.127.255.254", "address inside the mesh network"),
            ("::", "unspecified address"),
            ("::1", "loopback address"),
            ("ff02::1", "multicast address"),
            ("fe80::1", "link-local address"),
            ("febf:ffff::1", "link-local address"),
            ("::ffff:127.0.0.1", "IPv4 address written as IPv6"),
            ("::ffff:10.0.0.1", "IPv4 address written as IPv6"),
            ("::10.0.0.1", "IPv4 address written as IPv6"),
            ("fd7a:115c:a1e0::6440:1", "address inside the mesh network"),
            ("64:ff9b::6440:5", "address inside the mesh network"),
            ("64:ff9b::7f00:1", "loopback address"),
            ("2002:7f00:1::1", "loopback address"),
            ("2002:6440:5::1", "address inside the mesh network"),
            ("64:ff9b:1::a00:1", "NAT64 local-use address"),
        ];
        for (ip, reason) in cases {
            assert_eq!(refused(ip, 41641), Some(reason), "{ip}");
        }
        assert_eq!(refused("10.77.1.3", 0), Some("port 0"));
        assert_eq!(refused("2001:db8::1", 0), Some("port 0"));
    }

    #[test]
    fn host_candidates_are_global_or_unique_local_and_never_the_mesh() {
        let mesh: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        let gathered = |ip: &str| gather_addr(ip.parse().unwrap(), mesh, MESH6.parse().ok());
        for ip in [
            "10.0.0.5",
            "192.0.2.1",
            "2001:db8:1::2",
            "fd12:3456:789a::5",
        ] {
            assert!(gathered(ip), "{ip} kept");
        }
        for ip in [
            "127.0.0.1",
            "100.64.0.3",
            "::1",
            "fe80::1c2b:3cff:fe4d:5e6f",
            "fd7a:115c:a1e0::6440:3",
            "::ffff:10.0.0.5",
        ] {
            assert!(!gathered(ip), "{ip} excluded");
        }
        // Without an IPv6 mesh prefix (an older coordinator) ULAs are kept.
        assert!(gather_addr(
            "fd7a:115c:a1e0::1".parse().unwrap(),
            mesh,
            None
        ));
    }

    #[test]
    fn candidate_addresses_are_what_socket_addr_parses() {
        assert_eq!(host_port("10.0.0.1", 5000), "10.0.0.1:5000");
        assert_eq!(host_port("2001:db8::1", 5000), "[2001:db8::1]:5000");
        assert_eq!(host_port("host.local", 5000), "host.local:5000");
        let parsed: SocketAddr = host_port("2001:db8::1", 5000).parse().unwrap();
        assert!(parsed.is_ipv6());
    }

    #[test]
    fn the_mesh_network_is_the_netmaps() {
        let mesh: Ipv4Net = "10.200.0.0/16".parse().unwrap();
        let mesh6: Option<Ipv6Net> = "fd00:1:2::/48".parse().ok();
        let refused = |ip: &str| refuse_remote_addr(ip.parse().unwrap(), 9, mesh, mesh6);
        assert!(refused("10.200.3.4").is_some());
        assert!(refused("100.64.0.1").is_none());
        assert!(refused("fd00:1:2::a00:1").is_some());
        assert!(refused("fd7a:115c:a1e0::1").is_none());
    }
}
