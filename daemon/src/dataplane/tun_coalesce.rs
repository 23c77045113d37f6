//! Receive-side coalescing, the mirror of [`crate::dataplane::offload`]: consecutive
//! decrypted TCP segments of one flow become one TUN write with a GSO
//! `virtio_net_hdr`, so the kernel's TCP stack takes one large segment instead of
//! dozens of small ones. Anything that does not fit the rules is written alone.
//!
//! A segment joins the run before it when it is the same flow (addresses, ports),
//! carries the next sequence number, the same ack, TCP options, TTL and TOS
//! (IPv6: hop limit, traffic class and flow label), only ACK/PSH flags, and the
//! run's segments so far are all of one size with no PSH. IPv4 without options
//! and IPv6 without extension headers; anything else is written alone.

use super::checksum::{
    fold, ipv4_header, sum16, tcp_v4_pseudo, tcp_v6_pseudo, IPV6_HEADER, PROTO_TCP,
};
use super::offload::VNET_HDR_LEN;

const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const F_NEEDS_CSUM: u8 = 1;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// The largest IP packet a run may grow to.
const MAX_IP_LEN: usize = 65_535;
/// At most this many segments in one run (what the kernel's own GRO allows).
const MAX_RUN: usize = 64;

/// What a TCP segment must share with the run it joins.
struct Segment<'a> {
    v6: bool,
    /// The IP header's length: 20 (IPv4) or 40 (IPv6).
    ihl: usize,
    thl: usize,
    payload_len: usize,
    seq: u32,
    flags: u8,
    /// Source, destination, ports: the flow (contiguous in both families).
    flow: &'a [u8],
    /// IPv4: TOS and TTL. IPv6: version, traffic class, flow label, and hop
    /// limit. They must match too.
    class: [u8; 4],
    ttl: u8,
    ack: u32,
    options: &'a [u8],
}

fn parse(p: &[u8]) -> Option<Segment<'_>> {
    let v6 = match p.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let (ihl, flow, class, ttl) = if v6 {
        if p.len() < IPV6_HEADER + 20 || p[6] != PROTO_TCP {
            return None; // IPv6 without extension headers only
        }
        let payload = usize::from(u16::from_be_bytes([p[4], p[5]]));
        if payload + IPV6_HEADER != p.len() {
            return None;
        }
        (IPV6_HEADER, &p[8..44], [p[0], p[1], p[2], p[3]], p[7])
    } else {
        if p.len() < 40 || p[0] != 0x45 || p[9] != PROTO_TCP {
            return None; // IPv4 without options only
        }
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        let fragmented = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
        if total != p.len() || fragmented {
            return None;
        }
        (20, &p[12..24], [p[1], 0, 0, 0], p[8])
    };
    let thl = usize::from(p[ihl + 12] >> 4) * 4;
    let flags = p[ihl + 13];
    if thl < 20 || p.len() < ihl + thl || flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0
    {
        return None;
    }
    // Merged segments reach the kernel as CHECKSUM_PARTIAL, which it does not
    // verify: check each one here, as the kernel would have.
    let tcp_sum = if v6 {
        tcp_v6_pseudo(p, p.len() - ihl)
    } else {
        if fold(sum16(&p[..ihl], 0)) != 0 {
            return None;
        }
        tcp_v4_pseudo(p, p.len() - ihl)
    };
    if fold(sum16(&p[ihl..], tcp_sum)) != 0 {
        return None;
    }
    let payload_len = p.len() - ihl - thl;
    (payload_len > 0).then(|| Segment {
        v6,
        ihl,
        thl,
        payload_len,
        seq: u32::from_be_bytes([p[ihl + 4], p[ihl + 5], p[ihl + 6], p[ihl + 7]]),
        flags,
        flow,
        class,
        ttl,
        ack: u32::from_be_bytes([p[ihl + 8], p[ihl + 9], p[ihl + 10], p[ihl + 11]]),
        options: &p[ihl + 20..ihl + thl],
    })
}

