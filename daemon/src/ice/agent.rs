//! The edge that owns webrtc-ice agents. It makes no decisions: it turns agent
//! callbacks into [`IceEvent`]s for the engine, which feeds them to the peer's
//! [`crate::node::path::PathState`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use overlay_proto::coord::IceConfig;
use overlay_proto::NodeId;
use tokio::sync::mpsc;
use webrtc_ice::agent::agent_config::AgentConfig;
use webrtc_ice::agent::Agent;
use webrtc_ice::candidate::{Candidate, CandidateType};
use webrtc_ice::mdns::MulticastDnsMode;
use webrtc_ice::network_type::NetworkType;
use webrtc_ice::state::ConnectionState;
use webrtc_ice::udp_network::UDPNetwork;
use webrtc_ice::url::{ProtoType, SchemeType, Url};

use super::candidates::{gather_addr, host_port, refuse_remote_addr};
use super::turn_conn::{RelayedConn, TurnRoute};
use crate::dataplane::peer::IceConn;
use crate::node::path::{CandidateKind, SelectedPair};

/// ICE calls a pair disconnected after this long without traffic; packets move to
/// the relay at that moment, so it bounds how long a dead path can swallow them.
const DISCONNECTED_TIMEOUT: Duration = Duration::from_secs(3);
/// After this long disconnected the session is failed and a new one is started.
const FAILED_TIMEOUT: Duration = Duration::from_secs(8);
/// STUN keepalives on the selected pair; also what makes a dead path noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// webrtc-ice waits 2 s by default before accepting a relayed pair. Packets ride
/// the coordination relay meanwhile, so there is no hurry; but waiting less than
/// prflx pairs (1 s) would let TURN win races a direct pair was about to win.
const RELAY_ACCEPTANCE_MIN_WAIT: Duration = Duration::from_millis(1500);

/// Remote candidates accepted per session: a peer has a few interfaces, a
/// reflexive address or two and a relay; this is generous.
const MAX_REMOTE_CANDIDATES: usize = 32;

/// Everything an agent reports, tagged with the peer and session it belongs to.
pub enum IceEvent {
    Candidate {
        peer: NodeId,
        session: u64,
        candidate: String,
    },
    State {
        peer: NodeId,
        session: u64,
        state: ConnectionState,
    },
    Selected {
        peer: NodeId,
        session: u64,
        pair: SelectedPair,
    },
    /// Follows `Selected` when a direct pair had passed its checks by then.
    DirectSeen { peer: NodeId, session: u64 },
    /// `dial`/`accept` returned: the connection packets can use.
    Ready {
        peer: NodeId,
        session: u64,
        conn: IceConn,
    },
    Failed {
        peer: NodeId,
        session: u64,
        error: String,
    },
}

/// Settings shared by every agent the daemon creates.
#[derive(Clone)]
pub struct IceSettings {
    /// STUN servers, given to every agent.
    pub urls: Vec<Url>,
    /// TURN servers in the coordinator's order (its own replica's first);
    /// each agent gets one per family ([`choose_turn`]).
    pub turn: Vec<TurnUrl>,
    /// The shared socket every agent's host candidates live on.
    pub mux: Arc<crate::ice::mux::Mux>,
    /// Our TUN interface: never gather candidates on it, or the tunnel would
    /// route into itself.
    pub tun_name: String,
    /// The mesh network: a remote candidate inside it would route into the tunnel.
    pub mesh: Ipv4Net,
    /// The mesh's IPv6 prefix (the coordinator's `Welcome` says it), for the
    /// same reason; `None` while unknown or when the mesh has none.
    pub mesh6: Option<Ipv6Net>,
}

