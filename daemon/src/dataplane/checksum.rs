//! The Internet checksum (RFC 1071), in one place for every packet the daemon
//! builds or checks: ICMP replies (`icmp`), segments cut from TUN super-frames
//! (`offload`) and TCP runs merged for the TUN (`tun_coalesce`).

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;

/// Adds `data` as big-endian 16-bit words to `acc` (an odd last byte is padded).
pub fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// Folds a running sum into the one's-complement checksum.
pub fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The checksum of `data` alone (an IP header, an ICMP message).
pub fn internet(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

/// The TCP pseudo-header's sum for an IPv4 `packet` whose header is `ihl` long
/// and whose TCP segment is `tcp_len` long.
pub fn tcp_v4_pseudo(packet: &[u8], tcp_len: usize) -> u32 {
    sum16(&packet[12..20], u32::from(PROTO_TCP) + tcp_len as u32)
}

/// Length of the fixed IPv6 header.
pub const IPV6_HEADER: usize = 40;

/// The pseudo-header's sum for an upper-layer message of protocol `next`,
/// `len` bytes long, in an IPv6 `packet`: source, destination, the length
/// and the next header (RFC 8200 section 8.1).
pub fn v6_pseudo(packet: &[u8], next: u8, len: usize) -> u32 {
    let len = len as u32;
    sum16(
        &packet[8..IPV6_HEADER],
        u32::from(next) + (len >> 16) + (len & 0xffff),
    )
}

/// [`v6_pseudo`] for a TCP segment of `tcp_len` bytes.
pub fn tcp_v6_pseudo(packet: &[u8], tcp_len: usize) -> u32 {
    v6_pseudo(packet, PROTO_TCP, tcp_len)
}

/// Writes the TCP checksum of an IPv6 `packet` (no extension headers).
pub fn tcp_v6(packet: &mut [u8]) {
    let at = IPV6_HEADER + 16;
    packet[at] = 0;
    packet[at + 1] = 0;
    let tcp_len = packet.len() - IPV6_HEADER;
    let sum = fold(sum16(
        &packet[IPV6_HEADER..],
        tcp_v6_pseudo(packet, tcp_len),
    ));
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Writes the IPv4 header checksum of `packet` (header length `ihl`).
pub fn ipv4_header(packet: &mut [u8], ihl: usize) {
    packet[10] = 0;
    packet[11] = 0;
    let sum = internet(&packet[..ihl]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Writes the TCP checksum of an IPv4 `packet` (header length `ihl`).
pub fn tcp_v4(packet: &mut [u8], ihl: usize) {
    let tcp_len = packet.len() - ihl;
    packet[ihl + 16] = 0;
    packet[ihl + 17] = 0;
    let sum = fold(sum16(&packet[ihl..], tcp_v4_pseudo(packet, tcp_len)));
    packet[ihl + 16..ihl + 18].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_with_its_checksum_sums_to_zero() {
        let mut h = [
            0x45, 0, 0, 0x54, 0, 0, 0x40, 0, 64, 1, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2,
        ];
        ipv4_header(&mut h, 20);
        assert_eq!(internet(&h), 0);
        assert_eq!(internet(&[0xff]), !0xff00, "odd lengths pad with zero");
    }
}
