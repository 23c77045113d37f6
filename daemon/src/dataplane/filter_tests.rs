use super::*;
use overlay_proto::filter::PortRange;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// An IPv4 header (no options) with protocol `proto` and `l4` behind it.
fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
    p.extend_from_slice(&[100, 64, 0, 2, 100, 64, 0, 3]);
    p.extend_from_slice(l4);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

fn tcp(src: u16, dst: u16, flags: u8) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&src.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.to_be_bytes());
    l4[12] = 0x50;
    l4[13] = flags;
    ipv4(6, &l4)
}

fn udp(src: u16, dst: u16) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&src.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.to_be_bytes());
    ipv4(17, &l4)
}

fn echo(kind: u8, id: u16) -> Vec<u8> {
    let mut l4 = vec![kind, 0, 0, 0, 0, 0, 0, 1];
    l4[4..6].copy_from_slice(&id.to_be_bytes());
    ipv4(1, &l4)
}

/// An ICMP destination-unreachable quoting `quoted`.
fn unreachable(quoted: &[u8]) -> Vec<u8> {
    let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&quoted[..28.min(quoted.len())]);
    ipv4(1, &l4)
}

fn ports(tcp: &[(u16, u16)], udp: &[(u16, u16)], icmp: bool) -> Ports {
    let ranges = |r: &[(u16, u16)]| {
        r.iter()
            .map(|&(first, last)| PortRange { first, last })
            .collect()
    };
    Ports {
        any: false,
        tcp: ranges(tcp),
        udp: ranges(udp),
        icmp,
    }
}

/// The server: `dev` may open TCP 22 and ping; nothing goes out.
fn server_side() -> PeerFilter {
    let access = PeerAccess {
        inbound: ports(&[(22, 22)], &[(53, 53)], true),
        outbound: Ports::default(),
    };
    PeerFilter::new(Some(access), Arc::new(AtomicUsize::new(0)))
}

use Direction::{In, Out};

#[test]
fn no_policy_passes_everything_and_tracks_nothing() {
    let mut f = PeerFilter::new(None, Arc::new(AtomicUsize::new(0)));
    assert_eq!(f.check(&tcp(5000, 80, SYN), In, 0, true), Verdict::Pass);
    assert_eq!(f.check(&[1, 2, 3], Out, 0, true), Verdict::Pass);
    assert_eq!(f.flow_count(), 0);
}

#[test]
fn an_allowed_connection_gets_its_replies_and_nothing_else_opens() {
    let mut f = server_side();
    assert_eq!(f.check(&tcp(40000, 22, SYN), In, 0, true), Verdict::Pass);
    // The reply goes out without any outbound rule.
    assert_eq!(
        f.check(&tcp(22, 40000, SYN | ACK), Out, 0, true),
        Verdict::Pass
    );
    assert_eq!(f.check(&tcp(40000, 22, ACK), In, 1, true), Verdict::Pass);
    // Another port, and a connection of our own to the peer: refused.
    assert_eq!(f.check(&tcp(40001, 80, SYN), In, 1, true), Verdict::Drop);
    assert_eq!(f.check(&tcp(2222, 2222, SYN), Out, 1, true), Verdict::Drop);
    assert_eq!(
        f.check(&tcp(22, 40001, SYN | ACK), Out, 1, true),
        Verdict::Drop
    );
    // UDP the same way.
    assert_eq!(f.check(&udp(5353, 53), In, 1, true), Verdict::Pass);
    assert_eq!(f.check(&udp(53, 5353), Out, 1, true), Verdict::Pass);
    assert_eq!(f.check(&udp(53, 5354), Out, 1, true), Verdict::Drop);
    assert_eq!(f.flow_count(), 2);
}

