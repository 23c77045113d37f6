//! Acceptance test of the daemon: three nodes and the coordinator on one LAN.
//!
//! ```text
//!   coord (10.77.1.1)   a (.2)   b (.3)   c (.4)
//!        └──────────────┴────────┴────────┴──── 10.77.1.0/24
//! ```
//!
//! Needs root and `cargo build --workspace` first.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use overlay_proto::api::PathKind;
use overlay_tests::mesh::describe;
use overlay_tests::overlay::{bulk_transfer, ping, MESH_IFACE};
use overlay_tests::pcap;
use overlay_tests::{
    fatal, lab_test, ping_lossless, wait_until, Coordinator, Daemon, Iface, Lab, Node, Wait,
};

/// How long a fresh mesh may take until every pair is on a direct path.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a change of membership may take to reach the other nodes.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(10);
/// The payload pattern that must never be seen on the wire in clear.
const PATTERN_HEX: &str = "deadbeefcafe0123";
const PATTERN: [u8; 8] = [0xde, 0xad, 0xbe, 0xef, 0xca, 0xfe, 0x01, 0x23];

/// A mesh node and its interface on the LAN.
struct LanNode {
    node: Node,
    lan: Iface,
}

impl std::ops::Deref for LanNode {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl std::ops::DerefMut for LanNode {
    fn deref_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}

/// Fields drop in order: the daemons stop before the coordinator does.
struct Mesh {
    nodes: Vec<LanNode>,
    coord: Coordinator,
}

/// The coordinator and nodes `a`, `b`, `c`, all enrolled with one reusable key.
fn start_mesh(lab: &Lab) -> anyhow::Result<Mesh> {
    let lan = lab.segment("lan", "10.77.1.0/24")?;
    let coord_host = lab.host("coord")?;
    let coord_ip = lab.attach(&coord_host, &lan)?.ip;
    let coord = Coordinator::start(lab, &coord_host, coord_ip, &[])?;
    let key = coord.create_key(lab)?;
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let host = lab.host(name)?;
        let iface = lab.attach(&host, &lan)?;
        let mut daemon = Daemon::new(lab, &host, name, &coord.url)?;
        daemon.start(lab, Some(&key))?;
        let status = daemon.status()?;
        ensure!(
            status.name == name,
            "{name} reports its name as {:?}",
            status.name
        );
        ensure!(
            status.mesh_ip.octets()[0] == 100 && (64..128).contains(&status.mesh_ip.octets()[1]),
            "{name}'s mesh IP {} is outside 100.64.0.0/10",
            status.mesh_ip
        );
        nodes.push(LanNode {
            node: Node {
                host,
                mesh_ip: status.mesh_ip,
                daemon,
            },
            lan: iface,
        });
    }
    let mut ips: Vec<Ipv4Addr> = nodes.iter().map(|n| n.mesh_ip).collect();
    ips.sort();
    ips.dedup();
    ensure!(ips.len() == 3, "mesh IPs are not distinct: {ips:?}");
    Ok(Mesh { nodes, coord })
}

/// Waits until each of `nodes` sees each other one online on a direct path, with
/// the mesh IP that node reports for itself.
fn wait_all_direct(nodes: &mut [&mut LanNode], timeout: Duration) -> anyhow::Result<()> {
    wait_until(timeout, "every pair of nodes to be direct", || {
        for i in 0..nodes.len() {
            nodes[i].daemon.alive()?;
            let peers = nodes[i].daemon.peers()?;
            for j in 0..nodes.len() {
                if i == j {
                    continue;
                }
                let want = &nodes[j];
                let Some(peer) = peers.iter().find(|p| p.name == want.daemon.name) else {
                    return Err(Wait::NotYet(format!(
                        "{} does not list {} yet",
                        nodes[i].daemon.name, want.daemon.name
                    )));
                };
                if peer.mesh_ip != want.mesh_ip {
                    return Err(fatal(anyhow::anyhow!(
                        "{} lists {} with mesh IP {}, but it has {}",
                        nodes[i].daemon.name,
                        peer.name,
                        peer.mesh_ip,
                        want.mesh_ip
                    )));
                }
                if peer.online && peer.path_kind != PathKind::Direct {
                    // Send as a user would. New peers start idle; and after
                    // a restart the peer may have us idle while we are not:
                    // an idle controlling side ignores restart requests and
                    // wakes on data, which this carries over the relay.
                    nodes[i].daemon.wake(&want.daemon.name)?;
                }
                if !(peer.online && peer.path_kind == PathKind::Direct) {
                    return Err(Wait::NotYet(format!(
                        "{} sees {}",
                        nodes[i].daemon.name,
                        describe(peer)
                    )));
                }
            }
        }
        Ok(())
    })
}

