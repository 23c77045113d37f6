//! The node's signaling and netmap decisions, on fake time (see `testkit`).

use std::time::Duration;

use overlay_proto::coord::{IceConfig, ServerMsg};
use overlay_proto::signal::PeerSignal;

use super::path::OFFER_GRACE;
use super::signaling::SESSION_BURST;
use super::testkit::*;
use super::{Dropped, IceInput, Output};

#[test]
fn the_smaller_key_controls_and_offers_at_once() {
    let mut m = Mesh::new();
    m.a.handle_timeout(m.now);
    m.b.handle_timeout(m.now);
    let (a, b) = (drain(&mut m.a), drain(&mut m.b));
    assert!(a.iter().any(|o| matches!(
        o,
        Output::StartIce {
            controlling: true,
            ..
        }
    )));
    assert!(
        starts(&b).is_empty(),
        "the controlled side waits for an offer"
    );
    assert!(m.a.peer_report(B).unwrap().controlling);
    assert!(!m.b.peer_report(A).unwrap().controlling);
}

#[test]
fn offer_and_answer_start_checks_on_both_sides_with_each_others_credentials() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let session = m.a.session(B).expect("a session");
    assert_eq!(m.b.session(A), Some(session));
    let connect = |log: &[Output]| {
        log.iter()
            .find_map(|o| match o {
                Output::ConnectIce {
                    ufrag, controlling, ..
                } => Some((ufrag.clone(), *controlling)),
                _ => None,
            })
            .expect("checks started")
    };
    assert_eq!(connect(&m.log_a), (ufrag(session), true));
    assert_eq!(connect(&m.log_b), (ufrag(session), false));
}

#[test]
fn both_sides_offering_at_once_leaves_only_the_controlling_offer() {
    let mut m = Mesh::new();
    m.a.handle_timeout(m.now);
    // B believes it controls too (say, a stale build) and offers at the same time.
    let offer = forged(
        B,
        A,
        UNIX_T0 * 2,
        PeerSignal::Offer {
            session: 77,
            ufrag: "bbbb".into(),
            pwd: PWD.into(),
            direct_only: false,
        },
    );
    m.a.handle_signal(B, offer, m.now);
    m.run();
    let session = m.a.session(B).expect("a's own session stands");
    assert_ne!(session, 77);
    assert_eq!(m.b.session(A), Some(session), "b answered a's offer");
    assert_eq!(starts(&m.log_a).len(), 1, "a never answered b's offer");
}

#[test]
fn a_repeated_offer_for_the_current_session_changes_nothing() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let offer = sealed(&m.log_a)
        .into_iter()
        .find(|s| matches!(s.signal, PeerSignal::Offer { .. }))
        .unwrap();
    let mut again = offer.clone();
    again.counter += 1_000;
    m.b.handle_signal(A, again, m.now);
    let out = drain(&mut m.b);
    assert!(starts(&out).is_empty(), "{out:?}");
    assert!(!out.iter().any(|o| matches!(o, Output::CloseIce { .. })));
}

#[test]
fn a_stale_answer_from_an_older_session_is_ignored() {
    let mut m = Mesh::new();
    m.carry = false;
    m.advance(Duration::ZERO);
    let old = m.a.session(B).unwrap();
    m.a.handle_ice(B, old, IceInput::Error("timeout".into()), m.now);
    m.advance(Duration::from_secs(5));
    let new = m.a.session(B).unwrap();
    assert_ne!(old, new);
    let answer = forged(
        B,
        A,
        UNIX_T0 * 2,
        PeerSignal::Answer {
            session: old,
            ufrag: "xxxx".into(),
            pwd: PWD.into(),
        },
    );
    m.a.handle_signal(B, answer, m.now);
    let out = drain(&mut m.a);
    assert!(!out.iter().any(|o| matches!(o, Output::ConnectIce { .. })));
    assert_eq!(m.a.session(B), Some(new));
}

#[test]
fn a_stale_candidate_from_an_older_session_is_ignored() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let session = m.b.session(A).unwrap();
    let candidate = |session, counter| {
        forged(
            A,
            B,
            UNIX_T0 * 2 + counter,
            PeerSignal::Candidate {
                session,
                candidate: "c".into(),
            },
        )
    };
    m.b.handle_signal(A, candidate(session ^ 1, 1), m.now);
    assert!(drain(&mut m.b).is_empty());
    m.b.handle_signal(A, candidate(session, 2), m.now);
    let out = drain(&mut m.b);
    assert!(matches!(
        out.as_slice(),
        [Output::AddRemoteCandidate { session: s, .. }] if *s == session
    ));
}

