//! Sans-IO check of TURN requests that name a peer (CreatePermission,
//! ChannelBind, Send), so that a denied peer is refused with 403 Forbidden
//! before the turn crate grants a permission — what coturn does for
//! `denied-peer-ip`.
//!
//! ```text
//!  0                   1                   2                   3
//!  |0 0| STUN message type         |        message length         |
//!  |                  magic cookie 0x2112A442                      |
//!  |                  transaction id (96 bits)                     |
//!  | attribute type                |  attribute length             |  value, padded to 4
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::peer_policy::PeerPolicy;

const HEADER_LEN: usize = 20;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_ERROR_CODE: u16 = 0x0009;
const METHOD_SEND: u16 = 0x006;
const METHOD_CREATE_PERMISSION: u16 = 0x008;
const METHOD_CHANNEL_BIND: u16 = 0x009;
const CLASS_REQUEST: u16 = 0b00;
const CLASS_INDICATION: u16 = 0b01;
const CLASS_ERROR_BITS: u16 = 0x0110;

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a message naming a denied peer: hand it to the TURN server.
    Pass,
    /// A request naming a denied peer: answer with this error response.
    Refuse(Vec<u8>),
    /// An indication naming a denied peer: drop it silently.
    Drop,
}

fn method_and_class(t: u16) -> (u16, u16) {
    let method = (t & 0x000f) | ((t & 0x00e0) >> 1) | ((t & 0x3e00) >> 2);
    let class = ((t & 0x0100) >> 7) | ((t & 0x0010) >> 4);
    (method, class)
}

fn error_type(method: u16) -> u16 {
    (method & 0x000f) | ((method & 0x0070) << 1) | ((method & 0x0f80) << 2) | CLASS_ERROR_BITS
}

/// Decodes an XOR-PEER-ADDRESS value; `None` when malformed.
fn xor_peer_ip(value: &[u8], txid: &[u8]) -> Option<IpAddr> {
    match (value.get(1)?, value.len()) {
        (0x01, 8) => {
            let mut ip = [0u8; 4];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = value[4 + i] ^ MAGIC_COOKIE[i];
            }
            Some(IpAddr::V4(Ipv4Addr::from(ip)))
        }
        (0x02, 20) => {
            let mut ip = [0u8; 16];
            for (i, b) in ip.iter_mut().enumerate() {
                let key = if i < 4 { MAGIC_COOKIE[i] } else { txid[i - 4] };
                *b = value[4 + i] ^ key;
            }
            Some(IpAddr::V6(Ipv6Addr::from(ip)))
        }
        _ => None,
    }
}

