//! `overlayctl dns query`: a query built, and an answer read back as text.

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

/// A recursive query for `name` of type `kind` (`A`, `AAAA`, `PTR`, ...; an
/// IPv4 address with `PTR` or no type becomes its reverse name).
pub fn build(name: &str, kind: Option<&str>) -> Result<Vec<u8>, String> {
    let reverse = name.parse::<std::net::Ipv4Addr>().ok();
    let kind = match (kind, reverse) {
        (Some(k), _) => k
            .to_ascii_uppercase()
            .parse::<RecordType>()
            .map_err(|_| format!("unknown record type {k:?}"))?,
        (None, Some(_)) => RecordType::PTR,
        (None, None) => RecordType::A,
    };
    let name = match reverse {
        Some(ip) => {
            let [a, b, c, d] = ip.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
        }
        None => name.to_owned(),
    };
    let name = Name::from_ascii(&name).map_err(|e| format!("bad name {name:?}: {e}"))?;
    let mut m = Message::new();
    m.set_id(rand_id(&name))
        .set_recursion_desired(true)
        .add_query(Query::query(name, kind));
    m.to_vec().map_err(|e| e.to_string())
}

/// The response code and one line per answer record (`NAME TTL IN TYPE DATA`).
pub fn read(answer: &[u8]) -> Result<(String, Vec<String>), String> {
    let m = Message::from_vec(answer).map_err(|e| format!("unreadable answer: {e}"))?;
    let lines = m
        .answers()
        .iter()
        .map(|r| {
            format!(
                "{} {} IN {} {}",
                r.name(),
                r.ttl(),
                r.record_type(),
                r.data()
            )
        })
        .collect();
    Ok((m.response_code().to_str().to_owned(), lines))
}

/// Any id will do: the answer comes back in-process, not over a network.
fn rand_id(name: &Name) -> u16 {
    name.to_ascii()
        .bytes()
        .fold(0x5a5au16, |h, b| h.rotate_left(5) ^ u16::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{respond, Reply, Zone};
    use std::net::Ipv4Addr;

    #[test]
    fn a_query_and_its_answer_read_as_text() {
        let zone = Zone::new(
            "overlay.internal",
            Ipv4Addr::new(100, 100, 100, 100),
            "100.64.0.0/10".parse().unwrap(),
        )
        .build(("a", Ipv4Addr::new(100, 64, 0, 1)), &[], &[]);
        let q = build("a.overlay.internal", None).unwrap();
        let Reply::Answer(bytes) = respond(&zone, &q, crate::dns::answer::Transport::Udp) else {
            panic!("no answer");
        };
        let (rcode, lines) = read(&bytes).unwrap();
        assert_eq!(rcode, "No Error");
        assert_eq!(lines, vec!["a.overlay.internal. 5 IN A 100.64.0.1"]);
        let q = build("100.64.0.1", None).unwrap();
        let Reply::Answer(bytes) = respond(&zone, &q, crate::dns::answer::Transport::Udp) else {
            panic!("no answer");
        };
        assert_eq!(
            read(&bytes).unwrap().1,
            vec!["1.0.64.100.in-addr.arpa. 5 IN PTR a.overlay.internal."]
        );
        assert!(build("x", Some("BOGUS")).is_err());
    }
}
