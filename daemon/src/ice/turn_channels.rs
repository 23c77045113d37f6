//! What one TURN allocation looks like from the wire between webrtc-ice's
//! TURN client and the server: its relayed address, its channel bindings,
//! and whether it was released. Sans-IO: the shim hands every datagram in
//! both directions to [`Channels`] with `now`.
//!
//! ```text
//!  client ──ChannelBind(ch, peer), txid──▶ server     note_client
//!  client ◀──ChannelBind success, txid─── server      note_server ⇒ ch ↔ peer
//!  client ◀──Allocate success (XOR-RELAYED-ADDRESS)─  note_server ⇒ Relayed
//!  client ──Refresh(LIFETIME 0)──▶ ◀──success──       note_server ⇒ Released
//! ```
//!
//! Only the server's success installs a binding, for the server's lifetime
//! (10 minutes, RFC 8656 §12) counted from the last success; the client
//! refreshes it before then.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun::attributes::{ATTR_XOR_PEER_ADDRESS, ATTR_XOR_RELAYED_ADDRESS};
use stun::message::{
    Message, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_CHANNEL_BIND,
    METHOD_REFRESH,
};
use stun::xoraddr::XorMappedAddress;

use overlay_proto::NodeId;

/// Lifetime of a channel binding on the server.
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// CHANNEL-NUMBER and LIFETIME attribute types (RFC 8656 §18).
const ATTR_CHANNEL_NUMBER: u16 = 0x000c;
const ATTR_LIFETIME: u16 = 0x000d;
/// Channel numbers a client may bind.
const CHANNELS: std::ops::RangeInclusive<u16> = 0x4000..=0x4fff;
/// Requests awaiting an answer that are remembered (the client keeps a few).
const MAX_PENDING: usize = 64;

/// What an answer from the server changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Noted {
    Nothing,
    /// The allocation exists, with this relayed address.
    Relayed(SocketAddr),
    /// The client released the allocation (Refresh with LIFETIME 0).
    Released,
}

/// A ChannelData datagram's channel and the range of its data.
pub fn parse_channel_data(packet: &[u8]) -> Option<(u16, std::ops::Range<usize>)> {
    let header = packet.get(..4)?;
    let channel = u16::from_be_bytes([header[0], header[1]]);
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    (CHANNELS.contains(&channel) && 4 + len <= packet.len()).then_some((channel, 4..4 + len))
}

/// The 4-byte ChannelData header of `len` bytes on `channel`.
pub fn channel_header(channel: u16, len: usize) -> [u8; 4] {
    let c = channel.to_be_bytes();
    let l = (len as u16).to_be_bytes();
    [c[0], c[1], l[0], l[1]]
}

#[derive(Default)]
pub struct Channels {
    /// ChannelBind requests in flight: txid ↦ (channel, peer).
    binds: HashMap<[u8; 12], (u16, SocketAddr)>,
    /// The transaction of a Refresh with LIFETIME 0, if one is in flight.
    release: Option<[u8; 12]>,
    by_channel: HashMap<u16, (SocketAddr, Instant)>,
    /// Peers whose datagrams go straight to the data plane, and for whom.
    fast: HashMap<SocketAddr, NodeId>,
}

fn decode(packet: &[u8]) -> Option<Message> {
    if packet.len() < 20 || packet[0] & 0xc0 != 0 || packet[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let mut m = Message::new();
    m.unmarshal_binary(packet).ok()?;
    Some(m)
}

fn xor_addr(m: &Message, attr: stun::attributes::AttrType) -> Option<SocketAddr> {
    let mut a = XorMappedAddress::default();
    a.get_from_as(m, attr).ok()?;
    Some(SocketAddr::new(a.ip, a.port))
}

fn attr_u16(m: &Message, attr: u16) -> Option<u16> {
    let v = m.get(stun::attributes::AttrType(attr)).ok()?;
    Some(u16::from_be_bytes([*v.first()?, *v.get(1)?]))
}

fn attr_u32(m: &Message, attr: u16) -> Option<u32> {
    let v = m.get(stun::attributes::AttrType(attr)).ok()?;
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

impl Channels {
    /// A datagram the client sends to the server.
    pub fn note_client(&mut self, packet: &[u8]) {
        let Some(m) = decode(packet) else { return };
        if m.typ.class != CLASS_REQUEST {
            return;
        }
        if self.binds.len() >= MAX_PENDING {
            self.binds.clear();
        }
        if m.typ.method == METHOD_CHANNEL_BIND {
            if let (Some(channel), Some(peer)) = (
                attr_u16(&m, ATTR_CHANNEL_NUMBER),
                xor_addr(&m, ATTR_XOR_PEER_ADDRESS),
            ) {
                if CHANNELS.contains(&channel) {
                    self.binds.insert(m.transaction_id.0, (channel, peer));
                }
            }
        } else if m.typ.method == METHOD_REFRESH && attr_u32(&m, ATTR_LIFETIME) == Some(0) {
            self.release = Some(m.transaction_id.0);
        }
    }

    /// A datagram the server sends to the client.
    pub fn note_server(&mut self, packet: &[u8], now: Instant) -> Noted {
        let Some(m) = decode(packet) else {
            return Noted::Nothing;
        };
        let txid = m.transaction_id.0;
        let success = m.typ.class == CLASS_SUCCESS_RESPONSE;
        if m.typ.method == METHOD_ALLOCATE && success {
            if let Some(relayed) = xor_addr(&m, ATTR_XOR_RELAYED_ADDRESS) {
                return Noted::Relayed(relayed);
            }
        } else if m.typ.method == METHOD_CHANNEL_BIND {
            if let Some((channel, peer)) = self.binds.remove(&txid) {
                if success {
                    self.by_channel
                        .retain(|c, (p, _)| *c == channel || *p != peer);
                    self.by_channel
                        .insert(channel, (peer, now + CHANNEL_LIFETIME));
                }
            }
        } else if m.typ.method == METHOD_REFRESH && self.release == Some(txid) {
            self.release = None;
            if success {
                return Noted::Released;
            }
        }
        Noted::Nothing
    }

    /// The live channel bound to `peer`.
    pub fn channel_for(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.by_channel
            .iter()
            .find(|(_, (p, expires))| *p == peer && now < *expires)
            .map(|(c, _)| *c)
    }

    /// The node whose data arrives on `channel`, when its peer is fast.
    pub fn fast_node(&self, channel: u16, now: Instant) -> Option<NodeId> {
        let (peer, expires) = self.by_channel.get(&channel)?;
        if now >= *expires {
            return None;
        }
        self.fast.get(peer).copied()
    }

    /// Sends `peer`'s data to `node`'s data plane (or stops, with `None`).
    pub fn set_fast(&mut self, peer: SocketAddr, node: Option<NodeId>) {
        match node {
            Some(node) => {
                self.fast.insert(peer, node);
            }
            None => {
                self.fast.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
#[path = "turn_channels_tests.rs"]
pub(crate) mod tests;
