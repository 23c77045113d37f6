//! The engine: one task that applies the netmap, runs ICE signaling, and drives
//! every peer's path state. The data plane runs beside it on its own tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use ipnet::Ipv4Net;
use overlay_proto::api::{NetcheckReport, WhyReport};
use overlay_proto::coord::{ClientMsg, IceConfig, PeerInfo, ServerMsg};
use overlay_proto::signal::{NatSummary, PeerSignal};
use overlay_proto::NodeId;
use tokio::sync::{mpsc, oneshot, watch};
use webrtc_ice::state::ConnectionState;

mod diagnose;

use crate::control::ControlEvent;
use crate::dataplane::{DataPlane, Outbound, BUF_SIZE};
use crate::ice::{IceEvent, IceSession, IceSettings};
use crate::identity::decode_public_key;
use crate::mux::Mux;
use crate::netmap::{self, Change};
use crate::path::{Action, CandidateKind, PathState};
use crate::peer::{lock, IceLink, Peer};
use crate::signaling::{Refused, Signaling};
use crate::why::Attempt;
use diagnose::Netchecked;

/// WireGuard wants its timers run about this often.
const TICK: Duration = Duration::from_millis(250);
/// How often the node re-measures its network and tells its peers.
const NETCHECK_INTERVAL: Duration = Duration::from_secs(600);

/// Questions the local API asks the engine, which owns the ICE agents.
pub enum Query {
    Netcheck(oneshot::Sender<NetcheckReport>),
    Why(String, oneshot::Sender<Result<WhyReport, String>>),
}

/// Channels and shared flags between the engine and the other tasks, and what
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
}

pub struct Engine {
    pub me: NodeId,
    pub secret: StaticSecret,
    pub tun_name: String,
    pub dataplane: Arc<DataPlane>,
    pub outbound: mpsc::Sender<Outbound>,
    pub coord_connected: Arc<AtomicBool>,
    coord_rtt_us: Arc<AtomicU64>,
    netmap: HashMap<NodeId, PeerInfo>,
    sessions: HashMap<NodeId, IceSession>,
    ice: IceSettings,
    ice_config: IceConfig,
    ice_tx: mpsc::UnboundedSender<IceEvent>,
    /// Last path label logged per peer, so path changes are logged once.
    labels: HashMap<NodeId, String>,
    /// Our latest netcheck, shared with peers, and theirs.
    nat: Option<NatSummary>,
    remote_nat: HashMap<NodeId, NatSummary>,
    /// What the latest ICE attempt per peer saw, kept after it failed.
    attempts: HashMap<NodeId, (Instant, Attempt)>,
    netcheck_tx: mpsc::UnboundedSender<Netchecked>,
    netcheck_rx: Option<mpsc::UnboundedReceiver<Netchecked>>,
    mux: Arc<Mux>,
    /// Our shared socket's address as STUN sees it: our srflx candidate.
    reflexive: Option<SocketAddr>,
    last_netcheck: Option<Instant>,
    /// A netmap arriving in parts (a `Welcome` with `more`, then `PeerBatch`es).
    pending_netmap: Option<Vec<PeerInfo>>,
    /// Which sealed signals we accept, and how many we start and send.
    signaling: Signaling,
    /// When to ask the coordinator for fresh TURN credentials (see `ice_refresh`).
    ice_refresh_due: Option<Instant>,
}

