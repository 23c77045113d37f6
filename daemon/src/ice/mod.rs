//! ICE: the async parts that find and keep a path to each peer.
//!
//! ```text
//!   agent    one webrtc-ice Agent per peer session (IceSession), its events ──▶ shell
//!   mux      the one UDP socket: STUN ──▶ agents, WireGuard ──▶ DataPlane::arrive
//!   netcheck what the network allows (UDP, NAT mapping), measured with STUN
//!   why      `overlayctl why`: what an attempt saw, and a conclusion
//! ```
//!
//! The decisions (when to start, retry or give up on a session, which side
//! offers, which path packets take) are the node core's (`crate::node`); this
//! module only runs what it decided. The TURN credential refresh schedule is
//! a decision too, so it lives in `node::ice_refresh`.

mod agent;
pub mod mux;
pub mod netcheck;
pub mod why;

pub use agent::*;
