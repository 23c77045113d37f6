//! The lab itself: segments connect hosts, and nothing is left behind, even when a
//! test panics. Needs root; no overlay binaries.

use std::process::Command;

use overlay_tests::overlay::ping;
use overlay_tests::{lab_test, Lab};

/// The lab namespaces currently present whose names start with `prefix`.
fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn hosts_on_a_segment_reach_each_other_and_drop_removes_everything() {
    let lab = Lab::new().expect("lab");
    let prefix = lab.prefix().to_string();
    let dir = lab.dir().to_path_buf();
    {
        let lan = lab.segment("lan", "10.77.1.0/24").expect("segment");
        let a = lab.host("a").expect("host a");
        let b = lab.host("b").expect("host b");
        let ia = lab.attach(&a, &lan).expect("attach a");
        let ib = lab.attach(&b, &lan).expect("attach b");
        assert_eq!(ia.name, "eth0");
        assert_eq!(ia.ip.to_string(), "10.77.1.1");
        assert_eq!(ib.ip.to_string(), "10.77.1.2");
        let (sent, received) =
            ping(&lab, &a, ib.ip, &["-c", "3", "-i", "0.2", "-W", "2"]).expect("ping");
        assert_eq!((sent, received), (3, 3));

        // A process left running inside a namespace must not keep it alive.
        let mut sleeper = Command::new("sleep");
        sleeper.arg("600");
        std::mem::forget(lab.spawn(&b, "sleeper", sleeper).expect("spawn"));
        assert_eq!(namespaces_with(&prefix).len(), 3);
    }
    drop(lab);
    assert!(
        namespaces_with(&prefix).is_empty(),
        "left behind: {:?}",
        namespaces_with(&prefix)
    );
    assert!(!dir.exists(), "lab directory {} left behind", dir.display());
}

#[test]
fn a_panicking_lab_test_still_cleans_up() {
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        lab_test(|lab| {
            *prefix.lock().expect("lock") = lab.prefix().to_string();
            let a = lab.host("a")?;
            let b = lab.host("b")?;
            lab.link(&a, &b, "10.77.2.0/30")?;
            anyhow::bail!("deliberate failure");
        })
    });
    assert!(result.is_err(), "lab_test must panic when the test fails");
    let prefix = prefix.into_inner().expect("lock");
    assert!(prefix.starts_with("ovl") && prefix.len() == 7, "{prefix}");
    assert!(namespaces_with(&prefix).is_empty());
}

#[test]
fn point_to_point_links_are_numbered_1_and_2() {
    lab_test(|lab| {
        let a = lab.host("a")?;
        let b = lab.host("b")?;
        let (ia, ib) = lab.link(&a, &b, "10.77.3.0/30")?;
        assert_eq!(
            (ia.ip.to_string(), ib.ip.to_string()),
            ("10.77.3.1".into(), "10.77.3.2".into())
        );
        assert_eq!(ping(lab, &b, ia.ip, &["-c", "1", "-W", "2"])?, (1, 1));
        Ok(())
    });
}

/// `ping -6` from `host` to `target`: (sent, received).
fn ping6(lab: &Lab, host: &overlay_tests::Host, target: std::net::Ipv6Addr) -> (u32, u32) {
    ping(lab, host, target, &["-c", "2", "-i", "0.2", "-W", "1"]).expect("ping -6")
}