impl Engine {
    pub fn new(
        me: NodeId,
        secret: StaticSecret,
        tun_name: String,
        dataplane: Arc<DataPlane>,
        links: Links,
    ) -> Self {
        let ice = IceSettings {
            urls: Vec::new(),
            mux: links.mux.clone(),
            tun_name: tun_name.clone(),
            mesh: links.network,
        };
        let (netcheck_tx, netcheck_rx) = mpsc::unbounded_channel();
        Engine {
            me,
            secret,
            tun_name,
            dataplane,
            outbound: links.outbound,
            coord_connected: links.coord_connected,
            coord_rtt_us: links.coord_rtt_us,
            netmap: HashMap::new(),
            sessions: HashMap::new(),
            ice,
            ice_config: IceConfig::default(),
            ice_tx: links.ice_tx,
            labels: HashMap::new(),
            nat: None,
            remote_nat: HashMap::new(),
            attempts: HashMap::new(),
            netcheck_tx,
            netcheck_rx: Some(netcheck_rx),
            mux: links.mux,
            reflexive: None,
            last_netcheck: None,
            pending_netmap: None,
            signaling: Signaling::new(me, Instant::now()),
            ice_refresh_due: None,
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
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            tokio::select! {
                ev = control.recv() => match ev {
                    Some(ControlEvent::Message(msg)) => self.on_server_msg(msg).await,
                    Some(ControlEvent::Connected) => {
                        self.dataplane.counters.coordinator_connects.fetch_add(1, Ordering::Relaxed);
                        self.pending_netmap = None; // a netmap cut short by a reconnect
                    }
                    Some(ControlEvent::Disconnected) => {
                        self.pending_netmap = None; // a netmap cut short by a reconnect
                    }
                    None => break,
                },
                Some(ev) = ice_events.recv() => self.on_ice_event(ev).await,
                Some(q) = queries.recv() => self.on_query(q).await,
                Some(report) = netchecks.recv() => self.on_netcheck(report),
                _ = tick.tick() => {
                    self.dataplane.tick_timers(&mut buf).await;
                    self.poll_paths().await;
                    self.poll_ice_refresh(Instant::now());
                }
                _ = shutdown.changed() => break,
            }
        }
        for (_, session) in self.sessions.drain() {
            session.close();
        }
    }

    async fn on_server_msg(&mut self, msg: ServerMsg) {
        match msg {
            ServerMsg::Welcome {
                peers,
                ice,
                more,
                network,
                ..
            } => {
                self.ice =
                    IceSettings::from_config(&ice, &self.tun_name, network, self.mux.clone());
                self.schedule_ice_refresh(&ice);
                self.ice_config = ice;
                let due = self
                    .last_netcheck
                    .is_none_or(|t| t.elapsed() >= NETCHECK_INTERVAL);
                if due {
                    self.spawn_netcheck();
                }
                if more {
                    self.pending_netmap = Some(peers);
                } else {
                    self.apply_netmap(&peers);
                }
            }
            ServerMsg::PeerBatch { peers, last } => {
                let Some(pending) = self.pending_netmap.as_mut() else {
                    tracing::debug!("ignoring a peer batch without a welcome");
                    return;
                };
                pending.extend(peers);
                if last {
                    if let Some(all) = self.pending_netmap.take() {
                        self.apply_netmap(&all);
                    }
                }
            }
            ServerMsg::PeerUpsert { peer } if peer.id != self.me => {
                for change in netmap::upsert(self.netmap.get(&peer.id), &peer) {
                    self.apply(change);
                }
            }
            ServerMsg::PeerRemoved { id } => self.apply(Change::Remove(id)),
            ServerMsg::Signal { from, payload } => self.on_signal(from, &payload).await,
            ServerMsg::IceConfig { ice } => {
                self.ice =
                    IceSettings::from_config(&ice, &self.tun_name, self.ice.mesh, self.mux.clone());
                tracing::debug!("fresh ICE configuration ({} TURN servers)", ice.turn.len());
                self.schedule_ice_refresh(&ice);
                self.ice_config = ice;
            }
            ServerMsg::Error {
                error,
                message,
                about,
            } => {
                tracing::debug!(?about, "coordinator refused a message: {error}: {message}");
            }
            ServerMsg::PeerUpsert { .. } | ServerMsg::Pong { .. } => {}
        }
    }

    fn schedule_ice_refresh(&mut self, ice: &IceConfig) {
        let now_unix = unix_micros() / 1_000_000;
        self.ice_refresh_due =
            crate::ice_refresh::refresh_delay(ice, now_unix).map(|delay| Instant::now() + delay);
    }

    /// Asks for fresh TURN credentials when they are due; the answer
    /// (`ServerMsg::IceConfig`) schedules the next time.
    fn poll_ice_refresh(&mut self, now: Instant) {
        let due = self.ice_refresh_due.is_some_and(|due| now >= due);
        if !due || !self.coord_connected.load(Ordering::Relaxed) {
            return;
        }
        self.ice_refresh_due = Some(now + crate::ice_refresh::REFRESH_RETRY);
        tracing::debug!("asking the coordinator for fresh TURN credentials");
        if self
            .outbound
            .try_send(Outbound::Msg(ClientMsg::RefreshIce))
            .is_err()
        {
            tracing::debug!("TURN refresh deferred: coordinator queue full");
        }
    }

