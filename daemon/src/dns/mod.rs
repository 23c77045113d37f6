//! The mesh resolver: peers' names answered from the netmap, by the data
//! plane itself, on a mesh address no node has.
//!
//! ```text
//!   TUN ──packet to the resolver address──▶ dataplane ──UDP 53──▶ answer::respond(zone, query)
//!                                                    └─TCP 53──▶ tcp::TcpDns (a few states) ─▶ respond
//!   respond: NAME.<domain>  A     → the node's mesh address (or NXDOMAIN)
//!            x.in-addr.arpa PTR   → the node's name, for mesh addresses
//!            anything else        → forwarded to the host's old upstreams (resolv.conf
//!                                   mode), else REFUSED
//! ```
//!
//! Everything here is sans-IO: bytes in, bytes out, with the zone the shell
//! rebuilds from the netmap. No socket is bound on the host for it; the
//! answers go back into the TUN as if the resolver address had sent them.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

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
    /// The mesh network, whose reverse names are ours to answer.
    pub network: ipnet::Ipv4Net,
    /// Lowercase first labels (or longer names for extra records) under the domain.
    names: HashMap<String, Ipv4Addr>,
    /// Names that exist only as parents of longer ones (`b` of an extra
    /// record `a.b`): they answer NOERROR with no data, not NXDOMAIN.
    parents: HashSet<String>,
    /// Mesh address → fully qualified name.
    reverse: HashMap<Ipv4Addr, String>,
    /// Whether names outside the domain are forwarded (resolv.conf mode).
    pub forwarding: bool,
}

impl Zone {
    pub fn new(domain: &str, resolver: Ipv4Addr, network: ipnet::Ipv4Net) -> Zone {
        Zone {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            resolver,
            network,
            names: HashMap::new(),
            parents: HashSet::new(),
            reverse: HashMap::new(),
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
        self.insert(&label(me.0), me.1);
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
        self.reverse.entry(ip).or_insert(fqdn);
    }

    /// The address of `name` relative to the domain (lowercase).
    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        self.names.get(name).copied()
    }

    /// The name of a mesh address.
    pub fn reverse(&self, ip: Ipv4Addr) -> Option<&str> {
        self.reverse.get(&ip).map(String::as_str)
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
