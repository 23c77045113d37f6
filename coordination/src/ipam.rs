//! Mesh IP allocation, sans-IO: given the network, the addresses already
//! taken and those held back after a removal, pick the next free one.
//!
//! Usable addresses follow `ipnet`'s `hosts()`: the network and broadcast
//! addresses are never handed out, except in a /31 (RFC 3021 point-to-point,
//! both usable) and a /32 (the one address).
//!
//! One more address is reserved: the mesh resolver's ([`resolver_addr`]),
//! which every node answers DNS on itself, so no node may own it. It is
//! reserved whether or not the coordinator has DNS turned on, so turning it
//! on later finds the address free.
//!
//! A removed node's address is held back for [`HOLD_BACK_SECS`]: peers that
//! were offline when it was removed still route that address to the old key
//! until they reconnect and hear of the removal, so a new node must not answer
//! on it meanwhile. When every other address is taken, the address held the
//! longest is reused rather than refusing the registration (a full pool is a
//! worse failure than a stale route on a peer that has been away a day).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::ops::Bound::{Excluded, Included};

use ipnet::Ipv4Net;

/// How long (seconds) a removed node's address is kept from new nodes.
pub const HOLD_BACK_SECS: u64 = 24 * 3600;

/// The resolver address when the network holds it: Tailscale's MagicDNS
/// address, inside the default 100.64.0.0/10, so users who know one know both.
pub const PREFERRED_RESOLVER: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

/// First and last usable host of `net`, as integers.
fn host_range(net: Ipv4Net) -> (u32, u32) {
    let first = u32::from(net.network());
    let last = u32::from(net.broadcast());
    if net.prefix_len() >= 31 {
        (first, last)
    } else {
        (first + 1, last - 1)
    }
}

/// The mesh resolver's address in `net`: [`PREFERRED_RESOLVER`] when it is
/// a host address of `net`, else the last host address. `None` for a /31 or
/// a /32, whose every address is a node's.
pub fn resolver_addr(net: Ipv4Net) -> Option<Ipv4Addr> {
    if net.prefix_len() >= 31 {
        return None;
    }
    let (first, last) = host_range(net);
    let preferred = u32::from(PREFERRED_RESOLVER);
    Some(Ipv4Addr::from(if (first..=last).contains(&preferred) {
        preferred
    } else {
        last
    }))
}

/// Number of addresses `allocate` can ever hand out in `net`.
pub fn capacity(net: Ipv4Net) -> u64 {
    let (first, last) = host_range(net);
    let reserved = u64::from(resolver_addr(net).is_some());
    u64::from(last - first) + 1 - reserved
}

/// Whether `ip` is an address `allocate` could hand out in `net`.
pub fn is_usable(net: Ipv4Net, ip: Ipv4Addr) -> bool {
    let (first, last) = host_range(net);
    (first..=last).contains(&u32::from(ip)) && resolver_addr(net) != Some(ip)
}

/// Whether an address released at `released_at` is still held back at `now`.
pub fn is_held(released_at: u64, now: u64) -> bool {
    now < released_at.saturating_add(HOLD_BACK_SECS)
}

/// The address for a new node: the lowest usable one neither `taken` nor
/// held back (`held` maps an address to its release time, Unix seconds);
/// when there is none, the held address released longest ago; `None` when
/// every usable address is taken.
pub fn allocate(
    net: Ipv4Net,
    taken: &BTreeSet<Ipv4Addr>,
    held: &BTreeMap<Ipv4Addr, u64>,
    now: u64,
) -> Option<Ipv4Addr> {
    let holding: Vec<Ipv4Addr> = held
        .iter()
        .filter(|(_, released)| is_held(**released, now))
        .map(|(ip, _)| *ip)
        .collect();
    let free = if holding.is_empty() {
        lowest_free(net, taken)
    } else {
        let mut blocked = taken.clone();
        blocked.extend(holding);
        lowest_free(net, &blocked)
    };
    free.or_else(|| {
        held.iter()
            .filter(|(ip, _)| is_usable(net, **ip) && !taken.contains(*ip))
            .min_by_key(|(ip, released)| (**released, **ip))
            .map(|(ip, _)| *ip)
    })
}