    /// Applies a complete netmap: peers added, changed and gone.
    fn apply_netmap(&mut self, peers: &[PeerInfo]) {
        for change in netmap::diff(&self.netmap, peers, self.me) {
            self.apply(change);
        }
    }

    fn apply(&mut self, change: Change) {
        let now = Instant::now();
        match change {
            Change::Add(info) => {
                let Some(key) = decode_public_key(&info.public_key) else {
                    tracing::warn!(
                        peer = info.id,
                        "ignoring peer {} with a malformed public key",
                        info.name
                    );
                    return;
                };
                let peer = PathState::new(false, info.online, now);
                let peer = Peer::new(info.clone(), key, &self.secret, peer);
                // Role is known only once the keys are compared.
                *lock(&peer.path) = PathState::new(peer.controlling, info.online, now);
                tracing::info!(
                    "peer {} ({}) added{}",
                    info.name,
                    info.mesh_ip,
                    if info.online { "" } else { ", offline" }
                );
                let peer = Arc::new(peer);
                if info.online {
                    self.send_nat(&peer);
                }
                self.dataplane.insert(peer);
                self.netmap.insert(info.id, info);
            }
            Change::Update(info) => {
                if let Some(peer) = self.dataplane.peer(info.id) {
                    let was_online = lock(&peer.info).online;
                    if was_online != info.online {
                        tracing::info!(
                            "peer {} ({}) is {}",
                            info.name,
                            info.mesh_ip,
                            if info.online { "online" } else { "offline" }
                        );
                        let drop_session = lock(&peer.path).set_online(info.online, now);
                        if drop_session {
                            self.end_session(info.id);
                        }
                        if info.online {
                            self.send_nat(&peer);
                        }
                    }
                    *lock(&peer.info) = info.clone();
                    self.sync_path(&peer);
                }
                self.netmap.insert(info.id, info);
            }
            Change::Remove(id) => {
                self.end_session(id);
                self.labels.remove(&id);
                if let Some(info) = self.netmap.remove(&id) {
                    tracing::info!("peer {} ({}) removed", info.name, info.mesh_ip);
                }
                self.dataplane.remove(id);
                self.remote_nat.remove(&id);
                self.attempts.remove(&id);
                self.signaling.forget(id, now);
            }
        }
    }

    fn end_session(&mut self, id: NodeId) {
        if let Some(session) = self.sessions.remove(&id) {
            session.close();
        }
        if let Some(peer) = self.dataplane.peer(id) {
            peer.set_active_conn(None);
        }
    }

