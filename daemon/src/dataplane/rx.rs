//! The receive side: datagrams from a peer are decrypted, checked against the
//! peer's mesh addresses (cryptokey routing: IPv4, or IPv6 when it has one)
//! and against our own (a peer reaches this node, never what lies behind it),
//! and written to the TUN, runs of one TCP flow merged into one write (see
//! `tun_coalesce`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::sync::RwLock;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;

use super::filter::Direction;
use super::offload;
use super::peer::Peer;
use super::tun_coalesce;
use super::{DataPlane, Origin, BUF_SIZE, MAX_BATCH};

/// The smallest room a datagram is decrypted into (boringtun wants MTU-sized
/// room even for small packets).
const MIN_DECRYPT_ROOM: usize = 9_216;

/// The destinations a decrypted packet may have to be delivered: this node's
/// mesh addresses. Without this check a peer could reach anything the TUN
/// leads to (the node's LAN addresses, and with forwarding on, its networks).
/// Routes this node serves will be added here.
#[derive(Debug)]
pub struct Destinations {
    mesh_v4: [u8; 4],
    /// The mesh IPv6 address the TUN has (it may come and go while we run).
    mesh_v6: RwLock<Option<[u8; 16]>>,
}

impl Destinations {
    pub fn new(mesh_v4: Ipv4Addr) -> Self {
        Destinations {
            mesh_v4: mesh_v4.octets(),
            mesh_v6: RwLock::new(None),
        }
    }

    pub fn set_v6(&self, mesh_v6: Option<Ipv6Addr>) {
        *self.mesh_v6.write().unwrap_or_else(|e| e.into_inner()) = mesh_v6.map(|a| a.octets());
    }

    /// Whether `packet`, an IP packet WireGuard decrypted (so at least a full
    /// header of its version), is addressed to us: one four-byte compare for
    /// IPv4, a read lock and a sixteen-byte compare for IPv6. An IPv6 packet
    /// that asks to be routed on (a routing header with segments left) is
    /// not ours either, though its destination is.
    #[inline]
    pub fn accepts(&self, packet: &[u8]) -> bool {
        match packet.first().map(|b| b >> 4) {
            Some(4) => packet.get(16..20) == Some(&self.mesh_v4[..]),
            Some(6) => {
                let ours = *self.mesh_v6.read().unwrap_or_else(|e| e.into_inner());
                ours.is_some_and(|a| packet.get(24..40) == Some(&a[..]))
                    && !super::ip6::routes_onward(packet)
            }
            _ => false,
        }
    }
}

/// What decrypting one datagram gave.
enum Decrypted {
    Nothing,
    /// An IP packet of this length, at the start of the buffer given.
    Packet(usize),
    /// WireGuard messages to send back (handshake answers, queued packets).
    Network(Vec<Vec<u8>>),
}

/// Buffers reused across received datagrams: one per task that receives.
pub struct RxScratch {
    /// One datagram decrypted, behind room for a `virtio_net_hdr`.
    one: Vec<u8>,
    plain: Vec<u8>,
    spans: Vec<(usize, usize)>,
    frames_buf: Vec<u8>,
    frames: Vec<(usize, usize)>,
}

impl Default for RxScratch {
    fn default() -> Self {
        RxScratch {
            one: vec![0u8; BUF_SIZE],
            plain: vec![0u8; 64 * 1500 + 2 * MIN_DECRYPT_ROOM],
            spans: Vec::with_capacity(64),
            frames_buf: Vec::with_capacity(128 * 1024),
            frames: Vec::with_capacity(64),
        }
    }
}

