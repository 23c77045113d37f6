//! Mesh IP allocation, sans-IO: given the network, the addresses already
//! taken and those held back after a removal, pick the next free one.
//!
//! Usable addresses follow `ipnet`'s `hosts()`: the network and broadcast
//! addresses are never handed out, except in a /31 (RFC 3021 point-to-point,
//! both usable) and a /32 (the one address).
//!
//! A removed node's address is held back for [`HOLD_BACK_SECS`]: peers that
//! were offline when it was removed still route that address to the old key
//! until they reconnect and hear of the removal, so a new node must not answer
//! on it meanwhile. When every other address is taken, the address held the
//! longest is reused rather than refusing the registration (a full pool is a
//! worse failure than a stale route on a peer that has been away a day).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// How long (seconds) a removed node's address is kept from new nodes.
pub const HOLD_BACK_SECS: u64 = 24 * 3600;

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

/// Number of addresses `allocate` can ever hand out in `net`.
pub fn capacity(net: Ipv4Net) -> u64 {
    let (first, last) = host_range(net);
    u64::from(last - first) + 1
}

/// Whether `ip` is an address `allocate` could hand out in `net`.
pub fn is_usable(net: Ipv4Net, ip: Ipv4Addr) -> bool {
    let (first, last) = host_range(net);
    (first..=last).contains(&u32::from(ip))
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
    let mut candidate = first;
    for ip in taken.range(Ipv4Addr::from(first)..=Ipv4Addr::from(last)) {
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
        assert_eq!(got.len(), 6);
        assert_eq!(capacity(n), 6);
        assert!(!got.contains(&ip("10.0.0.0")));
        assert!(!got.contains(&ip("10.0.0.7")));
    }

    #[test]
    fn slash_30_has_two_hosts() {
        let n = net("192.168.5.4/30");
        let mut taken = BTreeSet::new();
        assert_eq!(lowest_free(n, &taken), Some(ip("192.168.5.5")));
        taken.insert(ip("192.168.5.5"));
        assert_eq!(lowest_free(n, &taken), Some(ip("192.168.5.6")));
        taken.insert(ip("192.168.5.6"));
        assert_eq!(lowest_free(n, &taken), None);
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
        // A /29 has six hosts: .1 and .2 are held, the rest taken.
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
