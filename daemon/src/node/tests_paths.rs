//! The node's path decisions and timers, on fake time (see `testkit`).

use std::time::{Duration, Instant};

use overlay_proto::api::PathKind;
use overlay_proto::coord::{IceConfig, ServerMsg, TurnServer};
use overlay_proto::signal::{MappingBehaviour, NatSummary, PeerSignal};

use super::ice_refresh::REFRESH_RETRY;
use super::path::{CandidateKind, CHECK_TIMEOUT, RETRY_BASE, RETRY_CAP, UPGRADE_BASE};
use super::testkit::*;
use super::{IceInput, Output, NETCHECK_INTERVAL, POLL_INTERVAL};

#[test]
fn a_direct_pair_on_the_shared_socket_gets_an_endpoint() {
    let mut m = Mesh::new();
    m.connect_with(host_pair());
    let route = m.route_a();
    assert_eq!(route.endpoint, Some("10.0.0.2:6000".parse().unwrap()));
    assert_eq!(route.ice_conn, m.a.session(B));
    assert_eq!(route.view.kind, PathKind::Direct);
    assert_eq!(route.view.log_label(), "direct (host) via 10.0.0.2:6000");
}

#[test]
fn a_turn_pair_uses_the_ice_connection_and_no_endpoint() {
    let mut m = Mesh::new();
    m.connect_with(turn_pair());
    let route = m.route_a();
    assert_eq!(route.endpoint, None);
    assert!(route.ice_conn.is_some());
    assert_eq!(route.view.label, "turn (relay via 192.0.2.9:3478)");
}

#[test]
fn packets_take_the_relay_until_the_connection_is_ready() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let session = m.a.session(B).unwrap();
    m.a.handle_ice(B, session, IceInput::Selected(host_pair()), m.now);
    m.a.handle_ice(B, session, IceInput::Connected, m.now);
    m.run();
    assert_eq!(m.route_a().view.kind, PathKind::CoordRelay);
    m.a.handle_ice(B, session, IceInput::Ready, m.now);
    m.run();
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
}

#[test]
fn consent_lost_falls_back_to_the_relay_then_a_new_session_goes_direct_again() {
    let mut m = Mesh::new();
    m.connect_with(host_pair());
    let first = m.a.session(B).unwrap();
    m.a.handle_ice(B, first, IceInput::Disconnected, m.now);
    m.run();
    assert_eq!(m.route_a().view.kind, PathKind::CoordRelay);
    assert_eq!(m.route_a().endpoint, None);
    m.a.handle_ice(B, first, IceInput::Failed, m.now);
    m.run();
    assert!(m.log_a.contains(&Output::RecordAttempt {
        peer: B,
        session: first
    }));
    assert!(m.log_a.contains(&Output::CloseIce {
        peer: B,
        session: first
    }));
    m.advance(RETRY_BASE);
    let second = m.a.session(B).expect("a new session after the backoff");
    assert_ne!(first, second);
    m.connect_with(host_pair());
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
    assert_eq!(m.route_a().ice_conn, Some(second));
}

#[test]
fn ice_recovering_by_itself_restores_the_path_without_a_new_session() {
    let mut m = Mesh::new();
    m.connect_with(host_pair());
    let session = m.a.session(B).unwrap();
    m.a.handle_ice(B, session, IceInput::Disconnected, m.now);
    m.a.handle_ice(B, session, IceInput::Connected, m.now);
    m.run();
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
    assert_eq!(m.a.session(B), Some(session));
}

#[test]
fn failed_sessions_retry_on_a_doubling_capped_schedule() {
    let mut m = Mesh::new();
    m.carry = false;
    m.advance(Duration::ZERO);
    let mut gaps = Vec::new();
    for _ in 0..9 {
        let session = m.a.session(B).unwrap();
        m.a.handle_ice(B, session, IceInput::Error("x".into()), m.now);
        m.run();
        let failed_at = m.now;
        while m.a.session(B).is_none() {
            m.advance(POLL_INTERVAL);
        }
        gaps.push(m.now - failed_at);
    }
    // Equal jitter: each gap lies in [ceiling / 2, ceiling + one poll].
    let mut ceiling = RETRY_BASE;
    for gap in gaps {
        assert!(
            gap >= ceiling / 2 && gap <= ceiling + POLL_INTERVAL,
            "{gap:?} vs {ceiling:?}"
        );
        ceiling = (ceiling * 2).min(RETRY_CAP);
    }
}

