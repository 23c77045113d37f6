//! The node core: every decision about peers, with no I/O.
//!
//! [`Node`] owns the netmap, each peer's ICE session and path state, and the
//! signaling rules. It never touches a socket, a clock, a task or a random
//! source: the shell (`crate::shell`) feeds it inputs with the time they
//! happened, and drains what it decided with [`Node::poll_output`].
//!
//! ```text
//!   ServerMsg (netmap, ICE config) ─┐                       ┌─▶ Output::Signal     → seal, send to the coordinator
//!   opened SealedSignal ────────────┤                       ├─▶ Output::StartIce / ConnectIce / CloseIce → ICE agents
//!   ICE events (IceInput) ──────────┼──▶ Node (now, seed) ──┼─▶ Output::Path       → data plane endpoint
//!   netcheck results ───────────────┤                       ├─▶ Output::PeerAdded / Updated / Removed
//!   peer_activity (data seen) ──────┤                       ├─▶ Output::Idle       → data plane keepalives
//!   handle_timeout(now) ────────────┘                       └─▶ Output::RefreshIce, Netcheck, Dropped
//! ```
//!
//! The same inputs in the same order with the same seed give the same outputs,
//! so every race (both sides offering, a stale answer, a restart during a netmap
//! change) is a unit test on fake time (see `tests.rs`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use overlay_proto::api::PathKind;
use overlay_proto::coord::{IceConfig, PeerInfo, ServerMsg};
use overlay_proto::filter::NodeFilter;
use overlay_proto::signal::{NatSummary, PeerSignal};
use overlay_proto::NodeId;

pub mod access;
pub mod backoff;
pub mod ice_refresh;
pub mod idle;
pub mod netmap;
pub mod path;
pub mod signaling;

mod events;
mod peers;
mod signals;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_access;
#[cfg(test)]
mod tests_idle;
#[cfg(test)]
mod tests_paths;

pub use events::{Dropped, IceInput, Output, PathView, Route};
use netmap::Change;
use path::{CandidateKind, IceStatus, PathState};
use signaling::Signaling;

/// How often path state is polled when nothing else happens: bounds how late a
/// retry, a check timeout or an upgrade attempt starts.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often the node re-measures its network and tells its peers.
pub const NETCHECK_INTERVAL: Duration = Duration::from_secs(600);

/// One ICE negotiation as the node sees it.
#[derive(Debug)]
struct Session {
    id: u64,
    /// The agent exists and its credentials went out.
    created: bool,
    /// The offer's credentials, kept until our agent exists (controlled side).
    offer: Option<(String, String)>,
    /// Connectivity checks started (only once per session).
    connecting: bool,
    /// `dial`/`accept` returned: the connection can carry packets.
    ready: bool,
    /// The peer's signalled candidates that the agent took: address and type.
    signalled: Vec<(String, CandidateKind)>,
    /// Neither side gathers TURN relay candidates ([`PathState::on_direct_seen`]).
    direct_only: bool,
}

/// Everything the node keeps about one peer.
#[derive(Debug)]
struct PeerEntry {
    info: PeerInfo,
    /// We control ICE when our public key is the smaller one.
    controlling: bool,
    path: PathState,
    session: Option<Session>,
    /// The route last handed to the data plane.
    route: Option<Route>,
    remote_nat: Option<NatSummary>,
    /// When data last moved, and whether the peer is idle (see `idle.rs`).
    activity: idle::Activity,
}

