//! Acceptance tests of IPv6 (issue #12): every node has a mesh IPv6 address
//! beside its IPv4 one, and the underlay uses IPv6 where IPv4 cannot go direct.
//!
//! ```text
//!   coord 203.0.113.1 + 2001:db8::1            inet .2 + ::2 (forwards nothing)
//!   (HTTP [::]:8080, STUN/TURN on both)           │
//!     │                                           │
//!   ──┴──────── public 203.0.113.0/24 + 2001:db8::/64 (routed, no NAT66) ──┬───
//!                     │                                                    │
//!                    agw: IPv4 NAT (symmetric, ...),                      bgw
//!                         IPv6 routed behind a stateful firewall           │
//!                     │                                                    │
//!   a1 ── 10.77.10N.0/24 + 2001:db8:10N::/64            b1 ── 10.77.10M.0/24 (+ …)
//! ```
//!
//! | site A                     | site B                     | path                  |
//! |----------------------------|----------------------------|-----------------------|
//! | symmetric NAT, global IPv6 | symmetric NAT, global IPv6 | direct over IPv6      |
//! | IPv6 only                  | IPv4 only (cone NAT)       | TURN or coord relay   |
//! | one dual-stack LAN         | (same)                     | direct                |
//!
//! Each row pings 20 times each way over both mesh families. Rows print an
//! `IPV6-ROW | …` line with their figures (`--nocapture` shows them).
//! Needs root and `cargo build --bins` first.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use overlay_proto::api::{PathKind, PeerStatus, WhyReport};
use overlay_proto::coord::mesh_ip6;
use overlay_tests::mesh::{describe, ping6_lossless};
use overlay_tests::overlay::{bulk_transfer, ping, MESH_IFACE};
use overlay_tests::{
    fatal, lab_test, ping_lossless, wait_path, wait_until, Coordinator, Daemon, Host, Lab, LanPair,
    NatKind, Node, Segment, Wait,
};

/// How long a pair may take to settle on a direct path.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(40);
/// A relayed pair: TURN needs an allocation on each side and more checks.
const RELAY_TIMEOUT: Duration = Duration::from_secs(60);
/// The public segment, both families.
const PUBLIC_SUBNET: &str = "203.0.113.0/24";
const PUBLIC_SUBNET6: &str = "2001:db8::/64";
/// A mesh address no node has: the source the forged packets wear (its IPv6
/// form is the mesh prefix with this in the low bits, like every node's).
const FORGED_V4: Ipv4Addr = Ipv4Addr::new(100, 127, 255, 250);
/// The bulk transfer over the mesh IPv6 address.
const BULK_BYTES: u64 = 64 << 20;

/// The public segment with the dual-stack coordinator and the "Internet"
/// beyond it (see [`Lab::upstream`]) as its default route in both families.
struct Public {
    segment: Segment,
    coord: Coordinator,
}

fn public(lab: &Lab) -> anyhow::Result<Public> {
    let segment = lab.segment6("public", PUBLIC_SUBNET, PUBLIC_SUBNET6)?;
    let coord_host = lab.host("coord")?;
    let coord_if = lab.attach(&coord_host, &segment)?;
    let upstream = lab.upstream(&segment)?;
    lab.default_route(&coord_host, upstream.ip)?;
    let (coord_ip6, upstream6) = coord_if
        .ip6
        .zip(upstream.ip6)
        .context("the public segment gave no IPv6 addresses")?;
    lab.default_route6(&coord_host, upstream6)?;
    let coord = Coordinator::start_dual_stack(lab, &coord_host, coord_if.ip, coord_ip6, &[])?;
    Ok(Public { segment, coord })
}

