use super::*;
use overlay_proto::coord::decode_relay_frame;

fn peer(id: NodeId) -> PeerInfo {
    PeerInfo {
        id,
        name: format!("n{id}"),
        mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
        public_key: format!("key{id}"),
        online: false,
    }
}

fn hub(nodes: &[NodeId], limits: Limits) -> Hub {
    Hub::new(
        nodes.iter().map(|id| peer(*id)).collect(),
        Arc::new(Metrics::default()),
        limits,
    )
}

fn next_delta(a: &mut Attached) -> ServerMsg {
    let d = a.deltas.try_recv().expect("a delta");
    serde_json::from_str(d.text.as_str()).unwrap()
}

#[test]
fn attach_lists_other_peers_and_broadcasts_online() {
    let h = hub(&[1, 2], Limits::default());
    let mut a = h.attach(1).unwrap();
    assert!(a.node.online);
    assert_eq!(a.peers.len(), 1);
    assert_eq!(a.peers[0].id, 2);
    // Its own online delta is tagged with its id so its session skips it.
    assert_eq!(a.deltas.try_recv().unwrap().about, 1);

    let _b = h.attach(2).unwrap();
    match next_delta(&mut a) {
        ServerMsg::PeerUpsert { peer } => assert!(peer.id == 2 && peer.online),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.online_count(), 2);
}

#[test]
fn detach_of_replaced_session_keeps_node_online() {
    let h = hub(&[1], Limits::default());
    let mut first = h.attach(1).unwrap();
    let second = h.attach(1).unwrap();
    assert_eq!(first.close.try_recv(), Ok(CloseReason::Replaced));
    assert!(!h.detach(1, first.session_id));
    assert!(h.is_online(1));
    assert!(h.detach(1, second.session_id));
    assert!(!h.is_online(1));
    assert_eq!(h.online_count(), 0);
    let (presence, _) = h.drain_activity();
    assert_eq!(presence, vec![(1, true), (1, false)]);
}

#[test]
fn remove_closes_session_and_broadcasts() {
    let h = hub(&[1, 2], Limits::default());
    let mut a = h.attach(1).unwrap();
    let mut b = h.attach(2).unwrap();
    let _ = a.deltas.try_recv();
    let _ = a.deltas.try_recv();
    assert!(h.remove(2).is_some());
    assert_eq!(b.close.try_recv(), Ok(CloseReason::Removed));
    assert_eq!(next_delta(&mut a), ServerMsg::PeerRemoved { id: 2 });
    assert!(h.remove(2).is_none());
    assert_eq!(h.attach(2).err(), Some(AttachError::UnknownNode));
    assert_eq!(h.online_count(), 1);
}

#[test]
fn session_limit_applies_to_new_nodes_only() {
    let limits = Limits {
        max_sessions: 1,
        ..Limits::default()
    };
    let h = hub(&[1, 2], limits);
    let _a = h.attach(1).unwrap();
    assert_eq!(h.attach(2).err(), Some(AttachError::TooManySessions));
    assert!(
        h.attach(1).is_ok(),
        "replacing a session does not need a slot"
    );
}

#[test]
fn signal_is_stamped_with_sender_and_refused_for_unknown_or_offline() {
    let h = hub(&[1, 2, 3], Limits::default());
    let _a = h.attach(1).unwrap();
    let mut b = h.attach(2).unwrap();
    h.signal(1, 2, "hello".into()).unwrap();
    let text = b.control.try_recv().unwrap();
    assert_eq!(
        serde_json::from_str::<ServerMsg>(text.as_str()).unwrap(),
        ServerMsg::Signal {
            from: 1,
            payload: "hello".into()
        }
    );
    assert_eq!(h.signal(1, 3, "x".into()), Err(SignalError::PeerOffline));
    assert_eq!(h.signal(1, 9, "x".into()), Err(SignalError::UnknownPeer));
}

#[test]
fn relay_frames_are_stamped_counted_and_dropped_when_queue_full() {
    let limits = Limits {
        relay_queue: 2,
        ..Limits::default()
    };
    let h = hub(&[1, 2, 3], limits);
    let a = h.attach(1).unwrap();
    let mut b = h.attach(2).unwrap();
    assert_eq!(h.relay(1, &a.stats, 2, b"wg1"), Ok(()));
    let frame = b.relay.try_recv().unwrap();
    assert_eq!(decode_relay_frame(&frame), Some((1, &b"wg1"[..])));
    assert_eq!(h.relay(1, &a.stats, 2, b"x"), Ok(()));
    assert_eq!(h.relay(1, &a.stats, 2, b"y"), Ok(()));
    assert_eq!(h.relay(1, &a.stats, 2, b"z"), Err(RelayDrop::QueueFull));
    assert_eq!(h.relay(1, &a.stats, 3, b"z"), Err(RelayDrop::PeerOffline));
    assert_eq!(h.relay(1, &a.stats, 9, b"z"), Err(RelayDrop::UnknownPeer));
    let snap = h.snapshot();
    assert!(snap.per_node_relay.contains(&(2, 0, 5)));
    let (_, relay) = h.drain_activity();
    assert!(relay.contains(&(2, 0, 5)));
    assert!(h.drain_activity().1.is_empty());
}

#[test]
fn deltas_are_serialized_once_and_shared() {
    let h = hub(&[1, 2, 3], Limits::default());
    let mut a = h.attach(1).unwrap();
    let mut b = h.attach(2).unwrap();
    let _ = a.deltas.try_recv();
    let _ = a.deltas.try_recv();
    let _ = b.deltas.try_recv();
    h.upsert(PeerInfo {
        name: "renamed".into(),
        ..peer(3)
    });
    let da = a.deltas.try_recv().unwrap();
    let db = b.deltas.try_recv().unwrap();
    assert_eq!(da.text.as_ptr(), db.text.as_ptr());
}

#[test]
fn a_lagging_session_is_detected() {
    let limits = Limits {
        delta_backlog: 2,
        ..Limits::default()
    };
    let h = hub(&[1, 2, 3, 4], limits);
    let mut a = h.attach(1).unwrap();
    for id in 2..=4 {
        let _ = h.attach(id).unwrap();
    }
    assert!(matches!(
        a.deltas.try_recv(),
        Err(broadcast::error::TryRecvError::Lagged(_))
    ));
}
