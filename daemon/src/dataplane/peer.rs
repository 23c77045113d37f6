//! One remote node as the data plane sees it: its WireGuard session, the ICE
//! connection packets currently take (if any), and counters.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};
use overlay_proto::coord::PeerInfo;
use overlay_proto::NodeId;
use webrtc_util::Conn;

use super::filter::PeerFilter;
use crate::node::access::PeerAccess;
use crate::node::PathView;
use crate::seal::Sealer;

/// Keeps NAT mappings and quiet paths alive (the interval WireGuard users
/// know). The data plane sends these itself, not boringtun: `Tunn` takes its
/// persistent keepalive only when it is created, and an idle peer (see
/// `node::idle`) must get none without losing its session.
pub const PERSISTENT_KEEPALIVE_SECS: u32 = 25;

/// The ICE connection of the current session, once ICE selected a pair.
pub type IceConn = Arc<dyn Conn + Send + Sync>;

/// Datagrams waiting for the ICE connection before more go to the relay instead.
const ICE_QUEUE: usize = 512;

/// A way to send a run of WireGuard datagrams to a peer in one go, that a
/// relayed ICE connection may offer (the TURN shim's ChannelData, see
/// `ice::turn_conn`). The data plane knows only this trait.
#[async_trait::async_trait]
pub trait RunSender: Send + Sync {
    /// Sends `datagrams` (all but the last of one length, the last no
    /// longer) in order; false when this way is closed now and nothing was
    /// sent (the caller takes the connection's way).
    async fn send_run(&self, datagrams: &[&[u8]]) -> bool;
}

/// An ICE connection that can also send runs: what a relayed session hands
/// the shell. It is a [`Conn`] like any other (everything delegates to
/// `conn`); [`IceLink::new`] finds `runs` through `as_any`.
pub struct RunConn {
    conn: IceConn,
    runs: Arc<dyn RunSender>,
}

impl RunConn {
    pub fn wrap(conn: IceConn, runs: Arc<dyn RunSender>) -> IceConn {
        Arc::new(RunConn { conn, runs })
    }
}

