//! Human forms of `netcheck` and `why`.

use std::fmt::Write;

use overlay_proto::api::{NetcheckReport, PolicyReport, WhyReport};
use overlay_proto::filter::FilterRule;
use overlay_proto::signal::{MappingBehaviour, NatSummary};

use crate::format::{clean, clean_or};

fn mapping(m: MappingBehaviour) -> &'static str {
    match m {
        MappingBehaviour::EndpointIndependent => {
            "same public port for every destination (hole punching works)"
        }
        MappingBehaviour::EndpointDependent => {
            "new public port per destination (symmetric NAT: needs TURN with another such node)"
        }
        MappingBehaviour::NoUdp => "unknown: UDP does not get out",
        MappingBehaviour::Unknown => "unknown: fewer than two STUN servers answered",
    }
}

fn nat_line(nat: Option<&NatSummary>) -> String {
    match nat {
        None => "not reported yet".to_owned(),
        Some(n) if !n.udp => "UDP blocked".to_owned(),
        Some(n) => format!(
            "public {}, {}",
            n.public_addr
                .map_or_else(|| "?".to_owned(), |a| a.to_string()),
            mapping(n.mapping)
        ),
    }
}

pub fn netcheck(r: &NetcheckReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "UDP:             {}",
        if r.udp { "yes" } else { "no (blocked?)" }
    );
    let _ = writeln!(
        s,
        "Public address:  {}",
        r.public_addr
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
    );
    let _ = writeln!(s, "NAT mapping:     {}", mapping(r.mapping));
    let ipv6 = match (r.udp6, r.public_addr6) {
        (true, Some(a)) => format!("yes, public address {a}"),
        (true, None) => "yes".to_owned(),
        (false, _) => "no (no global IPv6 address, or no IPv6 STUN server answered)".to_owned(),
    };
    let _ = writeln!(s, "IPv6:            {ipv6}");
    for p in &r.stun {
        let result = match (&p.mapped, p.rtt_ms) {
            (Some(m), Some(rtt)) => format!("sees {} ({rtt:.1} ms)", clean(m)),
            (Some(m), None) => format!("sees {}", clean(m)),
            _ => clean_or(p.error.as_deref(), "no answer").into_owned(),
        };
        let _ = writeln!(s, "  STUN {:<22} {result}", clean(&p.server));
    }
    if r.turn.is_empty() {
        let _ = writeln!(s, "TURN:            none configured");
    }
    for t in &r.turn {
        let result = match &t.relay_addr {
            Some(a) => format!("reachable, relay address {}", clean(a)),
            None => format!("unreachable: {}", clean_or(t.error.as_deref(), "no answer")),
        };
        let _ = writeln!(s, "TURN {:<23} {result}", clean(&t.server));
    }
    let rtt = match r.coordinator_rtt_ms {
        Some(ms) => format!("{ms:.1} ms"),
        None => "unknown (not connected yet)".into(),
    };
    let _ = writeln!(s, "Coordinator RTT: {rtt}");
    s
}

pub fn why(r: &WhyReport) -> String {
    let mut s = String::new();
    let peer = clean(&r.peer);
    let addresses = match r.mesh_ip6 {
        Some(ip6) => format!("{}, {ip6}", r.mesh_ip),
        None => r.mesh_ip.to_string(),
    };
    let _ = writeln!(s, "{peer} ({addresses}): {}", clean(&r.path));
    let _ = writeln!(s, "  {}", clean(&r.conclusion));
    if let Some(access) = &r.access {
        let _ = writeln!(
            s,
            "  Access policy: {peer} may open {} here; this node may open {} there",
            clean(&access.inbound),
            clean(&access.outbound)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "This node:  {}", nat_line(r.local_nat.as_ref()));
    let _ = writeln!(
        s,
        "{:<11} {}",
        format!("{peer}:"),
        nat_line(r.remote_nat.as_ref())
    );
    let role = if r.controlling {
        "controlling"
    } else {
        "controlled"
    };
    match r.attempt_age_secs {
        Some(age) => {
            let _ = writeln!(s, "Latest ICE attempt: {age}s ago (this node is {role})");
        }
        None => {
            let _ = writeln!(s, "No ICE attempt yet (this node is {role})");
        }
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter().map(|c| clean(c)).collect::<Vec<_>>().join(", ")
        }
    };
    let _ = writeln!(s, "  local candidates:  {}", list(&r.local_candidates));
    let _ = writeln!(s, "  remote candidates: {}", list(&r.remote_candidates));
    if !r.pairs.is_empty() {
        let _ = writeln!(s, "  pairs tried:");
        for p in &r.pairs {
            let nominated = if p.nominated { " [selected]" } else { "" };
            let _ = writeln!(
                s,
                "    {} -> {}: {}{nominated}",
                clean(&p.local),
                clean(&p.remote),
                clean(&p.outcome)
            );
        }
    }
    if let Some(secs) = r.next_attempt_in_secs {
        let _ = writeln!(s, "Next direct attempt in {secs}s");
    }
    s
}

