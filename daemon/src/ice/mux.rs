//! One UDP socket for every peer, shared by ICE and WireGuard.
//!
//! ```text
//!                       ┌─ STUN binding request ── by USERNAME ufrag ─▶ that peer's ICE agent
//!   UDP socket ──recv──┼─ other STUN ──────────── by sender address ──▶ the agent that last sent there
//!                       ├─ WireGuard from a peer's selected endpoint ───▶ data plane (no copy, no agent)
//!                       └─ WireGuard from elsewhere ── by address ─────▶ agent (its Conn; rare)
//! ```
//!
//! webrtc-ice's own connection object costs an async mutex and two copies per
//! datagram; here WireGuard goes straight between the socket and the data plane,
//! and ICE only sees STUN. webrtc-ice gathers no server-reflexive candidates on a
//! mux, so [`Mux::reflexive_addr`] asks STUN itself from this socket and the engine
//! signals the answer as our srflx candidate.
//!
//! The socket is dual-stack (`[::]:port`, IPv4 arrives as `::ffff:a.b.c.d`)
//! where the host has IPv6, else IPv4 only. One socket rather than one per
//! family: webrtc-ice gives an agent one conn for all its host candidates
//! anyway, the data plane keeps one send path, and a peer's endpoint is one
//! `SocketAddr` of either family. Addresses are normalised where they are read
//! (`udp_batch`), so nothing past this module ever sees a mapped address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use stun::attributes::ATTR_USERNAME;
use stun::message::{Getter, Message, BINDING_REQUEST, BINDING_SUCCESS};
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use webrtc_ice::udp_mux::UDPMux;
use webrtc_util::Conn;

use super::inbox::Inbox;
use super::turn_shim::TurnShim;
use crate::dataplane::udp_batch;
use crate::dataplane::{DataPlane, Origin, RxScratch, BUF_SIZE, MAX_BATCH};

/// How long a STUN server may take to answer our srflx probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

type TransactionId = [u8; 12];

pub struct Mux {
    socket: Arc<UdpSocket>,
    local_addr: SocketAddr,
    /// The agent conn of each ICE session, by its local ufrag.
    conns: Mutex<HashMap<String, Arc<MuxConn>>>,
    /// Which agent last sent to an address: where answers from there go.
    by_addr: Mutex<HashMap<SocketAddr, Weak<MuxConn>>>,
    /// Our own srflx probes waiting for their Binding success.
    probes: Mutex<HashMap<TransactionId, oneshot::Sender<SocketAddr>>>,
    /// The sockets relayed (TURN) data takes; see `turn_shim`.
    turn: Arc<TurnShim>,
}

impl Mux {
    /// Binds the shared socket: dual-stack when the host has IPv6, else IPv4.
    pub async fn bind() -> std::io::Result<Arc<Mux>> {
        let socket = match udp_batch::bind_dual_stack(0) {
            Ok(socket) => UdpSocket::from_std(socket)?,
            Err(e) => {
                tracing::info!("no IPv6 socket ({e}); peers are reached over IPv4 only");
                UdpSocket::bind("0.0.0.0:0").await?
            }
        };
        Self::on(socket)
    }

    /// A mux on `socket`: dual-stack or IPv4.
    fn on(socket: UdpSocket) -> std::io::Result<Arc<Mux>> {
        let local_addr = socket.local_addr()?;
        udp_batch::grow_buffers(&socket);
        if !udp_batch::enable_gro(&socket) {
            tracing::debug!("UDP GRO unavailable; one datagram per read");
        }
        Ok(Arc::new(Mux {
            socket: Arc::new(socket),
            local_addr,
            conns: Mutex::default(),
            by_addr: Mutex::default(),
            probes: Mutex::default(),
            turn: Arc::default(),
        }))
    }

    pub fn turn_shim(&self) -> Arc<TurnShim> {
        Arc::clone(&self.turn)
    }

