//! `overlayctl why PEER`: the evidence behind a peer's path and one plain
//! sentence that explains it. The sentence is a pure function of the evidence.

use overlay_proto::api::{PairReport, PathKind};
use overlay_proto::signal::{MappingBehaviour, NatSummary};
use webrtc_ice::agent::agent_stats::{CandidatePairStats, CandidateStats};
use webrtc_ice::candidate::{CandidatePairState, CandidateType};

/// What the latest ICE attempt with a peer saw, kept after the attempt ends.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    pub local: Vec<String>,
    pub remote: Vec<String>,
    pub pairs: Vec<PairReport>,
}

impl Attempt {
    /// The report of an agent's statistics, without what the shared socket
    /// makes webrtc-ice invent (see `inbox`): a check read by a host
    /// candidate of the other family becomes a peer-reflexive copy of a
    /// candidate the peer signalled, paired across families. Those pairs
    /// never carry anything and are left out, as are the copies, unless a
    /// check on one succeeded (it came before the signal: the copy is then
    /// what ICE knows the peer by).
    pub fn from_stats(
        local: &[CandidateStats],
        remote: &[CandidateStats],
        pairs: &[CandidatePairStats],
    ) -> Self {
        let describe = |c: &CandidateStats| {
            let at = super::host_port(&c.ip, c.port);
            format!("{} {at}", type_name(c.candidate_type))
        };
        let used = |c: &CandidateStats| {
            pairs.iter().any(|p| {
                p.remote_candidate_id == c.id
                    && (p.nominated || p.state == CandidatePairState::Succeeded)
            })
        };
        let copy = |c: &CandidateStats| {
            c.candidate_type == CandidateType::PeerReflexive
                && !used(c)
                && remote.iter().any(|o| {
                    o.candidate_type != CandidateType::PeerReflexive
                        && (o.ip.as_str(), o.port) == (c.ip.as_str(), c.port)
                })
        };
        let remote: Vec<&CandidateStats> = remote.iter().filter(|c| !copy(c)).collect();
        let by_id = |id: &str| {
            local
                .iter()
                .chain(remote.iter().copied())
                .find(|c| c.id == id)
        };
        let family =
            |c: &CandidateStats| c.ip.parse::<std::net::IpAddr>().ok().map(|ip| ip.is_ipv6());
        let real = |p: &&CandidatePairStats| match (
            by_id(&p.local_candidate_id),
            by_id(&p.remote_candidate_id),
        ) {
            (Some(l), Some(r)) => family(l) == family(r),
            // A copy that was left out, or a candidate the stats lack.
            (Some(_), None) => false,
            _ => true,
        };
        let find = |id: &str| by_id(id).map(describe).unwrap_or_else(|| id.to_owned());
        Attempt {
            local: local.iter().map(describe).collect(),
            remote: remote.iter().copied().map(describe).collect(),
            pairs: pairs
                .iter()
                .filter(real)
                .map(|p| PairReport {
                    local: find(&p.local_candidate_id),
                    remote: find(&p.remote_candidate_id),
                    outcome: outcome(p.state).to_owned(),
                    nominated: p.nominated,
                })
                .collect(),
        }
    }
}

/// Whether a pair that no relay carries has passed its checks: neither
/// candidate is a relay, and the remote one is not a peer-reflexive copy of a
/// relay the peer signalled (a check from its relay that came first). The
/// nominated pair does not count: asked about when it was selected, it may
/// be such a copy whose relay has not been signalled yet.
pub fn direct_pair_succeeded(
    local: &[CandidateStats],
    remote: &[CandidateStats],
    pairs: &[CandidatePairStats],
) -> bool {
    let relayed_at = |c: &CandidateStats| {
        remote.iter().any(|r| {
            r.candidate_type == CandidateType::Relay
                && (r.ip.as_str(), r.port) == (c.ip.as_str(), c.port)
        })
    };
    let direct = |id: &str, side: &[CandidateStats]| {
        side.iter()
            .find(|c| c.id == id)
            .is_some_and(|c| c.candidate_type != CandidateType::Relay && !relayed_at(c))
    };
    pairs.iter().any(|p| {
        p.state == CandidatePairState::Succeeded
            && !p.nominated
            && direct(&p.local_candidate_id, local)
            && direct(&p.remote_candidate_id, remote)
    })
}

