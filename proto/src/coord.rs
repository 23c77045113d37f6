//! Node ⇄ coordination server.
//!
//! ```text
//!  POST /v1/register/challenge  (no body)  ─▶  ChallengeResponse | ApiError (JSON)
//!  POST /v1/register      RegisterRequest  ─▶  RegisterResponse | ApiError (JSON)
//!  GET  /v1/connect       WebSocket, header `Authorization: Bearer <node-id>:<credential>`
//!       text frames       ClientMsg ─▶ / ◀─ ServerMsg (JSON)
//!       binary frames     RelayFrame: 8-byte node id (big endian) + WireGuard datagram,
//!                         or a batch: 0xB1, then [u64 id][u16 len][datagram] records
//! ```
//!
//! Enrolment is two calls: the challenge gives a fresh 40-byte challenge (issue
//! time, random bytes and the server's MAC over both, so the server keeps no
//! state for it) and a per-challenge X25519 key derived from it; the
//! registration answers it with a proof that the node holds its private key
//! (see [`crate::enrol`]). A challenge is good for one successful registration
//! within `expires_in` seconds.
//! A public key that is already enrolled re-enrols only with the node's current
//! credential in `credential` (otherwise 409 `already_enrolled`), and keeps its
//! name and address.
//!
//! In a binary frame from a node, the id is the *destination*; in a binary frame
//! from the server, it is the *source* (stamped from the authenticated session).
//! Batches ([`RELAY_BATCH_V1`]) carry many datagrams in one WebSocket message,
//! so a relayed TCP stream costs one message and one write per batch, not per
//! packet; each side sends them only after the other said it decodes them
//! ([`RELAY_HELLO`]), so old nodes and coordinators keep working.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::filter::NodeFilter;
use crate::NodeId;

// Relay framing lives in `crate::relay`; its names stay reachable from here.
pub use crate::relay::*;

/// Path of the enrolment endpoint.
pub const REGISTER_PATH: &str = "/v1/register";
/// Path that hands out a registration challenge (`POST`, empty body).
pub const CHALLENGE_PATH: &str = "/v1/register/challenge";
/// Path of the WebSocket control stream.
pub const CONNECT_PATH: &str = "/v1/connect";
/// Request header on [`CONNECT_PATH`]: the [`netmap_digest`] (16 hex
/// digits) of the netmap a node holds from its last session. When it is
/// what the server would send, the `Welcome` says `resumed` and lists no
/// peers, so a node that moves to another replica, or reconnects, does not
/// download a mesh it already has (10,000 moving nodes x 20,000 peers would
/// be ~26 GB of JSON).
pub const NETMAP_DIGEST_HEADER: &str = "x-overlay-netmap";

/// One peer's share of a [`netmap_digest`]: the first 8 bytes of the
/// SHA-256 of its JSON as `serde_json` writes it (what the server sends).
pub fn peer_digest(peer: &PeerInfo) -> u64 {
    // A plain struct of strings and numbers: serializing cannot fail.
    peer_json_digest(&serde_json::to_string(peer).unwrap_or_default())
}

