//! Acceptance tests of NAT traversal: two nodes in different network situations
//! settle on the path their routers allow, on both sides, and lose no ping on it.
//!
//! ```text
//!   coord 203.0.113.1 (HTTP :8080, embedded STUN/TURN udp :3478)   [turn: coturn]
//!         (or coturn on udp :3478 and the coordinator's netcheck STUN on :3479)
//!     │
//!   ──┴────────────── public 203.0.113.0/24 ──────┬─────────────────┬────
//!                                                agw (NAT)         bgw (NAT)     b (public host)
//!                                                 │                 │
//!                                      a1 ── 10.77.10N.0/24   b1 ── 10.77.10M.0/24
//! ```
//!
//! | site A        | site B        | path                          |
//! |---------------|---------------|-------------------------------|
//! | same LAN      | same LAN      | `direct (host)`               |
//! | cone NAT      | cone NAT      | `direct (srflx)` or `(prflx)` |
//! | cone NAT      | public host   | direct                        |
//! | symmetric NAT | symmetric NAT | TURN (embedded)               |
//! | symmetric NAT | symmetric NAT | TURN (coturn)                 |
//! | symmetric NAT | symmetric NAT | TURN (coturn on coord's host) |
//! | UDP blocked   | cone NAT      | coordination relay            |
//!
//! Each row prints one `NAT-ROW | …` line with the time from spawning both daemons
//! to the first answered ping and to the final path (`--nocapture` shows them).
//! Needs root, coturn's `turnserver`, and `cargo build --workspace` first.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use overlay_proto::api::{NetcheckReport, PathKind, PeerStatus, WhyReport};
use overlay_proto::signal::MappingBehaviour;
use overlay_tests::coturn;
use overlay_tests::mesh::describe;
use overlay_tests::{
    fatal, lab_test, ping_lossless, wait_until, Coordinator, Coturn, Daemon, Host, Lab, NatKind,
    Node, Segment, Wait,
};

/// How long a pair may take to reach a direct path or the coordination relay.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(40);
/// TURN needs an allocation on each side and more checks: allow it longer.
const TURN_TIMEOUT: Duration = Duration::from_secs(60);
/// Netcheck results reach the peer a few seconds after start (a blocked site
/// waits out its STUN timeouts first).
const EXPLAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first ping across the mesh may take to be answered.
/// Pings 50 ms apart right after the first answer: 4 s, across the path change.
const SWITCH_PINGS: &str = "80";
const FIRST_PING_TIMEOUT: Duration = Duration::from_secs(40);
/// The shared secret between overlay-coord and coturn in the coturn row.
const COTURN_SECRET: &str = "overlay-lab-coturn-secret";
/// The public segment: coordinator, TURN servers, NAT routers' WANs, public hosts.
const PUBLIC_SUBNET: &str = "203.0.113.0/24";
/// The lab's UDP probe (`tests/src/bin/udp_probe.rs`).
const PROBE: &str = env!("CARGO_BIN_EXE_udp_probe");
/// The site host's UDP port in the hole-punch race test, and the peer's.
const PUNCH_INSIDE_PORT: &str = "40000";
const PUNCH_PEER_PORT: &str = "5000";

/// Every row measured by this test process, printed after each row so the last
/// test to finish shows the whole table.
static SUMMARY: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The path a row must settle on, as `overlayctl peers --json` reports it.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// `direct (host)`: both nodes on one LAN.
    DirectHost,
    /// `direct (srflx)` or `direct (prflx)`: a hole punched through NAT.
    DirectThroughNat,
    /// Any direct pair.
    Direct,
    /// A TURN relay on the server at this address.
    Turn(Ipv4Addr),
    /// The coordination server's relay.
    CoordRelay,
}

impl Expect {
    fn kind(self) -> PathKind {
        match self {
            Expect::DirectHost | Expect::DirectThroughNat | Expect::Direct => PathKind::Direct,
            Expect::Turn(_) => PathKind::Turn,
            Expect::CoordRelay => PathKind::CoordRelay,
        }
    }

    /// Whether `peer` shows exactly this path (kind and label).
    fn check(self, peer: &PeerStatus) -> Result<(), String> {
        let ok = peer.online
            && peer.path_kind == self.kind()
            && match self {
                Expect::DirectHost => peer.path == "direct (host)",
                Expect::DirectThroughNat => {
                    peer.path == "direct (srflx)" || peer.path == "direct (prflx)"
                }
                Expect::Direct => peer.path.starts_with("direct ("),
                Expect::Turn(server) => {
                    peer.path.starts_with("turn (relay via ")
                        && peer.path.contains(&format!("{server}:"))
                }
                Expect::CoordRelay => peer.path == "coord relay",
            };
        if ok {
            Ok(())
        } else {
            Err(format!("expected {self:?}, got {}", describe(peer)))
        }
    }
}

