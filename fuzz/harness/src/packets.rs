//! Byte-level packet code: TUN segmentation, receive coalescing and the
//! IPv4/ICMP helpers.

use std::net::Ipv4Addr;

use overlayd::dataplane::offload::{segment, VNET_HDR_LEN};
use overlayd::dataplane::{icmp, tun_coalesce};

use crate::ones_sum;

const GSO_TCPV4: u8 = 1;
const GSO_ECN: u8 = 0x80;
const PROTO_TCP: u8 = 6;
/// Most packets one `gro_coalesce` input is cut into.
const MAX_GRO_PACKETS: usize = 160;

/// TCP checksum of `p` (IPv4 header of `ihl` bytes) verifies.
fn tcp_sum_ok(p: &[u8], ihl: usize) -> bool {
    let pseudo = u32::from(ones_sum(&p[12..20], 0)) + u32::from(PROTO_TCP) + (p.len() - ihl) as u32;
    ones_sum(&p[ihl..], pseudo) == 0xffff
}

/// One TUN read (`virtio_net_hdr` + packet). A TSO frame becomes segments of at
/// most headers + `gso_size` bytes, each with a right IPv4 length, valid IPv4 and
/// TCP checksums and consecutive sequence numbers; a refused frame leaves nothing
/// behind.
pub fn tun_segment(data: &[u8]) {
    let (mut out, mut lens) = (Vec::new(), Vec::new());
    if segment(data, &mut out, &mut lens).is_err() {
        assert!(
            out.is_empty() && lens.is_empty(),
            "a refused frame left output"
        );
        return;
    }
    assert_eq!(lens.iter().sum::<usize>(), out.len());
    let (hdr, packet) = data.split_at(VNET_HDR_LEN);
    if hdr[1] & !GSO_ECN != GSO_TCPV4 {
        assert_eq!(lens, [packet.len()]);
        if hdr[0] & 1 == 0 {
            assert_eq!(out, packet, "a plain packet passes untouched");
        }
        return;
    }
    let mss = usize::from(u16::from_ne_bytes([hdr[4], hdr[5]]));
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let hdr_len = ihl + usize::from(packet[ihl + 12] >> 4) * 4;
    let seq = |p: &[u8]| u32::from_be_bytes([p[ihl + 4], p[ihl + 5], p[ihl + 6], p[ihl + 7]]);
    assert_eq!(lens.len(), (packet.len() - hdr_len).div_ceil(mss));
    let mut at = 0;
    for (i, len) in lens.iter().enumerate() {
        let p = &out[at..at + len];
        at += len;
        assert!(
            *len <= hdr_len + mss,
            "segment {i}: {len} bytes > {hdr_len} + mss {mss}"
        );
        if *len <= usize::from(u16::MAX) {
            assert_eq!(
                usize::from(u16::from_be_bytes([p[2], p[3]])),
                *len,
                "segment {i} length"
            );
        }
        assert_eq!(ones_sum(&p[..ihl], 0), 0xffff, "segment {i} IPv4 checksum");
        assert!(tcp_sum_ok(p, ihl), "segment {i} TCP checksum");
        assert_eq!(
            seq(p),
            seq(packet).wrapping_add((i * mss) as u32),
            "segment {i} seq"
        );
    }
}

