//! ICMPv6 as the data plane needs it: echo for `overlayctl ping` to a mesh
//! IPv6 address, and "destination unreachable" for packets no peer takes or
//! the access policy refuses (RFC 4443), each with its pseudo-header checksum.

use std::net::Ipv6Addr;

use super::checksum::{fold, sum16};
use super::ip6::{self, Upper, HEADER, PROTO_ICMPV6};

const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
const UNREACHABLE: u8 = 1;
/// RFC 4443: communication with destination administratively prohibited.
const CODE_ADMIN_PROHIBITED: u8 = 1;
/// RFC 4443: address unreachable.
const CODE_ADDRESS_UNREACHABLE: u8 = 3;
/// RFC 4443 section 3.1: an error quotes as much of the packet as fits in
/// the minimum IPv6 MTU.
const MIN_MTU: usize = 1280;

/// An IPv6 packet carrying the ICMPv6 message `kind`/`code`, its four
/// header bytes and `body`, checksummed.
fn message(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let len = 8 + body.len();
    let mut p = Vec::with_capacity(HEADER + len);
    p.extend_from_slice(&ip6::header(src, dst, PROTO_ICMPV6, len));
    p.extend_from_slice(&[kind, code, 0, 0]);
    p.extend_from_slice(&rest);
    p.extend_from_slice(body);
    let sum = fold(sum16(
        &p[HEADER..],
        super::checksum::v6_pseudo(&p, PROTO_ICMPV6, len),
    ));
    p[HEADER + 2..HEADER + 4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// An ICMPv6 echo request from `src` to `dst`.
pub fn echo_request(src: Ipv6Addr, dst: Ipv6Addr, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut id_seq = [0u8; 4];
    id_seq[..2].copy_from_slice(&ident.to_be_bytes());
    id_seq[2..].copy_from_slice(&seq.to_be_bytes());
    message(src, dst, ECHO_REQUEST, 0, id_seq, payload)
}

/// The ICMPv6 message in `packet` and where it starts, if it has one.
fn icmp(packet: &[u8]) -> Option<(&[u8], usize)> {
    match ip6::upper(packet)? {
        Upper::At {
            proto: PROTO_ICMPV6,
            offset,
        } => Some((packet.get(offset..offset + 8)?, offset)),
        _ => None,
    }
}

/// If `packet` is an ICMPv6 echo reply, its source, identifier and sequence number.
pub fn echo_reply(packet: &[u8]) -> Option<(Ipv6Addr, u16, u16)> {
    let (src, _) = ip6::addrs(packet)?;
    let (m, _) = icmp(packet)?;
    if m[0] != ECHO_REPLY {
        return None;
    }
    Some((
        src,
        u16::from_be_bytes([m[4], m[5]]),
        u16::from_be_bytes([m[6], m[7]]),
    ))
}

/// "Address unreachable" from `router` about `original`, for packets to a
/// mesh IPv6 address no peer owns.
pub fn host_unreachable(router: Ipv6Addr, original: &[u8]) -> Option<Vec<u8>> {
    unreachable(router, original, CODE_ADDRESS_UNREACHABLE)
}

/// "Communication administratively prohibited" from `router` about
/// `original`, for packets the access policy refuses to send.
pub fn prohibited(router: Ipv6Addr, original: &[u8]) -> Option<Vec<u8>> {
    unreachable(router, original, CODE_ADMIN_PROHIBITED)
}

/// `None` where RFC 4443 section 2.4 forbids an error: about an ICMPv6
/// error or any ICMPv6 message but an echo request, about a packet from an
/// address that is not one host's, or to a multicast group.
fn unreachable(router: Ipv6Addr, original: &[u8], code: u8) -> Option<Vec<u8>> {
    let (src, dst) = ip6::addrs(original)?;
    if src.is_unspecified() || src.is_multicast() || dst.is_multicast() {
        return None;
    }
    match ip6::upper(original)? {
        Upper::At {
            proto: PROTO_ICMPV6,
            offset,
        } if original.get(offset) != Some(&ECHO_REQUEST) => return None,
        Upper::LaterFragment {
            proto: PROTO_ICMPV6,
        } => return None,
        _ => {}
    }
    let quoted = &original[..original.len().min(MIN_MTU - HEADER - 8)];
    Some(message(router, src, UNREACHABLE, code, [0; 4], quoted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ip6::tests::{A, B};

    const ROUTER: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0x6440, 9);

    /// Whether the ICMPv6 checksum of `p` (no extension headers) verifies.
    fn verifies(p: &[u8]) -> bool {
        fold(sum16(
            &p[HEADER..],
            crate::dataplane::checksum::v6_pseudo(p, PROTO_ICMPV6, p.len() - HEADER),
        )) == 0
    }

    #[test]
    fn echo_request_is_well_formed() {
        let p = echo_request(A, B, 0x1234, 7, b"hello");
        assert_eq!(ip6::addrs(&p), Some((A, B)));
        assert_eq!(p.len(), 40 + 8 + 5);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 13, "payload length");
        assert_eq!((p[6], p[40], p[41]), (PROTO_ICMPV6, ECHO_REQUEST, 0));
        assert!(verifies(&p), "ICMPv6 checksum with the pseudo-header");
        let mut bad = p.clone();
        bad[24] ^= 1; // another destination: the pseudo-header no longer matches
        assert!(!verifies(&bad));
    }

    /// A reference checksum, computed the long way: the RFC 8200 pseudo-header
    /// laid out as bytes, then the message.
    #[test]
    fn the_checksum_matches_the_pseudo_header_laid_out() {
        let p = echo_request(A, B, 1, 2, b"abc");
        let mut laid = Vec::new();
        laid.extend_from_slice(&A.octets());
        laid.extend_from_slice(&B.octets());
        laid.extend_from_slice(&((p.len() - 40) as u32).to_be_bytes());
        laid.extend_from_slice(&[0, 0, 0, PROTO_ICMPV6]);
        let mut m = p[40..].to_vec();
        m[2] = 0;
        m[3] = 0;
        laid.extend_from_slice(&m);
        assert_eq!(
            crate::dataplane::checksum::internet(&laid).to_be_bytes(),
            [p[42], p[43]]
        );
    }

    #[test]
    fn echo_replies_are_recognised_and_requests_are_not() {
        let mut p = echo_request(B, A, 0x1234, 7, b"x");
        assert_eq!(echo_reply(&p), None);
        p[40] = ECHO_REPLY;
        assert_eq!(echo_reply(&p), Some((B, 0x1234, 7)));
        assert_eq!(echo_reply(&p[..44]), None, "cut short");
        assert_eq!(echo_reply(&[0x60; 30]), None);
    }

    #[test]
    fn admin_prohibited_quotes_the_original_and_goes_back_to_its_source() {
        let original = echo_request(A, B, 1, 1, &[0xab; 64]);
        let p = prohibited(ROUTER, &original).unwrap();
        assert_eq!(ip6::addrs(&p), Some((ROUTER, A)));
        assert_eq!((p[40], p[41]), (UNREACHABLE, CODE_ADMIN_PROHIBITED));
        assert_eq!(&p[48..], &original[..]);
        assert!(verifies(&p));
        let u = host_unreachable(ROUTER, &original).unwrap();
        assert_eq!((u[40], u[41]), (UNREACHABLE, CODE_ADDRESS_UNREACHABLE));
        assert!(verifies(&u));
        // Never an error about an error, nor one larger than the minimum MTU.
        assert_eq!(prohibited(ROUTER, &p), None);
        let big = echo_request(A, B, 1, 1, &[0; 4000]);
        assert_eq!(prohibited(ROUTER, &big).unwrap().len(), MIN_MTU);
    }

    #[test]
    fn no_error_about_multicast_unspecified_or_non_echo_icmpv6() {
        let tcp = crate::dataplane::ip6::tests::packet(&[], 6, &[0; 20]);
        assert!(prohibited(ROUTER, &tcp).is_some());
        let mut to_group = tcp.clone();
        to_group[24] = 0xff;
        assert_eq!(prohibited(ROUTER, &to_group), None);
        let mut from_nobody = tcp.clone();
        from_nobody[8..24].fill(0);
        assert_eq!(prohibited(ROUTER, &from_nobody), None);
        // A neighbour solicitation (135) is not answered with an error.
        let mut ns = echo_request(A, B, 1, 1, b"");
        ns[40] = 135;
        assert_eq!(prohibited(ROUTER, &ns), None);
        assert_eq!(prohibited(ROUTER, &[0x45; 60]), None, "not IPv6");
    }
}
