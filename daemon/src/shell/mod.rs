//! The node's async shell: the one task around the node core ([`crate::node`]).
//!
//! ```text
//!   control events ─┐                    ┌─▶ signals ─▶ coordinator queue
//!   ICE events ─────┼─▶ Node (decides) ──┼─▶ ICE agents (create, connect, close)
//!   netchecks ──────┤   poll_output()    ├─▶ data plane (peers, endpoints)
//!   timer ──────────┘                    └─▶ netcheck tasks
//! ```
//!
//! It moves inputs in (with `Instant::now()`) and carries out what the node
//! decided, in order. It owns the webrtc-ice agents, because they are async; it
//! decides nothing about them. WireGuard's timers run in the data plane.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::Ipv4Net;
use overlay_proto::api::{NetcheckReport, PolicyReport, WhyReport};
use overlay_proto::coord::{ClientMsg, IceConfig, ServerMsg};
use overlay_proto::NodeId;
use tokio::sync::{mpsc, oneshot, watch};
use webrtc_ice::state::ConnectionState;

mod diagnose;
mod names;
pub(crate) use diagnose::access_view;

use crate::control::ControlEvent;
use crate::dataplane::peer::{IceConn, IceLink, Peer};
use crate::dataplane::{DataPlane, Mesh6, Origin, Outbound, RxScratch, BUF_SIZE};
use crate::ice::mux::Mux;
use crate::ice::why::Attempt;
use crate::ice::{IceEvent, IceSession, IceSettings, Role};
use crate::node::{Dropped, IceInput, Node, Output, Route};
use diagnose::Netchecked;

/// Questions the local API asks the shell, which owns the ICE agents.
pub enum Query {
    Netcheck(oneshot::Sender<NetcheckReport>),
    Why(String, oneshot::Sender<Result<WhyReport, String>>),
    Policy(oneshot::Sender<PolicyReport>),
}

/// Channels and shared flags between the shell and the other tasks, and what
/// enrolment told us.
pub struct Links {
    pub outbound: mpsc::Sender<Outbound>,
    pub coord_connected: Arc<AtomicBool>,
    /// Latest control-stream round trip in microseconds; 0 when unknown.
    pub coord_rtt_us: Arc<AtomicU64>,
    pub ice_tx: mpsc::UnboundedSender<IceEvent>,
    pub mux: Arc<Mux>,
    /// The mesh network (the coordinator's `Welcome` may update it).
    pub network: Ipv4Net,
    /// The host's DNS, told about the mesh resolver.
    pub host_dns: Arc<crate::host_dns::HostDns>,
    /// How long a peer may go without data before it turns idle; `None`: never.
    pub idle_timeout: Option<Duration>,
}

pub struct Shell {
    node: Node,
    secret: StaticSecret,
    tun_name: String,
    dataplane: Arc<DataPlane>,
    outbound: mpsc::Sender<Outbound>,
    coord_connected: Arc<AtomicBool>,
    coord_rtt_us: Arc<AtomicU64>,
    /// The agent of each peer's current session.
    sessions: HashMap<NodeId, IceSession>,
    ice: IceSettings,
    ice_config: IceConfig,
    ice_tx: mpsc::UnboundedSender<IceEvent>,
    /// What the latest ICE attempt per peer saw, kept after it failed.
    attempts: HashMap<NodeId, (Instant, Attempt)>,
    netcheck_tx: mpsc::UnboundedSender<Netchecked>,
    netcheck_rx: Option<mpsc::UnboundedReceiver<Netchecked>>,
    mux: Arc<Mux>,
    /// This node's name (the coordinator's `Welcome` says it).
    me_name: String,
    names: names::Names,
    /// The peers that moved data since the last poll (scratch, see
    /// `feed_activity`).
    active: Vec<NodeId>,
}

impl Shell {
    pub fn new(
        me: NodeId,
        secret: StaticSecret,
        tun_name: String,
        dataplane: Arc<DataPlane>,
        links: Links,
    ) -> Self {
        let ice = IceSettings {
            urls: Vec::new(),
            turn: Vec::new(),
            mux: links.mux.clone(),
            tun_name: tun_name.clone(),
            mesh: links.network,
            mesh6: dataplane.mesh6().map(|m| m.network),
        };
        let (netcheck_tx, netcheck_rx) = mpsc::unbounded_channel();
        let public = *PublicKey::from(&secret).as_bytes();
        let mut node = Node::new(me, public, Instant::now(), unix_micros(), rand::random());
        node.set_idle_timeout(links.idle_timeout);
        Shell {
            node,
            secret,
            tun_name,
            dataplane,
            outbound: links.outbound,
            coord_connected: links.coord_connected,
            coord_rtt_us: links.coord_rtt_us,
            sessions: HashMap::new(),
            ice,
            ice_config: IceConfig::default(),
            ice_tx: links.ice_tx,
            attempts: HashMap::new(),
            netcheck_tx,
            netcheck_rx: Some(netcheck_rx),
            mux: links.mux,
            me_name: String::new(),
            names: names::Names::new(links.host_dns),
            active: Vec::new(),
        }
    }