/// Enrols and starts daemons `a` on `a_host` and `b` on `b_host` at one moment,
/// each with its own coordinator URL (one per family the site has). Both
/// must report a mesh IPv6 address: the mesh prefix (a ULA) with their IPv4
/// mesh address in the low bits. Also returns when they were launched.
fn start_pair(
    lab: &Lab,
    coord: &Coordinator,
    (a_host, a_url): (&Host, &str),
    (b_host, b_url): (&Host, &str),
) -> anyhow::Result<(Node, Node, Instant)> {
    let key = coord.create_key(lab)?;
    let mut da = Daemon::new(lab, a_host, "a", a_url)?;
    let mut db = Daemon::new(lab, b_host, "b", b_url)?;
    let launched = Instant::now();
    da.launch(lab, Some(&key))?;
    db.launch(lab, Some(&key))?;
    let mut nodes = Vec::new();
    for (host, mut daemon) in [(a_host, da), (b_host, db)] {
        let status = daemon.wait_ready()?;
        let network6 = status
            .network6
            .with_context(|| format!("{} reports no mesh IPv6 prefix", daemon.name))?;
        ensure!(
            network6.addr().segments()[0] & 0xff00 == 0xfd00,
            "{}'s mesh IPv6 prefix {network6} is not a ULA (fd00::/8)",
            daemon.name
        );
        ensure!(
            status.mesh_ip6 == Some(mesh_ip6(network6, status.mesh_ip)),
            "{} has mesh IPv6 {:?}; {network6} with {} is {}",
            daemon.name,
            status.mesh_ip6,
            status.mesh_ip,
            mesh_ip6(network6, status.mesh_ip)
        );
        nodes.push(Node {
            host: host.clone(),
            mesh_ip: status.mesh_ip,
            daemon,
        });
    }
    let b = nodes.pop().context("two nodes")?;
    let a = nodes.pop().context("two nodes")?;
    ensure!(
        a.mesh_ip != b.mesh_ip,
        "both nodes got mesh IP {}",
        a.mesh_ip
    );
    Ok((a, b, launched))
}

/// Waits until each of `a` and `b` sees the other on a path `want` accepts
/// (`what` names it); an idle peer is woken with a ping. Returns the time
/// since `t0` and what each side saw.
fn wait_both(
    t0: Instant,
    a: &mut Node,
    b: &mut Node,
    what: &str,
    timeout: Duration,
    want: impl Fn(&PeerStatus) -> Result<bool, String>,
) -> anyhow::Result<(Duration, PeerStatus, PeerStatus)> {
    let (a_sees, b_sees) = wait_until(timeout, &format!("a and b on {what}"), || {
        a.daemon.alive()?;
        b.daemon.alive()?;
        let (a_sees, b_sees) = (a.view_of(b)?, b.view_of(a)?);
        for (node, peer) in [(&*a, &a_sees), (&*b, &b_sees)] {
            if peer.path_kind == PathKind::Idle {
                node.daemon.wake(&peer.name)?;
            }
        }
        let verdict = |p: &PeerStatus| want(p).map_err(|e| fatal(anyhow::anyhow!(e)));
        if a_sees.online && b_sees.online && verdict(&a_sees)? && verdict(&b_sees)? {
            Ok((a_sees, b_sees))
        } else {
            Err(Wait::NotYet(format!(
                "a sees {}; b sees {}",
                describe(&a_sees),
                describe(&b_sees)
            )))
        }
    })?;
    Ok((t0.elapsed(), a_sees, b_sees))
}

/// A direct path over IPv6: kind `direct` and a label naming the family
/// (`direct (host, v6)`, `direct (srflx, v6)`, …).
fn direct_over_ipv6(p: &PeerStatus) -> bool {
    p.path_kind == PathKind::Direct && p.path.starts_with("direct (") && p.path.contains("v6")
}

/// 20 pings each way over each mesh family; none may be lost.
fn ping_both_families(lab: &Lab, a: &Node, b: &Node) -> anyhow::Result<()> {
    ping_lossless(lab, a, b)?;
    ping_lossless(lab, b, a)?;
    ping6_lossless(lab, a, b)?;
    ping6_lossless(lab, b, a)
}

/// `a's path / b's path`, or one of them when they agree.
fn paths(a_sees: &PeerStatus, b_sees: &PeerStatus) -> String {
    if a_sees.path == b_sees.path {
        a_sees.path.clone()
    } else {
        format!("{} / {}", a_sees.path, b_sees.path)
    }
}

