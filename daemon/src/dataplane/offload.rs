//! TCP segmentation offload on the TUN (`IFF_VNET_HDR` + `TUNSETOFFLOAD`), the
//! lever wireguard-go gained for Tailscale: the kernel hands us TCP segments of up
//! to 64 KiB with one `virtio_net_hdr` in front, instead of one read per
//! MTU-sized packet, and leaves checksums to us. Here such a read is cut into
//! MTU-sized IPv4 or IPv6 packets with complete checksums, ready to encrypt.
//!
//! ```text
//!  read:  [virtio_net_hdr 10 B][IPv4][TCP][payload ........................ up to 64 KiB]
//!  out:   [IPv4][TCP][payload ≤ gso_size]  [IPv4][TCP][payload]  ...  (seq, id, lengths, sums fixed)
//! ```
//!
//! Every write to the TUN then carries a `virtio_net_hdr` too (all zero: a plain
//! packet with a valid checksum).

use std::os::fd::RawFd;

use super::checksum::{fold, ipv4_header, sum16, tcp_v4, tcp_v6, IPV6_HEADER, PROTO_TCP};

/// Length of the `virtio_net_hdr` before every packet read from or written to the TUN.
pub const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffloadError {
    #[error("frame shorter than its headers")]
    Truncated,
    #[error("offload type {0} is not one we enabled")]
    Unsupported(u8),
    #[error("IPv6 super-segment with extension headers")]
    ExtensionHeaders,
}

/// What the kernel agreed to hand us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offloads {
    /// TCP super-segments over IPv4 and IPv6, and partial checksums.
    Tso4And6,
    /// Over IPv4 only (a kernel that refuses TSO6).
    Tso4,
}