/// [`peer_digest`] of a peer already serialized.
pub fn peer_json_digest(json: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(json.as_bytes());
    let mut first = [0; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

/// The digest of a netmap: its peers' [`peer_digest`]s added up (wrapping),
/// so it does not depend on their order and a holder can follow a change of
/// one peer by a subtraction and an addition. Online state is part of a
/// peer's record, so it is part of the digest.
pub fn netmap_digest<'a>(peers: impl IntoIterator<Item = &'a PeerInfo>) -> u64 {
    combine_digests(peers.into_iter().map(peer_digest))
}

/// The netmap digest of peers whose [`peer_digest`]s are `digests`: their
/// wrapping sum, so it does not depend on order and one peer's change is
/// one subtraction and one addition.
pub fn combine_digests(digests: impl IntoIterator<Item = u64>) -> u64 {
    digests.into_iter().fold(0u64, u64::wrapping_add)
}

/// A digest as the [`NETMAP_DIGEST_HEADER`] carries it.
pub fn format_digest(digest: u64) -> String {
    format!("{digest:016x}")
}

/// A [`NETMAP_DIGEST_HEADER`] value: exactly 16 hex digits.
pub fn parse_digest(value: &str) -> Option<u64> {
    if value.len() != 16 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(value, 16).ok()
}
/// Largest text or binary frame either side accepts on the control stream.
/// A relayed WireGuard datagram of a 1280-byte MTU is far below it.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Body of `POST /v1/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub auth_key: String,
    /// The node's WireGuard (X25519) public key, standard base64 of 32 bytes.
    pub public_key: String,
    pub hostname: String,
    /// `ChallengeResponse::challenge`, as received. Missing (an older node)
    /// is refused as a bad proof, with a message saying to upgrade.
    #[serde(default)]
    pub challenge: String,
    /// `base64(nonce ‖ crypto_box(node secret → server_key, transcript))`,
    /// built by [`crate::enrol::register_request`].
    #[serde(default)]
    pub proof: String,
    /// The node's current credential, needed to re-enrol a public key that is
    /// already enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Answer to `POST /v1/register/challenge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeResponse {
    /// 32 random bytes, standard base64.
    pub challenge: String,
    /// The challenge's ephemeral X25519 public key, standard base64.
    pub server_key: String,
    /// Seconds the challenge stays valid.
    pub expires_in: u64,
}

/// Answer to a successful registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub node_id: NodeId,
    /// The hostname as the server recorded it (a suffix is added on collision).
    pub name: String,
    pub mesh_ip: Ipv4Addr,
    pub network: Ipv4Net,
    /// The mesh's IPv6 prefix (a ULA /48); the node's IPv6 address is
    /// [`mesh_ip6`] of it and `mesh_ip`. Absent from older coordinators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network6: Option<Ipv6Net>,
    /// Secret the node presents on `/v1/connect`; the server keeps only its hash.
    pub credential: String,
}

/// A node's mesh IPv6 address: the mesh's IPv6 prefix with the node's IPv4
/// mesh address in the low 32 bits (`fd12:3456:789a::6440:2` for
/// `100.64.0.2`), so it is stable, unique exactly when the IPv4 address is,
/// and needs no second address pool.
pub fn mesh_ip6(network6: Ipv6Net, mesh_ip: Ipv4Addr) -> Ipv6Addr {
    let prefix = u128::from(network6.network()) & !u128::from(u32::MAX);
    Ipv6Addr::from(prefix | u128::from(u32::from(mesh_ip)))
}

/// JSON body of every HTTP error (and of `ServerMsg::Error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable reason, e.g. `auth_key_expired`.
    pub error: String,
    /// One sentence for a person.
    pub message: String,
}

/// Stable error codes of [`ApiError::error`].
pub mod error_code {
    pub const AUTH_KEY_UNKNOWN: &str = "auth_key_unknown";
    pub const AUTH_KEY_EXPIRED: &str = "auth_key_expired";
    pub const AUTH_KEY_REVOKED: &str = "auth_key_revoked";
    pub const AUTH_KEY_SPENT: &str = "auth_key_spent";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const POOL_EXHAUSTED: &str = "pool_exhausted";
    pub const UNKNOWN_PEER: &str = "unknown_peer";
    pub const PEER_OFFLINE: &str = "peer_offline";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const TOO_MANY_SESSIONS: &str = "too_many_sessions";
    /// The registration's challenge was unknown, expired or used, or its
    /// proof did not open with the claimed public key.
    pub const BAD_PROOF: &str = "bad_proof";
    /// The public key is enrolled and the request did not carry its credential.
    pub const ALREADY_ENROLLED: &str = "already_enrolled";
}

/// A node as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: NodeId,
    pub name: String,
    pub mesh_ip: Ipv4Addr,
    /// The node's mesh IPv6 address, when the mesh has an IPv6 prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ip6: Option<Ipv6Addr>,
    /// WireGuard public key, standard base64.
    pub public_key: String,
    pub online: bool,
    /// Tags the node carries (from its auth key and the administrator), which
    /// compiled filter rules name as `tag:<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Where a node finds STUN and TURN, and the credentials for TURN.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceConfig {
    /// `stun:host:port` URLs.
    pub stun: Vec<String>,
    pub turn: Vec<TurnServer>,
    /// More `stun:` URLs, used only by netcheck: answers from two addresses tell
    /// whether the node's NAT keeps one mapping for every destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub netcheck: Vec<String>,
}

