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
    let target = target.to_string();
    let out = lab
        .output(
            host,
            "ping",
            &["-6", "-c", "2", "-i", "0.2", "-W", "1", &target],
        )
        .expect("ping -6");
    let text = String::from_utf8_lossy(&out.stdout);
    overlay_tests::overlay::parse_ping_summary(&text)
        .unwrap_or_else(|| panic!("no ping summary: {text} {:?}", out.stderr))
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
        // A plain site stays IPv4-only.
        let plain = lab.nat_site("pl", overlay_tests::NatKind::Cone, &public)?;
        let (_, ic) = lab.site_host(&plain, "c")?;
        assert_eq!(ic.ip6, None);
        Ok(())
    });
}
