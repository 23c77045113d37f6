//! Which peer addresses the embedded TURN server may relay to, like coturn's
//! `denied-peer-ip`: a TURN relay must not become a way into the server's
//! own host or the networks behind it.
//!
//! The lists start from the `denied-peer-ip` set recommended for coturn
//! (its `turnserver.conf` and the deployment guides that copy it) and are
//! split in two:
//!
//! - [`ALWAYS_DENIED_V4`] / [`ALWAYS_DENIED_V6`]: the host itself, link-local,
//!   multicast and reserved space. Never relayed to, whatever the config says.
//! - [`NON_PUBLIC_V4`] / [`NON_PUBLIC_V6`]: private, shared, documentation,
//!   benchmarking and transition ranges. Denied unless `allow_private`
//!   (`--turn-allow-private`, for labs that use such addresses as their
//!   "internet").
//!
//! - the mesh's own networks (`network`, `network6`): never relayed to.
//!   Mesh addresses exist only inside the nodes' tunnels; a relay that sent
//!   to one would reach the mesh from outside it wherever this host routes
//!   the mesh (a node on the same machine, say).
//!
//! An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket
//! reports for an IPv4 peer) is judged as the IPv4 address it carries, so
//! `::ffff:127.0.0.1` is loopback and `::ffff:8.8.8.8` is public.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 prefix: network address and length.
type V4Range = (Ipv4Addr, u8);
/// An IPv6 prefix: network address and length.
type V6Range = (Ipv6Addr, u8);

/// IPv4 ranges never relayed to.
pub const ALWAYS_DENIED_V4: &[V4Range] = &[
    // "This network" (RFC 791), including 0.0.0.0.
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    // Link-local (RFC 3927); also cloud metadata services (169.254.169.254).
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    // Multicast (RFC 5771).
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    // Reserved (RFC 1112) and the limited broadcast address.
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// IPv4 ranges relayed to only with `allow_private`.
pub const NON_PUBLIC_V4: &[V4Range] = &[
    // RFC 1918.
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    // Shared address space / CGNAT (RFC 6598); also the mesh's default network.
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    // IETF protocol assignments (RFC 6890).
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    // Documentation: TEST-NET-1, -2, -3 (RFC 5737).
    (Ipv4Addr::new(192, 0, 2, 0), 24),
    (Ipv4Addr::new(198, 51, 100, 0), 24),
    (Ipv4Addr::new(203, 0, 113, 0), 24),
    // 6to4 relay anycast (RFC 7526).
    (Ipv4Addr::new(192, 88, 99, 0), 24),
    // Benchmarking (RFC 2544).
    (Ipv4Addr::new(198, 18, 0, 0), 15),
];

/// IPv6 ranges never relayed to.
pub const ALWAYS_DENIED_V6: &[V6Range] = &[
    // Unspecified and loopback, and the deprecated IPv4-compatible
    // addresses (::a.b.c.d) around them.
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96),
    // Link-local.
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    // Site-local (deprecated, RFC 3879).
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),
    // Multicast.
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
];

/// IPv6 ranges relayed to only with `allow_private`.
pub const NON_PUBLIC_V6: &[V6Range] = &[
    // NAT64 well-known prefix (RFC 6052) and local-use prefix (RFC 8215):
    // they lead to IPv4 addresses through a translator.
    (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96),
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48),
    // Discard-only (RFC 6666).
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),
    // IETF protocol assignments, including Teredo (2001::/32) (RFC 6890).
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23),
    // Documentation (RFC 3849).
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32),
    // 6to4 (RFC 3056): leads to IPv4 addresses.
    (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16),
    // Unique local (RFC 4193).
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
];

fn in_v4(ip: Ipv4Addr, ranges: &[V4Range]) -> bool {
    let ip = u32::from(ip);
    ranges.iter().any(|&(net, len)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        ip & mask == u32::from(net) & mask
    })
}

fn in_v6(ip: Ipv6Addr, ranges: &[V6Range]) -> bool {
    let ip = u128::from(ip);
    ranges.iter().any(|&(net, len)| {
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        ip & mask == u128::from(net) & mask
    })
}

/// `ip` with an IPv4-mapped IPv6 address replaced by its IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// Allow the [`NON_PUBLIC_V4`] / [`NON_PUBLIC_V6`] ranges (labs).
    pub allow_private: bool,
    /// The server's own addresses (listen, public, relay).
    pub own: HashSet<IpAddr>,
    /// The mesh's networks, IPv4 and IPv6: always denied.
    pub mesh: Vec<ipnet::IpNet>,
}

