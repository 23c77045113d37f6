use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use overlay_proto::coord::PeerInfo;

use super::answer::{respond, Reply, Transport, EDNS_PAYLOAD};
use super::tcp::{Segment, TcpDns, ACK, FIN, PSH, RST, SYN};
use super::*;

fn peer(id: u64, name: &str, last: u8) -> PeerInfo {
    PeerInfo {
        id,
        name: name.into(),
        mesh_ip: Ipv4Addr::new(100, 64, 0, last),
        mesh_ip6: None,
        public_key: String::new(),
        online: true,
        tags: vec![],
    }
}

fn zone() -> Zone {
    Zone::new(
        "Overlay.Internal.",
        Ipv4Addr::new(100, 100, 100, 100),
        "100.64.0.0/10".parse().unwrap(),
    )
    .build(
        ("a", Ipv4Addr::new(100, 64, 0, 1)),
        &[peer(2, "b", 2), peer(3, "DB_1", 3)],
        &[(
            "grafana.overlay.internal".into(),
            Ipv4Addr::new(100, 64, 0, 3),
        )],
    )
}

fn query(name: &str, kind: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0x4242)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask(zone: &Zone, name: &str, kind: RecordType) -> Message {
    match respond(zone, &query(name, kind, false), Transport::Udp) {
        Reply::Answer(bytes) => Message::from_vec(&bytes).unwrap(),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn names_under_the_domain_answer_with_mesh_addresses() {
    let z = zone();
    let m = ask(&z, "b.overlay.internal.", RecordType::A);
    assert_eq!(m.id(), 0x4242);
    assert_eq!(m.message_type(), MessageType::Response);
    assert!(m.authoritative() && m.recursion_desired());
    assert_eq!(m.response_code(), ResponseCode::NoError);
    let answers = m.answers();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].ttl(), TTL);
    assert_eq!(
        answers[0].data(),
        &RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(100, 64, 0, 2)))
    );
    // Case does not matter; a node name becomes a DNS label; extra records.
    assert_eq!(
        ask(&z, "B.OVERLAY.internal", RecordType::A).answers().len(),
        1
    );
    assert_eq!(
        ask(&z, "db-1.overlay.internal", RecordType::A)
            .answers()
            .len(),
        1
    );
    assert_eq!(
        ask(&z, "grafana.overlay.internal", RecordType::A)
            .answers()
            .len(),
        1
    );
    assert_eq!(
        ask(&z, "a.overlay.internal", RecordType::A).answers().len(),
        1
    );
}

#[test]
fn unknown_names_are_nxdomain_and_known_names_without_the_type_are_empty() {
    let z = zone();
    let m = ask(&z, "nobody.overlay.internal", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    assert!(m.answers().is_empty());
    assert_eq!(m.name_servers().len(), 1, "the SOA bounds negative caching");
    let m = ask(&z, "b.overlay.internal", RecordType::AAAA);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
    // A name that exists only above a longer one (extra record `a.svc`).
    let deep = Zone::new(
        "overlay.internal",
        Ipv4Addr::new(100, 100, 100, 100),
        "100.64.0.0/10".parse().unwrap(),
    )
    .build(
        ("a", Ipv4Addr::new(100, 64, 0, 1)),
        &[],
        &[("x.svc".into(), Ipv4Addr::new(100, 64, 0, 9))],
    );
    assert_eq!(
        ask(&deep, "svc.overlay.internal", RecordType::A).response_code(),
        ResponseCode::NoError
    );
    assert_eq!(
        ask(&deep, "vc.overlay.internal", RecordType::A).response_code(),
        ResponseCode::NXDomain
    );
    let m = ask(&z, "overlay.internal", RecordType::SOA);
    assert_eq!(m.answers()[0].record_type(), RecordType::SOA);
}

#[test]
fn mesh_addresses_answer_ptr() {
    let z = zone();
    let m = ask(&z, "2.0.64.100.in-addr.arpa.", RecordType::PTR);
    assert_eq!(
        m.answers()[0].data(),
        &RData::PTR(hickory_proto::rr::rdata::PTR(
            Name::from_ascii("b.overlay.internal.").unwrap()
        ))
    );
    let m = ask(&z, "9.0.64.100.in-addr.arpa", RecordType::PTR);
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    // Not a mesh address: not ours.
    let m = ask(&z, "1.1.168.192.in-addr.arpa", RecordType::PTR);
    assert_eq!(m.response_code(), ResponseCode::Refused);
}

#[test]
fn other_names_are_refused_or_forwarded() {
    let mut z = zone();
    let m = ask(&z, "example.com", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::Refused);
    assert!(!m.recursion_available());
    z.forwarding = true;
    assert_eq!(
        respond(
            &z,
            &query("example.com", RecordType::A, false),
            Transport::Udp
        ),
        Reply::Forward
    );
    // A name that merely ends like the domain is not under it.
    assert_eq!(
        respond(
            &z,
            &query("evil-overlay.internal", RecordType::A, false),
            Transport::Udp
        ),
        Reply::Forward
    );
}

#[test]
fn edns_is_answered_with_our_payload_size() {
    let z = zone();
    let Reply::Answer(bytes) = respond(
        &z,
        &query("b.overlay.internal", RecordType::A, true),
        Transport::Udp,
    ) else {
        panic!("no answer");
    };
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!(m.extensions().as_ref().unwrap().max_payload(), EDNS_PAYLOAD);
    assert_eq!(m.answers().len(), 1);
}

#[test]
fn garbage_gets_formerr_or_is_dropped() {
    let z = zone();
    // Too short for a header, or a response: dropped.
    assert_eq!(respond(&z, &[1, 2, 3], Transport::Udp), Reply::Drop);
    let mut response = query("b.overlay.internal", RecordType::A, false);
    response[2] |= 0x80;
    assert_eq!(respond(&z, &response, Transport::Udp), Reply::Drop);
    // A header that promises a question that is not there.
    let truncated = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a'];
    let Reply::Answer(bytes) = respond(&z, &truncated, Transport::Udp) else {
        panic!("no FORMERR");
    };
    assert_eq!(&bytes[..2], &[0x12, 0x34]);
    assert_eq!(bytes[3] & 0x0f, 1, "FORMERR");
    // A name that points at itself.
    let mut looped = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert!(matches!(respond(&z, &looped, Transport::Udp), Reply::Answer(b) if b[3] & 0x0f == 1));
    // Random bytes never panic.
    let mut seed = 7u64;
    for _ in 0..2_000 {
        let len = (seed % 80) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) as u8
            })
            .collect();
        let _ = respond(&z, &bytes, Transport::Udp);
    }
}