impl IceSettings {
    pub fn from_config(
        ice: &IceConfig,
        tun_name: &str,
        mesh: Ipv4Net,
        mesh6: Option<Ipv6Net>,
        mux: Arc<crate::ice::mux::Mux>,
    ) -> Self {
        let usable = |url: &Url| reachable(&url.host, mux.ipv6());
        let mut urls = Vec::new();
        let mut turn = Vec::new();
        for raw in &ice.stun {
            match Url::parse_url(raw) {
                Ok(url) if usable(&url) => urls.push(url),
                Ok(_) => {}
                Err(e) => tracing::warn!("ignoring STUN URL {raw:?}: {e}"),
            }
        }
        for server in &ice.turn {
            for raw in &server.urls {
                match Url::parse_url(raw) {
                    Ok(url) if !usable(&url) => {}
                    Ok(mut url) => {
                        url.username = server.username.clone();
                        url.password = server.credential.clone();
                        let server = super::host_port(&url.host, url.port);
                        let v6 = url.host.parse::<std::net::Ipv6Addr>().is_ok();
                        // webrtc-ice's TURN client talks to the server through
                        // the shim, whose sockets carry relayed data (turn_shim).
                        if url.scheme == SchemeType::Turn && url.proto == ProtoType::Udp {
                            match mux.turn_shim().local_for(&url.host, url.port) {
                                Ok(local) => {
                                    url.host = local.ip().to_string();
                                    url.port = local.port();
                                }
                                Err(e) => tracing::warn!("TURN shim for {raw:?}: {e}"),
                            }
                        }
                        turn.push(TurnUrl { url, server, v6 });
                    }
                    Err(e) => tracing::warn!("ignoring TURN URL {raw:?}: {e}"),
                }
            }
        }
        IceSettings {
            urls,
            turn,
            mux,
            tun_name: tun_name.to_owned(),
            mesh,
            mesh6,
        }
    }
}

/// Whether a STUN or TURN server at `host` (a URL's host: an IPv6 address
/// without brackets, an IPv4 address or a name) can be asked from our
/// socket: one named by an IPv6 address is out of reach of an IPv4 socket.
fn reachable(host: &str, ipv6: bool) -> bool {
    ipv6 || host.parse::<std::net::Ipv6Addr>().is_err()
}

/// One ICE negotiation with one peer.
pub struct IceSession {
    pub session: u64,
    pub started: std::time::Instant,
    pub agent: Arc<Agent>,
    pub ufrag: String,
    pub pwd: String,
    /// Dropping this cancels a pending `dial`/`accept`.
    cancel: Option<mpsc::Sender<()>>,
    pub conn: Option<crate::dataplane::peer::IceLink>,
    /// The peer's signalled candidates: address and type.
    pub signalled: Vec<(String, CandidateKind)>,
    /// See [`IceSettings::mesh`].
    mesh: Ipv4Net,
    mesh6: Option<Ipv6Net>,
    /// Whether the shared socket reaches IPv6 (see `Mux::ipv6`).
    ipv6: bool,
    /// Where relayed data goes while a shim allocation is selected.
    route: Arc<TurnRoute>,
}

/// One TURN URL as an agent is given it (its host may be the shim's
/// loopback stand-in), and the server it stands for.
#[derive(Clone)]
pub struct TurnUrl {
    pub url: Url,
    /// The real server, `host:port` (the shim's key).
    pub server: String,
    /// Whether the server is named by an IPv6 address.
    pub v6: bool,
}

/// The TURN URLs one ICE session uses: the first of each family whose server
/// is not `silent` (asked, and no answer for a while), else the first of the
/// family. webrtc-ice allocates on every TURN URL it is given, so handing it
/// every replica's server would multiply allocations by the replicas; one
/// per family keeps a relay candidate for each family, and a server that
/// stopped answering is passed over by the next session.
pub fn choose_turn(turn: &[TurnUrl], silent: impl Fn(&str) -> bool) -> Vec<&Url> {
    let mut chosen = Vec::new();
    for v6 in [false, true] {
        let mut family = turn.iter().filter(|t| t.v6 == v6);
        let first = family.clone().next();
        if let Some(t) = family.find(|t| !silent(&t.server)).or(first) {
            chosen.push(&t.url);
        }
    }
    chosen
}

/// Our side of one session.
#[derive(Debug, Clone, Copy)]
pub struct Role {
    pub controlling: bool,
    /// Gather no TURN relay candidates (the offer said so).
    pub direct_only: bool,
}

