//! The packet path: TUN → cryptokey routing → WireGuard → best path, and back.
//!
//! ```text
//!   TUN ──read──▶ offload cut ──▶ route by dst IP ──▶ Tunn::encapsulate ─┬─▶ shared UDP socket (direct pair, GSO)
//!                                                                      ├─▶ ICE conn (TURN pair)
//!                                                                      └─▶ coordination relay
//!   arrive(Origin::Udp | IceConn | Relay) ──▶ Tunn::decapsulate ──▶ src IP check
//!                                   ──▶ dst IP check ──▶ tun_coalesce ──▶ TUN
//!   run_timers ──every 250 ms──▶ Tunn::update_timers (handshakes), persistent
//!                                keepalives: awake peers only (idle ones are
//!                                parked until their next packet)
//! ```
//!
//! Parts: `peer` (one remote node's WireGuard session and where its packets go),
//! `rx` (the receive side), `timers` (WireGuard's timers, idle peers parked),
//! `offload` and `tun_coalesce` (TUN-side TCP segmentation offload, both
//! ways), `udp_batch` (UDP GSO/GRO), `routing` (which peer a packet goes to),
//! `icmp`, `icmp6`, `ip6`, `mesh6` (our IPv6 address), `checksum`,
//! `tun_device`. Where a peer's packets go is set only by the shell, from the
//! node core's decision.
//!
//! Both families take the same path: a peer has a mesh IPv4 address and,
//! when the mesh has an IPv6 prefix, a mesh IPv6 address; packets are routed
//! by either, and a peer may send from either (and from nothing else).
//! IPv6 packets to link-scoped destinations (multicast, link-local: what the
//! kernel sends on any interface) are not the mesh's and never leave.
//!
//! Every datagram enters through one door, [`DataPlane::arrive`], which takes
//! the datagrams and their [`Origin`] (the shared UDP socket, a peer's ICE
//! connection, a coordination-relay frame). Anything that arrives on any path
//! goes to the same `Tunn`: WireGuard already tolerates roaming, so switching
//! paths loses nothing. The data plane never calls up into the node core.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use boringtun::noise::TunnResult;
use overlay_proto::coord::ClientMsg;
use overlay_proto::NodeId;
use tokio::sync::{mpsc, oneshot};

use futures_util::FutureExt;

mod checksum;
pub mod filter;
pub mod icmp;
pub mod icmp6;
pub mod ip6;
mod mesh6;
pub mod offload;
pub mod peer;
mod policy;
pub mod resolver;
mod routing;
mod runs;
mod rx;
mod timers;
pub mod tun_coalesce;
pub mod tun_device;
pub mod udp_batch;
pub use mesh6::Mesh6;
use mesh6::Mesh6State;
pub use rx::{Destinations, RxScratch};

use filter::Direction;
use peer::{lock, Peer};
use routing::{route_dst, PeerTable};
use runs::{run_length, Way};

/// Large enough for any IP packet plus WireGuard's overhead: boringtun panics on
/// a short buffer, so every buffer handed to it has this size.
pub const BUF_SIZE: usize = 65_536 + 256;
/// One TUN read: a `virtio_net_hdr` and a TCP segment of up to 64 KiB.
const FRAME: usize = offload::VNET_HDR_LEN + 65_536;
/// Encrypted datagrams of one batch of reads, before they are sent.
const ARENA: usize = 4 << 20;
/// Packets read from the TUN and encrypted in one go when they are waiting.
const TUN_BATCH: usize = 32;

/// Datagrams [`DataPlane::arrive`] takes in one call: what one UDP GRO read
/// holds at most. Callers pass larger runs in parts.
pub const MAX_BATCH: usize = udp_batch::MAX_SEGMENTS;
/// WireGuard wants its timers run about this often.
const TIMER_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Where a datagram came from: what carried it tells whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Our shared UDP socket, from this address (a direct path's endpoint).
    Udp(SocketAddr),
    /// The peer's ICE connection (a TURN relay pair).
    IceConn(NodeId),
    /// A coordination-relay frame from this peer.
    Relay(NodeId),
}

/// What the data and control planes hand to the coordinator connection.
#[derive(Debug)]
pub enum Outbound {
    Msg(ClientMsg),
    /// A WireGuard datagram for the coordination relay; the control client
    /// frames it (a batch record or a single frame, see `overlay_proto::coord`).
    Relay {
        to: NodeId,
        datagram: Vec<u8>,
    },
}

