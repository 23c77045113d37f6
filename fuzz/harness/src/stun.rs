//! STUN and TURN datagrams from anyone on the Internet: the embedded TURN
//! listener's filter, the coordinator's second STUN port, a node's UDP mux and
//! the TURN REST username.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use overlay_coord::peer_policy::PeerPolicy;
use overlay_coord::stun_filter::{inspect, Verdict};
use overlay_coord::{auth, stun_alt};
use stun::attributes::{ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS};
use stun::message::{
    Getter, Message, BINDING_SUCCESS, CLASS_INDICATION, CLASS_REQUEST, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_SEND,
};
use stun::xoraddr::XorMappedAddress;
use turn::proto::chandata::ChannelData;

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// The peer a TURN request names as the `turn` crate's server reads it (the
/// first XOR-PEER-ADDRESS of a CreatePermission or ChannelBind request or a Send
/// indication), or `None` when the server would not act on one.
fn peer_the_turn_server_sees(packet: &[u8]) -> Option<IpAddr> {
    if ChannelData::is_channel_data(packet) {
        return None;
    }
    let mut msg = Message::new();
    msg.unmarshal_binary(packet).ok()?;
    let names_peer = matches!(
        (msg.typ.method, msg.typ.class),
        (
            METHOD_CREATE_PERMISSION | METHOD_CHANNEL_BIND,
            CLASS_REQUEST
        ) | (METHOD_SEND, CLASS_INDICATION)
    );
    if !names_peer {
        return None;
    }
    let mut peer = XorMappedAddress::default();
    peer.get_from_as(&msg, ATTR_XOR_PEER_ADDRESS).ok()?;
    Some(peer.ip)
}

/// One datagram on the embedded TURN listener. The first byte picks the policy
/// (bit 0: allow private peers; bit 1: the server owns 203.0.113.1), the rest is
/// the datagram. Whatever peer the TURN server behind the filter would read from
/// a datagram the filter passes must be one the policy allows; a refusal must be
/// a well-formed STUN error for the same transaction.
pub fn stun_filter(data: &[u8]) {
    let Some((&mode, packet)) = data.split_first() else {
        return;
    };
    let mut own = HashSet::new();
    if mode & 2 != 0 {
        own.insert(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)));
    }
    let policy = PeerPolicy {
        allow_private: mode & 1 != 0,
        own,
        mesh: vec![
            "100.64.0.0/10".parse().expect("mesh network"),
            "fd7a:115c:a1e0::/48".parse().expect("mesh IPv6 prefix"),
        ],
    };
    let verdict = inspect(packet, &policy);
    if verdict == Verdict::Pass {
        if let Some(peer) = peer_the_turn_server_sees(packet) {
            assert!(
                policy.allows(peer),
                "the filter passed a request the TURN server reads as naming denied {peer}"
            );
        }
    }
    if let Verdict::Refuse(resp) = verdict {
        assert!(
            resp.len() >= 20 && resp.len() % 4 == 0,
            "response length {}",
            resp.len()
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([resp[2], resp[3]])),
            resp.len() - 20
        );
        assert_eq!(resp[4..8], MAGIC_COOKIE);
        assert_eq!(resp[8..20], packet[8..20], "same transaction");
        assert_eq!(resp[1] & 0x10, 0x10, "error class");
    }
}

/// A datagram on the coordinator's second STUN port (any Binding request is
/// answered, with the sender's address) and on a node's UDP mux (STUN is parsed
/// and routed by the USERNAME attribute, whose value is also what the TURN
/// server parses for the credential's expiry).
pub fn stun_message(data: &[u8]) {
    let from = SocketAddr::from(([198, 51, 100, 7], 40000));
    if let Some(reply) = stun_alt::answer(data, from) {
        let mut msg = Message::new();
        msg.unmarshal_binary(&reply)
            .expect("our Binding response parses");
        assert_eq!(msg.typ, BINDING_SUCCESS);
        assert_eq!(msg.transaction_id.0[..], data[8..20], "same transaction");
        let mut mapped = XorMappedAddress::default();
        mapped
            .get_from(&msg)
            .expect("the response carries the address");
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), from);
    }
    let mut msg = Message::new();
    if msg.unmarshal_binary(data).is_err() {
        return;
    }
    let mut mapped = XorMappedAddress::default();
    let _ = mapped.get_from(&msg);
    if let Ok(username) = msg.get(ATTR_USERNAME) {
        if let Ok(username) = String::from_utf8(username) {
            let _ = username.split(':').next();
            let _ = auth::turn_username_expiry(&username);
        }
    }
}
