//! Lazy peers on fake time (see `idle.rs` and `testkit`).

use std::time::Duration;

use overlay_proto::api::PathKind;
use overlay_proto::signal::PeerSignal;

use super::path::{OFFER_GRACE, RETRY_CAP};
use super::testkit::*;
use super::{Output, POLL_INTERVAL};

const IDLE: Duration = Duration::from_secs(30);

/// Two nodes with the idle timeout, direct with each other.
fn direct_mesh() -> Mesh {
    let mut m = Mesh::new();
    m.a.set_idle_timeout(Some(IDLE));
    m.b.set_idle_timeout(Some(IDLE));
    m.connect_with(host_pair());
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
    m
}

fn route_b(m: &Mesh) -> super::Route {
    routes(&m.log_b).pop().expect("a route")
}

/// Advances in poll steps up to `by`, reporting data on both sides each step
/// when `traffic`.
fn run_for(m: &mut Mesh, by: Duration, traffic: bool) {
    let end = m.now + by;
    while m.now < end {
        if traffic {
            m.a.peer_activity(B, m.now);
            m.b.peer_activity(A, m.now);
        }
        m.advance(POLL_INTERVAL);
    }
}

fn idles(log: &[Output], peer: u64) -> Vec<bool> {
    log.iter()
        .filter_map(|o| match o {
            Output::Idle { peer: p, idle } if *p == peer => Some(*idle),
            _ => None,
        })
        .collect()
}

#[test]
fn a_peer_without_traffic_turns_idle_after_the_timeout_and_then_costs_nothing() {
    let mut m = direct_mesh();
    let session = m.a.session(B).unwrap();
    run_for(&mut m, IDLE - POLL_INTERVAL, false);
    assert_eq!(m.route_a().view.kind, PathKind::Direct, "not idle yet");
    assert!(idles(&m.log_a, B).is_empty());
    m.advance(POLL_INTERVAL);
    assert_eq!(idles(&m.log_a, B), vec![true]);
    assert_eq!(idles(&m.log_b, A), vec![true]);
    assert!(m.log_a.contains(&Output::CloseIce { peer: B, session }));
    assert_eq!(m.a.session(B), None);
    let route = m.route_a();
    assert_eq!(route.view.kind, PathKind::Idle);
    assert_eq!(route.view.label, "idle");
    assert_eq!((route.endpoint, route.ice_conn), (None, None));
    assert_eq!(route_b(&m).view.kind, PathKind::Idle);
    let report = m.a.peer_report(B).unwrap();
    assert_eq!(report.next_attempt, None, "nothing scheduled while idle");

    // Long after: no session, no signal, no route change on either side.
    let (seen_a, seen_b) = (m.log_a.len(), m.log_b.len());
    run_for(&mut m, RETRY_CAP * 3, false);
    assert_eq!(m.log_a.len(), seen_a, "{:?}", &m.log_a[seen_a..]);
    assert_eq!(m.log_b.len(), seen_b, "{:?}", &m.log_b[seen_b..]);
}

#[test]
fn a_peer_with_traffic_stays_on_its_path() {
    let mut m = direct_mesh();
    let session = m.a.session(B).unwrap();
    run_for(&mut m, IDLE * 4, true);
    assert!(idles(&m.log_a, B).is_empty());
    assert_eq!(m.a.session(B), Some(session));
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
}

#[test]
fn data_wakes_an_idle_peer_a_session_starts_at_once_and_the_relay_carries_meanwhile() {
    let mut m = direct_mesh();
    let old = m.a.session(B).unwrap();
    run_for(&mut m, IDLE + POLL_INTERVAL, false);
    assert_eq!(m.route_a().view.kind, PathKind::Idle);
    let before = m.log_a.len();

    // A packet to B: reported at once, no timeout runs.
    m.a.peer_activity(B, m.now);
    m.run();
    let woke = &m.log_a[before..];
    assert_eq!(idles(woke, B), vec![false]);
    let new = starts(woke);
    assert_eq!(new.len(), 1, "{woke:?}");
    assert_ne!(new[0], old);
    assert_eq!(
        m.route_a().view.kind,
        PathKind::CoordRelay,
        "relay meanwhile"
    );
    // The controlled side woke on the offer, without data of its own yet.
    assert_eq!(idles(&m.log_b, A), vec![true, false]);
    assert_eq!(m.b.session(A), Some(new[0]));
    assert_eq!(route_b(&m).view.kind, PathKind::CoordRelay);

    m.connect_with(host_pair());
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
    assert_eq!(route_b(&m).view.kind, PathKind::Direct);
}

#[test]
fn data_on_the_controlled_side_wakes_it_and_it_asks_for_a_session() {
    let mut m = Mesh::new();
    m.b.set_idle_timeout(Some(IDLE));
    m.connect_with(host_pair());
    run_for(&mut m, IDLE + POLL_INTERVAL, false);
    assert_eq!(route_b(&m).view.kind, PathKind::Idle);
    // Only B went idle: A (no timeout) lost the pair and is relayed.
    let session = m.a.session(B).unwrap();
    m.a.handle_ice(B, session, super::IceInput::Failed, m.now);
    m.run();
    assert_eq!(idles(&m.log_a, B), Vec::<bool>::new());

    m.carry = false;
    m.b.peer_activity(A, m.now);
    m.run();
    assert_eq!(idles(&m.log_b, A), vec![true, false]);
    assert_eq!(route_b(&m).view.kind, PathKind::CoordRelay);
    let asked = |log: &[Output]| {
        sealed(log)
            .iter()
            .filter(|s| matches!(s.signal, PeerSignal::RestartRequest { .. }))
            .count()
    };
    let before = asked(&m.log_b);
    run_for(&mut m, OFFER_GRACE, true);
    assert_eq!(
        asked(&m.log_b),
        before + 1,
        "asks once the offer grace ran out"
    );
}

