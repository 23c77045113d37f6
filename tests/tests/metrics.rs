//! `overlayd up --metrics-listen` and `overlayctl metrics`: a scraper sees the
//! per-peer byte counters rise during a ping run, and the path gauge says what
//! `overlayctl peers` says. Also: overlayd's log to a file carries no colour codes.
//!
//! ```text
//!   coord (10.77.3.1)   a (.2, metrics on 127.0.0.1:9470)   b (.3)
//!        └──────────────┴──────────────────────────────────┴──── 10.77.3.0/24
//! ```

use std::time::Duration;

use anyhow::{ensure, Context};
use overlay_proto::api::{PathKind, PeerStatus};
use overlay_tests::overlay::ping;
use overlay_tests::{lab_test, wait_until, Coordinator, Daemon, Host, Lab, Wait};

const METRICS_ADDR: &str = "127.0.0.1:9470";
/// How long two fresh nodes on one LAN may take to settle on a path.
const PATH_TIMEOUT: Duration = Duration::from_secs(30);

/// `GET /metrics` from inside `host` (bash's /dev/tcp: no HTTP client needed),
/// returning the body after checking the status line.
fn scrape(lab: &Lab, host: &Host) -> anyhow::Result<String> {
    let (ip, port) = METRICS_ADDR.split_once(':').context("addr")?;
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{port} && printf 'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let out = lab.output(host, "bash", &["-c", &script])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP head")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "scrape answered {head:?}");
    ensure!(
        head.contains("text/plain; version=0.0.4"),
        "scrape content type: {head:?}"
    );
    Ok(body.to_string())
}

/// The value of the one sample whose series starts with `prefix` and carries
/// every label in `labels`.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn kind_label(kind: PathKind) -> &'static str {
    match kind {
        PathKind::Direct => "direct",
        PathKind::Turn => "turn",
        PathKind::CoordRelay => "coord_relay",
        PathKind::Connecting => "connecting",
        PathKind::Idle => "idle",
    }
}

