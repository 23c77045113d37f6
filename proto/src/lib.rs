//! Every message that crosses a process boundary in overlay.
//!
//! Like Tailscale's `tailcfg`, this crate holds types and their encoding, plus
//! the pure functions both ends of a message must agree on byte for byte (the
//! enrolment proof): no runtime, no sockets.
//!
//! - [`coord`]: a node and the coordination server (`overlay-coord`): the HTTP
//!   enrolment call, the WebSocket control stream and its binary relay frames.
//! - [`enrol`]: the proof of key possession a registration carries.
//! - [`filter`]: the access rules the coordinator compiles for each node.
//! - [`api`]: `overlayctl` and the local `overlayd` over its Unix socket.
//! - [`config_file`]: how both programs read their TOML file and word its errors.
//! - [`ratelimit`]: the token bucket each end bounds the other's control traffic with.
//! - [`signal`]: what two nodes tell each other (ICE credentials and candidates),
//!   sealed for the target so the coordination server only routes it.

pub mod api;
pub mod config_file;
pub mod coord;
pub mod enrol;
pub mod filter;
pub mod ratelimit;
pub mod relay;
pub mod signal;

/// A node's identity on the coordination server. Assigned at enrolment, never reused.
pub type NodeId = u64;

/// Version of the control protocol spoken over `/v1/connect`; bumped on any
/// incompatible change so a mismatched node and server say so instead of misparsing.
pub const PROTOCOL_VERSION: u32 = 1;
