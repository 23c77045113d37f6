//! The edge that owns webrtc-ice agents. It makes no decisions: it turns agent
//! callbacks into [`IceEvent`]s for the engine, which feeds them to the peer's
//! [`crate::node::path::PathState`].

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
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
    pub urls: Vec<Url>,
    /// The shared socket every agent's host candidates live on.
    pub mux: Arc<crate::ice::mux::Mux>,
    /// Our TUN interface: never gather candidates on it, or the tunnel would
    /// route into itself.
    pub tun_name: String,
    /// The mesh network: a remote candidate inside it would route into the tunnel.
    pub mesh: Ipv4Net,
}

impl IceSettings {
    pub fn from_config(
        ice: &IceConfig,
        tun_name: &str,
        mesh: Ipv4Net,
        mux: Arc<crate::ice::mux::Mux>,
    ) -> Self {
        let mut urls = Vec::new();
        for raw in &ice.stun {
            match Url::parse_url(raw) {
                Ok(url) => urls.push(url),
                Err(e) => tracing::warn!("ignoring STUN URL {raw:?}: {e}"),
            }
        }
        for server in &ice.turn {
            for raw in &server.urls {
                match Url::parse_url(raw) {
                    Ok(mut url) => {
                        url.username = server.username.clone();
                        url.password = server.credential.clone();
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
                        urls.push(url);
                    }
                    Err(e) => tracing::warn!("ignoring TURN URL {raw:?}: {e}"),
                }
            }
        }
        IceSettings {
            urls,
            mux,
            tun_name: tun_name.to_owned(),
            mesh,
        }
    }
}

/// Why a remote candidate's address is refused: a peer must not aim our
/// connectivity checks (STUN requests from our socket) at this host, its local
/// networks' broadcast or multicast groups, or through the tunnel itself.
pub fn refuse_remote_addr(ip: Ipv4Addr, port: u16, mesh: Ipv4Net) -> Option<&'static str> {
    if port == 0 {
        Some("port 0")
    } else if ip.is_unspecified() || ip.octets()[0] == 0 {
        Some("unspecified address")
    } else if ip.is_loopback() {
        Some("loopback address")
    } else if ip.is_multicast() {
        Some("multicast address")
    } else if ip.is_broadcast() {
        Some("broadcast address")
    } else if ip.is_link_local() {
        Some("link-local address")
    } else if mesh.contains(&ip) {
        Some("address inside the mesh network")
    } else {
        None
    }
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
    /// Where relayed data goes while a shim allocation is selected.
    route: Arc<TurnRoute>,
}

