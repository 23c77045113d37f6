//! DNS over TCP without a host socket: the few TCP states a DNS client needs,
//! answered from the TUN.
//!
//! ```text
//!   SYN ──▶ SYN|ACK           (a connection: their next sequence, ours)
//!   data ─▶ ACK, and for each whole length-prefixed query its answer
//!   FIN ──▶ FIN|ACK, forgotten      RST ──▶ forgotten
//! ```
//!
//! Only in-order data is taken (anything else gets a duplicate ACK, so the
//! client retransmits); answers are sent at once, cut at the client's MSS,
//! without a retransmission timer: the TUN does not lose packets the way a
//! network does, and a client that saw no answer times out and asks again.
//! Connections are bounded ([`MAX_CONNECTIONS`], each buffering at most one
//! query of up to 64 KiB) and forgotten after [`IDLE_SECS`] of silence.

use std::collections::HashMap;
use std::net::IpAddr;

/// Connections held at once; a SYN beyond that is reset.
pub const MAX_CONNECTIONS: usize = 256;
/// Seconds a silent connection is kept.
pub const IDLE_SECS: u32 = 10;
/// The MSS assumed when a SYN names none (RFC 9293).
const DEFAULT_MSS: u16 = 536;
/// The largest segment we send, whatever the client allows.
const MAX_MSS: u16 = 1200;
/// What one connection may buffer: one query of the largest size, with its
/// length prefix.
const MAX_BUFFER: usize = 2 + u16::MAX as usize;
/// The receive window we announce.
const WINDOW: u16 = 65_535;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// One TCP segment as the responder sees it (addresses of the client).
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub client: (IpAddr, u16),
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// The client's MSS option, when the segment carried one.
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

/// A segment to send to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
struct Conn {
    /// The next sequence number we expect from the client.
    rcv_nxt: u32,
    /// Our next sequence number.
    snd_nxt: u32,
    mss: u16,
    buffer: Vec<u8>,
    last_seen: u32,
}

/// Every DNS-over-TCP connection to the resolver.
#[derive(Debug, Default)]
pub struct TcpDns {
    conns: HashMap<(IpAddr, u16), Conn>,
}

impl TcpDns {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Takes one segment; `iss` is a fresh random initial sequence number
    /// (used for a SYN), `answer` turns one query into its answer. Returns
    /// what to send back.
    pub fn on_segment(
        &mut self,
        seg: Segment<'_>,
        now: u32,
        iss: u32,
        mut answer: impl FnMut(&[u8]) -> Option<Vec<u8>>,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        if seg.flags & RST != 0 {
            self.conns.remove(&seg.client);
            return out;
        }
        if seg.flags & SYN != 0 && seg.flags & ACK == 0 {
            self.sweep(now);
            if self.conns.len() >= MAX_CONNECTIONS {
                out.push(reset(seg));
                return out;
            }
            let conn = Conn {
                rcv_nxt: seg.seq.wrapping_add(1),
                snd_nxt: iss.wrapping_add(1),
                mss: seg.mss.unwrap_or(DEFAULT_MSS).clamp(64, MAX_MSS),
                buffer: Vec::new(),
                last_seen: now,
            };
            out.push(Out {
                seq: iss,
                ack: conn.rcv_nxt,
                flags: SYN | ACK,
                window: WINDOW,
                payload: Vec::new(),
            });
            self.conns.insert(seg.client, conn);
            return out;
        }
        let Some(conn) = self.conns.get_mut(&seg.client) else {
            // Data for a connection we do not know: tell the client so.
            if !seg.payload.is_empty() || seg.flags & FIN != 0 {
                out.push(reset(seg));
            }
            return out;
        };
        conn.last_seen = now;
        if seg.seq != conn.rcv_nxt {
            // Out of order or a retransmission: say what we expect.
            if !seg.payload.is_empty() || seg.flags & FIN != 0 {
                out.push(conn.ack());
            }
            return out;
        }
        if !seg.payload.is_empty() {
            if conn.buffer.len() + seg.payload.len() > MAX_BUFFER {
                out.push(reset(seg));
                self.conns.remove(&seg.client);
                return out;
            }
            conn.buffer.extend_from_slice(seg.payload);
            conn.rcv_nxt = conn.rcv_nxt.wrapping_add(seg.payload.len() as u32);
            let mut answered = false;
            while let Some(query) = take_message(&mut conn.buffer) {
                if let Some(reply) = answer(&query) {
                    conn.send(&reply, &mut out);
                    answered = true;
                }
            }
            if !answered {
                out.push(conn.ack());
            }
        }
        if seg.flags & FIN != 0 {
            conn.rcv_nxt = conn.rcv_nxt.wrapping_add(1);
            out.push(Out {
                seq: conn.snd_nxt,
                ack: conn.rcv_nxt,
                flags: FIN | ACK,
                window: WINDOW,
                payload: Vec::new(),
            });
            self.conns.remove(&seg.client);
        }
        out
    }

    /// Forgets connections silent for longer than [`IDLE_SECS`].
    pub fn sweep(&mut self, now: u32) {
        self.conns
            .retain(|_, c| now.saturating_sub(c.last_seen) <= IDLE_SECS);
    }
}

impl Conn {
    fn ack(&self) -> Out {
        Out {
            seq: self.snd_nxt,
            ack: self.rcv_nxt,
            flags: ACK,
            window: WINDOW,
            payload: Vec::new(),
        }
    }

    /// Sends one answer with its length prefix, cut at the client's MSS.
    fn send(&mut self, reply: &[u8], out: &mut Vec<Out>) {
        let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
        let mut framed = Vec::with_capacity(2 + reply.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply[..usize::from(len)]);
        for chunk in framed.chunks(usize::from(self.mss)) {
            out.push(Out {
                seq: self.snd_nxt,
                ack: self.rcv_nxt,
                flags: ACK | PSH,
                window: WINDOW,
                payload: chunk.to_vec(),
            });
            self.snd_nxt = self.snd_nxt.wrapping_add(chunk.len() as u32);
        }
    }
}

/// The first whole length-prefixed message in `buffer`, removed from it.
fn take_message(buffer: &mut Vec<u8>) -> Option<Vec<u8>> {
    let len = usize::from(u16::from_be_bytes([*buffer.first()?, *buffer.get(1)?]));
    if buffer.len() < 2 + len {
        return None;
    }
    let message = buffer[2..2 + len].to_vec();
    buffer.drain(..2 + len);
    Some(message)
}

/// RST for a segment (RFC 9293 3.10.7.1).
fn reset(seg: Segment<'_>) -> Out {
    if seg.flags & ACK != 0 {
        Out {
            seq: seg.ack,
            ack: 0,
            flags: RST,
            window: 0,
            payload: Vec::new(),
        }
    } else {
        let len = seg.payload.len() as u32 + u32::from(seg.flags & (SYN | FIN) != 0);
        Out {
            seq: 0,
            ack: seg.seq.wrapping_add(len),
            flags: RST | ACK,
            window: 0,
            payload: Vec::new(),
        }
    }
}
