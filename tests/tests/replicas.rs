//! Three coordinator replicas behind one database and one NATS bus, nodes
//! spread across them (each node lists a different replica first):
//! paths, relay, enrolment and removal work across replicas as within one.
//!
//! ```text
//!   bus (nats-server :4222)   r1   r2   r3   (overlay-coord serve --bus, one shared store)
//!     │                        │    │    │
//!   ──┴────────────── public 203.0.113.0/24 ─┴──┬──────────┬──────────┬────
//!                                  a (public) b (public)  cgw (no UDP) dgw (no UDP)
//!                                                            │          │
//!                                                            c          d
//! ```
//!
//! The store is a PostgreSQL the test starts (`overlay_tests::postgres`, on a
//! unix socket every namespace reaches); with `OVERLAY_TEST_POSTGRES=skip`
//! and no PostgreSQL installed, one SQLite file the three open together.
//! Needs root, `nats-server`, `postgresql`, and `cargo build --workspace` first.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use overlay_proto::api::PathKind;
use overlay_tests::nats::Nats;
use overlay_tests::overlay::COORD_PORT;
use overlay_tests::postgres::{self, Postgres};
use overlay_tests::{
    bin, fatal, lab_test, ping_lossless, wait_path, wait_until, Coordinator, Daemon, Host, Lab,
    NatKind, Node, Segment, Wait,
};

const PUBLIC_SUBNET: &str = "203.0.113.0/24";
/// How long a pair may take to reach its path.
const PATH_TIMEOUT: Duration = Duration::from_secs(40);
/// The issue's bound: a removal closes the node's session on another replica.
const REMOVAL_BOUND: Duration = Duration::from_secs(1);
/// A node enrolled on one replica must be seen on the others this soon.
const ENROL_SEEN_BOUND: Duration = Duration::from_secs(3);
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The public segment, the bus and three replicas sharing one store.
struct Deployment {
    segment: Segment,
    upstream: Ipv4Addr,
    /// `--database` of every replica and admin command (`None`: the shared
    /// SQLite file in the replicas' common state directory).
    database: Option<String>,
    // Dropped in order: replicas before the bus and the database.
    replicas: Vec<Coordinator>,
    nats: Nats,
    _pg: Option<Arc<Postgres>>,
}

impl Deployment {
    fn start(lab: &Lab) -> anyhow::Result<Deployment> {
        let segment = lab.segment("public", PUBLIC_SUBNET)?;
        let upstream = lab.upstream(&segment)?.ip;
        let bus_host = lab.host("bus")?;
        let bus_ip = lab.attach(&bus_host, &segment)?.ip;
        let nats = Nats::start(lab, &bus_host, bus_ip)?;
        let pg = postgres::require("replicas");
        let database = pg.as_ref().map(|pg| pg.create_database()).transpose()?;
        let shared_dir = lab.subdir("shared-store")?;
        let mut replicas = Vec::new();
        // One after the other: the first creates the store (and TURN secret).
        for i in 1..=3 {
            let host = lab.host(&format!("r{i}"))?;
            let ip = lab.attach(&host, &segment)?.ip;
            lab.default_route(&host, upstream)?;
            let state_dir = match database {
                Some(_) => lab.subdir(&format!("r{i}-state"))?,
                None => shared_dir.clone(),
            };
            let bus = nats.url();
            let r = start_replica(lab, &host, ip, &state_dir, database.as_deref(), &bus)?;
            replicas.push(r);
        }
        let d = Deployment {
            segment,
            upstream,
            database,
            replicas,
            nats,
            _pg: pg,
        };
        for r in &d.replicas {
            wait_until(
                START_TIMEOUT,
                "every replica to hear the two others",
                || {
                    let health = healthz(lab, r)?;
                    if health.contains("bus: connected, 2 other replicas") {
                        Ok(())
                    } else {
                        Err(Wait::NotYet(health))
                    }
                },
            )?;
        }
        Ok(d)
    }