/// One TURN server with time-limited credentials in coturn's REST scheme
/// (`use-auth-secret`): username `"<expiry-unix>:<node-id>"`,
/// credential `base64(HMAC-SHA1(secret, username))`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnServer {
    /// `turn:host:port?transport=udp` URLs.
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
    /// Unix time after which the credential stops working; the node reconnects
    /// (or asks again) before then.
    pub expires_at: u64,
}

/// The mesh's names: nodes answer `NAME.<domain>` from their netmap on the
/// resolver address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// Lowercase, no trailing dot, e.g. `overlay.internal`.
    pub domain: String,
    /// The mesh address the node's resolver answers on; IPAM never gives it
    /// to a node.
    pub resolver: Ipv4Addr,
    /// Extra names under the domain (`grafana` or `grafana.overlay.internal`)
    /// and the address each stands for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<DnsRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub name: String,
    pub ip: Ipv4Addr,
}

/// Frames the server sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First message after connecting: who you are, everyone else, how to do ICE.
    Welcome {
        protocol: u32,
        node: PeerInfo,
        network: Ipv4Net,
        /// The mesh's IPv6 prefix; absent when the mesh is IPv4-only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network6: Option<Ipv6Net>,
        /// The netmap, or its first part when `more` is set.
        peers: Vec<PeerInfo>,
        ice: IceConfig,
        /// The netmap continues in `PeerBatch` messages; apply it once `last` came.
        /// Large meshes are sent in parts so no frame (and no per-session buffer on
        /// the server) grows with the size of the mesh.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
        /// The rules this node enforces; `None` while no policy is in force
        /// (everything allowed). See [`crate::filter`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<NodeFilter>,
        /// The netmap the node said it holds ([`NETMAP_DIGEST_HEADER`]) is
        /// current: keep it; `peers` is empty. Deltas follow as usual.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumed: bool,
    },
    /// The next part of the netmap a `Welcome` with `more` began.
    PeerBatch { peers: Vec<PeerInfo>, last: bool },
    /// A node joined, changed (name, tags), came online or went offline, or
    /// the policy now lets this node see it.
    PeerUpsert { peer: PeerInfo },
    /// A node was removed by an administrator, or the policy no longer lets
    /// this node see it.
    PeerRemoved { id: NodeId },
    /// The rules this node enforces changed (a policy or tag change); `None`
    /// means no policy is in force any more. Replaces the previous filter.
    Filter { filter: Option<NodeFilter> },
    /// The mesh's DNS: sent right after the `Welcome` (and netmap) and again
    /// when it changes; `None` turns the mesh resolver off.
    Dns { dns: Option<DnsConfig> },
    /// A signaling message from another node; `from` is stamped by the server.
    Signal { from: NodeId, payload: String },
    /// Fresh ICE configuration (TURN credentials renewed).
    IceConfig { ice: IceConfig },
    /// Something the node sent was refused. The session stays open unless the
    /// server closes it.
    Error {
        error: String,
        message: String,
        /// The node id the refused message was about, when there was one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        about: Option<NodeId>,
    },
    /// Answer to [`ClientMsg::Ping`]; lets a node measure the coordinator's latency.
    Pong { nonce: u64 },
}

/// Frames a node sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Forward `payload` to node `to`. Any `from` a node puts here is ignored:
    /// the server stamps the sender from the session.
    Signal {
        to: NodeId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<NodeId>,
        payload: String,
    },
    /// Ask for fresh TURN credentials.
    RefreshIce,
    Ping {
        nonce: u64,
    },
}

/// Value of the `Authorization` header on `/v1/connect`.
pub fn bearer(node_id: NodeId, credential: &str) -> String {
    format!("Bearer {node_id}:{credential}")
}

