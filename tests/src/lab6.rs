//! The lab's IPv6: dual-stack segments and sites, routed without NAT as on
//! the Internet (see [`Lab::segment6`], [`Lab::nat_site6`] and
//! [`Lab::ipv6_only_site`]). Every lab host has IPv6 on (see `Lab::host`);
//! only these give it more than link-local addresses.

use std::net::Ipv6Addr;

use anyhow::{ensure, Context};

use crate::lab::{Host, Lab, NatKind, Segment, Site};

/// An IPv6 /64 from which the lab numbers interfaces: `prefix::n`. Lab
/// prefixes come from the documentation range `2001:db8::/32` and, like
/// public IPv6 on the Internet, are routed without NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet6 {
    /// The first 64 bits.
    pub prefix: Ipv6Addr,
}

impl Subnet6 {
    /// Parses `x:y::/64` (only /64s: what a LAN gets).
    pub fn parse(text: &str) -> anyhow::Result<Subnet6> {
        let (addr, len) = text
            .split_once('/')
            .with_context(|| format!("subnet {text:?} has no /prefix"))?;
        ensure!(len == "64", "subnet {text:?}: the lab's IPv6 LANs are /64s");
        let prefix: Ipv6Addr = addr.parse().with_context(|| format!("subnet {text:?}"))?;
        ensure!(
            u128::from(prefix) & u128::from(u64::MAX) == 0,
            "subnet {text:?} has host bits set"
        );
        Ok(Subnet6 { prefix })
    }

    /// The `n`th address of the subnet.
    pub fn host(&self, n: u32) -> anyhow::Result<Ipv6Addr> {
        ensure!(n > 0, "host number 0 in {self}");
        Ok(Ipv6Addr::from(u128::from(self.prefix) | u128::from(n)))
    }
}

impl std::fmt::Display for Subnet6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/64", self.prefix)
    }
}

impl Lab {
    /// A dual-stack segment: IPv4 from `subnet`, IPv6 from `subnet6` (a /64,
    /// e.g. `2001:db8:1::/64`). Hosts attached to it get both. (Every lab
    /// interface has IPv6 on; elsewhere it has only its link-local address.)
    pub fn segment6(&self, name: &str, subnet: &str, subnet6: &str) -> anyhow::Result<Segment> {
        let subnet6 = Subnet6::parse(subnet6)?;
        let mut segment = self.segment(name, subnet)?;
        segment.subnet6 = Some(subnet6);
        Ok(segment)
    }

    /// Gives `dev` the address `ip/64`, usable at once: no duplicate address
    /// detection (the lab numbers addresses uniquely; the namespace has it off
    /// for the link-local addresses too, which neighbour discovery needs
    /// before anything can be routed).
    pub(crate) fn address6(&self, ns: &str, dev: &str, ip: Ipv6Addr) -> anyhow::Result<()> {
        self.ip(
            ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                dev,
                "nodad",
            ],
        )?;
        Ok(())
    }

    pub(crate) fn route6(&self, ns: &str, prefix: Subnet6, via: Ipv6Addr) -> anyhow::Result<()> {
        self.ip(
            ns,
            &[
                "-6",
                "route",
                "replace",
                &prefix.to_string(),
                "via",
                &via.to_string(),
            ],
        )
        .map(|_| ())
    }

    /// Makes `prefix` reachable from every host on `segment`, now and later,
    /// through `via` (a router's address on the segment), as routing on the
    /// Internet would. The router itself is skipped.
    pub(crate) fn announce6(
        &self,
        segment: &Segment,
        prefix: Subnet6,
        via: Ipv6Addr,
        router: &Host,
    ) -> anyhow::Result<()> {
        for ns in segment.members.borrow().iter() {
            if *ns != router.ns {
                self.route6(ns, prefix, via)?;
            }
        }
        segment.routes6.borrow_mut().push((prefix, via));
        Ok(())
    }

    /// As [`Lab::nat_site`], and dual-stack: the site LAN also gets the
    /// global `2001:db8:<100+i>::/64`, routed (not translated) by the router,
    /// whose IPv6 firewall is a home router's: what the site sends opens the
    /// way back, nothing unsolicited comes in (so ICE over IPv6 works as hole
    /// punching does, whatever `kind` does to IPv4). `public` must be
    /// dual-stack ([`Lab::segment6`]); every host on it, present and future,
    /// gets a route to the site's prefix.
    pub fn nat_site6(&self, name: &str, kind: NatKind, public: &Segment) -> anyhow::Result<Site> {
        ensure!(
            public.subnet6.is_some(),
            "nat_site6 {name:?}: the public segment {:?} has no IPv6",
            public.name
        );
        self.site(name, kind, public, true)
    }

    /// A site on an IPv6-only access network: as [`Lab::nat_site6`], but the
    /// router forwards no IPv4 at all ([`NatKind::Ipv6Only`]) and its hosts
    /// get no IPv4 default route. Their private IPv4 reaches the LAN only.
    pub fn ipv6_only_site(&self, name: &str, public: &Segment) -> anyhow::Result<Site> {
        self.nat_site6(name, NatKind::Ipv6Only, public)
    }

    /// Sets `host`'s IPv6 default route (e.g. via [`Lab::upstream`]'s address).
    pub fn default_route6(&self, host: &Host, via: Ipv6Addr) -> anyhow::Result<()> {
        self.ip(
            &host.ns,
            &["-6", "route", "add", "default", "via", &via.to_string()],
        )
        .map(|_| ())
    }
}

/// A site router's IPv6 firewall (no NAT: IPv6 is routed as on the Internet):
/// the site's own traffic goes out and its answers come back; nothing
/// unsolicited comes in, nor reaches the router's own TCP or UDP. UDP-blocked
/// sites send only TCP, as over IPv4.
pub fn firewall6_ruleset(kind: NatKind, wan: &str, lan: &str) -> String {
    let outbound = match kind {
        NatKind::UdpBlocked => {
            format!("iifname \"{lan}\" oifname \"{wan}\" meta l4proto tcp accept")
        }
        NatKind::Cone | NatKind::Symmetric | NatKind::Ipv6Only => {
            format!("iifname \"{lan}\" oifname \"{wan}\" accept")
        }
    };
    format!(
        "table ip6 ovl_fw6 {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        {outbound}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname \"{wan}\" meta l4proto {{ tcp, udp }} ct state new drop
    }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet6_numbers_hosts_in_a_64() {
        let net = Subnet6::parse("2001:db8:5::/64").expect("valid");
        assert_eq!(net.host(1).unwrap().to_string(), "2001:db8:5::1");
        assert_eq!(net.host(300).unwrap().to_string(), "2001:db8:5::12c");
        assert!(net.host(0).is_err());
        assert!(Subnet6::parse("2001:db8:5::/48").is_err());
        assert!(Subnet6::parse("2001:db8:5::1/64").is_err());
        assert_eq!(net.to_string(), "2001:db8:5::/64");
    }

    #[test]
    fn ipv6_firewall_blocks_udp_only_for_udp_blocked_sites() {
        let open = firewall6_ruleset(NatKind::Symmetric, "eth0", "eth1");
        assert!(open.contains("iifname \"eth1\" oifname \"eth0\" accept"));
        assert!(open.contains("policy drop"));
        let blocked = firewall6_ruleset(NatKind::UdpBlocked, "eth0", "eth1");
        assert!(blocked.contains("meta l4proto tcp accept"));
    }
}