#[test]
fn node_names_become_dns_labels() {
    assert_eq!(label("Web_Server 1"), "web-server-1");
    assert_eq!(label("--x--"), "x");
    assert_eq!(label(&"a".repeat(80)).len(), 63);
    assert_eq!(label("_"), "");
}

const CLIENT: (IpAddr, u16) = (IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)), 40000);

fn seg(seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Segment<'_> {
    Segment {
        client: CLIENT,
        seq,
        ack,
        flags,
        mss: None,
        payload,
    }
}

#[test]
fn a_query_over_tcp_is_answered_across_segments() {
    let z = zone();
    let mut tcp = TcpDns::default();
    let answer = |q: &[u8]| match respond(&z, q, Transport::Tcp) {
        Reply::Answer(a) => Some(a),
        _ => None,
    };
    let mut syn = seg(1000, 0, SYN, &[]);
    syn.mss = Some(100);
    let out = tcp.on_segment(syn, 0, 5000, answer);
    assert_eq!(
        (out[0].flags, out[0].seq, out[0].ack),
        (SYN | ACK, 5000, 1001)
    );
    let q = query("b.overlay.internal", RecordType::A, false);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    // Half the query: acknowledged, not answered yet.
    let out = tcp.on_segment(seg(1001, 5001, ACK, &framed[..10]), 0, 0, answer);
    assert_eq!((out.len(), out[0].ack), (1, 1011));
    // A retransmission of what we have: a duplicate ACK.
    let out = tcp.on_segment(seg(1001, 5001, ACK, &framed[..10]), 0, 0, answer);
    assert_eq!((out.len(), out[0].ack), (1, 1011));
    let rest = &framed[10..];
    let out = tcp.on_segment(seg(1011, 5001, ACK | PSH, rest), 0, 0, answer);
    let data: Vec<u8> = out.iter().flat_map(|o| o.payload.clone()).collect();
    assert!(out.iter().all(|o| o.payload.len() <= 100), "cut at the MSS");
    let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
    let m = Message::from_vec(&data[2..2 + len]).unwrap();
    assert_eq!(m.answers().len(), 1);
    assert_eq!(out[0].seq, 5001);
    // FIN: answered with ours, and the connection is gone.
    let end = 1011 + rest.len() as u32;
    let out = tcp.on_segment(
        seg(end, 5001 + data.len() as u32, FIN | ACK, &[]),
        0,
        0,
        answer,
    );
    assert_eq!((out[0].flags, out[0].ack), (FIN | ACK, end + 1));
    assert!(tcp.is_empty());
}

#[test]
fn tcp_state_is_bounded() {
    let mut tcp = TcpDns::default();
    let none = |_: &[u8]| None;
    // A length prefix of 65,535 that never completes: buffered, then swept.
    tcp.on_segment(seg(0, 0, SYN, &[]), 0, 1, none);
    let out = tcp.on_segment(seg(1, 2, ACK, &[0xff, 0xff, 0, 0]), 0, 0, none);
    assert_eq!(out[0].flags, ACK);
    tcp.sweep(tcp::IDLE_SECS + 1);
    assert!(tcp.is_empty());
    // More connections than the cap: the next SYN is reset.
    for port in 0..tcp::MAX_CONNECTIONS as u16 {
        let mut s = seg(0, 0, SYN, &[]);
        s.client.1 = port;
        tcp.on_segment(s, 100, 1, none);
    }
    let mut s = seg(0, 0, SYN, &[]);
    s.client.1 = 60000;
    assert_eq!(tcp.on_segment(s, 100, 1, none)[0].flags, RST | ACK);
    assert_eq!(tcp.len(), tcp::MAX_CONNECTIONS);
    // Data for an unknown connection is reset; an RST is never answered.
    let mut s = seg(5, 9, ACK, b"x");
    s.client.1 = 61000;
    assert_eq!(tcp.on_segment(s, 100, 1, none)[0].flags, RST);
    assert!(tcp.on_segment(seg(0, 0, RST, &[]), 100, 1, none).is_empty());
}