/// Parses an `Authorization` header into node id and credential.
pub fn parse_bearer(header: &str) -> Option<(NodeId, &str)> {
    let token = header.strip_prefix("Bearer ")?;
    let (id, credential) = token.split_once(':')?;
    Some((id.parse().ok()?, credential))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_ip6_puts_the_ipv4_address_in_the_low_bits() {
        let net: Ipv6Net = "fd12:3456:789a::/48".parse().unwrap();
        let v6 = mesh_ip6(net, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(v6, "fd12:3456:789a::6440:2".parse::<Ipv6Addr>().unwrap());
        assert!(net.contains(&v6));
        // Host bits in the prefix as given do not leak into the address.
        let sloppy: Ipv6Net = "fd12:3456:789a::1:2:3/48".parse().unwrap();
        assert_eq!(mesh_ip6(sloppy, Ipv4Addr::new(100, 64, 0, 2)), v6);
    }

    #[test]
    fn peer_info_without_ipv6_reads_as_before() {
        let old = r#"{"id":3,"name":"a","mesh_ip":"100.64.0.3","public_key":"k","online":true}"#;
        let peer: PeerInfo = serde_json::from_str(old).unwrap();
        assert_eq!(peer.mesh_ip6, None);
        assert_eq!(serde_json::to_string(&peer).unwrap(), old);
    }

    #[test]
    fn a_netmap_digest_ignores_order_and_follows_online_state() {
        let peer = |id: NodeId, online: bool| PeerInfo {
            id,
            name: format!("n{id}"),
            mesh_ip: Ipv4Addr::new(100, 64, 0, id as u8),
            mesh_ip6: None,
            public_key: format!("k{id}"),
            online,
            tags: Vec::new(),
        };
        let a = [peer(1, true), peer(2, false), peer(3, true)];
        let b = [peer(3, true), peer(1, true), peer(2, false)];
        assert_eq!(netmap_digest(&a), netmap_digest(&b));
        let c = [peer(1, true), peer(2, true), peer(3, true)];
        assert_ne!(netmap_digest(&a), netmap_digest(&c));
        // Followed by one subtraction and one addition.
        let followed = netmap_digest(&a)
            .wrapping_sub(peer_digest(&peer(2, false)))
            .wrapping_add(peer_digest(&peer(2, true)));
        assert_eq!(followed, netmap_digest(&c));
        let json = serde_json::to_string(&a[0]).unwrap();
        assert_eq!(peer_json_digest(&json), peer_digest(&a[0]));
        let d = netmap_digest(&a);
        assert_eq!(parse_digest(&format_digest(d)), Some(d));
        assert_eq!(parse_digest(&format_digest(0)), Some(0));
        for bad in [
            "",
            "12",
            "0123456789abcdeg",
            "0123456789abcdef0",
            "+123456789abcdef",
        ] {
            assert_eq!(parse_digest(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn relay_frame_round_trips() {
        let frame = encode_relay_frame(0x0102_0304_0506_0708, b"wg");
        assert_eq!(&frame[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            decode_relay_frame(&frame),
            Some((0x0102_0304_0506_0708, &b"wg"[..]))
        );
    }

    #[test]
    fn short_relay_frame_is_rejected() {
        assert_eq!(decode_relay_frame(&[1, 2, 3]), None);
    }

    #[test]
    fn relay_batch_round_trips_in_order() {
        let mut batch = RelayBatch::new(MAX_FRAME_BYTES, 0);
        assert!(batch.is_empty());
        assert!(batch.push(2, b"first"));
        assert!(batch.push(3, b""));
        assert!(batch.push(2, &[7u8; 1400]));
        let msg = batch.take();
        assert!(batch.is_empty(), "take starts a fresh batch");
        assert_eq!(msg[0], RELAY_BATCH_V1);
        let parsed = RelayMessage::parse(&msg).unwrap();
        assert!(parsed.is_batch());
        let records: Vec<_> = parsed.records().collect();
        assert_eq!(
            records,
            vec![(2, &b"first"[..]), (3, &b""[..]), (2, &[7u8; 1400][..])]
        );
    }

    #[test]
    fn relay_batch_stops_at_its_size() {
        let mut batch = RelayBatch::new(100, 0);
        assert!(batch.push(1, &[0; 40]));
        assert!(!batch.push(1, &[0; 40]), "51 + 50 > 100");
        assert_eq!(batch.len(), 51);
        assert!(!RelayBatch::new(usize::MAX, 0).push(1, &vec![0; 70_000]));
    }

    #[test]
    fn single_frames_and_the_hello_still_parse() {
        let frame = encode_relay_frame(5, b"wg");
        let parsed = RelayMessage::parse(&frame).unwrap();
        assert_eq!(parsed, RelayMessage::Single(5, b"wg"));
        assert_eq!(parsed.records().collect::<Vec<_>>(), vec![(5, &b"wg"[..])]);
        let hello = RelayMessage::parse(&RELAY_HELLO).unwrap();
        assert_eq!(
            hello.records().collect::<Vec<_>>(),
            vec![(RELAY_HELLO_ID, &b""[..])]
        );
        // What a coordinator without batches makes of the hello: a frame to
        // a node that cannot exist.
        assert_eq!(
            decode_relay_frame(&RELAY_HELLO),
            Some((0xB1 << 56, &[0u8; 3][..]))
        );
        assert!(RelayMessage::parse(&[RELAY_BATCH_V1])
            .unwrap()
            .records()
            .next()
            .is_none());
        assert_eq!(RelayMessage::parse(&[1, 2, 3]), Err(RelayFrameError::Short));
    }

    #[test]
    fn truncated_batches_are_refused_whole() {
        let mut batch = RelayBatch::new(MAX_FRAME_BYTES, 0);
        batch.push(2, b"ok");
        batch.push(3, b"datagram");
        let msg = batch.take();
        for cut in 2..msg.len() {
            if cut == 13 {
                continue; // right after the first record: a whole batch
            }
            assert!(
                matches!(
                    RelayMessage::parse(&msg[..cut]),
                    Err(RelayFrameError::Truncated { at: 1 | 13 })
                ),
                "cut at {cut}"
            );
        }
        // A length beyond the message.
        let mut long = vec![RELAY_BATCH_V1, 0, 0, 0, 0, 0, 0, 0, 2, 0xff, 0xff];
        long.extend_from_slice(&[0; 100]);
        assert_eq!(
            RelayMessage::parse(&long),
            Err(RelayFrameError::Truncated { at: 1 })
        );
    }

    #[test]
    fn garbage_relay_messages_never_panic() {
        // A cheap deterministic generator: every prefix of pseudo-random bytes,
        // with and without the batch tag.
        let mut x: u32 = 0x1234_5678;
        let mut bytes = Vec::new();
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bytes.push((x >> 24) as u8);
        }
        for start in [0usize, 1] {
            let mut msg = bytes.clone();
            msg[0] = if start == 0 { RELAY_BATCH_V1 } else { 0 };
            for end in 0..200 {
                if let Ok(m) = RelayMessage::parse(&msg[..end]) {
                    let total: usize = m.records().map(|(_, p)| p.len()).sum();
                    assert!(total <= end);
                }
            }
        }
    }

    #[test]
    fn bearer_round_trips_and_rejects_garbage() {
        assert_eq!(parse_bearer(&bearer(7, "abc")), Some((7, "abc")));
        assert_eq!(parse_bearer("Bearer x:abc"), None);
        assert_eq!(parse_bearer("Basic 7:abc"), None);
    }

    #[test]
    fn server_messages_are_tagged_json() {
        let msg = ServerMsg::PeerRemoved { id: 3 };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(json, r#"{"type":"peer_removed","id":3}"#);
        let back: ServerMsg = serde_json::from_str(&json).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn client_signal_without_from_parses() {
        let msg: ClientMsg =
            serde_json::from_str(r#"{"type":"signal","to":2,"payload":"x"}"#).unwrap();
        assert_eq!(
            msg,
            ClientMsg::Signal {
                to: 2,
                from: None,
                payload: "x".into()
            }
        );
    }
}
