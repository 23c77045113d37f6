//! Sans-IO check of TURN requests that name a peer (CreatePermission,
//! ChannelBind, Send), so that a denied peer is refused with 403 Forbidden
//! before the turn crate grants a permission — what coturn does for
//! `denied-peer-ip`. A peer address that does not decode is refused with
//! 400 Bad Request: the turn crate would read a truncated IPv4 address as
//! one padded with zeros (`127.0` → 127.0.0.0) and grant it.
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
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_ERROR_CODE: u16 = 0x0009;
const METHOD_ALLOCATE: u16 = 0x003;
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
    /// A request naming a denied or malformed peer: answer with this error
    /// response.
    Refuse(Vec<u8>),
    /// An indication naming a denied or malformed peer: drop it silently.
    Drop,
}

/// Why a message naming a peer is stopped; the worse reason wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Problem {
    /// 403 Forbidden.
    Denied,
    /// 400 Bad Request.
    Malformed,
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

/// The USERNAME of `packet` if it is an Allocate request that carries one
/// (the second, authenticated, attempt of a client).
pub fn allocate_username(packet: &[u8]) -> Option<&str> {
    if packet.len() < HEADER_LEN || packet[0] & 0xc0 != 0 || packet[4..8] != MAGIC_COOKIE {
        return None;
    }
    let (method, class) = method_and_class(u16::from_be_bytes([packet[0], packet[1]]));
    if (method, class) != (METHOD_ALLOCATE, CLASS_REQUEST) {
        return None;
    }
    let declared = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let end = (HEADER_LEN + declared).min(packet.len());
    let mut at = HEADER_LEN;
    while at + 4 <= end {
        let typ = u16::from_be_bytes([packet[at], packet[at + 1]]);
        let len = usize::from(u16::from_be_bytes([packet[at + 2], packet[at + 3]]));
        let value = packet
            .get(at + 4..at + 4 + len)
            .filter(|_| at + 4 + len <= end)?;
        if typ == ATTR_USERNAME {
            return std::str::from_utf8(value).ok();
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// An error response with `code` to the Allocate request `packet` (which
/// [`allocate_username`] accepted).
pub fn allocate_error(packet: &[u8], code: u16, reason: &[u8]) -> Vec<u8> {
    let txid = packet.get(8..HEADER_LEN).unwrap_or(&[0; 12]);
    error_response(METHOD_ALLOCATE, txid, code, reason)
}

/// Looks at one datagram received on the TURN listener.
pub fn inspect(packet: &[u8], policy: &PeerPolicy) -> Verdict {
    if packet.len() < HEADER_LEN || packet[0] & 0xc0 != 0 || packet[4..8] != MAGIC_COOKIE {
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
    let mut problem = None;
    while at < end {
        // An attribute header or value running past the message is as
        // malformed as a bad address: the peer it names cannot be known.
        let Some(header) = packet.get(at..at + 4).filter(|_| at + 4 <= end) else {
            problem = problem.max(Some(Problem::Malformed));
            break;
        };
        let typ = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let Some(value) = packet
            .get(at + 4..at + 4 + len)
            .filter(|_| at + 4 + len <= end)
        else {
            problem = problem.max(Some(Problem::Malformed));
            break;
        };
        if typ == ATTR_XOR_PEER_ADDRESS {
            let found = match xor_peer_ip(value, txid) {
                Some(ip) if policy.allows(ip) => None,
                Some(_) => Some(Problem::Denied),
                None => Some(Problem::Malformed),
            };
            problem = problem.max(found);
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    match (problem, class) {
        (None, _) => Verdict::Pass,
        (Some(Problem::Denied), CLASS_REQUEST) => {
            Verdict::Refuse(error_response(method, txid, 403, b"Forbidden"))
        }
        (Some(Problem::Malformed), CLASS_REQUEST) => {
            Verdict::Refuse(error_response(method, txid, 400, b"Bad Request"))
        }
        (Some(_), _) => Verdict::Drop,
    }
}

/// An error response with ERROR-CODE `code` (RFC 5389 section 15.6).
fn error_response(method: u16, txid: &[u8], code: u16, reason: &[u8]) -> Vec<u8> {
    let value_len = 4 + reason.len();
    let padded = value_len.div_ceil(4) * 4;
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + padded);
    out.extend_from_slice(&error_type(method).to_be_bytes());
    out.extend_from_slice(&((4 + padded) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(txid);
    out.extend_from_slice(&ATTR_ERROR_CODE.to_be_bytes());
    out.extend_from_slice(&(value_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
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
        let public = Ipv4Addr::new(1, 1, 1, 1);
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

    /// `message` with the XOR-PEER-ADDRESS value cut to `len` bytes.
    fn with_peer_value_len(msg_type: u16, ip: Ipv4Addr, len: u16) -> Vec<u8> {
        let mut m = message(msg_type, ip, 9);
        m.truncate(24 + usize::from(len));
        m[22..24].copy_from_slice(&len.to_be_bytes());
        let padded = usize::from(len).div_ceil(4) * 4;
        m.resize(24 + padded, 0);
        m[2..4].copy_from_slice(&((4 + padded) as u16).to_be_bytes());
        m
    }

    fn error_code(resp: &[u8]) -> u16 {
        u16::from(resp[26]) * 100 + u16::from(resp[27])
    }

    #[test]
    fn truncated_peer_address_is_refused_with_400() {
        let p = PeerPolicy::default();
        // "127.0" with the rest missing: the turn crate would read 127.0.0.0.
        for len in [0u16, 1, 2, 4, 6, 7] {
            let m = with_peer_value_len(0x0008, Ipv4Addr::LOCALHOST, len);
            let Verdict::Refuse(resp) = inspect(&m, &p) else {
                panic!("length {len} must be refused");
            };
            assert_eq!(
                &resp[0..2],
                &[0x01, 0x18],
                "CreatePermission error response"
            );
            assert_eq!(error_code(&resp), 400, "length {len}");
            assert_eq!(&resp[8..20], &TXID);
        }
        // Same for a public address: the value, not the policy, is wrong.
        let m = with_peer_value_len(0x0009, Ipv4Addr::new(8, 8, 8, 8), 6);
        assert!(matches!(inspect(&m, &p), Verdict::Refuse(r) if error_code(&r) == 400));
        // A Send indication with a bad address is dropped.
        let m = with_peer_value_len(0x0016, Ipv4Addr::new(8, 8, 8, 8), 6);
        assert_eq!(inspect(&m, &p), Verdict::Drop);
    }

    #[test]
    fn unknown_family_and_ipv6_with_wrong_length_are_refused_with_400() {
        let p = PeerPolicy::default();
        let mut m = message(0x0008, Ipv4Addr::new(8, 8, 8, 8), 9);
        m[25] = 0x03;
        assert!(matches!(inspect(&m, &p), Verdict::Refuse(r) if error_code(&r) == 400));
        let mut m = message(0x0008, Ipv4Addr::new(8, 8, 8, 8), 9);
        m[25] = 0x02;
        assert!(matches!(inspect(&m, &p), Verdict::Refuse(r) if error_code(&r) == 400));
    }

    #[test]
    fn attribute_running_past_the_message_is_refused_without_panic() {
        let p = PeerPolicy::default();
        let mut m = message(0x0008, Ipv4Addr::LOCALHOST, 9);
        m.truncate(26);
        assert!(matches!(inspect(&m, &p), Verdict::Refuse(r) if error_code(&r) == 400));
        m[2..4].copy_from_slice(&500u16.to_be_bytes());
        assert!(matches!(inspect(&m, &p), Verdict::Refuse(r) if error_code(&r) == 400));
        // The declared length cuts the attribute even though bytes follow.
        let mut m = message(0x0008, Ipv4Addr::new(8, 8, 8, 8), 9);
        m[2..4].copy_from_slice(&8u16.to_be_bytes());
        assert!(matches!(inspect(&m, &p), Verdict::Refuse(r) if error_code(&r) == 400));
    }

    #[test]
    fn allocate_username_is_read_from_allocate_requests_only() {
        let mut m = 0x0003u16.to_be_bytes().to_vec();
        m.extend_from_slice(&16u16.to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&TXID);
        // REQUESTED-TRANSPORT, then USERNAME "9:42" (padded to 4).
        m.extend_from_slice(&[0x00, 0x19, 0, 4, 17, 0, 0, 0]);
        m.extend_from_slice(&[0x00, 0x06, 0, 4]);
        m.extend_from_slice(b"9:42");
        assert_eq!(allocate_username(&m), Some("9:42"));
        let resp = allocate_error(&m, 486, b"Allocation Quota Reached");
        assert_eq!(&resp[0..2], &[0x01, 0x13], "Allocate error response");
        assert_eq!(error_code(&resp), 486);
        assert_eq!(&resp[8..20], &TXID);
        // The first, unauthenticated attempt carries no USERNAME.
        let bare = [&m[..2], &4u16.to_be_bytes(), &m[4..28]].concat();
        assert_eq!(allocate_username(&bare), None);
        // Not an Allocate request.
        let mut refresh = m.clone();
        refresh[1] = 0x04;
        assert_eq!(allocate_username(&refresh), None);
        // A USERNAME running past the message.
        m.truncate(34);
        assert_eq!(allocate_username(&m), None);
    }

    #[test]
    fn mapped_ipv6_peer_address_is_judged_as_ipv4() {
        let p = PeerPolicy::default();
        let peer = |ip: std::net::Ipv6Addr| {
            let mut value = vec![0, 2, 0, 9];
            for (i, b) in ip.octets().iter().enumerate() {
                let key = if i < 4 { MAGIC_COOKIE[i] } else { TXID[i - 4] };
                value.push(b ^ key);
            }
            let mut m = 0x0008u16.to_be_bytes().to_vec();
            m.extend_from_slice(&24u16.to_be_bytes());
            m.extend_from_slice(&MAGIC_COOKIE);
            m.extend_from_slice(&TXID);
            m.extend_from_slice(&ATTR_XOR_PEER_ADDRESS.to_be_bytes());
            m.extend_from_slice(&20u16.to_be_bytes());
            m.extend_from_slice(&value);
            m
        };
        let loopback = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
        assert!(
            matches!(inspect(&peer(loopback), &p), Verdict::Refuse(r) if error_code(&r) == 403)
        );
        let public = Ipv4Addr::new(8, 8, 8, 8).to_ipv6_mapped();
        assert_eq!(inspect(&peer(public), &p), Verdict::Pass);
    }
}