#[test]
fn pings_pass_one_way_and_their_replies_come_back() {
    let mut f = server_side();
    assert_eq!(f.check(&echo(8, 7), In, 0, true), Verdict::Pass);
    assert_eq!(f.check(&echo(0, 7), Out, 0, true), Verdict::Pass);
    // We may not ping the peer, and an unasked-for reply does not come in.
    assert_eq!(f.check(&echo(8, 9), Out, 0, true), Verdict::Drop);
    assert_eq!(f.check(&echo(0, 9), Out, 0, true), Verdict::Drop);
    let mut client = PeerFilter::new(
        Some(PeerAccess {
            inbound: Ports::default(),
            outbound: ports(&[], &[], true),
        }),
        Arc::new(AtomicUsize::new(0)),
    );
    assert_eq!(client.check(&echo(0, 9), In, 0, true), Verdict::Drop);
}

#[test]
fn a_reply_whose_request_went_unrecorded_passes_where_the_peer_may_ping_us() {
    let mut f = server_side();
    // No flow for id 5 (say the table was full when we asked): the peer may
    // ping us (an icmp rule), so its reply may come in too.
    assert_eq!(f.check(&echo(0, 5), In, 0, true), Verdict::Pass);
}

#[test]
fn icmp_errors_pass_only_for_known_flows() {
    let mut f = PeerFilter::new(
        Some(PeerAccess {
            inbound: Ports::default(),
            outbound: ports(&[(443, 443)], &[], false),
        }),
        Arc::new(AtomicUsize::new(0)),
    );
    let ours = tcp(41000, 443, SYN);
    assert_eq!(f.check(&ours, Out, 0, true), Verdict::Pass);
    // The peer says our packet was too big: it quotes what we sent.
    assert_eq!(f.check(&unreachable(&ours), In, 0, true), Verdict::Pass);
    let stranger = tcp(41001, 443, SYN);
    assert_eq!(f.check(&unreachable(&stranger), In, 0, true), Verdict::Drop);
    // Other ICMP and other protocols: only with an "any" rule.
    assert_eq!(
        f.check(&ipv4(1, &[13, 0, 0, 0]), In, 0, true),
        Verdict::Drop
    );
    assert_eq!(f.check(&ipv4(47, &[0; 8]), In, 0, true), Verdict::Drop);
}

#[test]
fn truncated_headers_and_later_fragments_are_dropped_without_a_wide_rule() {
    let mut f = server_side();
    assert_eq!(f.check(&[0x45, 0, 0], In, 0, true), Verdict::Drop);
    assert_eq!(f.check(&ipv4(6, &[0, 1]), In, 0, true), Verdict::Drop);
    let mut fragment = udp(5353, 53);
    fragment[7] = 0x10; // fragment offset 16 (× 8 bytes)
    assert_eq!(f.check(&fragment, In, 0, true), Verdict::Drop);
    let mut wide = PeerFilter::new(
        Some(PeerAccess {
            inbound: ports(&[], &[(0, u16::MAX)], false),
            outbound: Ports::default(),
        }),
        Arc::new(AtomicUsize::new(0)),
    );
    assert_eq!(wide.check(&fragment, In, 0, true), Verdict::Pass);
}

#[test]
fn idle_flows_expire_by_protocol_and_state() {
    let mut f = server_side();
    f.check(&tcp(40000, 22, SYN), In, 0, true);
    f.check(&tcp(40001, 22, SYN), In, 0, true);
    f.check(&tcp(22, 40001, SYN | ACK), Out, 0, true);
    f.check(&udp(5353, 53), In, 0, true);
    f.check(&udp(53, 5353), Out, 0, true);
    f.sweep(UNANSWERED_SECS + 1);
    // The unanswered SYN is gone; the answered TCP and UDP flows stay.
    assert_eq!(f.flow_count(), 2);
    assert_eq!(
        f.check(&tcp(22, 40000, SYN | ACK), Out, 31, true),
        Verdict::Drop
    );
    f.sweep(UDP_SECS + 1);
    assert_eq!(f.flow_count(), 1);
    // A FIN shortens the TCP flow's life.
    f.check(&tcp(40001, 22, ACK | TCP_FIN), In, 200, true);
    f.sweep(200 + TCP_CLOSING_SECS + 1);
    assert_eq!(f.flow_count(), 0);
}

