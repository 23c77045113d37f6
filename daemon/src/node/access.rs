//! What the access policy lets through between this node and one peer.
//!
//! The coordinator sends a [`NodeFilter`]: rules naming peers by id, tag or
//! mesh CIDR. Resolving them against one peer gives a [`PeerAccess`]: the
//! protocols and ports that peer may open towards us (`inbound`) and that we
//! may open towards it (`outbound`). It is computed here, when the filter or
//! the peer's tags change, never per packet; the data plane only asks
//! [`Ports::allows`]. Replies to an allowed connection need no rule: that is
//! the data plane's flow table (`dataplane::filter`).

use std::fmt;

use overlay_proto::coord::PeerInfo;
use overlay_proto::filter::{FilterRule, NodeFilter, PortRange, Proto};

/// The new connections one direction lets through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports {
    /// Every protocol and port.
    pub any: bool,
    /// Sorted, merged ranges.
    pub tcp: Vec<PortRange>,
    pub udp: Vec<PortRange>,
    /// ICMP echo requests.
    pub icmp: bool,
}

impl Ports {
    /// Whether a new connection of `proto` to `port` may open (`port` is
    /// ignored for ICMP).
    pub fn allows(&self, proto: Proto, port: u16) -> bool {
        if self.any {
            return true;
        }
        let ranges = match proto {
            Proto::Any => return false,
            Proto::Icmp => return self.icmp,
            Proto::Tcp => &self.tcp,
            Proto::Udp => &self.udp,
        };
        // Ranges are few, sorted and disjoint.
        let at = ranges.partition_point(|r| r.last < port);
        ranges.get(at).is_some_and(|r| r.contains(port))
    }

    /// Whether every port of `proto` is open (so a non-first fragment, which
    /// carries no port, may pass).
    pub fn allows_all(&self, proto: Proto) -> bool {
        self.any
            || match proto {
                Proto::Tcp => self.tcp.first() == Some(&PortRange::ALL),
                Proto::Udp => self.udp.first() == Some(&PortRange::ALL),
                Proto::Icmp => self.icmp,
                Proto::Any => false,
            }
    }

    pub fn is_empty(&self) -> bool {
        !self.any && !self.icmp && self.tcp.is_empty() && self.udp.is_empty()
    }

    fn add(&mut self, rule: &FilterRule) {
        match rule.proto {
            Proto::Any => self.any = true,
            Proto::Icmp => self.icmp = true,
            Proto::Tcp => self.tcp.extend(&rule.ports),
            Proto::Udp => self.udp.extend(&rule.ports),
        }
    }

    fn normalize(&mut self) {
        merge(&mut self.tcp);
        merge(&mut self.udp);
    }
}

/// Sorts ranges and merges those that overlap or touch.
fn merge(ranges: &mut Vec<PortRange>) {
    ranges.sort_unstable();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match merged.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last);
            }
            _ => merged.push(r),
        }
    }
    *ranges = merged;
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.any {
            return f.write_str("everything");
        }
        if self.is_empty() {
            return f.write_str("nothing");
        }
        let list = |ranges: &[PortRange]| {
            ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut parts = Vec::new();
        if !self.tcp.is_empty() {
            parts.push(format!("tcp {}", list(&self.tcp)));
        }
        if !self.udp.is_empty() {
            parts.push(format!("udp {}", list(&self.udp)));
        }
        if self.icmp {
            parts.push("icmp".to_owned());
        }
        f.write_str(&parts.join("; "))
    }
}

/// What may open between this node and one peer, each way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAccess {
    /// What the peer may open towards us.
    pub inbound: Ports,
    /// What we may open towards the peer.
    pub outbound: Ports,
}