    /// `--coordinator` for a node that starts on replica `first` (0-based)
    /// and fails over to the others.
    fn urls_from(&self, first: usize) -> String {
        let n = self.replicas.len();
        (0..n)
            .map(|i| self.replicas[(first + i) % n].url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// An admin command against the shared store, from replica `r`'s host.
    fn admin(&self, lab: &Lab, r: usize, args: &[&str]) -> anyhow::Result<String> {
        let replica = &self.replicas[r];
        let mut cmd = lab.command(&replica.host, bin("overlay-coord")?);
        cmd.args(args).arg("--state-dir").arg(&replica.state_dir);
        if let Some(db) = &self.database {
            cmd.args(["--database", db]);
        }
        overlay_tests::process::checked(&mut cmd)
    }

    fn create_key(&self, lab: &Lab) -> anyhow::Result<String> {
        let out = self.admin(lab, 0, &["keys", "create", "--reusable"])?;
        Ok(out.trim().to_owned())
    }

    fn public_host(&self, lab: &Lab, name: &str) -> anyhow::Result<Host> {
        let host = lab.host(name)?;
        lab.attach(&host, &self.segment)?;
        lab.default_route(&host, self.upstream)?;
        Ok(host)
    }

    fn udp_blocked_host(&self, lab: &Lab, name: &str) -> anyhow::Result<Host> {
        let site = lab.nat_site(&format!("{name}gw"), NatKind::UdpBlocked, &self.segment)?;
        Ok(lab.site_host(&site, name)?.0)
    }
}

/// `overlay-coord serve` on `host` as one replica: the shared store, the bus.
fn start_replica(
    lab: &Lab,
    host: &Host,
    ip: Ipv4Addr,
    state_dir: &Path,
    database: Option<&str>,
    bus: &str,
) -> anyhow::Result<Coordinator> {
    let mut extra = vec!["--bus", bus];
    if let Some(db) = database {
        extra.extend(["--database", db]);
    }
    Coordinator::start_in(lab, host, ip, state_dir.to_path_buf(), &extra)
}

/// `GET path` of a replica from its own host (bash's /dev/tcp: no HTTP
/// client needed); the body, whatever the status.
fn http_get(lab: &Lab, r: &Coordinator, path: &str) -> anyhow::Result<String> {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{COORD_PORT} && printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3 && timeout 5 cat <&3",
        r.ip
    );
    let out = lab.output(&r.host, "bash", &["-c", &script])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (_, body) = text.split_once("\r\n\r\n").context("no HTTP head")?;
    Ok(body.to_string())
}

fn healthz(lab: &Lab, r: &Coordinator) -> anyhow::Result<String> {
    http_get(lab, r, "/healthz")
}

/// Enrols and starts a node on `host` that talks to `urls` (first one first).
fn node(lab: &Lab, host: &Host, name: &str, urls: &str, key: &str) -> anyhow::Result<Node> {
    let mut daemon = Daemon::new(lab, host, name, urls)?;
    daemon.start(lab, Some(key))?;
    let status = daemon.wait_ready()?;
    Ok(Node {
        host: host.clone(),
        daemon,
        mesh_ip: status.mesh_ip,
    })
}

/// Waits until `node` is connected to the replica at `url`.
fn connected_to(node: &Node, url: &str) -> anyhow::Result<()> {
    let what = format!("{} to be connected to {url}", node.daemon.name);
    wait_until(START_TIMEOUT, &what, || {
        let s = node.daemon.status()?;
        if s.coordinator_connected && s.coordinator == url {
            Ok(())
        } else {
            Err(Wait::NotYet(format!(
                "at {} (connected: {})",
                s.coordinator, s.coordinator_connected
            )))
        }
    })
}

/// Waits until `node` lists `peer` online; returns how long it took.
fn sees_online(node: &Node, peer: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let what = format!("{} to see {peer} online", node.daemon.name);
    wait_until(timeout, &what, || {
        let peers = node.daemon.peers()?;
        match peers.iter().find(|p| p.name == peer) {
            Some(p) if p.online => Ok(()),
            Some(_) => Err(Wait::NotYet(format!("{peer} listed offline"))),
            None => Err(Wait::NotYet(format!("{peer} not listed"))),
        }
    })?;
    Ok(started.elapsed())
}

#[test]
fn nodes_on_different_replicas_find_a_direct_path_or_share_the_relay() {
    lab_test(|lab| {
        let dep = Deployment::start(lab)?;
        let key = dep.create_key(lab)?;
        let (ha, hb) = (dep.public_host(lab, "a")?, dep.public_host(lab, "b")?);
        let (hc, hd) = (
            dep.udp_blocked_host(lab, "c")?,
            dep.udp_blocked_host(lab, "d")?,
        );
        let mut a = node(lab, &ha, "a", &dep.urls_from(0), &key)?;
        let b = node(lab, &hb, "b", &dep.urls_from(1), &key)?;
        let mut c = node(lab, &hc, "c", &dep.urls_from(1), &key)?;
        let d = node(lab, &hd, "d", &dep.urls_from(2), &key)?;
        connected_to(&a, &dep.replicas[0].url)?;
        connected_to(&b, &dep.replicas[1].url)?;
        connected_to(&c, &dep.replicas[1].url)?;
        connected_to(&d, &dep.replicas[2].url)?;

        // Signaling crosses the bus: a (r1) and b (r2) punch a direct path.
        let took = wait_path(&mut a.daemon, "b", PathKind::Direct, PATH_TIMEOUT)?;
        eprintln!(
            "REPLICAS | a (r1) ↔ b (r2) direct after {:.1} s",
            took.as_secs_f64()
        );
        ping_lossless(lab, &a, &b)?;
        ping_lossless(lab, &b, &a)?;

        // No UDP on either side: the coordination relay, r2 → bus → r3.
        let took = wait_path(&mut c.daemon, "d", PathKind::CoordRelay, PATH_TIMEOUT)?;
        eprintln!(
            "REPLICAS | c (r2) ↔ d (r3) coord relay after {:.1} s",
            took.as_secs_f64()
        );
        ping_lossless(lab, &c, &d)?;
        ping_lossless(lab, &d, &c)?;
        let metrics = http_get(lab, &dep.replicas[1], "/metrics")?;
        let relayed = metrics
            .lines()
            .find_map(|l| l.strip_prefix("overlay_coord_bus_relay_frames_out_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .context("no overlay_coord_bus_relay_frames_out_total in r2's /metrics")?;
        ensure!(relayed >= 20, "r2 sent {relayed} relay frames over the bus");
        Ok(())
    });
}

#[test]
fn enrolment_and_removal_reach_every_replica() {
    lab_test(|lab| {
        let dep = Deployment::start(lab)?;
        let key = dep.create_key(lab)?;
        let a = node(
            lab,
            &dep.public_host(lab, "a")?,
            "a",
            &dep.urls_from(0),
            &key,
        )?;
        let b = node(
            lab,
            &dep.public_host(lab, "b")?,
            "b",
            &dep.urls_from(1),
            &key,
        )?;
        connected_to(&a, &dep.replicas[0].url)?;
        connected_to(&b, &dep.replicas[1].url)?;
        sees_online(&a, "b", START_TIMEOUT)?;

        // e enrols through r3: a (r1) and b (r2) see it online promptly.
        let he = dep.public_host(lab, "e")?;
        let e = node(lab, &he, "e", &dep.urls_from(2), &key)?;
        connected_to(&e, &dep.replicas[2].url)?;
        let online = Instant::now();
        for n in [&a, &b] {
            sees_online(n, "e", ENROL_SEEN_BOUND)?;
        }
        eprintln!(
            "REPLICAS | e enrolled and online on r3, seen online on r1 and r2 within {} ms",
            online.elapsed().as_millis()
        );
        ping_lossless(lab, &a, &e)?;

        // The CLI removes e in the shared store from r1's host; r3 closes its session.
        let removing = Instant::now();
        dep.admin(lab, 0, &["nodes", "remove", "e"])?;
        let proc = e
            .daemon
            .proc
            .as_ref()
            .context("e's daemon is not running")?;
        wait_until(Duration::from_secs(5), "e's session to be closed", || {
            if proc.log().contains("node removed by an administrator") {
                Ok(())
            } else {
                Err(Wait::NotYet("e's daemon has not been told".into()))
            }
        })?;
        let closed = removing.elapsed();
        eprintln!(
            "REPLICAS | nodes remove on r1's host → e's session on r3 closed in {} ms",
            closed.as_millis()
        );
        ensure!(
            closed <= REMOVAL_BOUND,
            "e's session closed {closed:?} after the removal (bound {REMOVAL_BOUND:?})"
        );
        for n in [&a, &b] {
            wait_until(
                Duration::from_secs(5),
                &format!("{} to drop e", n.daemon.name),
                || {
                    if n.daemon.peers()?.iter().any(|p| p.name == "e") {
                        Err(Wait::NotYet("e still listed".into()))
                    } else {
                        Ok(())
                    }
                },
            )?;
        }
        Ok(())
    });
}

/// The issue's bound for a killed replica's nodes to be back, and for
/// relayed pairs to resume.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);

/// Waits until `node` is connected to a replica other than `dead`; returns
/// how long after `since` it was seen there.
fn moved_off(node: &Node, dead: &str, since: Instant) -> anyhow::Result<Duration> {
    let what = format!("{} to reconnect to another replica", node.daemon.name);
    wait_until(FAILOVER_BOUND * 2, &what, || {
        let s = node.daemon.status()?;
        if s.coordinator_connected && s.coordinator != dead {
            Ok(since.elapsed())
        } else {
            Err(Wait::NotYet(format!(
                "at {} (connected: {})",
                s.coordinator, s.coordinator_connected
            )))
        }
    })
}

#[test]
fn a_killed_replicas_nodes_move_to_the_others_and_keep_their_paths() {
    lab_test(|lab| {
        let mut dep = Deployment::start(lab)?;
        let key = dep.create_key(lab)?;
        let (ha, hb) = (dep.public_host(lab, "a")?, dep.public_host(lab, "b")?);
        let (hc, hd) = (
            dep.udp_blocked_host(lab, "c")?,
            dep.udp_blocked_host(lab, "d")?,
        );
        // a and c on r1, which is killed; b and d on r2.
        let mut a = node(lab, &ha, "a", &dep.urls_from(0), &key)?;
        let b = node(lab, &hb, "b", &dep.urls_from(1), &key)?;
        let mut c = node(lab, &hc, "c", &dep.urls_from(0), &key)?;
        let d = node(lab, &hd, "d", &dep.urls_from(1), &key)?;
        connected_to(&a, &dep.replicas[0].url)?;
        connected_to(&c, &dep.replicas[0].url)?;
        wait_path(&mut a.daemon, "b", PathKind::Direct, PATH_TIMEOUT)?;
        wait_path(&mut c.daemon, "d", PathKind::CoordRelay, PATH_TIMEOUT)?;
        ping_lossless(lab, &c, &d)?;

        let dead = dep.replicas[0].url.clone();
        let b_ip = b.mesh_ip.to_string();
        let a_ns = a.host.ns.clone();
        let (pings, moves, relay_back) = std::thread::scope(|scope| {
            // 12 s of pings a → b across the kill, on the direct path.
            let pinger = scope.spawn(move || {
                Command::new("ip")
                    .args(["netns", "exec", &a_ns, "ping", "-c", "120", "-i", "0.1"])
                    .args(["-W", "1", &b_ip])
                    .output()
            });
            let killed = Instant::now();
            let result = (|| {
                overlay_tests::process::signal(dep.replicas[0].proc.pid(), "KILL")?;
                let moves = (moved_off(&a, &dead, killed)?, moved_off(&c, &dead, killed)?);
                let d_ip = d.mesh_ip.to_string();
                let back = wait_until(FAILOVER_BOUND * 2, "c → d over the relay again", || {
                    let out = lab.output(&c.host, "ping", &["-c", "1", "-W", "1", &d_ip])?;
                    if out.status.success() {
                        Ok(killed.elapsed())
                    } else {
                        Err(Wait::NotYet("no answer".into()))
                    }
                })?;
                anyhow::Ok((moves, back))
            })();
            let pings = pinger
                .join()
                .map_err(|_| anyhow::anyhow!("the ping thread panicked"))
                .and_then(|out| Ok(out?));
            result.map(|(moves, back)| (pings, moves, back))
        })?;
        let out = pings?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (sent, received) = overlay_tests::overlay::parse_ping_summary(&text)
            .with_context(|| format!("no ping summary in {text:?}"))?;
        eprintln!(
            "REPLICAS | r1 killed: a back on a replica after {} ms, c after {} ms; c → d relay answered after {} ms; a → b direct: {received} of {sent} pings answered",
            moves.0.as_millis(),
            moves.1.as_millis(),
            relay_back.as_millis()
        );
        ensure!(
            sent == 120 && received == sent,
            "a → b lost pings across the kill: {received} of {sent}"
        );
        ensure!(
            moves.0 <= FAILOVER_BOUND && moves.1 <= FAILOVER_BOUND,
            "reconnecting took {moves:?} (bound {FAILOVER_BOUND:?})"
        );
        ensure!(
            relay_back <= FAILOVER_BOUND,
            "the relay resumed {relay_back:?} after the kill (bound {FAILOVER_BOUND:?})"
        );
        ping_lossless(lab, &c, &d)?;
        // Both moved within the grace holding a current netmap: the replicas
        // they reached told them to keep it instead of sending it again.
        let mut resumed = 0;
        for replica in &dep.replicas[1..] {
            let metrics = http_get(lab, replica, "/metrics")?;
            resumed += metrics
                .lines()
                .find_map(|l| l.strip_prefix("overlay_coord_netmap_resumed_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .context("no overlay_coord_netmap_resumed_total in /metrics")?;
        }
        ensure!(
            resumed >= 2,
            "{resumed} of the 2 moved nodes resumed their netmap (overlay_coord_netmap_resumed_total)"
        );

        // Enrolled afterwards on r3: every node sees it.
        let killed_replica = dep.replicas.remove(0);
        drop(killed_replica);
        let f = node(
            lab,
            &dep.public_host(lab, "f")?,
            "f",
            &dep.urls_from(1),
            &key,
        )?;
        for n in [&a, &b, &c, &d] {
            sees_online(n, "f", ENROL_SEEN_BOUND)?;
        }
        drop(f);
        Ok(())
    });
}

/// Waits until every replica's `/healthz` contains `want`.
fn all_healthz(lab: &Lab, dep: &Deployment, want: &str) -> anyhow::Result<()> {
    for r in &dep.replicas {
        wait_until(
            START_TIMEOUT,
            &format!("{} /healthz: {want}", r.host.name),
            || {
                let health = healthz(lab, r)?;
                if health.contains(want) {
                    Ok(())
                } else {
                    Err(Wait::NotYet(health))
                }
            },
        )?;
    }
    Ok(())
}

#[test]
fn without_the_bus_each_replica_serves_its_own_nodes_and_all_catch_up_after() {
    lab_test(|lab| {
        let mut dep = Deployment::start(lab)?;
        let key = dep.create_key(lab)?;
        // a and b on r1, c on r2: none has UDP, so all goes through the relay.
        let (ha, hb, hc) = (
            dep.udp_blocked_host(lab, "a")?,
            dep.udp_blocked_host(lab, "b")?,
            dep.udp_blocked_host(lab, "c")?,
        );
        let mut a = node(lab, &ha, "a", &dep.urls_from(0), &key)?;
        let b = node(lab, &hb, "b", &dep.urls_from(0), &key)?;
        let mut c = node(lab, &hc, "c", &dep.urls_from(1), &key)?;
        connected_to(&a, &dep.replicas[0].url)?;
        connected_to(&b, &dep.replicas[0].url)?;
        connected_to(&c, &dep.replicas[1].url)?;
        wait_path(&mut a.daemon, "b", PathKind::CoordRelay, PATH_TIMEOUT)?;
        wait_path(&mut c.daemon, "a", PathKind::CoordRelay, PATH_TIMEOUT)?;
        ping_lossless(lab, &c, &a)?;

        // The bus goes away: r1 says so, and still relays between its own nodes.
        dep.nats.proc.stop()?;
        all_healthz(lab, &dep, "bus: disconnected")?;
        let health = healthz(lab, &dep.replicas[0])?;
        ensure!(health.starts_with("degraded\n"), "r1 /healthz: {health}");
        ping_lossless(lab, &a, &b)?;
        ping_lossless(lab, &b, &a)?;
        let lost = Instant::now();
        wait_until(START_TIMEOUT, "a to show c offline", || {
            match a.daemon.peers()?.iter().find(|p| p.name == "c") {
                Some(p) if !p.online => Ok(()),
                Some(_) => Err(Wait::NotYet("c still online".into())),
                None => Err(fatal(anyhow::anyhow!("a lost c from its netmap"))),
            }
        })?;
        eprintln!(
            "REPLICAS | bus down: a (r1) shows c (r2) offline after {} ms",
            lost.elapsed().as_millis()
        );
        // Enrolled meanwhile through r2: r1 learns of it from the store later.
        let e = node(
            lab,
            &dep.public_host(lab, "e")?,
            "e",
            &dep.urls_from(1),
            &key,
        )?;
        connected_to(&e, &dep.replicas[1].url)?;

        // The bus is back: the replicas find each other and catch up.
        let (host, ip) = (dep.nats.host.clone(), dep.nats.ip);
        let back = Instant::now();
        dep.nats = Nats::start(lab, &host, ip)?;
        all_healthz(lab, &dep, "bus: connected, 2 other replicas")?;
        sees_online(&a, "c", START_TIMEOUT)?;
        sees_online(&a, "e", START_TIMEOUT)?;
        eprintln!(
            "REPLICAS | bus back: a (r1) sees c and e (enrolled on r2 meanwhile) online {} ms after nats-server restarted",
            back.elapsed().as_millis()
        );
        wait_until(START_TIMEOUT, "c → a over the relay again", || {
            let out = lab.output(
                &c.host,
                "ping",
                &["-c", "1", "-W", "1", &a.mesh_ip.to_string()],
            )?;
            if out.status.success() {
                Ok(())
            } else {
                Err(Wait::NotYet("no answer".into()))
            }
        })?;
        ping_lossless(lab, &c, &a)?;
        ping_lossless(lab, &a, &c)?;
        drop(e);
        Ok(())
    });
}
