//! The embedded TURN server's channel table: which client's ChannelData goes
//! to which peer through which relay socket, learnt by watching the turn
//! crate's control traffic, so ChannelData can be relayed without it.
//!
//! ```text
//!  client ──Allocate──▶ turn::Server ──success, XOR-RELAYED-ADDRESS R──▶ client
//!          [note_response: client ↦ relay R]
//!  client ──ChannelBind(ch, peer), txid T──▶ turn::Server     [note_request]
//!  client ◀──ChannelBind success, T── turn::Server            [note_response]
//!          [relay R: ch ↦ peer, peer ↦ ch, for CHANNEL_LIFETIME]
//! ```
//!
//! Only a success the turn crate itself sent installs a binding, so the
//! table never holds what the server refused (a denied peer is refused
//! before the server sees it, by `stun_filter`; bad credentials by the
//! server). A binding lapses [`CHANNEL_LIFETIME`] after its last success,
//! exactly when the turn crate's does, and a relay's entry goes when its
//! socket is dropped (allocation expired or deleted). Sans-IO: the caller
//! passes `now` and holds the relay handles `R`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun::message::{
    Getter, Message, MessageType, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE,
    METHOD_CHANNEL_BIND,
};
use turn::proto::channum::ChannelNumber;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;

/// Lifetime of a channel binding, here and in the turn crate's server
/// (RFC 8656 §12: 10 minutes).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// ChannelBind requests awaiting the server's answer; beyond this the
/// oldest are forgotten (their binding then stays on the slow path until
/// the client's next refresh).
const MAX_PENDING: usize = 4096;
/// Channel numbers a client may bind (RFC 8656 §12).
const CHANNEL_RANGE: std::ops::RangeInclusive<u16> = 0x4000..=0x4fff;

/// The 4-byte ChannelData header of `len` bytes of data on `channel`.
pub fn channel_header(channel: u16, len: usize) -> [u8; 4] {
    let c = channel.to_be_bytes();
    let l = (len as u16).to_be_bytes();
    [c[0], c[1], l[0], l[1]]
}

/// A ChannelData datagram's channel and the range of its data, or `None`
/// when the datagram is not well-formed ChannelData.
pub fn parse_channel_data(packet: &[u8]) -> Option<(u16, std::ops::Range<usize>)> {
    let header = packet.get(..4)?;
    let channel = u16::from_be_bytes([header[0], header[1]]);
    if !CHANNEL_RANGE.contains(&channel) {
        return None;
    }
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    (4 + len <= packet.len()).then_some((channel, 4..4 + len))
}

struct Binding {
    peer: SocketAddr,
    expires: Instant,
}

struct Relay<R> {
    handle: R,
    client: Option<SocketAddr>,
    by_channel: HashMap<u16, Binding>,
}

pub struct ChannelTable<R> {
    /// Relay sockets by the relayed address announced for them.
    relays: HashMap<SocketAddr, Relay<R>>,
    /// Each client's allocation (one per client address on one listener).
    clients: HashMap<SocketAddr, SocketAddr>,
    /// ChannelBind requests seen: (client, transaction id) ↦ (channel, peer).
    pending: HashMap<(SocketAddr, [u8; 12]), (u16, SocketAddr, Instant)>,
    /// Datagrams relayed by the caller on this table's word, each way.
    pub relayed_to_peers: u64,
    pub relayed_to_clients: u64,
}

impl<R> Default for ChannelTable<R> {
    fn default() -> Self {
        ChannelTable {
            relays: HashMap::new(),
            clients: HashMap::new(),
            pending: HashMap::new(),
            relayed_to_peers: 0,
            relayed_to_clients: 0,
        }
    }
}