/// Cuts `data` into packets: byte 0 holds options, then each packet is a 2-byte
/// big-endian length and its bytes. Option bit 1 makes IPv4/TCP packets one
/// stream (flow, ack, TOS, TTL of the first, consecutive sequence numbers) and
/// bit 0 fixes their lengths and checksums, so merges are reachable.
fn gro_packets(data: &[u8]) -> Vec<Vec<u8>> {
    let Some((&options, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut packets = Vec::new();
    while rest.len() >= 2 && packets.len() < MAX_GRO_PACKETS {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        packets.push(rest[2..2 + len].to_vec());
        rest = &rest[2 + len..];
    }
    let tcp = |p: &[u8]| p.len() >= 40 && p[0] == 0x45 && p[9] == PROTO_TCP;
    if options & 2 != 0 {
        let mut head: Option<(Vec<u8>, u32)> = None;
        for p in packets.iter_mut().filter(|p| tcp(p)) {
            let payload = p.len().saturating_sub(20 + usize::from(p[32] >> 4) * 4) as u32;
            match &mut head {
                None => {
                    let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
                    head = Some((p[..40].to_vec(), seq.wrapping_add(payload)));
                }
                Some((first, next_seq)) => {
                    p[1] = first[1];
                    p[8] = first[8];
                    p[12..24].copy_from_slice(&first[12..24]);
                    p[24..28].copy_from_slice(&next_seq.to_be_bytes());
                    p[28..32].copy_from_slice(&first[28..32]);
                    *next_seq = next_seq.wrapping_add(payload);
                }
            }
        }
    }
    if options & 1 != 0 {
        for p in packets
            .iter_mut()
            .filter(|p| tcp(p) && p.len() <= usize::from(u16::MAX))
        {
            let len = p.len() as u16;
            p[2..4].copy_from_slice(&len.to_be_bytes());
            p[10..12].fill(0);
            let ip = !ones_sum(&p[..20], 0);
            p[10..12].copy_from_slice(&ip.to_be_bytes());
            p[36..38].fill(0);
            let pseudo =
                u32::from(ones_sum(&p[12..20], 0)) + u32::from(PROTO_TCP) + (p.len() - 20) as u32;
            let tcp = !ones_sum(&p[20..], pseudo);
            p[36..38].copy_from_slice(&tcp.to_be_bytes());
        }
    }
    packets
}

/// Decrypted packets on their way to the TUN. Every frame `coalesce` writes
/// segments back (with `offload::segment`, as the kernel would) into exactly the
/// packets that went in: plain frames byte for byte, merged runs with the same
/// addresses, ports, sequence and ack numbers and payload, and valid checksums.
pub fn gro_coalesce(data: &[u8]) {
    let packets = gro_packets(data);
    let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
    let (mut out, mut frames) = (Vec::new(), Vec::new());
    tun_coalesce::coalesce(&refs, &mut out, &mut frames);
    let mut next = 0;
    let mut originals = packets.iter();
    for (start, len) in frames {
        assert_eq!(start, next, "frames are contiguous");
        next = start + len;
        let frame = &out[start..start + len];
        let (mut again, mut lens) = (Vec::new(), Vec::new());
        segment(frame, &mut again, &mut lens).expect("a coalesced frame segments");
        let plain = frame[..VNET_HDR_LEN] == [0; VNET_HDR_LEN];
        let mut at = 0;
        for len in lens {
            let got = &again[at..at + len];
            at += len;
            let want = originals.next().expect("no more packets out than in");
            if plain {
                assert_eq!(got, want.as_slice(), "a plain frame is the packet");
                continue;
            }
            assert_eq!(got.len(), want.len());
            assert_eq!(got[12..20], want[12..20], "addresses");
            assert_eq!(got[20..32], want[20..32], "ports, seq, ack");
            let hdr_len = 20 + usize::from(want[32] >> 4) * 4;
            assert_eq!(got[hdr_len..], want[hdr_len..], "payload");
            assert_eq!(ones_sum(&got[..20], 0), 0xffff, "IPv4 checksum");
            assert!(tcp_sum_ok(got, 20), "TCP checksum");
        }
    }
    assert_eq!(next, out.len());
    assert!(originals.next().is_none(), "every packet comes out");
}

/// A packet as the data plane's IPv4/ICMP helpers see it. An ICMP error is
/// addressed from the router back to the source, quotes at most the header
/// and 8 bytes, and carries valid checksums.
pub fn ipv4_icmp(data: &[u8]) {
    let _ = icmp::echo_reply(data);
    let addrs = icmp::ipv4_addrs(data);
    let router = Ipv4Addr::new(100, 64, 0, 9);
    if let Some(u) = icmp::host_unreachable(router, data) {
        let (src, _) = addrs.expect("only IPv4 gets an ICMP error");
        assert_eq!(icmp::ipv4_addrs(&u), Some((router, src)));
        assert!(u.len() <= 20 + 8 + 60 + 8, "{} bytes", u.len());
        assert_eq!(usize::from(u16::from_be_bytes([u[2], u[3]])), u.len());
        assert_eq!(ones_sum(&u[..20], 0), 0xffff, "IPv4 checksum");
        assert_eq!(ones_sum(&u[20..], 0), 0xffff, "ICMP checksum");
    }
}
