//! Lazy peers: two nodes with `--idle-timeout 3` list each other idle when
//! they meet, go idle again a few seconds after their traffic stops, send each other nothing while idle, and the first ping
//! wakes them: answered at once over the coordination relay, direct again
//! within two seconds, nothing lost on the way.
//!
//! ```text
//!   coord (10.77.7.1)   a (.2)   b (.3)      tcpdump on a's eth0: UDP a ⇄ b
//!        └──────────────┴────────┴──── 10.77.7.0/24
//! ```
//!
//! Needs root and `cargo build --workspace` first.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use overlay_proto::api::PathKind;
use overlay_tests::overlay::ping;
use overlay_tests::pcap;
use overlay_tests::{fatal, lab_test, wait_path, wait_until, Daemon, Lab, LanPair, Wait};

/// The idle timeout both daemons run with, in seconds.
const IDLE_SECS: &str = "3";
/// How long a fresh pair may take to go direct.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Both sides must show the peer idle within this long after the last packet.
const IDLE_WITHIN: Duration = Duration::from_secs(6);
/// How long the idle pair is watched for UDP between the two nodes.
const QUIET_FOR: Duration = Duration::from_secs(5);
/// The first reply after waking may take at most this long.
const FIRST_REPLY_MAX_MS: f64 = 300.0;
/// After the first ping the path must be direct again within this long.
const DIRECT_AGAIN_WITHIN: Duration = Duration::from_secs(2);
/// The wake-up ping: this many requests, this far apart.
const WAKE_PINGS: u32 = 40;

