use super::*;
use overlay_proto::coord::decode_relay_frame;

/// Node `id` as the hub's tests know it (shared with the relay and replica tests).
pub(crate) fn peer(id: NodeId) -> PeerInfo {
    PeerInfo {
        id,
        name: format!("n{id}"),
        mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
        mesh_ip6: None,
        public_key: format!("key{id}"),
        online: false,
        tags: Vec::new(),
    }
}

pub(crate) fn hub(nodes: &[NodeId], limits: Limits) -> Hub {
    Hub::new(
        nodes.iter().map(|id| peer(*id)).collect(),
        Arc::new(Metrics::default()),
        limits,
    )
}

/// The netmap `me` is sent, read page by page as a session does.
pub(crate) fn netmap(h: &Hub, me: NodeId) -> Vec<PeerInfo> {
    let mut peers = Vec::new();
    let mut from = 0;
    loop {
        let page = h.netmap_page(me, from, 100);
        peers.extend(
            page.peers
                .iter()
                .map(|j| serde_json::from_str::<PeerInfo>(j).unwrap()),
        );
        match page.next {
            Some(next) => from = next,
            None => return peers,
        }
    }
}

/// The node and text of a one-node delta.
fn peer_delta(d: Delta) -> (NodeId, Utf8Bytes) {
    match d {
        Delta::Peer { about, text, .. } => (about, text),
        Delta::Reclass(_) => panic!("a reclass, not a peer delta"),
    }
}

fn next_delta(a: &mut Attached) -> ServerMsg {
    let (_, text) = peer_delta(a.deltas.try_recv().expect("a delta"));
    serde_json::from_str(text.as_str()).unwrap()
}

#[test]
fn attach_lists_other_peers_and_broadcasts_online() {
    let h = hub(&[1, 2], Limits::default());
    let mut a = h.attach(1).unwrap();
    assert!(a.node.online);
    assert_eq!(netmap(&h, 1), vec![peer(2)]);
    // Its own online delta is tagged with its id so its session skips it.
    assert_eq!(peer_delta(a.deltas.try_recv().unwrap()).0, 1);

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
    let (_, da) = peer_delta(a.deltas.try_recv().unwrap());
    let (_, db) = peer_delta(b.deltas.try_recv().unwrap());
    assert_eq!(da.as_ptr(), db.as_ptr());
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

#[test]
fn netmap_json_follows_presence_and_renames() {
    let h = hub(&[1, 2, 3], Limits::default());
    let _b = h.attach(2).unwrap();
    h.upsert(PeerInfo {
        name: "renamed".into(),
        ..peer(3)
    });
    let online_b = PeerInfo {
        online: true,
        ..peer(2)
    };
    let renamed_c = PeerInfo {
        name: "renamed".into(),
        ..peer(3)
    };
    assert_eq!(netmap(&h, 1), vec![online_b, renamed_c]);
}

#[test]
fn netmap_pages_cover_every_other_node_once_in_id_order() {
    let ids: Vec<NodeId> = (1..=50).chain([70, 1000]).collect();
    let h = hub(&ids, Limits::default());
    // Each peer's JSON is ~90 bytes, so a 100-byte page holds one.
    let first = h.netmap_page(7, 0, 100);
    assert_eq!(first.peers.len(), 1);
    assert_eq!(first.next, Some(2));
    let got: Vec<NodeId> = netmap(&h, 7).iter().map(|p| p.id).collect();
    let want: Vec<NodeId> = ids.iter().copied().filter(|id| *id != 7).collect();
    assert_eq!(got, want);
    // One page when the budget allows.
    let all = h.netmap_page(7, 0, 1 << 20);
    assert_eq!((all.peers.len(), all.next), (51, None));
}

#[test]
fn pages_share_each_peers_json() {
    let h = hub(&[1, 2, 3], Limits::default());
    let a = h.netmap_page(1, 3, 1 << 20);
    let b = h.netmap_page(2, 3, 1 << 20);
    assert!(Arc::ptr_eq(&a.peers[0], &b.peers[0]));
}