#[test]
fn a_flood_of_new_flows_stays_under_the_cap_and_known_flows_keep_working() {
    let total = Arc::new(AtomicUsize::new(0));
    let access = PeerAccess {
        inbound: ports(&[(0, u16::MAX)], &[], false),
        outbound: Ports::default(),
    };
    let mut flooder = PeerFilter::new(Some(access.clone()), total.clone());
    let mut quiet = PeerFilter::new(Some(access), total.clone());
    assert_eq!(
        quiet.check(&tcp(50000, 22, SYN), In, 0, true),
        Verdict::Pass
    );
    assert_eq!(
        flooder.check(&tcp(50000, 22, SYN), In, 0, true),
        Verdict::Pass
    );
    let mut unrecorded = 0;
    for i in 0..100_000u32 {
        let port = (i % 65_536) as u16;
        let src = 1 + (i / 65_536) as u16;
        match flooder.check(&tcp(src, port, SYN), In, 1 + i / 10_000, true) {
            Verdict::PassUnrecorded => unrecorded += 1,
            Verdict::Pass => {}
            Verdict::Drop => panic!("a rule allows every port"),
        }
    }
    assert!(flooder.flow_count() <= PEER_FLOWS);
    assert!(unrecorded >= 100_000 - PEER_FLOWS);
    assert!(total.load(Ordering::Relaxed) <= TOTAL_FLOWS);
    // Established flows of both peers still get their replies.
    assert_eq!(
        quiet.check(&tcp(22, 50000, ACK), Out, 11, true),
        Verdict::Pass
    );
    assert_eq!(
        flooder.check(&tcp(22, 50000, ACK), Out, 11, true),
        Verdict::Pass
    );
    // Dropping a peer returns its share of the global count.
    drop(flooder);
    assert_eq!(total.load(Ordering::Relaxed), quiet.flow_count());
}

#[test]
fn the_global_cap_holds_across_peers() {
    let total = Arc::new(AtomicUsize::new(TOTAL_FLOWS - 1));
    let mut f = server_side();
    f.total = total.clone();
    assert_eq!(f.check(&tcp(1, 22, SYN), In, 0, true), Verdict::Pass);
    assert_eq!(
        f.check(&tcp(2, 22, SYN), In, 0, true),
        Verdict::PassUnrecorded
    );
    assert_eq!(total.load(Ordering::Relaxed), TOTAL_FLOWS);
}

#[test]
fn revoking_a_rule_cuts_the_flows_it_opened() {
    let mut f = server_side();
    f.check(&tcp(40000, 22, SYN), In, 0, true);
    f.check(&udp(5353, 53), In, 0, true);
    f.set_access(
        Some(PeerAccess {
            inbound: ports(&[], &[(53, 53)], false),
            outbound: Ports::default(),
        }),
        true,
    );
    assert_eq!(f.flow_count(), 1);
    assert_eq!(f.check(&tcp(22, 40000, ACK), Out, 1, true), Verdict::Drop);
    assert_eq!(f.check(&udp(53, 5353), Out, 1, true), Verdict::Pass);
    f.set_access(None, true);
    assert_eq!(f.flow_count(), 0);
    assert_eq!(f.check(&tcp(1, 2, SYN), In, 1, true), Verdict::Pass);
}

#[test]
fn without_the_sender_check_everything_leaves_and_replies_return() {
    let mut f = server_side();
    assert_eq!(f.check(&tcp(2222, 80, SYN), Out, 0, false), Verdict::Pass);
    assert_eq!(
        f.check(&tcp(80, 2222, SYN | ACK), In, 0, false),
        Verdict::Pass
    );
    // What the peer opens is still checked.
    assert_eq!(f.check(&tcp(3333, 80, SYN), In, 0, false), Verdict::Drop);
}