#[test]
fn a_session_checking_too_long_is_failed_and_retried() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let first = m.a.session(B).unwrap();
    m.advance(CHECK_TIMEOUT - POLL_INTERVAL);
    assert_eq!(m.a.session(B), Some(first));
    m.advance(POLL_INTERVAL);
    m.advance(RETRY_BASE);
    let second = m.a.session(B).unwrap();
    assert_ne!(first, second);
}

#[test]
fn a_turn_path_tries_for_a_direct_one_later() {
    let mut m = Mesh::new();
    m.connect_with(turn_pair());
    let on_turn = m.a.session(B).unwrap();
    m.advance(POLL_INTERVAL);
    m.advance(UPGRADE_BASE);
    let upgrade = m.a.session(B).unwrap();
    assert_ne!(on_turn, upgrade, "a new session to look for a direct path");
    m.connect_with(host_pair());
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
}

#[test]
fn a_signalled_host_candidate_names_a_peer_reflexive_pair() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let session = m.a.session(B).unwrap();
    m.a.remote_candidate_added(B, session, "10.0.0.2:6000".into(), CandidateKind::Host);
    let mut pair = host_pair();
    pair.remote = CandidateKind::Prflx;
    m.a.handle_ice(B, session, IceInput::Selected(pair), m.now);
    m.a.handle_ice(B, session, IceInput::Ready, m.now);
    m.run();
    assert_eq!(m.route_a().view.label, "direct (host)");
}

fn ice_with_turn(expires_at: u64) -> IceConfig {
    IceConfig {
        turn: vec![TurnServer {
            urls: vec!["turn:192.0.2.9:3478?transport=udp".into()],
            username: "u".into(),
            credential: "c".into(),
            expires_at,
        }],
        ..IceConfig::default()
    }
}

fn refreshes(outputs: &[Output]) -> usize {
    outputs.iter().filter(|o| **o == Output::RefreshIce).count()
}

#[test]
fn turn_credentials_are_refreshed_before_they_expire_and_retried_without_answer() {
    let t0 = Instant::now();
    let unix = 1_000_000;
    let mut node = new_node(A, t0, 1);
    // One hour left: ask after 45 minutes (three quarters), not later.
    node.handle_server_msg(welcome(vec![], ice_with_turn(unix + 3600), false), t0, unix);
    drain(&mut node);
    let due = t0 + Duration::from_secs(2700);
    assert_eq!(node.poll_timeout(), Some(due));
    node.handle_timeout(due - Duration::from_secs(1));
    assert_eq!(refreshes(&drain(&mut node)), 0);
    node.handle_timeout(due);
    assert_eq!(refreshes(&drain(&mut node)), 1);
    node.handle_timeout(due + REFRESH_RETRY - Duration::from_secs(1));
    assert_eq!(refreshes(&drain(&mut node)), 0);
    node.handle_timeout(due + REFRESH_RETRY);
    assert_eq!(refreshes(&drain(&mut node)), 1, "no answer came: ask again");
    // The answer schedules the next refresh from its own expiry.
    let now = due + REFRESH_RETRY;
    let later = unix + 2700 + 60;
    node.handle_server_msg(
        ServerMsg::IceConfig {
            ice: ice_with_turn(later + 3600),
        },
        now,
        later,
    );
    assert!(matches!(
        drain(&mut node).as_slice(),
        [Output::IceSettings(_)]
    ));
    node.handle_timeout(now + Duration::from_secs(2699));
    assert_eq!(refreshes(&drain(&mut node)), 0);
}

