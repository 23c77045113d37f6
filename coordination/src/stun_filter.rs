//! Sans-IO check of TURN requests that name a peer (CreatePermission,
//! ChannelBind, Send), so that a denied peer is refused with 403 Forbidden
//! before the turn crate grants a permission — what coturn does for
//! `denied-peer-ip`. A peer address that does not decode is refused with
//! 400 Bad Request: the turn crate would read a truncated IPv4 address as
//! one padded with zeros (`127.0` → 127.0.0.0) and grant it, so besides
//! decoding with its [`PeerAddress`] we insist the value has the exact length
//! of its family.
//!
//! ```text
//!  0                   1                   2                   3
//!  |0 0| STUN message type         |        message length         |
//!  |                  magic cookie 0x2112A442                      |
//!  |                  transaction id (96 bits)                     |
//!  | attribute type                |  attribute length             |  value, padded to 4
//! ```

use std::net::IpAddr;

use stun::agent::TransactionId;
use stun::attributes::{ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS};
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::message::{
    Getter, Message, MessageType, Method, CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST,
    MAGIC_COOKIE, MESSAGE_HEADER_SIZE, METHOD_ALLOCATE, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_SEND,
};
use stun::textattrs::Username;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::reqfamily::{
    RequestedAddressFamily, REQUESTED_FAMILY_IPV4, REQUESTED_FAMILY_IPV6,
};

use crate::peer_policy::PeerPolicy;

/// Length of an XOR-PEER-ADDRESS value: family, port and the address.
const PEER_ADDRESS_V4_LEN: usize = 4 + 4;
const PEER_ADDRESS_V6_LEN: usize = 4 + 16;

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

/// The type of a STUN message, read from its header alone so that ChannelData
/// and the messages we do not judge cost no decoding.
fn message_type(packet: &[u8]) -> Option<MessageType> {
    let header = packet.get(..MESSAGE_HEADER_SIZE)?;
    // The turn crate reads every datagram that is not ChannelData (top bits
    // 01) as STUN, whatever its top two bits say: only ChannelData passes
    // unread, and the type is read as the crate reads it.
    if header[0] & 0xc0 == 0x40 || header[4..8] != MAGIC_COOKIE.to_be_bytes() {
        return None;
    }
    let mut typ = MessageType::default();
    typ.read_value(u16::from_be_bytes([header[0] & 0x3f, header[1]]));
    Some(typ)
}

fn decode(packet: &[u8]) -> Option<Message> {
    let mut message = Message::new();
    message.unmarshal_binary(packet).ok()?;
    Some(message)
}

/// The peer one XOR-PEER-ADDRESS value names; `None` when malformed.
fn peer_ip(value: &[u8], transaction_id: TransactionId) -> Option<IpAddr> {
    // The value is decoded alone, since `Message::get` sees only the first.
    let mut one = Message::new();
    one.transaction_id = transaction_id;
    one.add(ATTR_XOR_PEER_ADDRESS, value);
    let mut peer = PeerAddress::default();
    peer.get_from(&one).ok()?;
    let exact = match peer.ip {
        IpAddr::V4(_) => PEER_ADDRESS_V4_LEN,
        IpAddr::V6(_) => PEER_ADDRESS_V6_LEN,
    };
    (value.len() == exact).then_some(peer.ip)
}

/// An IP address family, as REQUESTED-ADDRESS-FAMILY names it (RFC 6156).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `ip`, an IPv4-mapped IPv6 address being IPv4.
    pub fn of(ip: IpAddr) -> Family {
        if ip.to_canonical().is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// What the server takes from an authenticated Allocate request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocateRequest {
    pub username: String,
    /// REQUESTED-ADDRESS-FAMILY, when the request names a valid one.
    pub family: Option<Family>,
}

/// `packet` if it is an Allocate request that carries a USERNAME (the
/// second, authenticated, attempt of a client).
pub fn allocate_request(packet: &[u8]) -> Option<AllocateRequest> {
    if message_type(packet)? != MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST) {
        return None;
    }
    let message = decode(packet)?;
    let username = Username::get_from_as(&message, ATTR_USERNAME).ok()?.text;
    let mut requested = RequestedAddressFamily::default();
    let family = match requested.get_from(&message) {
        Ok(()) if requested == REQUESTED_FAMILY_IPV4 => Some(Family::V4),
        Ok(()) if requested == REQUESTED_FAMILY_IPV6 => Some(Family::V6),
        // Absent, or a value the turn crate answers 440 for itself.
        _ => None,
    };
    Some(AllocateRequest { username, family })
}

/// An error response with `code` to the Allocate request `packet` (which
/// [`allocate_request`] accepted).
pub fn allocate_error(packet: &[u8], code: u16, reason: &[u8]) -> Vec<u8> {
    error_response(METHOD_ALLOCATE, transaction_id(packet), code, reason)
}

fn transaction_id(packet: &[u8]) -> TransactionId {
    let mut id = TransactionId::default();
    if let Some(bytes) = packet.get(8..MESSAGE_HEADER_SIZE) {
        id.0.copy_from_slice(bytes);
    }
    id
}

