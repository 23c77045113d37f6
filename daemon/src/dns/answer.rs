//! One DNS query in, one answer out (or "forward it", or "drop it").
//!
//! Parsing is `hickory-proto`'s (it bounds compression pointers and label
//! lengths); what is answered is ours: `A` and `AAAA` for names under the
//! domain, `PTR` for mesh addresses of both families (`in-addr.arpa`,
//! `ip6.arpa`), `NXDOMAIN` (with the zone's SOA, so the negative answer
//! is cached for [`super::TTL`] seconds) for unknown names under the domain,
//! an empty `NOERROR` for other types of a known name. EDNS0 is answered with
//! our payload size; an answer too large for the client's UDP size is sent
//! truncated (TC) so it retries over TCP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::{Zone, TTL};

/// The UDP payload size we advertise and accept at most (the DNS flag day
/// 2020 figure: no IP fragmentation on any common path).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Without EDNS0, a UDP answer holds at most this (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// The DNS header.
const HEADER: usize = 12;

/// How the query came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// A name outside the mesh: the host's upstream resolvers answer it.
    Forward,
    /// Not a query we answer at all (too short for a header, or a response).
    Drop,
}

/// Answers `query` from `zone`.
pub fn respond(zone: &Zone, query: &[u8], transport: Transport) -> Reply {
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return Reply::Drop;
    }
    let Ok(request) = Message::from_vec(query) else {
        return Reply::Answer(header_only(query, ResponseCode::FormErr));
    };
    if request.op_code() != OpCode::Query {
        return Reply::Answer(header_only(query, ResponseCode::NotImp));
    }
    let [question] = request.queries() else {
        return Reply::Answer(header_only(query, ResponseCode::FormErr));
    };
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(zone.forwarding)
        .add_query(question.clone());
    let limit = match (transport, request.extensions()) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, Some(edns)) => {
            usize::from(edns.max_payload().clamp(CLASSIC_UDP as u16, EDNS_PAYLOAD))
        }
        (Transport::Udp, None) => CLASSIC_UDP,
    };
    if let Some(edns) = request.extensions() {
        let mut ours = Edns::new();
        ours.set_max_payload(EDNS_PAYLOAD).set_version(0);
        if edns.version() > 0 {
            // RFC 6891: BADVERS is an extended code (16 = 1 << 4 | 0).
            ours.set_rcode_high(1);
            response.set_edns(ours);
            return Reply::Answer(serialize(&response, limit));
        }
        response.set_edns(ours);
    }
    if question.query_class() != DNSClass::IN {
        response.set_response_code(ResponseCode::Refused);
        return Reply::Answer(serialize(&response, limit));
    }
    match answer(zone, question, &mut response) {
        Some(()) => Reply::Answer(serialize(&response, limit)),
        None if zone.forwarding => Reply::Forward,
        None => {
            response.set_response_code(ResponseCode::Refused);
            Reply::Answer(serialize(&response, limit))
        }
    }
}

/// Fills the answer for a name that is ours; `None` when it is not.
fn answer(zone: &Zone, question: &Query, response: &mut Message) -> Option<()> {
    let qname = question.name().to_lowercase();
    let text = qname.to_ascii();
    let text = text.trim_end_matches('.');
    if let Some(ip) = reverse_name(text) {
        if !zone.covers(ip) {
            return None;
        }
        response.set_authoritative(true);
        match (zone.reverse(ip), question.query_type()) {
            (Some(name), RecordType::PTR) => {
                let target = Name::from_ascii(format!("{name}.")).ok()?;
                response.add_answer(Record::from_rdata(
                    question.name().clone(),
                    TTL,
                    RData::PTR(PTR(target)),
                ));
            }
            (Some(_), _) => {
                response.add_name_server(soa(zone)?);
            }
            (None, _) => {
                response
                    .set_response_code(ResponseCode::NXDomain)
                    .add_name_server(soa(zone)?);
            }
        }
        return Some(());
    }
    let relative = if text == zone.domain {
        ""
    } else {
        text.strip_suffix(&zone.domain)?.strip_suffix('.')?
    };
    response.set_authoritative(true);
    if relative.is_empty() {
        if question.query_type() == RecordType::SOA {
            response.add_answer(soa(zone)?);
        } else {
            response.add_name_server(soa(zone)?);
        }
        return Some(());
    }
    let kind = question.query_type();
    let mut data = Vec::new();
    if let (Some(ip), RecordType::A | RecordType::ANY) = (zone.lookup(relative), kind) {
        data.push(RData::A(A(ip)));
    }
    if let (Some(ip), RecordType::AAAA | RecordType::ANY) = (zone.lookup6(relative), kind) {
        data.push(RData::AAAA(AAAA(ip)));
    }
    match data {
        _ if !data.is_empty() => {
            for rdata in data {
                response.add_answer(Record::from_rdata(question.name().clone(), TTL, rdata));
            }
        }
        _ if zone.has_name(relative) => {
            // The name exists, without data of this type (AAAA of a node
            // without a mesh IPv6 address, MX, ...).
            response.add_name_server(soa(zone)?);
        }
        _ => {
            response
                .set_response_code(ResponseCode::NXDomain)
                .add_name_server(soa(zone)?);
        }
    }
    Some(())
}

