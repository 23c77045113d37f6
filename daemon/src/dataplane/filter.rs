//! The stateful packet filter: what the access policy lets through with one
//! peer, and the replies to what it let through.
//!
//! ```text
//!   decrypted, source and destination checked ──▶ check(In)  ──pass──▶ TUN
//!   read from the TUN, routed to a peer ───────▶ check(Out) ──pass──▶ encrypt
//!                       │                                │
//!                       └──── flow table (per peer) ◀────┘  a packet a rule let
//!                             through opens a flow; packets of a known flow pass
//!                             both ways without a rule (TCP, UDP, ICMP echo)
//! ```
//!
//! The rules per peer ([`PeerAccess`]) are resolved by the node core when the
//! policy or the peer's tags change; here a packet costs a header parse, a
//! lock the peer's packets take anyway, and one hash lookup. With no policy
//! the data plane skips this module entirely.
//!
//! IPv4 and IPv6 packets are filtered alike (ICMPv6 is `icmp` to the
//! policy: echo opens a flow, errors pass with the flow they are about); an
//! IPv6 packet's extension headers are walked to its transport header (see
//! `ip6`). One the walk cannot take apart (a chain cut short or longer than
//! `ip6::MAX_EXTENSIONS`) is dropped whenever a policy is in force, counted
//! with the policy's drops; ESP and unknown next headers are "other
//! protocols", which only an allow-everything rule lets through. Flows are
//! per address family: a peer's IPv4 and IPv6 connections never share one.
//!
//! State is bounded: a peer holds at most [`PEER_FLOWS`] flows and the node
//! [`TOTAL_FLOWS`] (about 40 bytes each with the map's overhead, so at most
//! ~2.6 MB in all). When a table is full, expired flows are swept (at most
//! once a second) and, if it is still full, new flows are not recorded: the
//! packet still passes when a rule allows it, only its replies then need a
//! rule of their own. Flows already in the table keep working, so one peer
//! opening 100,000 ports cannot take other peers' or its own established
//! connections down, nor grow memory past the cap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use overlay_proto::filter::Proto;

use super::ip6::{self, Upper};
use crate::node::access::{PeerAccess, Ports};

/// Flows one peer may have in the table.
pub const PEER_FLOWS: usize = 4_096;
/// Flows all peers together may have.
pub const TOTAL_FLOWS: usize = 65_536;

/// Idle seconds before a flow that only went one way is forgotten.
const UNANSWERED_SECS: u32 = 30;
/// Idle seconds before an answered TCP connection is forgotten (as long as
/// SSH sessions commonly sit idle behind their keepalives).
const TCP_SECS: u32 = 2 * 3600;
/// Idle seconds a TCP connection is kept after a FIN or RST.
const TCP_CLOSING_SECS: u32 = 10;
/// Idle seconds before an answered UDP flow is forgotten (as conntrack's
/// "assured" UDP streams).
const UDP_SECS: u32 = 180;
/// Idle seconds before an answered ping id is forgotten.
const ICMP_SECS: u32 = 30;
/// How often a full table is swept at most.
const FULL_SWEEP_SECS: u32 = 1;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Which way a packet goes, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the peer, to our TUN.
    In,
    /// From our TUN, to the peer.
    Out,
}

/// What the filter decided about one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// A rule let it through, but the flow table was full: not recorded.
    PassUnrecorded,
    Drop,
}

/// The transport fields of an IPv4 or IPv6 packet the filter decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// TCP or UDP with its ports (and TCP flags; 0 for UDP).
    Ports {
        proto: Proto,
        src: u16,
        dst: u16,
        flags: u8,
    },
    EchoRequest(u16),
    EchoReply(u16),
    /// An ICMP error about a packet that went the other way: its flow key
    /// fields as that packet had them.
    Error {
        proto: Proto,
        src: u16,
        dst: u16,
    },
    /// A fragment after the first: no transport header.
    Fragment(Proto),
    /// Another protocol, or another ICMP type.
    Other,
}

