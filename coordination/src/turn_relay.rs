//! The embedded TURN server's sockets: the listener and the relay sockets
//! the turn crate reads and writes through, with ChannelData relayed here,
//! in batches, without the turn crate.
//!
//! ```text
//!                 recvmmsg                          sendmmsg
//!  client ──▶ listener ──ChannelData, bound──▶ relay socket ──▶ peer
//!                 └─ anything else: filter, quota ──▶ turn::Server (one at a time)
//!                 sendmmsg (header ‖ data)          recvmmsg
//!  client ◀── listener ◀──from a bound peer── relay socket ◀── peer
//!                           anything else ──▶ turn crate's allocation task
//! ```
//!
//! The turn crate still does everything but ChannelData on live bindings:
//! authentication, allocations, permissions, channel bindings and their
//! refreshes, Send/Data indications. The [`ChannelTable`] learns the
//! bindings from the requests and answers passing through these sockets.
//! A batch of up to [`BATCH`] datagrams costs one `recvmmsg`, one
//! `sendmmsg` per run of datagrams to the same socket, one table lock and
//! no allocation; the turn crate's allocation task stays the one reader of
//! its relay socket (it sits in [`FilteredConn::recv_from`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use tokio::net::UdpSocket;
use webrtc_util::Conn;

use super::batch::{RecvBatch, SendBatch, BATCH};
use super::channels::{channel_header, parse_channel_data, ChannelTable};
use crate::metrics::Metrics;
use crate::peer_policy::PeerPolicy;
use crate::stun_filter::{self, Family, Verdict};
use crate::turn_quota::{AllocationQuota, AllocationSlot, OverQuota};

/// The channel table shared by the listener and every relay socket; each
/// relay is known by the socket that sends to its peers.
pub(crate) type Table = Arc<Mutex<ChannelTable<Arc<UdpSocket>>>>;

fn lock(table: &Table) -> std::sync::MutexGuard<'_, ChannelTable<Arc<UdpSocket>>> {
    // A panic while holding the table cannot leave it inconsistent in a way
    // that matters more than losing the relay: keep serving.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Allocate request a listener last handed the turn crate, for the
/// relay socket the crate asks for next (it handles one datagram of a
/// listener at a time; see `turn_quota`): who pays for it, and the family
/// of its relayed address. One per listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Admitted {
    pub username: String,
    pub family: Family,
}

pub(crate) type AdmittedSlot = Arc<Mutex<Option<Admitted>>>;

/// The family of an allocation's relayed address: the one the request asks
/// for (REQUESTED-ADDRESS-FAMILY, RFC 6156), else the client's own, as
/// coturn's `allocation-default-address-family=keep` (a client that reached
/// the server over IPv6 gets an IPv6 relay; IPv4 clients, and every client
/// that predates IPv6 here, an IPv4 one), else the one this server relays
/// in. `None`: the requested family is not served (440).
pub(crate) fn relay_family(
    requested: Option<Family>,
    client: Family,
    served: &[Family],
) -> Option<Family> {
    match requested {
        Some(family) => served.contains(&family).then_some(family),
        None if served.contains(&client) => Some(client),
        None => served.first().copied(),
    }
}

/// `addr` with an IPv4-mapped IPv6 address replaced by its IPv4 address.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A received batch and where each datagram goes: `fast[i]` is set when
/// datagram `i` was relayed here, `next` is the first not yet handed on.
struct Batches {
    rx: RecvBatch,
    out: SendBatch,
    next: usize,
    fast: [bool; BATCH],
}

impl Default for Batches {
    fn default() -> Self {
        Batches {
            rx: RecvBatch::default(),
            out: SendBatch::default(),
            next: 0,
            fast: [false; BATCH],
        }
    }
}

impl Batches {
    /// The next datagram of the batch that was not relayed here (it goes to
    /// the turn crate), with its sender; `None` once the batch is used up.
    fn next_slow(&mut self) -> Option<(SocketAddr, &[u8])> {
        while self.next < self.rx.len() {
            let i = self.next;
            self.next += 1;
            if self.fast[i] {
                continue;
            }
            if let Some(data) = self.rx.data(i) {
                return Some((canonical(self.rx.from(i)), data));
            }
        }
        None
    }
}

