//! The control plane: this node's side of the conversation with the coordinator.
//!
//! ```text
//!   enrolment (once)   POST /v1/register/challenge, /v1/register ──▶ Enrolment
//!   ControlClient      one WebSocket: ServerMsg ──▶ ControlEvent ──▶ shell (node core)
//!                                     relay frames ──▶ DataPlane::arrive (Origin::Relay)
//!                      Outbound (signals, relay frames) ◀── shell, data plane
//!   transport          TCP/TLS, HTTP/1.1 and the WebSocket upgrade, with timeouts
//!   failover           which replica of several to try next, and when
//!   resume             the digest of the netmap held, so a reconnect need not fetch it again
//! ```
//!
//! Nothing here decides about peers: messages go to the node core as they came.

mod client;
pub mod failover;
pub mod resume;
pub mod transport;

pub use client::*;
