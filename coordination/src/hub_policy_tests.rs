//! The hub under an access policy: what sessions see, in what order.

use super::*;
use crate::policy::parse;

const POLICY: &str = r#"
[groups]
dev = ["n1"]

[[allow]]
src = ["group:dev"]
dst = ["tag:server"]
proto = "tcp"
ports = ["22"]

[[allow]]
src = ["tag:server"]
dst = ["tag:server"]
"#;

fn peer(id: NodeId, tags: &[&str]) -> PeerInfo {
    PeerInfo {
        id,
        name: format!("n{id}"),
        mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
        mesh_ip6: None,
        public_key: format!("key{id}"),
        online: false,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

/// n1 (group dev), n2 and n3 (tag server), n4 (nothing).
fn hub() -> Hub {
    Hub::new(
        vec![
            peer(1, &[]),
            peer(2, &["server"]),
            peer(3, &["server"]),
            peer(4, &[]),
        ],
        Arc::new(Metrics::default()),
        Limits::default(),
    )
}

fn policy() -> Option<Arc<crate::policy::Policy>> {
    Some(Arc::new(parse("p.toml", POLICY).unwrap()))
}

/// What a session of `me` with view `view` writes for `d`, as the session
/// loop does (updating its view on a reclass).
fn written(me: NodeId, view: &mut View, d: Delta) -> Vec<ServerMsg> {
    let texts: Vec<Utf8Bytes> = match d {
        Delta::Peer {
            about,
            view: theirs,
            text,
        } => (about != me && may_see(view, &theirs))
            .then_some(text)
            .into_iter()
            .collect(),
        Delta::Reclass(r) => match r.nodes.get(&me) {
            None => vec![],
            Some(u) => {
                *view = u.view.clone();
                u.filter
                    .iter()
                    .cloned()
                    .chain(
                        u.msgs
                            .iter()
                            .filter(|(a, _)| *a != me)
                            .map(|(_, t)| t.clone()),
                    )
                    .collect()
            }
        },
    };
    texts
        .iter()
        .map(|t| serde_json::from_str(t.as_str()).expect("a ServerMsg"))
        .collect()
}

fn drain(me: NodeId, a: &mut Attached) -> Vec<ServerMsg> {
    let mut out = Vec::new();
    while let Ok(d) = a.deltas.try_recv() {
        out.extend(written(me, &mut a.view, d));
    }
    out
}

fn netmap_ids(h: &Hub, me: NodeId) -> Vec<NodeId> {
    let page = h.netmap_page(me, 0, 1 << 20);
    page.peers
        .iter()
        .map(|j| serde_json::from_str::<PeerInfo>(j).unwrap().id)
        .collect()
}

fn removed(msgs: &[ServerMsg]) -> Vec<NodeId> {
    let mut ids: Vec<NodeId> = msgs
        .iter()
        .filter_map(|m| match m {
            ServerMsg::PeerRemoved { id } => Some(*id),
            _ => None,
        })
        .collect();
    ids.sort();
    ids
}

fn upserted(msgs: &[ServerMsg]) -> Vec<NodeId> {
    let mut ids: Vec<NodeId> = msgs
        .iter()
        .filter_map(|m| match m {
            ServerMsg::PeerUpsert { peer } => Some(peer.id),
            _ => None,
        })
        .collect();
    ids.sort();
    ids
}

fn filter_of(msgs: &[ServerMsg]) -> Option<Option<overlay_proto::filter::NodeFilter>> {
    msgs.iter().find_map(|m| match m {
        ServerMsg::Filter { filter } => Some(filter.clone()),
        _ => None,
    })
}

#[test]
fn a_policy_hides_peers_and_sends_filters_without_reconnecting() {
    let h = hub();
    let mut sessions: Vec<Attached> = (1..=4).map(|id| h.attach(id).unwrap()).collect();
    for (i, s) in sessions.iter_mut().enumerate() {
        drain(i as NodeId + 1, s);
    }
    let stats = h.apply_policy(policy(), None);
    assert_eq!(stats.groups, 3, "dev, servers, the rest: one group each");

    let dev = drain(1, &mut sessions[0]);
    assert_eq!(removed(&dev), vec![4]);
    let dev_filter = filter_of(&dev).unwrap().unwrap();
    assert!(dev_filter.inbound.is_empty() && dev_filter.outbound.len() == 1);
    let srv = drain(2, &mut sessions[1]);
    assert_eq!(removed(&srv), vec![4]);
    assert_eq!(filter_of(&srv).unwrap().unwrap().inbound.len(), 2);
    let other = drain(4, &mut sessions[3]);
    assert_eq!(removed(&other), vec![1, 2, 3]);
    assert_eq!(
        filter_of(&other),
        Some(Some(Default::default())),
        "deny all"
    );

    assert_eq!(netmap_ids(&h, 4), Vec::<NodeId>::new());
    assert_eq!(netmap_ids(&h, 1), vec![2, 3]);

    // Presence of a hidden node reaches only those who may see it.
    h.detach(1, sessions[0].session_id);
    assert_eq!(upserted(&drain(2, &mut sessions[1])), vec![1]);
    assert!(drain(4, &mut sessions[3]).is_empty());
}

#[test]
fn signals_and_relay_frames_between_hidden_nodes_are_refused() {
    let h = hub();
    let sessions: Vec<Attached> = (1..=4).map(|id| h.attach(id).unwrap()).collect();
    h.apply_policy(policy(), None);
    assert_eq!(h.signal(4, 1, "x".into()), Err(SignalError::UnknownPeer));
    assert_eq!(h.signal(1, 4, "x".into()), Err(SignalError::UnknownPeer));
    assert_eq!(h.signal(1, 2, "x".into()), Ok(()));
    assert_eq!(
        h.signal(2, 1, "x".into()),
        Ok(()),
        "visibility is both ways"
    );
    assert_eq!(
        h.relay(4, &sessions[3].stats, 2, b"wg"),
        Err(RelayDrop::UnknownPeer)
    );
    assert_eq!(h.relay(3, &sessions[2].stats, 2, b"wg"), Ok(()));
    assert_eq!(h.metrics.policy_refused.load(Ordering::Relaxed), 3);
}

#[test]
fn a_tag_change_upserts_the_node_where_it_becomes_visible() {
    let h = hub();
    let mut sessions: Vec<Attached> = (1..=4).map(|id| h.attach(id).unwrap()).collect();
    h.apply_policy(policy(), None);
    for (i, s) in sessions.iter_mut().enumerate() {
        drain(i as NodeId + 1, s);
    }
    let tags = HashMap::from([
        (2, vec!["server".to_string()]),
        (3, vec!["server".to_string()]),
        (4, vec!["server".to_string()]),
    ]);
    h.apply_policy(policy(), Some(&tags));
    let dev = drain(1, &mut sessions[0]);
    assert_eq!(upserted(&dev), vec![4]);
    assert_eq!(filter_of(&dev), None, "dev's filter did not change");
    let srv = drain(2, &mut sessions[1]);
    assert_eq!(upserted(&srv), vec![4], "4 appears, with its tags");
    let four = drain(4, &mut sessions[3]);
    assert_eq!(upserted(&four), vec![1, 2, 3]);
    assert!(filter_of(&four).unwrap().is_some());

    // Clearing the policy shows everyone again and lifts the filters.
    h.apply_policy(None, Some(&tags));
    let dev = drain(1, &mut sessions[0]);
    assert_eq!(filter_of(&dev), Some(None));
    assert!(upserted(&dev).is_empty(), "dev already saw everyone");
    assert_eq!(netmap_ids(&h, 4), vec![1, 2, 3]);
}

#[test]
fn a_new_node_is_announced_only_where_it_may_be_seen() {
    let h = hub();
    let mut sessions: Vec<Attached> = (1..=4).map(|id| h.attach(id).unwrap()).collect();
    h.apply_policy(policy(), None);
    for (i, s) in sessions.iter_mut().enumerate() {
        drain(i as NodeId + 1, s);
    }
    h.upsert(peer(5, &["server"]));
    assert_eq!(upserted(&drain(1, &mut sessions[0])), vec![5]);
    assert!(drain(4, &mut sessions[3]).is_empty());
    // A node the policy names by name changes filters: they name it by id.
    h.upsert(PeerInfo {
        name: "n1".into(),
        ..peer(6, &[])
    });
    let srv = drain(2, &mut sessions[1]);
    let filter = filter_of(&srv).unwrap().unwrap();
    assert!(filter.inbound[0]
        .peers
        .contains(&overlay_proto::filter::Principal::Node(6)));
}

/// A reconnecting node's netmap digest, summed per policy class, is the
/// digest of the netmap it would be sent: with no policy, under one (where
/// n4 sees nobody and the servers see each other), after a tag change moves
/// n4 into the servers' class, after presence changes, and once the policy
/// is lifted again.
#[test]
fn netmap_digests_are_those_of_the_netmaps_sent_under_a_policy() {
    let h = hub();
    let check = |h: &Hub, when: &str| {
        for me in 1..=4 {
            let sent = super::tests::netmap(h, me);
            let want = overlay_proto::coord::netmap_digest(&sent);
            assert_eq!(h.netmap_digest(me), Some(want), "n{me} {when}");
        }
    };
    check(&h, "without a policy");
    h.apply_policy(policy(), None);
    check(&h, "under the policy");
    assert!(super::tests::netmap(&h, 4).is_empty(), "n4 sees nobody");
    let tags = HashMap::from([
        (2, vec!["server".to_string()]),
        (3, vec!["server".to_string()]),
        (4, vec!["server".to_string()]),
    ]);
    h.apply_policy(policy(), Some(&tags));
    check(&h, "after n4 became a server");
    let _online = h.attach(3).unwrap();
    check(&h, "with n3 online");
    h.apply_policy(None, Some(&tags));
    check(&h, "with the policy lifted");
    assert_eq!(h.netmap_digest(99), None, "an unknown node");
}