impl IceSession {
    pub async fn new(
        settings: &IceSettings,
        controlling: bool,
        peer: NodeId,
        session: u64,
        events: mpsc::UnboundedSender<IceEvent>,
    ) -> Result<Self, webrtc_ice::Error> {
        let tun_name = settings.tun_name.clone();
        let config = AgentConfig {
            urls: settings.urls.clone(),
            network_types: vec![NetworkType::Udp4],
            udp_network: UDPNetwork::Muxed(settings.mux.clone()),
            candidate_types: vec![
                CandidateType::Host,
                CandidateType::ServerReflexive,
                CandidateType::Relay,
            ],
            multicast_dns_mode: MulticastDnsMode::Disabled,
            interface_filter: Arc::new(Some(Box::new(move |name: &str| name != tun_name))),
            is_controlling: controlling,
            disconnected_timeout: Some(DISCONNECTED_TIMEOUT),
            failed_timeout: Some(FAILED_TIMEOUT),
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            relay_acceptance_min_wait: Some(RELAY_ACCEPTANCE_MIN_WAIT),
            ..Default::default()
        };
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
            Box::pin(async {})
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
    /// most [`MAX_REMOTE_CANDIDATES`] per session, UDP over IPv4 literals only,
    /// none that [`refuse_remote_addr`] refuses, so it can neither grow our state
    /// nor aim our checks at arbitrarily many or at local addresses.
    pub fn add_remote_candidate(
        &mut self,
        raw: &str,
    ) -> Result<(String, CandidateKind), webrtc_ice::Error> {
        if self.signalled.len() >= MAX_REMOTE_CANDIDATES {
            return Err(webrtc_ice::Error::Other("too many candidates".into()));
        }
        let candidate = webrtc_ice::candidate::candidate_base::unmarshal_candidate(raw)?;
        if candidate.network_type() != NetworkType::Udp4 {
            return Err(webrtc_ice::Error::Other("only UDP over IPv4".into()));
        }
        let ip: Ipv4Addr = candidate
            .address()
            .parse()
            .map_err(|_| webrtc_ice::Error::Other("address is not an IPv4 literal".into()))?;
        if let Some(reason) = refuse_remote_addr(ip, candidate.port(), self.mesh) {
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

fn addr(c: &(dyn Candidate + Send + Sync)) -> String {
    format!("{}:{}", c.address(), c.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str, port: u16) -> Option<&'static str> {
        let mesh: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        refuse_remote_addr(ip.parse().unwrap(), port, mesh)
    }

    #[test]
    fn ordinary_addresses_are_accepted() {
        for ip in [
            "10.77.1.3",
            "192.168.1.20",
            "203.0.113.9",
            "172.16.0.1",
            "100.128.0.1",
        ] {
            assert_eq!(refused(ip, 41641), None, "{ip}");
        }
    }

    #[test]
    fn local_special_and_mesh_addresses_are_refused() {
        let cases = [
            ("0.0.0.0", "unspecified address"),
            ("0.1.2.3", "unspecified address"),
            ("127.0.0.1", "loopback address"),
            ("127.8.9.10", "loopback address"),
            ("224.0.0.251", "multicast address"),
            ("239.255.255.250", "multicast address"),
            ("255.255.255.255", "broadcast address"),
            ("169.254.169.254", "link-local address"),
            ("100.64.0.1", "address inside the mesh network"),
            ("100.127.255.254", "address inside the mesh network"),
        ];
        for (ip, reason) in cases {
            assert_eq!(refused(ip, 41641), Some(reason), "{ip}");
        }
        assert_eq!(refused("10.77.1.3", 0), Some("port 0"));
    }

    #[tokio::test]
    async fn session_refuses_hostile_candidates_and_takes_ordinary_ones() {
        let settings = IceSettings {
            urls: Vec::new(),
            mux: crate::ice::mux::Mux::bind().await.expect("UDP socket"),
            tun_name: "ovl-test".into(),
            mesh: "100.64.0.0/10".parse().unwrap(),
        };
        let (events, _rx) = mpsc::unbounded_channel();
        let mut session = IceSession::new(&settings, true, 2, 1, events)
            .await
            .expect("agent");
        let line =
            |addr: &str, port: u16| format!("candidate:1 1 udp 2130706431 {addr} {port} typ host");
        for (addr, port) in [
            ("127.0.0.1", 5000),
            ("0.0.0.0", 5000),
            ("224.0.0.1", 5000),
            ("169.254.1.1", 5000),
            ("100.64.0.7", 5000),
            ("10.1.2.3", 0),
            ("evil\u{1b}[2J.local", 5000),
        ] {
            assert!(
                session.add_remote_candidate(&line(addr, port)).is_err(),
                "{addr}:{port} accepted"
            );
        }
        assert!(session.signalled.is_empty());
        let (addr, kind) = session
            .add_remote_candidate(&line("10.1.2.3", 5000))
            .expect("an ordinary LAN candidate");
        assert_eq!(
            (addr.as_str(), kind),
            ("10.1.2.3:5000", CandidateKind::Host)
        );
        session.close();
    }

    #[test]
    fn the_mesh_network_is_the_netmaps() {
        let mesh: Ipv4Net = "10.200.0.0/16".parse().unwrap();
        assert!(refuse_remote_addr("10.200.3.4".parse().unwrap(), 9, mesh).is_some());
        assert!(refuse_remote_addr("100.64.0.1".parse().unwrap(), 9, mesh).is_none());
    }
}