    /// Runs until shutdown (a signal, or `overlayctl down`).
    pub async fn run(
        mut self,
        mut control: mpsc::Receiver<ControlEvent>,
        mut ice_events: mpsc::UnboundedReceiver<IceEvent>,
        mut queries: mpsc::Receiver<Query>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Some(mut netchecks) = self.netcheck_rx.take() else {
            return;
        };
        self.node.handle_timeout(Instant::now());
        loop {
            let wake = self
                .node
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + crate::node::POLL_INTERVAL);
            tokio::select! {
                ev = control.recv() => match ev {
                    Some(ControlEvent::Message(msg)) => self.on_server_msg(*msg),
                    Some(ControlEvent::Connected) => {
                        self.dataplane.counters.coordinator_connects.fetch_add(1, Ordering::Relaxed);
                        self.node.set_coordinator_connected(true);
                    }
                    Some(ControlEvent::Disconnected) => self.node.set_coordinator_connected(false),
                    None => break,
                },
                Some(ev) = ice_events.recv() => self.on_ice_event(ev),
                Some(q) = queries.recv() => self.on_query(q).await,
                Some(done) = netchecks.recv() => self.on_netcheck(done),
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    self.feed_activity(now);
                    self.node.set_wall_clock(now, unix_micros());
                    self.node.handle_timeout(now);
                }
                _ = shutdown.changed() => break,
            }
            self.carry_out().await;
            self.sync_zone();
        }
        for (_, session) in self.sessions.drain() {
            session.close();
        }
    }

    fn on_server_msg(&mut self, msg: ServerMsg) {
        let now = Instant::now();
        match msg {
            ServerMsg::Signal { from, payload } => {
                let Some(peer) = self.dataplane.peer(from) else {
                    return;
                };
                match peer.sealer.open(&payload) {
                    Ok(sealed) => self.node.handle_signal(from, sealed, now),
                    Err(e) => {
                        let drops = &self.dataplane.drops;
                        drops.bad_signal.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = from, "dropping signal: {e}");
                    }
                }
            }
            msg => {
                if let ServerMsg::Welcome {
                    network,
                    network6,
                    node,
                    ..
                } = &msg
                {
                    self.ice.mesh = *network;
                    self.ice.mesh6 = *network6;
                    if node.name != self.me_name {
                        self.me_name = node.name.clone();
                        self.names.netmap_changed();
                    }
                    self.set_mesh6(welcome_mesh6(*network6, node));
                }
                self.node
                    .handle_server_msg(msg, now, unix_micros() / 1_000_000);
            }
        }
    }

    /// The coordinator's word on our mesh IPv6 address (every Welcome says
    /// it): the TUN gets it, or loses it, and our own name's AAAA follows.
    fn set_mesh6(&mut self, mesh6: Option<Mesh6>) {
        let before = self.dataplane.mesh6();
        self.dataplane.set_mesh6(mesh6);
        if self.dataplane.mesh6() != before {
            self.names.netmap_changed();
        }
    }

    fn on_ice_event(&mut self, ev: IceEvent) {
        let now = Instant::now();
        let (peer, session, input) = match ev {
            IceEvent::Candidate {
                peer,
                session,
                candidate,
            } => (peer, session, IceInput::Candidate(candidate)),
            IceEvent::Selected {
                peer,
                session,
                pair,
            } => (peer, session, IceInput::Selected(pair)),
            IceEvent::DirectSeen { peer, session } => (peer, session, IceInput::DirectSeen),
            IceEvent::Ready {
                peer,
                session,
                conn,
            } => {
                let Some(s) = self.session_mut(peer, session) else {
                    return; // a stale session's late news
                };
                s.conn = Some(IceLink::new(conn.clone()));
                self.spawn_reader(peer, conn);
                (peer, session, IceInput::Ready)
            }
            IceEvent::State {
                peer,
                session,
                state,
            } => {
                let input = match state {
                    ConnectionState::Connected => IceInput::Connected,
                    ConnectionState::Disconnected => IceInput::Disconnected,
                    ConnectionState::Failed => IceInput::Failed,
                    _ => return,
                };
                (peer, session, input)
            }
            IceEvent::Failed {
                peer,
                session,
                error,
            } => (peer, session, IceInput::Error(error)),
        };
        let current = self
            .sessions
            .get(&peer)
            .is_some_and(|s| s.session == session);
        if current && matches!(input, IceInput::Failed | IceInput::Error(_)) {
            self.dataplane
                .counters
                .ice_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        self.node.handle_ice(peer, session, input, now);
    }

    /// Tells the node which peers moved data packets since the last poll:
    /// two counter loads per peer whose timers run (an idle peer's run again
    /// from its first packet), every poll interval, nothing on the packet path.
    fn feed_activity(&mut self, now: Instant) {
        self.active.clear();
        self.dataplane.take_activity(&mut self.active);
        for &id in &self.active {
            self.node.peer_activity(id, now);
        }
    }

    fn session_mut(&mut self, peer: NodeId, session: u64) -> Option<&mut IceSession> {
        self.sessions
            .get_mut(&peer)
            .filter(|s| s.session == session)
    }

    /// Datagrams arriving on the ICE connection enter the data plane's one door.
    fn spawn_reader(&self, peer: NodeId, conn: IceConn) {
        let dataplane = self.dataplane.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; BUF_SIZE];
            let mut rx = RxScratch::default();
            while let Ok(n) = conn.recv(&mut buf).await {
                let datagram = &buf[..n];
                dataplane
                    .arrive(Origin::IceConn(peer), &[datagram], &mut rx)
                    .await;
            }
        });
    }

    /// Carries out everything the node decided, in order. Creating an agent is
    /// awaited here, so the node hears back before any other input.
    async fn carry_out(&mut self) {
        while let Some(output) = self.node.poll_output() {
            match output {
                Output::PeerAdded {
                    info,
                    public_key,
                    access,
                } => {
                    let filter = self.dataplane.new_filter(access);
                    let peer = Peer::new(info, public_key, &self.secret, filter);
                    self.dataplane.insert(Arc::new(peer));
                    self.names.netmap_changed();
                }
                Output::Access { peer, access } => {
                    if let Some(p) = self.dataplane.peer(peer) {
                        self.dataplane.set_access(&p, access);
                    }
                }
                Output::PeerUpdated(info) => {
                    if let Some(peer) = self.dataplane.peer(info.id) {
                        if peer.name() != info.name {
                            self.names.netmap_changed();
                        }
                        peer.set_info(info);
                    }
                }
                Output::PeerRemoved(id) => {
                    self.dataplane.remove(id);
                    self.attempts.remove(&id);
                    self.names.netmap_changed();
                }
                Output::Dns(config) => self.set_dns(config),
                Output::Signal(sealed) => self.send_signal(sealed),
                Output::StartIce {
                    peer,
                    session,
                    controlling,
                    direct_only,
                } => {
                    self.start_ice(peer, session, controlling, direct_only)
                        .await
                }
                Output::ConnectIce {
                    peer,
                    session,
                    controlling,
                    ufrag,
                    pwd,
                } => {
                    let events = self.ice_tx.clone();
                    if let Some(s) = self.session_mut(peer, session) {
                        s.connect(controlling, peer, ufrag, pwd, events);
                    }
                }
                Output::AddRemoteCandidate {
                    peer,
                    session,
                    candidate,
                } => {
                    let Some(s) = self.session_mut(peer, session) else {
                        continue;
                    };
                    match s.add_remote_candidate(&candidate) {
                        Ok((addr, kind)) => {
                            self.node.remote_candidate_added(peer, session, addr, kind)
                        }
                        Err(e) => {
                            tracing::debug!(peer, "bad remote candidate {candidate:?}: {e}")
                        }
                    }
                }
                Output::RecordAttempt { peer, .. } => self.snapshot(peer).await,
                Output::CloseIce { peer, session } => {
                    if self.session_mut(peer, session).is_some() {
                        if let Some(s) = self.sessions.remove(&peer) {
                            s.close();
                        }
                    }
                    if let Some(p) = self.dataplane.peer(peer) {
                        p.set_active_conn(None);
                    }
                }
                Output::Path { peer, route } => self.set_route(peer, route),
                Output::Idle { peer, idle } => {
                    if let Some(p) = self.dataplane.peer(peer) {
                        self.dataplane.set_idle(&p, idle);
                    }
                }
                Output::IceSettings(ice) => {
                    self.ice = IceSettings::from_config(
                        &ice,
                        &self.tun_name,
                        self.ice.mesh,
                        self.ice.mesh6,
                        self.mux.clone(),
                    );
                    self.ice_config = ice;
                }
                Output::RefreshIce => {
                    let refresh = Outbound::Msg(ClientMsg::RefreshIce);
                    if self.outbound.try_send(refresh).is_err() {
                        tracing::debug!("TURN refresh deferred: coordinator queue full");
                    }
                }
                Output::Netcheck => self.spawn_netcheck(),
                Output::Dropped(why) => self.count(why),
            }
        }
    }

    async fn start_ice(
        &mut self,
        peer: NodeId,
        session: u64,
        controlling: bool,
        direct_only: bool,
    ) {
        let events = self.ice_tx.clone();
        let now = Instant::now();
        self.dataplane
            .counters
            .ice_attempts
            .fetch_add(1, Ordering::Relaxed);
        let role = Role {
            controlling,
            direct_only,
        };
        match IceSession::new(&self.ice, role, peer, session, events).await {
            Ok(s) => {
                let (ufrag, pwd) = (s.ufrag.clone(), s.pwd.clone());
                if let Some(old) = self.sessions.insert(peer, s) {
                    old.close();
                }
                self.node.ice_created(peer, session, ufrag, pwd, now);
            }
            Err(e) => {
                tracing::warn!(peer, "cannot start ICE: {e}");
                self.node.ice_create_failed(peer, session, now);
            }
        }
    }

    fn send_signal(&mut self, sealed: overlay_proto::signal::SealedSignal) {
        let Some(peer) = self.dataplane.peer(sealed.to) else {
            return;
        };
        let msg = ClientMsg::Signal {
            to: peer.id,
            from: None,
            payload: peer.sealer.seal(&sealed),
        };
        if self.outbound.try_send(Outbound::Msg(msg)).is_err() {
            tracing::debug!(peer = peer.id, "signal dropped: coordinator queue full");
        }
    }

    /// Points the data plane at the route the node chose.
    fn set_route(&mut self, id: NodeId, route: Route) {
        let Some(peer) = self.dataplane.peer(id) else {
            return;
        };
        let conn = route
            .ice_conn
            .and_then(|session| self.sessions.get(&id).filter(|s| s.session == session))
            .and_then(|s| s.conn.clone());
        if route.endpoint != peer.endpoint() {
            self.dataplane.set_endpoint(&peer, route.endpoint);
        }
        peer.set_active_conn(conn);
        peer.set_path(route.view);
    }

    fn count(&self, why: Dropped) {
        let drops = &self.dataplane.drops;
        let counter = match why {
            Dropped::Misdirected => &drops.misdirected_signal,
            Dropped::Replayed => &drops.replayed_signal,
            Dropped::Malformed => &drops.bad_signal,
            Dropped::ExcessOffer => &drops.excess_offer,
            Dropped::SignalBudget => &drops.signal_budget,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Our mesh IPv6 address from a Welcome: the address the coordinator gives
/// us (its own mapping of the prefix and our IPv4 address when it does not
/// say), with the mesh's prefix; `None` when the mesh has no IPv6 prefix.
fn welcome_mesh6(
    network6: Option<ipnet::Ipv6Net>,
    me: &overlay_proto::coord::PeerInfo,
) -> Option<Mesh6> {
    let network = network6?;
    let mut mesh6 = Mesh6::of(network, me.mesh_ip);
    if let Some(addr) = me.mesh_ip6.filter(|a| network.contains(a)) {
        mesh6.addr = addr;
    }
    Some(mesh6)
}

/// The wall clock in microseconds since the Unix epoch: what seeds the counter of
/// sealed signals (see `node::signaling`).
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_welcome_with_a_prefix_gives_our_mesh_ipv6_address() {
        let net: ipnet::Ipv6Net = "fd7a:115c:a1e0::/48".parse().unwrap();
        let mut me = overlay_proto::coord::PeerInfo {
            id: 5,
            name: "me".into(),
            mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, 5),
            mesh_ip6: None,
            public_key: String::new(),
            online: true,
            tags: Vec::new(),
        };
        assert_eq!(welcome_mesh6(None, &me), None, "an IPv4-only mesh");
        let mapped = welcome_mesh6(Some(net), &me).unwrap();
        assert_eq!(
            mapped.addr,
            "fd7a:115c:a1e0::6440:5"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
        );
        assert_eq!(mapped.network, net);
        // The coordinator's own word wins, if it lies in the prefix.
        me.mesh_ip6 = Some("fd7a:115c:a1e0::77".parse().unwrap());
        assert_eq!(
            welcome_mesh6(Some(net), &me).unwrap().addr,
            me.mesh_ip6.unwrap()
        );
        me.mesh_ip6 = Some("2001:db8::5".parse().unwrap());
        assert_eq!(welcome_mesh6(Some(net), &me), Some(mapped));
    }
}