#[test]
fn symmetric_ipv4_nats_with_global_ipv6_go_direct_over_ipv6() {
    lab_test(|lab| {
        let p = public(lab)?;
        let site_a = lab.nat_site6("a", NatKind::Symmetric, &p.segment)?;
        let (a1, _) = lab.site_host(&site_a, "a1")?;
        let site_b = lab.nat_site6("b", NatKind::Symmetric, &p.segment)?;
        let (b1, _) = lab.site_host(&site_b, "b1")?;
        let url = p.coord.url.clone();
        let (mut a, mut b, t0) = start_pair(lab, &p.coord, (&a1, &url), (&b1, &url))?;

        // Over IPv4 only TURN could join them; over IPv6 the routers are plain
        // stateful firewalls, which a simultaneous open passes.
        let (settled, _, _) = wait_both(
            t0,
            &mut a,
            &mut b,
            "a direct path over IPv6",
            DIRECT_TIMEOUT,
            |p| Ok(direct_over_ipv6(p)),
        )?;
        ping_both_families(lab, &a, &b)?;
        let (a_sees, b_sees) = (a.view_of(&b)?, b.view_of(&a)?);
        for (who, seen) in [("a", &a_sees), ("b", &b_sees)] {
            ensure!(
                direct_over_ipv6(seen),
                "{who}'s path changed during the pings: {}",
                describe(seen)
            );
        }
        // `why` lists the IPv6 candidates, the site's global ones and never a
        // link-local one (every lab interface has one).
        let why: WhyReport = a.daemon.ctl_json(&["why", "b"])?;
        for (side, list) in [
            ("local", &why.local_candidates),
            ("remote", &why.remote_candidates),
        ] {
            ensure!(
                list.iter().any(|c| c.contains("2001:db8:")),
                "overlayctl why b on a lists no global IPv6 {side} candidate: {list:?}"
            );
            ensure!(
                !list.iter().any(|c| c.contains("fe80:")),
                "overlayctl why b on a lists a link-local {side} candidate: {list:?}"
            );
        }
        eprintln!(
            "IPV6-ROW | symmetric NAT + global IPv6 | symmetric NAT + global IPv6 | {} | \
             direct over IPv6 {:.1} s after launch | 20 pings each way per family, none lost",
            paths(&a_sees, &b_sees),
            settled.as_secs_f64()
        );
        Ok(())
    });
}

#[test]
fn an_ipv6_only_site_and_an_ipv4_only_site_reach_each_other_over_a_relay() {
    lab_test(|lab| {
        let p = public(lab)?;
        let v6_site = lab.ipv6_only_site("a", &p.segment)?;
        let (a1, _) = lab.site_host(&v6_site, "a1")?;
        let v4_site = lab.nat_site("b", NatKind::Cone, &p.segment)?;
        let (b1, _) = lab.site_host(&v4_site, "b1")?;
        // Each reaches the coordinator in the one family it has.
        let url6 = p.coord.url6.clone().context("a dual-stack coordinator")?;
        let url4 = p.coord.url.clone();
        let (mut a, mut b, t0) = start_pair(lab, &p.coord, (&a1, &url6), (&b1, &url4))?;

        // No underlay family is common to both: a relay carries them, TURN
        // (a relayed address in b's family) or the coordinator's own relay.
        let (settled, _, _) =
            wait_both(
                t0,
                &mut a,
                &mut b,
                "a relay path",
                RELAY_TIMEOUT,
                |p| match p.path_kind {
                    PathKind::Turn | PathKind::CoordRelay => Ok(true),
                    PathKind::Direct => Err(format!(
                        "a direct path between an IPv6-only and an IPv4-only site: {}",
                        describe(p)
                    )),
                    PathKind::Connecting | PathKind::Idle => Ok(false),
                },
            )?;
        ping_both_families(lab, &a, &b)?;
        let (a_sees, b_sees) = (a.view_of(&b)?, b.view_of(&a)?);
        eprintln!(
            "IPV6-ROW | IPv6 only | IPv4 only (cone NAT) | {} | relayed {:.1} s after launch | \
             20 pings each way per family, none lost",
            paths(&a_sees, &b_sees),
            settled.as_secs_f64()
        );
        Ok(())
    });
}

