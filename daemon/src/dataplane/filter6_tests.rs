//! The filter on IPv6 packets: the same verdicts as IPv4, ICMPv6 as ICMP,
//! extension headers walked, and flows kept apart per family.

use super::*;
use crate::dataplane::ip6::tests::{fragment, options, packet};

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const HOP_BY_HOP: u8 = 0;
const DEST_OPTS: u8 = 60;

fn tcp_l4(src: u16, dst: u16, flags: u8) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&src.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.to_be_bytes());
    l4[12] = 0x50;
    l4[13] = flags;
    l4
}

fn tcp6(src: u16, dst: u16, flags: u8) -> Vec<u8> {
    packet(&[], 6, &tcp_l4(src, dst, flags))
}

/// The same segment over IPv4 (100.64.0.2 → 100.64.0.3).
fn tcp4(src: u16, dst: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 100, 64, 0, 2, 100, 64, 0, 3,
    ];
    p.extend_from_slice(&tcp_l4(src, dst, flags));
    p
}

fn udp6(src: u16, dst: u16) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&src.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.to_be_bytes());
    packet(&[], 17, &l4)
}

fn icmp6(kind: u8, id: u16) -> Vec<u8> {
    let mut l4 = vec![kind, 0, 0, 0, 0, 0, 0, 1];
    l4[4..6].copy_from_slice(&id.to_be_bytes());
    packet(&[], ip6::PROTO_ICMPV6, &l4)
}

/// An ICMPv6 destination-unreachable quoting `quoted`.
fn unreachable6(quoted: &[u8]) -> Vec<u8> {
    let mut l4 = vec![1, 4, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&quoted[..48.min(quoted.len())]);
    packet(&[], ip6::PROTO_ICMPV6, &l4)
}

/// TCP 22, UDP 53 and ping may open towards us; nothing goes out.
fn server_side(any: bool) -> PeerFilter {
    let range = |p: u16| overlay_proto::filter::PortRange { first: p, last: p };
    let access = PeerAccess {
        inbound: Ports {
            any,
            tcp: vec![range(22)],
            udp: vec![range(53)],
            icmp: true,
        },
        outbound: Ports::default(),
    };
    PeerFilter::new(Some(access), Arc::new(AtomicUsize::new(0)))
}

use Direction::{In, Out};

#[test]
fn an_allowed_ipv6_connection_gets_its_replies_and_nothing_else_opens() {
    let mut f = server_side(false);
    assert_eq!(f.check(&tcp6(5000, 22, SYN), In, 0, true), Verdict::Pass);
    assert_eq!(
        f.check(&tcp6(22, 5000, SYN | ACK), Out, 0, true),
        Verdict::Pass
    );
    assert_eq!(f.check(&tcp6(5000, 80, SYN), In, 0, true), Verdict::Drop);
    assert_eq!(f.check(&tcp6(22, 6000, SYN), Out, 0, true), Verdict::Drop);
    assert_eq!(f.check(&udp6(7000, 53), In, 0, true), Verdict::Pass);
    assert_eq!(f.check(&udp6(53, 7000), Out, 0, true), Verdict::Pass);
    assert_eq!(f.check(&udp6(7000, 54), In, 0, true), Verdict::Drop);
    assert_eq!(f.flow_count(), 2);
}

#[test]
fn ipv4_and_ipv6_flows_with_the_same_ports_are_apart() {
    let mut f = server_side(false);
    assert_eq!(f.check(&tcp4(5000, 22, SYN), In, 0, true), Verdict::Pass);
    // The IPv4 connection's reply passes, the same ports over IPv6 do not.
    assert_eq!(f.check(&tcp4(22, 5000, ACK), Out, 0, true), Verdict::Pass);
    assert_eq!(f.check(&tcp6(22, 5000, ACK), Out, 0, true), Verdict::Drop);
}

#[test]
fn icmpv6_echo_is_ping_to_the_policy_and_other_icmpv6_is_not() {
    let mut f = server_side(false);
    assert_eq!(f.check(&icmp6(128, 9), In, 0, true), Verdict::Pass);
    assert_eq!(f.check(&icmp6(129, 9), Out, 0, true), Verdict::Pass);
    // We may not ping it (nothing goes out), and a reply to nothing fails.
    assert_eq!(f.check(&icmp6(128, 10), Out, 0, true), Verdict::Drop);
    // Neighbour discovery and MLD are not the mesh's: other protocols.
    assert_eq!(f.check(&icmp6(135, 0), In, 0, true), Verdict::Drop);
    assert_eq!(f.check(&icmp6(143, 0), In, 0, true), Verdict::Drop);
    // ICMPv4's echo type numbers mean nothing in ICMPv6.
    assert_eq!(f.check(&icmp6(8, 11), In, 0, true), Verdict::Drop);
}

#[test]
fn an_icmpv6_error_passes_only_for_a_known_flow() {
    let mut f = server_side(false);
    assert_eq!(f.check(&tcp6(5000, 22, SYN), In, 0, true), Verdict::Pass);
    // The peer's host says our reply could not be delivered: a known flow.
    let about_ours = unreachable6(&tcp6(22, 5000, SYN | ACK));
    assert_eq!(f.check(&about_ours, In, 0, true), Verdict::Pass);
    let about_other = unreachable6(&tcp6(22, 5001, SYN | ACK));
    assert_eq!(f.check(&about_other, In, 0, true), Verdict::Drop);
}

#[test]
fn extension_headers_are_walked_to_the_transport_header() {
    let mut f = server_side(false);
    let chained = |dst: u16| {
        packet(
            &[(HOP_BY_HOP, options(1)), (DEST_OPTS, options(2))],
            6,
            &tcp_l4(5000, dst, SYN),
        )
    };
    assert_eq!(f.check(&chained(22), In, 0, true), Verdict::Pass);
    assert_eq!(f.check(&chained(80), In, 0, true), Verdict::Drop);
    // A first fragment carries the ports; later ones pass only where every
    // port of their protocol is open.
    let first = packet(&[(44, fragment(0, true))], 6, &tcp_l4(5001, 22, SYN));
    assert_eq!(f.check(&first, In, 0, true), Verdict::Pass);
    let later = packet(&[(44, fragment(100, false))], 6, &[0; 40]);
    assert_eq!(f.check(&later, In, 0, true), Verdict::Drop);
    assert_eq!(server_side(true).check(&later, In, 0, true), Verdict::Pass);
}

#[test]
fn what_the_walk_cannot_take_apart_is_dropped_and_opaque_protocols_need_any() {
    let mut f = server_side(false);
    let mut cut = packet(&[(DEST_OPTS, options(4))], 6, &tcp_l4(5000, 22, SYN));
    cut.truncate(40 + 16);
    assert_eq!(f.check(&cut, In, 0, true), Verdict::Drop);
    assert_eq!(server_side(true).check(&cut, In, 0, true), Verdict::Drop);
    let esp = packet(&[], 50, &[0; 32]);
    assert_eq!(f.check(&esp, In, 0, true), Verdict::Drop);
    assert_eq!(server_side(true).check(&esp, In, 0, true), Verdict::Pass);
    // A TCP header cut short.
    assert_eq!(
        f.check(&packet(&[], 6, &[0x13, 0x88]), In, 0, true),
        Verdict::Drop
    );
}