/// A relay socket that never talks to a denied peer.
pub(crate) struct FilteredConn {
    inner: Arc<UdpSocket>,
    policy: Arc<PeerPolicy>,
    metrics: Arc<Metrics>,
    /// The relayed address announced for this socket, its key in `table`.
    relayed: SocketAddr,
    table: Table,
    /// The listener, which ChannelData to the client leaves from.
    listener: Arc<UdpSocket>,
    batches: tokio::sync::Mutex<Batches>,
    /// Counts this allocation against its quotas until the socket closes.
    _slot: Option<AllocationSlot>,
}

impl FilteredConn {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        inner: Arc<UdpSocket>,
        relayed: SocketAddr,
        listener: Arc<UdpSocket>,
        table: Table,
        policy: Arc<PeerPolicy>,
        metrics: Arc<Metrics>,
        slot: Option<AllocationSlot>,
    ) -> FilteredConn {
        lock(&table).add_relay(relayed, Arc::clone(&inner));
        FilteredConn {
            inner,
            policy,
            metrics,
            relayed,
            table,
            listener,
            batches: tokio::sync::Mutex::new(Batches::default()),
            _slot: slot,
        }
    }

    fn deny(&self, addr: SocketAddr) -> bool {
        if self.policy.allows(addr.ip()) {
            false
        } else {
            self.metrics
                .turn_denied_peer
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %addr, "TURN relay to/from a denied address dropped");
            true
        }
    }

    /// Relays the batch's datagrams from bound peers to their client as
    /// ChannelData; marks them in `fast`.
    async fn relay_to_clients(&self, b: &mut Batches) {
        let now = Instant::now();
        let Batches { rx, out, fast, .. } = b;
        {
            let mut table = lock(&self.table);
            let mut relayed = 0;
            for (i, fast) in fast.iter_mut().enumerate().take(rx.len()) {
                *fast = false;
                let Some(data) = rx.data(i) else { continue };
                let from = canonical(rx.from(i));
                if let Some((client, channel)) = table.to_client(self.relayed, from, now) {
                    *fast = out.push(&channel_header(channel, data.len()), data, client);
                    relayed += u64::from(*fast);
                }
            }
            table.relayed_to_clients += relayed;
        }
        let failed = out.flush(&self.listener).await;
        if failed > 0 {
            tracing::debug!(failed, "ChannelData to clients refused by the kernel");
        }
    }
}

impl Drop for FilteredConn {
    fn drop(&mut self) {
        lock(&self.table).remove_relay(self.relayed);
    }
}