/// The IP protocol as the policy knows it (ICMPv6 is ICMP to it).
fn proto_of(number: u8, v6: bool) -> Option<Proto> {
    match (number, v6) {
        (1, false) | (ip6::PROTO_ICMPV6, true) => Some(Proto::Icmp),
        (6, _) => Some(Proto::Tcp),
        (17, _) => Some(Proto::Udp),
        _ => None,
    }
}

/// ICMP's and ICMPv6's message types, as the filter tells them apart.
struct IcmpTypes {
    echo_request: u8,
    echo_reply: u8,
    /// Errors that quote the packet they are about.
    errors: &'static [u8],
}

/// Destination unreachable (PMTU too), time exceeded, parameter problem.
const ICMP4: IcmpTypes = IcmpTypes {
    echo_request: 8,
    echo_reply: 0,
    errors: &[3, 11, 12],
};
/// Destination unreachable, packet too big, time exceeded, parameter problem.
const ICMP6: IcmpTypes = IcmpTypes {
    echo_request: 128,
    echo_reply: 129,
    errors: &[1, 2, 3, 4],
};

/// Reads the header fields the filter needs; `None` when the packet is too
/// short for what its header claims (or, IPv6, its extension headers
/// cannot be walked).
fn shape(packet: &[u8]) -> Option<Shape> {
    match packet.first()? >> 4 {
        4 => shape4(packet),
        6 => shape6(packet),
        _ => None,
    }
}

fn shape4(packet: &[u8]) -> Option<Shape> {
    if packet.len() < 20 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let Some(proto) = proto_of(packet[9], false) else {
        return Some(Shape::Other);
    };
    let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return Some(Shape::Fragment(proto));
    }
    transport(proto, packet.get(ihl..)?, &ICMP4)
}

fn shape6(packet: &[u8]) -> Option<Shape> {
    let (number, l4) = match ip6::upper(packet)? {
        Upper::LaterFragment { proto } => {
            return Some(proto_of(proto, true).map_or(Shape::Other, Shape::Fragment));
        }
        Upper::At { proto, offset } => (proto, packet.get(offset..)?),
    };
    let Some(proto) = proto_of(number, true) else {
        return Some(Shape::Other);
    };
    transport(proto, l4, &ICMP6)
}

/// The shape of a transport header `l4` of `proto`.
fn transport(proto: Proto, l4: &[u8], icmp: &IcmpTypes) -> Option<Shape> {
    let port = |at: usize| Some(u16::from_be_bytes([*l4.get(at)?, *l4.get(at + 1)?]));
    match proto {
        Proto::Tcp | Proto::Udp => Some(Shape::Ports {
            proto,
            src: port(0)?,
            dst: port(2)?,
            // An ICMP error quotes only 8 bytes of TCP: no flags there.
            flags: if proto == Proto::Tcp {
                l4.get(13).copied().unwrap_or(0)
            } else {
                0
            },
        }),
        _ => match *l4.first()? {
            t if t == icmp.echo_request => Some(Shape::EchoRequest(port(4)?)),
            t if t == icmp.echo_reply => Some(Shape::EchoReply(port(4)?)),
            t if icmp.errors.contains(&t) => inner_shape(l4.get(8..)?),
            _ => Some(Shape::Other),
        },
    }
}

/// The flow fields of the packet an ICMP error quotes (its IP header and at
/// least eight bytes of what followed).
fn inner_shape(quoted: &[u8]) -> Option<Shape> {
    match shape(quoted)? {
        Shape::Ports {
            proto, src, dst, ..
        } => Some(Shape::Error { proto, src, dst }),
        Shape::EchoRequest(id) => Some(Shape::Error {
            proto: Proto::Icmp,
            src: id,
            dst: 0,
        }),
        _ => None,
    }
}

/// A flow within one peer: address family (the peer and we have one
/// address each per family, so this stands for the address pair),
/// protocol, our port and theirs (a ping's id and 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    v6: bool,
    proto: Proto,
    local: u16,
    remote: u16,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    /// Which way the packet that opened it went.
    opened: Direction,
    answered: bool,
    closing: bool,
    last_seen: u32,
}