#[test]
fn late_ice_events_of_a_closed_session_change_nothing() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let old = m.a.session(B).unwrap();
    m.a.handle_ice(B, old, IceInput::Failed, m.now);
    drain(&mut m.a);
    m.a.handle_ice(B, old, IceInput::Selected(host_pair()), m.now);
    m.a.handle_ice(B, old, IceInput::Ready, m.now);
    m.a.handle_ice(B, old, IceInput::Candidate("c".into()), m.now);
    assert!(drain(&mut m.a).is_empty());
}

#[test]
fn a_replayed_signal_is_refused_and_counted() {
    let mut m = Mesh::new();
    m.carry = false;
    m.advance(Duration::ZERO);
    let offer = sealed(&m.log_a).remove(0);
    m.b.handle_signal(A, offer.clone(), m.now);
    drain(&mut m.b);
    m.b.handle_signal(A, offer, m.now);
    assert_eq!(drain(&mut m.b), vec![Output::Dropped(Dropped::Replayed)]);
}

#[test]
fn a_signal_naming_another_sender_is_refused() {
    let mut m = Mesh::new();
    let reflected = forged(
        A,
        B,
        UNIX_T0 * 2,
        PeerSignal::RestartRequest { reason: "x".into() },
    );
    m.a.handle_signal(B, reflected, m.now);
    assert_eq!(drain(&mut m.a), vec![Output::Dropped(Dropped::Misdirected)]);
}

#[test]
fn a_restart_request_opens_a_new_session_on_the_controlling_side() {
    let mut m = Mesh::new();
    m.connect_with(host_pair());
    let old = m.a.session(B).unwrap();
    m.now += Duration::from_secs(5);
    let request = forged(
        B,
        A,
        UNIX_T0 * 2,
        PeerSignal::RestartRequest {
            reason: "restarted".into(),
        },
    );
    m.a.handle_signal(B, request, m.now);
    let out = drain(&mut m.a);
    assert!(out.contains(&Output::CloseIce {
        peer: B,
        session: old
    }));
    assert_eq!(starts(&out).len(), 1);
    assert_eq!(routes(&out).last().unwrap().view.label, "coord relay");
}

#[test]
fn restart_requests_closer_than_the_minimum_interval_are_ignored() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let request = |n| {
        forged(
            B,
            A,
            UNIX_T0 * 2 + n,
            PeerSignal::RestartRequest { reason: "x".into() },
        )
    };
    m.a.handle_signal(B, request(1), m.now);
    assert!(
        starts(&drain(&mut m.a)).is_empty(),
        "a session just started"
    );
    m.now += super::path::MIN_RESTART_INTERVAL;
    m.a.handle_signal(B, request(2), m.now);
    assert_eq!(starts(&drain(&mut m.a)).len(), 1);
}

#[test]
fn the_controlled_side_ignores_restart_requests() {
    let mut m = Mesh::new();
    let request = forged(
        A,
        B,
        UNIX_T0 * 2,
        PeerSignal::RestartRequest { reason: "x".into() },
    );
    m.b.handle_signal(A, request, m.now);
    assert!(drain(&mut m.b).is_empty());
}

#[test]
fn an_offer_flood_is_cut_off_by_the_session_limiter() {
    let mut m = Mesh::new();
    let mut dropped = 0;
    let mut started = 0;
    for n in 0..20u64 {
        let offer = forged(
            A,
            B,
            UNIX_T0 * 2 + n,
            PeerSignal::Offer {
                session: 1000 + n,
                ufrag: ufrag(n),
                pwd: PWD.into(),
                direct_only: false,
            },
        );
        m.b.handle_signal(A, offer, m.now);
        for o in drain(&mut m.b) {
            match o {
                Output::Dropped(Dropped::ExcessOffer) => dropped += 1,
                Output::StartIce { .. } => started += 1,
                _ => {}
            }
        }
    }
    assert_eq!(started, SESSION_BURST as usize);
    assert_eq!(dropped, 20 - SESSION_BURST as usize);
}