/// Writes `packets` as TUN frames into `out` (each starting with a
/// `virtio_net_hdr`), pushing each frame's range to `frames`.
pub fn coalesce(packets: &[&[u8]], out: &mut Vec<u8>, frames: &mut Vec<(usize, usize)>) {
    let mut i = 0;
    while i < packets.len() {
        let first = packets[i];
        let Some(head) = parse(first) else {
            push_plain(first, out, frames);
            i += 1;
            continue;
        };
        // Extend the run while the next segment follows on.
        let mut end = i + 1;
        let mut next_seq = head.seq.wrapping_add(head.payload_len as u32);
        let mut total = first.len();
        let mut closed = head.flags & TCP_PSH != 0;
        let mut last_len = head.payload_len;
        while end < packets.len() && !closed && end - i < MAX_RUN {
            let Some(seg) = parse(packets[end]) else {
                break;
            };
            let fits = seg.flow == head.flow
                && seg.seq == next_seq
                && seg.ack == head.ack
                && seg.thl == head.thl
                && seg.options == head.options
                && seg.class == head.class
                && seg.ttl == head.ttl
                && last_len == head.payload_len
                && seg.payload_len <= head.payload_len
                && total + seg.payload_len <= MAX_IP_LEN;
            if !fits {
                break;
            }
            next_seq = next_seq.wrapping_add(seg.payload_len as u32);
            total += seg.payload_len;
            last_len = seg.payload_len;
            closed = seg.flags & TCP_PSH != 0 || seg.payload_len < head.payload_len;
            end += 1;
        }
        if end == i + 1 {
            push_plain(first, out, frames);
        } else {
            push_run(&head, &packets[i..end], total, out, frames);
        }
        i = end;
    }
}

fn push_plain(packet: &[u8], out: &mut Vec<u8>, frames: &mut Vec<(usize, usize)>) {
    let start = out.len();
    out.resize(start + VNET_HDR_LEN, 0);
    out.extend_from_slice(packet);
    frames.push((start, out.len() - start));
}

