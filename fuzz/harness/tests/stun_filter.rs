//! The embedded TURN server's filter against what the `turn` crate behind it
//! reads: the crate decodes any datagram that is not ChannelData as STUN, so a
//! message type with the top two bits set is still a CreatePermission to it.

use std::net::Ipv4Addr;

use overlay_coord::peer_policy::PeerPolicy;
use overlay_coord::stun_filter::{inspect, Verdict};

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// `msg_type` with one XOR-PEER-ADDRESS for `ip` port 9.
fn message(msg_type: u16, ip: Ipv4Addr) -> Vec<u8> {
    let mut m = msg_type.to_be_bytes().to_vec();
    m.extend_from_slice(&12u16.to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    m.extend_from_slice(&[0x00, 0x12, 0x00, 0x08, 0x00, 0x01]);
    m.extend_from_slice(&(9 ^ 0x2112u16).to_be_bytes());
    for (i, b) in ip.octets().iter().enumerate() {
        m.push(b ^ MAGIC_COOKIE[i]);
    }
    m
}

#[test]
fn a_create_permission_with_the_top_type_bits_set_is_refused() {
    let policy = PeerPolicy::default();
    for top in [0x8000, 0xc000] {
        let request = message(top | 0x0008, Ipv4Addr::LOCALHOST);
        assert!(
            matches!(inspect(&request, &policy), Verdict::Refuse(_)),
            "type {:#06x} to loopback passed the filter",
            top | 0x0008
        );
        // The harness's own check: what the TURN server would read is denied.
        let mut input = vec![0u8];
        input.extend_from_slice(&request);
        overlay_fuzz_harness::stun_filter(&input);
    }
}

#[test]
fn channel_data_still_passes_untouched() {
    let policy = PeerPolicy::default();
    let mut channel_data = vec![0x40, 0x00, 0x00, 0x04];
    channel_data.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(inspect(&channel_data, &policy), Verdict::Pass);
    // A ChannelData frame whose payload happens to look like a TURN request.
    let mut framed = vec![0x40, 0x01];
    let inner = message(0x4008, Ipv4Addr::LOCALHOST);
    framed.extend_from_slice(&(inner.len() as u16 - 4).to_be_bytes());
    framed.extend_from_slice(&inner[4..]);
    assert_eq!(inspect(&framed, &policy), Verdict::Pass);
}