    pub fn socket(&self) -> Arc<UdpSocket> {
        self.socket.clone()
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// Whether the socket reaches IPv6 peers (it is dual-stack).
    pub fn ipv6(&self) -> bool {
        self.local_addr.is_ipv6()
    }

    /// Reads the socket until it fails; see the module diagram.
    pub async fn run(self: Arc<Self>, dataplane: Arc<DataPlane>) -> std::io::Result<()> {
        self.turn.attach(Arc::clone(&dataplane));
        let mut buf = vec![0u8; BUF_SIZE];
        let mut rx = RxScratch::default();
        loop {
            let (from, n, segment) = udp_batch::recv_coalesced(&self.socket, &mut buf).await?;
            // With GRO, one read is a run of datagrams from one sender. STUN goes
            // to ICE; the rest to the data plane, or to an agent when the sender
            // is no peer's endpoint (ICE's own traffic before a pair is chosen).
            // Collected on the stack: nothing is allocated per read.
            let mut wireguard: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
            let mut count = 0;
            let mut total = 0;
            for datagram in udp_batch::segments(&buf[..n], segment) {
                total += 1;
                if stun::message::is_message(datagram) {
                    self.route_stun(datagram, from);
                    continue;
                }
                wireguard[count] = datagram;
                count += 1;
                if count == MAX_BATCH {
                    self.deliver(&dataplane, from, &wireguard, &mut rx).await;
                    count = 0;
                }
            }
            dataplane.counters.udp_reads.observe(total);
            if count > 0 {
                self.deliver(&dataplane, from, &wireguard[..count], &mut rx)
                    .await;
            }
        }
    }

    /// Non-STUN datagrams from `from`: the data plane's when `from` is a peer's
    /// endpoint, else the agent's that last sent there.
    async fn deliver(
        &self,
        dataplane: &DataPlane,
        from: SocketAddr,
        datagrams: &[&[u8]],
        rx: &mut RxScratch,
    ) {
        if dataplane.arrive(Origin::Udp(from), datagrams, rx).await {
            return;
        }
        if let Some(conn) = self.agent_for(from) {
            for datagram in datagrams {
                conn.deliver(datagram, from);
            }
        }
    }

    fn agent_for(&self, addr: SocketAddr) -> Option<Arc<MuxConn>> {
        lock(&self.by_addr).get(&addr).and_then(Weak::upgrade)
    }

    fn route_stun(&self, datagram: &[u8], from: SocketAddr) {
        let mut msg = Message::new();
        if msg.unmarshal_binary(datagram).is_err() {
            return;
        }
        if msg.typ == BINDING_SUCCESS {
            if let Some(waiter) = lock(&self.probes).remove(&msg.transaction_id.0) {
                let mut mapped = XorMappedAddress::default();
                if mapped.get_from(&msg).is_ok() {
                    let mapped = udp_batch::normalise(SocketAddr::new(mapped.ip, mapped.port));
                    let _ = waiter.send(mapped);
                }
                return;
            }
        }
        let target = if msg.typ == BINDING_REQUEST {
            // USERNAME is "<receiver ufrag>:<sender ufrag>": the receiver is ours.
            msg.get(ATTR_USERNAME).ok().and_then(|username| {
                let username = String::from_utf8(username).ok()?;
                let ufrag = username.split(':').next()?;
                lock(&self.conns).get(ufrag).cloned()
            })
        } else {
            self.agent_for(from)
        };
        if let Some(conn) = target {
            conn.deliver(datagram, from);
        }
    }

    /// What [`Self::run`] does with STUN, without a data plane: for tests of
    /// ICE itself.
    /// A mux on an IPv4 socket, as on a host without IPv6: for tests.
    #[cfg(test)]
    pub(crate) async fn bind_ipv4() -> std::io::Result<Arc<Mux>> {
        Self::on(UdpSocket::bind("0.0.0.0:0").await?)
    }

    #[cfg(test)]
    pub(crate) async fn serve_stun(self: Arc<Self>) {
        let mut buf = vec![0u8; BUF_SIZE];
        while let Ok((from, n, segment)) = udp_batch::recv_coalesced(&self.socket, &mut buf).await {
            for datagram in udp_batch::segments(&buf[..n], segment) {
                if stun::message::is_message(datagram) {
                    self.route_stun(datagram, from);
                }
            }
        }
    }

    /// Our address and port as the STUN server `server` sees this socket.
    pub async fn reflexive_addr(&self, server: SocketAddr) -> Option<SocketAddr> {
        let mut msg = Message::new();
        msg.new_transaction_id().ok()?;
        msg.set_type(BINDING_REQUEST);
        msg.write_header();
        let (tx, rx) = oneshot::channel();
        lock(&self.probes).insert(msg.transaction_id.0, tx);
        let answer = async {
            self.socket.send_to(&msg.raw, server).await.ok()?;
            tokio::time::timeout(PROBE_TIMEOUT, rx).await.ok()?.ok()
        }
        .await;
        lock(&self.probes).remove(&msg.transaction_id.0);
        answer
    }
}

#[async_trait]
impl UDPMux for Mux {
    async fn close(&self) -> Result<(), webrtc_util::Error> {
        Ok(())
    }