/// How every agent is set up: host candidates on the shared socket (IPv6
/// too when it is dual-stack), filtered by [`gather_addr`]; a relay
/// candidate per family unless the session is direct-only.
fn agent_config(settings: &IceSettings, role: Role) -> AgentConfig {
    let tun_name = settings.tun_name.clone();
    let (mesh, mesh6) = (settings.mesh, settings.mesh6);
    let mut network_types = vec![NetworkType::Udp4];
    if settings.mux.ipv6() {
        network_types.push(NetworkType::Udp6);
    }
    let shim = settings.mux.turn_shim();
    let mut urls = settings.urls.clone();
    let mut candidate_types = vec![CandidateType::Host, CandidateType::ServerReflexive];
    if !role.direct_only {
        urls.extend(
            choose_turn(&settings.turn, |server| shim.silent(server))
                .into_iter()
                .cloned(),
        );
        candidate_types.push(CandidateType::Relay);
    }
    AgentConfig {
        urls,
        network_types,
        udp_network: UDPNetwork::Muxed(settings.mux.clone()),
        candidate_types,
        multicast_dns_mode: MulticastDnsMode::Disabled,
        interface_filter: Arc::new(Some(Box::new(move |name: &str| name != tun_name))),
        ip_filter: Arc::new(Some(Box::new(move |ip| gather_addr(ip, mesh, mesh6)))),
        is_controlling: role.controlling,
        disconnected_timeout: Some(DISCONNECTED_TIMEOUT),
        failed_timeout: Some(FAILED_TIMEOUT),
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        relay_acceptance_min_wait: Some(RELAY_ACCEPTANCE_MIN_WAIT),
        ..Default::default()
    }
}

impl IceSession {
    pub async fn new(
        settings: &IceSettings,
        role: Role,
        peer: NodeId,
        session: u64,
        events: mpsc::UnboundedSender<IceEvent>,
    ) -> Result<Self, webrtc_ice::Error> {
        let config = agent_config(settings, role);
        Self::with_config(settings, config, peer, session, events).await
    }

    async fn with_config(
        settings: &IceSettings,
        config: AgentConfig,
        peer: NodeId,
        session: u64,
        events: mpsc::UnboundedSender<IceEvent>,
    ) -> Result<Self, webrtc_ice::Error> {
        let agent = Arc::new(Agent::new(config).await?);

        let tx = events.clone();
        agent.on_candidate(Box::new(
            move |c: Option<Arc<dyn Candidate + Send + Sync>>| {
                if let Some(c) = c {
                    let _ = tx.send(IceEvent::Candidate {
                        peer,
                        session,
                        candidate: c.marshal(),
                    });
                }
                Box::pin(async {})
            },
        ));
        let tx = events.clone();
        agent.on_connection_state_change(Box::new(move |state| {
            let _ = tx.send(IceEvent::State {
                peer,
                session,
                state,
            });
            Box::pin(async {})
        }));
        let tx = events;
        let route = TurnRoute::new(peer, settings.mux.turn_shim());
        let selected = Arc::clone(&route);
        // Weak: the agent owns this handler.
        let stats = Arc::downgrade(&agent);
        agent.on_selected_candidate_pair_change(Box::new(move |local, remote| {
            selected.select(local.as_ref(), remote.as_ref());
            let pair = SelectedPair {
                local: kind(local.candidate_type()),
                local_addr: addr(local.as_ref()),
                remote: kind(remote.candidate_type()),
                remote_addr: addr(remote.as_ref()),
            };
            let _ = tx.send(IceEvent::Selected {
                peer,
                session,
                pair,
            });
            let (tx, stats) = (tx.clone(), stats.clone());
            Box::pin(async move {
                // Runs on the agent's own task for these events, which holds
                // none of the locks the statistics take.
                let Some(agent) = stats.upgrade() else {
                    return;
                };
                let remote = agent.get_remote_candidates_stats().await;
                let local = agent.get_local_candidates_stats().await;
                let pairs = agent.get_candidate_pairs_stats().await;
                if super::why::direct_pair_succeeded(&local, &remote, &pairs) {
                    let _ = tx.send(IceEvent::DirectSeen { peer, session });
                }
            })
        }));

        let (ufrag, pwd) = agent.get_local_user_credentials().await;
        agent.gather_candidates()?;
        Ok(IceSession {
            session,
            started: std::time::Instant::now(),
            agent,
            ufrag,
            pwd,
            cancel: None,
            conn: None,
            signalled: Vec::new(),
            mesh: settings.mesh,
            mesh6: settings.mesh6,
            ipv6: settings.mux.ipv6(),
            route,
        })
    }

