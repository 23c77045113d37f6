//! What replicas tell each other over the bus, and how it is written: the
//! sans-IO half of the replicas' NATS bus (`replica.rs` is the IO half).
//!
//! ```text
//!   overlay.events            every replica → every replica (JSON Envelope)
//!       heartbeat, online/offline of a node, presence (all of a replica's
//!       sessions), upsert (a node enrolled or re-enrolled)
//!   overlay.replica.<id>      any replica → the replica <id> (binary)
//!       0x01 relay records [to u64][from u64][len u16][datagram]…
//!       0x02 signal       [to u64][ServerMsg::Signal as JSON]
//! ```
//!
//! Events are small and rare (per session, not per packet), so JSON keeps
//! them readable with `nats sub`; relay records are binary and batched, one
//! NATS message per relay batch a node sent and replica it goes to.

use overlay_proto::coord::PeerInfo;
use overlay_proto::NodeId;
use serde::{Deserialize, Serialize};

/// Subject every replica publishes its events on and subscribes to.
pub const EVENTS_SUBJECT: &str = "overlay.events";

/// The inbox subject of one replica.
pub fn inbox_subject(replica: ReplicaId) -> String {
    format!("overlay.replica.{replica:016x}")
}

/// A replica's id: drawn at random when it starts, so a restarted replica
/// is a new one and nothing it claimed before outlives it.
pub type ReplicaId = u64;

/// Relay records header: destination, sender, length.
pub const RELAY_RECORD_LEN: usize = 8 + 8 + 2;
const KIND_RELAY: u8 = 0x01;
const KIND_SIGNAL: u8 = 0x02;
/// Most bytes of relay records in one bus message: a node's relay batch is
/// at most 64 KiB, so its share for one replica fits, with headers, under
/// NATS's default 1 MiB payload.
pub const MAX_RELAY_MESSAGE: usize = 128 * 1024;

/// An event on [`EVENTS_SUBJECT`], stamped with the replica that sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub from: ReplicaId,
    pub event: Event,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// "I am alive"; a replica unheard for `replica::REPLICA_TIMEOUT` is gone
    /// and its nodes offline. `ice`: the sender's embedded STUN/TURN server,
    /// which the other replicas list for their nodes after their own (absent
    /// from older replicas, and from one without an embedded server).
    Heartbeat {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ice: Option<ReplicaIce>,
    },
    /// `node` opened a session here; `epoch` orders it against sessions of
    /// the same node on other replicas (see [`Claim`]).
    Online { node: NodeId, epoch: u64 },
    /// The session of `node` with `epoch` ended.
    Offline { node: NodeId, epoch: u64 },
    /// Every session of the sender, `(node, epoch)`: sent when the sender
    /// hears a replica it did not know, and at a steady interval, so a
    /// replica that starts, or comes back after losing the bus, learns who
    /// is where without asking.
    Presence { nodes: Vec<(NodeId, u64)> },
    /// A node enrolled (or re-enrolled) through the sender: its record as
    /// written to the store.
    Upsert { peer: PeerInfo },
}

/// The URLs of one replica's embedded STUN/TURN server, as its own nodes
/// get them: `stun:` and `turn:` per family, and the netcheck responders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaIce {
    pub stun: Vec<String>,
    pub turn: Vec<String>,
    #[serde(default)]
    pub netcheck: Vec<String>,
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        // Plain structs of numbers and strings: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, BusError> {
        serde_json::from_slice(bytes).map_err(|e| BusError::BadEvent(e.to_string()))
    }
}

/// Where a node's session is: the replica and the epoch it was opened with.
/// Of two claims on one node the one with the higher epoch wins, the higher
/// replica id breaking a tie; a replica opening a session takes one more
/// than the highest epoch it has seen for the node, so a node that moves to
/// another replica takes over at once everywhere, whatever the clocks say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    pub epoch: u64,
    pub replica: ReplicaId,
}

