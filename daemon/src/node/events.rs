//! The node core's vocabulary: what the shell feeds in ([`IceInput`]) and what
//! the node decides ([`Output`], [`Route`], [`PathView`]).

use std::net::SocketAddr;

use overlay_proto::api::PathKind;
use overlay_proto::coord::{DnsConfig, IceConfig, PeerInfo};
use overlay_proto::signal::SealedSignal;
use overlay_proto::NodeId;

use super::access::PeerAccess;
use super::path::SelectedPair;
#[cfg(doc)]
use super::Node;

/// What the node decided; the shell carries it out in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A new peer: create its WireGuard session and add it to the data plane.
    PeerAdded {
        info: PeerInfo,
        public_key: [u8; 32],
        /// What the access policy lets through with this peer; `None`: no policy.
        access: Option<PeerAccess>,
    },
    /// The access policy towards this peer changed (a new filter, or the
    /// peer's tags): the data plane enforces this from now on.
    Access {
        peer: NodeId,
        access: Option<PeerAccess>,
    },
    /// A peer's name or online state changed.
    PeerUpdated(PeerInfo),
    /// The peer left the netmap: drop it from the data plane.
    PeerRemoved(NodeId),
    /// Seal this plaintext with the peer's key and send it via the coordinator.
    Signal(SealedSignal),
    /// Create an ICE agent for `session`, then report with
    /// [`Node::ice_created`] or [`Node::ice_create_failed`].
    StartIce {
        peer: NodeId,
        session: u64,
        controlling: bool,
        /// Gather no TURN relay candidates (see `PathState::on_direct_seen`).
        direct_only: bool,
    },
    /// Start connectivity checks against the remote credentials.
    ConnectIce {
        peer: NodeId,
        session: u64,
        controlling: bool,
        ufrag: String,
        pwd: String,
    },
    /// Add a signalled candidate to the agent; report with
    /// [`Node::remote_candidate_added`].
    AddRemoteCandidate {
        peer: NodeId,
        session: u64,
        candidate: String,
    },
    /// Keep what the agent saw (for `overlayctl why`) before it closes.
    RecordAttempt { peer: NodeId, session: u64 },
    /// Close the agent of `session`.
    CloseIce { peer: NodeId, session: u64 },
    /// Where the data plane sends the peer's packets from now on.
    Path { peer: NodeId, route: Route },
    /// The peer turned idle (`true`: the data plane sends it no keepalives)
    /// or woke (`false`: keepalives again). See `node::idle`.
    Idle { peer: NodeId, idle: bool },
    /// The mesh's DNS settings (domain, resolver address, extra records).
    Dns(Option<DnsConfig>),
    /// New STUN/TURN settings for agents created from now on.
    IceSettings(IceConfig),
    /// Ask the coordinator for fresh TURN credentials.
    RefreshIce,
    /// Measure the network; report with [`Node::handle_netcheck`].
    Netcheck,
    /// An input was refused; count it.
    Dropped(Dropped),
}

/// Why the node refused a signal or could not send one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    Misdirected,
    Replayed,
    Malformed,
    /// The peer made us start new ICE sessions too often.
    ExcessOffer,
    /// Our own signaling budget is spent.
    SignalBudget,
}

/// How packets reach one peer, and how that path is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The remote address of a selected pair on our shared socket.
    pub endpoint: Option<SocketAddr>,
    /// The ICE connection of this session carries packets (a TURN pair, or the
    /// fallback when a send on the shared socket fails).
    pub ice_conn: Option<u64>,
    pub view: PathView,
}

/// A path as `overlayctl` shows it: computed here, once, for logs, the local API
/// and `overlayctl why`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathView {
    pub kind: PathKind,
    pub label: String,
    pub remote: Option<String>,
    pub local: Option<String>,
}

impl PathView {
    pub fn connecting() -> Self {
        PathView {
            kind: PathKind::Connecting,
            label: "connecting".into(),
            remote: None,
            local: None,
        }
    }

    /// A peer without traffic: no ICE session; packets would take the relay.
    pub fn idle() -> Self {
        PathView {
            kind: PathKind::Idle,
            label: "idle".into(),
            remote: None,
            local: None,
        }
    }

    /// The label with the pair's remote address, as path changes are logged.
    pub fn log_label(&self) -> String {
        match (&self.kind, &self.remote) {
            (PathKind::Direct | PathKind::Turn, Some(remote)) => {
                format!("{} via {remote}", self.label)
            }
            _ => self.label.clone(),
        }
    }
}

/// What an ICE agent reported about the current session.
#[derive(Debug, Clone, PartialEq)]
pub enum IceInput {
    /// A local candidate to signal.
    Candidate(String),
    Selected(SelectedPair),
    /// When the pair was selected, a direct pair (neither side a relay) had
    /// passed its checks too.
    DirectSeen,
    /// `dial`/`accept` returned a connection.
    Ready,
    Connected,
    Disconnected,
    /// The agent's state went to failed.
    Failed,
    /// `dial`/`accept` failed.
    Error(String),
}
