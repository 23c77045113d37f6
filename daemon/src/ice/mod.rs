//! ICE: the async parts that find and keep a path to each peer.
//!
//! ```text
//!   agent    one webrtc-ice Agent per peer session (IceSession), its events ──▶ shell
//!   candidates  which local and remote addresses are candidates (IPv4 and IPv6)
//!   mux      the one UDP socket: STUN ──▶ agents, WireGuard ──▶ DataPlane::arrive
//!   inbox    an agent's datagrams, read by each of its host candidates
//!   netcheck what the network allows (UDP, NAT mapping), measured with STUN
//!   why      `overlayctl why`: what an attempt saw, and a conclusion
//!   turn_shim  webrtc-ice's TURN clients reach their server through the daemon's
//!            sockets, so relayed WireGuard skips the agent (turn_conn, turn_channels)
//! ```
//!
//! The decisions (when to start, retry or give up on a session, which side
//! offers, which path packets take) are the node core's (`crate::node`); this
//! module only runs what it decided. The TURN credential refresh schedule is
//! a decision too, so it lives in `node::ice_refresh`.

mod agent;
pub mod candidates;
mod inbox;
pub mod mux;
pub mod netcheck;
mod turn_channels;
mod turn_conn;
pub mod turn_shim;
pub mod why;

pub use agent::*;
pub use candidates::host_port;
