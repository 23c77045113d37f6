//! The lab's NAT routers behave as their names say. Needs root; no overlay binaries.
//!
//! ```text
//!   a1 (10.77.N.10) ── site LAN ── agw ══ NAT ══ public 203.0.113.0/24 ── s1, s2
//! ```
//!
//! `udp_probe` on a1 sends from one UDP socket to servers s1 and s2, which answer
//! with the source address they saw: the router's public address and the mapped port.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use overlay_tests::{lab_test, Host, Lab, NatKind, Proc, Site};

const PROBE: &str = env!("CARGO_BIN_EXE_udp_probe");
const PROBE_PORT: u16 = 3478;
/// The source port a1 sends from.
const INSIDE_PORT: &str = "40000";

struct World {
    site: Site,
    inside: Host,
    servers: Vec<SocketAddr>,
    server_hosts: Vec<Host>,
    _probes: Vec<Proc>,
}

/// A site of `kind` with one machine, and two probe servers on the public segment.
fn world(lab: &Lab, kind: NatKind) -> anyhow::Result<World> {
    let public = lab.segment("public", "203.0.113.0/24")?;
    let site = lab.nat_site("a", kind, &public)?;
    let (inside, _) = lab.site_host(&site, "a1")?;
    let mut servers = Vec::new();
    let mut server_hosts = Vec::new();
    let mut probes = Vec::new();
    for name in ["s1", "s2"] {
        let host = lab.host(name)?;
        let ip = lab.attach(&host, &public)?.ip;
        let listen = SocketAddr::from((ip, PROBE_PORT));
        let mut cmd = Command::new(PROBE);
        cmd.args(["serve", &listen.to_string()]);
        let mut proc = lab.spawn(&host, &format!("probe-{name}"), cmd)?;
        proc.wait_for_log("ready on", Duration::from_secs(10))?;
        servers.push(listen);
        server_hosts.push(host);
        probes.push(proc);
    }
    Ok(World {
        site,
        inside,
        servers,
        server_hosts,
        _probes: probes,
    })
}

/// What each server saw, in order; `None` for a server that did not answer.
fn udp_mappings(lab: &Lab, w: &World) -> anyhow::Result<Vec<Option<SocketAddr>>> {
    let mut args = vec!["send".to_string(), INSIDE_PORT.to_string()];
    args.extend(w.servers.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.output(&w.inside, PROBE, &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        matches!(out.status.code(), Some(0) | Some(2)),
        "udp_probe send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_answers(&text, &w.servers)
}

/// Parses `TARGET SEEN_AS` lines (`SEEN_AS` is `no-answer` when there was none).
fn parse_answers(text: &str, targets: &[SocketAddr]) -> anyhow::Result<Vec<Option<SocketAddr>>> {
    targets
        .iter()
        .map(|target| {
            let prefix = format!("{target} ");
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .with_context(|| format!("no line for {target} in {text:?}"))?;
            if line == "no-answer" {
                Ok(None)
            } else {
                line.parse()
                    .map(Some)
                    .with_context(|| format!("bad answer {line:?}"))
            }
        })
        .collect()
}

fn answered(mappings: &[Option<SocketAddr>]) -> anyhow::Result<Vec<SocketAddr>> {
    mappings
        .iter()
        .map(|m| m.context("a probe server did not answer over UDP"))
        .collect()
}

fn wan_ip(site: &Site) -> Ipv4Addr {
    site.wan.ip
}

#[test]
fn cone_nat_keeps_one_mapping_for_all_destinations() {
    lab_test(|lab| {
        let w = world(lab, NatKind::Cone)?;
        let seen = answered(&udp_mappings(lab, &w)?)?;
        for s in &seen {
            ensure!(
                s.ip() == wan_ip(&w.site),
                "seen as {s}, not the router's {}",
                wan_ip(&w.site)
            );
        }
        ensure!(
            seen[0].port() == seen[1].port(),
            "a cone NAT must map one socket to one port for every destination: {seen:?}"
        );
        Ok(())
    });
}

#[test]
fn symmetric_nat_maps_each_destination_to_its_own_port() {
    lab_test(|lab| {
        let w = world(lab, NatKind::Symmetric)?;
        let seen = answered(&udp_mappings(lab, &w)?)?;
        for s in &seen {
            ensure!(
                s.ip() == wan_ip(&w.site),
                "seen as {s}, not the router's {}",
                wan_ip(&w.site)
            );
        }
        ensure!(
            seen[0].port() != seen[1].port(),
            "a symmetric NAT must use a new port per destination: {seen:?}"
        );
        Ok(())
    });
}

#[test]
fn udp_blocked_site_reaches_servers_over_tcp_only() {
    lab_test(|lab| {
        let w = world(lab, NatKind::UdpBlocked)?;
        let mappings = udp_mappings(lab, &w)?;
        if mappings.iter().any(Option::is_some) {
            bail!("UDP went through a udp-blocked router: {mappings:?}");
        }
        let target = w.servers[0].to_string();
        let out = lab.output(&w.inside, PROBE, &["tcp", &target])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "TCP through the udp-blocked router failed: {text}"
        );
        let seen = parse_answers(&text, &w.servers[..1])?[0].context("no TCP answer")?;
        ensure!(
            seen.ip() == wan_ip(&w.site),
            "TCP seen as {seen}, not masqueraded"
        );
        Ok(())
    });
}

#[test]
fn unsolicited_udp_from_outside_does_not_enter_a_site() {
    lab_test(|lab| {
        let w = world(lab, NatKind::Cone)?;
        let mut cmd = Command::new(PROBE);
        cmd.args(["serve", &format!("0.0.0.0:{INSIDE_PORT}")]);
        let mut listener = lab.spawn(&w.inside, "probe-a1", cmd)?;
        listener.wait_for_log("ready on", Duration::from_secs(10))?;
        let target = format!("{}:{INSIDE_PORT}", wan_ip(&w.site));
        let out = lab.output(&w.server_hosts[0], PROBE, &["send", "5000", &target])?;
        ensure!(
            out.status.code() == Some(2),
            "s1 got an answer from inside the site: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        ensure!(
            !listener.log().contains("udp from"),
            "a1 received unsolicited UDP: {}",
            listener.log()
        );
        Ok(())
    });
}
