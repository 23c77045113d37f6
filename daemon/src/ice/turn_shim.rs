//! The TURN shim: webrtc-ice's TURN clients talk to the TURN server through
//! sockets the daemon owns, so relayed WireGuard skips the agent.
//!
//! ```text
//!  webrtc-ice TURN client ──loopback──▶ listener (one per TURN server)
//!   (auth, Allocate, Refresh,             │ a session per client socket:
//!    CreatePermission, ChannelBind)       ▼
//!                                      upstream socket ──UDP──▶ TURN server
//!  ◀──loopback── STUN, Data indications, ◀─┤ (GRO)
//!                ChannelData not fast      │
//!  DataPlane::arrive(IceConn(peer)) ◀──────┘ ChannelData from a fast peer
//!  RelayedConn::send ──ChannelData──▶ upstream socket (no agent, no TURN client)
//! ```
//!
//! The allocation, its permissions and channel bindings stay the TURN
//! client's: it makes and refreshes them as before, over the shim. The
//! relay candidate ICE signals and checks is that allocation's relayed
//! address, and relayed data leaves from the same allocation, so the peer's
//! NAT sees one address either way. [`super::turn_channels`] learns the
//! bindings from the client's requests and the server's answers; a peer is
//! *fast* once ICE selected a pair with this allocation as the local
//! candidate ([`super::turn_conn`]). STUN inside ChannelData (ICE checks
//! and consent) always goes to the client, so ICE keeps seeing its checks.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, MsgFlags, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::turn_channels::{channel_header, parse_channel_data, Channels, Noted};
use crate::dataplane::udp_batch;
use crate::dataplane::{DataPlane, Origin, RxScratch, BUF_SIZE, MAX_BATCH};
use overlay_proto::NodeId;

/// Client sockets (TURN sessions) one shim serves; beyond, new ones are
/// ignored and their relay gathering times out.
const MAX_SESSIONS: usize = 256;
/// A session whose client sent nothing for this long is gone (the client
/// refreshes its allocation and permissions every few minutes).
const SESSION_IDLE: Duration = Duration::from_secs(900);
/// How often idle sessions are looked for.
const SWEEP: Duration = Duration::from_secs(60);
/// One read's room: a GRO run of up to 64 KiB.
const READ_BYTES: usize = 65_536;
/// Reads drained from the upstream socket per wake-up, and their room.
const MAX_READS: usize = 64;
const DRAIN_BYTES: usize = 8 * READ_BYTES;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
pub struct TurnShim {
    /// Loopback addresses by upstream server (`host:port`), and whether the
    /// server answers.
    listeners: Mutex<HashMap<String, (SocketAddr, Arc<Health>)>>,
    /// Sessions by their allocation's relayed address.
    relayed: Mutex<HashMap<SocketAddr, Weak<Session>>>,
    dataplane: OnceLock<Arc<DataPlane>>,
}

impl TurnShim {
    /// Gives the shim the data plane fast datagrams go to.
    pub fn attach(&self, dataplane: Arc<DataPlane>) {
        let _ = self.dataplane.set(dataplane);
    }

