//! `overlayctl` ⇄ `overlayd` over the daemon's Unix socket.
//!
//! The client writes one [`Request`] as a JSON line; the daemon answers with one or
//! more [`Response`] JSON lines (a ping streams one `PingReply` per answer, then
//! `PingDone`) and closes the connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::signal::{MappingBehaviour, NatSummary};
use crate::NodeId;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/overlay/overlayd.sock";
/// Environment variable that overrides the socket path for `overlayctl`.
pub const SOCKET_ENV: &str = "OVERLAY_SOCKET";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Peers,
    Ping {
        /// A peer's name or mesh IP.
        target: String,
        count: u32,
        interval_ms: u64,
        timeout_ms: u64,
    },
    Down,
    /// Measure the network: UDP, public address, NAT mapping, TURN, coordinator latency.
    Netcheck,
    /// Explain the path to one peer (name or mesh IP).
    Why {
        peer: String,
    },
    /// The node's metrics in the Prometheus text format.
    Metrics,
    /// The access rules this node enforces.
    Policy,
    /// Ask the node's mesh resolver (`overlayctl dns query`).
    DnsQuery {
        name: String,
        /// `A`, `AAAA`, `PTR`, ...; default `A` (`PTR` for an IPv4 address).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Peers {
        peers: Vec<PeerStatus>,
    },
    PingReply(PingReply),
    PingDone(PingSummary),
    Netcheck(NetcheckReport),
    Why(Box<WhyReport>),
    /// Prometheus text format (version 0.0.4).
    Metrics {
        text: String,
    },
    Policy(Box<PolicyReport>),
    DnsAnswer {
        /// `No Error`, `Non-Existent Domain`, ...
        rcode: String,
        /// `NAME TTL IN TYPE DATA`, one per record.
        answers: Vec<String>,
    },
    Ok,
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub node_id: NodeId,
    pub mesh_ip: Ipv4Addr,
    pub network: Ipv4Net,
    /// The node's mesh IPv6 address and the mesh's prefix, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ip6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network6: Option<Ipv6Net>,
    pub interface: String,
    pub public_key: String,
    pub coordinator: String,
    pub coordinator_connected: bool,
    pub uptime_secs: u64,
    pub version: String,
    /// What the daemon refused or could not deliver since it started.
    #[serde(default)]
    pub dropped: Dropped,
    /// The mesh's DNS as this node serves it; absent while the coordinator
    /// sent no DNS settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
}

/// The mesh resolver on this node, and what the host was told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    pub domain: String,
    /// The mesh address the resolver answers on (UDP and TCP 53).
    pub resolver: Ipv4Addr,
    /// Its IPv6 address in the mesh prefix, when the mesh has IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver6: Option<std::net::Ipv6Addr>,
    /// `auto`, `resolv-conf` or `off` (`overlayd --dns`).
    pub mode: String,
    /// What was done to the host's DNS, or how to set it up.
    pub host: String,
    /// Where names outside the mesh are forwarded (resolv.conf mode).
    pub upstreams: Vec<String>,
    /// Names the resolver answers (this node, its peers, extra records).
    pub names: u64,
    pub answered: u64,
    pub forwarded: u64,
    /// Malformed queries (dropped or answered FORMERR).
    pub bad: u64,
}

/// Counters of refused input and undeliverable packets. Counters a daemon does
/// not know yet read as zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dropped {
    /// Packets from the TUN to a mesh address no peer owns.
    pub no_route: u64,
    /// Decrypted packets whose source was not the sending peer's mesh IP.
    pub spoofed_source: u64,
    /// Datagrams WireGuard refused (not for us, replayed, corrupt).
    pub bad_datagram: u64,
    /// Packets for the coordination relay while its queue was full.
    pub relay_queue_full: u64,
    /// Decrypted packets addressed to anything but this node's mesh address.
    pub wrong_destination: u64,
    /// Signaling messages that did not open with the sender's key or did not parse.
    pub bad_signal: u64,
    /// Sealed signals seen before (counter not above the last one accepted).
    pub replayed_signal: u64,
    /// Sealed signals whose sender or recipient inside the box was wrong: our own
    /// signal reflected back, or one meant for another node.
    pub misdirected_signal: u64,
    /// ICE offers (and restart requests) beyond the per-peer session rate.
    pub excess_offer: u64,
    /// Signals we did not send because a peer's (or our total) signaling budget
    /// was spent.
    pub signal_budget: u64,
    /// Packets from peers the access policy refused (no rule opens them and
    /// they belong to no connection it let through).
    pub policy: u64,
    /// Packets to peers refused here, before encryption, because the peer's
    /// policy would refuse them: no bandwidth is spent on them.
    pub policy_out: u64,
    /// Packets a rule let through whose connection the full flow table could
    /// not record (their replies then need a rule of their own).
    pub flow_table_full: u64,
}

