//! Compiled access rules: what the coordinator sends each node once a policy is
//! in force, and the matching both ends must agree on.
//!
//! The coordinator never sends the policy text. It compiles the policy per
//! node into a [`NodeFilter`]: the rules whose destination covers the node
//! (`inbound`: who may open connections to it, on what) and the rules whose
//! source covers it (`outbound`: where it may open connections). Peers are
//! named by [`Principal`]s the node resolves against its own netmap (a peer's
//! id, its tags, its mesh address), so a tag change of one peer is one
//! `PeerUpsert`, not a new filter for everyone.
//!
//! `None` where a filter is expected means "no policy": everything is allowed
//! (the mesh before policies existed). `Some` with no rules denies everything.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::NodeId;

/// What a rule covers at the transport layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// Every protocol and port.
    Any,
    Tcp,
    Udp,
    /// ICMP echo (ping); ports do not apply.
    Icmp,
}

impl Proto {
    /// Whether ports mean something for this protocol.
    pub fn has_ports(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Udp)
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" | "*" => Ok(Proto::Any),
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "icmp" => Ok(Proto::Icmp),
            other => Err(format!(
                "unknown protocol {other:?}: use tcp, udp, icmp or any"
            )),
        }
    }
}

/// An inclusive range of ports; `"22"`, `"8000-8100"` or `"*"` in text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn one(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    pub fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == PortRange::ALL {
            f.write_str("*")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("bad port {p:?}: use a number from 0 to 65535"))
        };
        if s.trim() == "*" {
            return Ok(PortRange::ALL);
        }
        let range = match s.split_once('-') {
            Some((a, b)) => PortRange {
                first: port(a)?,
                last: port(b)?,
            },
            None => PortRange::one(port(s)?),
        };
        if range.first > range.last {
            return Err(format!(
                "bad port range {s:?}: the first port is above the last"
            ));
        }
        Ok(range)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which peers a compiled rule is about. Text: `*`, `node:<id>`, `tag:<name>`,
/// or a CIDR (`100.64.1.0/24`: the peers whose mesh address is inside).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    Any,
    Node(NodeId),
    Tag(String),
    Cidr(IpNet),
}

impl Principal {
    /// Whether a peer with this id, mesh address and tags is covered.
    pub fn matches(&self, id: NodeId, ip: IpAddr, tags: &[String]) -> bool {
        match self {
            Principal::Any => true,
            Principal::Node(n) => *n == id,
            Principal::Tag(t) => tags.iter().any(|have| have == t),
            Principal::Cidr(net) => net.contains(&ip),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Any => f.write_str("*"),
            Principal::Node(id) => write!(f, "node:{id}"),
            Principal::Tag(t) => write!(f, "tag:{t}"),
            Principal::Cidr(net) => write!(f, "{net}"),
        }
    }
}

impl FromStr for Principal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "*" {
            return Ok(Principal::Any);
        }
        if let Some(id) = s.strip_prefix("node:") {
            return id
                .parse()
                .map(Principal::Node)
                .map_err(|_| format!("bad node id in {s:?}"));
        }
        if let Some(tag) = s.strip_prefix("tag:") {
            return if is_valid_tag(tag) {
                Ok(Principal::Tag(tag.to_owned()))
            } else {
                Err(format!("bad tag {s:?}: {TAG_RULE}"))
            };
        }
        s.parse::<IpNet>()
            .map(|net| Principal::Cidr(net.trunc()))
            .map_err(|_| format!("bad peer {s:?}: use *, node:ID, tag:NAME or a CIDR"))
    }
}

impl Serialize for Principal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Principal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a valid tag looks like, for error messages.
pub const TAG_RULE: &str =
    "a tag is 1 to 63 lowercase letters, digits and '-', starting with a letter";

