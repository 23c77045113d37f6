//! The mesh resolver and the policy filter: bytes from any local program (DNS
//! queries to the resolver address) and from peers (decrypted packets).

use std::net::Ipv4Addr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use overlay_proto::coord::PeerInfo;
use overlayd::dataplane::filter::{Direction, PeerFilter, Verdict, PEER_FLOWS};
use overlayd::dns::answer::{Transport, EDNS_PAYLOAD};
use overlayd::dns::tcp::{Segment, TcpDns};
use overlayd::dns::{respond, Reply, Zone};
use overlayd::node::access::{PeerAccess, Ports};

fn zone() -> Zone {
    let peer = PeerInfo {
        id: 2,
        name: "b".into(),
        mesh_ip: Ipv4Addr::new(100, 64, 0, 2),
        mesh_ip6: None,
        public_key: String::new(),
        online: true,
        tags: vec![],
    };
    Zone::new(
        "overlay.internal",
        Ipv4Addr::new(100, 100, 100, 100),
        "100.64.0.0/10".parse().expect("network"),
    )
    .build(("a", Ipv4Addr::new(100, 64, 0, 1)), &[peer], &[])
}

/// One query over UDP and over TCP (also cut into TCP segments at every
/// length the input's first byte picks). An answer keeps the query's id, fits
/// the UDP size the query allows, and is a DNS message.
pub fn dns_query(data: &[u8]) {
    let zone = zone();
    for transport in [Transport::Udp, Transport::Tcp] {
        match respond(&zone, data, transport) {
            Reply::Answer(answer) => {
                assert!(answer.len() >= 12, "an answer has a header");
                assert_eq!(answer[..2], data[..2], "the answer keeps the id");
                assert!(answer[2] & 0x80 != 0, "the answer is a response");
                if transport == Transport::Udp {
                    assert!(
                        answer.len() <= usize::from(EDNS_PAYLOAD),
                        "{} bytes",
                        answer.len()
                    );
                }
            }
            Reply::Forward => panic!("no forwarding configured"),
            Reply::Drop => assert!(data.len() < 12 || data[2] & 0x80 != 0),
        }
    }
    let mut tcp = TcpDns::default();
    let client = (Ipv4Addr::new(100, 64, 0, 1).into(), 40000);
    let seg = |seq, flags, payload| Segment {
        client,
        seq,
        ack: 1,
        flags,
        mss: Some(536),
        payload,
    };
    tcp.on_segment(seg(0, 0x02, &[]), 0, 0, |_| None);
    let step = usize::from(*data.first().unwrap_or(&7)).max(1);
    let mut seq = 1u32;
    let mut framed = (data.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(data);
    for chunk in framed.chunks(step) {
        let out = tcp.on_segment(seg(seq, 0x18, chunk), 0, 0, |q| {
            match respond(&zone, q, Transport::Tcp) {
                Reply::Answer(a) => Some(a),
                _ => None,
            }
        });
        assert!(
            out.iter().all(|o| o.payload.len() <= 536),
            "segments fit the MSS"
        );
        seq = seq.wrapping_add(chunk.len() as u32);
    }
    assert!(tcp.len() <= 1);
}

/// Packets through a peer's policy filter, both ways: never a panic, and
/// never more flows than the cap.
pub fn flow_filter(data: &[u8]) {
    let total = Arc::new(AtomicUsize::new(0));
    let ports = Ports {
        any: false,
        tcp: vec![
            "22".parse().expect("port"),
            "1000-2000".parse().expect("ports"),
        ],
        udp: vec!["53".parse().expect("port")],
        icmp: true,
    };
    let access = PeerAccess {
        inbound: ports.clone(),
        outbound: ports,
    };
    let mut filter = PeerFilter::new(Some(access), total);
    // The input is packets, each behind a one-byte length and a direction bit.
    let mut rest = data;
    let mut now = 0;
    while let [head, tail @ ..] = rest {
        let len = usize::from(head & 0x7f).min(tail.len());
        let dir = if head & 0x80 == 0 {
            Direction::In
        } else {
            Direction::Out
        };
        let verdict = filter.check(&tail[..len], dir, now, true);
        if len < 20 {
            assert_eq!(verdict, Verdict::Drop, "a packet shorter than its header");
        }
        rest = &tail[len..];
        now += 1;
    }
    assert!(filter.flow_count() <= PEER_FLOWS);
}
