//! Human-readable rendering of the daemon's answers. Pure functions of their input,
//! so the exact output is unit-tested.
//!
//! Every string in an answer may have come from the network (a peer's name from
//! the coordinator, a peer's signalled address, an error text), so each goes
//! through [`clean`] before it reaches the terminal: no escape sequence from
//! elsewhere can clear the screen, retitle the window or fake a line.

use std::borrow::Cow;

use overlay_proto::api::{PathKind, PeerStatus, PingReply, PingSummary, Status};

/// `text` without control characters: each (C0, DEL and C1, which includes
/// ESC, CSI and newlines) is shown escaped, like `\u{1b}`.
pub fn clean(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`clean`] for an optional string, `default` when absent.
pub fn clean_or<'a>(text: Option<&'a str>, default: &'a str) -> Cow<'a, str> {
    clean(text.unwrap_or(default))
}

/// `1536` → `1.5 KiB`; exact below 1 KiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration in the two largest units that matter: `45s`, `3m 4s`, `2h 5m`, `3d 4h`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// `12s ago`, or `never` when no handshake has completed.
pub fn handshake_age(secs: Option<u64>) -> String {
    match secs {
        Some(secs) => format!("{} ago", human_duration(secs)),
        None => "never".to_string(),
    }
}

/// The `overlayctl status` text.
pub fn status(status: &Status) -> String {
    let coordinator = if status.coordinator_connected {
        "connected"
    } else {
        "not connected"
    };
    let mesh_ip6 = match (status.mesh_ip6, status.network6) {
        (Some(ip), Some(net)) => Some(format!("{ip}/{}", net.prefix_len())),
        (Some(ip), None) => Some(ip.to_string()),
        (None, _) => None,
    };
    let network = match status.network6 {
        Some(net6) => format!("{}, {net6}", status.network),
        None => status.network.to_string(),
    };
    let mut rows = vec![
        (
            "name",
            format!("{} (node {})", clean(&status.name), status.node_id),
        ),
        (
            "mesh ip",
            format!("{}/{}", status.mesh_ip, status.network.prefix_len()),
        ),
        ("network", network),
        ("interface", clean(&status.interface).into_owned()),
        ("public key", clean(&status.public_key).into_owned()),
        (
            "coordinator",
            format!("{} ({coordinator})", clean(&status.coordinator)),
        ),
        ("uptime", human_duration(status.uptime_secs)),
        ("version", clean(&status.version).into_owned()),
    ];
    if let Some(ip6) = mesh_ip6 {
        rows.insert(2, ("mesh ipv6", ip6));
    }
    let mut out = String::new();
    for (key, value) in rows {
        out.push_str(&format!("{:<13}{value}\n", format!("{key}:")));
    }
    let d = &status.dropped;
    let dropped: Vec<String> = [
        ("no route", d.no_route),
        ("spoofed source", d.spoofed_source),
        ("bad datagram", d.bad_datagram),
        ("relay queue full", d.relay_queue_full),
        ("wrong destination", d.wrong_destination),
        ("bad signal", d.bad_signal),
        ("replayed signal", d.replayed_signal),
        ("misdirected signal", d.misdirected_signal),
        ("excess offer", d.excess_offer),
        ("signal budget", d.signal_budget),
        ("refused by policy", d.policy),
        ("refused by policy before sending", d.policy_out),
        ("passed, flow table full", d.flow_table_full),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(what, n)| format!("{n} {what}"))
    .collect();
    if !dropped.is_empty() {
        out.push_str(&format!("{:<13}{}\n", "dropped:", dropped.join(", ")));
    }
    if let Some(dns) = &status.dns {
        let upstreams = if dns.upstreams.is_empty() {
            String::new()
        } else {
            format!("; other names go to {}", clean(&dns.upstreams.join(", ")))
        };
        let on = match dns.resolver6 {
            Some(v6) => format!("{} and {v6}", dns.resolver),
            None => dns.resolver.to_string(),
        };
        out.push_str(&format!(
            "{:<13}{} on {on} ({} names; mode {}: {}{upstreams})\n",
            "dns:",
            clean(&dns.domain),
            dns.names,
            clean(&dns.mode),
            clean(&dns.host),
        ));
    }
    out
}