impl DataPlane {
    /// Decrypts one datagram from `peer` into `dst`.
    fn decrypt(&self, peer: &Peer, datagram: &[u8], dst: &mut [u8]) -> Decrypted {
        let mut tunn = self.tunn(peer);
        match tunn.decapsulate(None, datagram, dst) {
            TunnResult::WriteToNetwork(d) => {
                // Handshake answers, and packets queued while the handshake ran.
                let mut pending = vec![d.to_vec()];
                while let TunnResult::WriteToNetwork(d) = tunn.decapsulate(None, &[], dst) {
                    pending.push(d.to_vec());
                }
                Decrypted::Network(pending)
            }
            TunnResult::WriteToTunnelV4(p, src) if src == peer.mesh_ip => self.deliver(peer, p),
            TunnResult::WriteToTunnelV6(p, src) if peer.mesh_ip6 == Some(src) => {
                self.deliver(peer, p)
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                // Cryptokey routing: a peer may only speak from its own mesh
                // addresses (an IPv6 source when it has none is forged too).
                self.drops.spoofed_source.fetch_add(1, Ordering::Relaxed);
                Decrypted::Nothing
            }
            TunnResult::Err(WireGuardError::NoCurrentSession) => {
                self.drops.bad_datagram.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = peer.id, "decapsulate: no such session");
                // The peer speaks in a session we do not have: one of us
                // restarted. Offer a new one now rather than leave it to the
                // peer's 15 s timer (one handshake in flight at a time).
                match tunn.format_handshake_initiation(dst, false) {
                    TunnResult::WriteToNetwork(d) => Decrypted::Network(vec![d.to_vec()]),
                    _ => Decrypted::Nothing,
                }
            }
            TunnResult::Err(e) => {
                self.drops.bad_datagram.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = peer.id, "decapsulate: {e:?}");
                Decrypted::Nothing
            }
            TunnResult::Done => Decrypted::Nothing,
        }
    }

    /// A decrypted packet from one of `peer`'s own addresses: delivered when
    /// it is addressed to us and the policy lets it in, unless it answers one
    /// of our own pings.
    fn deliver(&self, peer: &Peer, packet: &[u8]) -> Decrypted {
        if !self.destinations.accepts(packet) {
            self.drops.wrong_destination.fetch_add(1, Ordering::Relaxed);
            return Decrypted::Nothing;
        }
        if !self.admits(peer, packet, Direction::In) {
            return Decrypted::Nothing;
        }
        peer.count_rx(packet.len());
        if self.complete_ping(packet) {
            Decrypted::Nothing
        } else {
            Decrypted::Packet(packet.len())
        }
    }

    /// The one way in: WireGuard datagrams that arrived together from `origin`,
    /// whatever carried them. Returns false when no peer owns the origin (a UDP
    /// sender that is no peer's endpoint): the caller may hand them to ICE.
    pub async fn arrive(&self, origin: Origin, datagrams: &[&[u8]], rx: &mut RxScratch) -> bool {
        let peer = match origin {
            Origin::Udp(from) => self.peer_by_endpoint(from),
            Origin::IceConn(id) | Origin::Relay(id) => self.peer(id),
        };
        let Some(peer) = peer else {
            return false;
        };
        match datagrams {
            [] => {}
            [one] => self.receive(&peer, origin, one, &mut rx.one).await,
            many => {
                for part in many.chunks(MAX_BATCH) {
                    self.receive_batch(&peer, origin, part, rx).await;
                }
            }
        }
        true
    }

    /// One datagram from `peer`, written to the TUN on its own.
    async fn receive(&self, peer: &Peer, origin: Origin, datagram: &[u8], out: &mut [u8]) {
        match self.decrypt(peer, datagram, &mut out[offload::VNET_HDR_LEN..]) {
            Decrypted::Nothing => {}
            Decrypted::Packet(len) => {
                let frame = self.tun_frame(out, len);
                if let Err(e) = self.tun.send(frame).await {
                    tracing::debug!("TUN write: {e}");
                }
            }
            Decrypted::Network(datagrams) => {
                for d in datagrams {
                    self.answer(peer, origin, &d).await;
                }
            }
        }
    }

    /// Datagrams that arrived together from `peer`: decrypted side by side, then
    /// written to the TUN with runs of one TCP flow coalesced (see `gro`).
    async fn receive_batch(
        &self,
        peer: &Peer,
        origin: Origin,
        datagrams: &[&[u8]],
        rx: &mut RxScratch,
    ) {
        rx.spans.clear();
        let mut used = 0;
        for datagram in datagrams {
            if rx.plain.len() - used < datagram.len().max(MIN_DECRYPT_ROOM) {
                self.write_coalesced(rx, used).await;
                rx.spans.clear();
                used = 0;
            }
            match self.decrypt(peer, datagram, &mut rx.plain[used..]) {
                Decrypted::Nothing => {}
                Decrypted::Packet(len) => {
                    rx.spans.push((used, len));
                    used += len;
                }
                Decrypted::Network(replies) => {
                    for d in replies {
                        self.answer(peer, origin, &d).await;
                    }
                }
            }
        }
        self.write_coalesced(rx, used).await;
    }

    async fn write_coalesced(&self, rx: &mut RxScratch, used: usize) {
        if rx.spans.is_empty() {
            return;
        }
        // At most `MAX_BATCH` packets (one per datagram): kept on the stack.
        let mut packets: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        debug_assert!(rx.spans.len() <= MAX_BATCH, "arrive passes runs in parts");
        debug_assert!(rx.spans.iter().all(|&(at, len)| at + len <= used));
        let count = rx.spans.len().min(MAX_BATCH);
        for (slot, &(at, len)) in packets.iter_mut().zip(&rx.spans) {
            *slot = &rx.plain[at..at + len];
        }
        let packets = &packets[..count];
        if !self.offload {
            for packet in packets {
                if let Err(e) = self.tun.send(packet).await {
                    tracing::debug!("TUN write: {e}");
                }
            }
            return;
        }
        rx.frames_buf.clear();
        rx.frames.clear();
        tun_coalesce::coalesce(packets, &mut rx.frames_buf, &mut rx.frames);
        for &(at, len) in &rx.frames {
            if let Err(e) = self.tun.send(&rx.frames_buf[at..at + len]).await {
                tracing::debug!("TUN write: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal IPv4 header from `src` to `dst`.
    fn ipv4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p
    }

    #[test]
    fn only_packets_to_our_mesh_address_are_delivered() {
        let me = Destinations::new(Ipv4Addr::new(100, 64, 0, 2));
        let peer = [100, 64, 0, 3];
        assert!(me.accepts(&ipv4(peer, [100, 64, 0, 2])));
        // Our LAN address, another mesh node, broadcast: not ours to deliver.
        assert!(!me.accepts(&ipv4(peer, [10, 77, 1, 3])));
        assert!(!me.accepts(&ipv4(peer, [100, 64, 0, 4])));
        assert!(!me.accepts(&ipv4(peer, [255, 255, 255, 255])));
        assert!(!me.accepts(&[0x45, 0, 0]));
    }

    #[test]
    fn ipv6_packets_are_delivered_only_to_our_mesh_ipv6_address_once_we_have_one() {
        use crate::dataplane::icmp6::echo_request;
        let me = Destinations::new(Ipv4Addr::new(100, 64, 0, 2));
        let ours: Ipv6Addr = "fd7a:115c:a1e0::6440:2".parse().unwrap();
        let peer: Ipv6Addr = "fd7a:115c:a1e0::6440:3".parse().unwrap();
        let to_us = echo_request(peer, ours, 1, 1, b"");
        assert!(!me.accepts(&to_us), "no IPv6 address yet");
        me.set_v6(Some(ours));
        assert!(me.accepts(&to_us));
        let other: Ipv6Addr = "fd7a:115c:a1e0::6440:4".parse().unwrap();
        assert!(!me.accepts(&echo_request(peer, other, 1, 1, b"")));
        assert!(!me.accepts(&echo_request(
            peer,
            "2001:db8::2".parse().unwrap(),
            1,
            1,
            b""
        )));
        // Addressed to us, but asking to be routed on: not ours.
        {
            use crate::dataplane::ip6::tests::{options, packet, B};
            me.set_v6(Some(B));
            let mut srh = options(3);
            srh[2] = 4;
            srh[3] = 1;
            assert!(!me.accepts(&packet(&[(43, srh.clone())], 6, &[0; 20])));
            srh[3] = 0;
            assert!(me.accepts(&packet(&[(43, srh)], 6, &[0; 20])));
            me.set_v6(Some(ours));
        }
        // An IPv4 packet whose bytes 24..40 happen to hold our address is IPv4.
        let mut v4 = ipv4(peer.octets()[12..16].try_into().unwrap(), [100, 64, 0, 9]);
        v4.extend_from_slice(&[0; 4]);
        v4.extend_from_slice(&ours.octets());
        assert!(!me.accepts(&v4));
        me.set_v6(None);
        assert!(!me.accepts(&to_us), "the address went away");
    }
}