/// Whether `tag` (without the `tag:` prefix) is a valid tag name.
pub fn is_valid_tag(tag: &str) -> bool {
    (1..=63).contains(&tag.len())
        && tag.starts_with(|c: char| c.is_ascii_lowercase())
        && tag
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// One compiled allow rule: the peers it is about, a protocol and its ports.
/// `ports` is empty for ICMP and means every port for `Any`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FilterRule {
    pub peers: Vec<Principal>,
    pub proto: Proto,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
}

impl FilterRule {
    /// Whether the rule lets through a new connection of `proto` to `port`
    /// (the port is ignored for ICMP).
    pub fn allows(&self, proto: Proto, port: u16) -> bool {
        match self.proto {
            Proto::Any => true,
            p if p != proto => false,
            Proto::Icmp => true,
            _ => self.ports.iter().any(|r| r.contains(port)),
        }
    }

    /// Whether the rule is about a peer with this id, address and tags.
    pub fn covers(&self, id: NodeId, ip: IpAddr, tags: &[String]) -> bool {
        self.peers.iter().any(|p| p.matches(id, ip, tags))
    }
}

/// The rules one node enforces, compiled for it by the coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFilter {
    /// Who may open connections to this node, and on what. Replies to
    /// connections this node opened pass without a rule here.
    pub inbound: Vec<FilterRule>,
    /// Where this node may open connections: the receivers' `inbound` rules
    /// that name it, so the sender drops what the receiver would refuse.
    pub outbound: Vec<FilterRule>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ports_parse_and_print() {
        assert_eq!("22".parse::<PortRange>().unwrap(), PortRange::one(22));
        assert_eq!(
            "8000-8100".parse::<PortRange>().unwrap(),
            PortRange {
                first: 8000,
                last: 8100
            }
        );
        assert_eq!("*".parse::<PortRange>().unwrap(), PortRange::ALL);
        assert!("9-1".parse::<PortRange>().is_err());
        assert!("70000".parse::<PortRange>().is_err());
        for text in ["22", "8000-8100", "*"] {
            assert_eq!(text.parse::<PortRange>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn principals_round_trip_as_text() {
        for text in ["*", "node:7", "tag:server", "100.64.1.0/24"] {
            let p: Principal = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<Principal>(&json).unwrap(), p);
        }
        assert!("tag:Bad".parse::<Principal>().is_err());
        assert!("node:x".parse::<Principal>().is_err());
        assert!("server".parse::<Principal>().is_err());
    }

    #[test]
    fn rules_match_protocol_ports_and_peers() {
        let ssh = FilterRule {
            peers: vec!["tag:dev".parse().unwrap(), "node:9".parse().unwrap()],
            proto: Proto::Tcp,
            ports: vec![PortRange::one(22)],
        };
        assert!(ssh.allows(Proto::Tcp, 22));
        assert!(!ssh.allows(Proto::Tcp, 80));
        assert!(!ssh.allows(Proto::Udp, 22));
        assert!(!ssh.allows(Proto::Icmp, 0));
        let ip = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 5));
        assert!(ssh.covers(1, ip, &["dev".into()]));
        assert!(ssh.covers(9, ip, &[]));
        assert!(!ssh.covers(1, ip, &["server".into()]));

        let any = FilterRule {
            peers: vec!["100.64.0.0/24".parse().unwrap()],
            proto: Proto::Any,
            ports: vec![],
        };
        assert!(any.allows(Proto::Udp, 53) && any.allows(Proto::Icmp, 0));
        assert!(any.covers(3, ip, &[]));
        assert!(!any.covers(3, IpAddr::V4(Ipv4Addr::new(100, 64, 1, 5)), &[]));
    }

    #[test]
    fn tags_are_checked() {
        assert!(is_valid_tag("server"));
        assert!(is_valid_tag("db-2"));
        assert!(!is_valid_tag(""));
        assert!(!is_valid_tag("2db"));
        assert!(!is_valid_tag("Server"));
        assert!(!is_valid_tag(&"a".repeat(64)));
    }
}