/// A small, fast generator for session ids and backoff jitter, seeded by the
/// shell: the node itself has no entropy (SplitMix64).
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The node core. See the module comment.
pub struct Node {
    me: NodeId,
    public_key: [u8; 32],
    /// The netmap as last applied (what the next full netmap is diffed against).
    netmap: HashMap<NodeId, PeerInfo>,
    peers: HashMap<NodeId, PeerEntry>,
    /// A netmap arriving in parts (a `Welcome` with `more`, then `PeerBatch`es).
    pending_netmap: Option<Vec<PeerInfo>>,
    /// Which sealed signals we accept, and how many we start and send.
    signaling: Signaling,
    coordinator_connected: bool,
    /// When to ask the coordinator for fresh TURN credentials.
    ice_refresh_due: Option<Instant>,
    last_netcheck: Option<Instant>,
    last_poll: Option<Instant>,
    /// Our latest netcheck, shared with peers.
    nat: Option<NatSummary>,
    /// Our shared socket's srflx candidates (IPv4, and IPv6 where a NAT66
    /// or prefix translation sits between), signalled in every session.
    srflx: Vec<String>,
    /// The access rules the coordinator compiled for us; `None`: no policy.
    filter: Option<NodeFilter>,
    /// How long a peer may go without data before it turns idle; `None`: never.
    idle_timeout: Option<Duration>,
    /// The peers that are not idle: the only ones a poll visits, so that idle
    /// peers cost nothing per poll (ordered, so polls are deterministic).
    awake: BTreeSet<NodeId>,
    /// The awake peers of the current poll, kept to reuse its allocation.
    polling: Vec<NodeId>,
    /// The wall clock (Unix microseconds) at an instant: seeds signal counters.
    wall: (Instant, u64),
    rng: Rng,
    outputs: VecDeque<Output>,
}

impl Node {
    /// `unix_micros` is the wall clock at `now`; `seed` drives session ids and
    /// jitter (the shell passes a random one).
    pub fn new(
        me: NodeId,
        public_key: [u8; 32],
        now: Instant,
        unix_micros: u64,
        seed: u64,
    ) -> Self {
        Node {
            me,
            public_key,
            netmap: HashMap::new(),
            peers: HashMap::new(),
            pending_netmap: None,
            signaling: Signaling::new(me, now),
            coordinator_connected: false,
            ice_refresh_due: None,
            last_netcheck: None,
            last_poll: None,
            nat: None,
            srflx: Vec::new(),
            filter: None,
            idle_timeout: None,
            awake: BTreeSet::new(),
            polling: Vec::new(),
            wall: (now, unix_micros),
            rng: Rng(seed),
            outputs: VecDeque::new(),
        }
    }

    /// The next decision to carry out, oldest first.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Self::handle_timeout`] wants to run next. A TURN refresh that is
    /// due counts only while the coordinator is connected (it cannot be sent
    /// otherwise), so the deadline never stays in the past.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let poll = self.last_poll.map(|t| t + POLL_INTERVAL);
        let refresh = self.ice_refresh_due.filter(|_| self.coordinator_connected);
        match (poll, refresh) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The wall clock moved on (the shell reports it with each timeout).
    pub fn set_wall_clock(&mut self, now: Instant, unix_micros: u64) {
        self.wall = (now, unix_micros);
    }