#[test]
fn an_idle_controlling_node_ignores_restart_requests() {
    let mut m = direct_mesh();
    run_for(&mut m, IDLE + POLL_INTERVAL, false);
    let request = forged(
        B,
        A,
        UNIX_T0 * 2,
        PeerSignal::RestartRequest {
            reason: "no working ICE session".into(),
        },
    );
    m.a.handle_signal(B, request, m.now);
    m.run();
    assert_eq!(m.a.session(B), None);
    assert_eq!(m.route_a().view.kind, PathKind::Idle);
}

#[test]
fn a_zero_timeout_turns_laziness_off() {
    let mut m = Mesh::new();
    m.a.set_idle_timeout(Some(Duration::ZERO));
    m.connect_with(host_pair());
    run_for(&mut m, RETRY_CAP, false);
    assert!(idles(&m.log_a, B).is_empty());
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
}

#[test]
fn an_idle_peer_going_offline_and_back_stays_idle_until_traffic() {
    let mut m = direct_mesh();
    run_for(&mut m, IDLE + POLL_INTERVAL, false);
    for online in [false, true] {
        m.a.handle_server_msg(
            overlay_proto::coord::ServerMsg::PeerUpsert {
                peer: info(B, online),
            },
            m.now,
            0,
        );
        m.run();
    }
    run_for(&mut m, RETRY_CAP, false);
    assert_eq!(m.a.session(B), None);
    assert_eq!(m.route_a().view.kind, PathKind::Idle);
    m.a.peer_activity(B, m.now);
    m.run();
    assert!(m.a.session(B).is_some());
}

#[test]
fn with_laziness_a_new_peer_starts_idle_and_costs_nothing_until_its_first_packet() {
    let mut m = Mesh::with_idle_timeout(Some(IDLE));
    for (log, peer) in [(&m.log_a, B), (&m.log_b, A)] {
        assert_eq!(idles(log, peer), vec![true]);
        assert_eq!(
            routes(log).pop().expect("a route").view.kind,
            PathKind::Idle
        );
        assert!(starts(log).is_empty(), "{log:?}");
    }
    assert!(m.a.awake.is_empty() && m.b.awake.is_empty());
    let (seen_a, seen_b) = (m.log_a.len(), m.log_b.len());
    run_for(&mut m, RETRY_CAP * 2, false);
    assert_eq!(m.log_a.len(), seen_a, "{:?}", &m.log_a[seen_a..]);
    assert_eq!(m.log_b.len(), seen_b, "{:?}", &m.log_b[seen_b..]);

    // The first packet to B: A (controlling) offers at once, B wakes on it.
    m.a.peer_activity(B, m.now);
    m.run();
    assert_eq!(idles(&m.log_a, B), vec![true, false]);
    assert_eq!(idles(&m.log_b, A), vec![true, false]);
    assert_eq!(m.route_a().view.kind, PathKind::CoordRelay);
    assert!(m.a.awake.contains(&B) && m.b.awake.contains(&A));
    m.connect_with(host_pair());
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
    assert_eq!(route_b(&m).view.kind, PathKind::Direct);

    // Quiet again: idle, and no longer visited by polls.
    run_for(&mut m, IDLE + POLL_INTERVAL, false);
    assert_eq!(m.route_a().view.kind, PathKind::Idle);
    assert!(m.a.awake.is_empty() && m.b.awake.is_empty());
}

#[test]
fn a_new_idle_peer_that_speaks_first_is_woken_by_its_packet() {
    let mut m = Mesh::with_idle_timeout(Some(IDLE));
    // B (controlled) sends: it wakes and waits for an offer; its packet,
    // carried by the relay, is data on A's side too, and A offers.
    m.b.peer_activity(A, m.now);
    m.run();
    assert_eq!(route_b(&m).view.kind, PathKind::CoordRelay);
    assert!(
        starts(&m.log_b).is_empty(),
        "the controlled side does not offer"
    );
    m.a.peer_activity(B, m.now);
    m.connect_with(host_pair());
    assert_eq!(m.route_a().view.kind, PathKind::Direct);
    assert_eq!(route_b(&m).view.kind, PathKind::Direct);
}

#[test]
fn a_removed_peer_leaves_the_awake_set() {
    let mut m = Mesh::new();
    assert!(
        m.a.awake.contains(&B),
        "without laziness every peer is awake"
    );
    m.a.handle_server_msg(
        overlay_proto::coord::ServerMsg::PeerRemoved { id: B },
        m.now,
        0,
    );
    m.run();
    assert!(m.a.awake.is_empty());
}

#[test]
fn idle_peers_hear_our_netcheck_summary_only_when_they_wake() {
    use overlay_proto::signal::{MappingBehaviour, NatSummary};
    let mut m = Mesh::with_idle_timeout(Some(IDLE));
    m.carry = false;
    let nat = NatSummary {
        udp: true,
        public_addr: Some("203.0.113.7:4000".parse().unwrap()),
        mapping: MappingBehaviour::EndpointIndependent,
    };
    m.a.handle_netcheck(nat.clone(), Some("srflx line".into()), m.now);
    assert!(sealed(&drain(&mut m.a)).is_empty(), "B is idle");
    m.a.peer_activity(B, m.now);
    let sent: Vec<_> = sealed(&drain(&mut m.a))
        .into_iter()
        .map(|s| s.signal)
        .collect();
    assert_eq!(sent, vec![PeerSignal::NetInfo { nat }]);
}
