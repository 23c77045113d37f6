//! Just enough IPv6 to route, check and filter packets: the fixed header's
//! addresses, and the walk over extension headers to the upper-layer header.
//!
//! The walk knows the headers RFC 8200 defines with a common length field
//! (hop-by-hop, routing, destination options), the fragment header and AH;
//! it stops at anything else (ESP, "no next header", an unknown protocol),
//! which the filter then sees as an opaque protocol. A chain that is cut
//! short, or longer than [`MAX_EXTENSIONS`], is not parsed at all.

use std::net::Ipv6Addr;

/// Length of the fixed IPv6 header.
pub const HEADER: usize = super::checksum::IPV6_HEADER;
/// Next-header value of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTH: u8 = 51;
const DEST_OPTS: u8 = 60;
/// Extension headers walked at most: real traffic carries one or two; a
/// longer chain is refused rather than walked at a remote's pleasure.
pub const MAX_EXTENSIONS: usize = 8;

/// Source and destination of an IPv6 packet; `None` for anything else.
pub fn addrs(packet: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr)> {
    if packet.len() < HEADER || packet[0] >> 4 != 6 {
        return None;
    }
    let src: [u8; 16] = packet[8..24].try_into().ok()?;
    let dst: [u8; 16] = packet[24..40].try_into().ok()?;
    Some((src.into(), dst.into()))
}

/// Whether `addr` never leaves the link: multicast (MLD reports, router
/// solicitations the kernel sends on any interface) or link-local. Such
/// packets are not the mesh's to carry.
pub fn link_scoped(addr: Ipv6Addr) -> bool {
    addr.is_multicast() || addr.is_unicast_link_local()
}

/// Where an IPv6 packet's upper layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upper {
    /// Protocol `proto`, whose header starts at `offset` (for a protocol
    /// the walk does not know, `offset` is where its data begins).
    At { proto: u8, offset: usize },
    /// A fragment after the first: no upper-layer header in it.
    LaterFragment { proto: u8 },
}

/// Walks `packet`'s extension headers; `None` when it is not IPv6 or its
/// chain is cut short or too long.
pub fn upper(packet: &[u8]) -> Option<Upper> {
    walk(packet, |_, _| true)
}

/// Whether `packet` carries a routing header with segments left: it asks
/// the receiver to forward it on (RFC 8200 type 0 is refused by the kernel,
/// but segment routing is honoured where `seg6_enabled` is set). A peer
/// reaches this node, never what lies behind it, so such packets are not
/// delivered. Cheap for the usual packet: no extension header, no walk.
pub fn routes_onward(packet: &[u8]) -> bool {
    if !matches!(
        packet.get(6),
        Some(&(HOP_BY_HOP | ROUTING | DEST_OPTS | FRAGMENT | AUTH))
    ) {
        return false;
    }
    let mut onward = false;
    walk(packet, |kind, header| {
        if kind == ROUTING && header.get(3).is_some_and(|&left| left != 0) {
            onward = true;
        }
        !onward
    });
    onward
}

/// The walk behind [`upper`]: `visit` sees each extension header (its kind
/// and its bytes) and may stop the walk by returning false (then `None`).
fn walk(packet: &[u8], mut visit: impl FnMut(u8, &[u8]) -> bool) -> Option<Upper> {
    if packet.len() < HEADER || packet[0] >> 4 != 6 {
        return None;
    }
    let mut next = packet[6];
    let mut at = HEADER;
    for _ in 0..=MAX_EXTENSIONS {
        let len = match next {
            HOP_BY_HOP | ROUTING | DEST_OPTS => (usize::from(*packet.get(at + 1)?) + 1) * 8,
            AUTH => (usize::from(*packet.get(at + 1)?) + 2) * 4,
            FRAGMENT => {
                let header = packet.get(at..at + 8)?;
                let offset = u16::from_be_bytes([header[2], header[3]]) >> 3;
                if offset != 0 {
                    return Some(Upper::LaterFragment { proto: header[0] });
                }
                8
            }
            proto => return Some(Upper::At { proto, offset: at }),
        };
        if packet.len() < at + len || !visit(next, &packet[at..at + len]) {
            return None;
        }
        next = packet[at];
        at += len;
    }
    None
}