fn type_name(t: CandidateType) -> &'static str {
    match t {
        CandidateType::Host => "host",
        CandidateType::ServerReflexive => "srflx",
        CandidateType::PeerReflexive => "prflx",
        CandidateType::Relay => "relay",
        CandidateType::Unspecified => "unknown",
    }
}

fn outcome(state: CandidatePairState) -> &'static str {
    match state {
        CandidatePairState::Succeeded => "succeeded",
        CandidatePairState::Failed => "failed (no answer)",
        CandidatePairState::InProgress => "in progress",
        CandidatePairState::Waiting | CandidatePairState::Unspecified => "waiting",
    }
}

/// The facts the conclusion is drawn from.
pub struct Evidence<'a> {
    pub peer: &'a str,
    pub online: bool,
    pub coordinator_connected: bool,
    pub path_kind: PathKind,
    pub path: &'a str,
    pub checking: bool,
    pub local_nat: Option<&'a NatSummary>,
    pub remote_nat: Option<&'a NatSummary>,
    pub next_attempt_in_secs: Option<u64>,
}

fn symmetric(nat: Option<&NatSummary>) -> bool {
    nat.is_some_and(|n| n.mapping == MappingBehaviour::EndpointDependent)
}

fn no_udp(nat: Option<&NatSummary>) -> bool {
    nat.is_some_and(|n| !n.udp)
}