    /// The loopback address that stands for the TURN server `host:port`
    /// (an IPv6 host without brackets, as a URL's host is), starting its
    /// listener on first use. Must run inside the runtime.
    pub fn local_for(self: &Arc<Self>, host: &str, port: u16) -> std::io::Result<SocketAddr> {
        let server = super::host_port(host, port);
        let mut listeners = lock(&self.listeners);
        if let Some((addr, _)) = listeners.get(&server) {
            return Ok(*addr);
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let addr = socket.local_addr()?;
        let health = Arc::new(Health::default());
        listeners.insert(server.clone(), (addr, Arc::clone(&health)));
        tokio::spawn(Arc::clone(self).listen(socket, server, health));
        Ok(addr)
    }

    /// Whether the TURN server `server` (`host:port`) was sent something
    /// [`SILENT_AFTER`] ago or longer and has not answered since.
    pub fn silent(&self, server: &str) -> bool {
        lock(&self.listeners)
            .get(server)
            .is_some_and(|(_, h)| h.silent(Instant::now()))
    }

    /// The session whose allocation has the relayed address `relayed`.
    pub fn session(&self, relayed: SocketAddr) -> Option<Arc<Session>> {
        lock(&self.relayed).get(&relayed).and_then(Weak::upgrade)
    }

    /// Reads the clients' datagrams for `server` and passes them on, from
    /// one upstream socket per client socket.
    async fn listen(
        self: Arc<Self>,
        loopback: Arc<UdpSocket>,
        server: String,
        health: Arc<Health>,
    ) {
        let mut sessions: HashMap<SocketAddr, Arc<Session>> = HashMap::new();
        let mut buf = vec![0u8; BUF_SIZE];
        let mut sweep = tokio::time::interval(SWEEP);
        let mut resolved: Option<SocketAddr> = None;
        // Set once sending to the server's IPv4 address failed (a host
        // without IPv4): its IPv6 address is used from then on.
        let mut no_ipv4 = false;
        loop {
            let (n, from) = tokio::select! {
                r = loopback.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!("TURN shim for {server} stopped: {e}");
                        return;
                    }
                },
                _ = sweep.tick() => {
                    let now = Instant::now();
                    sessions.retain(|_, s| {
                        let keep = !s.cancel.is_cancelled() && now.duration_since(*lock(&s.last_client)) < SESSION_IDLE;
                        if !keep { s.cancel.cancel(); }
                        keep
                    });
                    continue;
                }
            };
            let session = match sessions.get(&from) {
                Some(s) if !s.cancel.is_cancelled() => Arc::clone(s),
                _ => {
                    if resolved.is_none() {
                        resolved = tokio::net::lookup_host(&server)
                            .await
                            .ok()
                            .and_then(|addrs| pick_addr(addrs, no_ipv4));
                    }
                    let Some(server_addr) = resolved else {
                        tracing::debug!("TURN shim: cannot resolve {server}");
                        continue;
                    };
                    sessions.retain(|_, s| !s.cancel.is_cancelled());
                    if sessions.len() >= MAX_SESSIONS {
                        tracing::debug!("TURN shim: {MAX_SESSIONS} sessions, a new one ignored");
                        continue;
                    }
                    match self.open(&loopback, from, server_addr, &health).await {
                        Ok(s) => {
                            sessions.insert(from, Arc::clone(&s));
                            s
                        }
                        Err(e) => {
                            tracing::debug!("TURN shim: no upstream socket: {e}");
                            continue;
                        }
                    }
                }
            };
            let datagram = &buf[..n];
            let now = Instant::now();
            *lock(&session.last_client) = now;
            lock(&session.channels).note_client(datagram);
            health.sent(now);
            if let Err(e) = session.upstream.send_to(datagram, session.server).await {
                if session.server.is_ipv4() && !no_ipv4 {
                    // No IPv4 here (an IPv6-only site): the next datagram
                    // of the client opens a session to the IPv6 address.
                    tracing::debug!("TURN shim: {server} over IPv4: {e}; trying IPv6");
                    no_ipv4 = true;
                    resolved = None;
                    session.cancel.cancel();
                }
            }
        }
    }

    async fn open(
        self: &Arc<Self>,
        loopback: &Arc<UdpSocket>,
        client: SocketAddr,
        server: SocketAddr,
        health: &Arc<Health>,
    ) -> std::io::Result<Arc<Session>> {
        // The server's family: a TURN server reached over IPv6 still relays
        // to IPv4 peers (its allocations are IPv4), which is how an IPv6-only
        // site reaches an IPv4-only one.
        let any: SocketAddr = match server {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let upstream = UdpSocket::bind(any).await?;
        udp_batch::grow_buffers(&upstream);
        udp_batch::enable_gro(&upstream);
        let session = Arc::new(Session {
            client,
            server,
            upstream,
            loopback: Arc::clone(loopback),
            channels: Mutex::default(),
            last_client: Mutex::new(Instant::now()),
            cancel: CancellationToken::new(),
            health: Arc::clone(health),
        });
        tokio::spawn(Arc::clone(self).read_upstream(Arc::clone(&session)));
        Ok(session)
    }

    /// The server's datagrams to one session: fast ChannelData to the data
    /// plane in runs, everything else to the client.
    async fn read_upstream(self: Arc<Self>, s: Arc<Session>) {
        let mut buf = vec![0u8; DRAIN_BYTES];
        let mut rx = RxScratch::default();
        let mut relayed = None;
        let mut reads = [(0usize, 0usize, None::<usize>); MAX_READS];
        loop {
            // One waiting read, then whatever else is queued, without waiting.
            let first = tokio::select! {
                _ = s.cancel.cancelled() => break,
                r = udp_batch::recv_coalesced(&s.upstream, &mut buf[..READ_BYTES]) => r,
            };
            let (from, n, segment) = match first {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("TURN shim upstream: {e}");
                    break;
                }
            };
            let mut count = 0;
            let mut end = 0;
            if from == s.server {
                s.health.answered();
                reads[0] = (0, n, segment);
                count = 1;
                end = n;
            }
            while count < MAX_READS && end + READ_BYTES <= buf.len() {
                match udp_batch::try_recv_coalesced(&s.upstream, &mut buf[end..end + READ_BYTES]) {
                    Ok((from, n, segment)) if from == s.server => {
                        reads[count] = (end, n, segment);
                        count += 1;
                        end += n;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            let mut fast: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
            let mut queued = 0;
            let mut node = None;
            for &(start, n, segment) in &reads[..count] {
                for datagram in udp_batch::segments(&buf[start..start + n], segment) {
                    let to_node = {
                        let channels = lock(&s.channels);
                        parse_channel_data(datagram).and_then(|(channel, range)| {
                            let data = &datagram[range];
                            let target = channels.fast_node(channel, now)?;
                            (!stun::message::is_message(data)).then_some((target, data))
                        })
                    };
                    let Some((target, data)) = to_node else {
                        self.to_client(&s, datagram, now, &mut relayed).await;
                        continue;
                    };
                    if queued == MAX_BATCH || node.is_some_and(|n| n != target) {
                        self.deliver(node, &fast[..queued], &mut rx).await;
                        queued = 0;
                    }
                    node = Some(target);
                    fast[queued] = data;
                    queued += 1;
                }
            }
            self.deliver(node, &fast[..queued], &mut rx).await;
        }
        if let Some(addr) = relayed {
            lock(&self.relayed).remove(&addr);
        }
    }

    /// Relayed WireGuard for `node`, into the data plane.
    async fn deliver(&self, node: Option<NodeId>, datagrams: &[&[u8]], rx: &mut RxScratch) {
        if let (Some(node), Some(dp), false) = (node, self.dataplane.get(), datagrams.is_empty()) {
            dp.arrive(Origin::IceConn(node), datagrams, rx).await;
        }
    }

    /// A datagram from the server that is the TURN client's business.
    async fn to_client(
        &self,
        s: &Arc<Session>,
        datagram: &[u8],
        now: Instant,
        relayed: &mut Option<SocketAddr>,
    ) {
        match lock(&s.channels).note_server(datagram, now) {
            Noted::Relayed(addr) => {
                lock(&self.relayed).insert(addr, Arc::downgrade(s));
                *relayed = Some(addr);
            }
            Noted::Released => s.cancel.cancel(),
            Noted::Nothing => {}
        }
        let _ = s.loopback.send_to(datagram, s.client).await;
    }
}

/// The address to reach a server at: IPv4 when it has one (what every
/// deployment so far used), else IPv6; IPv6 first once IPv4 failed here.
fn pick_addr(addrs: impl Iterator<Item = SocketAddr>, no_ipv4: bool) -> Option<SocketAddr> {
    let addrs: Vec<SocketAddr> = addrs.collect();
    let preferred = addrs.iter().find(|a| a.is_ipv4() != no_ipv4);
    preferred.or(addrs.first()).copied()
}

/// How long a TURN server may leave what it was sent unanswered before the
/// next ICE session passes it over for the next one of its family.
pub const SILENT_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a TURN server answers: the oldest datagram sent since its last
/// answer.
#[derive(Default)]
pub struct Health {
    waiting_since: Mutex<Option<Instant>>,
}

impl Health {
    fn sent(&self, now: Instant) {
        lock(&self.waiting_since).get_or_insert(now);
    }

    fn answered(&self) {
        *lock(&self.waiting_since) = None;
    }

    fn silent(&self, now: Instant) -> bool {
        lock(&self.waiting_since).is_some_and(|since| now.duration_since(since) >= SILENT_AFTER)
    }
}

/// One TURN client socket's way to its server.
pub struct Session {
    client: SocketAddr,
    server: SocketAddr,
    upstream: UdpSocket,
    loopback: Arc<UdpSocket>,
    channels: Mutex<Channels>,
    last_client: Mutex<Instant>,
    /// The server's answers, shared by every session to it.
    health: Arc<Health>,
    cancel: CancellationToken,
}

impl Session {
    /// Sends `node`'s datagrams from `peer` straight to the data plane, or
    /// stops (`None`).
    pub fn set_fast(&self, peer: SocketAddr, node: Option<NodeId>) {
        lock(&self.channels).set_fast(peer, node);
    }

    /// Sends `datagram` to `peer` as ChannelData, when a channel is bound;
    /// false when there is none (the caller takes the TURN client's way).
    pub async fn send(&self, peer: SocketAddr, datagram: &[u8]) -> bool {
        let Some(channel) = lock(&self.channels).channel_for(peer, Instant::now()) else {
            return false;
        };
        let header = channel_header(channel, datagram.len());
        let to = SockaddrStorage::from(self.server);
        let parts = [IoSlice::new(&header), IoSlice::new(datagram)];
        let _ = self
            .upstream
            .async_io(Interest::WRITABLE, || {
                sendmsg(
                    self.upstream.as_raw_fd(),
                    &parts,
                    &[],
                    MsgFlags::empty(),
                    Some(&to),
                )
                .map_err(std::io::Error::from)
            })
            .await;
        true
    }

    /// Sends a run of datagrams to `peer` as ChannelData (a header iovec in
    /// front of each, no copy) in one GSO send when a channel is bound;
    /// false when there is none.
    pub async fn send_run(&self, peer: SocketAddr, datagrams: &[&[u8]]) -> bool {
        let Some(channel) = lock(&self.channels).channel_for(peer, Instant::now()) else {
            return false;
        };
        let mut headers = [[0u8; 4]; udp_batch::MAX_SEGMENTS];
        for chunk in datagrams.chunks(udp_batch::MAX_SEGMENTS) {
            for (header, datagram) in headers.iter_mut().zip(chunk) {
                *header = channel_header(channel, datagram.len());
            }
            let headers = &headers[..chunk.len()];
            if let Err(e) =
                udp_batch::send_prefixed(&self.upstream, self.server, headers, chunk).await
            {
                tracing::debug!("TURN shim: ChannelData run to {}: {e}", self.server);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::message::{
        CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_CHANNEL_BIND,
    };
    use turn::proto::channum::ChannelNumber;
    use turn::proto::peeraddr::PeerAddress;
    use turn::proto::relayaddr::RelayedAddress;

    use crate::ice::turn_channels::tests::message as stun;

    #[test]
    fn a_server_is_silent_once_it_leaves_a_datagram_unanswered_long_enough() {
        let h = Health::default();
        let t0 = Instant::now();
        assert!(!h.silent(t0 + SILENT_AFTER * 2), "never asked");
        h.sent(t0);
        h.sent(t0 + SILENT_AFTER / 2);
        assert!(!h.silent(t0 + SILENT_AFTER / 2));
        assert!(
            h.silent(t0 + SILENT_AFTER),
            "counted from the oldest unanswered"
        );
        h.answered();
        assert!(!h.silent(t0 + SILENT_AFTER * 3));
    }

    #[test]
    fn ipv4_is_preferred_until_it_failed_here() {
        let v4: SocketAddr = "203.0.113.1:3478".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        assert_eq!(pick_addr([v6, v4].into_iter(), false), Some(v4));
        assert_eq!(pick_addr([v4, v6].into_iter(), true), Some(v6));
        assert_eq!(pick_addr([v4].into_iter(), true), Some(v4));
        assert_eq!(pick_addr([v6].into_iter(), false), Some(v6));
        assert_eq!(pick_addr(std::iter::empty(), false), None);
    }

    async fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
            .await
            .expect("a datagram")
            .unwrap();
        (buf[..n].to_vec(), from)
    }

    #[tokio::test]
    async fn the_shim_forwards_both_ways_and_sends_channel_data_once_bound() {
        forwards_both_ways("127.0.0.1").await;
    }

    #[tokio::test]
    async fn the_shim_reaches_a_turn_server_over_ipv6() {
        forwards_both_ways("::1").await;
    }

    /// The shim's whole conversation with a TURN server at `host` (written
    /// as in a URL's host: IPv6 without brackets).
    async fn forwards_both_ways(host: &str) {
        let ip: std::net::IpAddr = host.parse().unwrap();
        let server = UdpSocket::bind((ip, 0)).await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let shim = Arc::new(TurnShim::default());
        let local = shim
            .local_for(host, server_addr.port())
            .expect("a loopback listener");
        assert_eq!(
            shim.local_for(host, server_addr.port()).unwrap(),
            local,
            "one listener per server"
        );
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();

        // Allocate: through the shim and back, and the session is known by
        // its relayed address.
        let relayed: SocketAddr = "203.0.113.1:50000".parse().unwrap();
        let request = stun(METHOD_ALLOCATE, CLASS_REQUEST, 1, vec![]);
        client.send_to(&request, local).await.unwrap();
        let (got, upstream) = recv(&server).await;
        assert_eq!(got, request);
        assert_ne!(
            upstream,
            client.local_addr().unwrap(),
            "from the shim's own socket"
        );
        let answer = stun(
            METHOD_ALLOCATE,
            CLASS_SUCCESS_RESPONSE,
            1,
            vec![Box::new(RelayedAddress {
                ip: relayed.ip(),
                port: relayed.port(),
            })],
        );
        server.send_to(&answer, upstream).await.unwrap();
        assert_eq!(recv(&client).await, (answer, local));
        let session = shim
            .session(relayed)
            .expect("the session of that allocation");

        // No channel yet: the caller must take the client's way.
        let peer: SocketAddr = "198.51.100.9:4000".parse().unwrap();
        assert!(!session.send(peer, b"wireguard").await);
        assert!(!session.send_run(peer, &[b"wireguard"]).await);

        let bind = stun(
            METHOD_CHANNEL_BIND,
            CLASS_REQUEST,
            2,
            vec![
                Box::new(ChannelNumber(0x4005)),
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
            ],
        );
        client.send_to(&bind, local).await.unwrap();
        assert_eq!(recv(&server).await.0, bind);
        let bound = stun(METHOD_CHANNEL_BIND, CLASS_SUCCESS_RESPONSE, 2, vec![]);
        server.send_to(&bound, upstream).await.unwrap();
        assert_eq!(recv(&client).await.0, bound);

        assert!(session.send(peer, b"wireguard").await);
        let (frame, from) = recv(&server).await;
        assert_eq!(from, upstream);
        assert_eq!(&frame[..4], &channel_header(0x4005, 9));
        assert_eq!(&frame[4..], b"wireguard");

        // A run: one ChannelData datagram each, in order.
        let run: [&[u8]; 3] = [&[1; 32], &[2; 32], &[3; 16]];
        assert!(session.send_run(peer, &run).await);
        for datagram in run {
            let (got, _) = recv(&server).await;
            assert_eq!(&got[..4], &channel_header(0x4005, datagram.len()));
            assert_eq!(&got[4..], datagram);
        }

        // Without a data plane or a fast peer, ChannelData goes to the client.
        server.send_to(&frame, upstream).await.unwrap();
        assert_eq!(recv(&client).await.0, frame);
    }
}
