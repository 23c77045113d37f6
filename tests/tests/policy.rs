//! Access policy end to end (issue #10): four nodes on one LAN, a policy set
//! with `overlay-coord policy set`, and what each node can then open.
//!
//! ```text
//!   coord (.1)   dev1 (.2)     srv1 (.3)        srv2 (.4)        other (.5)
//!                group dev     tag server       tag server       untagged
//!      └────────────┴─────────────┴────────────────┴────────────────┴──── 10.77.21.0/24
//! ```
//!
//! Policy: `dev` → `server` tcp/22 and icmp; `server` → `server` anything.
//! Shown: dev1 opens TCP 22 on srv1 and gets its answer; TCP 80 does not
//! connect and srv1 counts the drop (dev1 runs with its sender-side filter
//! off, as a modified node could, so this is srv1's own enforcement); srv1 cannot open a connection (nor a
//! ping) to dev1; `other` sees no peers and nobody sees it; the servers ping
//! each other. Then: a policy change opens TCP 80 within 1 s without a
//! restart; a bad file and a file whose test fails are refused and the old
//! policy stays; tagging `other` as a server and removing srv2 change
//! filters and netmaps within 1 s.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use overlay_tests::overlay::ping;
use overlay_tests::{lab_test, wait_until, Coordinator, Daemon, Host, Lab, Proc, Wait};

/// The lab's TCP/UDP answering probe (`tests/src/bin/udp_probe.rs`).
const PROBE: &str = env!("CARGO_BIN_EXE_udp_probe");
/// How long fresh nodes on one LAN may take to see each other and settle.
const SETTLE: Duration = Duration::from_secs(30);
/// The daemon's test hook that turns off its sender-side filter.
const SENDER_FILTER_ENV: &str = "OVERLAY_SENDER_FILTER";
/// One quick TCP attempt while waiting for a change to apply: a LAN
/// handshake through the mesh takes a few milliseconds.
const QUICK_TCP: Duration = Duration::from_millis(200);
/// What the issue promises for a policy, tag or membership change to reach
/// every affected node, measured from the admin command's return.
const PROPAGATION: Duration = Duration::from_secs(1);
/// New flows in the flood: far more than a peer may have.
const FLOOD_PORTS: u32 = 100_000;
/// The flows one peer may have in a node's filter (`dataplane::filter::PEER_FLOWS`).
const PEER_FLOW_CAP: u64 = 4_096;

const POLICY: &str = r#"
# dev may ssh to and ping the servers; servers talk to each other freely.
[groups]
dev = ["dev1"]

[[allow]]
src = ["group:dev"]
dst = ["tag:server"]
proto = "tcp"
ports = ["22"]

[[allow]]
src = ["group:dev"]
dst = ["tag:server"]
proto = "icmp"

[[allow]]
src = ["tag:server"]
dst = ["tag:server"]

[[test]]
src = "dev1"
accept = ["tag:server:22/tcp", "tag:server/icmp"]
deny = ["tag:server:80/tcp"]
"#;