/// Counters of packets the data plane refused; visible in logs at debug.
#[derive(Default)]
pub struct DropCounters {
    pub no_route: AtomicU64,
    pub spoofed_source: AtomicU64,
    pub bad_datagram: AtomicU64,
    pub relay_queue_full: AtomicU64,
    pub bad_tun_frame: AtomicU64,
    pub wrong_destination: AtomicU64,
    pub bad_signal: AtomicU64,
    pub replayed_signal: AtomicU64,
    pub misdirected_signal: AtomicU64,
    pub excess_offer: AtomicU64,
    pub signal_budget: AtomicU64,
    pub policy: AtomicU64,
    pub policy_out: AtomicU64,
    pub flow_table_full: AtomicU64,
}

impl DropCounters {
    pub fn snapshot(&self) -> overlay_proto::api::Dropped {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        overlay_proto::api::Dropped {
            no_route: get(&self.no_route),
            spoofed_source: get(&self.spoofed_source),
            bad_datagram: get(&self.bad_datagram) + get(&self.bad_tun_frame),
            relay_queue_full: get(&self.relay_queue_full),
            wrong_destination: get(&self.wrong_destination),
            bad_signal: get(&self.bad_signal),
            replayed_signal: get(&self.replayed_signal),
            misdirected_signal: get(&self.misdirected_signal),
            excess_offer: get(&self.excess_offer),
            signal_budget: get(&self.signal_budget),
            policy: get(&self.policy),
            policy_out: get(&self.policy_out),
            flow_table_full: get(&self.flow_table_full),
        }
    }
}

pub struct DataPlane {
    tun: Arc<tun::AsyncDevice>,
    /// Whether TUN reads and writes carry a `virtio_net_hdr` (see `offload`).
    offload: bool,
    /// The socket ICE's host candidates live on (see `mux`): direct paths send here.
    udp: Arc<tokio::net::UdpSocket>,
    my_ip: Ipv4Addr,
    /// The TUN's name, for its IPv6 address (see [`Self::set_mesh6`]).
    tun_name: String,
    tun_mtu: u16,
    /// The mesh IPv6 address the TUN has (and this node answers on), and the
    /// last one the coordinator gave, which may not have been applicable.
    mesh6: RwLock<Mesh6State>,
    /// What decrypted packets may be addressed to (see [`Destinations`]).
    destinations: Destinations,
    peers: RwLock<PeerTable>,
    /// The peers whose WireGuard timers run: all but the parked ones (idle
    /// and quiet, see [`Self::tunn`]), so an idle peer costs no timer work.
    ticking: Mutex<HashMap<NodeId, Arc<Peer>>>,
    outbound: mpsc::Sender<Outbound>,
    pings: Mutex<HashMap<(IpAddr, u16, u16), oneshot::Sender<()>>>,
    pub drops: DropCounters,
    /// ICE and coordinator events for `/metrics`.
    pub counters: crate::metrics::Counters,
    /// Flows every peer's filter tracks (see `filter`).
    flows: Arc<AtomicUsize>,
    /// Whether packets the policy refuses are dropped before sending. Off
    /// only as a test hook, to show that receivers enforce the policy.
    sender_filter: bool,
    /// Seconds since start, advanced by the timer task: the flow table's clock.
    clock: AtomicU32,
    started: std::time::Instant,
    /// The mesh resolver's address, answered here (see `resolver`).
    pub resolver: resolver::Resolver,
}

/// The environment variable that turns the sender-side policy check off
/// (`off`): a test hook, so tests can show receivers enforce the policy.
pub const SENDER_FILTER_ENV: &str = "OVERLAY_SENDER_FILTER";
/// How often idle flows are swept from the filter's tables.
const FLOW_SWEEP: std::time::Duration = std::time::Duration::from_secs(10);

impl DataPlane {
    pub fn new(
        tun: crate::dataplane::tun_device::Tun,
        udp: Arc<tokio::net::UdpSocket>,
        my_ip: Ipv4Addr,
        outbound: mpsc::Sender<Outbound>,
        sender_filter: bool,
    ) -> Self {
        DataPlane {
            tun: tun.device,
            offload: tun.offload,
            udp,
            my_ip,
            tun_name: tun.name,
            tun_mtu: tun.mtu,
            mesh6: RwLock::default(),
            destinations: Destinations::new(my_ip),
            peers: RwLock::default(),
            ticking: Mutex::default(),
            outbound,
            pings: Mutex::default(),
            drops: DropCounters::default(),
            counters: Default::default(),
            flows: Arc::default(),
            sender_filter,
            clock: AtomicU32::new(0),
            started: std::time::Instant::now(),
            resolver: Default::default(),
        }
    }