#[test]
fn a_peer_removed_mid_session_closes_its_agent_and_its_late_news_is_ignored() {
    let mut m = Mesh::new();
    m.connect_with(host_pair());
    let session = m.a.session(B).unwrap();
    m.a.handle_server_msg(ServerMsg::PeerRemoved { id: B }, m.now, 0);
    let out = drain(&mut m.a);
    assert_eq!(
        out,
        vec![
            Output::CloseIce { peer: B, session },
            Output::PeerRemoved(B)
        ]
    );
    m.a.handle_ice(B, session, IceInput::Disconnected, m.now);
    let late = forged(
        B,
        A,
        UNIX_T0 * 3,
        PeerSignal::RestartRequest { reason: "x".into() },
    );
    m.a.handle_signal(B, late, m.now);
    let before = m.log_a.len();
    m.advance(Duration::from_secs(60));
    assert!(m.log_a[before..].is_empty(), "{:?}", &m.log_a[before..]);
    assert!(m.a.peer_report(B).is_none());
}

#[test]
fn a_peer_that_comes_back_still_cannot_replay_its_old_signals() {
    let mut m = Mesh::new();
    m.carry = false;
    m.advance(Duration::ZERO);
    let offer = sealed(&m.log_a).remove(0);
    m.b.handle_signal(A, offer.clone(), m.now);
    m.b.handle_server_msg(ServerMsg::PeerRemoved { id: A }, m.now, 0);
    m.b.handle_server_msg(
        ServerMsg::PeerUpsert {
            peer: info(A, true),
        },
        m.now,
        0,
    );
    drain(&mut m.b);
    m.b.handle_signal(A, offer, m.now);
    assert_eq!(drain(&mut m.b), vec![Output::Dropped(Dropped::Replayed)]);
}

#[test]
fn the_coordinators_offline_flag_does_not_end_a_connected_path() {
    let mut m = Mesh::new();
    m.connect_with(host_pair());
    let before = m.route_a();
    m.a.handle_server_msg(
        ServerMsg::PeerUpsert {
            peer: info(B, false),
        },
        m.now,
        0,
    );
    let out = drain(&mut m.a);
    assert!(
        !out.iter().any(|o| matches!(o, Output::CloseIce { .. })),
        "{out:?}"
    );
    assert!(routes(&out).is_empty(), "the path stays: {out:?}");
    assert_eq!(before.view.label, "direct (host)");
}

#[test]
fn the_offline_flag_ends_a_session_that_is_still_checking() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let session = m.a.session(B).unwrap();
    m.a.handle_server_msg(
        ServerMsg::PeerUpsert {
            peer: info(B, false),
        },
        m.now,
        0,
    );
    let out = drain(&mut m.a);
    assert!(out.contains(&Output::CloseIce { peer: B, session }));
    assert_eq!(routes(&out).last().unwrap().view.label, "connecting");
    m.advance(Duration::from_secs(600));
    assert!(m.a.session(B).is_none(), "no sessions with an offline peer");
}

#[test]
fn no_session_starts_while_the_coordinator_is_unreachable() {
    let mut m = Mesh::new();
    m.a.set_coordinator_connected(false);
    m.carry = false;
    m.advance(Duration::from_secs(30));
    assert!(starts(&m.log_a).is_empty());
    m.a.set_coordinator_connected(true);
    m.carry = true;
    m.advance(Duration::ZERO);
    assert_eq!(starts(&m.log_a).len(), 1);
}

#[test]
fn a_netmap_in_parts_is_applied_once_the_last_part_came() {
    let t0 = std::time::Instant::now();
    let mut node = new_node(A, t0, 1);
    node.handle_server_msg(welcome(vec![], IceConfig::default(), true), t0, 0);
    node.handle_server_msg(
        ServerMsg::PeerBatch {
            peers: vec![info(B, true)],
            last: false,
        },
        t0,
        0,
    );
    assert!(!drain(&mut node)
        .iter()
        .any(|o| matches!(o, Output::PeerAdded { .. })));
    node.handle_server_msg(
        ServerMsg::PeerBatch {
            peers: vec![info(3, true)],
            last: true,
        },
        t0,
        0,
    );
    let added: Vec<_> = drain(&mut node)
        .into_iter()
        .filter_map(|o| match o {
            Output::PeerAdded { info, .. } => Some(info.id),
            _ => None,
        })
        .collect();
    assert_eq!(added, vec![B, 3]);
}