/// [`POLICY`] with TCP 80 opened for `dev` as well.
fn policy_with_web() -> String {
    POLICY
        .replace(r#"ports = ["22"]"#, r#"ports = ["22", "80"]"#)
        .replace(
            r#"deny = ["tag:server:80/tcp"]"#,
            r#"deny = ["tag:server:443/tcp"]"#,
        )
}

struct Mesh {
    coord: Coordinator,
    dev1: Daemon,
    srv1: Daemon,
    srv2: Daemon,
    other: Daemon,
}

fn node(lab: &Lab, lan: &overlay_tests::Segment, name: &str) -> anyhow::Result<(Host, Ipv4Addr)> {
    let host = lab.host(name)?;
    let ip = lab.attach(&host, lan)?.ip;
    Ok((host, ip))
}

fn start(lab: &Lab) -> anyhow::Result<Mesh> {
    let lan = lab.segment("lan", "10.77.21.0/24")?;
    let (coord_host, coord_ip) = node(lab, &lan, "coord")?;
    let coord = Coordinator::start(lab, &coord_host, coord_ip, &[])?;
    let plain = coord.create_key(lab)?;
    let server = coord
        .admin(lab, &["keys", "create", "--reusable", "--tag", "server"])?
        .trim()
        .to_string();
    let mut daemons = Vec::new();
    for (name, key) in [
        ("dev1", &plain),
        ("srv1", &server),
        ("srv2", &server),
        ("other", &plain),
    ] {
        let (host, _) = node(lab, &lan, name)?;
        let mut d = Daemon::new(lab, &host, name, &coord.url)?;
        if name == "dev1" {
            // dev1 sends what its policy would drop, as a modified node
            // could: what srv1 then refuses is srv1's own enforcement.
            d.extra_env = vec![(SENDER_FILTER_ENV.into(), "off".into())];
        }
        d.start(lab, Some(key))?;
        daemons.push(d);
    }
    let other = daemons.pop().context("other")?;
    let srv2 = daemons.pop().context("srv2")?;
    let srv1 = daemons.pop().context("srv1")?;
    let dev1 = daemons.pop().context("dev1")?;
    Ok(Mesh {
        coord,
        dev1,
        srv1,
        srv2,
        other,
    })
}

/// The names `d` lists in `overlayctl peers`, sorted.
fn peer_names(d: &Daemon) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = d.peers()?.into_iter().map(|p| p.name).collect();
    names.sort();
    Ok(names)
}

/// Waits until `d` lists exactly `want` (sorted names).
fn wait_peers(d: &Daemon, want: &[&str], within: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    wait_until(
        within,
        &format!("{} to list exactly {want:?}", d.name),
        || {
            let names = peer_names(d)?;
            if names == want {
                Ok(())
            } else {
                Err(Wait::NotYet(format!("lists {names:?}")))
            }
        },
    )?;
    Ok(t0.elapsed())
}

/// `overlayctl status --json` as JSON, for the counters this test reads.
fn status_json(d: &Daemon) -> anyhow::Result<serde_json::Value> {
    d.ctl_json(&["status"])
}

/// Packets `d` dropped because the policy refused them, received and sent.
fn policy_drops(d: &Daemon) -> anyhow::Result<(u64, u64)> {
    let (inbound, outbound, _) = policy_counters(d)?;
    Ok((inbound, outbound))
}

/// `d`'s policy counters: refused in, refused out, passed but not recorded
/// because the flow table was full.
fn policy_counters(d: &Daemon) -> anyhow::Result<(u64, u64, u64)> {
    let s = status_json(d)?;
    let dropped = &s["dropped"];
    let get = |field: &str| {
        dropped[field]
            .as_u64()
            .with_context(|| format!("no dropped.{field} in {}'s status: {s}", d.name))
    };
    Ok((get("policy")?, get("policy_out")?, get("flow_table_full")?))
}

/// A TCP (and UDP) answering probe on `ip:port` inside `host`.
fn serve(lab: &Lab, host: &Host, ip: Ipv4Addr, port: u16) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(PROBE);
    cmd.arg("serve").arg(format!("{ip}:{port}"));
    let proc = lab.spawn(host, &format!("probe-{}-{port}", host.name), cmd)?;
    let port_text = port.to_string();
    wait_until(Duration::from_secs(10), "the probe to listen", || {
        if overlay_tests::overlay::tcp_listening(lab, host, &port_text)? {
            Ok(())
        } else {
            Err(Wait::NotYet("not listening yet".into()))
        }
    })?;
    Ok(proc)
}

/// Whether one TCP connection from `host` to `ip:port` is answered (the probe
/// gives up after 3 s).
fn tcp_opens(lab: &Lab, host: &Host, ip: Ipv4Addr, port: u16) -> anyhow::Result<bool> {
    tcp_opens_within(lab, host, ip, port, Duration::from_secs(3))
}

