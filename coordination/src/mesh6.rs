//! The mesh's IPv6 prefix (`--network6`): what a valid one is, and the
//! random ULA /48 a deployment gets when none is given.
//!
//! A node's mesh IPv6 address is the prefix with its IPv4 mesh address in
//! the low 32 bits ([`overlay_proto::coord::mesh_ip6`]), so the prefix
//! must leave those 32 bits free, and nothing else needs allocating. The
//! prefix is chosen once per deployment and kept in the store (`meta`), so
//! every replica and every restart hands out the same addresses, and two
//! deployments (RFC 4193's 40 random bits) almost never collide when their
//! meshes meet on one host.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use rand::RngCore;

/// Longest prefix accepted: the node's IPv4 address takes the low 32 bits.
pub const MAX_PREFIX_LEN: u8 = 96;
/// Length of the prefix generated when none is configured (RFC 4193).
pub const GENERATED_PREFIX_LEN: u8 = 48;

/// `text` as a mesh IPv6 prefix, host bits cleared; the error is one line
/// saying what is wrong.
pub fn parse(text: &str) -> Result<Ipv6Net, String> {
    let text = text.trim();
    let net: Ipv6Net = match text.parse() {
        Ok(net) => net,
        Err(_) if text.parse::<ipnet::Ipv4Net>().is_ok() => {
            return Err(format!(
                "{text} is an IPv4 network; the mesh IPv6 prefix is an IPv6 one such as fd12:3456:789a::/48"
            ))
        }
        Err(_) => {
            return Err(format!(
                "`{text}` is not an IPv6 prefix (write it as fd12:3456:789a::/48)"
            ))
        }
    };
    check(net)
}

/// `net` if it can be the mesh's IPv6 prefix, host bits cleared.
pub fn check(net: Ipv6Net) -> Result<Ipv6Net, String> {
    if net.prefix_len() > MAX_PREFIX_LEN {
        return Err(format!(
            "the mesh IPv6 prefix {net} is longer than /{MAX_PREFIX_LEN}: nodes' IPv4 mesh addresses go in its low 32 bits"
        ));
    }
    let net = net.trunc();
    let first = net.network();
    // Prefixes whose addresses a host would not route as ordinary unicast.
    let special = first.is_unspecified()
        || first.is_loopback()
        || first.is_multicast()
        || (first.segments()[0] & 0xffc0) == 0xfe80
        || first.to_ipv4_mapped().is_some()
        || net.prefix_len() < 8;
    if special {
        return Err(format!(
            "{net} cannot be the mesh IPv6 prefix: give a unicast prefix, ideally a unique local one (fd00::/8)"
        ));
    }
    Ok(net)
}

/// A random unique local /48 (RFC 4193: `fd` and 40 random bits).
pub fn generate() -> Ipv6Net {
    let mut random = [0u8; 5];
    rand::rngs::OsRng.fill_bytes(&mut random);
    from_random(random)
}

fn from_random(random: [u8; 5]) -> Ipv6Net {
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&random);
    // A /48 of a valid address cannot fail.
    Ipv6Net::new(Ipv6Addr::from(octets), GENERATED_PREFIX_LEN).unwrap_or_default()
}

/// Whether `net` is in the unique local range (fc00::/7).
pub fn is_unique_local(net: Ipv6Net) -> bool {
    net.network().segments()[0] & 0xfe00 == 0xfc00
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ula_48_is_accepted_and_host_bits_are_cleared() {
        assert_eq!(
            parse("fd12:3456:789a::/48").unwrap(),
            "fd12:3456:789a::/48".parse::<Ipv6Net>().unwrap()
        );
        assert_eq!(
            parse(" fd12:3456:789a:1::5/64 ").unwrap(),
            "fd12:3456:789a:1::/64".parse::<Ipv6Net>().unwrap()
        );
        // Up to /96 leaves the low 32 bits to the IPv4 address.
        assert!(parse("fd00:1:2:3:4:5::/96").is_ok());
        // A global prefix someone owns is theirs to use.
        assert!(parse("2001:db8:1::/48").is_ok());
    }

    #[test]
    fn longer_than_96_or_not_ipv6_or_special_is_refused() {
        let e = parse("fd12:3456:789a::/97").unwrap_err();
        assert!(e.contains("longer than /96"), "{e}");
        let e = parse("100.64.0.0/10").unwrap_err();
        assert!(e.contains("IPv4 network"), "{e}");
        let e = parse("fd12::").unwrap_err();
        assert!(e.contains("not an IPv6 prefix"), "{e}");
        for special in [
            "::/96",
            "::1/96",
            "ff00::/8",
            "fe80::/64",
            "febf::/64",
            "::ffff:0:0/96",
            "fc00::/6",
        ] {
            let e = parse(special).unwrap_err();
            assert!(
                e.contains("cannot be the mesh IPv6 prefix"),
                "{special}: {e}"
            );
        }
    }

    #[test]
    fn generated_prefixes_are_random_ula_48s() {
        let a = generate();
        let b = generate();
        for net in [a, b] {
            assert_eq!(net.prefix_len(), 48);
            assert_eq!(net.network().octets()[0], 0xfd);
            assert!(is_unique_local(net));
            assert_eq!(check(net), Ok(net));
        }
        assert_ne!(a, b, "40 random bits");
        assert_eq!(
            from_random([0x12, 0x34, 0x56, 0x78, 0x9a]),
            "fd12:3456:789a::/48".parse::<Ipv6Net>().unwrap()
        );
    }

    #[test]
    fn unique_local_is_fc00_7() {
        let net = |s: &str| s.parse::<Ipv6Net>().unwrap();
        assert!(is_unique_local(net("fd12::/48")));
        assert!(is_unique_local(net("fc00::/48")));
        assert!(!is_unique_local(net("fe00::/48")));
        assert!(!is_unique_local(net("2001:db8::/48")));
    }
}