#[async_trait::async_trait]
impl Conn for RunConn {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        self.conn.connect(addr).await
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        self.conn.recv(buf).await
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        self.conn.recv_from(buf).await
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.conn.send(buf).await
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.conn.send_to(buf, target).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        self.conn.local_addr()
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        self.conn.remote_addr()
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.conn.close().await
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// The ICE connection and a queue in front of it. Packets take this way only
/// when the pair is not on our shared socket, i.e. through a TURN relay, and a
/// send through TURN can wait (a permission to create, a slow server): it must
/// never hold up the loops that serve every peer. Runs of datagrams skip the
/// queue when the connection can send them itself ([`RunSender`]).
#[derive(Clone)]
pub struct IceLink {
    pub conn: IceConn,
    queue: tokio::sync::mpsc::Sender<Vec<u8>>,
    runs: Option<Arc<dyn RunSender>>,
}

impl IceLink {
    /// Starts the sender task; it ends when the last clone of the link is dropped.
    pub fn new(conn: IceConn) -> Self {
        let (queue, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(ICE_QUEUE);
        let sender = conn.clone();
        tokio::spawn(async move {
            while let Some(datagram) = rx.recv().await {
                let _ = sender.send(&datagram).await;
            }
        });
        let runs = conn
            .as_any()
            .downcast_ref::<RunConn>()
            .map(|c| Arc::clone(&c.runs));
        IceLink { conn, queue, runs }
    }

    /// Queues `datagram`; false when the queue is full.
    pub fn try_send(&self, datagram: &[u8]) -> bool {
        self.queue.try_send(datagram.to_vec()).is_ok()
    }

    /// Sends a run (see [`RunSender::send_run`]) without the queue; false
    /// when the connection has no such way open now.
    pub async fn send_run(&self, datagrams: &[&[u8]]) -> bool {
        match &self.runs {
            Some(runs) => runs.send_run(datagrams).await,
            None => false,
        }
    }
}

pub struct Peer {
    pub id: NodeId,
    pub mesh_ip: Ipv4Addr,
    /// Its mesh IPv6 address, when the mesh has IPv6. Fixed for the peer's
    /// life: a new one makes a new peer (see `node::netmap`), as a new IPv4
    /// address does, so the data plane's address table never goes stale.
    pub mesh_ip6: Option<Ipv6Addr>,
    pub public_key: [u8; 32],
    /// The netmap's latest word on the peer (a snapshot the shell replaces).
    info: Mutex<PeerInfo>,
    /// Only the data plane encrypts and decrypts.
    pub(super) tunn: Mutex<Tunn>,
    pub sealer: Sealer,
    /// Where packets go while the path state says ICE is usable.
    active: RwLock<Option<IceLink>>,
    /// The selected pair's remote address when that pair is on our shared socket:
    /// packets then bypass the ICE agent entirely.
    endpoint: RwLock<Option<SocketAddr>>,
    /// The path as the node core last named it (a snapshot for the local API).
    path: RwLock<PathView>,
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    /// The access policy's rules with this peer and the flows they opened.
    pub(super) filter: Mutex<PeerFilter>,
    /// Whether a policy is in force: without one, packets skip the filter
    /// (and its lock) entirely.
    pub(super) filtered: AtomicBool,
    /// Packets the policy refused: from the peer, and to it before sending.
    pub dropped_policy: AtomicU64,
    pub dropped_policy_out: AtomicU64,
    /// The node core says the peer is idle: no keepalives.
    idle: AtomicBool,
    /// WireGuard's timers stopped running for this idle peer (see
    /// [`super::DataPlane::tunn`]); changed only under the `tunn` lock.
    pub(super) parked: AtomicBool,
    /// Gone from the data plane: a timer pass that still holds it drops it.
    pub(super) removed: AtomicBool,
    /// What the timers said when a parked peer caught up (a handshake to
    /// resend, say), for the next timer pass to send.
    pub(super) caught_up: Mutex<Option<Vec<u8>>>,
    /// [`Self::data_packets`] as the shell last reported it to the node core.
    reported: AtomicU64,
    /// When the next persistent keepalive is due, in the data plane's seconds
    /// (0: not scheduled yet).
    keepalive_at: AtomicU32,
}

/// A WireGuard sender/receiver index whose little-endian bytes never look like
/// the STUN magic cookie `0x2112A442` at datagram offset 4, where webrtc-ice
/// would take a WireGuard packet for STUN. boringtun puts `index << 8` there
/// (the low byte counts sessions), so bytes 5..8 are the index's low 24 bits.
pub fn wireguard_index(random: u32) -> u32 {
    const COOKIE_TAIL: u32 = 0x0042_A412; // bytes 12 A4 42 read little-endian
    let index = random & 0x00ff_ffff;
    if index == COOKIE_TAIL {
        index ^ 1
    } else {
        index
    }
}

impl Peer {
    /// `filter` holds what the access policy lets through with this peer
    /// (see [`super::DataPlane::new_filter`]).
    pub fn new(
        info: PeerInfo,
        public_key: [u8; 32],
        our_secret: &StaticSecret,
        filter: PeerFilter,
    ) -> Self {
        let tunn = Tunn::new(
            our_secret.clone(),
            PublicKey::from(public_key),
            None,
            None,
            wireguard_index(rand::random()),
            None,
        );
        Peer {
            id: info.id,
            mesh_ip: info.mesh_ip,
            mesh_ip6: info.mesh_ip6,
            public_key,
            sealer: Sealer::new(our_secret.to_bytes(), public_key),
            info: Mutex::new(info),
            tunn: Mutex::new(tunn),
            active: RwLock::new(None),
            endpoint: RwLock::new(None),
            path: RwLock::new(PathView::connecting()),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            rx_packets: AtomicU64::new(0),
            tx_packets: AtomicU64::new(0),
            filtered: AtomicBool::new(filter.access().is_some()),
            filter: Mutex::new(filter),
            dropped_policy: AtomicU64::new(0),
            dropped_policy_out: AtomicU64::new(0),
            idle: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            caught_up: Mutex::new(None),
            reported: AtomicU64::new(0),
            keepalive_at: AtomicU32::new(0),
        }
    }

    /// Whether `ip` is one of the peer's mesh addresses: the only sources
    /// its packets may have (cryptokey routing), and where packets to it go.
    #[inline]
    pub fn owns(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4 == self.mesh_ip,
            IpAddr::V6(v6) => self.mesh_ip6 == Some(v6),
        }
    }

    /// Data packets through the tunnel either way (keepalives and handshakes
    /// are not counted): the shell samples this to tell the node core which
    /// peers are active, at no cost to the packet path.
    pub fn data_packets(&self) -> u64 {
        self.rx_packets.load(Ordering::Relaxed) + self.tx_packets.load(Ordering::Relaxed)
    }

    /// Whether data moved since the last call: the shell's question, on its
    /// poll, for the peers whose timers run.
    pub fn take_activity(&self) -> bool {
        let count = self.data_packets();
        self.reported.swap(count, Ordering::Relaxed) != count
    }

    /// Whether a timer pass that sent nothing may park this peer: the node
    /// core says it is idle, and the shell has seen all its data (a packet
    /// after the last report must reach the node core first, or the peer
    /// would never wake there).
    pub(super) fn may_park(&self) -> bool {
        self.is_idle() && self.data_packets() == self.reported.load(Ordering::Relaxed)
    }

