//! The mesh resolver's addresses (IPv4, and its IPv6 twin in the mesh
//! prefix), served from the TUN: packets to them never go to a peer; UDP
//! and TCP port 53 are answered from the zone (`crate::dns`), names outside
//! the mesh forwarded to the host's upstream servers when the host's
//! resolv.conf points here, anything else refused with an ICMP error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::dns::answer::Transport;
use crate::dns::tcp::{Out, Segment, TcpDns};
use crate::dns::{respond, Reply, Zone};

use super::checksum::{fold, sum16, tcp_v4, tcp_v6, v6_pseudo, IPV6_HEADER};
use super::peer::lock;
use super::DataPlane;
use super::{icmp, icmp6, ip6};

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// Forwarded queries in flight at once; beyond that the client gets SERVFAIL.
const MAX_FORWARDS: u32 = 256;
/// How long one upstream server gets to answer a forwarded query.
const FORWARD_WAIT: Duration = Duration::from_millis(1500);

/// The resolver's state inside the data plane.
#[derive(Default)]
pub struct Resolver {
    /// The resolver's address as a `u32`; 0 while the mesh has no DNS.
    addr: AtomicU32,
    /// Its IPv6 address, high and low halves; 0 while there is none. A
    /// reader racing a change may pair halves of two addresses for one
    /// packet: neither is a peer's, so nothing goes astray.
    addr6: [AtomicU64; 2],
    zone: RwLock<Option<Arc<Zone>>>,
    tcp: Mutex<TcpDns>,
    /// The host's servers for names outside the mesh (resolv.conf mode).
    upstreams: RwLock<Vec<SocketAddr>>,
    forwards: AtomicU32,
    pub counters: ResolverCounters,
}

/// What the resolver did, for `overlayctl status` and `/metrics`.
#[derive(Default)]
pub struct ResolverCounters {
    pub answered: AtomicU64,
    pub forwarded: AtomicU64,
    /// Queries dropped or answered FORMERR (malformed), and forwards that failed.
    pub bad: AtomicU64,
    pub forward_failed: AtomicU64,
}

impl Resolver {
    pub fn zone(&self) -> Option<Arc<Zone>> {
        self.zone.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Answers one query as the mesh resolver would (for `overlayctl dns
    /// query`); a forwarded name is asked upstream.
    pub async fn ask(&self, query: &[u8]) -> Option<Vec<u8>> {
        let zone = self.zone()?;
        match respond(&zone, query, Transport::Udp) {
            Reply::Answer(bytes) => Some(bytes),
            Reply::Forward => forward_once(&self.upstreams(), query).await,
            Reply::Drop => None,
        }
    }
}

impl DataPlane {
    /// A new zone (the netmap or the DNS settings changed); `None`: no DNS.
    pub fn set_zone(&self, mut zone: Option<Zone>) {
        if let (Some(zone), Some(mesh6)) = (zone.as_mut(), self.mesh6()) {
            zone.set_own_ip6(mesh6.addr, mesh6.network);
        }
        let r = &self.resolver;
        let addr = zone.as_ref().map_or(0, |z| u32::from(z.resolver));
        let addr6 = zone
            .as_ref()
            .and_then(|z| z.resolver6)
            .map_or(0, u128::from);
        *r.zone.write().unwrap_or_else(|e| e.into_inner()) = zone.map(Arc::new);
        r.addr.store(addr, Ordering::Relaxed);
        r.addr6[0].store((addr6 >> 64) as u64, Ordering::Relaxed);
        r.addr6[1].store(addr6 as u64, Ordering::Relaxed);
    }

    /// Where names outside the mesh are forwarded (empty: refused).
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        *self
            .resolver
            .upstreams
            .write()
            .unwrap_or_else(|e| e.into_inner()) = upstreams;
    }

    /// Whether a packet to `dst` is for the resolver (one atomic load).
    #[inline]
    pub(super) fn is_resolver(&self, dst: Ipv4Addr) -> bool {
        let addr = self.resolver.addr.load(Ordering::Relaxed);
        addr != 0 && addr == u32::from(dst)
    }