    async fn get_conn(
        self: Arc<Self>,
        ufrag: &str,
    ) -> Result<Arc<dyn Conn + Send + Sync>, webrtc_util::Error> {
        let mut conns = lock(&self.conns);
        if let Some(conn) = conns.get(ufrag) {
            return Ok(conn.clone());
        }
        let conn = Arc::new(MuxConn {
            mux: Arc::downgrade(&self),
            socket: self.socket.clone(),
            local_addr: self.local_addr,
            inbox: Inbox::default(),
            closed: CancellationToken::new(),
        });
        conns.insert(ufrag.to_owned(), conn.clone());
        Ok(conn)
    }

    async fn remove_conn_by_ufrag(&self, ufrag: &str) {
        let removed = lock(&self.conns).remove(ufrag);
        if let Some(conn) = removed {
            lock(&self.by_addr).retain(|_, c| !std::ptr::eq(c.as_ptr(), Arc::as_ptr(&conn)));
        }
    }
}

/// One ICE agent's view of the shared socket.
pub struct MuxConn {
    mux: Weak<Mux>,
    socket: Arc<UdpSocket>,
    local_addr: SocketAddr,
    /// Every host candidate of the agent reads this one conn, each all of it.
    inbox: Inbox,
    /// Closing must not wait for a read another candidate's task is in, or
    /// `Agent::close` never finishes on a machine with several addresses.
    closed: CancellationToken,
}

impl MuxConn {
    fn deliver(&self, datagram: &[u8], from: SocketAddr) {
        self.inbox
            .deliver(datagram, from, std::time::Instant::now());
    }
}

#[async_trait]
impl Conn for MuxConn {
    async fn connect(&self, _addr: SocketAddr) -> Result<(), webrtc_util::Error> {
        Err(webrtc_util::Error::Other(
            "a mux conn is not connected".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> Result<usize, webrtc_util::Error> {
        self.recv_from(buf).await.map(|(n, _)| n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), webrtc_util::Error> {
        let next = tokio::select! {
            _ = self.closed.cancelled() => None,
            next = self.inbox.recv() => Some(next),
        };
        match next {
            Some((datagram, from)) => {
                let n = datagram.len().min(buf.len());
                buf[..n].copy_from_slice(&datagram[..n]);
                Ok((n, from))
            }
            None => Err(webrtc_util::Error::Other("mux conn closed".into())),
        }
    }

    async fn send(&self, _buf: &[u8]) -> Result<usize, webrtc_util::Error> {
        Err(webrtc_util::Error::Other(
            "a mux conn needs a destination".into(),
        ))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> Result<usize, webrtc_util::Error> {
        if let Some(mux) = self.mux.upgrade() {
            let me = lock(&mux.conns)
                .values()
                .find(|c| std::ptr::eq(Arc::as_ptr(c), self))
                .cloned();
            if let Some(me) = me {
                lock(&mux.by_addr).insert(target, Arc::downgrade(&me));
            }
        }
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> Result<SocketAddr, webrtc_util::Error> {
        Ok(self.local_addr)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> Result<(), webrtc_util::Error> {
        self.closed.cancel();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Locks one of the mux's tables, ignoring poisoning: a panicking holder cannot
/// leave a routing table half-updated in a way that matters.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `ip` is one of this host's own addresses: then STUN saw us without a
/// NAT and an srflx candidate would only repeat a host candidate (the usual
/// case for IPv6, which has no NAT).
pub fn is_local_ip(ip: IpAddr) -> bool {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            let v4 = a.as_sockaddr_in().map(|sin| IpAddr::V4(sin.ip()));
            v4.or_else(|| a.as_sockaddr_in6().map(|sin6| IpAddr::V6(sin6.ip())))
        })
        .any(|local| local == ip)
}

/// An srflx candidate line for our mux socket seen as `mapped` from outside.
pub fn srflx_candidate(mapped: SocketAddr, local_port: u16) -> String {
    // RFC 8445 priority: type preference 100 (srflx), local preference 65535,
    // component 1.
    let priority: u32 = (100 << 24) | (65_535 << 8) | (256 - 1);
    let base = match mapped {
        SocketAddr::V4(_) => "0.0.0.0",
        SocketAddr::V6(_) => "::",
    };
    format!(
        "ovlsrflx 1 udp {priority} {} {} typ srflx raddr {base} rport {local_port}",
        mapped.ip(),
        mapped.port()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::message::Setter;
    use webrtc_ice::candidate::candidate_base::unmarshal_candidate;
    use webrtc_ice::candidate::{Candidate, CandidateType};

    #[test]
    fn srflx_candidate_parses_as_one() {
        let line = srflx_candidate("203.0.113.7:40000".parse().unwrap(), 5555);
        let c = unmarshal_candidate(&line).unwrap();
        assert_eq!(c.candidate_type(), CandidateType::ServerReflexive);
        assert_eq!((c.address().as_str(), c.port()), ("203.0.113.7", 40000));

        let line = srflx_candidate("[2001:db8::7]:40000".parse().unwrap(), 5555);
        let c = unmarshal_candidate(&line).unwrap();
        assert_eq!(c.candidate_type(), CandidateType::ServerReflexive);
        assert_eq!(
            c.network_type(),
            webrtc_ice::network_type::NetworkType::Udp6
        );
        assert_eq!((c.address().as_str(), c.port()), ("2001:db8::7", 40000));
    }

    #[tokio::test]
    async fn the_shared_socket_is_dual_stack_and_probes_stun_of_either_family() {
        let mux = Mux::bind().await.unwrap();
        assert!(mux.ipv6(), "the test host has IPv6");
        for ip in [
            std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::Ipv6Addr::LOCALHOST.into(),
        ] {
            let (server, answer) = crate::ice::test_stun_server(ip).await;
            let run = tokio::spawn(mux.clone().serve_stun());
            let seen = mux.reflexive_addr(server).await;
            run.abort();
            answer.abort();
            let seen = seen.expect("an answer");
            assert_eq!(seen.ip(), server.ip(), "IPv4 is named plainly, not ::ffff:");
            assert_eq!(seen.port(), mux.port());
        }
    }

    #[tokio::test]
    async fn binding_requests_reach_the_agent_named_in_username_and_answers_return() {
        let mux = Mux::bind().await.unwrap();
        let a = mux.clone().get_conn("ufragA").await.unwrap();
        let _b = mux.clone().get_conn("ufragB").await.unwrap();

        let mut req = Message::new();
        req.new_transaction_id().unwrap();
        req.set_type(BINDING_REQUEST);
        req.write_header();
        stun::textattrs::TextAttribute::new(ATTR_USERNAME, "ufragA:remote".into())
            .add_to(&mut req)
            .unwrap();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        mux.route_stun(&req.raw, from);
        let mut buf = [0u8; 1500];
        let (n, src) = tokio::time::timeout(Duration::from_secs(1), a.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((&buf[..n], src), (req.raw.as_slice(), from));

        // After `a` sent to an address, a response from there goes to `a`.
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = peer.local_addr().unwrap();
        a.send_to(b"x", peer_addr).await.unwrap();
        let mut resp = Message::new();
        resp.new_transaction_id().unwrap();
        resp.set_type(BINDING_SUCCESS);
        resp.write_header();
        mux.route_stun(&resp.raw, peer_addr);
        let (n, _) = tokio::time::timeout(Duration::from_secs(1), a.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], resp.raw.as_slice());
    }
}