/// The filter resolved for one peer: the rules that name it, by id, tag or
/// mesh address (IPv4 or IPv6). `None` (no policy) lets everything through.
pub fn compile(filter: Option<&NodeFilter>, peer: &PeerInfo) -> Option<PeerAccess> {
    let filter = filter?;
    // A rule naming the peer by either of its mesh addresses covers it: the
    // peer is one node whichever family its packets use.
    let covers = |rule: &FilterRule| {
        rule.covers(peer.id, peer.mesh_ip.into(), &peer.tags)
            || peer
                .mesh_ip6
                .is_some_and(|v6| rule.covers(peer.id, v6.into(), &peer.tags))
    };
    let mut access = PeerAccess::default();
    for rule in filter.inbound.iter().filter(|r| covers(r)) {
        access.inbound.add(rule);
    }
    for rule in filter.outbound.iter().filter(|r| covers(r)) {
        access.outbound.add(rule);
    }
    access.inbound.normalize();
    access.outbound.normalize();
    Some(access)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn rule(peers: &str, proto: Proto, ports: &[&str]) -> FilterRule {
        FilterRule {
            peers: vec![peers.parse().unwrap()],
            proto,
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    fn peer(id: u64, last_octet: u8, tags: &[&str]) -> PeerInfo {
        PeerInfo {
            id,
            name: format!("n{id}"),
            mesh_ip: Ipv4Addr::new(100, 64, 0, last_octet),
            mesh_ip6: None,
            public_key: String::new(),
            online: true,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn no_policy_is_no_filter() {
        assert_eq!(compile(None, &peer(2, 2, &[])), None);
    }

    #[test]
    fn rules_resolve_by_tag_id_and_address_and_ports_merge() {
        let filter = NodeFilter {
            inbound: vec![
                rule("tag:dev", Proto::Tcp, &["22"]),
                rule("node:2", Proto::Tcp, &["20-21", "8000-8100"]),
                rule("100.64.0.0/30", Proto::Icmp, &[]),
                rule("tag:ops", Proto::Any, &[]),
            ],
            outbound: vec![rule("tag:dev", Proto::Udp, &["53"])],
        };
        let access = compile(Some(&filter), &peer(2, 2, &["dev"])).unwrap();
        assert_eq!(access.inbound.to_string(), "tcp 20-22,8000-8100; icmp");
        assert!(access.inbound.allows(Proto::Tcp, 21));
        assert!(access.inbound.allows(Proto::Tcp, 8050));
        assert!(!access.inbound.allows(Proto::Tcp, 80));
        assert!(!access.inbound.allows(Proto::Udp, 22));
        assert!(access.inbound.allows(Proto::Icmp, 0));
        assert_eq!(access.outbound.to_string(), "udp 53");
        assert!(!access.outbound.allows(Proto::Tcp, 53));

        // Another peer: no tag dev, not node 2, outside the /30.
        let other = compile(Some(&filter), &peer(3, 9, &[])).unwrap();
        assert!(other.inbound.is_empty() && other.outbound.is_empty());
        assert_eq!(other.inbound.to_string(), "nothing");

        let ops = compile(Some(&filter), &peer(4, 9, &["ops"])).unwrap();
        assert!(ops.inbound.allows(Proto::Udp, 9) && ops.inbound.allows_all(Proto::Tcp));
        assert_eq!(ops.inbound.to_string(), "everything");
    }

    #[test]
    fn a_rule_naming_the_peers_ipv6_address_covers_it() {
        let filter = NodeFilter {
            inbound: vec![rule("fd7a:115c:a1e0::6440:0/120", Proto::Tcp, &["22"])],
            outbound: vec![rule("100.64.0.2/32", Proto::Udp, &["53"])],
        };
        let mut p = peer(2, 2, &[]);
        let v4_only = compile(Some(&filter), &p).unwrap();
        assert!(
            v4_only.inbound.is_empty(),
            "no IPv6 address: the v6 rule misses"
        );
        p.mesh_ip6 = Some("fd7a:115c:a1e0::6440:2".parse().unwrap());
        let dual = compile(Some(&filter), &p).unwrap();
        assert_eq!(dual.inbound.to_string(), "tcp 22");
        assert_eq!(dual.outbound.to_string(), "udp 53");
    }

    #[test]
    fn an_empty_filter_denies_everything() {
        let access = compile(Some(&NodeFilter::default()), &peer(2, 2, &[])).unwrap();
        assert!(!access.inbound.allows(Proto::Icmp, 0));
        assert!(!access.outbound.allows(Proto::Tcp, 22));
        assert!(!access.inbound.allows_all(Proto::Udp));
    }
}
