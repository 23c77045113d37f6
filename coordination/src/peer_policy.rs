//! Which peer addresses the embedded TURN server may relay to, like coturn's
//! `denied-peer-ip`: a TURN relay must not become a way into the server's
//! own host or the networks behind it.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// Allow RFC 1918, CGNAT (100.64/10) and ULA (fc00::/7) peers.
    pub allow_private: bool,
    /// The server's own addresses (listen, public, relay).
    pub own: HashSet<IpAddr>,
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private() || (a == 100 && (64..128).contains(&b))
}

fn always_denied_v4(ip: Ipv4Addr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        // 0.0.0.0/8 ("this network") and 240.0.0.0/4 (reserved).
        || ip.octets()[0] == 0
        || ip.octets()[0] >= 240
}

fn always_denied_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // fe80::/10 link-local.
        || (first & 0xffc0) == 0xfe80
}

impl PeerPolicy {
    /// Whether relaying to or from `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self.own.contains(&ip) {
            return false;
        }
        match ip {
            IpAddr::V4(v4) => !always_denied_v4(v4) && (self.allow_private || !is_private_v4(v4)),
            IpAddr::V6(v6) => {
                let ula = (v6.segments()[0] & 0xfe00) == 0xfc00;
                !always_denied_v6(v6) && (self.allow_private || !ula)
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

    #[test]
    fn loopback_link_local_multicast_unspecified_are_always_denied() {
        let p = PeerPolicy {
            allow_private: true,
            ..PeerPolicy::default()
        };
        for s in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "169.254.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!p.allows(ip(s)), "{s} must be denied");
        }
    }

    #[test]
    fn private_ranges_need_opt_in() {
        let strict = PeerPolicy::default();
        let lax = PeerPolicy {
            allow_private: true,
            ..PeerPolicy::default()
        };
        for s in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.0.1",
            "fd00::1",
        ] {
            assert!(!strict.allows(ip(s)), "{s} must be denied by default");
            assert!(lax.allows(ip(s)), "{s} must be allowed with allow_private");
        }
        for s in ["172.32.0.1", "100.128.0.1", "8.8.8.8", "2001:db8::1"] {
            assert!(strict.allows(ip(s)), "{s} is public");
        }
    }

    #[test]
    fn own_addresses_are_denied() {
        let p = PeerPolicy {
            allow_private: true,
            own: [ip("198.51.100.7")].into(),
        };
        assert!(!p.allows(ip("198.51.100.7")));
        assert!(!p.allows(ip("::ffff:198.51.100.7")));
        assert!(p.allows(ip("198.51.100.8")));
    }
}