#[test]
fn a_netmap_cut_short_by_a_reconnect_is_dropped() {
    let t0 = std::time::Instant::now();
    let mut node = new_node(A, t0, 1);
    node.handle_server_msg(
        welcome(vec![info(B, true)], IceConfig::default(), true),
        t0,
        0,
    );
    node.set_coordinator_connected(false);
    node.set_coordinator_connected(true);
    node.handle_server_msg(
        ServerMsg::PeerBatch {
            peers: vec![],
            last: true,
        },
        t0,
        0,
    );
    assert!(!node.has_peer(B));
    assert!(!drain(&mut node)
        .iter()
        .any(|o| matches!(o, Output::PeerAdded { .. })));
}

#[test]
fn a_resumed_welcome_keeps_the_netmap() {
    let t0 = std::time::Instant::now();
    let mut node = new_node(A, t0, 1);
    node.handle_server_msg(
        welcome(vec![info(B, true)], IceConfig::default(), false),
        t0,
        0,
    );
    assert!(node.has_peer(B));
    drain(&mut node);
    node.set_coordinator_connected(false);
    node.set_coordinator_connected(true);
    let mut resumed_welcome = welcome(vec![], IceConfig::default(), false);
    if let ServerMsg::Welcome { resumed, .. } = &mut resumed_welcome {
        *resumed = true;
    }
    node.handle_server_msg(resumed_welcome, t0, 0);
    assert!(
        node.has_peer(B),
        "an empty peer list that says resumed removes nobody"
    );
    assert!(!drain(&mut node)
        .iter()
        .any(|o| matches!(o, Output::PeerRemoved(_))));
}

#[test]
fn a_peer_whose_key_changed_is_removed_and_added_again() {
    let mut m = Mesh::new();
    m.connect_with(host_pair());
    let mut changed = info(B, true);
    changed.public_key = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([3u8; 32])
    };
    m.a.handle_server_msg(
        welcome(vec![changed], IceConfig::default(), false),
        m.now,
        0,
    );
    let out = drain(&mut m.a);
    let removed = out
        .iter()
        .position(|o| *o == Output::PeerRemoved(B))
        .unwrap();
    let added = out
        .iter()
        .position(|o| matches!(o, Output::PeerAdded { .. }))
        .unwrap();
    assert!(removed < added, "{out:?}");
}

#[test]
fn a_peer_with_a_malformed_key_is_ignored() {
    let t0 = std::time::Instant::now();
    let mut node = new_node(A, t0, 1);
    let mut bad = info(B, true);
    bad.public_key = "not base64!".into();
    node.handle_server_msg(welcome(vec![bad], IceConfig::default(), false), t0, 0);
    assert!(!node.has_peer(B));
    assert!(!drain(&mut node)
        .iter()
        .any(|o| matches!(o, Output::PeerAdded { .. })));
}

#[test]
fn signals_beyond_our_own_budget_are_dropped_and_counted() {
    let mut m = Mesh::new();
    m.advance(Duration::ZERO);
    let session = m.a.session(B).unwrap();
    let mut budget_spent = 0;
    for n in 0..100 {
        m.a.handle_ice(B, session, IceInput::Candidate(format!("c{n}")), m.now);
        budget_spent += drain(&mut m.a)
            .iter()
            .filter(|o| **o == Output::Dropped(Dropped::SignalBudget))
            .count();
    }
    assert!(budget_spent > 0 && budget_spent < 100, "{budget_spent}");
}

#[test]
fn the_controlled_side_asks_for_a_session_when_no_offer_comes() {
    let mut m = Mesh::new();
    m.carry = false;
    m.advance(OFFER_GRACE - Duration::from_millis(1));
    assert!(sealed(&m.log_b)
        .iter()
        .all(|s| !matches!(s.signal, PeerSignal::RestartRequest { .. })));
    m.advance(Duration::from_millis(1));
    assert!(sealed(&m.log_b)
        .iter()
        .any(|s| matches!(s.signal, PeerSignal::RestartRequest { .. })));
}