/// The public segment: the coordinator at `203.0.113.1`, and the upstream
/// "Internet" router that public machines use as their default route.
struct Public {
    segment: Segment,
    coord_host: Host,
    coord_ip: Ipv4Addr,
    upstream: Ipv4Addr,
}

fn public(lab: &Lab) -> anyhow::Result<Public> {
    let segment = lab.segment("public", PUBLIC_SUBNET)?;
    let coord_host = lab.host("coord")?;
    let coord_ip = lab.attach(&coord_host, &segment)?.ip;
    let upstream = lab.upstream(&segment)?.ip;
    lab.default_route(&coord_host, upstream)?;
    Ok(Public {
        segment,
        coord_host,
        coord_ip,
        upstream,
    })
}

/// A machine with an address of its own on the public segment.
fn public_host(lab: &Lab, p: &Public, name: &str) -> anyhow::Result<(Host, Ipv4Addr)> {
    let host = lab.host(name)?;
    let ip = lab.attach(&host, &p.segment)?.ip;
    lab.default_route(&host, p.upstream)?;
    Ok((host, ip))
}

/// A machine `name` alone on a new site behind a NAT router of `kind`.
fn behind_nat(
    lab: &Lab,
    p: &Public,
    site: &str,
    kind: NatKind,
    name: &str,
) -> anyhow::Result<Host> {
    let site = lab.nat_site(site, kind, &p.segment)?;
    Ok(lab.site_host(&site, name)?.0)
}

/// One row of the table: who is where, and the path both must settle on.
struct Row<'a> {
    a_place: &'a str,
    b_place: &'a str,
    a: Host,
    b: Host,
    expect: Expect,
    timeout: Duration,
    /// What `overlayctl netcheck` on a must find about a's NAT.
    a_mapping: Option<MappingBehaviour>,
    /// What `overlayctl why b` on a must conclude (a prefix of the sentence).
    a_why: Option<&'static str>,
}

/// Runs one row against a started coordinator: spawns both daemons at once,
/// measures the first answered ping and the settling of the path, pings 20 times
/// each way, and checks the path did not change.
fn run_row(lab: &Lab, coord: &Coordinator, row: Row) -> anyhow::Result<()> {
    let key = coord.create_key(lab)?;
    let mut da = Daemon::new(lab, &row.a, "a", &coord.url)?;
    let mut db = Daemon::new(lab, &row.b, "b", &coord.url)?;
    let t0 = Instant::now();
    da.launch(lab, Some(&key))?;
    db.launch(lab, Some(&key))?;
    let a_ip = da.wait_ready()?.mesh_ip;
    let b_ip = db.wait_ready()?.mesh_ip;
    ensure!(a_ip != b_ip, "both nodes got mesh IP {a_ip}");
    let mut a = Node {
        host: row.a.clone(),
        daemon: da,
        mesh_ip: a_ip,
    };
    let mut b = Node {
        host: row.b.clone(),
        daemon: db,
        mesh_ip: b_ip,
    };

    // The first ping runs beside the path polling, so neither delays the other.
    let give_up = AtomicBool::new(false);
    let (first_ping, settled) = std::thread::scope(|scope| {
        let ns = a.host.ns.clone();
        let give_up = &give_up;
        let pinger = scope.spawn(move || first_answered_ping(&ns, b_ip, t0, give_up));
        let settled = wait_settled(&mut a, &mut b, row.expect, row.timeout, t0);
        if settled.is_err() {
            // The row has failed: do not make it wait for the pinger's deadline too.
            give_up.store(true, Ordering::Relaxed);
        }
        let first = pinger
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the ping thread panicked")));
        (first, settled)
    });
    let settled = settled?;
    let (first_ping, (sent, received)) = first_ping?;
    ensure!(
        sent == received && sent > 0,
        "pings while the path changed: {received} of {sent} answered"
    );

    ping_lossless(lab, &a, &b)?;
    ping_lossless(lab, &b, &a)?;
    let (a_sees, b_sees) = (a.view_of(&b)?, b.view_of(&a)?);
    row.expect
        .check(&a_sees)
        .and_then(|()| row.expect.check(&b_sees))
        .map_err(|e| anyhow::anyhow!("the path changed during the pings: {e}"))?;

    explained(&a, row.a_mapping, row.a_why)?;

    let paths = if a_sees.path == b_sees.path {
        a_sees.path.clone()
    } else {
        format!("{} / {}", a_sees.path, b_sees.path)
    };
    let line = format!(
        "NAT-ROW | {} | {} | {paths} | first ping {:.2} s | final path {:.1} s",
        row.a_place,
        row.b_place,
        first_ping.as_secs_f64(),
        settled.as_secs_f64()
    );
    eprintln!("{line}");
    let mut summary = SUMMARY.lock().unwrap_or_else(|p| p.into_inner());
    summary.push(line);
    eprintln!(
        "---- NAT traversal rows so far ----\n{}",
        summary.join("\n")
    );
    Ok(())
}

