//! Just enough IPv4 and ICMP to route packets by address, answer with
//! "host unreachable", and run `overlayctl ping` from inside the daemon
//! (ICMPv6 is `icmp6`).

use std::net::{IpAddr, Ipv4Addr};

use super::checksum::internet;

const IPV4_HEADER: usize = 20;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const PROTO_ICMP: u8 = 1;
/// RFC 792: host unreachable.
const CODE_HOST_UNREACHABLE: u8 = 1;
/// RFC 1812: communication administratively prohibited.
const CODE_ADMIN_PROHIBITED: u8 = 13;

/// Source and destination of an IPv4 packet; `None` for anything else.
pub fn ipv4_addrs(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if packet.len() < IPV4_HEADER || packet[0] >> 4 != 4 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    Some((src, dst))
}

/// An IPv4 header (no options, don't fragment, TTL 64, with its checksum)
/// from `src` to `dst` for `l4_len` bytes of `proto`.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> [u8; IPV4_HEADER] {
    let mut h = [0u8; IPV4_HEADER];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((IPV4_HEADER + l4_len) as u16).to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64; // TTL
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = internet(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, icmp: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(IPV4_HEADER + icmp.len());
    p.extend_from_slice(&ipv4_header(src, dst, PROTO_ICMP, icmp.len()));
    p.extend_from_slice(icmp);
    p
}

fn icmp_message(kind: u8, code: u8, rest_of_header: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + body.len());
    m.extend_from_slice(&[kind, code, 0, 0]);
    m.extend_from_slice(&rest_of_header);
    m.extend_from_slice(body);
    let sum = internet(&m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// An ICMP echo request from `src` to `dst`.
pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut id_seq = [0u8; 4];
    id_seq[..2].copy_from_slice(&ident.to_be_bytes());
    id_seq[2..].copy_from_slice(&seq.to_be_bytes());
    ipv4_packet(
        src,
        dst,
        &icmp_message(ICMP_ECHO_REQUEST, 0, id_seq, payload),
    )
}

/// If `packet` is an ICMP echo reply, its source, identifier and sequence number.
pub fn echo_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let (src, _) = ipv4_addrs(packet)?;
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if packet[9] != PROTO_ICMP || packet.len() < ihl + 8 || packet[ihl] != ICMP_ECHO_REPLY {
        return None;
    }
    let ident = u16::from_be_bytes([packet[ihl + 4], packet[ihl + 5]]);
    let seq = u16::from_be_bytes([packet[ihl + 6], packet[ihl + 7]]);
    Some((src, ident, seq))
}

/// If `packet` is an ICMP or ICMPv6 echo reply: its source, identifier and
/// sequence number.
pub fn echo_reply_any(packet: &[u8]) -> Option<(IpAddr, u16, u16)> {
    match packet.first()? >> 4 {
        4 => echo_reply(packet).map(|(from, id, seq)| (from.into(), id, seq)),
        6 => super::icmp6::echo_reply(packet).map(|(from, id, seq)| (from.into(), id, seq)),
        _ => None,
    }
}

/// "Host unreachable" from `router` about `original`, for packets to a mesh
/// address no peer owns; `None` when the original must not get an ICMP error
/// (it is itself an ICMP error, or not IPv4).
pub fn host_unreachable(router: Ipv4Addr, original: &[u8]) -> Option<Vec<u8>> {
    unreachable(router, original, CODE_HOST_UNREACHABLE)
}

/// "Communication administratively prohibited" from `router` about
/// `original`, for packets the access policy refuses to send: the program
/// that sent it fails at once ("No route to host") instead of timing out.
pub fn prohibited(router: Ipv4Addr, original: &[u8]) -> Option<Vec<u8>> {
    unreachable(router, original, CODE_ADMIN_PROHIBITED)
}

fn unreachable(router: Ipv4Addr, original: &[u8], code: u8) -> Option<Vec<u8>> {
    let (src, _) = ipv4_addrs(original)?;
    let ihl = usize::from(original[0] & 0x0f) * 4;
    if original[9] == PROTO_ICMP && original.get(ihl).is_some_and(|t| *t != ICMP_ECHO_REQUEST) {
        return None;
    }
    // RFC 792: the original IP header plus the first 8 bytes of its payload.
    let quoted = &original[..original.len().min(ihl + 8)];
    let icmp = icmp_message(ICMP_UNREACHABLE, code, [0; 4], quoted);
    Some(ipv4_packet(router, src, &icmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    #[test]
    fn echo_request_is_well_formed() {
        let p = echo_request(A, B, 0x1234, 7, b"hello");
        assert_eq!(ipv4_addrs(&p), Some((A, B)));
        assert_eq!(internet(&p[..20]), 0, "IP header checksum verifies");
        assert_eq!(internet(&p[20..]), 0, "ICMP checksum verifies");
        assert_eq!(p.len(), 20 + 8 + 5);
    }

    #[test]
    fn echo_reply_is_recognised() {
        let mut p = echo_request(B, A, 0x1234, 7, b"x");
        p[20] = ICMP_ECHO_REPLY;
        assert_eq!(echo_reply(&p), Some((B, 0x1234, 7)));
        let req = echo_request(B, A, 1, 1, b"x");
        assert_eq!(echo_reply(&req), None);
        assert_eq!(echo_reply(&[0x45; 10]), None);
    }

    #[test]
    fn unreachable_quotes_the_original_and_goes_back_to_its_source() {
        let original = echo_request(A, B, 1, 1, &[0xab; 64]);
        let u = host_unreachable(Ipv4Addr::new(100, 64, 0, 9), &original).unwrap();
        assert_eq!(ipv4_addrs(&u), Some((Ipv4Addr::new(100, 64, 0, 9), A)));
        assert_eq!(u[20], ICMP_UNREACHABLE);
        assert_eq!(&u[28..48], &original[..20]);
        assert_eq!(u.len(), 20 + 8 + 28);
        // Never an error about an error.
        assert_eq!(host_unreachable(A, &u), None);
        let p = prohibited(B, &original).unwrap();
        assert_eq!((p[20], p[21]), (ICMP_UNREACHABLE, CODE_ADMIN_PROHIBITED));
        assert_eq!(prohibited(A, &p), None);
    }

    #[test]
    fn non_ipv4_is_ignored() {
        assert_eq!(ipv4_addrs(&[0x60; 40]), None);
        assert_eq!(ipv4_addrs(&[0x45; 8]), None);
    }

    #[test]
    fn echo_replies_of_both_families_are_matched_by_source() {
        let mut r4 = echo_request(
            Ipv4Addr::new(100, 64, 0, 2),
            Ipv4Addr::new(100, 64, 0, 1),
            5,
            6,
            b"",
        );
        r4[20] = 0; // echo reply
        assert_eq!(
            echo_reply_any(&r4),
            Some((Ipv4Addr::new(100, 64, 0, 2).into(), 5, 6))
        );
        let mut r6 = super::super::icmp6::echo_request(v6_addr(2), v6_addr(1), 5, 6, b"");
        r6[40] = 129;
        assert_eq!(echo_reply_any(&r6), Some((v6_addr(2).into(), 5, 6)));
        assert_eq!(
            echo_reply_any(&super::super::icmp6::echo_request(
                v6_addr(2),
                v6_addr(1),
                5,
                6,
                b""
            )),
            None
        );
    }

    fn v6_addr(last: u16) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0x6440, last)
    }
}