/// The lowest usable address of `net` not in `taken`, or `None` when the
/// pool is exhausted. Runs in O(|taken| log |taken|) at worst.
pub fn lowest_free(net: Ipv4Net, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let (first, last) = host_range(net);
    let (lo, hi) = (Ipv4Addr::from(first), Ipv4Addr::from(last));
    // The taken addresses of the range with the resolver's spliced in, in
    // order and each once: below it, it, above it.
    let reserved = resolver_addr(net);
    let (below, above) = match reserved {
        Some(r) => ((Included(lo), Excluded(r)), (Excluded(r), Included(hi))),
        None => ((Included(lo), Included(hi)), (Excluded(hi), Included(hi))),
    };
    let blocked = taken
        .range(below)
        .chain(reserved.iter())
        .chain(taken.range(above));
    let mut candidate = first;
    for ip in blocked {
        let ip = u32::from(*ip);
        if ip == candidate {
            if candidate == last {
                return None;
            }
            candidate += 1;
        } else if ip > candidate {
            break;
        }
    }
    Some(Ipv4Addr::from(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn resolver_is_100_100_100_100_inside_the_network_else_the_last_host() {
        assert_eq!(
            resolver_addr(net("100.64.0.0/10")),
            Some(ip("100.100.100.100"))
        );
        assert_eq!(
            resolver_addr(net("100.100.0.0/16")),
            Some(ip("100.100.100.100"))
        );
        assert_eq!(resolver_addr(net("10.0.0.0/24")), Some(ip("10.0.0.254")));
        assert_eq!(
            resolver_addr(net("192.168.5.4/30")),
            Some(ip("192.168.5.6"))
        );
        // 100.100.100.100 is the network address here, not a host.
        assert_eq!(
            resolver_addr(net("100.100.100.100/30")),
            Some(ip("100.100.100.102"))
        );
        assert_eq!(resolver_addr(net("10.9.9.8/31")), None);
        assert_eq!(resolver_addr(net("10.9.9.9/32")), None);
    }

    #[test]
    fn the_resolver_address_is_never_allocated() {
        // A /29 has six hosts, .6 is the resolver: five for nodes.
        let n = net("10.0.0.0/29");
        let mut taken = BTreeSet::new();
        while let Some(a) = allocate(n, &taken, &BTreeMap::new(), 0) {
            assert!(taken.insert(a), "{a} twice");
        }
        assert_eq!(taken.len(), 5);
        assert_eq!(capacity(n), 5);
        assert!(!taken.contains(&ip("10.0.0.6")));
        assert!(!is_usable(n, ip("10.0.0.6")));
        // Nor is it reused when a removed node held it (a store from before
        // the reservation) and the pool is full.
        let held: BTreeMap<_, _> = [(ip("10.0.0.6"), 0)].into();
        assert_eq!(allocate(n, &taken, &held, 10 * HOLD_BACK_SECS), None);
    }

    #[test]
    fn allocation_steps_over_100_100_100_100() {
        let n = net("100.100.100.96/28");
        let taken: BTreeSet<_> = (97..100).map(|i| Ipv4Addr::new(100, 100, 100, i)).collect();
        assert_eq!(lowest_free(n, &taken), Some(ip("100.100.100.101")));
        // Also when a node already holds it (an older store): no double count.
        let mut taken = taken;
        taken.insert(ip("100.100.100.100"));
        assert_eq!(lowest_free(n, &taken), Some(ip("100.100.100.101")));
        // Below it, the lowest free address is unaffected.
        assert_eq!(lowest_free(n, &BTreeSet::new()), Some(ip("100.100.100.97")));
    }

    #[test]
    fn first_allocation_skips_network_address() {
        assert_eq!(
            lowest_free(net("100.64.0.0/10"), &BTreeSet::new()),
            Some(ip("100.64.0.1"))
        );
    }

    #[test]
    fn taken_addresses_are_skipped_and_holes_reused() {
        let n = net("10.0.0.0/24");
        let mut taken: BTreeSet<_> = [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.4")].into();
        assert_eq!(lowest_free(n, &taken), Some(ip("10.0.0.3")));
        taken.insert(ip("10.0.0.3"));
        assert_eq!(lowest_free(n, &taken), Some(ip("10.0.0.5")));
    }

    #[test]
    fn addresses_outside_the_network_do_not_matter() {
        let taken: BTreeSet<_> = [ip("10.0.1.1"), ip("9.255.255.255")].into();
        assert_eq!(
            lowest_free(net("10.0.0.0/24"), &taken),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn full_pool_never_hands_out_broadcast() {
        let n = net("10.0.0.0/29");
        let mut taken = BTreeSet::new();
        let mut got = Vec::new();
        while let Some(a) = lowest_free(n, &taken) {
            taken.insert(a);
            got.push(a);
        }
        assert_eq!(got.len(), 5, "six hosts, one the resolver's");
        assert_eq!(capacity(n), 5);
        assert!(!got.contains(&ip("10.0.0.0")));
        assert!(!got.contains(&ip("10.0.0.7")));
    }

    #[test]
    fn slash_30_has_two_hosts_one_for_a_node() {
        let n = net("192.168.5.4/30");
        let mut taken = BTreeSet::new();
        assert_eq!(lowest_free(n, &taken), Some(ip("192.168.5.5")));
        taken.insert(ip("192.168.5.5"));
        // .6, the other host, is the resolver's.
        assert_eq!(lowest_free(n, &taken), None);
        assert_eq!(capacity(n), 1);
    }

    #[test]
    fn slash_31_uses_both_addresses_and_slash_32_its_one() {
        let n = net("10.9.9.8/31");
        let taken: BTreeSet<_> = [ip("10.9.9.8")].into();
        assert_eq!(lowest_free(n, &BTreeSet::new()), Some(ip("10.9.9.8")));
        assert_eq!(lowest_free(n, &taken), Some(ip("10.9.9.9")));
        let n = net("10.9.9.9/32");
        assert_eq!(lowest_free(n, &BTreeSet::new()), Some(ip("10.9.9.9")));
        assert_eq!(lowest_free(n, &[ip("10.9.9.9")].into()), None);
    }

    #[test]
    fn top_of_address_space_does_not_overflow() {
        let n = net("255.255.255.252/30");
        let taken: BTreeSet<_> = [ip("255.255.255.253"), ip("255.255.255.254")].into();
        assert_eq!(lowest_free(n, &taken), None);
        let n = net("255.255.255.255/32");
        assert_eq!(lowest_free(n, &[ip("255.255.255.255")].into()), None);
    }

    const HOUR: u64 = 3600;

    #[test]
    fn removed_address_is_held_back_for_a_day() {
        let n = net("10.0.0.0/24");
        let taken: BTreeSet<_> = [ip("10.0.0.1"), ip("10.0.0.3")].into();
        let removed_at = 1_000_000;
        let held: BTreeMap<_, _> = [(ip("10.0.0.2"), removed_at)].into();
        // Right after the removal and until the period ends, .2 is skipped.
        for now in [
            removed_at,
            removed_at + 23 * HOUR,
            removed_at + HOLD_BACK_SECS - 1,
        ] {
            assert_eq!(
                allocate(n, &taken, &held, now),
                Some(ip("10.0.0.4")),
                "{now}"
            );
        }
        // Then it is free again like any other.
        assert_eq!(
            allocate(n, &taken, &held, removed_at + HOLD_BACK_SECS),
            Some(ip("10.0.0.2"))
        );
        assert!(is_held(removed_at, removed_at + HOLD_BACK_SECS - 1));
        assert!(!is_held(removed_at, removed_at + HOLD_BACK_SECS));
    }

    #[test]
    fn exhausted_pool_reuses_the_address_held_longest() {
        // A /29 has six hosts: .1 and .2 are held, the rest taken (.6 is the
        // resolver's, and taken by a node from before the reservation).
        let n = net("10.0.0.0/29");
        let taken: BTreeSet<_> = ["10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
            .iter()
            .map(|s| ip(s))
            .collect();
        let now = 5_000_000;
        let held: BTreeMap<_, _> = [
            (ip("10.0.0.1"), now - HOUR),
            (ip("10.0.0.2"), now - 2 * HOUR),
        ]
        .into();
        assert_eq!(allocate(n, &taken, &held, now), Some(ip("10.0.0.2")));
        // Held addresses outside the network, or taken again, are never handed out.
        let strays: BTreeMap<_, _> = [(ip("10.0.1.1"), 0), (ip("10.0.0.3"), 0)].into();
        let full: BTreeSet<_> = taken
            .iter()
            .copied()
            .chain([ip("10.0.0.1"), ip("10.0.0.2")])
            .collect();
        assert_eq!(allocate(n, &full, &strays, now), None);
    }

    #[test]
    fn without_holds_allocation_is_lowest_free() {
        let n = net("10.0.0.0/24");
        let taken: BTreeSet<_> = [ip("10.0.0.1")].into();
        assert_eq!(
            allocate(n, &taken, &BTreeMap::new(), 0),
            Some(ip("10.0.0.2"))
        );
    }

    #[test]
    fn usable_matches_allocation_rules() {
        let n = net("10.0.0.0/24");
        assert!(!is_usable(n, ip("10.0.0.0")));
        assert!(!is_usable(n, ip("10.0.0.255")));
        assert!(is_usable(n, ip("10.0.0.1")));
        assert!(!is_usable(n, ip("10.0.1.1")));
    }
}