    fn unix_micros(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.wall.0);
        self.wall.1 + u64::try_from(since.as_micros()).unwrap_or(0)
    }

    /// The coordinator connection came up or went down. Without it there is no
    /// signaling: no new sessions start, established paths go on.
    pub fn set_coordinator_connected(&mut self, connected: bool) {
        if connected != self.coordinator_connected {
            // A netmap cut short by a reconnect is stale.
            self.pending_netmap = None;
        }
        self.coordinator_connected = connected;
    }

    /// Runs what is due: idle peers, ICE retries, check timeouts, upgrades,
    /// TURN refresh. Only awake peers are visited: an idle one has nothing
    /// due until data or an offer wakes it. Without the coordinator nothing
    /// changes: no peer turns idle, since waking it would need signaling.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_poll = Some(now);
        if !self.coordinator_connected {
            return;
        }
        let mut polling = std::mem::take(&mut self.polling);
        polling.clear();
        polling.extend(self.awake.iter().copied());
        for &id in &polling {
            let timeout = self.idle_timeout;
            let Some(entry) = self.peers.get_mut(&id) else {
                continue;
            };
            if entry.activity.goes_idle(now, timeout) {
                self.go_idle(id);
                continue;
            }
            self.poll_path(id, now);
        }
        self.polling = polling;
        let refresh_due = self.ice_refresh_due.is_some_and(|due| now >= due);
        if refresh_due {
            self.ice_refresh_due = Some(now + ice_refresh::REFRESH_RETRY);
            tracing::debug!("asking the coordinator for fresh TURN credentials");
            self.outputs.push_back(Output::RefreshIce);
        }
    }

    /// A message from the coordinator. `unix_secs` is the wall clock, for the
    /// expiry of TURN credentials.
    pub fn handle_server_msg(&mut self, msg: ServerMsg, now: Instant, unix_secs: u64) {
        match msg {
            ServerMsg::Welcome {
                peers,
                ice,
                more,
                filter,
                resumed,
                ..
            } => {
                self.set_ice(ice, now, unix_secs);
                self.set_filter(filter);
                let due = self
                    .last_netcheck
                    .is_none_or(|t| now.duration_since(t) >= NETCHECK_INTERVAL);
                if due {
                    self.last_netcheck = Some(now);
                    self.outputs.push_back(Output::Netcheck);
                }
                if resumed {
                    // The coordinator found the netmap we hold current
                    // (`control::resume`): it stays as it is.
                    self.pending_netmap = None;
                } else if more {
                    self.pending_netmap = Some(peers);
                } else {
                    self.apply_netmap(&peers, now);
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
                        self.apply_netmap(&all, now);
                    }
                }
            }
            ServerMsg::PeerUpsert { peer } if peer.id != self.me => {
                for change in netmap::upsert(self.netmap.get(&peer.id), &peer) {
                    self.apply(change, now);
                }
            }
            ServerMsg::PeerRemoved { id } => self.apply(Change::Remove(id), now),
            ServerMsg::IceConfig { ice } => {
                tracing::debug!("fresh ICE configuration ({} TURN servers)", ice.turn.len());
                self.set_ice(ice, now, unix_secs);
            }
            ServerMsg::Error {
                error,
                message,
                about,
            } => {
                tracing::debug!(?about, "coordinator refused a message: {error}: {message}");
            }
            // Signals arrive sealed: the shell opens them (see `handle_signal`).
            ServerMsg::Signal { .. } | ServerMsg::PeerUpsert { .. } | ServerMsg::Pong { .. } => {}
            ServerMsg::Filter { filter } => self.set_filter(filter),
            ServerMsg::Dns { dns } => self.outputs.push_back(Output::Dns(dns)),
        }
    }

    /// Whatever `id`'s path state wants done about ICE now.
    fn poll_path(&mut self, id: NodeId, now: Instant) {
        let jitter = self.rng.unit();
        let Some(entry) = self.peers.get_mut(&id) else {
            return;
        };
        match entry.path.poll(now, jitter) {
            Some(path::Action::StartSession) => self.start_session(id, false),
            Some(path::Action::StartDirectSession) => {
                let info = &entry.info;
                tracing::info!(
                    "peer {} ({}): ICE chose TURN though a direct pair worked; trying again without relays",
                    info.name,
                    info.mesh_ip
                );
                self.start_session(id, true)
            }
            Some(path::Action::RequestRestart) => self.send_signal(
                id,
                PeerSignal::RestartRequest {
                    reason: "no working ICE session".into(),
                },
                now,
            ),
            None => {}
        }
        self.sync_path(id);
    }

    fn set_ice(&mut self, ice: IceConfig, now: Instant, unix_secs: u64) {
        self.ice_refresh_due = ice_refresh::refresh_delay(&ice, unix_secs).map(|d| now + d);
        self.outputs.push_back(Output::IceSettings(ice));
    }

    /// A finished netcheck: what we tell peers, and our srflx candidate lines
    /// (none when STUN saw no NAT or did not answer; one per family at most).
    pub fn handle_netcheck(
        &mut self,
        nat: NatSummary,
        srflx: impl IntoIterator<Item = String>,
        now: Instant,
    ) {
        let srflx: Vec<String> = srflx.into_iter().collect();
        // Idle peers have no session and hear our summary when they wake.
        let mut awake = std::mem::take(&mut self.polling);
        awake.clear();
        awake.extend(self.awake.iter().copied());
        if !srflx.is_empty() && srflx != self.srflx {
            self.srflx = srflx;
            // Sessions already under way learn the candidate too.
            for &id in &awake {
                let session = self.peers.get(&id).and_then(|p| p.session.as_ref());
                if let Some(session) = session.filter(|s| s.created).map(|s| s.id) {
                    self.send_reflexive(id, session, now);
                }
            }
        }
        tracing::info!(
            "netcheck: udp {}, public address {}, mapping {:?}",
            if nat.udp { "works" } else { "blocked" },
            nat.public_addr
                .map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            nat.mapping
        );
        self.nat = Some(nat);
        for &id in &awake {
            if self.peers.get(&id).is_some_and(|p| p.info.online) {
                self.send_nat(id, now);
            }
        }
        self.polling = awake;
    }

    fn send_signal(&mut self, to: NodeId, signal: PeerSignal, now: Instant) {
        let unix = self.unix_micros(now);
        match self.signaling.outgoing(to, signal, now, unix) {
            Some(sealed) => self.outputs.push_back(Output::Signal(sealed)),
            None => {
                tracing::debug!(peer = to, "signal dropped: signaling budget spent");
                self.outputs
                    .push_back(Output::Dropped(Dropped::SignalBudget));
            }
        }
    }

    /// Signals our srflx candidates for `session` (webrtc-ice gathers none on a mux).
    fn send_reflexive(&mut self, to: NodeId, session: u64, now: Instant) {
        for candidate in self.srflx.clone() {
            self.send_signal(to, PeerSignal::Candidate { session, candidate }, now);
        }
    }

    fn send_nat(&mut self, to: NodeId, now: Instant) {
        if let Some(nat) = self.nat.clone() {
            self.send_signal(to, PeerSignal::NetInfo { nat }, now);
        }
    }

    /// Opens a new ICE session with `id` (we are controlling): the offer goes
    /// out once the agent exists. Any previous session ends; packets use the
    /// relay meanwhile.
    fn start_session(&mut self, id: NodeId, direct_only: bool) {
        self.end_session(id);
        let session = self.rng.next_u64();
        if let Some(entry) = self.peers.get_mut(&id) {
            entry.session = Some(Session::new(session, None, direct_only));
            self.outputs.push_back(Output::StartIce {
                peer: id,
                session,
                controlling: true,
                direct_only,
            });
        }
    }

    fn end_session(&mut self, id: NodeId) {
        let Some(entry) = self.peers.get_mut(&id) else {
            return;
        };
        if let Some(session) = entry.session.take() {
            self.outputs.push_back(Output::CloseIce {
                peer: id,
                session: session.id,
            });
        }
    }

    /// Hands the data plane the path the state machine chose, when it changed.
    fn sync_path(&mut self, id: NodeId) {
        let Some(entry) = self.peers.get_mut(&id) else {
            return;
        };
        let route = entry.current_route();
        if entry.route.as_ref() == Some(&route) {
            return;
        }
        let old_label = entry.route.as_ref().map(|r| r.view.log_label());
        let label = route.view.log_label();
        if old_label.as_ref() != Some(&label) {
            let info = &entry.info;
            tracing::info!("peer {} ({}) now {label}", info.name, info.mesh_ip);
        }
        entry.route = Some(route.clone());
        self.outputs.push_back(Output::Path { peer: id, route });
    }
}