/// A fixed IPv6 header from `src` to `dst` for `payload_len` bytes of
/// `next` (hop limit 64, no traffic class or flow label).
pub fn header(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload_len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const A: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0x6440, 1);
    pub(crate) const B: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0x6440, 2);

    /// A packet from A to B: the fixed header, `extensions` (each a next
    /// header value and its bytes) and `l4` of protocol `proto`.
    pub(crate) fn packet(extensions: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut chain: Vec<u8> = Vec::new();
        let first = extensions.first().map_or(proto, |(kind, _)| *kind);
        for (i, (_, bytes)) in extensions.iter().enumerate() {
            let mut b = bytes.clone();
            b[0] = extensions.get(i + 1).map_or(proto, |(kind, _)| *kind);
            chain.extend_from_slice(&b);
        }
        let mut p = header(A, B, first, chain.len() + l4.len()).to_vec();
        p.extend_from_slice(&chain);
        p.extend_from_slice(l4);
        p
    }

    /// An extension header of the common kind, `units` 8-byte units long.
    pub(crate) fn options(units: u8) -> Vec<u8> {
        let mut b = vec![0u8; usize::from(units) * 8];
        b[1] = units - 1;
        b
    }

    pub(crate) fn fragment(offset_units: u16, more: bool) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        let field = offset_units << 3 | u16::from(more);
        b[2..4].copy_from_slice(&field.to_be_bytes());
        b
    }

    #[test]
    fn addresses_are_read_from_the_fixed_header() {
        let p = packet(&[], 17, &[0; 8]);
        assert_eq!(addrs(&p), Some((A, B)));
        assert_eq!(addrs(&p[..39]), None);
        assert_eq!(addrs(&[0x45; 40]), None);
    }

    #[test]
    fn the_walk_skips_extension_headers_to_the_upper_layer() {
        let plain = packet(&[], 6, &[0; 20]);
        assert_eq!(
            upper(&plain),
            Some(Upper::At {
                proto: 6,
                offset: 40
            })
        );
        let chained = packet(
            &[
                (HOP_BY_HOP, options(1)),
                (DEST_OPTS, options(2)),
                (FRAGMENT, fragment(0, true)),
            ],
            17,
            &[0; 8],
        );
        assert_eq!(
            upper(&chained),
            Some(Upper::At {
                proto: 17,
                offset: 40 + 8 + 16 + 8
            })
        );
        let later = packet(&[(FRAGMENT, fragment(185, false))], 6, &[0; 100]);
        assert_eq!(upper(&later), Some(Upper::LaterFragment { proto: 6 }));
        // ESP is opaque: the walk stops there.
        let esp = packet(&[(ROUTING, options(1))], 50, &[0; 16]);
        assert_eq!(
            upper(&esp),
            Some(Upper::At {
                proto: 50,
                offset: 48
            })
        );
    }

    #[test]
    fn a_routing_header_with_segments_left_routes_onward() {
        let mut srh = options(3);
        srh[2] = 4; // segment routing
        srh[3] = 1; // one segment left
        let onward = packet(
            &[(HOP_BY_HOP, options(1)), (ROUTING, srh.clone())],
            6,
            &[0; 20],
        );
        assert!(routes_onward(&onward));
        srh[3] = 0; // the last segment: this node is the destination
        let done = packet(&[(ROUTING, srh)], 6, &[0; 20]);
        assert!(!routes_onward(&done));
        assert_eq!(
            upper(&done),
            Some(Upper::At {
                proto: 6,
                offset: 64
            })
        );
        assert!(!routes_onward(&packet(&[], 6, &[0; 20])));
        assert!(!routes_onward(&packet(
            &[(DEST_OPTS, options(1))],
            17,
            &[0; 8]
        )));
        assert!(!routes_onward(&[0x60, 0, 0, 0, 0, 0, ROUTING]));
    }

    #[test]
    fn cut_or_endless_chains_are_not_parsed() {
        let mut cut = packet(&[(DEST_OPTS, options(4))], 6, &[]);
        cut.truncate(40 + 16);
        assert_eq!(upper(&cut), None);
        let long: Vec<_> = (0..=MAX_EXTENSIONS)
            .map(|_| (DEST_OPTS, options(1)))
            .collect();
        assert_eq!(upper(&packet(&long, 6, &[0; 20])), None);
        let just: Vec<_> = (0..MAX_EXTENSIONS)
            .map(|_| (DEST_OPTS, options(1)))
            .collect();
        assert!(matches!(
            upper(&packet(&just, 6, &[0; 20])),
            Some(Upper::At { proto: 6, .. })
        ));
    }

    #[test]
    fn multicast_and_link_local_stay_on_the_link() {
        assert!(link_scoped("ff02::16".parse().unwrap()));
        assert!(link_scoped("fe80::1".parse().unwrap()));
        assert!(link_scoped("febf::1".parse().unwrap()));
        assert!(!link_scoped(B));
        assert!(!link_scoped("fec0::1".parse().unwrap()));
    }
}