/// Looks at one datagram received on the TURN listener.
pub fn inspect(packet: &[u8], policy: &PeerPolicy) -> Verdict {
    let Some(typ) = message_type(packet) else {
        return Verdict::Pass;
    };
    let names_peer = [
        MessageType::new(METHOD_CREATE_PERMISSION, CLASS_REQUEST),
        MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST),
        MessageType::new(METHOD_SEND, CLASS_INDICATION),
    ]
    .contains(&typ);
    if !names_peer {
        return Verdict::Pass;
    }
    // A message whose attributes run past it is as malformed as a bad
    // address: the peer it names cannot be known.
    let problem = match decode(packet) {
        None => Some(Problem::Malformed),
        Some(message) => message
            .attributes
            .0
            .iter()
            .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
            .filter_map(|a| match peer_ip(&a.value, message.transaction_id) {
                Some(ip) if policy.allows(ip) => None,
                Some(_) => Some(Problem::Denied),
                None => Some(Problem::Malformed),
            })
            .max(),
    };
    let txid = transaction_id(packet);
    match (problem, typ.class) {
        (None, _) => Verdict::Pass,
        (Some(Problem::Denied), CLASS_REQUEST) => {
            Verdict::Refuse(error_response(typ.method, txid, 403, b"Forbidden"))
        }
        (Some(Problem::Malformed), CLASS_REQUEST) => {
            Verdict::Refuse(error_response(typ.method, txid, 400, b"Bad Request"))
        }
        (Some(_), _) => Verdict::Drop,
    }
}

/// An error response with ERROR-CODE `code` (RFC 5389 section 15.6).
fn error_response(method: Method, txid: TransactionId, code: u16, reason: &[u8]) -> Vec<u8> {
    let mut m = Message::new();
    let built = m.build(&[
        Box::new(MessageType::new(method, CLASS_ERROR_RESPONSE)),
        Box::new(txid),
        Box::new(ErrorCodeAttribute {
            code: ErrorCode(code),
            reason: reason.to_vec(),
        }),
    ]);
    // Only a reason longer than ERROR-CODE allows fails, and ours are constants.
    debug_assert!(built.is_ok(), "error response: {built:?}");
    m.raw
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const MAGIC_COOKIE: [u8; 4] = stun::message::MAGIC_COOKIE.to_be_bytes();
    const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;

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
    fn a_denied_peer_after_an_allowed_one_is_still_refused() {
        let p = PeerPolicy::default();
        // Two XOR-PEER-ADDRESS attributes: 8.8.8.8, then loopback.
        let mut m = message(0x0008, Ipv4Addr::new(8, 8, 8, 8), 9);
        let second = message(0x0008, Ipv4Addr::LOCALHOST, 9);
        m.extend_from_slice(&second[20..]);
        m[2..4].copy_from_slice(&24u16.to_be_bytes());
        assert!(matches!(inspect(&m, &p), Verdict::Refuse(r) if error_code(&r) == 403));
    }

    #[test]
    fn allocate_requests_give_their_username_and_requested_family() {
        let mut m = 0x0003u16.to_be_bytes().to_vec();
        m.extend_from_slice(&16u16.to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&TXID);
        // REQUESTED-TRANSPORT, then USERNAME "9:42" (padded to 4).
        m.extend_from_slice(&[0x00, 0x19, 0, 4, 17, 0, 0, 0]);
        m.extend_from_slice(&[0x00, 0x06, 0, 4]);
        m.extend_from_slice(b"9:42");
        let request = |username: &str, family| {
            Some(AllocateRequest {
                username: username.into(),
                family,
            })
        };
        assert_eq!(allocate_request(&m), request("9:42", None));
        // REQUESTED-ADDRESS-FAMILY (RFC 6156): 0x01 IPv4, 0x02 IPv6.
        for (value, family) in [(1u8, Some(Family::V4)), (2, Some(Family::V6)), (3, None)] {
            let mut with = m.clone();
            with.extend_from_slice(&[0x00, 0x17, 0, 4, value, 0, 0, 0]);
            with[2..4].copy_from_slice(&24u16.to_be_bytes());
            assert_eq!(allocate_request(&with), request("9:42", family), "{value}");
        }
        let resp = allocate_error(&m, 486, b"Allocation Quota Reached");
        assert_eq!(&resp[0..2], &[0x01, 0x13], "Allocate error response");
        assert_eq!(error_code(&resp), 486);
        assert_eq!(&resp[8..20], &TXID);
        // The first, unauthenticated attempt carries no USERNAME.
        let bare = [&m[..2], &4u16.to_be_bytes(), &m[4..28]].concat();
        assert_eq!(allocate_request(&bare), None);
        // Not an Allocate request.
        let mut refresh = m.clone();
        refresh[1] = 0x04;
        assert_eq!(allocate_request(&refresh), None);
        // A USERNAME running past the message.
        m.truncate(34);
        assert_eq!(allocate_request(&m), None);
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