/// The zone of `zone()` in a mesh with IPv6: `b` has a mesh IPv6 address,
/// `db-1` none (an older coordinator's word, say), and so do we once
/// `set_own_ip6` says ours.
fn zone6() -> Zone {
    let mut b = peer(2, "b", 2);
    b.mesh_ip6 = Some(v6(2));
    let mut z = Zone::new(
        "overlay.internal",
        Ipv4Addr::new(100, 100, 100, 100),
        "100.64.0.0/10".parse().unwrap(),
    )
    .build(
        ("a", Ipv4Addr::new(100, 64, 0, 1)),
        &[b, peer(3, "DB_1", 3)],
        &[],
    );
    z.set_own_ip6(v6(1), "fd7a:115c:a1e0::/48".parse().unwrap());
    z
}

fn v6(last: u16) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0x6440, last)
}

/// `ip`'s reverse name under ip6.arpa.
fn ip6_arpa(ip: std::net::Ipv6Addr) -> String {
    let hex: String = ip.octets().iter().map(|b| format!("{b:02x}")).collect();
    let nibbles: Vec<String> = hex.chars().rev().map(String::from).collect();
    format!("{}.ip6.arpa.", nibbles.join("."))
}

#[test]
fn aaaa_answers_with_mesh_ipv6_addresses() {
    let z = zone6();
    let m = ask(&z, "b.overlay.internal", RecordType::AAAA);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.authoritative());
    assert_eq!(m.answers().len(), 1);
    assert_eq!(
        m.answers()[0].data(),
        &RData::AAAA(hickory_proto::rr::rdata::AAAA(v6(2)))
    );
    // Our own name, from our own address.
    let m = ask(&z, "a.overlay.internal", RecordType::AAAA);
    assert_eq!(
        m.answers()[0].data(),
        &RData::AAAA(hickory_proto::rr::rdata::AAAA(v6(1)))
    );
    // A still answers A only; ANY answers both.
    let m = ask(&z, "b.overlay.internal", RecordType::A);
    assert_eq!(m.answers().len(), 1);
    assert_eq!(m.answers()[0].record_type(), RecordType::A);
    let m = ask(&z, "b.overlay.internal", RecordType::ANY);
    let kinds: Vec<_> = m.answers().iter().map(|r| r.record_type()).collect();
    assert_eq!(kinds, vec![RecordType::A, RecordType::AAAA]);
    // A node without a mesh IPv6 address: the name exists, no AAAA.
    let m = ask(&z, "db-1.overlay.internal", RecordType::AAAA);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
    assert_eq!(m.name_servers().len(), 1);
    let m = ask(&z, "nobody.overlay.internal", RecordType::AAAA);
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
}

#[test]
fn mesh_ipv6_addresses_answer_ptr_under_ip6_arpa() {
    let mut z = zone6();
    let m = ask(&z, &ip6_arpa(v6(2)), RecordType::PTR);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_eq!(
        m.answers()[0].data(),
        &RData::PTR(hickory_proto::rr::rdata::PTR(
            Name::from_ascii("b.overlay.internal.").unwrap()
        ))
    );
    let m = ask(&z, &ip6_arpa(v6(1)), RecordType::PTR);
    assert_eq!(
        m.answers()[0].data(),
        &RData::PTR(hickory_proto::rr::rdata::PTR(
            Name::from_ascii("a.overlay.internal.").unwrap()
        ))
    );
    // In the mesh's prefix but nobody's: NXDOMAIN; outside it: not ours.
    let m = ask(&z, &ip6_arpa(v6(9)), RecordType::PTR);
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    let m = ask(
        &z,
        &ip6_arpa("2001:db8::1".parse().unwrap()),
        RecordType::PTR,
    );
    assert_eq!(m.response_code(), ResponseCode::Refused);
    z.forwarding = true;
    assert_eq!(
        respond(
            &z,
            &query(
                &ip6_arpa("2001:db8::1".parse().unwrap()),
                RecordType::PTR,
                false
            ),
            Transport::Udp
        ),
        Reply::Forward
    );
}

#[test]
fn without_ipv6_aaaa_stays_empty_and_ip6_arpa_is_not_ours() {
    let z = zone();
    assert!(ask(&z, "a.overlay.internal", RecordType::AAAA)
        .answers()
        .is_empty());
    let m = ask(&z, &ip6_arpa(v6(2)), RecordType::PTR);
    assert_eq!(m.response_code(), ResponseCode::Refused);
}