#[test]
fn turn_refresh_waits_for_the_coordinator() {
    let t0 = Instant::now();
    let mut node = new_node(A, t0, 1);
    node.handle_server_msg(welcome(vec![], ice_with_turn(3600), false), t0, 0);
    node.set_coordinator_connected(false);
    let late = t0 + Duration::from_secs(3600);
    node.handle_timeout(late);
    assert_eq!(refreshes(&drain(&mut node)), 0);
    assert_eq!(
        node.poll_timeout(),
        Some(late + POLL_INTERVAL),
        "an overdue refresh that cannot be sent does not make the shell spin"
    );
    node.set_coordinator_connected(true);
    node.handle_timeout(t0 + Duration::from_secs(3601));
    assert_eq!(refreshes(&drain(&mut node)), 1);
}

#[test]
fn netcheck_runs_on_the_first_welcome_and_again_only_after_its_interval() {
    let t0 = Instant::now();
    let mut node = new_node(A, t0, 1);
    let netchecks = |node: &mut super::Node, at| {
        node.handle_server_msg(welcome(vec![], IceConfig::default(), false), at, 0);
        drain(node)
            .iter()
            .filter(|o| **o == Output::Netcheck)
            .count()
    };
    assert_eq!(netchecks(&mut node, t0), 1);
    assert_eq!(
        netchecks(&mut node, t0 + Duration::from_secs(5)),
        0,
        "a reconnect"
    );
    assert_eq!(netchecks(&mut node, t0 + NETCHECK_INTERVAL), 1);
}

#[test]
fn a_netcheck_result_reaches_online_peers_and_sessions_under_way() {
    let mut m = Mesh::new();
    m.carry = false;
    m.advance(Duration::ZERO);
    let session = m.a.session(B).unwrap();
    let nat = NatSummary {
        udp: true,
        public_addr: Some("203.0.113.7:4000".parse().unwrap()),
        mapping: MappingBehaviour::EndpointIndependent,
    };
    m.a.handle_netcheck(nat.clone(), Some("srflx line".into()), m.now);
    let sent: Vec<_> = sealed(&drain(&mut m.a))
        .into_iter()
        .map(|s| s.signal)
        .collect();
    assert_eq!(
        sent,
        vec![
            PeerSignal::Candidate {
                session,
                candidate: "srflx line".into()
            },
            PeerSignal::NetInfo { nat: nat.clone() },
        ]
    );
    // The same srflx again is not news; the summary still goes out.
    m.a.handle_netcheck(nat, Some("srflx line".into()), m.now);
    assert_eq!(sealed(&drain(&mut m.a)).len(), 1);
}

#[test]
fn an_ipv6_srflx_goes_out_beside_the_ipv4_one_and_to_later_sessions_too() {
    let mut m = Mesh::new();
    m.carry = false;
    m.advance(Duration::ZERO);
    let session = m.a.session(B).unwrap();
    let nat = NatSummary {
        udp: true,
        public_addr: Some("203.0.113.7:4000".parse().unwrap()),
        mapping: MappingBehaviour::EndpointDependent,
    };
    let lines = vec!["srflx v4".to_owned(), "srflx v6".to_owned()];
    m.a.handle_netcheck(nat.clone(), lines.clone(), m.now);
    let candidates = |signals: Vec<PeerSignal>| -> Vec<String> {
        signals
            .into_iter()
            .filter_map(|s| match s {
                PeerSignal::Candidate { candidate, .. } => Some(candidate),
                _ => None,
            })
            .collect()
    };
    let sent: Vec<_> = sealed(&drain(&mut m.a))
        .into_iter()
        .map(|s| s.signal)
        .collect();
    assert_eq!(candidates(sent.clone()), lines);
    assert!(sent.contains(&PeerSignal::NetInfo { nat: nat.clone() }));
    assert!(sent
        .iter()
        .all(|s| !matches!(s, PeerSignal::Candidate { session: other, .. } if *other != session)));
    // A netcheck that found only IPv4 this time replaces the pair.
    m.a.handle_netcheck(nat, Some("srflx v4".to_owned()), m.now);
    let sent: Vec<_> = sealed(&drain(&mut m.a))
        .into_iter()
        .map(|s| s.signal)
        .collect();
    assert_eq!(candidates(sent), ["srflx v4"]);
}

