//! Two nodes wired back to back on fake time: what the node tests drive.
//!
//! `Mesh::run` plays both shells: signals go straight to the other node, every
//! `StartIce` gets an agent at once (credentials derived from the session id),
//! and everything else is kept in a log per node for the test to read.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use overlay_proto::coord::{IceConfig, PeerInfo, ServerMsg};
use overlay_proto::signal::{PeerSignal, SealedSignal};
use overlay_proto::NodeId;

use super::path::{CandidateKind, SelectedPair};
use super::{IceInput, Node, Output, Route};

pub const A: NodeId = 1;
pub const B: NodeId = 2;
/// A's key is the smaller: A controls ICE.
pub const KEY_A: [u8; 32] = [1; 32];
pub const KEY_B: [u8; 32] = [2; 32];
/// 2024-12-12 in microseconds since the epoch.
pub const UNIX_T0: u64 = 1_733_990_400_000_000;

pub fn info(id: NodeId, online: bool) -> PeerInfo {
    let key = if id == A { KEY_A } else { KEY_B };
    PeerInfo {
        id,
        name: format!("n{id}"),
        mesh_ip: Ipv4Addr::new(100, 64, 0, id as u8),
        mesh_ip6: None,
        public_key: base64::engine::general_purpose::STANDARD.encode(key),
        online,
        tags: Vec::new(),
    }
}

pub fn welcome(peers: Vec<PeerInfo>, ice: IceConfig, more: bool) -> ServerMsg {
    ServerMsg::Welcome {
        protocol: overlay_proto::PROTOCOL_VERSION,
        node: info(0, true),
        network6: None,
        network: "100.64.0.0/10".parse().expect("network"),
        peers,
        ice,
        more,
        filter: None,
        resumed: false,
    }
}

pub fn new_node(me: NodeId, t0: Instant, seed: u64) -> Node {
    let key = if me == A { KEY_A } else { KEY_B };
    let mut node = Node::new(me, key, t0, UNIX_T0, seed);
    node.set_coordinator_connected(true);
    node
}

pub fn drain(node: &mut Node) -> Vec<Output> {
    std::iter::from_fn(|| node.poll_output()).collect()
}

pub fn sealed(outputs: &[Output]) -> Vec<SealedSignal> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Signal(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

pub fn starts(outputs: &[Output]) -> Vec<u64> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::StartIce { session, .. } => Some(*session),
            _ => None,
        })
        .collect()
}

pub fn routes(outputs: &[Output]) -> Vec<Route> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Path { route, .. } => Some(route.clone()),
            _ => None,
        })
        .collect()
}

pub fn host_pair() -> SelectedPair {
    SelectedPair {
        local: CandidateKind::Host,
        local_addr: "10.0.0.1:5000".into(),
        remote: CandidateKind::Host,
        remote_addr: "10.0.0.2:6000".into(),
    }
}

pub fn turn_pair() -> SelectedPair {
    SelectedPair {
        local: CandidateKind::Relay,
        local_addr: "192.0.2.9:3478".into(),
        remote: CandidateKind::Host,
        remote_addr: "10.0.0.2:6000".into(),
    }
}

/// Two nodes that know each other, a clock, and what each one emitted.
pub struct Mesh {
    pub a: Node,
    pub b: Node,
    pub now: Instant,
    pub log_a: Vec<Output>,
    pub log_b: Vec<Output>,
    /// Signals are carried while true; dropped (lost) otherwise.
    pub carry: bool,
}

impl Mesh {
    /// Two nodes that just applied their netmaps (no timeout ran yet).
    pub fn new() -> Self {
        Self::with_idle_timeout(None)
    }

    /// As [`Mesh::new`], with both nodes lazy (`idle`) before the netmap.
    pub fn with_idle_timeout(idle: Option<Duration>) -> Self {
        let now = Instant::now();
        let node = |me, other| {
            let mut node = new_node(me, now, me);
            node.set_idle_timeout(idle);
            node.handle_server_msg(
                welcome(vec![info(other, true)], IceConfig::default(), false),
                now,
                UNIX_T0 / 1_000_000,
            );
            node
        };
        let mut mesh = Mesh {
            a: node(A, B),
            b: node(B, A),
            now,
            log_a: Vec::new(),
            log_b: Vec::new(),
            carry: true,
        };
        mesh.run();
        mesh
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.run();
    }

    /// Plays both shells until neither node has anything left to say.
    pub fn run(&mut self) {
        loop {
            let mut busy = false;
            while let Some(out) = self.a.poll_output() {
                busy = true;
                play(
                    &mut self.a,
                    &mut self.b,
                    A,
                    out.clone(),
                    self.now,
                    self.carry,
                );
                self.log_a.push(out);
            }
            while let Some(out) = self.b.poll_output() {
                busy = true;
                play(
                    &mut self.b,
                    &mut self.a,
                    B,
                    out.clone(),
                    self.now,
                    self.carry,
                );
                self.log_b.push(out);
            }
            if !busy {
                return;
            }
        }
    }

    /// Runs until A and B both use the pair `pair`, connected.
    pub fn connect_with(&mut self, pair: SelectedPair) {
        self.advance(Duration::ZERO);
        let (sa, sb) = (self.a.session(B), self.b.session(A));
        let (Some(sa), Some(sb)) = (sa, sb) else {
            panic!("no session: a {sa:?} b {sb:?}");
        };
        assert_eq!(sa, sb, "both sides in one session");
        for (node, peer) in [(&mut self.a, B), (&mut self.b, A)] {
            node.handle_ice(peer, sa, IceInput::Selected(pair.clone()), self.now);
            node.handle_ice(peer, sa, IceInput::Ready, self.now);
        }
        self.run();
    }

    pub fn route_a(&self) -> Route {
        routes(&self.log_a).pop().expect("a route")
    }
}

fn play(me: &mut Node, other: &mut Node, id: NodeId, out: Output, now: Instant, carry: bool) {
    match out {
        Output::Signal(s) if carry => other.handle_signal(id, s, now),
        Output::StartIce { peer, session, .. } => {
            me.ice_created(peer, session, ufrag(session), PWD.into(), now)
        }
        _ => {}
    }
}

/// The ICE username fragment the fake agent of `session` has.
pub fn ufrag(session: u64) -> String {
    format!("ufrag{session}")
}

/// Every fake agent's ICE password (22 `ice-char`s, as RFC 8445 wants).
pub const PWD: &str = "pppppppppppppppppppppp";

/// A signal from `from` to `to` with the given counter, as a peer would seal it.
pub fn forged(from: NodeId, to: NodeId, counter: u64, signal: PeerSignal) -> SealedSignal {
    SealedSignal {
        from,
        to,
        counter,
        signal,
    }
}