/// `overlayctl policy`: the compiled rules, then what they give each peer.
pub fn policy(r: &PolicyReport) -> String {
    let Some(filter) = &r.filter else {
        return "no access policy: every peer may reach every port of this node\n".into();
    };
    let mut s = String::new();
    let rules = |s: &mut String, title: &str, rules: &[FilterRule]| {
        let _ = writeln!(s, "{title}");
        if rules.is_empty() {
            let _ = writeln!(s, "  none");
        }
        for rule in rules {
            let peers: Vec<String> = rule.peers.iter().map(|p| p.to_string()).collect();
            let ports: Vec<String> = rule.ports.iter().map(|p| p.to_string()).collect();
            let what = if ports.is_empty() {
                rule.proto.to_string()
            } else {
                format!("{} {}", rule.proto, ports.join(","))
            };
            let _ = writeln!(s, "  {} -> {what}", clean(&peers.join(", ")));
        }
    };
    rules(
        &mut s,
        "Who may open connections to this node:",
        &filter.inbound,
    );
    rules(
        &mut s,
        "Where this node may open connections:",
        &filter.outbound,
    );
    let _ = writeln!(s, "Replies to allowed connections pass both ways.");
    let _ = writeln!(s);
    let mut rows = vec![["PEER", "MESH IP", "MAY OPEN HERE", "WE MAY OPEN"].map(String::from)];
    for (name, ip, access) in &r.peers {
        rows.push([
            clean(name).into_owned(),
            ip.to_string(),
            clean(&access.inbound).into_owned(),
            clean(&access.outbound).into_owned(),
        ]);
    }
    if r.peers.is_empty() {
        let _ = writeln!(s, "no peers: the policy lets this node reach none");
    } else {
        s.push_str(&crate::format::columns(&rows));
    }
    let _ = writeln!(s, "flows tracked: {} (at most {})", r.flows, r.flow_cap);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_proto::api::{PairReport, PathKind, StunProbe};

    #[test]
    fn netcheck_names_mapping_and_servers() {
        let r = NetcheckReport {
            udp: true,
            public_addr: Some("203.0.113.5:4000".parse().unwrap()),
            mapping: MappingBehaviour::EndpointDependent,
            stun: vec![StunProbe {
                server: "203.0.113.1:3478".into(),
                mapped: Some("203.0.113.5:4000".into()),
                rtt_ms: Some(0.5),
                error: None,
            }],
            turn: vec![],
            coordinator_rtt_ms: Some(1.25),
            udp6: false,
            public_addr6: None,
        };
        let text = netcheck(&r);
        assert!(text.contains("symmetric NAT"), "{text}");
        assert!(text.contains("sees 203.0.113.5:4000 (0.5 ms)"), "{text}");
        assert!(
            text.contains("Coordinator RTT: 1.2 ms") || text.contains("Coordinator RTT: 1.3 ms"),
            "{text}"
        );
        assert!(text.contains("IPv6:            no ("), "{text}");
        let v6 = NetcheckReport {
            udp6: true,
            public_addr6: Some("[2001:db8:5::7]:4000".parse().unwrap()),
            ..r
        };
        let text = netcheck(&v6);
        assert!(
            text.contains("IPv6:            yes, public address [2001:db8:5::7]:4000\n"),
            "{text}"
        );
    }

    #[test]
    fn why_shows_conclusion_pairs_and_retry() {
        let r = WhyReport {
            peer: "b".into(),
            mesh_ip: "100.64.0.2".parse().unwrap(),
            mesh_ip6: None,
            online: true,
            path_kind: PathKind::CoordRelay,
            path: "coord relay".into(),
            controlling: true,
            local_candidates: vec!["host 10.0.0.1:5000".into()],
            remote_candidates: vec![],
            pairs: vec![PairReport {
                local: "host 10.0.0.1:5000".into(),
                remote: "srflx 203.0.113.9:6000".into(),
                outcome: "failed (no answer)".into(),
                nominated: false,
            }],
            attempt_age_secs: Some(12),
            local_nat: None,
            remote_nat: Some(NatSummary {
                udp: false,
                mapping: MappingBehaviour::NoUdp,
                public_addr: None,
            }),
            next_attempt_in_secs: Some(30),
            conclusion: "b gets no UDP out".into(),
            access: None,
        };
        let text = why(&r);
        assert!(
            text.starts_with("b (100.64.0.2): coord relay\n  b gets no UDP out"),
            "{text}"
        );
        assert!(text.contains("b:          UDP blocked"), "{text}");
        assert!(
            text.contains("host 10.0.0.1:5000 -> srflx 203.0.113.9:6000: failed (no answer)"),
            "{text}"
        );
        assert!(text.contains("Next direct attempt in 30s"), "{text}");
    }

    #[test]
    fn why_never_prints_control_characters_from_the_network() {
        let r = WhyReport {
            peer: "\u{1b}]0;title\u{7}b".into(),
            mesh_ip: "100.64.0.2".parse().unwrap(),
            mesh_ip6: None,
            online: true,
            path_kind: PathKind::CoordRelay,
            path: "coord relay".into(),
            controlling: false,
            local_candidates: vec!["host 10.0.0.1:5000".into()],
            remote_candidates: vec!["host \u{1b}[2J.local:5000".into()],
            pairs: vec![PairReport {
                local: "host 10.0.0.1:5000".into(),
                remote: "host \u{1b}[2J.local:5000".into(),
                outcome: "failed\u{9b}2J".into(),
                nominated: false,
            }],
            attempt_age_secs: None,
            local_nat: None,
            remote_nat: None,
            next_attempt_in_secs: None,
            conclusion: "b is\u{1b}[31m red".into(),
            access: None,
        };
        let text = why(&r);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(
            text.contains("\\u{1b}[2J"),
            "escaped, still visible: {text}"
        );
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use overlay_proto::api::PeerAccessView;
    use overlay_proto::filter::{NodeFilter, Proto};

    #[test]
    fn policy_lists_rules_each_way_and_each_peer() {
        let none = PolicyReport {
            filter: None,
            peers: vec![],
            flows: 0,
            flow_cap: 65_536,
        };
        assert!(policy(&none).starts_with("no access policy"));
        let r = PolicyReport {
            filter: Some(NodeFilter {
                inbound: vec![FilterRule {
                    peers: vec!["tag:dev".parse().unwrap(), "node:4".parse().unwrap()],
                    proto: Proto::Tcp,
                    ports: vec!["22".parse().unwrap(), "8000-8100".parse().unwrap()],
                }],
                outbound: vec![],
            }),
            peers: vec![(
                "dev1".into(),
                "100.64.0.2".parse().unwrap(),
                PeerAccessView {
                    inbound: "tcp 22,8000-8100".into(),
                    outbound: "nothing".into(),
                },
            )],
            flows: 3,
            flow_cap: 65_536,
        };
        let text = policy(&r);
        assert!(
            text.contains("  tag:dev, node:4 -> tcp 22,8000-8100\n"),
            "{text}"
        );
        assert!(
            text.contains("Where this node may open connections:\n  none\n"),
            "{text}"
        );
        assert!(
            text.contains("dev1  100.64.0.2  tcp 22,8000-8100  nothing"),
            "{text}"
        );
        assert!(text.contains("flows tracked: 3 (at most 65536)"), "{text}");
    }
}