#[test]
fn metrics_listen_shows_rising_peer_bytes_and_the_path_peers_shows() {
    lab_test(|lab| {
        let lan = lab.segment("lan", "10.77.3.0/24")?;
        let coord_host = lab.host("coord")?;
        let coord_ip = lab.attach(&coord_host, &lan)?.ip;
        let coord = Coordinator::start(lab, &coord_host, coord_ip, &[])?;
        let key = coord.create_key(lab)?;

        let a_host = lab.host("a")?;
        lab.attach(&a_host, &lan)?;
        let mut a = Daemon::new(lab, &a_host, "a", &coord.url)?;
        a.extra_args = vec!["--metrics-listen".into(), METRICS_ADDR.into()];
        // The lab sets NO_COLOR for every daemon; an empty value is "not set", so
        // a's log shows whether overlayd colours a stderr that is not a terminal.
        a.extra_env = vec![("NO_COLOR".into(), String::new())];
        a.start(lab, Some(&key))?;
        let b_host = lab.host("b")?;
        lab.attach(&b_host, &lan)?;
        let mut b = Daemon::new(lab, &b_host, "b", &coord.url)?;
        b.start(lab, Some(&key))?;
        let b_ip = b.status()?.mesh_ip;

        let peer_b = wait_until(PATH_TIMEOUT, "a to reach b directly", || {
            let peers: Vec<PeerStatus> = a.ctl_json(&["peers"])?;
            match peers.into_iter().find(|p| p.name == "b") {
                Some(p) if p.path_kind == PathKind::Direct => Ok(p),
                other => {
                    if other
                        .as_ref()
                        .is_some_and(|p| p.path_kind == PathKind::Idle)
                    {
                        a.wake("b")?; // new peers start idle
                    }
                    Err(Wait::NotYet(format!("{other:?}")))
                }
            }
        })?;
        let labels = ["peer=\"b\"".to_string(), format!("mesh_ip=\"{b_ip}\"")];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();

        let before = scrape(lab, &a_host)?;
        let (sent, received) = ping(lab, &a_host, b_ip, &["-c", "10", "-i", "0.1", "-W", "2"])?;
        ensure!(received == sent, "ping lost {} of {sent}", sent - received);
        let after = scrape(lab, &a_host)?;

        for name in [
            "overlay_peer_rx_bytes_total",
            "overlay_peer_tx_bytes_total",
            "overlay_peer_rx_packets_total",
            "overlay_peer_tx_packets_total",
        ] {
            let was =
                value(&before, name, &labels).with_context(|| format!("{name} in {before}"))?;
            let now = value(&after, name, &labels).with_context(|| format!("{name} in {after}"))?;
            ensure!(
                now > was,
                "{name} did not rise during the ping: {was} -> {now}"
            );
        }
        let min_bytes = f64::from(received) * 84.0; // 20 B IP + 8 B ICMP + 56 B data
        let tx = value(&after, "overlay_peer_tx_bytes_total", &labels).unwrap_or_default()
            - value(&before, "overlay_peer_tx_bytes_total", &labels).unwrap_or_default();
        ensure!(tx >= min_bytes, "tx rose by {tx} B for {received} pings");

        // The data plane's batch histograms count the ping's syscalls.
        for name in [
            "overlay_tun_read_batch_frames_count",
            "overlay_udp_read_batch_datagrams_count",
            "overlay_udp_send_batch_datagrams_count",
        ] {
            let was = value(&before, name, &[]).with_context(|| format!("{name} in {before}"))?;
            let now = value(&after, name, &[]).with_context(|| format!("{name} in {after}"))?;
            ensure!(
                now > was,
                "{name} did not rise during the ping: {was} -> {now}"
            );
        }

        // The gauge and `overlayctl peers` agree on the path.
        let peers: Vec<PeerStatus> = a.ctl_json(&["peers"])?;
        let now_b = peers.iter().find(|p| p.name == "b").context("b vanished")?;
        ensure!(
            now_b.path_kind == peer_b.path_kind,
            "b's path changed during the test"
        );
        let mut current = labels.clone();
        let kind = format!("kind=\"{}\"", kind_label(now_b.path_kind));
        current.push(&kind);
        ensure!(
            value(&after, "overlay_peer_path", &current) == Some(1.0),
            "path gauge for {kind} is not 1:\n{after}"
        );
        ensure!(
            after
                .lines()
                .filter(|l| l.starts_with("overlay_peer_path{") && l.contains("peer=\"b\""))
                .filter(|l| l.ends_with(" 1"))
                .count()
                == 1,
            "more than one path kind is 1:\n{after}"
        );
        ensure!(
            value(&after, "overlay_coordinator_connected", &[]) == Some(1.0),
            "coordinator not connected:\n{after}"
        );

        // `overlayctl metrics` prints the same families from the local API.
        let out = a.ctl(&["metrics"])?;
        ensure!(out.status.success(), "overlayctl metrics failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            value(&text, "overlay_peer_rx_bytes_total", &labels).is_some()
                && text.contains("# TYPE overlay_drops_total counter"),
            "overlayctl metrics printed:\n{text}"
        );

        // journald and log files show escape codes literally.
        let log = std::fs::read_to_string(lab.dir().join("overlayd-a-1.log"))?;
        ensure!(
            !log.contains('\u{1b}'),
            "overlayd writes ANSI colour codes to a non-terminal: {log:?}"
        );
        ensure!(log.contains(" INFO "), "a logged no INFO line: {log}");
        // One line per state change a person cares about, not one per retry
        // or packet: enrolment, the coordinator connection, b's path.
        let info: Vec<&str> = log.lines().filter(|l| l.contains(" INFO ")).collect();
        let count = |needle: &str| info.iter().filter(|l| l.contains(needle)).count();
        ensure!(count("enrolled as a ") == 1, "enrolment lines:\n{log}");
        ensure!(
            count("connected to coordinator") == 1,
            "connection lines:\n{log}"
        );
        ensure!(
            count("peer b (") >= 2 && count("now direct") == 1,
            "b's lines:\n{log}"
        );
        let paths: Vec<&str> = info
            .iter()
            .filter(|l| l.contains("peer b (") && l.contains(" now "))
            .map(|l| l.split(" now ").nth(1).unwrap_or(""))
            .collect();
        ensure!(
            paths.windows(2).all(|w| w[0] != w[1]),
            "b's path logged twice in a row: {paths:?}"
        );
        Ok(())
    });
}
