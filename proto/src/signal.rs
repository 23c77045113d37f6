//! What two nodes say to each other through the coordination server.
//!
//! The server forwards [`crate::coord::ClientMsg::Signal`] payloads without reading
//! them: a payload is a [`SealedSignal`] as JSON, sealed with NaCl `crypto_box`
//! (X25519 + XSalsa20-Poly1305) from the sender's WireGuard key to the target's,
//! and encoded as standard base64 of `nonce (24 bytes) || ciphertext`. Sealing lives
//! in the daemon; this module only defines the plaintext:
//!
//! ```text
//! {"from":7,"to":9,"counter":1733990400123456,"type":"offer","session":1,"ufrag":"..","pwd":".."}
//!  └ sender └ target └ strictly increasing per sender  └ the PeerSignal, flattened
//! ```
//!
//! `crypto_box` uses one shared key for both directions, so the box alone does not
//! say who sealed it: `from`/`to` bind the direction (a coordinator reflecting a
//! node's own box back to it is caught), and `counter` makes every box usable once
//! (a replayed box is caught). The counter is the sender's clock in microseconds
//! since the Unix epoch, or one more than its previous counter when that is larger,
//! so it keeps increasing across a restart of the sender without any stored state.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// The plaintext inside every sealed payload: who sealed it for whom, when, and
/// the signal itself. Unknown fields are ignored, so fields can be added later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSignal {
    /// The sender's node id; must equal the id the server stamped.
    pub from: NodeId,
    /// The target's node id; must be the receiver's own id.
    pub to: NodeId,
    /// Strictly increasing per sender (see the module comment).
    pub counter: u64,
    #[serde(flatten)]
    pub signal: PeerSignal,
}

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
        /// Both sides gather no TURN relay candidates in this session: the
        /// last one settled on TURN although a direct pair had passed its
        /// checks, and another full session could pick the relay again (a
        /// check from a relay that arrives before its candidate is signalled
        /// reads as peer-reflexive and outranks a server-reflexive pair).
        /// Absent from older nodes' offers: false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        direct_only: bool,
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
    /// The address and port STUN saw, when it answered. Typed, so a peer's signal
    /// carrying anything but an address does not parse and is dropped.
    pub public_addr: Option<SocketAddr>,
}

/// Size of the nonce at the front of a sealed payload.
pub const NONCE_LEN: usize = 24;
/// Largest sealed payload (after base64) a node accepts; candidates are small.
pub const MAX_SEALED_LEN: usize = 8 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_signal_is_flat_json() {
        let sealed = SealedSignal {
            from: 7,
            to: 9,
            counter: 42,
            signal: PeerSignal::RestartRequest { reason: "x".into() },
        };
        let json = serde_json::to_string(&sealed).unwrap();
        assert_eq!(
            json,
            r#"{"from":7,"to":9,"counter":42,"type":"restart_request","reason":"x"}"#
        );
        assert_eq!(serde_json::from_str::<SealedSignal>(&json).unwrap(), sealed);
    }

    #[test]
    fn signal_without_sender_recipient_or_counter_is_refused() {
        let bare = r#"{"type":"restart_request","reason":"x"}"#;
        assert!(serde_json::from_str::<SealedSignal>(bare).is_err());
    }

    #[test]
    fn public_addr_that_is_not_an_address_is_refused() {
        let good = r#"{"udp":true,"mapping":"unknown","public_addr":"203.0.113.5:4000"}"#;
        let nat: NatSummary = serde_json::from_str(good).unwrap();
        assert_eq!(nat.public_addr, Some("203.0.113.5:4000".parse().unwrap()));
        let evil = r#"{"udp":true,"mapping":"unknown","public_addr":"\u001b[2J1.2.3.4:5"}"#;
        assert!(serde_json::from_str::<NatSummary>(evil).is_err());
    }

    #[test]
    fn an_offer_is_direct_only_only_when_it_says_so() {
        // What older nodes send, and what a full session still looks like.
        let plain =
            r#"{"from":1,"to":2,"counter":3,"type":"offer","session":9,"ufrag":"u","pwd":"p"}"#;
        let offer = serde_json::from_str::<SealedSignal>(plain).unwrap();
        assert!(matches!(
            offer.signal,
            PeerSignal::Offer {
                direct_only: false,
                ..
            }
        ));
        assert_eq!(serde_json::to_string(&offer).unwrap(), plain);

        let direct = PeerSignal::Offer {
            session: 9,
            ufrag: "u".into(),
            pwd: "p".into(),
            direct_only: true,
        };
        let json = serde_json::to_string(&direct).unwrap();
        assert!(json.contains(r#""direct_only":true"#), "{json}");
        assert_eq!(serde_json::from_str::<PeerSignal>(&json).unwrap(), direct);
    }
}