    /// The node core's word, through [`super::DataPlane::set_idle`].
    pub(super) fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Relaxed);
        // Awake again: the next keepalive is a full interval away.
        self.keepalive_at.store(0, Ordering::Relaxed);
    }

    pub fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }

    /// Whether a persistent keepalive is due at `now` (the data plane's
    /// seconds); if so the next one is scheduled. Never for an idle peer.
    pub(super) fn keepalive_due(&self, now: u32) -> bool {
        if self.is_idle() {
            return false;
        }
        let next = now.saturating_add(PERSISTENT_KEEPALIVE_SECS);
        let at = self.keepalive_at.load(Ordering::Relaxed);
        if at != 0 && now < at {
            return false;
        }
        self.keepalive_at.store(next, Ordering::Relaxed);
        at != 0
    }

    /// What the policy lets through with this peer (`None`: no policy), and
    /// how many flows it tracks.
    pub fn access(&self) -> (Option<PeerAccess>, usize) {
        let filter = lock(&self.filter);
        (filter.access().cloned(), filter.flow_count())
    }

    pub fn info(&self) -> PeerInfo {
        lock(&self.info).clone()
    }

    /// How long ago the last WireGuard handshake completed.
    pub fn since_last_handshake(&self) -> Option<std::time::Duration> {
        lock(&self.tunn).time_since_last_handshake()
    }

    pub fn name(&self) -> String {
        lock(&self.info).name.clone()
    }

    pub fn active_conn(&self) -> Option<IceLink> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_active_conn(&self, conn: Option<IceLink>) {
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    /// Only the shell calls this, with the netmap's latest word on the peer.
    pub fn set_info(&self, info: PeerInfo) {
        *lock(&self.info) = info;
    }

    pub fn path(&self) -> PathView {
        self.path.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Only the shell calls this, with what the node core decided.
    pub fn set_path(&self, view: PathView) {
        *self.path.write().unwrap_or_else(|e| e.into_inner()) = view;
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Only the data plane calls this, keeping its endpoint table in step.
    pub(crate) fn set_endpoint(&self, endpoint: Option<SocketAddr>) {
        *self.endpoint.write().unwrap_or_else(|e| e.into_inner()) = endpoint;
    }

    pub fn count_rx(&self, n: usize) {
        self.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_tx(&self, n: usize) {
        self.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
    }
}

/// Locks a std mutex, ignoring poisoning: a panicking holder cannot leave these
/// values half-updated in a way that matters more than stopping the daemon would.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn peer() -> Peer {
        peer_with(7, None)
    }

    /// Peer `id` at 100.64.0.`id`, with `mesh_ip6` if given.
    pub(crate) fn peer_with(id: NodeId, mesh_ip6: Option<Ipv6Addr>) -> Peer {
        let info = PeerInfo {
            id,
            name: format!("p{id}"),
            mesh_ip: Ipv4Addr::new(100, 64, 0, id as u8),
            mesh_ip6,
            public_key: String::new(),
            online: true,
            tags: Vec::new(),
        };
        let secret = StaticSecret::from([9; 32]);
        let filter = PeerFilter::new(None, Arc::default());
        Peer::new(info, [3; 32], &secret, filter)
    }

    #[test]
    fn a_peer_owns_its_two_mesh_addresses_and_no_other() {
        let v6: Ipv6Addr = "fd7a:115c:a1e0::6440:7".parse().unwrap();
        let p = peer_with(7, Some(v6));
        assert!(p.owns(Ipv4Addr::new(100, 64, 0, 7).into()));
        assert!(p.owns(v6.into()));
        assert!(!p.owns(Ipv4Addr::new(100, 64, 0, 8).into()));
        assert!(!p.owns("fd7a:115c:a1e0::6440:8".parse::<Ipv6Addr>().unwrap().into()));
        // Without an IPv6 address it owns none.
        assert!(!peer_with(7, None).owns(v6.into()));
    }

    #[test]
    fn activity_is_taken_once_and_an_idle_peer_parks_only_once_all_is_reported() {
        let p = peer();
        assert!(!p.take_activity(), "nothing moved yet");
        assert!(!p.may_park(), "awake");
        p.set_idle(true);
        assert!(p.may_park());
        p.count_rx(100);
        assert!(!p.may_park(), "a packet the shell has not seen");
        assert!(p.take_activity());
        assert!(!p.take_activity(), "reported");
        assert!(p.may_park());
        p.count_tx(100);
        assert!(p.take_activity());
        p.set_idle(false);
        assert!(!p.may_park());
    }

    #[test]
    fn an_idle_peer_gets_no_keepalive() {
        let p = peer();
        assert!(!p.keepalive_due(1), "the first one is a full interval away");
        assert!(p.keepalive_due(1 + PERSISTENT_KEEPALIVE_SECS));
        p.set_idle(true);
        assert!(!p.keepalive_due(100 * PERSISTENT_KEEPALIVE_SECS));
    }

    #[test]
    fn wireguard_index_never_produces_the_stun_cookie() {
        for random in [0x0042_A412, 0xFF42_A412, 0x1234_5678, 0] {
            let index = wireguard_index(random) << 8;
            let bytes = index.to_le_bytes();
            assert_ne!(&bytes[1..4], &[0x12, 0xA4, 0x42], "random {random:#x}");
        }
        assert_eq!(wireguard_index(0x0042_A412) << 8 >> 8, 0x0042_A413);
    }
}