/// A started [`LanPair`] as its coordinator and two [`Node`]s, direct to each
/// other. (Bound in this order, the nodes drop before the coordinator.)
fn direct_lan_pair(pair: LanPair) -> anyhow::Result<(Coordinator, Node, Node)> {
    let LanPair {
        a_host,
        mut a,
        b_host,
        mut b,
        coord,
        ..
    } = pair;
    wait_path(&mut a, "b", PathKind::Direct, DIRECT_TIMEOUT)?;
    wait_path(&mut b, "a", PathKind::Direct, DIRECT_TIMEOUT)?;
    let (a_ip, b_ip) = (a.status()?.mesh_ip, b.status()?.mesh_ip);
    Ok((
        coord,
        Node {
            host: a_host,
            daemon: a,
            mesh_ip: a_ip,
        },
        Node {
            host: b_host,
            daemon: b,
            mesh_ip: b_ip,
        },
    ))
}

#[test]
fn a_dual_stack_lan_pair_pings_and_moves_64_mib_over_the_mesh_ipv6() {
    lab_test(|lab| {
        let pair = LanPair::start_dual_stack(lab, "10.77.40.0/24", "2001:db8:40::/64")?;
        let (_coord, a, b) = direct_lan_pair(pair)?;
        ping6_lossless(lab, &a, &b)?;
        ping6_lossless(lab, &b, &a)?;
        let b6 = a.view6_of(&b)?.1;

        // overlayctl ping takes a mesh IPv6 address.
        let out = a
            .daemon
            .ctl(&["ping", &b6.to_string(), "-c", "3", "-i", "0.2"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains(&format!("reply from {b6}")),
            "overlayctl ping {b6} on a: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let started = Instant::now();
        bulk_transfer(
            lab,
            env!("CARGO_BIN_EXE_tcp_blast"),
            &a.host,
            &b.host,
            b6,
            BULK_BYTES,
        )?;
        let took = started.elapsed();
        let path = a.view_of(&b)?.path;
        eprintln!(
            "IPV6-ROW | dual-stack LAN | dual-stack LAN | {path} | {} MiB of TCP to [{b6}] \
             intact in {:.1} s ({:.0} MiB/s) | 20 pings -6 each way, none lost",
            BULK_BYTES >> 20,
            took.as_secs_f64(),
            (BULK_BYTES >> 20) as f64 / took.as_secs_f64()
        );
        Ok(())
    });
}

/// Cryptokey routing for IPv6: a peer may only send from its own mesh IPv6
/// address. a gives its interface a second address in the mesh prefix, one
/// no node has, and pings b from it; b must drop those packets (no reply)
/// and count them. The underlay is IPv4 only: mesh IPv6 does not need it.
#[test]
fn a_forged_ipv6_source_from_a_peer_is_dropped_and_counted() {
    lab_test(|lab| {
        let pair = LanPair::start(lab, "10.77.41.0/24")?;
        let (_coord, a, b) = direct_lan_pair(pair)?;
        // The control: from its own address a is answered.
        ping6_lossless(lab, &a, &b)?;
        let b6 = a.view6_of(&b)?.1;
        let network6 = b
            .daemon
            .status()?
            .network6
            .context("b reports no mesh IPv6 prefix")?;
        let forged = mesh_ip6(network6, FORGED_V4);

        let before = b.daemon.status()?.dropped.spoofed_source;
        let forged_arg = format!("{forged}/128");
        lab.exec(
            &a.host,
            "ip",
            &["-6", "addr", "add", &forged_arg, "dev", MESH_IFACE, "nodad"],
        )?;
        let (sent, received) = ping(
            lab,
            &a.host,
            b6,
            &["-c", "3", "-i", "0.2", "-W", "1", "-I", &forged.to_string()],
        )?;
        lab.exec(
            &a.host,
            "ip",
            &["-6", "addr", "del", &forged_arg, "dev", MESH_IFACE],
        )?;
        ensure!(
            sent == 3 && received == 0,
            "pings from the forged source {forged} were answered: {received}/{sent}"
        );
        let after = b.daemon.status()?.dropped.spoofed_source;
        ensure!(
            after >= before + 3,
            "b counted {} spoofed packets from {forged}, expected at least 3",
            after - before
        );
        // And a's real address still works.
        ping6_lossless(lab, &a, &b)
    });
}