pub fn conclude(e: &Evidence) -> String {
    let retry = match e.next_attempt_in_secs {
        Some(s) => format!("; the next direct attempt is in {s}s"),
        None => String::new(),
    };
    match e.path_kind {
        PathKind::Direct => format!(
            "packets go straight to {} ({}); nothing is relayed",
            e.peer, e.path
        ),
        PathKind::Turn => {
            let via = e.path.trim_start_matches("turn (").trim_end_matches(')');
            let why = match (symmetric(e.local_nat), symmetric(e.remote_nat)) {
                (true, true) => "both sides are behind NATs that change the port per destination; no direct path is possible".to_owned(),
                (true, false) => "this node is behind a NAT that changes the port per destination, and no direct pair answered".to_owned(),
                (false, true) => format!("{} is behind a NAT that changes the port per destination, and no direct pair answered", e.peer),
                (false, false) => "no direct candidate pair answered ICE checks (a firewall may drop UDP between the sites)".to_owned(),
            };
            format!("{why}; using TURN, {via}{retry}")
        }
        PathKind::CoordRelay => {
            let why = if no_udp(e.local_nat) {
                "this node gets no UDP out (no STUN server answered), so only the coordination server's relay over TCP works".to_owned()
            } else if no_udp(e.remote_nat) {
                format!("{} gets no UDP out (no STUN server answered), so only the coordination server's relay over TCP works", e.peer)
            } else if e.checking {
                "ICE is still checking candidate pairs; packets use the coordination relay meanwhile".to_owned()
            } else {
                "ICE found no working pair, neither direct nor through TURN; packets use the coordination relay".to_owned()
            };
            format!("{why}{retry}")
        }
        PathKind::Connecting if !e.online => format!("{} is offline", e.peer),
        PathKind::Connecting if !e.coordinator_connected => {
            "the coordinator is unreachable and no direct path is established yet".to_owned()
        }
        PathKind::Connecting => "no path yet; ICE and the relay are being set up".to_owned(),
        PathKind::Idle => format!(
            "no packets to or from {} for the idle timeout, so no ICE session and no keepalives; \
             the next packet goes by the coordination relay while ICE starts again",
            e.peer
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(udp: bool, mapping: MappingBehaviour) -> NatSummary {
        NatSummary {
            udp,
            mapping,
            public_addr: None,
        }
    }

    fn evidence<'a>(
        kind: PathKind,
        path: &'a str,
        l: Option<&'a NatSummary>,
        r: Option<&'a NatSummary>,
    ) -> Evidence<'a> {
        Evidence {
            peer: "b",
            online: true,
            coordinator_connected: true,
            path_kind: kind,
            path,
            checking: false,
            local_nat: l,
            remote_nat: r,
            next_attempt_in_secs: None,
        }
    }

    #[test]
    fn two_symmetric_nats_explain_turn() {
        let s = nat(true, MappingBehaviour::EndpointDependent);
        let e = evidence(
            PathKind::Turn,
            "turn (relay via 203.0.113.1:50000)",
            Some(&s),
            Some(&s),
        );
        assert_eq!(
            conclude(&e),
            "both sides are behind NATs that change the port per destination; no direct path is possible; using TURN, relay via 203.0.113.1:50000"
        );
    }

    #[test]
    fn blocked_udp_explains_the_coordination_relay() {
        let blocked = nat(false, MappingBehaviour::NoUdp);
        let cone = nat(true, MappingBehaviour::EndpointIndependent);
        let mut e = evidence(
            PathKind::CoordRelay,
            "coord relay",
            Some(&cone),
            Some(&blocked),
        );
        e.next_attempt_in_secs = Some(64);
        let c = conclude(&e);
        assert!(c.starts_with("b gets no UDP out"), "{c}");
        assert!(c.ends_with("the next direct attempt is in 64s"), "{c}");
    }

    fn candidate(id: &str, typ: CandidateType, ip: &str, port: u16) -> CandidateStats {
        CandidateStats {
            id: id.into(),
            candidate_type: typ,
            ip: ip.into(),
            port,
            ..CandidateStats::default()
        }
    }

    #[test]
    fn ipv6_candidates_and_pairs_read_as_bracketed_addresses() {
        let local = [
            candidate("l4", CandidateType::Host, "10.0.0.1", 5000),
            candidate("l6", CandidateType::Host, "2001:db8:1::2", 5000),
        ];
        let remote = [candidate(
            "r6",
            CandidateType::ServerReflexive,
            "2001:db8:2::2",
            6000,
        )];
        let pairs = [CandidatePairStats {
            local_candidate_id: "l6".into(),
            remote_candidate_id: "r6".into(),
            state: CandidatePairState::Succeeded,
            nominated: true,
            ..CandidatePairStats::default()
        }];
        let a = Attempt::from_stats(&local, &remote, &pairs);
        assert_eq!(a.local, ["host 10.0.0.1:5000", "host [2001:db8:1::2]:5000"]);
        assert_eq!(a.remote, ["srflx [2001:db8:2::2]:6000"]);
        assert_eq!(a.pairs[0].local, "host [2001:db8:1::2]:5000");
        assert_eq!(a.pairs[0].remote, "srflx [2001:db8:2::2]:6000");
        assert_eq!(a.pairs[0].outcome, "succeeded");
    }

    #[test]
    fn cross_family_pairs_and_prflx_copies_of_signalled_candidates_are_left_out() {
        let local = [
            candidate("l4", CandidateType::Host, "10.0.0.1", 5000),
            candidate("l6", CandidateType::Host, "2001:db8:1::2", 5000),
        ];
        let remote = [
            candidate("r4", CandidateType::Host, "10.0.0.2", 6000),
            candidate("c4", CandidateType::PeerReflexive, "10.0.0.2", 6000),
            candidate("r6", CandidateType::Host, "2001:db8:1::3", 6000),
            candidate("p4", CandidateType::PeerReflexive, "198.51.100.7", 7000),
            candidate("u6", CandidateType::PeerReflexive, "2001:db8:1::3", 6000),
        ];
        let pair = |l: &str, r: &str| CandidatePairStats {
            local_candidate_id: l.into(),
            remote_candidate_id: r.into(),
            state: CandidatePairState::InProgress,
            ..CandidatePairStats::default()
        };
        let pairs = [
            pair("l4", "r4"),
            pair("l6", "r6"),
            pair("l6", "c4"),
            pair("l4", "c4"),
            pair("l6", "r4"),
            pair("l4", "p4"),
            CandidatePairStats {
                state: CandidatePairState::Succeeded,
                ..pair("l6", "u6")
            },
        ];
        let a = Attempt::from_stats(&local, &remote, &pairs);
        assert_eq!(
            a.remote,
            [
                "host 10.0.0.2:6000",
                "host [2001:db8:1::3]:6000",
                "prflx 198.51.100.7:7000",
                "prflx [2001:db8:1::3]:6000"
            ]
        );
        let shown: Vec<(&str, &str)> = a
            .pairs
            .iter()
            .map(|p| (p.local.as_str(), p.remote.as_str()))
            .collect();
        assert_eq!(
            shown,
            [
                ("host 10.0.0.1:5000", "host 10.0.0.2:6000"),
                ("host [2001:db8:1::2]:5000", "host [2001:db8:1::3]:6000"),
                ("host 10.0.0.1:5000", "prflx 198.51.100.7:7000"),
                ("host [2001:db8:1::2]:5000", "prflx [2001:db8:1::3]:6000"),
            ]
        );
    }

    #[test]
    fn direct_and_offline_are_plain() {
        let e = evidence(PathKind::Direct, "direct (srflx)", None, None);
        assert!(conclude(&e).contains("straight to b (direct (srflx))"));
        let mut e = evidence(PathKind::Connecting, "connecting", None, None);
        e.online = false;
        assert_eq!(conclude(&e), "b is offline");
    }

    #[test]
    fn a_direct_pair_counts_only_when_it_passed_and_no_relay_carries_it() {
        use CandidatePairState::{InProgress, Succeeded};
        let local = [
            candidate("host", CandidateType::Host, "203.0.113.4", 5000),
            candidate("relay", CandidateType::Relay, "203.0.113.1", 40000),
        ];
        // The peer's srflx, its relay, and a peer-reflexive copy of that relay
        // (a check from it came before the signal).
        let remote = [
            candidate("srflx", CandidateType::ServerReflexive, "203.0.113.3", 6000),
            candidate("relay", CandidateType::Relay, "203.0.113.1", 41000),
            candidate("copy", CandidateType::PeerReflexive, "203.0.113.1", 41000),
        ];
        let pair = |l: &str, r: &str, state| CandidatePairStats {
            local_candidate_id: l.into(),
            remote_candidate_id: r.into(),
            state,
            ..CandidatePairStats::default()
        };
        let seen = |pairs: &[CandidatePairStats]| direct_pair_succeeded(&local, &remote, pairs);
        let nominated = |l: &str, r: &str| CandidatePairStats {
            nominated: true,
            ..pair(l, r, Succeeded)
        };
        assert!(
            !seen(&[nominated("host", "srflx")]),
            "the selected pair itself"
        );
        assert!(seen(&[pair("host", "srflx", Succeeded)]));
        assert!(
            !seen(&[pair("host", "srflx", InProgress)]),
            "not yet passed"
        );
        assert!(!seen(&[pair("relay", "srflx", Succeeded)]), "our relay");
        assert!(!seen(&[pair("host", "relay", Succeeded)]), "their relay");
        assert!(
            !seen(&[pair("host", "copy", Succeeded)]),
            "their relay by another name"
        );
        assert!(
            !seen(&[pair("host", "gone", Succeeded)]),
            "an unknown candidate"
        );
        assert!(seen(&[
            pair("host", "copy", Succeeded),
            pair("host", "srflx", Succeeded)
        ]));
    }
}
