//! `overlayctl` ⇄ `overlayd` over the daemon's Unix socket.
//!
//! The client writes one [`Request`] as a JSON line; the daemon answers with one or
//! more [`Response`] JSON lines (a ping streams one `PingReply` per answer, then
//! `PingDone`) and closes the connection.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Peers { peers: Vec<PeerStatus> },
    PingReply(PingReply),
    PingDone(PingSummary),
    Ok,
    Error { message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub node_id: NodeId,
    pub mesh_ip: Ipv4Addr,
    pub network: Ipv4Net,
    pub interface: String,
    pub public_key: String,
    pub coordinator: String,
    pub coordinator_connected: bool,
    pub uptime_secs: u64,
    pub version: String,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: NodeId,
    pub name: String,
    pub mesh_ip: Ipv4Addr,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReply {
    pub seq: u16,
    pub from: Ipv4Addr,
    pub rtt_ms: f64,
    /// The path the request left on.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingSummary {
    pub target: Ipv4Addr,
    pub sent: u32,
    pub received: u32,
}
