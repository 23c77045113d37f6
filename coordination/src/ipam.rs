//! Mesh IP allocation, sans-IO: given the network and the addresses already
//! taken, pick the next free one.
//!
//! Usable addresses follow `ipnet`'s `hosts()`: the network and broadcast
//! addresses are never handed out, except in a /31 (RFC 3021 point-to-point,
//! both usable) and a /32 (the one address).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

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

/// The lowest usable address of `net` not in `taken`, or `None` when the
/// pool is exhausted. Runs in O(|taken| log |taken|) at worst.
pub fn allocate(net: Ipv4Net, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
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
            allocate(net("100.64.0.0/10"), &BTreeSet::new()),
            Some(ip("100.64.0.1"))
        );
    }

    #[test]
    fn taken_addresses_are_skipped_and_holes_reused() {
        let n = net("10.0.0.0/24");
        let mut taken: BTreeSet<_> = [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.4")].into();
        assert_eq!(allocate(n, &taken), Some(ip("10.0.0.3")));
        taken.insert(ip("10.0.0.3"));
        assert_eq!(allocate(n, &taken), Some(ip("10.0.0.5")));
    }

    #[test]
    fn addresses_outside_the_network_do_not_matter() {
        let taken: BTreeSet<_> = [ip("10.0.1.1"), ip("9.255.255.255")].into();
        assert_eq!(allocate(net("10.0.0.0/24"), &taken), Some(ip("10.0.0.1")));
    }

    #[test]
    fn full_pool_never_hands_out_broadcast() {
        let n = net("10.0.0.0/29");
        let mut taken = BTreeSet::new();
        let mut got = Vec::new();
        while let Some(a) = allocate(n, &taken) {
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
        assert_eq!(allocate(n, &taken), Some(ip("192.168.5.5")));
        taken.insert(ip("192.168.5.5"));
        assert_eq!(allocate(n, &taken), Some(ip("192.168.5.6")));
        taken.insert(ip("192.168.5.6"));
        assert_eq!(allocate(n, &taken), None);
    }

    #[test]
    fn slash_31_uses_both_addresses_and_slash_32_its_one() {
        let n = net("10.9.9.8/31");
        let taken: BTreeSet<_> = [ip("10.9.9.8")].into();
        assert_eq!(allocate(n, &BTreeSet::new()), Some(ip("10.9.9.8")));
        assert_eq!(allocate(n, &taken), Some(ip("10.9.9.9")));
        let n = net("10.9.9.9/32");
        assert_eq!(allocate(n, &BTreeSet::new()), Some(ip("10.9.9.9")));
        assert_eq!(allocate(n, &[ip("10.9.9.9")].into()), None);
    }

    #[test]
    fn top_of_address_space_does_not_overflow() {
        let n = net("255.255.255.252/30");
        let taken: BTreeSet<_> = [ip("255.255.255.253"), ip("255.255.255.254")].into();
        assert_eq!(allocate(n, &taken), None);
        let n = net("255.255.255.255/32");
        assert_eq!(allocate(n, &[ip("255.255.255.255")].into()), None);
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