fn decode(packet: &[u8]) -> Option<(Message, MessageType)> {
    // ChannelData (top bits 01) and anything without the cookie is no STUN.
    if packet.len() < 20 || packet[0] & 0xc0 != 0 || packet[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let mut m = Message::new();
    m.unmarshal_binary(packet).ok()?;
    let typ = m.typ;
    Some((m, typ))
}

impl<R: Clone> ChannelTable<R> {
    /// A relay socket was created, announced as `relayed`.
    pub fn add_relay(&mut self, relayed: SocketAddr, handle: R) {
        self.relays.insert(
            relayed,
            Relay {
                handle,
                client: None,
                by_channel: HashMap::new(),
            },
        );
    }

    /// The relay socket announced as `relayed` is gone.
    pub fn remove_relay(&mut self, relayed: SocketAddr) {
        if let Some(relay) = self.relays.remove(&relayed) {
            if let Some(client) = relay.client {
                if self.clients.get(&client) == Some(&relayed) {
                    self.clients.remove(&client);
                }
            }
        }
    }

    /// A datagram from `client` that the turn crate is about to handle.
    pub fn note_request(&mut self, client: SocketAddr, packet: &[u8], now: Instant) {
        let Some((m, typ)) = decode(packet) else {
            return;
        };
        if typ.method != METHOD_CHANNEL_BIND || typ.class != CLASS_REQUEST {
            return;
        }
        let mut number = ChannelNumber::default();
        let mut peer = PeerAddress::default();
        if number.get_from(&m).is_err() || peer.get_from(&m).is_err() {
            return;
        }
        if !CHANNEL_RANGE.contains(&number.0) {
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            self.pending
                .retain(|_, (_, _, seen)| now.duration_since(*seen) < Duration::from_secs(5));
            if self.pending.len() >= MAX_PENDING {
                return;
            }
        }
        self.pending.insert(
            (client, m.transaction_id.0),
            (number.0, SocketAddr::new(peer.ip, peer.port), now),
        );
    }

    /// A datagram the turn crate sends to `client`.
    pub fn note_response(&mut self, client: SocketAddr, packet: &[u8], now: Instant) {
        let Some((m, typ)) = decode(packet) else {
            return;
        };
        if typ.class == CLASS_SUCCESS_RESPONSE && typ.method == METHOD_ALLOCATE {
            let mut relayed = RelayedAddress::default();
            if relayed.get_from(&m).is_ok() {
                let relayed = SocketAddr::new(relayed.ip, relayed.port);
                if let Some(relay) = self.relays.get_mut(&relayed) {
                    relay.client = Some(client);
                    self.clients.insert(client, relayed);
                }
            }
            return;
        }
        if typ.method != METHOD_CHANNEL_BIND {
            return;
        }
        let Some((channel, peer, _)) = self.pending.remove(&(client, m.transaction_id.0)) else {
            return;
        };
        if typ.class != CLASS_SUCCESS_RESPONSE {
            return;
        }
        let Some(relay) = self
            .clients
            .get(&client)
            .and_then(|r| self.relays.get_mut(r))
        else {
            return;
        };
        // The turn crate refuses to move a channel or a peer; mirror the
        // binding it kept.
        relay
            .by_channel
            .retain(|c, b| *c == channel || b.peer != peer);
        relay.by_channel.insert(
            channel,
            Binding {
                peer,
                expires: now + CHANNEL_LIFETIME,
            },
        );
    }

    /// Where ChannelData from `client` on `channel` goes: the relay socket
    /// and the peer, while the binding lives.
    pub fn to_peer(
        &self,
        client: SocketAddr,
        channel: u16,
        now: Instant,
    ) -> Option<(&R, SocketAddr)> {
        let relay = self.relays.get(self.clients.get(&client)?)?;
        let b = relay.by_channel.get(&channel)?;
        (now < b.expires).then_some((&relay.handle, b.peer))
    }

    /// Where a datagram from `peer` on the relay socket `relayed` goes: the
    /// client and its channel, while the binding lives.
    pub fn to_client(
        &self,
        relayed: SocketAddr,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<(SocketAddr, u16)> {
        let relay = self.relays.get(&relayed)?;
        let client = relay.client?;
        relay
            .by_channel
            .iter()
            .find(|(_, b)| b.peer == peer && now < b.expires)
            .map(|(c, _)| (client, *c))
    }

    #[cfg(test)]
    pub fn relay_count(&self) -> usize {
        self.relays.len()
    }
}

#[cfg(test)]
#[path = "turn_channels_tests.rs"]
mod tests;