/// How packets to a peer travel right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// An ICE pair without a relay candidate on either side.
    Direct,
    /// An ICE pair through a TURN relay.
    Turn,
    /// The coordination server's packet relay over the control WebSocket.
    CoordRelay,
    /// No path can carry packets yet (peer offline, or no coordinator and no ICE).
    Connecting,
    /// No data either way for the idle timeout: no ICE session, no consent
    /// checks, no keepalives. The next packet goes by the coordination relay
    /// while ICE starts again.
    Idle,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: NodeId,
    pub name: String,
    pub mesh_ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ip6: Option<Ipv6Addr>,
    pub public_key: String,
    pub online: bool,
    pub path_kind: PathKind,
    /// Human form: `direct (host)`, `direct (srflx)`, `turn (relay via ADDR)`,
    /// `coord relay`, `connecting`.
    pub path: String,
    /// Remote address of the selected ICE pair, when there is one.
    pub endpoint: Option<String>,
    /// Local address of the selected ICE pair, when there is one.
    pub local_endpoint: Option<String>,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Packets through the tunnel; absent from daemons that predate them.
    #[serde(default)]
    pub rx_packets: u64,
    #[serde(default)]
    pub tx_packets: u64,
    /// What the access policy lets the peer open towards us and us towards
    /// it (`tcp 22; icmp`, `everything`, `nothing`); absent without a policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<PeerAccessView>,
    /// Packets from this peer the policy refused.
    #[serde(default)]
    pub dropped_policy: u64,
    /// Packets to this peer refused before sending.
    #[serde(default)]
    pub dropped_policy_out: u64,
    /// Connections the filter tracks with this peer.
    #[serde(default)]
    pub flows: u64,
    /// The peer's name under the mesh domain, when the mesh has DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
}

/// The access policy between this node and one peer, in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAccessView {
    /// What the peer may open towards us.
    pub inbound: String,
    /// What we may open towards the peer.
    pub outbound: String,
}

/// The access rules a node enforces (`overlayctl policy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// `None`: no policy is set; every peer may reach every port.
    pub filter: Option<crate::filter::NodeFilter>,
    /// Each peer in the netmap: name, mesh IP, and what may open each way.
    pub peers: Vec<(String, Ipv4Addr, PeerAccessView)>,
    /// Connections the filter tracks, and its cap.
    pub flows: u64,
    pub flow_cap: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReply {
    pub seq: u16,
    pub from: IpAddr,
    pub rtt_ms: f64,
    /// The path the request left on.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingSummary {
    pub target: IpAddr,
    pub sent: u32,
    pub received: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StunProbe {
    pub server: String,
    /// Our address and port as that server saw them.
    pub mapped: Option<String>,
    pub rtt_ms: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnProbe {
    pub server: String,
    /// The relayed address TURN allocated for us, when allocation worked.
    pub relay_addr: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetcheckReport {
    /// Whether any STUN server answered over UDP.
    pub udp: bool,
    pub public_addr: Option<SocketAddr>,
    pub mapping: MappingBehaviour,
    pub stun: Vec<StunProbe>,
    pub turn: Vec<TurnProbe>,
    /// Round trip of a control-stream ping to the coordination server.
    pub coordinator_rtt_ms: Option<f64>,
    /// Whether any STUN server answered over IPv6 (false when the node has no
    /// global IPv6 address or the coordinator announces no IPv6 STUN).
    #[serde(default)]
    pub udp6: bool,
    /// Our IPv6 address and port as a STUN server saw them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_addr6: Option<SocketAddr>,
}

impl NetcheckReport {
    pub fn summary(&self) -> NatSummary {
        NatSummary {
            udp: self.udp,
            mapping: self.mapping,
            public_addr: self.public_addr,
        }
    }
}

/// One candidate pair ICE checked, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairReport {
    pub local: String,
    pub remote: String,
    /// `succeeded`, `failed (no answer)`, `in progress`, `waiting`.
    pub outcome: String,
    pub nominated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhyReport {
    pub peer: String,
    pub mesh_ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ip6: Option<Ipv6Addr>,
    pub online: bool,
    pub path_kind: PathKind,
    pub path: String,
    /// Whether this node drives ICE with the peer (smaller public key).
    pub controlling: bool,
    /// Candidates of the latest ICE attempt, `type addr:port`.
    pub local_candidates: Vec<String>,
    pub remote_candidates: Vec<String>,
    pub pairs: Vec<PairReport>,
    /// Seconds since the latest ICE attempt started.
    pub attempt_age_secs: Option<u64>,
    pub local_nat: Option<NatSummary>,
    pub remote_nat: Option<NatSummary>,
    /// When the next direct attempt is due, if the peer is not on a direct path.
    pub next_attempt_in_secs: Option<u64>,
    /// One plain sentence.
    pub conclusion: String,
    /// What the access policy lets through each way; absent without a policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<PeerAccessView>,
}