#[test]
fn lan_mesh_is_direct_lossless_and_encrypted() {
    lab_test(|lab| {
        let mut mesh = start_mesh(lab)?;
        {
            let mut all: Vec<&mut LanNode> = mesh.nodes.iter_mut().collect();
            wait_all_direct(&mut all, DIRECT_TIMEOUT)?;
        }

        for from in &mesh.nodes {
            for to in &mesh.nodes {
                if from.daemon.name != to.daemon.name {
                    ping_lossless(lab, from, to)?;
                }
            }
        }

        // The peers table names the path; overlayctl ping goes through the daemon.
        let (a, b) = (&mesh.nodes[0], &mesh.nodes[1]);
        let table = a.daemon.ctl(&["peers"])?;
        let text = String::from_utf8_lossy(&table.stdout);
        ensure!(
            table.status.success() && text.contains("direct (host)"),
            "overlayctl peers on a: {text}"
        );
        let out = a.daemon.ctl(&["ping", "b", "-c", "3", "-i", "0.2"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success()
                && text.contains(&format!("reply from {}", b.mesh_ip))
                && text.contains("via direct"),
            "overlayctl ping b on a: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );

        bulk_transfer_arrives_intact(lab, a, b)?;
        spoofed_sources_are_dropped_and_counted(lab, a, b)?;
        encrypted_on_the_wire(lab, a, b)?;
        let (ab, c) = mesh.nodes.split_at_mut(2);
        non_mesh_destinations_are_dropped_and_counted(lab, &mut c[0], &ab[1])
    });
}

/// A peer reaches this node's mesh address and nothing behind it. c's daemon
/// stops and a hostile client takes c's identity (its key and credential), with a
/// WireGuard session to b over the coordination relay: an echo request to b's
/// mesh address is answered (the control), one to b's LAN address through the
/// tunnel is dropped and counted.
fn non_mesh_destinations_are_dropped_and_counted(
    lab: &Lab,
    c: &mut LanNode,
    b: &LanNode,
) -> anyhow::Result<()> {
    c.daemon.stop()?;
    // b must not keep sending to c's old direct endpoint: ICE consent notices the
    // stopped daemon within seconds, then b's packets take the relay.
    wait_until(
        PROPAGATION_TIMEOUT,
        "b to give up its direct path to c",
        || {
            let peers = b.daemon.peers()?;
            match peers.iter().find(|p| p.name == "c") {
                Some(p) if p.path_kind != PathKind::Direct => Ok(()),
                Some(p) => Err(Wait::NotYet(describe(p))),
                None => Err(Wait::NotYet("c is not listed".into())),
            }
        },
    )?;
    let hostile_ping = |dst: Ipv4Addr| -> anyhow::Result<u32> {
        let state = c.daemon.state_dir.to_string_lossy().into_owned();
        let dst = dst.to_string();
        let out = lab.output(
            &c.host,
            env!("CARGO_BIN_EXE_hostile_node"),
            &[&state, "ping", "b", &dst],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "hostile_node ping {dst}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.trim()
            .strip_prefix("replies=")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("hostile_node printed {text:?}"))
    };
    let replies = hostile_ping(b.mesh_ip)?;
    ensure!(
        replies > 0,
        "the control failed: b did not answer the hostile client at its mesh address"
    );
    let before = b.daemon.status()?.dropped.wrong_destination;
    let replies = hostile_ping(b.lan.ip)?;
    ensure!(
        replies == 0,
        "b answered {replies} echo requests sent through the tunnel to its LAN address {}",
        b.lan.ip
    );
    let after = b.daemon.status()?.dropped.wrong_destination;
    ensure!(
        after >= before + 3,
        "b counted {} packets to a wrong destination, expected at least 3",
        after - before
    );
    Ok(())
}

/// Cryptokey routing: a peer may only send from its own mesh IP. a gives its
/// interface a second address and pings b from it; b must drop those packets
/// (no reply) and count them.
fn spoofed_sources_are_dropped_and_counted(
    lab: &Lab,
    a: &LanNode,
    b: &LanNode,
) -> anyhow::Result<()> {
    let before = b.daemon.status()?.dropped.spoofed_source;
    let forged = "100.127.255.250";
    lab.exec(
        &a.host,
        "ip",
        &["addr", "add", &format!("{forged}/32"), "dev", MESH_IFACE],
    )?;
    let (sent, received) = ping(
        lab,
        &a.host,
        b.mesh_ip,
        &["-c", "3", "-i", "0.2", "-W", "1", "-I", forged],
    )?;
    lab.exec(
        &a.host,
        "ip",
        &["addr", "del", &format!("{forged}/32"), "dev", MESH_IFACE],
    )?;
    ensure!(
        sent == 3 && received == 0,
        "pings from a forged source were answered: {received}/{sent}"
    );
    let after = b.daemon.status()?.dropped.spoofed_source;
    ensure!(
        after >= before + 3,
        "b counted {} spoofed packets, expected at least 3",
        after - before
    );
    Ok(())
}

/// 64 MiB of TCP from a to b through the mesh arrive byte for byte. The data plane
/// cuts the sender's large TCP segments into packets and merges them again at the
/// receiver (checksums are not re-verified by the kernel there), so this is what
/// proves the bytes are right, not just that they flow.
fn bulk_transfer_arrives_intact(lab: &Lab, a: &LanNode, b: &LanNode) -> anyhow::Result<()> {
    bulk_transfer(
        lab,
        env!("CARGO_BIN_EXE_tcp_blast"),
        &a.host,
        &b.host,
        b.mesh_ip,
        64 << 20,
    )
}

/// Captures a's LAN traffic while pinging b in clear (the control) and through the
/// mesh with a recognisable payload: the pattern shows in the clear ICMP, never in
/// UDP, and the mesh traffic is WireGuard data messages.
fn encrypted_on_the_wire(lab: &Lab, a: &LanNode, b: &LanNode) -> anyhow::Result<()> {
    let capture = lab.dir().join("a-lan.pcap");
    let mut tcpdump = Command::new("tcpdump");
    tcpdump
        .args(["-i", &a.lan.name, "-n", "-U", "-Z", "root", "-s", "0", "-w"])
        .arg(&capture)
        .arg("udp or icmp");
    let mut tcpdump = lab.spawn(&a.host, "tcpdump-a", tcpdump)?;
    tcpdump.wait_for_log("listening on", Duration::from_secs(10))?;

    let control = ping(
        lab,
        &a.host,
        b.lan.ip,
        &["-c", "2", "-i", "0.2", "-W", "2", "-p", PATTERN_HEX],
    )?;
    ensure!(control.1 > 0, "plain LAN ping a → b failed: {control:?}");
    let (sent, received) = ping(
        lab,
        &a.host,
        b.mesh_ip,
        &["-c", "5", "-i", "0.2", "-W", "2", "-p", PATTERN_HEX],
    )?;
    ensure!(
        received == sent,
        "mesh ping with pattern: {sent} sent, {received} received"
    );
    tcpdump.stop()?;

    let bytes =
        std::fs::read(&capture).with_context(|| format!("reading {}", capture.display()))?;
    let frames = pcap::parse(&bytes)?;
    let clear_icmp = frames.iter().filter(|f| f.icmp_contains(&PATTERN)).count();
    ensure!(
        clear_icmp > 0,
        "the control failed: the capture of {} frames does not show the pattern in the clear LAN ping",
        frames.len()
    );
    let udp: Vec<&[u8]> = frames.iter().filter_map(|f| f.udp_payload()).collect();
    let leaked = udp.iter().filter(|p| pcap::contains(p, &PATTERN)).count();
    ensure!(
        leaked == 0,
        "{leaked} UDP datagrams carry the ping pattern in clear"
    );
    let wireguard = udp.iter().filter(|p| pcap::is_wireguard_data(p)).count();
    ensure!(
        wireguard >= sent as usize,
        "expected at least {sent} WireGuard data messages (type 4) on a's LAN, saw {wireguard} of {} UDP datagrams",
        udp.len()
    );
    Ok(())
}

#[test]
fn lan_node_stop_restart_and_removal_reach_the_others() {
    lab_test(|lab| {
        let mut mesh = start_mesh(lab)?;
        {
            let mut all: Vec<&mut LanNode> = mesh.nodes.iter_mut().collect();
            wait_all_direct(&mut all, DIRECT_TIMEOUT)?;
        }
        let (ab, c) = mesh.nodes.split_at_mut(2);
        let c = &mut c[0];

        // SIGTERM: c exits promptly, removes its interface and socket, and the
        // others see it offline.
        c.daemon.stop()?;
        let link = lab.output(&c.host, "ip", &["link", "show", MESH_IFACE])?;
        ensure!(
            !link.status.success(),
            "{MESH_IFACE} still exists in c after overlayd stopped"
        );
        ensure!(
            !c.daemon.socket.exists(),
            "the API socket {} was not removed",
            c.daemon.socket.display()
        );
        for node in ab.iter() {
            wait_until(
                PROPAGATION_TIMEOUT,
                &format!("{} to see c offline", node.daemon.name),
                || {
                    let peers = node.daemon.peers()?;
                    match peers.iter().find(|p| p.name == "c") {
                        Some(p) if !p.online => Ok(()),
                        Some(p) => Err(Wait::NotYet(describe(p))),
                        None => Err(Wait::NotYet("c is not listed at all".into())),
                    }
                },
            )?;
        }

        // Restart from the same state dir without an auth key: the stored
        // credential is enough, and nobody else restarts.
        c.daemon.start(lab, None)?;
        ensure!(
            c.daemon.status()?.mesh_ip == c.mesh_ip,
            "c came back with a different mesh IP"
        );
        {
            let mut all: Vec<&mut LanNode> = ab.iter_mut().collect();
            all.push(c);
            wait_all_direct(&mut all, DIRECT_TIMEOUT)?;
        }
        // a and b talked to the old c (waking it), so their WireGuard
        // sessions are stale: c answers the first packet with a handshake,
        // and that packet is lost. Send it before counting.
        for node in ab.iter() {
            node.daemon.wake("c")?;
        }
        for node in ab.iter() {
            let (sent, received) = ping(
                lab,
                &node.host,
                c.mesh_ip,
                &["-c", "5", "-i", "0.2", "-W", "2"],
            )?;
            ensure!(
                received == sent,
                "{} → c after restart: {sent} sent, {received} received",
                node.daemon.name
            );
            let (sent, received) = ping(
                lab,
                &c.host,
                node.mesh_ip,
                &["-c", "5", "-i", "0.2", "-W", "2"],
            )?;
            ensure!(
                received == sent,
                "c → {} after restart: {sent} sent, {received} received",
                node.daemon.name
            );
        }

        // An administrator removes c: it disappears from the others' lists.
        mesh.coord.remove_node(lab, "c")?;
        for node in ab.iter() {
            wait_until(
                PROPAGATION_TIMEOUT,
                &format!("{} to drop c", node.daemon.name),
                || {
                    let peers = node.daemon.peers()?;
                    match peers.iter().find(|p| p.name == "c") {
                        None => Ok(()),
                        Some(p) => Err(Wait::NotYet(format!("still listed: {}", describe(p)))),
                    }
                },
            )?;
        }
        let nodes = mesh.coord.nodes(lab)?;
        ensure!(
            !names_in(&nodes).contains(&"c".to_string()),
            "nodes list still has c: {nodes}"
        );
        ensure!(
            names_in(&nodes).contains(&"a".to_string()),
            "nodes list lost a: {nodes}"
        );
        Ok(())
    });
}

/// The `name` of every node in `nodes list --json` output (an array of objects, or
/// an object holding one under `nodes`).
fn names_in(value: &serde_json::Value) -> Vec<String> {
    let list = value.get("nodes").unwrap_or(value);
    list.as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n.get("name").and_then(|s| s.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