/// The wall clock in ms, the floor of a new session's epoch.
pub fn epoch_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("malformed bus event: {0}")]
    BadEvent(String),
    #[error("malformed inbox message")]
    BadInbox,
}

/// A message on a replica's inbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbox<'a> {
    /// Relay records; iterate with [`relay_records`].
    Relay(&'a [u8]),
    /// A `ServerMsg::Signal`, serialized, for `to`.
    Signal { to: NodeId, text: &'a str },
}

impl<'a> Inbox<'a> {
    pub fn parse(msg: &'a [u8]) -> Result<Inbox<'a>, BusError> {
        match msg.split_first() {
            Some((&KIND_RELAY, records)) => {
                // Walk once so a truncated record refuses the whole message.
                let mut rest = records;
                while !rest.is_empty() {
                    let len = record_len(rest).ok_or(BusError::BadInbox)?;
                    rest = &rest[len..];
                }
                Ok(Inbox::Relay(records))
            }
            Some((&KIND_SIGNAL, rest)) if rest.len() >= 8 => {
                let (to, text) = rest.split_at(8);
                let to = u64::from_be_bytes(to.try_into().map_err(|_| BusError::BadInbox)?);
                let text = std::str::from_utf8(text).map_err(|_| BusError::BadInbox)?;
                Ok(Inbox::Signal { to, text })
            }
            _ => Err(BusError::BadInbox),
        }
    }
}

/// The whole length of the record at the start of `rest`, if it is complete.
fn record_len(rest: &[u8]) -> Option<usize> {
    let len = u16::from_be_bytes(rest.get(16..18)?.try_into().ok()?) as usize;
    let total = RELAY_RECORD_LEN + len;
    (rest.len() >= total).then_some(total)
}

/// `(to, from, datagram)` of relay records checked by [`Inbox::parse`].
pub fn relay_records(records: &[u8]) -> impl Iterator<Item = (NodeId, NodeId, &[u8])> {
    let mut rest = records;
    std::iter::from_fn(move || {
        let total = record_len(rest)?;
        let (record, tail) = rest.split_at(total);
        rest = tail;
        let to = u64::from_be_bytes(record[0..8].try_into().ok()?);
        let from = u64::from_be_bytes(record[8..16].try_into().ok()?);
        Some((to, from, &record[RELAY_RECORD_LEN..]))
    })
}

/// Relay records under way to one replica.
#[derive(Debug)]
pub struct RelayOut {
    buf: Vec<u8>,
}

impl RelayOut {
    /// An empty message with room for `capacity` bytes of records.
    pub fn new(capacity: usize) -> RelayOut {
        let mut buf = Vec::with_capacity(1 + capacity.min(MAX_RELAY_MESSAGE));
        buf.push(KIND_RELAY);
        RelayOut { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() == 1
    }

    /// Appends a record; `false` (and nothing appended) when it would make
    /// the message larger than [`MAX_RELAY_MESSAGE`] or the datagram is
    /// longer than a record can say.
    pub fn push(&mut self, to: NodeId, from: NodeId, datagram: &[u8]) -> bool {
        let Ok(len) = u16::try_from(datagram.len()) else {
            return false;
        };
        if self.buf.len() - 1 + RELAY_RECORD_LEN + datagram.len() > MAX_RELAY_MESSAGE {
            return false;
        }
        self.buf.extend_from_slice(&to.to_be_bytes());
        self.buf.extend_from_slice(&from.to_be_bytes());
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(datagram);
        true
    }

    pub fn into_message(self) -> Vec<u8> {
        self.buf
    }

    /// The message so far, leaving an empty one with the same capacity.
    pub fn take(&mut self) -> Vec<u8> {
        let mut next = Vec::with_capacity(self.buf.capacity());
        next.push(KIND_RELAY);
        std::mem::replace(&mut self.buf, next)
    }
}

/// A signal for `to` on another replica, `text` being `ServerMsg::Signal`.
pub fn signal_message(to: NodeId, text: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(1 + 8 + text.len());
    buf.push(KIND_SIGNAL);
    buf.extend_from_slice(&to.to_be_bytes());
    buf.extend_from_slice(text.as_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_json() {
        let env = Envelope {
            from: 0xabc,
            event: Event::Presence {
                nodes: vec![(1, 2), (3, 4)],
            },
        };
        let bytes = env.encode();
        assert!(std::str::from_utf8(&bytes)
            .unwrap()
            .contains(r#""type":"presence""#));
        assert_eq!(Envelope::decode(&bytes).unwrap(), env);
        assert!(Envelope::decode(b"{\"from\":1}").is_err());
    }

    #[test]
    fn heartbeats_carry_the_senders_stun_turn_urls_and_old_ones_still_parse() {
        let ice = ReplicaIce {
            stun: vec![
                "stun:203.0.113.2:3478".into(),
                "stun:[2001:db8::2]:3478".into(),
            ],
            turn: vec!["turn:203.0.113.2:3478?transport=udp".into()],
            netcheck: vec!["stun:203.0.113.2:3479".into()],
        };
        let env = Envelope {
            from: 7,
            event: Event::Heartbeat {
                ice: Some(ice.clone()),
            },
        };
        assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
        // From a replica of an earlier version, or one without an embedded
        // server: no URLs, still a heartbeat.
        let old = Envelope::decode(br#"{"from":7,"event":{"type":"heartbeat"}}"#).unwrap();
        assert_eq!(old.event, Event::Heartbeat { ice: None });
        let none = Envelope {
            from: 7,
            event: Event::Heartbeat { ice: None },
        };
        assert_eq!(
            none.encode(),
            br#"{"from":7,"event":{"type":"heartbeat"}}"#.to_vec()
        );
    }

    #[test]
    fn relay_records_round_trip_and_stop_at_the_size_bound() {
        let mut out = RelayOut::new(100);
        assert!(out.is_empty());
        assert!(out.push(7, 1, b"hello"));
        assert!(out.push(8, 2, b""));
        assert!(!out.push(9, 3, &vec![0; MAX_RELAY_MESSAGE]));
        let msg = out.into_message();
        let Inbox::Relay(records) = Inbox::parse(&msg).unwrap() else {
            panic!("not relay");
        };
        let got: Vec<_> = relay_records(records).collect();
        assert_eq!(got, vec![(7, 1, &b"hello"[..]), (8, 2, &b""[..])]);
    }

    #[test]
    fn truncated_or_unknown_inbox_messages_are_refused() {
        let mut out = RelayOut::new(10);
        out.push(7, 1, b"hello");
        let msg = out.take();
        assert!(out.is_empty());
        assert_eq!(Inbox::parse(&msg[..msg.len() - 1]), Err(BusError::BadInbox));
        assert_eq!(Inbox::parse(&[0x09, 1, 2]), Err(BusError::BadInbox));
        assert_eq!(Inbox::parse(&[]), Err(BusError::BadInbox));
        assert_eq!(Inbox::parse(&[KIND_SIGNAL, 0, 0]), Err(BusError::BadInbox));
        let signal = signal_message(5, r#"{"type":"signal"}"#);
        assert_eq!(
            Inbox::parse(&signal).unwrap(),
            Inbox::Signal {
                to: 5,
                text: r#"{"type":"signal"}"#
            }
        );
    }

    #[test]
    fn a_higher_epoch_wins_and_the_replica_id_breaks_a_tie() {
        let a = Claim {
            epoch: 3,
            replica: 9,
        };
        let b = Claim {
            epoch: 4,
            replica: 1,
        };
        let c = Claim {
            epoch: 4,
            replica: 2,
        };
        assert!(b > a);
        assert!(c > b);
    }
}