/// `overlayctl dns query`: the response code, then one record per line.
pub fn dns_answer(rcode: &str, answers: &[String]) -> String {
    let mut out = format!("status: {}\n", clean(rcode));
    for a in answers {
        out.push_str(&clean(a));
        out.push('\n');
    }
    out
}

/// The `overlayctl peers` table, peers sorted by name; offline peers are marked in
/// the NAME column so the table says it even when the path string is stale.
/// An idle peer (no traffic for the daemon's idle timeout) reads `idle`.
pub fn peers_table(peers: &[PeerStatus]) -> String {
    if peers.is_empty() {
        return "no peers\n".to_string();
    }
    let mut sorted: Vec<&PeerStatus> = peers.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name).then(a.mesh_ip.cmp(&b.mesh_ip)));

    // The DNS column only when the mesh has names.
    let dns = peers.iter().any(|p| p.dns_name.is_some());
    // The IPv6 column only when the mesh has IPv6 addresses.
    let ipv6 = peers.iter().any(|p| p.mesh_ip6.is_some());
    let mut header = vec!["NAME", "MESH IP"];
    if ipv6 {
        header.push("MESH IPV6");
    }
    if dns {
        header.push("DNS NAME");
    }
    header.extend(["PATH", "ENDPOINT", "HANDSHAKE", "RX", "TX"]);
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for peer in sorted {
        let name = if peer.online {
            clean(&peer.name).into_owned()
        } else {
            format!("{} (offline)", clean(&peer.name))
        };
        let mut row = vec![name, peer.mesh_ip.to_string()];
        if ipv6 {
            row.push(
                peer.mesh_ip6
                    .map_or_else(|| "-".into(), |ip| ip.to_string()),
            );
        }
        if dns {
            row.push(clean_or(peer.dns_name.as_deref(), "-").into_owned());
        }
        let path = match peer.path_kind {
            PathKind::Idle => "idle".into(),
            _ => clean(&peer.path),
        };
        row.extend([
            path.into_owned(),
            clean_or(peer.endpoint.as_deref(), "-").into_owned(),
            handshake_age(peer.last_handshake_secs),
            human_bytes(peer.rx_bytes),
            human_bytes(peer.tx_bytes),
        ]);
        rows.push(row);
    }
    columns(&rows)
}