/// The zone's SOA: its minimum TTL is how long a negative answer is cached.
fn soa(zone: &Zone) -> Option<Record> {
    let apex = Name::from_ascii(format!("{}.", zone.domain)).ok()?;
    let mname = Name::from_ascii(format!("resolver.{}.", zone.domain)).ok()?;
    let rname = Name::from_ascii(format!("hostmaster.{}.", zone.domain)).ok()?;
    let soa = SOA::new(mname, rname, 1, 3600, 600, 86400, TTL);
    Some(Record::from_rdata(apex, TTL, RData::SOA(soa)))
}

/// `4.3.2.1.in-addr.arpa` → 1.2.3.4, and the 32 nibbles of an `ip6.arpa`
/// name → its IPv6 address.
fn reverse_name(name: &str) -> Option<IpAddr> {
    if let Some(nibbles) = name.strip_suffix(".ip6.arpa") {
        return reverse_name6(nibbles).map(IpAddr::V6);
    }
    reverse_name4(name).map(IpAddr::V4)
}

/// `b.a.9.8. … .f.ip6.arpa` (least significant nibble first) → the address.
fn reverse_name6(nibbles: &str) -> Option<Ipv6Addr> {
    let mut bits: u128 = 0;
    let mut count = 0;
    for (i, label) in nibbles.split('.').enumerate() {
        let &[digit] = label.as_bytes() else {
            return None;
        };
        let value = char::from(digit).to_digit(16)?;
        if i >= 32 {
            return None;
        }
        bits |= u128::from(value) << (4 * i);
        count += 1;
    }
    (count == 32).then(|| Ipv6Addr::from(bits))
}

fn reverse_name4(name: &str) -> Option<Ipv4Addr> {
    let labels = name.strip_suffix(".in-addr.arpa")?;
    let octets: Vec<u8> = labels
        .split('.')
        .map(|l| l.parse::<u8>().ok())
        .collect::<Option<_>>()?;
    match octets[..] {
        [d, c, b, a] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

/// The response's bytes, truncated (TC, no records) when they exceed `limit`.
fn serialize(response: &Message, limit: usize) -> Vec<u8> {
    match response.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        Ok(_) => {
            let mut short = response.clone();
            short.take_answers();
            short.take_name_servers();
            short.take_additionals();
            short.set_truncated(true);
            short.to_vec().unwrap_or_default()
        }
        Err(_) => Vec::new(),
    }
}

/// A header-only answer to a query we could not take apart: its id and
/// opcode, our error.
fn header_only(query: &[u8], code: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; HEADER];
    out[0..2].copy_from_slice(&query[0..2]);
    // QR, the query's opcode and RD; no other flag.
    out[2] = 0x80 | (query[2] & 0x79);
    out[3] = u16::from(code).to_be_bytes()[1] & 0x0f;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip6_arpa_names_read_least_significant_nibble_first() {
        let ip: Ipv6Addr = "fd7a:115c:a1e0::6440:2".parse().unwrap();
        let name = "2.0.0.0.0.4.4.6.0.0.0.0.0.0.0.0.0.0.0.0.0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa";
        assert_eq!(reverse_name(name), Some(IpAddr::V6(ip)));
        // Upper-case digits are digits (names arrive lowercased anyway).
        assert_eq!(reverse_name6(&name[..63].to_uppercase()), Some(ip));
        // Too few or too many nibbles, two-digit labels, non-hex.
        assert_eq!(reverse_name(&name[2..]), None);
        assert_eq!(reverse_name(&format!("0.{name}")), None);
        assert_eq!(reverse_name(&name.replacen("2.0", "20", 1)), None);
        assert_eq!(reverse_name(&name.replacen('2', "g", 1)), None);
        assert_eq!(reverse_name("ip6.arpa"), None);
        assert_eq!(
            reverse_name("2.0.64.100.in-addr.arpa"),
            Some(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)))
        );
    }
}