    /// Starts connectivity checks against the remote credentials; reports `Ready`
    /// or `Failed` when they end. Only the first call per session does anything.
    pub fn connect(
        &mut self,
        controlling: bool,
        peer: NodeId,
        remote_ufrag: String,
        remote_pwd: String,
        events: mpsc::UnboundedSender<IceEvent>,
    ) {
        if self.cancel.is_some() {
            return;
        }
        let (cancel_tx, cancel_rx) = mpsc::channel(1);
        self.cancel = Some(cancel_tx);
        let agent = self.agent.clone();
        let session = self.session;
        let route = Arc::clone(&self.route);
        tokio::spawn(async move {
            let result = if controlling {
                agent
                    .dial(cancel_rx, remote_ufrag, remote_pwd)
                    .await
                    .map(|c| RelayedConn::wrap(c, route))
            } else {
                agent
                    .accept(cancel_rx, remote_ufrag, remote_pwd)
                    .await
                    .map(|c| RelayedConn::wrap(c, route))
            };
            let event = match result {
                Ok(conn) => IceEvent::Ready {
                    peer,
                    session,
                    conn,
                },
                Err(e) => IceEvent::Failed {
                    peer,
                    session,
                    error: e.to_string(),
                },
            };
            let _ = events.send(event);
        });
    }

    /// Adds a signalled candidate; returns its address and type. A peer gets at
    /// most [`MAX_REMOTE_CANDIDATES`] per session, UDP over IP literals only
    /// (IPv6 only when our socket has it), none that [`refuse_remote_addr`]
    /// refuses, so it can neither grow our state nor aim our checks at
    /// arbitrarily many or at local addresses. Addresses must be written as
    /// we would write them: webrtc-ice matches a check's sender to a candidate
    /// by comparing text, so `2001:DB8::1` would never match.
    pub fn add_remote_candidate(
        &mut self,
        raw: &str,
    ) -> Result<(String, CandidateKind), webrtc_ice::Error> {
        if self.signalled.len() >= MAX_REMOTE_CANDIDATES {
            return Err(webrtc_ice::Error::Other("too many candidates".into()));
        }
        let candidate = webrtc_ice::candidate::candidate_base::unmarshal_candidate(raw)?;
        match candidate.network_type() {
            NetworkType::Udp4 => {}
            NetworkType::Udp6 if self.ipv6 => {}
            NetworkType::Udp6 => {
                return Err(webrtc_ice::Error::Other("no IPv6 on this host".into()))
            }
            _ => return Err(webrtc_ice::Error::Other("only UDP".into())),
        }
        let ip: IpAddr = candidate
            .address()
            .parse()
            .map_err(|_| webrtc_ice::Error::Other("address is not an IP literal".into()))?;
        if ip.to_string() != candidate.address() {
            return Err(webrtc_ice::Error::Other(
                "address not in canonical form".into(),
            ));
        }
        if let Some(reason) = refuse_remote_addr(ip, candidate.port(), self.mesh, self.mesh6) {
            return Err(webrtc_ice::Error::Other(reason.into()));
        }
        let candidate: Arc<dyn Candidate + Send + Sync> = Arc::new(candidate);
        let learned = (addr(candidate.as_ref()), kind(candidate.candidate_type()));
        self.agent.add_remote_candidate(&candidate)?;
        self.signalled.push(learned.clone());
        Ok(learned)
    }

    /// Stops the agent in the background (closing can wait on its tasks).
    pub fn close(mut self) {
        self.cancel.take();
        self.route.clear();
        let agent = self.agent.clone();
        tokio::spawn(async move {
            let _ = agent.close().await;
        });
    }
}

fn kind(t: CandidateType) -> CandidateKind {
    match t {
        CandidateType::ServerReflexive => CandidateKind::Srflx,
        CandidateType::PeerReflexive => CandidateKind::Prflx,
        CandidateType::Relay => CandidateKind::Relay,
        _ => CandidateKind::Host,
    }
}

/// `a.b.c.d:port` or `[v6]:port`: what `SocketAddr` parses, so the node can
/// make a selected pair's address the peer's endpoint.
fn addr(c: &(dyn Candidate + Send + Sync)) -> String {
    host_port(&c.address(), c.port())
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
