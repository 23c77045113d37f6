//! The mesh resolver: peers' names answered from the netmap, by the data
//! plane itself, on a mesh address no node has.
//!
//! ```text
//!   TUN ──packet to the resolver address──▶ dataplane ──UDP 53──▶ answer::respond(zone, query)
//!                                                    └─TCP 53──▶ tcp::TcpDns (a few states) ─▶ respond
//!   respond: NAME.<domain>  A     → the node's mesh address (or NXDOMAIN)
//!            NAME.<domain>  AAAA  → the node's mesh IPv6 address (empty when it has none)
//!            x.in-addr.arpa PTR   → the node's name, for mesh addresses
//!            x.ip6.arpa     PTR   → the node's name, for mesh IPv6 addresses
//!            anything else        → forwarded to the host's old upstreams (resolv.conf
//!                                   mode), else REFUSED
//! ```
//!
//! Everything here is sans-IO: bytes in, bytes out, with the zone the shell
//! rebuilds from the netmap. No socket is bound on the host for it; the
//! answers go back into the TUN as if the resolver address had sent them.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use overlay_proto::coord::PeerInfo;

pub mod answer;
pub mod lookup;
pub mod tcp;
#[cfg(test)]
mod tests;

pub use answer::{respond, Reply};

/// How long clients may cache a mesh answer: short, so a node that joins
/// or leaves is seen within seconds even through a caching stub resolver.
pub const TTL: u32 = 5;

/// What the resolver answers for: the mesh domain, its names and addresses.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Lowercase, without the trailing dot (`overlay.internal`).
    pub domain: String,
    /// The mesh address the resolver answers on.
    pub resolver: Ipv4Addr,
    /// Its IPv6 twin in the mesh prefix (the prefix with `resolver` in the
    /// low 32 bits, as every node's), once the mesh has IPv6.
    pub resolver6: Option<Ipv6Addr>,
    /// The mesh network, whose reverse names are ours to answer.
    pub network: ipnet::Ipv4Net,
    /// Lowercase first labels (or longer names for extra records) under the domain.
    names: HashMap<String, Ipv4Addr>,
    /// Names that exist only as parents of longer ones (`b` of an extra
    /// record `a.b`): they answer NOERROR with no data, not NXDOMAIN.
    parents: HashSet<String>,
    /// Mesh addresses (both families) → fully qualified name.
    reverse: HashMap<IpAddr, String>,
    /// Names with a mesh IPv6 address (a peer's, or ours).
    names6: HashMap<String, Ipv6Addr>,
    /// The mesh's IPv6 prefix, whose reverse names are ours to answer,
    /// once this node has its own mesh IPv6 address (see [`Self::set_own_ip6`]).
    pub network6: Option<ipnet::Ipv6Net>,
    /// This node's own label, first in the zone.
    me: String,
    /// Whether names outside the domain are forwarded (resolv.conf mode).
    pub forwarding: bool,
}

impl Zone {
    pub fn new(domain: &str, resolver: Ipv4Addr, network: ipnet::Ipv4Net) -> Zone {
        Zone {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            resolver,
            resolver6: None,
            network,
            names: HashMap::new(),
            parents: HashSet::new(),
            reverse: HashMap::new(),
            names6: HashMap::new(),
            network6: None,
            me: String::new(),
            forwarding: false,
        }
    }

    /// A zone of this node and its peers (the netmap: only peers this node
    /// may see) and the coordinator's extra records. Earlier entries win a
    /// clash of names.
    pub fn build(
        mut self,
        me: (&str, Ipv4Addr),
        peers: &[PeerInfo],
        extra: &[(String, Ipv4Addr)],
    ) -> Zone {
        self.me = label(me.0);
        self.insert(&self.me.clone(), me.1);
        let mut sorted: Vec<&PeerInfo> = peers.iter().collect();
        sorted.sort_by_key(|p| p.mesh_ip);
        for peer in sorted {
            let name = label(&peer.name);
            let name = if name.is_empty() {
                format!("node-{}", peer.id)
            } else {
                name
            };
            self.insert(&name, peer.mesh_ip);
            if let Some(v6) = peer.mesh_ip6 {
                // Only under the name that won (see `insert`).
                if self.names.get(&name) == Some(&peer.mesh_ip) {
                    self.insert6(&name, v6);
                }
            }
        }
        for (name, ip) in extra {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let relative = name
                .strip_suffix(&self.domain)
                .and_then(|n| n.strip_suffix('.'))
                .unwrap_or(&name)
                .to_owned();
            if !relative.is_empty() {
                self.insert(&relative, *ip);
            }
        }
        self
    }

    fn insert(&mut self, name: &str, ip: Ipv4Addr) {
        if name.is_empty() || self.names.contains_key(name) {
            return;
        }
        self.names.insert(name.to_owned(), ip);
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            self.parents.insert(parent.to_owned());
            rest = parent;
        }
        let fqdn = format!("{name}.{}", self.domain);
        self.reverse.entry(ip.into()).or_insert(fqdn);
    }

    fn insert6(&mut self, name: &str, ip: Ipv6Addr) {
        if name.is_empty() || self.names6.contains_key(name) {
            return;
        }
        self.names6.insert(name.to_owned(), ip);
        let fqdn = format!("{name}.{}", self.domain);
        self.reverse.entry(ip.into()).or_insert(fqdn);
    }

    /// This node's own mesh IPv6 address, and the mesh's prefix (whose
    /// reverse names are then ours to answer).
    pub fn set_own_ip6(&mut self, ip: Ipv6Addr, network6: ipnet::Ipv6Net) {
        self.network6 = Some(network6);
        self.resolver6 = Some(overlay_proto::coord::mesh_ip6(network6, self.resolver));
        let me = self.me.clone();
        self.insert6(&me, ip);
    }

    /// The address of `name` relative to the domain (lowercase).
    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        self.names.get(name).copied()
    }

    /// The IPv6 address of `name` relative to the domain (lowercase).
    pub fn lookup6(&self, name: &str) -> Option<Ipv6Addr> {
        self.names6.get(name).copied()
    }

    /// The name of a mesh address (either family).
    pub fn reverse(&self, ip: IpAddr) -> Option<&str> {
        self.reverse.get(&ip).map(String::as_str)
    }

    /// Whether reverse names of `ip` are this zone's to answer: addresses in
    /// the mesh's networks, and any mesh IPv6 address a peer has.
    pub fn covers(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.network.contains(&v4),
            IpAddr::V6(v6) => {
                self.network6.is_some_and(|n| n.contains(&v6)) || self.reverse.contains_key(&ip)
            }
        }
    }

    /// Whether a relative name exists, with or without an address record.
    pub fn has_name(&self, name: &str) -> bool {
        self.names.contains_key(name) || self.parents.contains(name)
    }

    /// The fully qualified name of a node called `name`.
    pub fn fqdn(&self, name: &str) -> String {
        format!("{}.{}", label(name), self.domain)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// A node name as a DNS label: lowercase letters, digits and '-', at most
/// 63 bytes, no '-' at either end; other characters become '-'.
pub fn label(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let mut out: String = trimmed.chars().take(63).collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}