fn tcp_opens_within(
    lab: &Lab,
    host: &Host,
    ip: Ipv4Addr,
    port: u16,
    wait: Duration,
) -> anyhow::Result<bool> {
    let target = format!("{ip}:{port}");
    let wait = wait.as_millis().to_string();
    let out = lab.output(host, PROBE, &["tcp", &target, &wait])?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(2) => Ok(false),
        _ => bail!(
            "udp_probe tcp {target} from {}: {:?} {}",
            host.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Whether one ping from `host` to `ip` is answered within 2 s.
fn pings(lab: &Lab, host: &Host, ip: Ipv4Addr) -> anyhow::Result<bool> {
    let (_, received) = ping(lab, host, ip, &["-c", "1", "-W", "2"])?;
    Ok(received == 1)
}

/// Waits until a TCP connection from `host` to `ip:port` opens, trying with
/// quick attempts; returns how long that took.
fn wait_tcp(
    lab: &Lab,
    host: &Host,
    ip: Ipv4Addr,
    port: u16,
    within: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    wait_until(within, &format!("TCP {ip}:{port} to open"), || {
        if tcp_opens_within(lab, host, ip, port, QUICK_TCP)? {
            Ok(())
        } else {
            Err(Wait::NotYet("not answered".into()))
        }
    })?;
    Ok(t0.elapsed())
}

fn write_policy(lab: &Lab, name: &str, text: &str) -> anyhow::Result<String> {
    let path = lab.dir().join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path.display().to_string())
}

/// Runs `overlay-coord ARGS` and returns its exit success and combined output.
fn admin_outcome(lab: &Lab, coord: &Coordinator, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let program = overlay_tests::bin("overlay-coord")?;
    let mut cmd = lab.command(&coord.host, program);
    cmd.args(args).arg("--state-dir").arg(&coord.state_dir);
    let out = overlay_tests::process::output(&mut cmd)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn policy_decides_who_reaches_what_and_changes_apply_within_a_second() {
    lab_test(|lab| {
        let m = start(lab)?;
        let ip = |d: &Daemon| d.status().map(|s| s.mesh_ip);
        let (dev1_ip, srv1_ip, srv2_ip, other_ip) =
            (ip(&m.dev1)?, ip(&m.srv1)?, ip(&m.srv2)?, ip(&m.other)?);

        // No policy: everyone sees everyone (today's behaviour).
        wait_peers(&m.dev1, &["other", "srv1", "srv2"], SETTLE)?;
        wait_peers(&m.other, &["dev1", "srv1", "srv2"], SETTLE)?;

        let ssh = serve(lab, &m.srv1.host, srv1_ip, 22)?;
        let web = serve(lab, &m.srv1.host, srv1_ip, 80)?;
        let dev_port = serve(lab, &m.dev1.host, dev1_ip, 2222)?;
        wait_tcp(lab, &m.dev1.host, srv1_ip, 80, SETTLE)?;

        // The policy, with its tests, is accepted; `policy get` gives it back.
        let file = write_policy(lab, "policy.toml", POLICY)?;
        let checked = m.coord.admin(lab, &["policy", "check", &file])?;
        println!("policy check: {}", checked.trim());
        m.coord.admin(lab, &["policy", "set", &file])?;
        let set_at = Instant::now();
        let stored = m.coord.admin(lab, &["policy", "get"])?;
        ensure!(
            stored.trim() == POLICY.trim(),
            "policy get printed {stored:?}"
        );

        // Visibility: `other` is in no rule, so it sees nobody and nobody sees it.
        let hidden = wait_peers(&m.other, &[], PROPAGATION)?;
        wait_peers(&m.dev1, &["srv1", "srv2"], PROPAGATION)?;
        wait_peers(&m.srv1, &["dev1", "srv2"], PROPAGATION)?;
        println!(
            "policy set → other sees no peers after {hidden:?} ({:?} since set)",
            set_at.elapsed()
        );

        // Seeing it: what srv1 enforces, why `other` cannot reach srv1, and
        // which rule lets dev1 in.
        let rules = String::from_utf8_lossy(&m.srv1.ctl(&["policy"])?.stdout).into_owned();
        ensure!(
            rules.contains("tag:server") && rules.contains("dev1"),
            "overlayctl policy on srv1: {rules}"
        );
        let why = m.other.ctl(&["why", "srv1"])?;
        let why_text = String::from_utf8_lossy(&why.stderr);
        ensure!(
            !why.status.success() && why_text.contains("access policy"),
            "overlayctl why srv1 on other: {why_text}"
        );
        let explained = m
            .coord
            .admin(lab, &["policy", "explain", "dev1", "srv1", "22/tcp"])?;
        ensure!(
            explained.contains("allow[0]"),
            "policy explain: {explained}"
        );
        let (ok, denied) = admin_outcome(
            lab,
            &m.coord,
            &["policy", "explain", "dev1", "srv1", "80/tcp"],
        )?;
        ensure!(
            denied.contains("denied"),
            "policy explain 80/tcp ({ok}): {denied}"
        );

        // dev1 → srv1 tcp/22 opens and is answered.
        ensure!(
            tcp_opens(lab, &m.dev1.host, srv1_ip, 22)?,
            "dev1 could not open TCP 22 on srv1"
        );
        // dev1 → srv1 tcp/80 (dev1 sends it: its sender filter is off) is
        // refused by srv1's filter, and counted there.
        let (srv1_in_before, _) = policy_drops(&m.srv1)?;
        ensure!(
            !tcp_opens(lab, &m.dev1.host, srv1_ip, 80)?,
            "dev1 opened TCP 80 on srv1 although no rule allows it"
        );
        let (srv1_in_after, _) = policy_drops(&m.srv1)?;
        println!(
            "tcp/80 dev1 → srv1: srv1 dropped {} SYNs",
            srv1_in_after - srv1_in_before
        );
        ensure!(
            srv1_in_after > srv1_in_before,
            "srv1 did not count the SYNs its policy refused"
        );

        // srv1 cannot open anything to dev1: no rule from server to dev. srv1
        // drops it before sending (no bandwidth spent on it).
        let (_, srv1_out_before) = policy_drops(&m.srv1)?;
        ensure!(
            !tcp_opens(lab, &m.srv1.host, dev1_ip, 2222)?,
            "srv1 opened a connection to dev1"
        );
        ensure!(!pings(lab, &m.srv1.host, dev1_ip)?, "srv1 pinged dev1");
        let (_, srv1_out_after) = policy_drops(&m.srv1)?;
        ensure!(
            srv1_out_after > srv1_out_before,
            "srv1 did not count what it refused to send to dev1"
        );
        // dev1 pings srv1 (icmp rule); the servers ping each other (any).
        ensure!(
            pings(lab, &m.dev1.host, srv1_ip)?,
            "dev1 could not ping srv1"
        );
        ensure!(
            pings(lab, &m.srv1.host, srv2_ip)?,
            "srv1 could not ping srv2"
        );
        ensure!(
            pings(lab, &m.srv2.host, srv1_ip)?,
            "srv2 could not ping srv1"
        );
        ensure!(!pings(lab, &m.dev1.host, other_ip)?, "dev1 pinged other");

        // A flood of new flows (srv2 may send srv1 anything) stays under the
        // per-peer cap on srv1, and other peers' connections keep working.
        let flood = lab.output(
            &m.srv2.host,
            PROBE,
            &[
                "flood",
                &srv1_ip.to_string(),
                "1000",
                &FLOOD_PORTS.to_string(),
            ],
        )?;
        ensure!(flood.status.success(), "udp_probe flood failed: {flood:?}");
        let flows_of_srv2 =
            wait_until(Duration::from_secs(5), "srv1 to track srv2's flood", || {
                let peers: serde_json::Value = m.srv1.ctl_json(&["peers"])?;
                let srv2 = peers
                    .as_array()
                    .and_then(|a| a.iter().find(|p| p["name"] == "srv2"))
                    .cloned()
                    .ok_or_else(|| Wait::NotYet("srv2 not listed".into()))?;
                match srv2["flows"].as_u64() {
                    Some(n) if n >= 1000 => Ok(n),
                    other => Err(Wait::NotYet(format!("flows {other:?}"))),
                }
            })?;
        let (_, _, unrecorded) = policy_counters(&m.srv1)?;
        println!(
            "flood of {FLOOD_PORTS} ports srv2 → srv1: srv1 tracks {flows_of_srv2} flows of srv2 \
             (cap {PEER_FLOW_CAP}), {unrecorded} packets passed unrecorded"
        );
        ensure!(
            flows_of_srv2 <= PEER_FLOW_CAP,
            "srv1 tracks {flows_of_srv2} flows of srv2, above the cap of {PEER_FLOW_CAP}"
        );
        ensure!(unrecorded > 0, "the flood never met the flow cap");
        ensure!(
            tcp_opens(lab, &m.dev1.host, srv1_ip, 22)?,
            "dev1 could not open TCP 22 on srv1 during srv2's flood"
        );
        ensure!(
            pings(lab, &m.srv2.host, srv1_ip)?,
            "srv2 could not ping srv1 after its flood"
        );

        // A change opens TCP 80 within a second, with no restart.
        let web_file = write_policy(lab, "policy-web.toml", &policy_with_web())?;
        m.coord.admin(lab, &["policy", "set", &web_file])?;
        let opened = wait_tcp(lab, &m.dev1.host, srv1_ip, 80, PROPAGATION)?;
        println!("policy change → TCP 80 open after {opened:?}");

        // A bad file is refused with its line and field; the policy in force stays.
        let bad = write_policy(
            lab,
            "bad.toml",
            &policy_with_web().replace(r#"ports = ["22", "80"]"#, r#"ports = ["22", "eighty"]"#),
        )?;
        let (ok, text) = admin_outcome(lab, &m.coord, &["policy", "set", &bad])?;
        ensure!(!ok, "a bad port was accepted: {text}");
        ensure!(
            text.contains("bad.toml:") && text.contains("ports") && text.contains("eighty"),
            "the error should name the file, line and field: {text}"
        );
        // A file whose own test fails is refused, saying which.
        let failing = write_policy(
            lab,
            "failing.toml",
            &POLICY.replace(
                r#"deny = ["tag:server:80/tcp"]"#,
                r#"deny = ["tag:server:22/tcp"]"#,
            ),
        )?;
        let (ok, text) = admin_outcome(lab, &m.coord, &["policy", "set", &failing])?;
        ensure!(!ok, "a policy failing its own test was accepted: {text}");
        ensure!(
            text.contains("tag:server:22/tcp"),
            "the refusal should name the failing test: {text}"
        );
        let stored = m.coord.admin(lab, &["policy", "get"])?;
        ensure!(
            stored.trim() == policy_with_web().trim(),
            "a refused file replaced the stored policy: {stored:?}"
        );
        ensure!(
            tcp_opens(lab, &m.dev1.host, srv1_ip, 80)?,
            "TCP 80 closed although the refused files never applied"
        );

        // Tagging `other` as a server: it sees the others and they see it.
        m.coord.admin(lab, &["nodes", "tag", "other", "+server"])?;
        let tagged = wait_peers(&m.other, &["dev1", "srv1", "srv2"], PROPAGATION)?;
        wait_peers(&m.srv1, &["dev1", "other", "srv2"], PROPAGATION)?;
        println!("tag change → other sees its peers after {tagged:?}");
        let t0 = Instant::now();
        wait_until(SETTLE, "srv1 to ping other", || {
            if pings(lab, &m.srv1.host, other_ip)? {
                Ok(())
            } else {
                Err(Wait::NotYet("no answer".into()))
            }
        })?;
        println!("tag change → srv1 pings other after {:?}", t0.elapsed());

        // Removing srv2 takes it out of every netmap within a second.
        m.coord.remove_node(lab, "srv2")?;
        let removed = wait_peers(&m.dev1, &["other", "srv1"], PROPAGATION)?;
        wait_peers(&m.srv1, &["dev1", "other"], PROPAGATION)?;
        println!("node removal → gone from dev1 after {removed:?}");

        // Clearing the policy brings back today's flat mesh.
        m.coord.admin(lab, &["policy", "clear"])?;
        wait_tcp(lab, &m.srv1.host, dev1_ip, 2222, PROPAGATION)?;

        drop((ssh, web, dev_port));
        Ok(())
    })
}