    /// Whether a packet to `dst` is for the resolver's IPv6 address.
    #[inline]
    pub(super) fn is_resolver6(&self, dst: Ipv6Addr) -> bool {
        let bits = u128::from(dst);
        let r = &self.resolver.addr6;
        bits != 0
            && (bits >> 64) as u64 == r[0].load(Ordering::Relaxed)
            && bits as u64 == r[1].load(Ordering::Relaxed)
    }

    /// Whether a packet to `dst` is for the resolver, either family.
    #[inline]
    pub(super) fn for_resolver(&self, dst: IpAddr) -> bool {
        match dst {
            IpAddr::V4(v4) => self.is_resolver(v4),
            IpAddr::V6(v6) => self.is_resolver6(v6),
        }
    }

    /// A packet from the TUN to one of the resolver's addresses; answers
    /// come from the address it was sent to.
    pub(super) async fn to_resolver(self: &Arc<Self>, packet: &[u8]) {
        let Some(zone) = self.resolver.zone() else {
            return;
        };
        let Some(ip) = Ip::parse(packet) else {
            self.resolver.counters.bad.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match (ip.proto, ip.dst_port()) {
            (PROTO_UDP, Some(53)) => self.udp_query(&zone, &ip).await,
            (PROTO_TCP, Some(53)) => self.tcp_segment(&zone, &ip).await,
            _ => {
                let reply = match ip.dst {
                    IpAddr::V4(to) => icmp::host_unreachable(to, packet),
                    IpAddr::V6(to) => icmp6::host_unreachable(to, packet),
                };
                if let Some(reply) = reply {
                    self.write_tun(&reply).await;
                }
            }
        }
    }

    async fn udp_query(self: &Arc<Self>, zone: &Zone, ip: &Ip<'_>) {
        let Some((src_port, payload)) = ip.udp() else {
            self.resolver.counters.bad.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let client = (ip.src, src_port);
        match respond(zone, payload, Transport::Udp) {
            Reply::Answer(answer) => {
                self.count_answer(&answer);
                if let Some(packet) = udp_packet(ip.dst, client, &answer) {
                    self.write_tun(&packet).await;
                }
            }
            Reply::Forward => {
                let upstreams = self.resolver.upstreams();
                if self.resolver.forwards.fetch_add(1, Ordering::Relaxed) >= MAX_FORWARDS {
                    self.resolver.forwards.fetch_sub(1, Ordering::Relaxed);
                    self.resolver
                        .counters
                        .forward_failed
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.resolver
                    .counters
                    .forwarded
                    .fetch_add(1, Ordering::Relaxed);
                let me = self.clone();
                let query = payload.to_vec();
                let from = ip.dst;
                tokio::spawn(async move {
                    match forward_once(&upstreams, &query).await {
                        Some(answer) => {
                            if let Some(packet) = udp_packet(from, client, &answer) {
                                me.write_tun(&packet).await;
                            }
                        }
                        None => {
                            me.resolver
                                .counters
                                .forward_failed
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    me.resolver.forwards.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Reply::Drop => {
                self.resolver.counters.bad.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn tcp_segment(&self, zone: &Zone, ip: &Ip<'_>) {
        let Some(seg) = ip.tcp() else {
            self.resolver.counters.bad.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let now = self.clock.load(Ordering::Relaxed);
        let iss: u32 = rand::random();
        let mut answered = Vec::new();
        let out = lock(&self.resolver.tcp).on_segment(seg, now, iss, |query| {
            match respond(zone, query, Transport::Tcp) {
                Reply::Answer(answer) => {
                    answered.push(answer.clone());
                    Some(answer)
                }
                // Over TCP, names outside the mesh are not forwarded (a
                // stub resolver asks those over UDP first).
                Reply::Forward => {
                    let mut refused = query.to_vec();
                    refuse(&mut refused);
                    Some(refused)
                }
                Reply::Drop => None,
            }
        });
        for answer in &answered {
            self.count_answer(answer);
        }
        for o in out {
            if let Some(packet) = tcp_packet(ip.dst, seg.client, &o) {
                self.write_tun(&packet).await;
            }
        }
    }

    fn count_answer(&self, answer: &[u8]) {
        let formerr = answer.get(3).is_some_and(|b| b & 0x0f == 1);
        let counter = if formerr {
            &self.resolver.counters.bad
        } else {
            &self.resolver.counters.answered
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets idle DNS-over-TCP connections (from the timer task).
    pub(super) fn sweep_resolver(&self, now: u32) {
        lock(&self.resolver.tcp).sweep(now);
    }
}

/// Turns a query into a header-only REFUSED answer in place.
fn refuse(query: &mut Vec<u8>) {
    query.truncate(12);
    if query.len() == 12 {
        query[2] = 0x80 | (query[2] & 0x79);
        query[3] = 5;
        query[4..12].fill(0);
    }
}

/// Asks the upstream servers in turn; the first answer.
async fn forward_once(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.ok()?;
    let mut buf = vec![0u8; 65_535];
    for server in upstreams {
        if socket.send_to(query, server).await.is_err() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + FORWARD_WAIT;
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            // Only the server asked, with our id, answers.
            if from == *server && n >= 2 && buf[..2] == query[..2] {
                return Some(buf[..n].to_vec());
            }
        }
    }
    None
}

/// The IP fields the resolver needs, of either family.
struct Ip<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: &'a [u8],
}

impl<'a> Ip<'a> {
    fn parse(packet: &'a [u8]) -> Option<Ip<'a>> {
        match packet.first()? >> 4 {
            4 => Self::parse_v4(packet),
            6 => Self::parse_v6(packet),
            _ => None,
        }
    }

    /// An IPv6 packet whose fixed header is followed by the transport
    /// header itself: a stub resolver's query carries no extension headers,
    /// and one that does (a fragment above all) is no query.
    fn parse_v6(packet: &'a [u8]) -> Option<Ip<'a>> {
        let (src, dst) = ip6::addrs(packet)?;
        let Some(ip6::Upper::At {
            proto,
            offset: IPV6_HEADER,
        }) = ip6::upper(packet)
        else {
            return None;
        };
        let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
        let end = (IPV6_HEADER + payload).min(packet.len());
        Some(Ip {
            src: src.into(),
            dst: dst.into(),
            proto,
            l4: &packet[IPV6_HEADER..end],
        })
    }

    fn parse_v4(packet: &'a [u8]) -> Option<Ip<'a>> {
        let (src, dst) = icmp::ipv4_addrs(packet)?;
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        let end = total.min(packet.len());
        // No fragments: a DNS query is one packet.
        if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 || ihl < 20 || end < ihl {
            return None;
        }
        Some(Ip {
            src: src.into(),
            dst: dst.into(),
            proto: packet[9],
            l4: &packet[ihl..end],
        })
    }

    fn dst_port(&self) -> Option<u16> {
        Some(u16::from_be_bytes([*self.l4.get(2)?, *self.l4.get(3)?]))
    }

    fn udp(&self) -> Option<(u16, &'a [u8])> {
        let src_port = u16::from_be_bytes([*self.l4.first()?, *self.l4.get(1)?]);
        let len = usize::from(u16::from_be_bytes([*self.l4.get(4)?, *self.l4.get(5)?]));
        let payload = self.l4.get(8..len.max(8).min(self.l4.len()))?;
        Some((src_port, payload))
    }

    fn tcp(&self) -> Option<Segment<'a>> {
        let l4 = self.l4;
        let src_port = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
        let offset = usize::from(*l4.get(12)? >> 4) * 4;
        if offset < 20 || offset > l4.len() {
            return None;
        }
        let word = |at: usize| u32::from_be_bytes([l4[at], l4[at + 1], l4[at + 2], l4[at + 3]]);
        Some(Segment {
            client: (self.src, src_port),
            seq: word(4),
            ack: word(8),
            flags: l4[13],
            mss: mss_option(&l4[20..offset]),
            payload: &l4[offset..],
        })
    }
}

/// The MSS option among TCP options.
fn mss_option(mut options: &[u8]) -> Option<u16> {
    while let [kind, rest @ ..] = options {
        match kind {
            0 => return None,
            1 => options = rest,
            2 if rest.len() >= 3 && rest[0] == 4 => {
                return Some(u16::from_be_bytes([rest[1], rest[2]]));
            }
            _ => {
                let len = usize::from(*rest.first()?);
                if len < 2 || len > options.len() {
                    return None;
                }
                options = &options[len..];
            }
        }
    }
    None
}

/// An IP header from `src` to `dst` for `l4_len` bytes of `proto`, of
/// their family (`None` if they differ).
fn ip_header(src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize) -> Option<Vec<u8>> {
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            Some(icmp::ipv4_header(src, dst, proto, l4_len).to_vec())
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => Some(ip6::header(src, dst, proto, l4_len).to_vec()),
        _ => None,
    }
}

/// A UDP answer from the resolver's port 53 to the client.
fn udp_packet(from: IpAddr, client: (IpAddr, u16), payload: &[u8]) -> Option<Vec<u8>> {
    let len = 8 + payload.len();
    let mut p = ip_header(from, client.0, PROTO_UDP, len)?;
    let ihl = p.len();
    p.extend_from_slice(&53u16.to_be_bytes());
    p.extend_from_slice(&client.1.to_be_bytes());
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let pseudo = match from {
        IpAddr::V4(_) => sum16(&p[12..20], u32::from(PROTO_UDP) + len as u32),
        IpAddr::V6(_) => v6_pseudo(&p, PROTO_UDP, len),
    };
    // Zero means "no checksum" over IPv4 and is not allowed over IPv6.
    let sum = match fold(sum16(&p[ihl..], pseudo)) {
        0 => 0xffff,
        s => s,
    };
    p[ihl + 6..ihl + 8].copy_from_slice(&sum.to_be_bytes());
    Some(p)
}

/// A TCP segment from the resolver's port 53 to the client.
fn tcp_packet(from: IpAddr, client: (IpAddr, u16), seg: &Out) -> Option<Vec<u8>> {
    let len = 20 + seg.payload.len();
    let mut p = ip_header(from, client.0, PROTO_TCP, len)?;
    p.extend_from_slice(&53u16.to_be_bytes());
    p.extend_from_slice(&client.1.to_be_bytes());
    p.extend_from_slice(&seg.seq.to_be_bytes());
    p.extend_from_slice(&seg.ack.to_be_bytes());
    p.extend_from_slice(&[0x50, seg.flags]);
    p.extend_from_slice(&seg.window.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(&seg.payload);
    match from {
        IpAddr::V4(_) => tcp_v4(&mut p, 20),
        IpAddr::V6(_) => tcp_v6(&mut p),
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::checksum::internet;

    /// An ACK carrying `xyz`, seq 7, ack 9.
    fn xyz_segment() -> Out {
        Out {
            seq: 7,
            ack: 9,
            flags: crate::dns::tcp::ACK,
            window: 100,
            payload: b"xyz".to_vec(),
        }
    }

    #[test]
    fn built_packets_carry_valid_checksums() {
        let from = Ipv4Addr::new(100, 100, 100, 100).into();
        let client = (Ipv4Addr::new(100, 64, 0, 1).into(), 5353);
        let udp = udp_packet(from, client, b"answer!").unwrap();
        assert_eq!(internet(&udp[..20]), 0);
        let pseudo = sum16(&udp[12..20], u32::from(PROTO_UDP) + (udp.len() - 20) as u32);
        assert_eq!(fold(sum16(&udp[20..], pseudo)), 0);
        let parsed = Ip::parse(&udp).unwrap();
        assert_eq!(parsed.udp().unwrap(), (53, &b"answer!"[..]));

        let tcp = tcp_packet(from, client, &xyz_segment()).unwrap();
        assert_eq!(internet(&tcp[..20]), 0);
        let pseudo = super::super::checksum::tcp_v4_pseudo(&tcp, tcp.len() - 20);
        assert_eq!(fold(sum16(&tcp[20..], pseudo)), 0);
        let parsed = Ip::parse(&tcp).unwrap().tcp().unwrap();
        assert_eq!(
            (parsed.seq, parsed.ack, parsed.payload),
            (7, 9, &b"xyz"[..])
        );
    }

    #[test]
    fn ipv6_answers_carry_valid_checksums_and_parse_back() {
        let from: IpAddr = "fd7a:115c:a1e0::6464:6464".parse().unwrap();
        let client: (IpAddr, u16) = ("fd7a:115c:a1e0::6440:1".parse().unwrap(), 5353);
        let udp = udp_packet(from, client, b"answer!").unwrap();
        assert_eq!(udp.len(), IPV6_HEADER + 8 + 7);
        assert_eq!(ones_complement_v6(&udp, PROTO_UDP), 0xffff, "UDP checksum");
        let parsed = Ip::parse(&udp).unwrap();
        assert_eq!(
            (parsed.src, parsed.dst, parsed.proto),
            (from, client.0, PROTO_UDP)
        );
        assert_eq!(parsed.udp().unwrap(), (53, &b"answer!"[..]));

        let tcp = tcp_packet(from, client, &xyz_segment()).unwrap();
        assert_eq!(ones_complement_v6(&tcp, PROTO_TCP), 0xffff, "TCP checksum");
        let parsed = Ip::parse(&tcp).unwrap().tcp().unwrap();
        assert_eq!(parsed.client, (from, 53));
        assert_eq!((parsed.seq, parsed.payload), (7, &b"xyz"[..]));

        // An answer is never built across families, and a header cut short
        // is no query.
        let v4: IpAddr = Ipv4Addr::new(100, 100, 100, 100).into();
        assert!(udp_packet(v4, client, b"x").is_none());
        assert!(Ip::parse(&udp[..IPV6_HEADER - 1]).is_none());

        // A fragment (header 44 before the UDP header) is no query.
        let mut fragment = udp[..IPV6_HEADER].to_vec();
        fragment[6] = 44;
        fragment.extend_from_slice(&[PROTO_UDP, 0, 0, 1, 0, 0, 0, 7]);
        fragment.extend_from_slice(&udp[IPV6_HEADER..]);
        let len = (fragment.len() - IPV6_HEADER) as u16;
        fragment[4..6].copy_from_slice(&len.to_be_bytes());
        assert!(Ip::parse(&fragment).is_none());
    }

    /// The ones' complement sum of an IPv6 packet's upper-layer message and
    /// its pseudo-header (RFC 8200 section 8.1), written out here rather
    /// than with the code under test: 0xffff when the checksum is right.
    fn ones_complement_v6(packet: &[u8], next: u8) -> u16 {
        let words = |bytes: &[u8]| -> u32 {
            bytes
                .chunks(2)
                .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
                .sum()
        };
        let len = (packet.len() - 40) as u32;
        let mut sum = words(&packet[8..40]) + (len >> 16) + (len & 0xffff) + u32::from(next);
        sum += words(&packet[40..]);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn mss_is_read_from_tcp_options() {
        assert_eq!(mss_option(&[2, 4, 0x05, 0xb4]), Some(1460));
        assert_eq!(mss_option(&[1, 1, 2, 4, 0x02, 0x18]), Some(536));
        assert_eq!(mss_option(&[4, 2, 8, 10, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(mss_option(&[8, 0]), None);
        assert_eq!(mss_option(&[]), None);
    }

    #[test]
    fn fragments_and_short_packets_are_not_queries() {
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut udp = udp_packet(local, (local, 1), b"q").unwrap();
        assert!(Ip::parse(&udp).is_some());
        udp[6] = 0x20; // more fragments
        assert!(Ip::parse(&udp).is_none());
        assert!(Ip::parse(&[0x45, 0, 0]).is_none());
    }
}
