//! What two nodes say to each other through the coordination server.
//!
//! The server forwards [`crate::coord::ClientMsg::Signal`] payloads without reading
//! them: a payload is a [`PeerSignal`] as JSON, sealed with NaCl `crypto_box`
//! (X25519 + XSalsa20-Poly1305) from the sender's WireGuard key to the target's,
//! and encoded as standard base64 of `nonce (24 bytes) || ciphertext`. Sealing lives
//! in the daemon; this module only defines the plaintext.

use serde::{Deserialize, Serialize};

/// One ICE negotiation between two nodes is a *session*: the controlling node (the
/// one with the smaller public key) opens it with an `Offer`, the controlled node
/// answers, and both trickle candidates tagged with the session id. A new `Offer`
/// is an ICE restart; messages of any other session are stale and ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerSignal {
    Offer {
        session: u64,
        ufrag: String,
        pwd: String,
    },
    Answer {
        session: u64,
        ufrag: String,
        pwd: String,
    },
    Candidate {
        session: u64,
        /// An ICE candidate in SDP attribute form (`candidate:...` without `a=`).
        candidate: String,
    },
    /// Sent by the controlled node when its path failed or it (re)started, asking
    /// the controlling node to open a new session.
    RestartRequest { reason: String },
    /// What the sender's netcheck found, so `overlayctl why` can show both sides.
    NetInfo { nat: NatSummary },
}

/// How a node's NAT maps one local UDP port towards different destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MappingBehaviour {
    /// The same public address and port for every destination (no NAT, or a
    /// "cone" NAT): hole punching works.
    EndpointIndependent,
    /// A new public port per destination ("symmetric" NAT): direct paths to
    /// another such node are impossible; TURN is needed.
    EndpointDependent,
    /// No STUN server answered: UDP does not get out.
    NoUdp,
    /// Fewer than two STUN servers answered, so the behaviour could not be told.
    Unknown,
}

/// The part of a netcheck report a node shares with its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatSummary {
    pub udp: bool,
    pub mapping: MappingBehaviour,
    /// The address and port STUN saw, when it answered.
    pub public_addr: Option<String>,
}

/// Size of the nonce at the front of a sealed payload.
pub const NONCE_LEN: usize = 24;
/// Largest sealed payload (after base64) a node accepts; candidates are small.
pub const MAX_SEALED_LEN: usize = 8 * 1024;