#[test]
fn the_node_wakes_up_every_poll_interval() {
    let t0 = Instant::now();
    let mut node = new_node(A, t0, 1);
    assert_eq!(node.poll_timeout(), None, "not started yet");
    node.handle_timeout(t0);
    assert_eq!(node.poll_timeout(), Some(t0 + POLL_INTERVAL));
}

#[test]
fn the_same_seed_and_inputs_give_the_same_decisions() {
    let run = || {
        let mut m = Mesh::new();
        m.carry = false;
        for _ in 0..5 {
            m.advance(Duration::ZERO);
            let s = m.a.session(B).unwrap();
            m.a.handle_ice(B, s, IceInput::Failed, m.now);
            m.advance(RETRY_CAP);
        }
        (starts(&m.log_a), m.log_a.len())
    };
    assert_eq!(run(), run());
}

#[test]
fn an_agent_that_cannot_be_created_is_retried_after_the_backoff() {
    let mut m = Mesh::new();
    m.a.handle_timeout(m.now);
    let session = starts(&drain(&mut m.a))[0];
    m.a.ice_create_failed(B, session, m.now);
    assert_eq!(m.a.session(B), None);
    m.a.handle_timeout(m.now + RETRY_BASE / 2 - Duration::from_millis(1));
    assert!(starts(&drain(&mut m.a)).is_empty(), "backing off");
    m.a.handle_timeout(m.now + RETRY_BASE);
    assert_eq!(starts(&drain(&mut m.a)).len(), 1);
}

#[test]
fn a_restart_request_during_a_netmap_in_parts_is_served_and_the_netmap_keeps_it() {
    let mut m = Mesh::new();
    m.connect_with(host_pair());
    let old = m.a.session(B).unwrap();
    m.now += Duration::from_secs(5);
    m.a.handle_server_msg(welcome(vec![], IceConfig::default(), true), m.now, 0);
    let request = forged(
        B,
        A,
        UNIX_T0 * 2,
        PeerSignal::RestartRequest {
            reason: "restarted".into(),
        },
    );
    m.a.handle_signal(B, request, m.now);
    m.run();
    let new = m.a.session(B).unwrap();
    assert_ne!(old, new);
    m.a.handle_server_msg(
        ServerMsg::PeerBatch {
            peers: vec![info(B, true)],
            last: true,
        },
        m.now,
        0,
    );
    let out = drain(&mut m.a);
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::CloseIce { .. } | Output::PeerRemoved(_))),
        "{out:?}"
    );
    assert_eq!(m.a.session(B), Some(new));
}

/// ICE nominated a TURN pair although a direct pair had passed its checks
/// (a check from the peer's relay, read as peer-reflexive, outranked it):
/// at the next poll the controlling side opens a session in which neither
/// side gathers relays, and that one goes direct.
#[test]
fn turn_chosen_over_a_working_direct_pair_is_retried_without_relays_at_once() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let first = m.a.session(B).unwrap();
    for (node, peer) in [(&mut m.a, B), (&mut m.b, A)] {
        node.handle_ice(peer, first, IceInput::Selected(turn_pair()), m.now);
        node.handle_ice(peer, first, IceInput::DirectSeen, m.now);
        node.handle_ice(peer, first, IceInput::Ready, m.now);
    }
    m.run();
    assert_eq!(m.route_a().view.kind, PathKind::Turn);

    m.advance(POLL_INTERVAL);
    let second = m.a.session(B).expect("a new session");
    assert_ne!(first, second);
    let direct_only = |log: &[Output], controlling: bool| {
        log.contains(&Output::StartIce {
            peer: if controlling { B } else { A },
            session: second,
            controlling,
            direct_only: true,
        })
    };
    assert!(direct_only(&m.log_a, true), "{:?}", m.log_a);
    assert!(
        direct_only(&m.log_b, false),
        "the offer said so: {:?}",
        m.log_b
    );
    assert_eq!(m.route_a().view.kind, PathKind::CoordRelay);
    m.connect_with(host_pair());
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
    assert_eq!(starts(&m.log_a).len(), 2, "no further session");
}