#[test]
fn idle_peers_stop_talking_and_the_first_ping_wakes_them_without_loss() {
    lab_test(|lab: &Lab| {
        // Bound, not `..`: what a pattern leaves out is dropped at once.
        let LanPair {
            a_host,
            mut a,
            mut b,
            coord: _coord,
            coord_host: _coord_host,
            lan: _lan,
            ..
        } = LanPair::start_with(lab, "10.77.7.0/24", &[], |d| {
            d.extra_args
                .extend(["--idle-timeout".to_owned(), IDLE_SECS.to_owned()]);
        })?;
        let b_mesh = b.status()?.mesh_ip;
        // New peers start idle: no ICE and no keepalives before a packet.
        wait_until(DIRECT_TIMEOUT, "a and b to list each other idle", || {
            for (d, peer) in [(&a, "b"), (&b, "a")] {
                match d.peers()?.into_iter().find(|p| p.name == peer) {
                    Some(p) if p.path_kind == PathKind::Idle => {}
                    Some(p) if p.online => {
                        return Err(fatal(anyhow::anyhow!(
                            "{} sees the new peer {peer} {} before any traffic",
                            d.name,
                            p.path
                        )))
                    }
                    other => return Err(Wait::NotYet(format!("{} sees {other:?}", d.name))),
                }
            }
            Ok(())
        })?;
        // Traffic while the pair settles, so neither side idles before it is
        // direct (the timeout is shorter than a loaded machine may need).
        let mut settle = Command::new("ping");
        settle.args(["-n", "-i", "0.2", &b_mesh.to_string()]);
        let mut settle = lab.spawn(&a_host, "ping-settle", settle)?;
        wait_path(&mut a, "b", PathKind::Direct, DIRECT_TIMEOUT)?;
        wait_path(&mut b, "a", PathKind::Direct, DIRECT_TIMEOUT)?;
        let b_lan = lan_address(&a, "b")?;
        let (sent, received) = ping(lab, &a_host, b_mesh, &["-c", "3", "-i", "0.2", "-W", "2"])?;
        ensure!(
            sent == received,
            "direct ping: {sent} sent, {received} received"
        );

        // Then no traffic: both sides turn idle.
        settle.stop()?;
        let quiet_since = Instant::now();
        wait_until(IDLE_WITHIN, "a and b to show each other idle", || {
            for (d, peer) in [(&mut a, "b"), (&mut b, "a")] {
                d.alive()?;
                let peers = d.peers()?;
                let p = peers
                    .iter()
                    .find(|p| p.name == peer)
                    .ok_or_else(|| Wait::NotYet(format!("{} does not list {peer}", d.name)))?;
                if p.path_kind != PathKind::Idle {
                    return Err(Wait::NotYet(format!("{} sees {peer} {}", d.name, p.path)));
                }
            }
            Ok(())
        })?;
        let to_idle = quiet_since.elapsed();
        let shown: serde_json::Value = a.ctl_json(&["peers"])?;
        ensure!(
            shown.to_string().contains("\"path_kind\":\"idle\""),
            "overlayctl peers --json on a: {shown}"
        );

        // While idle: not one UDP datagram between the two nodes.
        let capture = lab.dir().join("a-idle.pcap");
        let mut tcpdump = Command::new("tcpdump");
        tcpdump
            .args(["-i", "eth0", "-n", "-U", "-Z", "root", "-s", "0", "-w"])
            .arg(&capture)
            .arg(format!("udp and host {b_lan}"));
        let mut tcpdump = lab.spawn(&a_host, "tcpdump-a", tcpdump)?;
        tcpdump.wait_for_log("listening on", Duration::from_secs(10))?;
        std::thread::sleep(QUIET_FOR);
        tcpdump.stop()?;
        let bytes =
            std::fs::read(&capture).with_context(|| format!("reading {}", capture.display()))?;
        let idle_datagrams = pcap::parse(&bytes)?
            .iter()
            .filter(|f| f.udp_payload().is_some())
            .count();
        for (d, peer) in [(&a, "b"), (&b, "a")] {
            let p = d.peers()?.into_iter().find(|p| p.name == peer);
            ensure!(
                p.as_ref().is_some_and(|p| p.path_kind == PathKind::Idle),
                "{} no longer sees {peer} idle after the quiet spell: {p:?}",
                d.name
            );
        }

        // Wake: ping every 50 ms; the path goes direct meanwhile.
        let mut pinger = Command::new("ping");
        pinger.args([
            "-D",
            "-n",
            "-c",
            &WAKE_PINGS.to_string(),
            "-i",
            "0.05",
            "-w",
            "10",
        ]);
        pinger.arg(b_mesh.to_string());
        let mut pinger = lab.spawn(&a_host, "ping-wake", pinger)?;
        wait_path(&mut a, "b", PathKind::Direct, Duration::from_secs(10))?;
        let direct_at = unix_secs();
        pinger.wait_exit(Duration::from_secs(15))?;
        let out = pinger.log();
        let replies = parse_replies(&out);
        let (sent, received) = overlay_tests::overlay::parse_ping_summary(&out)
            .with_context(|| format!("no ping summary in {out:?}"))?;
        let first = replies
            .iter()
            .find(|r| r.seq == 1)
            .with_context(|| format!("the first request got no reply: {out}"))?;
        let first_sent = first.at - first.rtt_ms / 1000.0;
        let to_direct = direct_at - first_sent;
        wait_path(&mut b, "a", PathKind::Direct, DIRECT_TIMEOUT)?;

        eprintln!(
            "idle: both sides idle {:.1} s after the last packet (timeout {IDLE_SECS} s); \
             {idle_datagrams} UDP datagrams between a and b in {} s of idleness; \
             first reply after waking in {:.1} ms; direct again {:.2} s after the first \
             request; {received} of {sent} pings answered",
            to_idle.as_secs_f64(),
            QUIET_FOR.as_secs(),
            first.rtt_ms,
            to_direct
        );
        ensure!(
            to_idle <= IDLE_WITHIN,
            "idle after {to_idle:?}, more than {IDLE_WITHIN:?}"
        );
        ensure!(
            idle_datagrams == 0,
            "{idle_datagrams} UDP datagrams between a and b while idle"
        );
        ensure!(
            first.rtt_ms <= FIRST_REPLY_MAX_MS,
            "first reply after {:.1} ms (limit {FIRST_REPLY_MAX_MS} ms):\n{out}",
            first.rtt_ms
        );
        ensure!(
            to_direct <= DIRECT_AGAIN_WITHIN.as_secs_f64(),
            "direct again only {to_direct:.2} s after the first request"
        );
        ensure!(
            sent == WAKE_PINGS && received == WAKE_PINGS,
            "wake-up ping: {sent} sent, {received} received:\n{out}"
        );
        // The path a took: idle, then the relay while ICE ran, then direct.
        let log = a.proc.as_ref().map(|p| p.log()).unwrap_or_default();
        let timed: Vec<(Option<f64>, &str)> = log
            .lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once("peer b (")?;
                let (_, path) = rest.split_once(") now ")?;
                Some((time_of_day(l), path))
            })
            .collect();
        let changes: Vec<&str> = timed.iter().map(|(_, p)| *p).collect();
        eprintln!("a's path to b: {}", changes.join(" → "));
        if let [.., (Some(idle), "idle"), (Some(relay), "coord relay"), (Some(direct), _)] =
            timed.as_slice()
        {
            let day = first_sent.rem_euclid(86_400.0);
            eprintln!(
                "a: idle at {idle:.3}, first request at {day:.3}, wake noticed (relay, ICE \
                 starts) {:.0} ms after it, direct {:.0} ms after that",
                (relay - day) * 1000.0,
                (direct - relay) * 1000.0
            );
        }
        let idle_at = changes
            .iter()
            .rposition(|p| *p == "idle")
            .context("a never logged b as idle")?;
        ensure!(
            changes[idle_at + 1..].first() == Some(&"coord relay")
                && changes[idle_at + 1..]
                    .iter()
                    .any(|p| p.starts_with("direct")),
            "after idle, a's path to b went {:?}, not relay then direct",
            &changes[idle_at + 1..]
        );
        Ok(())
    });
}