    fn send_signal(&mut self, peer: &Peer, signal: PeerSignal) {
        let Some(sealed) = self
            .signaling
            .outgoing(peer.id, signal, Instant::now(), unix_micros())
        else {
            self.dataplane
                .drops
                .signal_budget
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = peer.id, "signal dropped: signaling budget spent");
            return;
        };
        let payload = peer.sealer.seal(&sealed);
        let msg = ClientMsg::Signal {
            to: peer.id,
            from: None,
            payload,
        };
        if self.outbound.try_send(Outbound::Msg(msg)).is_err() {
            tracing::debug!(peer = peer.id, "signal dropped: coordinator queue full");
        }
    }

    /// Opens a new ICE session with `peer` (we are controlling): a fresh agent and
    /// an offer. Any previous session ends; packets use the relay meanwhile.
    async fn start_session(&mut self, peer: &Arc<Peer>) {
        self.end_session(peer.id);
        let session_id: u64 = rand::random();
        self.dataplane
            .counters
            .ice_attempts
            .fetch_add(1, Ordering::Relaxed);
        match IceSession::new(&self.ice, true, peer.id, session_id, self.ice_tx.clone()).await {
            Ok(session) => {
                self.send_signal(
                    peer,
                    PeerSignal::Offer {
                        session: session_id,
                        ufrag: session.ufrag.clone(),
                        pwd: session.pwd.clone(),
                    },
                );
                tracing::debug!(peer = peer.id, session = session_id, "ICE offer sent");
                self.send_reflexive(peer, session_id);
                self.sessions.insert(peer.id, session);
            }
            Err(e) => {
                tracing::warn!("cannot start ICE with {}: {e}", peer.name());
                lock(&peer.path).on_failed(Instant::now(), rand::random());
            }
        }
    }

    async fn on_signal(&mut self, from: NodeId, payload: &str) {
        let Some(peer) = self.dataplane.peer(from) else {
            return;
        };
        let drops = &self.dataplane.drops;
        let sealed = match peer.sealer.open(payload) {
            Ok(s) => s,
            Err(e) => {
                drops.bad_signal.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = from, "dropping signal: {e}");
                return;
            }
        };
        let now = Instant::now();
        let signal = match self.signaling.incoming(from, sealed, now) {
            Ok(signal) => signal,
            Err(refused) => {
                let counter = match refused {
                    Refused::Misdirected => &drops.misdirected_signal,
                    Refused::Replayed => &drops.replayed_signal,
                    Refused::Malformed => &drops.bad_signal,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = from, "dropping signal: {refused:?}");
                return;
            }
        };
        let new_session = match &signal {
            PeerSignal::Offer { session, .. } => {
                !peer.controlling
                    && self
                        .sessions
                        .get(&from)
                        .is_none_or(|s| s.session != *session)
            }
            PeerSignal::RestartRequest { .. } => peer.controlling,
            _ => false,
        };
        if new_session && !self.signaling.allow_session(from, now) {
            self.dataplane
                .drops
                .excess_offer
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = from, "dropping offer: too many new ICE sessions");
            return;
        }
        match signal {
            PeerSignal::Offer { session, .. }
                if self
                    .sessions
                    .get(&from)
                    .is_some_and(|s| s.session == session) =>
            {
                // A repeated offer: the session it opens is already under way.
            }
            PeerSignal::Offer {
                session,
                ufrag,
                pwd,
            } if !peer.controlling => {
                self.end_session(from);
                self.dataplane
                    .counters
                    .ice_attempts
                    .fetch_add(1, Ordering::Relaxed);
                let created =
                    IceSession::new(&self.ice, false, from, session, self.ice_tx.clone()).await;
                let mut s = match created {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("cannot answer ICE offer from {}: {e}", peer.name());
                        return;
                    }
                };
                self.send_signal(
                    &peer,
                    PeerSignal::Answer {
                        session,
                        ufrag: s.ufrag.clone(),
                        pwd: s.pwd.clone(),
                    },
                );
                self.send_reflexive(&peer, session);
                s.connect(false, from, ufrag, pwd, self.ice_tx.clone());
                lock(&peer.path).session_started(now);
                self.sessions.insert(from, s);
                self.sync_path(&peer);
            }
            PeerSignal::Answer {
                session,
                ufrag,
                pwd,
            } if peer.controlling => {
                if let Some(s) = self
                    .sessions
                    .get_mut(&from)
                    .filter(|s| s.session == session)
                {
                    s.connect(true, from, ufrag, pwd, self.ice_tx.clone());
                }
            }
            PeerSignal::Candidate { session, candidate } => {
                let Some(s) = self
                    .sessions
                    .get_mut(&from)
                    .filter(|s| s.session == session)
                else {
                    return;
                };
                match s.add_remote_candidate(&candidate) {
                    Ok((addr, kind)) => {
                        lock(&peer.path).learn_remote(&addr, kind);
                        self.sync_path(&peer);
                    }
                    Err(e) => {
                        tracing::debug!(peer = from, "bad remote candidate {candidate:?}: {e}")
                    }
                }
            }
            PeerSignal::NetInfo { nat } => {
                self.remote_nat.insert(from, nat);
            }
            PeerSignal::RestartRequest { reason } => {
                let start = lock(&peer.path).on_restart_request(now);
                if start {
                    tracing::debug!(peer = from, "peer asked for a new ICE session: {reason:?}");
                    self.start_session(&peer).await;
                    self.sync_path(&peer);
                }
            }
            other => tracing::debug!(peer = from, "ignoring signal for the other role: {other:?}"),
        }
    }

    async fn on_ice_event(&mut self, ev: IceEvent) {
        let (peer_id, session_id) = match &ev {
            IceEvent::Candidate { peer, session, .. }
            | IceEvent::State { peer, session, .. }
            | IceEvent::Selected { peer, session, .. }
            | IceEvent::Ready { peer, session, .. }
            | IceEvent::Failed { peer, session, .. } => (*peer, *session),
        };
        let current = self
            .sessions
            .get(&peer_id)
            .is_some_and(|s| s.session == session_id);
        let (true, Some(peer)) = (current, self.dataplane.peer(peer_id)) else {
            return; // a stale session's late news
        };
        let now = Instant::now();
        match ev {
            IceEvent::Candidate { candidate, .. } => {
                self.send_signal(
                    &peer,
                    PeerSignal::Candidate {
                        session: session_id,
                        candidate,
                    },
                );
            }
            IceEvent::Selected { pair, .. } => {
                let mut path = lock(&peer.path);
                path.on_selected(pair);
                for (addr, kind) in self
                    .sessions
                    .get(&peer_id)
                    .map(|s| s.signalled.as_slice())
                    .unwrap_or_default()
                {
                    path.learn_remote(addr, *kind);
                }
            }
            IceEvent::Ready { conn, .. } => {
                self.spawn_reader(&peer, conn.clone());
                if let Some(s) = self.sessions.get_mut(&peer_id) {
                    s.conn = Some(IceLink::new(conn));
                }
                lock(&peer.path).on_connected();
            }
            IceEvent::State { state, .. } => match state {
                ConnectionState::Connected
                    if self
                        .sessions
                        .get(&peer_id)
                        .is_some_and(|s| s.conn.is_some()) =>
                {
                    lock(&peer.path).on_connected();
                }
                ConnectionState::Disconnected => lock(&peer.path).on_disconnected(),
                ConnectionState::Failed => {
                    self.dataplane
                        .counters
                        .ice_failures
                        .fetch_add(1, Ordering::Relaxed);
                    lock(&peer.path).on_failed(now, rand::random());
                    self.snapshot(peer_id).await;
                    self.end_session(peer_id);
                }
                _ => {}
            },
            IceEvent::Failed { error, .. } => {
                tracing::debug!(peer = peer_id, "ICE session ended: {error}");
                self.dataplane
                    .counters
                    .ice_failures
                    .fetch_add(1, Ordering::Relaxed);
                lock(&peer.path).on_failed(now, rand::random());
                self.snapshot(peer_id).await;
                self.end_session(peer_id);
            }
        }
        self.sync_path(&peer);
    }

    /// Datagrams arriving on the ICE connection go to the peer's WireGuard session.
    fn spawn_reader(&self, peer: &Arc<Peer>, conn: crate::peer::IceConn) {
        let dataplane = self.dataplane.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; BUF_SIZE];
            let mut out = vec![0u8; BUF_SIZE];
            while let Ok(n) = conn.recv(&mut buf).await {
                dataplane.receive(&peer, &buf[..n], &mut out).await;
            }
        });
    }

    /// Points the data plane at the path the state machine chose, and logs changes.
    fn sync_path(&mut self, peer: &Arc<Peer>) {
        let (selected, online) = {
            let path = lock(&peer.path);
            (path.selected().cloned(), lock(&peer.info).online)
        };
        let conn = selected
            .as_ref()
            .and_then(|_| self.sessions.get(&peer.id))
            .and_then(|s| s.conn.clone());
        let label = match (&selected, &conn) {
            (Some(pair), Some(_)) => format!("{} via {}", pair.label(), pair.remote_addr),
            _ if online => "coord relay".to_owned(),
            _ => "connecting".to_owned(),
        };
        // A pair whose local side is not a TURN relay is on the shared socket.
        let endpoint = match (&selected, &conn) {
            (Some(pair), Some(_)) if pair.local != CandidateKind::Relay => {
                pair.remote_addr.parse().ok()
            }
            _ => None,
        };
        if endpoint != peer.endpoint() {
            self.dataplane.set_endpoint(peer, endpoint);
        }
        peer.set_active_conn(conn);
        if self.labels.get(&peer.id) != Some(&label) {
            tracing::info!("peer {} ({}) now {label}", peer.name(), peer.mesh_ip);
            self.labels.insert(peer.id, label);
        }
    }

    async fn poll_paths(&mut self) {
        if !self.coord_connected.load(Ordering::Relaxed) {
            return; // no signaling without the coordinator; established paths go on
        }
        let now = Instant::now();
        for peer in self.dataplane.peers() {
            let action = lock(&peer.path).poll(now, rand::random());
            match action {
                Some(Action::StartSession) => self.start_session(&peer).await,
                Some(Action::RequestRestart) => self.send_signal(
                    &peer,
                    PeerSignal::RestartRequest {
                        reason: "no working ICE session".into(),
                    },
                ),
                None => {}
            }
            self.sync_path(&peer);
        }
    }
}

/// The wall clock in microseconds since the Unix epoch: what seeds the counter of
/// sealed signals (see [`Signaling::outgoing`]).
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