impl PeerPolicy {
    /// Whether relaying to or from `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.own.iter().any(|own| canonical(*own) == ip) {
            return false;
        }
        if self.mesh.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        match ip {
            IpAddr::V4(v4) => {
                !in_v4(v4, ALWAYS_DENIED_V4) && (self.allow_private || !in_v4(v4, NON_PUBLIC_V4))
            }
            IpAddr::V6(v6) => {
                !in_v6(v6, ALWAYS_DENIED_V6) && (self.allow_private || !in_v6(v6, NON_PUBLIC_V6))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn lax() -> PeerPolicy {
        PeerPolicy {
            allow_private: true,
            ..PeerPolicy::default()
        }
    }

    #[test]
    fn loopback_link_local_multicast_unspecified_reserved_are_always_denied() {
        let p = lax();
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.9.9.9",
            "169.254.1.1",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::127.0.0.1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
        ] {
            assert!(!p.allows(ip(s)), "{s} must be denied");
        }
    }

    #[test]
    fn every_non_public_range_needs_opt_in() {
        let strict = PeerPolicy::default();
        // The first and last address of each range.
        for s in [
            "10.0.0.0",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.0.0",
            "192.168.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.0",
            "192.0.0.255",
            "192.0.2.0",
            "192.0.2.255",
            "198.51.100.0",
            "198.51.100.255",
            "203.0.113.0",
            "203.0.113.255",
            "192.88.99.0",
            "192.88.99.255",
            "198.18.0.0",
            "198.19.255.255",
            "64:ff9b::",
            "64:ff9b::7f00:1",
            "64:ff9b::ffff:ffff",
            "64:ff9b:1::1",
            "100::",
            "100::ffff:ffff:ffff:ffff",
            "2001::1",
            "2001:0:ffff::1",
            "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:db8::1",
            "2001:db8:ffff::1",
            "2002::",
            "2002:7f00:1::1",
            "2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "fc00::1",
            "fd00::1",
            "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:10.1.2.3",
            "::ffff:192.0.0.8",
        ] {
            assert!(!strict.allows(ip(s)), "{s} must be denied by default");
            assert!(
                lax().allows(ip(s)),
                "{s} must be allowed with allow_private"
            );
        }
    }

    #[test]
    fn neighbours_of_denied_ranges_are_public() {
        let strict = PeerPolicy::default();
        for s in [
            "1.0.0.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.1",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.1",
            "191.255.255.255",
            "192.0.1.0",
            "192.0.3.0",
            "192.88.98.255",
            "192.88.100.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "2001:200::1",
            "2001:4860:4860::8888",
            "2001:db9::1",
            "2003::1",
            "2606:4700::1111",
            "64:ff9a::1",
            "64:ff9b:0:0:1::1",
            "101::1",
            "fbff::1",
            "fe00::1",
        ] {
            assert!(strict.allows(ip(s)), "{s} is public");
        }
    }

    #[test]
    fn own_addresses_are_denied_in_either_form() {
        let p = PeerPolicy {
            allow_private: true,
            own: [ip("198.51.100.7"), ip("::ffff:192.0.2.9")].into(),
            ..PeerPolicy::default()
        };
        assert!(!p.allows(ip("198.51.100.7")));
        assert!(!p.allows(ip("::ffff:198.51.100.7")));
        assert!(!p.allows(ip("192.0.2.9")));
        assert!(p.allows(ip("198.51.100.8")));
    }

    #[test]
    fn the_mesh_networks_are_denied_even_with_allow_private() {
        let p = PeerPolicy {
            allow_private: true,
            mesh: vec![
                "100.64.0.0/10".parse().unwrap(),
                "fd12:3456:789a::/48".parse().unwrap(),
            ],
            ..PeerPolicy::default()
        };
        for s in [
            "100.64.0.2",
            "::ffff:100.64.0.2",
            "fd12:3456:789a::6440:2",
            "fd12:3456:789a:ffff::1",
        ] {
            assert!(!p.allows(ip(s)), "{s} is in the mesh");
        }
        // Neighbouring unique local and shared space stay a lab's to use.
        assert!(p.allows(ip("fd12:3456:789b::1")));
        assert!(p.allows(ip("100.128.0.1")));
        assert!(lax().allows(ip("fd12:3456:789a::6440:2")));
    }

    #[test]
    fn mapped_addresses_are_judged_as_ipv4() {
        assert_eq!(canonical(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(canonical(ip("2001:db8::1")), ip("2001:db8::1"));
        let strict = PeerPolicy::default();
        assert!(!strict.allows(ip("::ffff:10.0.0.1")));
        assert!(strict.allows(ip("::ffff:1.1.1.1")));
    }
}