/// Looks at one datagram received on the TURN listener.
pub fn inspect(packet: &[u8], policy: &PeerPolicy) -> Verdict {
    // The turn crate reads anything but ChannelData (top bits 01) as STUN.
    if packet.len() < HEADER_LEN || packet[0] & 0xc0 == 0x40 || packet[4..8] != MAGIC_COOKIE {
        return Verdict::Pass;
    }
    let (method, class) = method_and_class(u16::from_be_bytes([packet[0], packet[1]]));
    let names_peer = matches!(
        (method, class),
        (
            METHOD_CREATE_PERMISSION | METHOD_CHANNEL_BIND,
            CLASS_REQUEST
        ) | (METHOD_SEND, CLASS_INDICATION)
    );
    if !names_peer {
        return Verdict::Pass;
    }
    let txid = &packet[8..HEADER_LEN];
    let declared = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let end = (HEADER_LEN + declared).min(packet.len());
    let mut at = HEADER_LEN;
    let mut denied = false;
    while at + 4 <= end {
        let typ = u16::from_be_bytes([packet[at], packet[at + 1]]);
        let len = usize::from(u16::from_be_bytes([packet[at + 2], packet[at + 3]]));
        let Some(value) = packet.get(at + 4..at + 4 + len) else {
            break;
        };
        if typ == ATTR_XOR_PEER_ADDRESS {
            match xor_peer_ip(value, txid) {
                Some(ip) if policy.allows(ip) => {}
                // A malformed peer address is left to the TURN server to reject.
                None => {}
                Some(_) => denied = true,
            }
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    match (denied, class) {
        (false, _) => Verdict::Pass,
        (true, CLASS_REQUEST) => Verdict::Refuse(forbidden(method, txid)),
        (true, _) => Verdict::Drop,
    }
}

/// An error response with ERROR-CODE 403 Forbidden.
fn forbidden(method: u16, txid: &[u8]) -> Vec<u8> {
    let reason = b"Forbidden";
    let value_len = 4 + reason.len();
    let padded = value_len.div_ceil(4) * 4;
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + padded);
    out.extend_from_slice(&error_type(method).to_be_bytes());
    out.extend_from_slice(&((4 + padded) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(txid);
    out.extend_from_slice(&ATTR_ERROR_CODE.to_be_bytes());
    out.extend_from_slice(&(value_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 4, 3]);
    out.extend_from_slice(reason);
    out.resize(HEADER_LEN + 4 + padded, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXID: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    /// A message of `msg_type` with one XOR-PEER-ADDRESS for `ip:port`.
    fn message(msg_type: u16, ip: Ipv4Addr, port: u16) -> Vec<u8> {
        let mut value = vec![0, 1];
        value.extend_from_slice(&(port ^ 0x2112).to_be_bytes());
        for (i, b) in ip.octets().iter().enumerate() {
            value.push(b ^ MAGIC_COOKIE[i]);
        }
        let mut m = msg_type.to_be_bytes().to_vec();
        m.extend_from_slice(&12u16.to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&TXID);
        m.extend_from_slice(&ATTR_XOR_PEER_ADDRESS.to_be_bytes());
        m.extend_from_slice(&8u16.to_be_bytes());
        m.extend_from_slice(&value);
        m
    }

    #[test]
    fn create_permission_to_loopback_is_refused_with_403() {
        let p = PeerPolicy::default();
        let Verdict::Refuse(resp) = inspect(&message(0x0008, Ipv4Addr::LOCALHOST, 9), &p) else {
            panic!("must be refused");
        };
        assert_eq!(
            &resp[0..2],
            &[0x01, 0x18],
            "CreatePermission error response"
        );
        assert_eq!(&resp[8..20], &TXID);
        assert_eq!(&resp[24..28], &[0, 0, 4, 3]);
        assert_eq!(
            usize::from(u16::from_be_bytes([resp[2], resp[3]])),
            resp.len() - 20
        );
    }

    #[test]
    fn channel_bind_and_send_to_denied_peers_are_stopped() {
        let p = PeerPolicy::default();
        let ten = Ipv4Addr::new(10, 0, 0, 1);
        assert!(
            matches!(inspect(&message(0x0009, ten, 9), &p), Verdict::Refuse(r) if r[0..2] == [0x01, 0x19])
        );
        assert_eq!(inspect(&message(0x0016, ten, 9), &p), Verdict::Drop);
    }

    #[test]
    fn allowed_peers_and_other_messages_pass() {
        let p = PeerPolicy::default();
        let public = Ipv4Addr::new(198, 51, 100, 1);
        assert_eq!(inspect(&message(0x0008, public, 9), &p), Verdict::Pass);
        // A Binding request mentioning loopback is none of our business.
        assert_eq!(
            inspect(&message(0x0001, Ipv4Addr::LOCALHOST, 9), &p),
            Verdict::Pass
        );
        // ChannelData and garbage pass through untouched.
        assert_eq!(inspect(&[0x40, 0, 0, 4, 1, 2, 3, 4], &p), Verdict::Pass);
        assert_eq!(inspect(&[0u8; 3], &p), Verdict::Pass);
    }

    #[test]
    fn truncated_attributes_do_not_panic() {
        let p = PeerPolicy::default();
        let mut m = message(0x0008, Ipv4Addr::LOCALHOST, 9);
        m.truncate(26);
        assert_eq!(inspect(&m, &p), Verdict::Pass);
        m[2..4].copy_from_slice(&500u16.to_be_bytes());
        assert_eq!(inspect(&m, &p), Verdict::Pass);
    }
}