fn push_run(
    head: &Segment,
    run: &[&[u8]],
    total: usize,
    out: &mut Vec<u8>,
    frames: &mut Vec<(usize, usize)>,
) {
    let hdr_len = head.ihl + head.thl;
    let start = out.len();
    let mut vnet = [0u8; VNET_HDR_LEN];
    vnet[0] = F_NEEDS_CSUM;
    vnet[1] = if head.v6 { GSO_TCPV6 } else { GSO_TCPV4 };
    vnet[2..4].copy_from_slice(&(hdr_len as u16).to_ne_bytes());
    vnet[4..6].copy_from_slice(&(head.payload_len as u16).to_ne_bytes());
    vnet[6..8].copy_from_slice(&(head.ihl as u16).to_ne_bytes());
    vnet[8..10].copy_from_slice(&16u16.to_ne_bytes());
    out.extend_from_slice(&vnet);
    out.extend_from_slice(&run[0][..hdr_len]);
    for p in run {
        out.extend_from_slice(&p[hdr_len..]);
    }
    let p = &mut out[start + VNET_HDR_LEN..];
    if head.v6 {
        p[4..6].copy_from_slice(&((total - IPV6_HEADER) as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    }
    let last = run[run.len() - 1];
    p[head.ihl + 13] |= last[head.ihl + 13] & TCP_PSH;
    p[head.ihl + 14..head.ihl + 16].copy_from_slice(&last[head.ihl + 14..head.ihl + 16]); // window
                                                                                          // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, not complemented.
    let tcp_len = total - head.ihl;
    let pseudo = if head.v6 {
        tcp_v6_pseudo(p, tcp_len)
    } else {
        ipv4_header(p, head.ihl);
        tcp_v4_pseudo(p, tcp_len)
    };
    let partial = !fold(pseudo);
    p[head.ihl + 16..head.ihl + 18].copy_from_slice(&partial.to_be_bytes());
    frames.push((start, out.len() - start));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::offload::segment;
    use crate::dataplane::offload::tests::tcp_packet;

    fn stream(sizes: &[usize], first_seq: u32, last_flags: u8) -> Vec<Vec<u8>> {
        let mut seq = first_seq;
        let mut v = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|b| (b + i) as u8).collect();
            let flags = if i + 1 == sizes.len() {
                last_flags
            } else {
                TCP_ACK
            };
            let mut p = tcp_packet(&payload, seq, flags);
            p[4..6].copy_from_slice(&(7 + i as u16).to_be_bytes());
            ipv4_header(&mut p, 20);
            crate::dataplane::offload::tests::retcp(&mut p);
            v.push(p);
            seq += n as u32;
        }
        v
    }

    #[test]
    fn a_run_coalesces_into_one_frame_that_segments_back_into_the_same_packets() {
        let packets = stream(&[1000, 1000, 1000, 400], 5000, TCP_ACK | TCP_PSH);
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        coalesce(&refs, &mut out, &mut frames);
        assert_eq!(frames.len(), 1, "one write for the whole run");
        let (at, len) = frames[0];
        let (mut again, mut lens) = (Vec::new(), Vec::new());
        segment(&out[at..at + len], &mut again, &mut lens).unwrap();
        assert_eq!(lens, vec![1040, 1040, 1040, 440]);
        let mut off = 0;
        for (i, l) in lens.iter().enumerate() {
            assert_eq!(&again[off..off + l], packets[i].as_slice(), "packet {i}");
            off += l;
        }
    }

    #[test]
    fn gaps_flags_and_other_flows_break_runs() {
        let mut packets = stream(&[1000, 1000], 1, TCP_ACK);
        let mut gap = stream(&[1000], 5000, TCP_ACK); // not the next sequence number
        packets.append(&mut gap);
        let mut fin = stream(&[1000], 6000, TCP_ACK | 0x01); // FIN is never merged
        packets.append(&mut fin);
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        coalesce(&refs, &mut out, &mut frames);
        assert_eq!(frames.len(), 3);
        // Plain frames carry the packet untouched behind an all-zero header.
        let (at, len) = frames[2];
        assert_eq!(&out[at..at + VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(&out[at + VNET_HDR_LEN..at + len], packets[3].as_slice());
    }

    #[test]
    fn a_segment_with_a_bad_checksum_is_not_merged() {
        let mut packets = stream(&[1000, 1000, 1000], 1, TCP_ACK);
        packets[1][100] ^= 0xff; // corrupt payload, checksum no longer matches
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        coalesce(&refs, &mut out, &mut frames);
        assert_eq!(
            frames.len(),
            3,
            "the bad one goes alone, for the kernel to drop"
        );
    }

    fn stream6(sizes: &[usize], first_seq: u32, last_flags: u8) -> Vec<Vec<u8>> {
        let mut seq = first_seq;
        let mut v = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|b| (b * 3 + i) as u8).collect();
            let flags = if i + 1 == sizes.len() {
                last_flags
            } else {
                TCP_ACK
            };
            v.push(crate::dataplane::offload::tests::tcp6_packet(
                &payload, seq, flags,
            ));
            seq += n as u32;
        }
        v
    }

    #[test]
    fn an_ipv6_run_coalesces_and_segments_back_into_the_same_packets() {
        let packets = stream6(&[1200, 1200, 1200, 100], 9, TCP_ACK | TCP_PSH);
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        coalesce(&refs, &mut out, &mut frames);
        assert_eq!(frames.len(), 1, "one write for the whole run");
        let (at, len) = frames[0];
        assert_eq!(out[at + 1], GSO_TCPV6);
        let (mut again, mut lens) = (Vec::new(), Vec::new());
        segment(&out[at..at + len], &mut again, &mut lens).unwrap();
        assert_eq!(lens, vec![1260, 1260, 1260, 160]);
        let mut off = 0;
        for (i, l) in lens.iter().enumerate() {
            assert_eq!(&again[off..off + l], packets[i].as_slice(), "packet {i}");
            off += l;
        }
    }

    #[test]
    fn ipv6_runs_break_on_flow_label_hop_limit_and_bad_checksums() {
        let mut packets = stream6(&[1000; 6], 1, TCP_ACK);
        packets[1][3] = 0x42; // another flow label
        packets[3][7] = 3; // another hop limit
        packets[5][100] ^= 0xff; // corrupt: goes alone for the kernel to drop
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        coalesce(&refs, &mut out, &mut frames);
        assert_eq!(frames.len(), 6, "{frames:?}");
        // IPv4 and IPv6 segments of the same ports never join one run.
        let mixed = [stream(&[1000], 1, TCP_ACK), stream6(&[1000], 1001, TCP_ACK)].concat();
        let refs: Vec<&[u8]> = mixed.iter().map(Vec::as_slice).collect();
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        coalesce(&refs, &mut out, &mut frames);
        assert_eq!(frames.len(), 2);
    }

    #[test]
    fn non_tcp_passes_alone() {
        let ping = crate::dataplane::icmp::echo_request(
            std::net::Ipv4Addr::new(100, 64, 0, 1),
            std::net::Ipv4Addr::new(100, 64, 0, 2),
            1,
            1,
            b"x",
        );
        let (mut out, mut frames) = (Vec::new(), Vec::new());
        coalesce(&[&ping, &ping], &mut out, &mut frames);
        assert_eq!(frames.len(), 2);
    }
}