impl Flow {
    fn idle_limit(&self, proto: Proto) -> u32 {
        match (self.answered, proto) {
            (false, _) => UNANSWERED_SECS,
            (true, Proto::Tcp) if self.closing => TCP_CLOSING_SECS,
            (true, Proto::Tcp) => TCP_SECS,
            (true, Proto::Udp) => UDP_SECS,
            (true, _) => ICMP_SECS,
        }
    }

    fn expired(&self, proto: Proto, now: u32) -> bool {
        now.saturating_sub(self.last_seen) > self.idle_limit(proto)
    }
}

/// One peer's rules and flows.
#[derive(Debug)]
pub struct PeerFilter {
    /// `None`: no policy, everything passes and nothing is tracked.
    access: Option<PeerAccess>,
    flows: HashMap<FlowKey, Flow>,
    /// Flows of every peer together (shared with the data plane).
    total: Arc<AtomicUsize>,
    last_full_sweep: Option<u32>,
}

impl PeerFilter {
    pub fn new(access: Option<PeerAccess>, total: Arc<AtomicUsize>) -> Self {
        PeerFilter {
            access,
            flows: HashMap::new(),
            total,
            last_full_sweep: None,
        }
    }

    pub fn access(&self) -> Option<&PeerAccess> {
        self.access.as_ref()
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// New rules: flows opened under the old ones that the new ones would not
    /// open are cut (a revoked permission ends connections too). `sender` says
    /// whether outbound rules are enforced here.
    pub fn set_access(&mut self, access: Option<PeerAccess>, sender: bool) {
        match &access {
            None => self.forget(|_, _| true),
            Some(a) => self.forget(|key, flow| !opens(a, flow.opened, *key, sender)),
        }
        self.access = access;
    }

    /// Decides on one packet. `sender` false lets every outbound packet pass
    /// (and still records its flow): a node whose sender-side check is off.
    pub fn check(&mut self, packet: &[u8], dir: Direction, now: u32, sender: bool) -> Verdict {
        let Some(access) = &self.access else {
            return Verdict::Pass;
        };
        let rules = match dir {
            Direction::In => &access.inbound,
            Direction::Out if sender => &access.outbound,
            Direction::Out => &ALL,
        };
        let Some(shape) = shape(packet) else {
            return Verdict::Drop;
        };
        let v6 = packet[0] >> 4 == 6;
        let (key, opens) = match shape {
            Shape::Ports {
                proto,
                src,
                dst,
                flags,
            } => {
                let key = oriented(v6, proto, src, dst, dir);
                let known = touch(
                    &mut self.flows,
                    key,
                    dir,
                    now,
                    flags & (TCP_FIN | TCP_RST) != 0,
                );
                if known {
                    return Verdict::Pass;
                }
                // A reset opens nothing, though a rule may let it through.
                let allowed = rules.allows(proto, dst);
                if !allowed || flags & TCP_RST != 0 {
                    return if allowed {
                        Verdict::Pass
                    } else {
                        Verdict::Drop
                    };
                }
                (key, true)
            }
            Shape::EchoRequest(id) => {
                let key = FlowKey {
                    v6,
                    proto: Proto::Icmp,
                    local: id,
                    remote: 0,
                };
                if touch(&mut self.flows, key, dir, now, false) {
                    return Verdict::Pass;
                }
                (key, rules.allows(Proto::Icmp, 0))
            }
            Shape::EchoReply(id) => {
                let key = FlowKey {
                    v6,
                    proto: Proto::Icmp,
                    local: id,
                    remote: 0,
                };
                // A reply whose request opened no flow (the table was full)
                // passes where the peer may ping us anyway.
                let known = touch(&mut self.flows, key, dir, now, false);
                return pass_if(known || rules.allows(Proto::Icmp, 0));
            }
            Shape::Error { proto, src, dst } => {
                // The quoted packet went the other way.
                let back = match dir {
                    Direction::In => Direction::Out,
                    Direction::Out => Direction::In,
                };
                let key = match proto {
                    Proto::Icmp => FlowKey {
                        v6,
                        proto,
                        local: src,
                        remote: 0,
                    },
                    _ => oriented(v6, proto, src, dst, back),
                };
                return pass_if(self.flows.contains_key(&key) || rules.any);
            }
            Shape::Fragment(proto) => return pass_if(rules.allows_all(proto)),
            Shape::Other => return pass_if(rules.any),
        };
        if !opens {
            return Verdict::Drop;
        }
        if self.record(key, dir, now) {
            Verdict::Pass
        } else {
            Verdict::PassUnrecorded
        }
    }

    /// Adds a flow if the caps allow; false when they do not.
    fn record(&mut self, key: FlowKey, dir: Direction, now: u32) -> bool {
        if !self.has_room() {
            let swept_lately = self
                .last_full_sweep
                .is_some_and(|t| now.saturating_sub(t) < FULL_SWEEP_SECS);
            if swept_lately {
                return false;
            }
            self.last_full_sweep = Some(now);
            self.sweep(now);
            if !self.has_room() {
                return false;
            }
        }
        let flow = Flow {
            opened: dir,
            answered: false,
            closing: false,
            last_seen: now,
        };
        if self.flows.insert(key, flow).is_none() {
            self.total.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    fn has_room(&self) -> bool {
        self.flows.len() < PEER_FLOWS && self.total.load(Ordering::Relaxed) < TOTAL_FLOWS
    }

    /// Forgets flows idle past their limit.
    pub fn sweep(&mut self, now: u32) {
        self.forget(|key, flow| flow.expired(key.proto, now));
        if self.flows.capacity() > 64 && self.flows.len() < self.flows.capacity() / 4 {
            self.flows.shrink_to_fit();
        }
    }

    fn forget(&mut self, gone: impl Fn(&FlowKey, &Flow) -> bool) {
        let before = self.flows.len();
        self.flows.retain(|key, flow| !gone(key, flow));
        self.total
            .fetch_sub(before - self.flows.len(), Ordering::Relaxed);
    }
}

impl Drop for PeerFilter {
    fn drop(&mut self) {
        self.total.fetch_sub(self.flows.len(), Ordering::Relaxed);
    }
}

/// Every protocol and port: the outbound rules of a node whose sender-side
/// check is off.
static ALL: Ports = Ports {
    any: true,
    tcp: Vec::new(),
    udp: Vec::new(),
    icmp: false,
};

/// Refreshes a known flow; false when there is none.
fn touch(
    flows: &mut HashMap<FlowKey, Flow>,
    key: FlowKey,
    dir: Direction,
    now: u32,
    closing: bool,
) -> bool {
    let Some(flow) = flows.get_mut(&key) else {
        return false;
    };
    flow.last_seen = now;
    flow.answered |= dir != flow.opened;
    flow.closing |= closing;
    true
}

fn pass_if(allowed: bool) -> Verdict {
    if allowed {
        Verdict::Pass
    } else {
        Verdict::Drop
    }
}

/// The flow key of a packet from `src` to `dst` going `dir`.
fn oriented(v6: bool, proto: Proto, src: u16, dst: u16, dir: Direction) -> FlowKey {
    let (local, remote) = match dir {
        Direction::In => (dst, src),
        Direction::Out => (src, dst),
    };
    FlowKey {
        v6,
        proto,
        local,
        remote,
    }
}

/// Whether `access` would open a flow like `key` that went `opened` first.
fn opens(access: &PeerAccess, opened: Direction, key: FlowKey, sender: bool) -> bool {
    let (rules, port) = match opened {
        Direction::In => (&access.inbound, key.local),
        Direction::Out if !sender => return true,
        Direction::Out => (&access.outbound, key.remote),
    };
    rules.allows(key.proto, port)
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
#[cfg(test)]
#[path = "filter6_tests.rs"]
mod tests6;