/// The LAN address `d` reaches `peer` at on its direct path.
fn lan_address(d: &Daemon, peer: &str) -> anyhow::Result<Ipv4Addr> {
    let peers = d.peers()?;
    let p = peers
        .iter()
        .find(|p| p.name == peer)
        .with_context(|| format!("{} does not list {peer}", d.name))?;
    let endpoint = p
        .endpoint
        .as_deref()
        .with_context(|| format!("{} has no endpoint for {peer}", d.name))?;
    let addr: std::net::SocketAddr = endpoint
        .parse()
        .with_context(|| format!("endpoint {endpoint:?}"))?;
    match addr.ip() {
        std::net::IpAddr::V4(ip) => Ok(ip),
        other => anyhow::bail!("endpoint {other} is not IPv4"),
    }
}

/// One echo reply of `ping -D`: when it came (Unix seconds), its sequence
/// number and round trip.
struct Reply {
    at: f64,
    seq: u32,
    rtt_ms: f64,
}

/// `[1700000000.123456] 64 bytes from 100.64.0.3: icmp_seq=1 ttl=64 time=0.31 ms`
fn parse_replies(text: &str) -> Vec<Reply> {
    text.lines()
        .filter_map(|line| {
            let at = line.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(str::to_owned)
            };
            let seq = field("icmp_seq=")?.parse().ok()?;
            let rtt_ms = field("time=")?.parse().ok()?;
            Some(Reply { at, seq, rtt_ms })
        })
        .collect()
}

/// Seconds into the (UTC) day of a log line's `2026-01-02T03:04:05.678901Z` stamp.
fn time_of_day(line: &str) -> Option<f64> {
    let (_, clock) = line.split_whitespace().next()?.split_once('T')?;
    let mut parts = clock.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[test]
fn ping_timestamps_parse() {
    let replies = parse_replies(
        "PING 100.64.0.3 (100.64.0.3) 56(84) bytes of data.\n\
         [1700000000.123456] 64 bytes from 100.64.0.3: icmp_seq=1 ttl=64 time=12.5 ms\n",
    );
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].seq, 1);
    assert!((replies[0].rtt_ms - 12.5).abs() < 1e-9);
    assert!((replies[0].at - 1_700_000_000.123_456).abs() < 1e-6);
}
