//! Just enough of the pcap format (what `tcpdump -w` writes) to look at the IPv4
//! packets of an Ethernet capture.

use anyhow::{bail, ensure};

/// One captured Ethernet frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub data: Vec<u8>,
}

/// IP protocol numbers we look for.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_UDP: u8 = 17;

/// Parses a classic pcap file (microsecond or nanosecond, either byte order) with
/// the Ethernet link type.
pub fn parse(bytes: &[u8]) -> anyhow::Result<Vec<Frame>> {
    ensure!(
        bytes.len() >= 24,
        "pcap file too short ({} bytes)",
        bytes.len()
    );
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file (magic {magic:02x?}); pcapng is not supported"),
    };
    let u32_at = |at: usize| -> u32 {
        let b = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let link_type = u32_at(20);
    ensure!(
        link_type == 1,
        "capture link type {link_type} is not Ethernet"
    );
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32_at(at + 8) as usize;
        let start = at + 16;
        // tcpdump stopped by a signal can leave a truncated last record.
        let Some(data) = bytes.get(start..start + caplen) else {
            break;
        };
        frames.push(Frame {
            data: data.to_vec(),
        });
        at = start + caplen;
    }
    Ok(frames)
}

impl Frame {
    /// `(protocol, IP payload)` when the frame is IPv4 (optionally 802.1Q-tagged).
    pub fn ipv4(&self) -> Option<(u8, &[u8])> {
        let d = &self.data;
        let mut at = 12;
        let mut ethertype = u16::from_be_bytes([*d.get(at)?, *d.get(at + 1)?]);
        if ethertype == 0x8100 {
            at += 4;
            ethertype = u16::from_be_bytes([*d.get(at)?, *d.get(at + 1)?]);
        }
        if ethertype != 0x0800 {
            return None;
        }
        let ip = d.get(at + 2..)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
        let proto = *ip.get(9)?;
        let end = total.min(ip.len());
        Some((proto, ip.get(ihl..end)?))
    }

    /// The payload when the frame is an IPv4 UDP datagram.
    pub fn udp_payload(&self) -> Option<&[u8]> {
        match self.ipv4()? {
            (PROTO_UDP, udp) => udp.get(8..),
            _ => None,
        }
    }

    /// Whether the frame is ICMP and its bytes contain `pattern`.
    pub fn icmp_contains(&self, pattern: &[u8]) -> bool {
        matches!(self.ipv4(), Some((PROTO_ICMP, icmp)) if contains(icmp, pattern))
    }
}

/// Whether `pattern` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], pattern: &[u8]) -> bool {
    !pattern.is_empty() && haystack.windows(pattern.len()).any(|w| w == pattern)
}

/// WireGuard's data messages start with type 4 and three reserved zero bytes.
pub fn is_wireguard_data(udp_payload: &[u8]) -> bool {
    udp_payload.starts_with(&[4, 0, 0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian microsecond pcap with one Ethernet/IPv4/UDP frame.
    fn sample(payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_UDP, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let udp_len = 8 + payload.len();
        let total = (20 + udp_len) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0x30, 0x39, 0x30, 0x3a]);
        ip.extend_from_slice(&(udp_len as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(payload);
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);

        let mut file = Vec::new();
        file.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        file.extend_from_slice(&2u16.to_le_bytes());
        file.extend_from_slice(&4u16.to_le_bytes());
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&65535u32.to_le_bytes());
        file.extend_from_slice(&1u32.to_le_bytes());
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        file.extend_from_slice(&frame);
        // A truncated trailing record is ignored.
        file.extend_from_slice(&[1, 2, 3]);
        file
    }

    #[test]
    fn finds_udp_payloads_and_wireguard_data() {
        let frames = parse(&sample(&[4, 0, 0, 0, 9, 9])).expect("parses");
        assert_eq!(frames.len(), 1);
        let payload = frames[0].udp_payload().expect("udp");
        assert_eq!(payload, &[4, 0, 0, 0, 9, 9]);
        assert!(is_wireguard_data(payload));
        assert!(!frames[0].icmp_contains(&[9, 9]));
    }

    #[test]
    fn rejects_what_is_not_pcap() {
        assert!(parse(b"not a capture file at all!!").is_err());
        assert!(parse(b"short").is_err());
    }

    #[test]
    fn contains_finds_subslices() {
        assert!(contains(b"xxdeadbeefxx", b"deadbeef"));
        assert!(!contains(b"xxdeadbeexx", b"deadbeef"));
        assert!(!contains(b"abc", b""));
    }
}
