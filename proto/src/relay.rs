//! Relay frames on the control WebSocket: binary messages that carry WireGuard
//! datagrams through the coordinator when no UDP path exists (see
//! [`crate::coord`] for the stream they travel on).
//!
//! ```text
//!   single frame   [u64 node id, big endian][datagram]
//!   batch (v1)     [0xB1] then records: [u64 node id][u16 length][datagram]
//! ```

use crate::NodeId;

/// Length of the node-id header of a binary relay frame.
pub const RELAY_HEADER_LEN: usize = 8;

/// Builds a binary relay frame: `id` then `payload`.
pub fn encode_relay_frame(id: NodeId, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(RELAY_HEADER_LEN + payload.len());
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Splits a binary relay frame into its node id and payload; `None` when the
/// frame is too short to carry an id.
pub fn decode_relay_frame(frame: &[u8]) -> Option<(NodeId, &[u8])> {
    if frame.len() < RELAY_HEADER_LEN {
        return None;
    }
    let (id, payload) = frame.split_at(RELAY_HEADER_LEN);
    let id = NodeId::from_be_bytes(id.try_into().ok()?);
    Some((id, payload))
}

/// First byte of a relay *batch* message, format version 1:
///
/// ```text
///   [0xB1] then records: [u64 node id, big endian][u16 length, big endian][datagram]
/// ```
///
/// A single frame begins with its node id's high byte; ids are SQLite row ids
/// counted from 1, so that byte is 0 and a first byte of `0xB1` can only be a
/// batch. A later format takes another tag.
pub const RELAY_BATCH_V1: u8 = 0xB1;
/// Bytes a record adds to its datagram in a batch: id and length.
pub const RELAY_RECORD_HEADER_LEN: usize = 10;
/// The id of a batch record that carries no datagram but says "I decode
/// batches" (see [`RELAY_HELLO`]); no node has it.
pub const RELAY_HELLO_ID: NodeId = 0;
/// A batch of one empty record to [`RELAY_HELLO_ID`]: a node sends it when its
/// session opens, and a coordinator that decodes batches answers with it and
/// from then on sends that node batches; the node sends batches once it has
/// the answer. To a coordinator that predates batches it is a single frame to
/// an unknown node (`0xB1 << 56`), dropped and counted, never a reason to
/// close the session; so each side keeps to single frames until it knows.
pub const RELAY_HELLO: [u8; 1 + RELAY_RECORD_HEADER_LEN] =
    [RELAY_BATCH_V1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Why a binary relay message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayFrameError {
    #[error("relay frame shorter than its header")]
    Short,
    #[error("relay batch truncated at byte {at}")]
    Truncated { at: usize },
}

/// A checked binary relay message: one datagram, or a batch whose records all
/// fit (so iterating over it cannot fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMessage<'a> {
    Single(NodeId, &'a [u8]),
    /// The records, after the tag byte.
    Batch(&'a [u8]),
}

impl<'a> RelayMessage<'a> {
    /// Checks a whole message before any of it is used: a batch with one bad
    /// record is refused entire.
    pub fn parse(msg: &'a [u8]) -> Result<Self, RelayFrameError> {
        match msg.split_first() {
            Some((&RELAY_BATCH_V1, records)) => {
                let mut rest = records;
                while !rest.is_empty() {
                    let at = msg.len() - rest.len();
                    let (_, len, after) =
                        split_record(rest).ok_or(RelayFrameError::Truncated { at })?;
                    rest = &after[len..];
                }
                Ok(RelayMessage::Batch(records))
            }
            _ => decode_relay_frame(msg)
                .map(|(id, payload)| RelayMessage::Single(id, payload))
                .ok_or(RelayFrameError::Short),
        }
    }

    pub fn is_batch(&self) -> bool {
        matches!(self, RelayMessage::Batch(_))
    }

    /// `(node id, datagram)` of every record, hello records included.
    pub fn records(&self) -> RelayRecords<'a> {
        match *self {
            RelayMessage::Single(id, payload) => RelayRecords {
                single: Some((id, payload)),
                rest: &[],
            },
            RelayMessage::Batch(rest) => RelayRecords { single: None, rest },
        }
    }
}

/// A record's id, its length and everything after its header, when the
/// header and the datagram are all there.
fn split_record(rest: &[u8]) -> Option<(NodeId, usize, &[u8])> {
    let header = rest.get(..RELAY_RECORD_HEADER_LEN)?;
    let id = NodeId::from_be_bytes(header[..8].try_into().ok()?);
    let len = usize::from(u16::from_be_bytes([header[8], header[9]]));
    let after = &rest[RELAY_RECORD_HEADER_LEN..];
    (after.len() >= len).then_some((id, len, after))
}

/// The records of a [`RelayMessage`].
#[derive(Debug, Clone)]
pub struct RelayRecords<'a> {
    single: Option<(NodeId, &'a [u8])>,
    rest: &'a [u8],
}

impl<'a> Iterator for RelayRecords<'a> {
    type Item = (NodeId, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(one) = self.single.take() {
            return Some(one);
        }
        // Checked by `parse`; a short rest ends the iteration all the same.
        let (id, len, after) = split_record(self.rest)?;
        let (payload, rest) = after.split_at(len);
        self.rest = rest;
        Some((id, payload))
    }
}

/// Builds batch messages of at most `max` bytes, record by record, each in
/// one buffer that becomes the message.
#[derive(Debug)]
pub struct RelayBatch {
    buf: Vec<u8>,
    max: usize,
}

impl RelayBatch {
    /// An empty batch that grows to at most `max` bytes (at least one
    /// header), with room for `capacity` bytes before it reallocates: the
    /// size it will likely reach, so a message costs one allocation.
    pub fn new(max: usize, capacity: usize) -> Self {
        let max = max.max(1 + RELAY_RECORD_HEADER_LEN);
        let mut buf = Vec::with_capacity(capacity.clamp(1, max));
        buf.push(RELAY_BATCH_V1);
        RelayBatch { buf, max }
    }

    /// No record yet.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == 1
    }

    /// The message's size so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether a record of `payload_len` bytes would still fit.
    pub fn fits(&self, payload_len: usize) -> bool {
        payload_len <= usize::from(u16::MAX)
            && self.buf.len() + RELAY_RECORD_HEADER_LEN + payload_len <= self.max
    }

    /// Appends a record; false, and nothing appended, when it does not fit.
    pub fn push(&mut self, id: NodeId, payload: &[u8]) -> bool {
        if !self.fits(payload.len()) {
            return false;
        }
        self.buf.extend_from_slice(&id.to_be_bytes());
        // `fits` checked the length fits in 16 bits.
        self.buf
            .extend_from_slice(&(payload.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(payload);
        true
    }

    /// The message built so far; the batch starts empty again, with room
    /// for as much as this one held.
    pub fn take(&mut self) -> Vec<u8> {
        let mut next = Vec::with_capacity(self.buf.len());
        next.push(RELAY_BATCH_V1);
        std::mem::replace(&mut self.buf, next)
    }

    /// The message built so far, when no other follows.
    pub fn into_message(self) -> Vec<u8> {
        self.buf
    }
}