#[async_trait]
impl Conn for FilteredConn {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        if self.deny(addr) {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied).into());
        }
        Ok(self.inner.connect(addr).await?)
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let mut b = self.batches.lock().await;
        loop {
            while let Some((from, data)) = b.next_slow() {
                if data.len() > buf.len() || self.deny(from) {
                    continue;
                }
                buf[..data.len()].copy_from_slice(data);
                return Ok((data.len(), from));
            }
            b.next = 0;
            b.rx.recv(&self.inner).await?;
            self.relay_to_clients(&mut b).await;
        }
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.inner.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if self.deny(target) {
            // Dropped like a firewall would; an error would only make the
            // turn crate log and count it as a server fault.
            return Ok(buf.len());
        }
        Ok(self.inner.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.inner.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// The TURN listener socket, refusing requests that name a denied peer or
/// exceed a quota, and relaying ChannelData on live bindings itself.
pub(crate) struct FilteredListener {
    inner: Arc<UdpSocket>,
    policy: Arc<PeerPolicy>,
    metrics: Arc<Metrics>,
    quota: Arc<AllocationQuota>,
    table: Table,
    batches: tokio::sync::Mutex<Batches>,
    /// Shared with this listener's relay address generator.
    admitted: AdmittedSlot,
    /// The families the server relays in, IPv4 first.
    served: Vec<Family>,
}

impl FilteredListener {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        inner: Arc<UdpSocket>,
        table: Table,
        policy: Arc<PeerPolicy>,
        metrics: Arc<Metrics>,
        quota: Arc<AllocationQuota>,
        admitted: AdmittedSlot,
        served: Vec<Family>,
    ) -> FilteredListener {
        FilteredListener {
            inner,
            policy,
            metrics,
            quota,
            table,
            batches: tokio::sync::Mutex::new(Batches::default()),
            admitted,
            served,
        }
    }

    /// Checks an Allocate request from `client` against the families served
    /// and the quotas, and notes it for the relay socket it will ask for;
    /// `Some` is the error response to send instead of passing it on.
    fn admit(&self, packet: &[u8], client: SocketAddr) -> Option<Vec<u8>> {
        let request = stun_filter::allocate_request(packet)?;
        let Some(family) = relay_family(request.family, Family::of(client.ip()), &self.served)
        else {
            tracing::debug!(%client, "TURN allocation of a family not served");
            return Some(stun_filter::allocate_error(
                packet,
                440,
                b"Address Family not Supported",
            ));
        };
        let username = request.username.as_str();
        match self.quota.check(username) {
            Ok(()) => {
                *self.admitted.lock().unwrap_or_else(|e| e.into_inner()) = Some(Admitted {
                    username: request.username.clone(),
                    family,
                });
                None
            }
            Err(OverQuota::User) => {
                tracing::debug!(username, "TURN allocation over the per-user quota");
                Some(stun_filter::allocate_error(
                    packet,
                    486,
                    b"Allocation Quota Reached",
                ))
            }
            Err(OverQuota::Total) => {
                tracing::debug!(username, "TURN allocation over the total quota");
                Some(stun_filter::allocate_error(
                    packet,
                    508,
                    b"Insufficient Capacity",
                ))
            }
        }
    }

    /// `target` in the form the listener socket sends to: a dual-stack IPv6
    /// socket needs IPv4 peers as `::ffff:a.b.c.d`.
    fn wire_addr(&self, target: SocketAddr) -> SocketAddr {
        match (target.ip(), self.inner.local_addr()) {
            (IpAddr::V4(v4), Ok(local)) if local.is_ipv6() => {
                SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), target.port())
            }
            _ => target,
        }
    }

    /// Relays the batch's ChannelData on live bindings to the peers, one
    /// `sendmmsg` per run of datagrams through the same relay socket;
    /// marks them in `fast`.
    async fn relay_to_peers(&self, b: &mut Batches) {
        let now = Instant::now();
        let Batches { rx, out, fast, .. } = b;
        let mut i = 0;
        while i < rx.len() {
            // One run: consecutive datagrams through the same relay socket.
            let mut socket: Option<Arc<UdpSocket>> = None;
            {
                let mut table = lock(&self.table);
                let mut relayed = 0;
                while i < rx.len() {
                    fast[i] = false;
                    let Some(data) = rx.data(i) else {
                        i += 1;
                        continue;
                    };
                    let Some((channel, range)) = parse_channel_data(data) else {
                        i += 1;
                        continue;
                    };
                    let Some((relay, peer)) = table.to_peer(canonical(rx.from(i)), channel, now)
                    else {
                        i += 1;
                        continue;
                    };
                    match &socket {
                        Some(s) if !Arc::ptr_eq(s, relay) => break,
                        Some(_) => {}
                        None => socket = Some(Arc::clone(relay)),
                    }
                    fast[i] = out.push(&[], &data[range], peer);
                    relayed += u64::from(fast[i]);
                    i += 1;
                }
                table.relayed_to_peers += relayed;
            }
            if let Some(socket) = socket {
                let failed = out.flush(&socket).await;
                if failed > 0 {
                    tracing::debug!(failed, "ChannelData to peers refused by the kernel");
                }
            }
        }
    }
}

#[async_trait]
impl Conn for FilteredListener {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.inner.connect(addr).await?)
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let mut b = self.batches.lock().await;
        loop {
            while let Some((from, packet)) = b.next_slow() {
                match stun_filter::inspect(packet, &self.policy) {
                    Verdict::Pass => match self.admit(packet, from) {
                        None if packet.len() <= buf.len() => {
                            lock(&self.table).note_request(from, packet, Instant::now());
                            buf[..packet.len()].copy_from_slice(packet);
                            return Ok((packet.len(), from));
                        }
                        None => {}
                        Some(response) => {
                            let _ = self.inner.send_to(&response, self.wire_addr(from)).await;
                        }
                    },
                    Verdict::Refuse(response) => {
                        self.metrics
                            .turn_denied_peer
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(client = %from, "TURN request for a denied or malformed peer refused");
                        let _ = self.inner.send_to(&response, self.wire_addr(from)).await;
                    }
                    Verdict::Drop => {
                        self.metrics
                            .turn_denied_peer
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            b.next = 0;
            b.rx.recv(&self.inner).await?;
            self.relay_to_peers(&mut b).await;
        }
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.inner.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if buf.first().is_some_and(|b| b & 0xc0 == 0) {
            lock(&self.table).note_response(canonical(target), buf, Instant::now());
        }
        Ok(self.inner.send_to(buf, self.wire_addr(target)).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.inner.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}