impl Session {
    fn new(id: u64, offer: Option<(String, String)>, direct_only: bool) -> Self {
        Session {
            id,
            created: false,
            offer,
            connecting: false,
            ready: false,
            signalled: Vec::new(),
            direct_only,
        }
    }
}

impl PeerEntry {
    /// Whether packets may use this session's ICE connection now.
    fn ice_conn(&self) -> Option<u64> {
        let session = self.session.as_ref().filter(|s| s.ready)?;
        self.path.selected().map(|_| session.id)
    }

    fn current_route(&self) -> Route {
        let ice_conn = self.ice_conn();
        let selected = self.path.selected().filter(|_| ice_conn.is_some());
        // A pair whose local side is not a TURN relay is on the shared socket.
        let endpoint = selected
            .filter(|pair| pair.local != CandidateKind::Relay)
            .and_then(|pair| pair.remote_addr.parse().ok());
        let view = match selected {
            Some(pair) => PathView {
                kind: pair.kind(),
                label: pair.label(),
                remote: Some(pair.remote_addr.clone()),
                local: Some(pair.local_addr.clone()),
            },
            None if self.info.online && self.activity.is_idle() => PathView::idle(),
            None if self.info.online => PathView {
                kind: PathKind::CoordRelay,
                label: "coord relay".into(),
                remote: None,
                local: None,
            },
            None => PathView::connecting(),
        };
        Route {
            endpoint,
            ice_conn,
            view,
        }
    }

    fn checking(&self) -> bool {
        matches!(self.path.status(), IceStatus::Checking { .. })
    }
}