/// `netcheck` on a names a's NAT behaviour, and `why b` explains the path with
/// both sides' netcheck results (they reach the peer a few seconds after start).
fn explained(a: &Node, mapping: Option<MappingBehaviour>, why: Option<&str>) -> anyhow::Result<()> {
    if let Some(want) = mapping {
        let report: NetcheckReport = a.daemon.ctl_json(&["netcheck"])?;
        ensure!(
            report.mapping == want && report.udp == (want != MappingBehaviour::NoUdp),
            "netcheck on a: expected {want:?}, got {report:?}"
        );
    }
    if let Some(want) = why {
        wait_until(
            EXPLAIN_TIMEOUT,
            "overlayctl why b on a to explain the path",
            || {
                let report: WhyReport = a.daemon.ctl_json(&["why", "b"])?;
                if report.conclusion.starts_with(want) {
                    Ok(())
                } else {
                    Err(Wait::NotYet(format!("conclusion: {:?}", report.conclusion)))
                }
            },
        )?;
    }
    Ok(())
}

/// Pings `to` from namespace `ns` (one echo request, waiting up to 1 s for its
/// reply) until one is answered, or until `give_up` is set; returns the time since
/// `t0`. Runs on its own thread, so it uses no `Lab`.
fn first_answered_ping(
    ns: &str,
    to: Ipv4Addr,
    t0: Instant,
    give_up: &AtomicBool,
) -> anyhow::Result<(Duration, (u32, u32))> {
    let target = to.to_string();
    let first = wait_until(FIRST_PING_TIMEOUT, "the first answered ping", || {
        if give_up.load(Ordering::Relaxed) {
            return Err(fatal(anyhow::anyhow!("the row already failed")));
        }
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1", &target])
            .output()
            .context("running ping")
            .map_err(fatal)?;
        if out.status.success() {
            Ok(t0.elapsed())
        } else {
            Err(Wait::NotYet(format!(
                "ping {target}: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    })?;
    // Keep pinging through the move from the coordination relay to the ICE path
    // (it happens within the next two seconds or so): nothing may be lost.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ping",
            "-c",
            SWITCH_PINGS,
            "-i",
            "0.05",
            "-W",
            "1",
            &target,
        ])
        .output()
        .context("running ping")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let counts = overlay_tests::overlay::parse_ping_summary(&text)
        .with_context(|| format!("no ping summary in {text:?}"))?;
    Ok((first, counts))
}

/// Waits until both sides show `expect`'s path kind; then the full label must be
/// right. Returns the time since `t0`.
fn wait_settled(
    a: &mut Node,
    b: &mut Node,
    expect: Expect,
    timeout: Duration,
    t0: Instant,
) -> anyhow::Result<Duration> {
    let what = format!("both nodes to show path kind {:?}", expect.kind());
    let (at, a_sees, b_sees) = wait_until(timeout, &what, || {
        a.daemon.alive()?;
        b.daemon.alive()?;
        let (a_sees, b_sees) = (a.view_of(b)?, b.view_of(a)?);
        let kind = expect.kind();
        if a_sees.online && b_sees.online && a_sees.path_kind == kind && b_sees.path_kind == kind {
            Ok((t0.elapsed(), a_sees, b_sees))
        } else {
            Err(Wait::NotYet(format!(
                "a sees {}; b sees {}",
                describe(&a_sees),
                describe(&b_sees)
            )))
        }
    })?;
    if let Err(e) = expect.check(&a_sees).and_then(|()| expect.check(&b_sees)) {
        bail!("the settled path is wrong: {e}");
    }
    Ok(at)
}

#[test]
fn nodes_on_one_lan_go_direct_over_host_candidates() {
    lab_test(|lab| {
        let p = public(lab)?;
        let coord = Coordinator::start(lab, &p.coord_host, p.coord_ip, &[])?;
        let site = lab.nat_site("s", NatKind::Cone, &p.segment)?;
        let (a, _) = lab.site_host(&site, "a1")?;
        let (b, _) = lab.site_host(&site, "b1")?;
        run_row(
            lab,
            &coord,
            Row {
                a_place: "same LAN",
                b_place: "same LAN",
                a,
                b,
                expect: Expect::DirectHost,
                timeout: DIRECT_TIMEOUT,
                a_mapping: Some(MappingBehaviour::EndpointIndependent),
                a_why: Some("packets go straight to b"),
            },
        )
    });
}

#[test]
fn cone_nat_to_cone_nat_punches_a_direct_hole() {
    lab_test(|lab| {
        let p = public(lab)?;
        let coord = Coordinator::start(lab, &p.coord_host, p.coord_ip, &[])?;
        let a = behind_nat(lab, &p, "a", NatKind::Cone, "a1")?;
        let b = behind_nat(lab, &p, "b", NatKind::Cone, "b1")?;
        run_row(
            lab,
            &coord,
            Row {
                a_place: "cone NAT",
                b_place: "cone NAT",
                a,
                b,
                expect: Expect::DirectThroughNat,
                timeout: DIRECT_TIMEOUT,
                a_mapping: Some(MappingBehaviour::EndpointIndependent),
                a_why: Some("packets go straight to b"),
            },
        )
    });
}

#[test]
fn cone_nat_to_public_host_goes_direct() {
    lab_test(|lab| {
        let p = public(lab)?;
        let coord = Coordinator::start(lab, &p.coord_host, p.coord_ip, &[])?;
        let a = behind_nat(lab, &p, "a", NatKind::Cone, "a1")?;
        let (b, _) = public_host(lab, &p, "b")?;
        run_row(
            lab,
            &coord,
            Row {
                a_place: "cone NAT",
                b_place: "public host",
                a,
                b,
                expect: Expect::Direct,
                timeout: DIRECT_TIMEOUT,
                a_mapping: Some(MappingBehaviour::EndpointIndependent),
                a_why: Some("packets go straight to b"),
            },
        )
    });
}

#[test]
fn symmetric_nats_meet_through_the_embedded_turn_server() {
    lab_test(|lab| {
        let p = public(lab)?;
        let coord = Coordinator::start(lab, &p.coord_host, p.coord_ip, &[])?;
        let a = behind_nat(lab, &p, "a", NatKind::Symmetric, "a1")?;
        let b = behind_nat(lab, &p, "b", NatKind::Symmetric, "b1")?;
        run_row(
            lab,
            &coord,
            Row {
                a_place: "symmetric NAT",
                b_place: "symmetric NAT",
                a,
                b,
                expect: Expect::Turn(p.coord_ip),
                timeout: TURN_TIMEOUT,
                a_mapping: Some(MappingBehaviour::EndpointDependent),
                a_why: Some("both sides are behind NATs that change the port per destination; no direct path is possible; using TURN"),
            },
        )
    });
}

#[test]
fn symmetric_nats_meet_through_an_external_coturn() {
    lab_test(|lab| {
        let p = public(lab)?;
        let (turn_host, turn_ip) = public_host(lab, &p, "turn")?;
        let coturn = Coturn::start(lab, &turn_host, turn_ip, COTURN_SECRET)?;
        let coord = coordinator_with_coturn(lab, &p, coturn.ip)?;
        symmetric_pair_over_coturn(lab, &p, &coord, &coturn, "symmetric NAT (coturn)")
    });
}

/// The most common deployment: coturn on the coordinator's own host and address
/// (the coordinator's embedded TURN off). The coordinator starts first, as it
/// may at boot; its netcheck STUN port once took UDP 3478 from coturn, so nodes
/// sent their TURN allocations to a STUN-only responder and never met.
#[test]
fn symmetric_nats_meet_through_coturn_on_the_coordinators_host() {
    lab_test(|lab| {
        let p = public(lab)?;
        let coord = coordinator_with_coturn(lab, &p, p.coord_ip)?;
        let coturn = Coturn::start(lab, &p.coord_host, p.coord_ip, COTURN_SECRET)?;
        symmetric_pair_over_coturn(
            lab,
            &p,
            &coord,
            &coturn,
            "symmetric NAT (coturn beside coord)",
        )
    });
}

/// Starts the coordinator with no TURN of its own, handing out the coturn on
/// `coturn_ip` (which need not run yet).
fn coordinator_with_coturn(
    lab: &Lab,
    p: &Public,
    coturn_ip: Ipv4Addr,
) -> anyhow::Result<Coordinator> {
    let config = lab.dir().join("coord-coturn.toml");
    std::fs::write(
        &config,
        format!(
            "[turn]\nembedded = false\nsecret = \"{COTURN_SECRET}\"\n\n\
             [[turn.external]]\nurls = [\"{}\", \"{}\"]\n",
            coturn::stun_url(coturn_ip),
            coturn::turn_url(coturn_ip)
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let config = config.to_string_lossy().into_owned();
    Coordinator::start(lab, &p.coord_host, p.coord_ip, &["--config", &config])
}

/// Two nodes behind symmetric NATs settle on TURN via `coturn`, and coturn's log
/// shows the allocation.
fn symmetric_pair_over_coturn(
    lab: &Lab,
    p: &Public,
    coord: &Coordinator,
    coturn: &Coturn,
    b_place: &str,
) -> anyhow::Result<()> {
    let a = behind_nat(lab, p, "a", NatKind::Symmetric, "a1")?;
    let b = behind_nat(lab, p, "b", NatKind::Symmetric, "b1")?;
    run_row(
        lab,
        coord,
        Row {
            a_place: "symmetric NAT",
            b_place,
            a,
            b,
            expect: Expect::Turn(coturn.ip),
            timeout: TURN_TIMEOUT,
            a_mapping: Some(MappingBehaviour::EndpointDependent),
            a_why: Some("both sides are behind NATs that change the port per destination; no direct path is possible; using TURN"),
        },
    )?;
    ensure!(
        coturn.proc.log().contains("ALLOCATE"),
        "the mesh used TURN, yet coturn's log shows no allocation"
    );
    Ok(())
}

#[test]
fn udp_blocked_site_falls_back_to_the_coordination_relay() {
    lab_test(|lab| {
        let p = public(lab)?;
        let coord = Coordinator::start(lab, &p.coord_host, p.coord_ip, &[])?;
        let a = behind_nat(lab, &p, "a", NatKind::UdpBlocked, "a1")?;
        let b = behind_nat(lab, &p, "b", NatKind::Cone, "b1")?;
        run_row(
            lab,
            &coord,
            Row {
                a_place: "UDP blocked",
                b_place: "cone NAT",
                a,
                b,
                expect: Expect::CoordRelay,
                timeout: DIRECT_TIMEOUT,
                a_mapping: Some(MappingBehaviour::NoUdp),
                a_why: Some("this node gets no UDP out"),
            },
        )
    });
}

/// The lab's cone NAT must stay endpoint-independent in the race every hole punch
/// starts with: the peer's first probe reaches the router before the site host has
/// sent anything to that peer. (Without the router's `input` filter, conntrack kept
/// that dropped probe and masquerade then gave the host's packet to the peer a new
/// port, so two cone sites could never punch a hole.)
#[test]
fn cone_nat_keeps_its_mapping_when_the_peer_probes_first() {
    lab_test(|lab| {
        let public = lab.segment("public", PUBLIC_SUBNET)?;
        let site = lab.nat_site("a", NatKind::Cone, &public)?;
        let (a1, _) = lab.site_host(&site, "a1")?;
        let peer = lab.host("peer")?;
        let peer_ip = lab.attach(&peer, &public)?.ip;
        let mapped = format!("{}:{PUNCH_INSIDE_PORT}", site.wan.ip);

        let early = lab.output(&peer, PROBE, &["send", PUNCH_PEER_PORT, &mapped])?;
        ensure!(
            early.status.code() == Some(2),
            "the peer's unsolicited probe to {mapped} was answered: {}",
            String::from_utf8_lossy(&early.stdout)
        );

        let listen = format!("{peer_ip}:{PUNCH_PEER_PORT}");
        let mut cmd = Command::new(PROBE);
        cmd.args(["serve", &listen]);
        let mut server = lab.spawn(&peer, "probe-peer", cmd)?;
        server.wait_for_log("ready on", Duration::from_secs(10))?;
        let out = lab.output(&a1, PROBE, &["send", PUNCH_INSIDE_PORT, &listen])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let seen = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{listen} ")))
            .with_context(|| format!("no answer line from {listen} in {text:?}"))?;
        ensure!(
            seen == mapped,
            "a1's packet to the peer that probed first left as {seen}, not as {mapped}: \
             the cone NAT remapped the port"
        );
        Ok(())
    });
}