/// Tells the kernel it may give us TCP super-segments (IPv4 and IPv6) and
/// partial checksums; IPv4 alone when it refuses IPv6.
pub fn enable(fd: RawFd) -> std::io::Result<Offloads> {
    let set = |flags: libc::c_uint| {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; `fd` is our open TUN.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let v4 = libc::TUN_F_CSUM | libc::TUN_F_TSO4;
    match set(v4 | libc::TUN_F_TSO6) {
        Ok(()) => Ok(Offloads::Tso4And6),
        Err(_) => set(v4).map(|()| Offloads::Tso4),
    }
}

/// Cuts one TUN read (`virtio_net_hdr` + packet) into IP packets appended to
/// `out`, their lengths pushed to `lens`.
pub fn segment(frame: &[u8], out: &mut Vec<u8>, lens: &mut Vec<usize>) -> Result<(), OffloadError> {
    if frame.len() < VNET_HDR_LEN {
        return Err(OffloadError::Truncated);
    }
    let (hdr, packet) = frame.split_at(VNET_HDR_LEN);
    let flags = hdr[0];
    let gso_type = hdr[1] & !GSO_ECN;
    let gso_size = usize::from(u16::from_ne_bytes([hdr[4], hdr[5]]));
    let csum_start = usize::from(u16::from_ne_bytes([hdr[6], hdr[7]]));
    let csum_offset = usize::from(u16::from_ne_bytes([hdr[8], hdr[9]]));
    match gso_type {
        GSO_NONE => {
            let start = out.len();
            out.extend_from_slice(packet);
            if flags & F_NEEDS_CSUM != 0 {
                // The field holds the pseudo-header sum; sum from csum_start on.
                let p = &mut out[start..];
                let field = csum_start + csum_offset;
                if field + 2 > p.len() {
                    out.truncate(start);
                    return Err(OffloadError::Truncated);
                }
                let sum = fold(sum16(&p[csum_start..], 0));
                p[field..field + 2].copy_from_slice(&sum.to_be_bytes());
            }
            lens.push(packet.len());
            Ok(())
        }
        GSO_TCPV4 => segment_tcp4(packet, gso_size, out, lens),
        GSO_TCPV6 => segment_tcp6(packet, gso_size, out, lens),
        other => Err(OffloadError::Unsupported(other)),
    }
}

fn segment_tcp4(
    packet: &[u8],
    mss: usize,
    out: &mut Vec<u8>,
    lens: &mut Vec<usize>,
) -> Result<(), OffloadError> {
    let ihl = usize::from(packet.first().ok_or(OffloadError::Truncated)? & 0x0f) * 4;
    if ihl < 20 {
        return Err(OffloadError::Truncated);
    }
    let id = u16::from_be_bytes([
        *packet.get(4).ok_or(OffloadError::Truncated)?,
        *packet.get(5).ok_or(OffloadError::Truncated)?,
    ]);
    segment_tcp(packet, ihl, mss, out, lens, |p, i, hdr_len| {
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        ipv4_header(p, hdr_len);
        tcp_v4(p, hdr_len);
    })
}

/// As [`segment_tcp4`] for IPv6: no header checksum or identification, the
/// payload length instead of the total length. The kernel's TSO6 frames from a
/// TUN carry TCP right after the fixed header; others are refused.
fn segment_tcp6(
    packet: &[u8],
    mss: usize,
    out: &mut Vec<u8>,
    lens: &mut Vec<usize>,
) -> Result<(), OffloadError> {
    if packet.len() < IPV6_HEADER + 20 || packet[0] >> 4 != 6 {
        return Err(OffloadError::Truncated);
    }
    if packet[6] != PROTO_TCP {
        return Err(OffloadError::ExtensionHeaders);
    }
    segment_tcp(packet, IPV6_HEADER, mss, out, lens, |p, _, _| {
        let payload_len = (p.len() - IPV6_HEADER) as u16;
        p[4..6].copy_from_slice(&payload_len.to_be_bytes());
        tcp_v6(p);
    })
}

/// Cuts the TCP payload behind an IP header of `ihl` bytes into `mss`-sized
/// segments, each with the headers copied, its sequence number, and FIN/PSH
/// only on the last and CWR only on the first; `finish(segment, index, ihl)`
/// fixes the family's lengths and checksums.
fn segment_tcp(
    packet: &[u8],
    ihl: usize,
    mss: usize,
    out: &mut Vec<u8>,
    lens: &mut Vec<usize>,
    finish: impl Fn(&mut [u8], usize, usize),
) -> Result<(), OffloadError> {
    let thl = usize::from(packet.get(ihl + 12).ok_or(OffloadError::Truncated)? >> 4) * 4;
    let hdr_len = ihl + thl;
    if thl < 20 || packet.len() < hdr_len || mss == 0 {
        return Err(OffloadError::Truncated);
    }
    let (headers, payload) = packet.split_at(hdr_len);
    let seq = u32::from_be_bytes([
        headers[ihl + 4],
        headers[ihl + 5],
        headers[ihl + 6],
        headers[ihl + 7],
    ]);
    let count = payload.len().div_ceil(mss);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let start = out.len();
        out.extend_from_slice(headers);
        out.extend_from_slice(chunk);
        let p = &mut out[start..];
        let seq_i = seq.wrapping_add((i * mss) as u32);
        p[ihl + 4..ihl + 8].copy_from_slice(&seq_i.to_be_bytes());
        if i + 1 < count {
            p[ihl + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            p[ihl + 13] &= !TCP_CWR;
        }
        finish(p, i, ihl);
        lens.push(p.len());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dataplane::checksum::PROTO_TCP;

    /// An IPv4/TCP packet with the given payload and valid checksums.
    pub(crate) fn tcp_packet(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&7u16.to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&65535u16.to_be_bytes());
        p.extend_from_slice(payload);
        ipv4_header(&mut p, 20);
        tcp_v4(&mut p, 20);
        p
    }

    /// An IPv6/TCP packet (fd7a::1 → fd7a::2) with the given payload and a
    /// valid checksum.
    pub(crate) fn tcp6_packet(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        p[6] = PROTO_TCP;
        p[7] = 64;
        p[8..10].copy_from_slice(&[0xfd, 0x7a]);
        p[23] = 1;
        p[24..26].copy_from_slice(&[0xfd, 0x7a]);
        p[39] = 2;
        p[40..42].copy_from_slice(&40000u16.to_be_bytes());
        p[42..44].copy_from_slice(&5201u16.to_be_bytes());
        p[44..48].copy_from_slice(&seq.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = flags;
        p[54..56].copy_from_slice(&65535u16.to_be_bytes());
        p.extend_from_slice(payload);
        tcp_v6(&mut p);
        p
    }

    /// Recomputes a test packet's TCP checksum after its header was edited.
    pub(crate) fn retcp(p: &mut [u8]) {
        tcp_v4(p, 20);
    }

    fn verifies6(p: &[u8]) -> bool {
        let len = p.len() - 40;
        let acc = sum16(&p[8..40], u32::from(PROTO_TCP) + len as u32);
        fold(sum16(&p[40..], acc)) == 0
    }

    fn verifies(p: &[u8]) -> bool {
        let ip_ok = fold(sum16(&p[..20], 0)) == 0;
        let mut acc = sum16(&p[12..20], 0) + u32::from(PROTO_TCP) + (p.len() - 20) as u32;
        acc = sum16(&p[20..], acc);
        ip_ok && fold(acc) == 0
    }

    fn vnet(flags: u8, gso_type: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> Vec<u8> {
        let mut h = vec![flags, gso_type];
        h.extend_from_slice(&40u16.to_ne_bytes());
        h.extend_from_slice(&gso_size.to_ne_bytes());
        h.extend_from_slice(&csum_start.to_ne_bytes());
        h.extend_from_slice(&csum_offset.to_ne_bytes());
        h
    }

    #[test]
    fn a_tso_frame_becomes_mss_sized_segments_equal_to_what_tcp_would_send() {
        let payload: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let big = tcp_packet(&payload, 1000, TCP_PSH | TCP_FIN | 0x10);
        let mut frame = vnet(F_NEEDS_CSUM, GSO_TCPV4, 1000, 20, 16);
        frame.extend_from_slice(&big);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        segment(&frame, &mut out, &mut lens).unwrap();
        assert_eq!(lens, vec![1040, 1040, 540]);
        let mut at = 0;
        for (i, len) in lens.iter().enumerate() {
            let seg = &out[at..at + len];
            at += len;
            let chunk = &payload[i * 1000..(i * 1000 + 1000).min(payload.len())];
            let last = i == 2;
            let flags = if last { TCP_PSH | TCP_FIN | 0x10 } else { 0x10 };
            let mut want = tcp_packet(chunk, 1000 + (i as u32) * 1000, flags);
            want[4..6].copy_from_slice(&(7 + i as u16).to_be_bytes());
            ipv4_header(&mut want, 20);
            assert!(verifies(seg), "segment {i} checksums");
            assert_eq!(seg, want.as_slice(), "segment {i}");
        }
    }

    #[test]
    fn a_tso6_frame_becomes_mss_sized_ipv6_segments() {
        let payload: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
        let big = tcp6_packet(&payload, 77, TCP_PSH | TCP_FIN | TCP_CWR | 0x10);
        let mut frame = vnet(F_NEEDS_CSUM, GSO_TCPV6, 1200, 40, 16);
        frame.extend_from_slice(&big);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        segment(&frame, &mut out, &mut lens).unwrap();
        assert_eq!(lens, vec![1260, 1260, 160]);
        let mut at = 0;
        for (i, len) in lens.iter().enumerate() {
            let seg = &out[at..at + len];
            at += len;
            let chunk = &payload[i * 1200..(i * 1200 + 1200).min(payload.len())];
            let flags = match i {
                0 => TCP_CWR | 0x10,
                1 => 0x10,
                _ => TCP_PSH | TCP_FIN | 0x10,
            };
            let want = tcp6_packet(chunk, 77 + (i as u32) * 1200, flags);
            assert!(verifies6(seg), "segment {i} checksum");
            assert_eq!(seg, want.as_slice(), "segment {i}");
        }
    }

    #[test]
    fn ipv6_super_segments_with_extension_headers_are_refused() {
        let mut p = tcp6_packet(&[1; 3000], 1, 0x10);
        p[6] = 0; // a hop-by-hop options header first
        let mut frame = vnet(F_NEEDS_CSUM, GSO_TCPV6, 1000, 40, 16);
        frame.extend_from_slice(&p);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        assert_eq!(
            segment(&frame, &mut out, &mut lens),
            Err(OffloadError::ExtensionHeaders)
        );
        let mut short = vnet(0, GSO_TCPV6, 1000, 40, 16);
        short.extend_from_slice(&p[..50]);
        assert_eq!(
            segment(&short, &mut out, &mut lens),
            Err(OffloadError::Truncated)
        );
        assert!(out.is_empty() && lens.is_empty());
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let mut p = tcp_packet(b"hello", 1, 0x18);
        // What the kernel leaves: the pseudo-header sum, not yet the full one.
        let pseudo = !fold(sum16(&p[12..20], 0) + u32::from(PROTO_TCP) + 25);
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        assert!(!verifies(&p));
        let mut frame = vnet(F_NEEDS_CSUM, GSO_NONE, 0, 20, 16);
        frame.extend_from_slice(&p);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        segment(&frame, &mut out, &mut lens).unwrap();
        assert!(verifies(&out));
    }

    #[test]
    fn plain_packets_pass_and_garbage_is_refused() {
        let p = tcp_packet(b"x", 1, 0x10);
        let mut frame = vnet(0, GSO_NONE, 0, 0, 0);
        frame.extend_from_slice(&p);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        segment(&frame, &mut out, &mut lens).unwrap();
        assert_eq!(out, p);
        assert_eq!(
            segment(&[0; 4], &mut out, &mut lens),
            Err(OffloadError::Truncated)
        );
        let mut frame = vnet(0, GSO_TCPV4, 100, 0, 0);
        frame.extend_from_slice(&[0x45, 0, 0]);
        assert_eq!(
            segment(&frame, &mut out, &mut lens),
            Err(OffloadError::Truncated)
        );
        assert_eq!(
            segment(&vnet(0, 3, 100, 0, 0), &mut out, &mut lens),
            Err(OffloadError::Unsupported(3))
        );
    }
}