/// Left-aligned columns separated by two spaces, no trailing whitespace.
pub fn columns<R: AsRef<[String]>>(rows: &[R]) -> String {
    let n = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let mut widths = vec![0usize; n];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row.as_ref()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        let row = row.as_ref();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count() + 2;
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One line per echo reply, like ping(8).
pub fn ping_reply(reply: &PingReply) -> String {
    format!(
        "reply from {}: seq={} time={:.2} ms via {}",
        reply.from,
        reply.seq,
        reply.rtt_ms,
        clean(&reply.path)
    )
}

/// The closing statistics of a ping, with round-trip figures from the replies seen.
pub fn ping_summary(summary: &PingSummary, rtts_ms: &[f64]) -> String {
    let loss = if summary.sent == 0 {
        0.0
    } else {
        100.0 * f64::from(summary.sent.saturating_sub(summary.received)) / f64::from(summary.sent)
    };
    let mut out = format!(
        "--- {} ping statistics ---\n{} packets transmitted, {} received, {loss:.0}% packet loss\n",
        summary.target, summary.sent, summary.received
    );
    if !rtts_ms.is_empty() {
        let min = rtts_ms.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rtts_ms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let avg = rtts_ms.iter().sum::<f64>() / rtts_ms.len() as f64;
        out.push_str(&format!(
            "rtt min/avg/max = {min:.2}/{avg:.2}/{max:.2} ms\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn peer(name: &str, ip: [u8; 4], online: bool) -> PeerStatus {
        PeerStatus {
            id: 1,
            name: name.to_string(),
            mesh_ip: Ipv4Addr::from(ip),
            mesh_ip6: None,
            public_key: "k".to_string(),
            online,
            path_kind: if online {
                PathKind::Direct
            } else {
                PathKind::Connecting
            },
            path: if online {
                "direct (host)"
            } else {
                "connecting"
            }
            .to_string(),
            endpoint: online.then(|| "10.77.0.3:41641".to_string()),
            local_endpoint: None,
            last_handshake_secs: online.then_some(12),
            rx_bytes: 1536,
            tx_bytes: 100,
            rx_packets: 0,
            tx_packets: 0,
            access: None,
            dropped_policy: 0,
            dropped_policy_out: 0,
            flows: 0,
            dns_name: None,
        }
    }

    #[test]
    fn bytes_are_exact_below_a_kibibyte_and_scaled_above() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn durations_use_the_two_largest_units() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(184), "3m 4s");
        assert_eq!(human_duration(7500), "2h 5m");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
        assert_eq!(handshake_age(Some(12)), "12s ago");
        assert_eq!(handshake_age(None), "never");
    }

    #[test]
    fn peers_table_aligns_columns_and_marks_offline_peers() {
        let table = peers_table(&[
            peer("charlie", [100, 64, 0, 4], false),
            peer("bob", [100, 64, 0, 3], true),
        ]);
        let expected = "\
NAME               MESH IP     PATH           ENDPOINT         HANDSHAKE  RX       TX
bob                100.64.0.3  direct (host)  10.77.0.3:41641  12s ago    1.5 KiB  100 B
charlie (offline)  100.64.0.4  connecting     -                never      1.5 KiB  100 B
";
        assert_eq!(table, expected);
    }

    #[test]
    fn peers_table_shows_idle_peers_as_idle() {
        let mut idle = peer("dave", [100, 64, 0, 5], true);
        idle.path_kind = PathKind::Idle;
        idle.path = "idle".into();
        idle.endpoint = None;
        let table = peers_table(&[idle]);
        let expected = "\
NAME  MESH IP     PATH  ENDPOINT  HANDSHAKE  RX       TX
dave  100.64.0.5  idle  -         12s ago    1.5 KiB  100 B
";
        assert_eq!(table, expected);
    }

    #[test]
    fn peers_table_has_an_ipv6_column_only_when_the_mesh_has_ipv6() {
        let mut bob = peer("bob", [100, 64, 0, 3], true);
        bob.mesh_ip6 = Some("fd12:3456:789a::6440:3".parse().unwrap());
        let old = peer("old", [100, 64, 0, 9], true);
        let table = peers_table(&[bob, old]);
        let expected = "\
NAME  MESH IP     MESH IPV6               PATH           ENDPOINT         HANDSHAKE  RX       TX
bob   100.64.0.3  fd12:3456:789a::6440:3  direct (host)  10.77.0.3:41641  12s ago    1.5 KiB  100 B
old   100.64.0.9  -                       direct (host)  10.77.0.3:41641  12s ago    1.5 KiB  100 B
";
        assert_eq!(table, expected);
    }

    #[test]
    fn empty_peer_list_says_so() {
        assert_eq!(peers_table(&[]), "no peers\n");
    }

    #[test]
    fn ping_lines_match_ping8_style() {
        let reply = PingReply {
            seq: 1,
            from: Ipv4Addr::new(100, 64, 0, 2).into(),
            rtt_ms: 0.8412,
            path: "direct (host)".to_string(),
        };
        assert_eq!(
            ping_reply(&reply),
            "reply from 100.64.0.2: seq=1 time=0.84 ms via direct (host)"
        );
        let summary = PingSummary {
            target: Ipv4Addr::new(100, 64, 0, 2).into(),
            sent: 4,
            received: 3,
        };
        assert_eq!(
            ping_summary(&summary, &[1.0, 2.0, 3.0]),
            "--- 100.64.0.2 ping statistics ---\n\
             4 packets transmitted, 3 received, 25% packet loss\n\
             rtt min/avg/max = 1.00/2.00/3.00 ms\n"
        );
        let none = PingSummary {
            received: 0,
            ..summary
        };
        assert!(ping_summary(&none, &[]).ends_with("100% packet loss\n"));
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(clean("alice"), "alice");
        assert!(matches!(clean("alice"), Cow::Borrowed(_)));
        assert_eq!(clean("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(clean("x\ny\u{7f}\u{9b}"), "x\\u{a}y\\u{7f}\\u{9b}");
    }

    #[test]
    fn peer_fields_from_the_network_cannot_reach_the_terminal_raw() {
        let mut evil = peer("\u{1b}]0;pwned\u{7}bob", [100, 64, 0, 3], true);
        evil.endpoint = Some("\u{1b}[2J10.0.0.1:1".into());
        evil.path = "direct\nfake line".into();
        let table = peers_table(&[evil]);
        assert!(
            !table.contains('\u{1b}') && !table.contains('\u{7}'),
            "{table:?}"
        );
        assert_eq!(table.lines().count(), 2, "{table}");
        let mut status_with_evil_name = Status {
            name: "\u{1b}[2Jalice".into(),
            node_id: 7,
            mesh_ip: Ipv4Addr::new(100, 64, 0, 2),
            network: "100.64.0.0/10".parse().expect("valid net"),
            mesh_ip6: None,
            network6: None,
            interface: "ovl0".into(),
            public_key: "PUB".into(),
            coordinator: "http://x\u{1b}[31m".into(),
            coordinator_connected: true,
            uptime_secs: 1,
            version: "0.1.0".into(),
            dropped: Default::default(),
            dns: None,
        };
        status_with_evil_name.dropped.wrong_destination = 1;
        let text = status(&status_with_evil_name);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(text.contains("1 wrong destination"), "{text}");
    }

    #[test]
    fn status_lists_every_field() {
        let sample = Status {
            name: "alice".to_string(),
            node_id: 7,
            mesh_ip: Ipv4Addr::new(100, 64, 0, 2),
            network: "100.64.0.0/10".parse().expect("valid net"),
            mesh_ip6: None,
            network6: None,
            interface: "ovl0".to_string(),
            public_key: "PUB".to_string(),
            coordinator: "http://10.77.0.1:8080".to_string(),
            coordinator_connected: true,
            uptime_secs: 65,
            version: "0.1.0".to_string(),
            dropped: Default::default(),
            dns: None,
        };
        let text = status(&sample);
        assert!(
            !text.contains("dropped"),
            "nothing dropped, nothing said: {text}"
        );
        assert!(text.contains("name:        alice (node 7)\n"), "{text}");
        assert!(text.contains("mesh ip:     100.64.0.2/10\n"), "{text}");
        assert!(!text.contains("ipv6"), "no IPv6, no line: {text}");
        let mut dual = sample.clone();
        dual.mesh_ip6 = Some("fd12:3456:789a::6440:2".parse().unwrap());
        dual.network6 = Some("fd12:3456:789a::/48".parse().unwrap());
        let text = status(&dual);
        assert!(
            text.contains("mesh ipv6:   fd12:3456:789a::6440:2/48\n"),
            "{text}"
        );
        assert!(
            text.contains("network:     100.64.0.0/10, fd12:3456:789a::/48\n"),
            "{text}"
        );
        assert!(
            text.contains("coordinator: http://10.77.0.1:8080 (connected)\n"),
            "{text}"
        );
        assert!(text.contains("uptime:      1m 5s\n"), "{text}");
        let mut sample = sample;
        sample.dropped.bad_signal = 2;
        sample.dropped.no_route = 1;
        let text = status(&sample);
        assert!(
            text.contains("dropped:     1 no route, 2 bad signal\n"),
            "{text}"
        );
        sample.dropped.policy = 3;
        sample.dns = Some(overlay_proto::api::DnsStatus {
            domain: "overlay.internal".into(),
            resolver: Ipv4Addr::new(100, 100, 100, 100),
            resolver6: None,
            mode: "resolv-conf".into(),
            host: "/etc/resolv.conf managed".into(),
            upstreams: vec!["10.0.0.53".into()],
            names: 4,
            answered: 9,
            forwarded: 1,
            bad: 0,
        });
        let text = status(&sample);
        assert!(text.contains("3 refused by policy"), "{text}");
        assert!(
            text.contains(
                "dns:         overlay.internal on 100.100.100.100 (4 names; mode resolv-conf: \
                 /etc/resolv.conf managed; other names go to 10.0.0.53)\n"
            ),
            "{text}"
        );
        if let Some(dns) = sample.dns.as_mut() {
            dns.resolver6 = "fd7a:115c:a1e0::6464:6464".parse().ok();
        }
        let text = status(&sample);
        assert!(
            text.contains("overlay.internal on 100.100.100.100 and fd7a:115c:a1e0::6464:6464 ("),
            "{text}"
        );
    }
}