/// Every host has IPv6 on, as machines do today: on a plain (IPv4) segment
/// only a link-local address, usable at once (no duplicate address detection
/// pending), and neighbours answer on it.
#[test]
fn every_host_has_ipv6_with_a_link_local_address_ready_at_once() {
    lab_test(|lab| {
        let lan = lab.segment("lan", "10.77.4.0/24")?;
        let a = lab.host("a")?;
        let b = lab.host("b")?;
        let ia = lab.attach(&a, &lan)?;
        lab.attach(&b, &lan)?;
        assert_eq!(ia.ip6, None, "a plain segment gives no global IPv6");
        let addrs = lab.exec(&b, "ip", &["-6", "-o", "addr", "show", "dev", "eth0"])?;
        let link_local = addrs
            .lines()
            .find_map(|l| {
                let word = l.split_whitespace().skip_while(|w| *w != "inet6").nth(1)?;
                word.strip_suffix("/64").filter(|a| a.starts_with("fe80:"))
            })
            .unwrap_or_else(|| panic!("no link-local address on b's eth0: {addrs}"));
        assert!(!addrs.contains("tentative"), "DAD is pending: {addrs}");
        assert!(
            !addrs.contains("scope global"),
            "b has a global address: {addrs}"
        );
        let target = format!("{link_local}%eth0");
        let out = lab.output(&a, "ping", &["-6", "-c", "1", "-W", "2", &target])?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            overlay_tests::overlay::parse_ping_summary(&text),
            Some((1, 1)),
            "{text}"
        );
        let lo = lab.exec(&a, "ip", &["-6", "addr", "show", "dev", "lo"])?;
        assert!(lo.contains("::1/128"), "no ::1 on a's loopback: {lo}");
        Ok(())
    });
}

#[test]
fn dual_stack_sites_route_ipv6_without_nat_behind_a_stateful_firewall() {
    lab_test(|lab| {
        let public = lab.segment6("pub", "203.0.113.0/24", "2001:db8::/64")?;
        let server = lab.host("srv")?;
        let srv = lab.attach(&server, &public)?;
        let srv6 = srv.ip6.expect("dual-stack segment gives IPv6");
        // A site made before and one after the server joined: both routed.
        let early = lab.nat_site6("ea", overlay_tests::NatKind::Symmetric, &public)?;
        let (a, ia) = lab.site_host(&early, "a")?;
        let late_server = lab.host("srv2")?;
        let srv2 = lab.attach(&late_server, &public)?;
        let late = lab.nat_site6("lb", overlay_tests::NatKind::Cone, &public)?;
        let (b, ib) = lab.site_host(&late, "b")?;
        let (a6, b6) = (ia.ip6.expect("a has IPv6"), ib.ip6.expect("b has IPv6"));
        assert!(
            a6.segments()[0] == 0x2001 && a6.segments()[1] == 0xdb8,
            "{a6}"
        );
        // Out through the router, no NAT: the server sees a's own address.
        assert_eq!(ping6(lab, &a, srv6), (2, 2));
        assert_eq!(ping6(lab, &b, srv2.ip6.expect("srv2 IPv6")), (2, 2));
        assert_eq!(ping(lab, &a, srv.ip, &["-c", "1", "-W", "2"])?, (1, 1));
        // Nothing unsolicited comes in: not from a server, not from another site.
        assert_eq!(ping6(lab, &server, a6).1, 0);
        assert_eq!(ping6(lab, &a, b6).1, 0);
        // A plain site has no global IPv6.
        let plain = lab.nat_site("pl", overlay_tests::NatKind::Cone, &public)?;
        let (c, ic) = lab.site_host(&plain, "c")?;
        assert_eq!(ic.ip6, None);
        let out = lab.output(&c, "ping", &["-6", "-c", "1", "-W", "1", &srv6.to_string()])?;
        assert!(!out.status.success(), "a plain site reached {srv6}");
        assert_eq!(ping(lab, &c, srv.ip, &["-c", "1", "-W", "2"])?, (1, 1));
        // An IPv6-only site: IPv6 out as any dual-stack site, no IPv4 at all.
        let v6only = lab.ipv6_only_site("vo", &public)?;
        let (d, id) = lab.site_host(&v6only, "d")?;
        assert!(id.ip6.is_some());
        assert_eq!(ping6(lab, &d, srv6), (2, 2));
        let out = lab.output(&d, "ping", &["-c", "1", "-W", "1", &srv.ip.to_string()])?;
        assert!(
            !out.status.success(),
            "an IPv6-only site reached {} over IPv4",
            srv.ip
        );
        // Nor does IPv4 leave it with a route added by hand: the router drops it.
        lab.default_route(&d, v6only.gateway.ip)?;
        assert_eq!(ping(lab, &d, srv.ip, &["-c", "1", "-W", "1"])?.1, 0);
        Ok(())
    });
}