    pub fn insert(&self, peer: Arc<Peer>) {
        lock(&self.ticking).insert(peer.id, peer.clone());
        let mut table = self.peers.write().unwrap_or_else(|e| e.into_inner());
        table.insert(peer);
    }

    pub fn remove(&self, id: NodeId) -> Option<Arc<Peer>> {
        let mut table = self.peers.write().unwrap_or_else(|e| e.into_inner());
        let peer = table.remove(id)?;
        peer.removed.store(true, Ordering::Relaxed);
        lock(&self.ticking).remove(&id);
        if let Some(addr) = peer.endpoint() {
            if table.by_endpoint.get(&addr).is_some_and(|p| p.id == id) {
                table.by_endpoint.remove(&addr);
            }
        }
        Some(peer)
    }

    pub fn peer(&self, id: NodeId) -> Option<Arc<Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .get(&id)
            .cloned()
    }

    pub fn peer_by_endpoint(&self, addr: SocketAddr) -> Option<Arc<Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_endpoint
            .get(&addr)
            .cloned()
    }

    /// Sends `peer`'s datagrams straight to `endpoint` on the shared socket (and
    /// takes datagrams from there as the peer's), or stops doing so with `None`.
    pub fn set_endpoint(&self, peer: &Arc<Peer>, endpoint: Option<SocketAddr>) {
        let mut table = self.peers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = peer.endpoint() {
            if table.by_endpoint.get(&old).is_some_and(|p| p.id == peer.id) {
                table.by_endpoint.remove(&old);
            }
        }
        if let Some(addr) = endpoint {
            // An address belongs to one peer; whoever had it last loses it.
            if let Some(previous) = table.by_endpoint.insert(addr, peer.clone()) {
                if previous.id != peer.id {
                    previous.set_endpoint(None);
                }
            }
        }
        peer.set_endpoint(endpoint);
    }

    /// The peer with mesh address `ip` (IPv4 or IPv6).
    pub fn peer_by_ip(&self, ip: IpAddr) -> Option<Arc<Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_ip
            .get(&ip)
            .cloned()
    }

    pub fn peers(&self) -> Vec<Arc<Peer>> {
        let table = self.peers.read().unwrap_or_else(|e| e.into_inner());
        let mut peers: Vec<_> = table.by_id.values().cloned().collect();
        peers.sort_by_key(|p| p.mesh_ip);
        peers
    }

    /// Reads the TUN until it fails (the interface went away). Frames that are
    /// waiting are read together, cut into packets (see `offload`), encrypted, and
    /// runs of them to one direct endpoint leave in one GSO send.
    pub async fn run_tun_reader(self: Arc<Self>) -> std::io::Result<()> {
        let mut frames = vec![vec![0u8; FRAME]; TUN_BATCH];
        let mut lens = [0usize; TUN_BATCH];
        let mut packets = Vec::with_capacity(FRAME * 2);
        let mut packet_lens = Vec::with_capacity(64);
        let mut arena = vec![0u8; ARENA];
        let mut direct: Vec<(Way, usize, usize)> = Vec::with_capacity(256);
        loop {
            lens[0] = self.tun.recv(&mut frames[0]).await?;
            let mut count = 1;
            while count < TUN_BATCH {
                match self.tun.recv(&mut frames[count]).now_or_never() {
                    Some(Ok(n)) => {
                        lens[count] = n;
                        count += 1;
                    }
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            self.counters.tun_reads.observe(count);
            let mut used = 0;
            let mut last: Option<Arc<Peer>> = None;
            for (frame, &len) in frames.iter().zip(&lens).take(count) {
                packets.clear();
                packet_lens.clear();
                if !self.offload {
                    packets.extend_from_slice(&frame[..len]);
                    packet_lens.push(len);
                } else if let Err(e) =
                    offload::segment(&frame[..len], &mut packets, &mut packet_lens)
                {
                    self.drops.bad_tun_frame.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("TUN frame: {e}");
                    continue;
                }
                let mut at = 0;
                // The segments of one offloaded frame are one flow: the
                // policy decides on the first for all.
                let mut frame_verdict: Option<bool> = None;
                for &plen in &packet_lens {
                    let packet = &packets[at..at + plen];
                    at += plen;
                    let Some(dst) = route_dst(packet) else {
                        continue;
                    };
                    if self.for_resolver(dst) {
                        self.to_resolver(packet).await;
                        continue;
                    }
                    let peer = match last.take() {
                        Some(p) if p.owns(dst) => Some(p),
                        _ => self.peer_by_ip(dst),
                    };
                    let Some(peer) = peer else {
                        self.drops.no_route.fetch_add(1, Ordering::Relaxed);
                        if let Some(reply) = self.icmp_error(packet, false) {
                            self.write_tun(&reply).await;
                        }
                        continue;
                    };
                    let admitted = match frame_verdict {
                        Some(v) if self.offload => v,
                        _ => self.admits(&peer, packet, Direction::Out),
                    };
                    let first_of_frame = frame_verdict.is_none();
                    frame_verdict = Some(admitted);
                    if !admitted {
                        if first_of_frame {
                            if let Some(reply) = self.icmp_error(packet, true) {
                                self.write_tun(&reply).await;
                            }
                        }
                        last = Some(peer);
                        continue;
                    }
                    let room = (plen + 32).max(148);
                    if arena.len() - used < room {
                        self.send_direct(&direct, &arena).await;
                        direct.clear();
                        used = 0;
                    }
                    if let Some(dlen) =
                        self.encapsulate(&peer, packet, &mut arena[used..used + room])
                    {
                        let way = match peer.endpoint() {
                            Some(endpoint) => Way::Udp(endpoint),
                            None => Way::Indirect(peer.id),
                        };
                        direct.push((way, used, dlen));
                        used += dlen;
                    }
                    last = Some(peer);
                }
            }
            self.send_direct(&direct, &arena).await;
            direct.clear();
        }
    }

    /// The ICMP error this node answers `packet` (read from the TUN) with:
    /// "prohibited" for what the policy refuses, else "unreachable", in the
    /// packet's family; `None` where none is due (see `icmp`, `icmp6`).
    fn icmp_error(&self, packet: &[u8], prohibited: bool) -> Option<Vec<u8>> {
        match packet.first()? >> 4 {
            4 if prohibited => icmp::prohibited(self.my_ip, packet),
            4 => icmp::host_unreachable(self.my_ip, packet),
            6 => {
                let me = self.mesh6()?.addr;
                if prohibited {
                    icmp6::prohibited(me, packet)
                } else {
                    icmp6::host_unreachable(me, packet)
                }
            }
            _ => None,
        }
    }

    /// Writes one IP packet to the TUN, behind the `virtio_net_hdr` it expects.
    async fn write_tun(&self, packet: &[u8]) {
        if !self.offload {
            let _ = self.tun.send(packet).await;
            return;
        }
        let mut frame = Vec::with_capacity(offload::VNET_HDR_LEN + packet.len());
        frame.resize(offload::VNET_HDR_LEN, 0);
        frame.extend_from_slice(packet);
        let _ = self.tun.send(&frame).await;
    }

    /// The bytes to write for a packet stored at `buf[VNET_HDR_LEN..][..len]`:
    /// with an all-zero header in front when offloads are on, bare otherwise.
    fn tun_frame<'b>(&self, buf: &'b mut [u8], len: usize) -> &'b [u8] {
        let hdr = offload::VNET_HDR_LEN;
        if self.offload {
            buf[..hdr].fill(0);
            &buf[..hdr + len]
        } else {
            &buf[hdr..hdr + len]
        }
    }

    /// Sends encrypted datagrams `(way, start, len)` of `arena` in runs:
    /// consecutive, same way, equal length (the last of a run may be
    /// shorter). A run on our socket is one GSO send; a run for a peer
    /// without a direct endpoint goes to its ICE connection's run sender
    /// (TURN ChannelData in one GSO send) when it has one, else datagram by
    /// datagram to the ICE queue or the relay.
    async fn send_direct(&self, direct: &[(Way, usize, usize)], arena: &[u8]) {
        let mut start = 0;
        while start < direct.len() {
            let way = direct[start].0;
            let end = start + run_length(&direct[start..]);
            let run: Vec<&[u8]> = direct[start..end]
                .iter()
                .map(|&(_, at, len)| &arena[at..at + len])
                .collect();
            start = end;
            match way {
                Way::Udp(endpoint) => {
                    self.counters.udp_sends.observe(run.len());
                    if let Err(e) = udp_batch::send_segments(&self.udp, endpoint, &run).await {
                        // The direct path failed outright: give these datagrams the
                        // other paths, as a single send would.
                        tracing::debug!("send to {endpoint}: {e}");
                        if let Some(peer) = self.peer_by_endpoint(endpoint) {
                            for datagram in &run {
                                self.transmit_indirect(&peer, datagram).await;
                            }
                        }
                    }
                }
                Way::Indirect(id) => {
                    let Some(peer) = self.peer(id) else {
                        continue;
                    };
                    if peer.endpoint().is_none() {
                        if let Some(link) = peer.active_conn() {
                            if link.send_run(&run).await {
                                continue;
                            }
                        }
                    }
                    for datagram in &run {
                        self.transmit(&peer, datagram).await;
                    }
                }
            }
        }
    }

    /// Encrypts one IP packet for `peer` into `out`; the datagram's length.
    /// The packet is counted under the session's lock, so a timer pass that
    /// parks the peer (see [`Self::tunn`]) never misses it.
    fn encapsulate(&self, peer: &Peer, packet: &[u8], out: &mut [u8]) -> Option<usize> {
        let mut tunn = self.tunn(peer);
        let len = match tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => datagram.len(),
            TunnResult::Err(e) => {
                tracing::debug!(peer = peer.id, "encapsulate: {e:?}");
                return None;
            }
            _ => return None,
        };
        peer.count_tx(packet.len());
        Some(len)
    }

    /// Encrypts one IP packet for `peer` and sends it on the best path, if
    /// the access policy lets it.
    pub async fn send_packet(&self, peer: &Peer, packet: &[u8], out: &mut [u8]) {
        if !self.admits(peer, packet, Direction::Out) {
            return;
        }
        if let Some(len) = self.encapsulate(peer, packet, out) {
            self.transmit(peer, &out[..len]).await;
        }
    }

    /// Sends a WireGuard datagram over the selected ICE pair, or the relay.
    pub async fn transmit(&self, peer: &Peer, datagram: &[u8]) {
        if let Some(addr) = peer.endpoint() {
            self.counters.udp_sends.observe(1);
            if self.udp.send_to(datagram, addr).await.is_ok() {
                return;
            }
        }
        self.transmit_indirect(peer, datagram).await;
    }

    /// Sends what WireGuard answered to a datagram from `origin` (a handshake
    /// response, packets the handshake held): back over the coordination
    /// relay when the datagram came that way, else on the best path. The
    /// relay just reached us, while our own path may be stale: a peer that
    /// restarted, or woke from idle, first speaks over the relay, and an
    /// answer lost on a dead endpoint costs WireGuard a 5 s retry.
    async fn answer(&self, peer: &Peer, origin: Origin, datagram: &[u8]) {
        match origin {
            Origin::Relay(_) => self.relay(peer, datagram),
            Origin::Udp(_) | Origin::IceConn(_) => self.transmit(peer, datagram).await,
        }
    }

    /// The ways that do not use our own socket: the ICE connection (TURN), else
    /// the coordination relay.
    async fn transmit_indirect(&self, peer: &Peer, datagram: &[u8]) {
        if let Some(link) = peer.active_conn() {
            if link.try_send(datagram) {
                return;
            }
        }
        self.relay(peer, datagram);
    }

    /// Hands `datagram` to the coordination relay; dropped (counted) when
    /// its queue is full.
    fn relay(&self, peer: &Peer, datagram: &[u8]) {
        let relay = Outbound::Relay {
            to: peer.id,
            datagram: datagram.to_vec(),
        };
        if self.outbound.try_send(relay).is_err() {
            self.drops.relay_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Registers interest in the echo reply `(ident, seq)` from `from` (an
    /// ICMP or ICMPv6 one, by its family); see [`Self::complete_ping`].
    pub fn expect_ping(&self, from: IpAddr, ident: u16, seq: u16) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pings).insert((from, ident, seq), tx);
        rx
    }

    pub fn forget_ping(&self, from: IpAddr, ident: u16, seq: u16) {
        lock(&self.pings).remove(&(from, ident, seq));
    }

    /// True when `packet` answered one of our own pings (it then never reaches the
    /// TUN: the kernel did not send the request and would only drop the reply).
    fn complete_ping(&self, packet: &[u8]) -> bool {
        let Some((from, ident, seq)) = icmp::echo_reply_any(packet) else {
            return false;
        };
        match lock(&self.pings).remove(&(from, ident, seq)) {
            Some(tx) => {
                let _ = tx.send(());
                true
            }
            None => false,
        }
    }

    pub fn my_ip(&self) -> Ipv4Addr {
        self.my_ip
    }
}
