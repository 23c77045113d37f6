//! The control stream: netmap, deltas, signaling, relay, removal.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use overlay_coord::store::now_unix;
use overlay_proto::coord::{
    decode_relay_frame, encode_relay_frame, error_code, ClientMsg, ServerMsg,
};
use tokio_tungstenite::tungstenite::Message;

/// How fast a delta must reach other nodes.
const DELTA_WITHIN: Duration = Duration::from_secs(1);

async fn upsert_of(node: &mut Node, id: u64, online: bool) {
    let started = tokio::time::Instant::now();
    node.expect_msg(
        "peer upsert",
        |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == id && peer.online == online),
    )
    .await;
    assert!(
        started.elapsed() < DELTA_WITHIN,
        "delta took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn welcome_has_self_peers_ice_and_protocol() {
    let srv = TestServer::start().await;
    let a = srv.new_node("a").await;
    let b = srv.new_node("b").await;
    let mut node = srv.connect(&a).await;
    match node.welcome().await {
        ServerMsg::Welcome {
            protocol,
            node: me,
            network,
            network6: _,
            peers,
            ice,
            more,
            filter,
            resumed,
        } => {
            assert!(!more, "a small mesh is one message");
            assert!(
                !resumed,
                "a node that says it holds nothing gets everything"
            );
            assert_eq!(filter, None, "no policy: no filter");
            assert_eq!(protocol, overlay_proto::PROTOCOL_VERSION);
            assert_eq!(me.id, a.node_id);
            assert!(me.online);
            assert_eq!(network, a.network);
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].id, b.node_id);
            let turn_port = srv.server().turn_addr().unwrap().port();
            assert_eq!(ice.stun, vec![format!("stun:127.0.0.1:{turn_port}")]);
            assert_eq!(
                ice.turn[0].urls,
                vec![format!("turn:127.0.0.1:{turn_port}?transport=udp")]
            );
            assert!(ice.turn[0].username.ends_with(&format!(":{}", a.node_id)));
            assert!(ice.turn[0].expires_at > now_unix());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_large_netmap_arrives_in_parts_before_any_delta() {
    const PART_BYTES: usize = 300;
    let srv = TestServer::start_with(|c| c.limits.netmap_part_bytes = PART_BYTES).await;
    let key = srv.create_key(true);
    let mut others = Vec::new();
    for i in 0..20 {
        let n = srv
            .register_ok(&key, &NodeKey::random(), &format!("peer-{i}"))
            .await;
        others.push(n.node_id);
    }
    let me = srv.register_ok(&key, &NodeKey::random(), "me").await;
    let mut node = srv.connect(&me).await;
    // Registered while the netmap is on its way: must come after its last part.
    let late = srv.register_ok(&key, &NodeKey::random(), "late").await;

    let mut seen = Vec::new();
    let mut parts = 0;
    loop {
        let text = match tokio::time::timeout(DEADLINE, node.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            other => panic!("netmap cut short: {other:?}"),
        };
        // A part holds the peers' JSON up to the budget, plus its envelope
        // (the Welcome's carries the node's own record and ICE settings).
        assert!(text.len() <= PART_BYTES + 1024, "{} bytes", text.len());
        let msg: ServerMsg = serde_json::from_str(text.as_str()).unwrap();
        parts += 1;
        let done = match msg {
            ServerMsg::Welcome { peers, more, .. } => {
                assert_eq!(parts, 1, "the Welcome comes first");
                assert!(more, "20 peers do not fit in {PART_BYTES} bytes");
                seen.extend(peers.iter().map(|p| p.id));
                false
            }
            ServerMsg::PeerBatch { peers, last } => {
                assert!(parts > 1, "a batch only after the Welcome");
                assert!(!peers.is_empty());
                seen.extend(peers.iter().map(|p| p.id));
                last
            }
            other => panic!("netmap interrupted by {other:?}"),
        };
        if done {
            break;
        }
    }
    assert!(parts > 3, "{parts} parts");
    seen.sort_unstable();
    assert_eq!(seen, others, "every other node exactly once, not itself");
    assert!(
        matches!(
            node.next().await,
            Event::Msg(ServerMsg::Dns { dns: Some(_) })
        ),
        "the DNS settings come right after the last part, before any delta"
    );
    node.expect_msg(
        "the late join",
        |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == late.node_id),
    )
    .await;
}

#[tokio::test]
async fn nodes_see_each_other_join_come_online_and_go_offline() {
    let srv = TestServer::start().await;
    let a = srv.new_node("a").await;
    let mut na = srv.connect(&a).await;
    na.welcome().await;

    let b = srv.new_node("b").await;
    na.expect_msg(
        "join",
        |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == b.node_id && !peer.online),
    )
    .await;
    let mut nb = srv.connect(&b).await;
    upsert_of(&mut na, b.node_id, true).await;
    match nb.welcome().await {
        ServerMsg::Welcome { peers, .. } => {
            assert!(peers.iter().any(|p| p.id == a.node_id && p.online))
        }
        other => panic!("{other:?}"),
    }
    nb.ws.close(None).await.ok();
    drop(nb);
    upsert_of(&mut na, b.node_id, false).await;
    // The store learns presence for `nodes list`.
    wait_until("b offline and a online in the store", || async {
        let nodes = srv.store().list_nodes().unwrap();
        nodes.iter().any(|n| n.id == a.node_id && n.online)
            && nodes
                .iter()
                .any(|n| n.id == b.node_id && !n.online && n.last_seen.is_some())
    })
    .await;
}

#[tokio::test]
async fn signals_are_forwarded_with_the_authenticated_sender() {
    let srv = TestServer::start().await;
    let a = srv.new_node("a").await;
    let b = srv.new_node("b").await;
    let mut na = srv.connect(&a).await;
    let mut nb = srv.connect(&b).await;
    na.welcome().await;
    nb.welcome().await;

    na.send(&ClientMsg::Signal {
        to: b.node_id,
        from: None,
        payload: "offer".into(),
    })
    .await;
    let got = nb
        .expect_msg("signal", |m| matches!(m, ServerMsg::Signal { .. }))
        .await;
    assert_eq!(
        got,
        ServerMsg::Signal {
            from: a.node_id,
            payload: "offer".into()
        }
    );

    // A forged sender is overwritten.
    na.send(&ClientMsg::Signal {
        to: b.node_id,
        from: Some(9999),
        payload: "forged".into(),
    })
    .await;
    let got = nb
        .expect_msg("signal", |m| matches!(m, ServerMsg::Signal { .. }))
        .await;
    assert_eq!(
        got,
        ServerMsg::Signal {
            from: a.node_id,
            payload: "forged".into()
        }
    );
}

#[tokio::test]
async fn signal_to_unknown_or_offline_node_gets_an_error_and_session_stays() {
    let srv = TestServer::start().await;
    let a = srv.new_node("a").await;
    let offline = srv.new_node("off").await;
    let mut na = srv.connect(&a).await;
    na.welcome().await;

    na.send(&ClientMsg::Signal {
        to: 424242,
        from: None,
        payload: "x".into(),
    })
    .await;
    let err = na
        .expect_msg("error", |m| matches!(m, ServerMsg::Error { .. }))
        .await;
    assert!(
        matches!(&err, ServerMsg::Error { error, about: Some(424242), .. } if error == error_code::UNKNOWN_PEER),
        "{err:?}"
    );

    na.send(&ClientMsg::Signal {
        to: offline.node_id,
        from: None,
        payload: "x".into(),
    })
    .await;
    let err = na
        .expect_msg("error", |m| matches!(m, ServerMsg::Error { .. }))
        .await;
    assert!(
        matches!(&err, ServerMsg::Error { error, about: Some(id), .. } if error == error_code::PEER_OFFLINE && *id == offline.node_id),
        "{err:?}"
    );

    na.send(&ClientMsg::Ping { nonce: 77 }).await;
    na.expect_msg("pong", |m| *m == ServerMsg::Pong { nonce: 77 })
        .await;
    na.send(&ClientMsg::RefreshIce).await;
    let ice = na
        .expect_msg("ice", |m| matches!(m, ServerMsg::IceConfig { .. }))
        .await;
    assert!(matches!(ice, ServerMsg::IceConfig { ice } if ice.turn.len() == 1));
}

#[tokio::test]
async fn relay_frames_arrive_byte_for_byte_with_the_source_id() {
    let srv = TestServer::start().await;
    let a = srv.new_node("a").await;
    let b = srv.new_node("b").await;
    let mut na = srv.connect(&a).await;
    let mut nb = srv.connect(&b).await;
    na.welcome().await;
    nb.welcome().await;

    let datagram: Vec<u8> = (0..1400u32).map(|i| (i * 7 % 256) as u8).collect();
    na.send_raw(Message::binary(encode_relay_frame(b.node_id, &datagram)))
        .await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let frame = loop {
        match nb.next_within(deadline - tokio::time::Instant::now()).await {
            Some(Event::Relay(f)) => break f,
            Some(Event::Msg(_)) => continue,
            other => panic!("expected a relay frame, got {other:?}"),
        }
    };
    assert_eq!(decode_relay_frame(&frame), Some((a.node_id, &datagram[..])));

    // To an offline node: dropped and counted, session unaffected.
    let off = srv.new_node("off").await;
    na.send_raw(Message::binary(encode_relay_frame(off.node_id, b"lost")))
        .await;
    wait_until("drop counted", || async {
        srv.metric("overlay_coord_relay_dropped_frames_total{reason=\"peer_offline\"}")
            .await
            == 1
    })
    .await;
    assert_eq!(srv.metric("overlay_coord_relayed_bytes_total").await, 1400);
    assert_eq!(
        srv.metric(&format!(
            "overlay_coord_node_relay_bytes_total{{node=\"{}\",direction=\"out\"}}",
            b.node_id
        ))
        .await,
        1400
    );
    wait_until("relay bytes in the store", || async {
        srv.store()
            .list_nodes()
            .unwrap()
            .iter()
            .any(|n| n.id == b.node_id && n.relay_bytes_out == 1400)
    })
    .await;
    na.send(&ClientMsg::Ping { nonce: 1 }).await;
    na.expect_msg("pong", |m| *m == ServerMsg::Pong { nonce: 1 })
        .await;
}

#[tokio::test]
async fn a_second_session_replaces_the_first() {
    let srv = TestServer::start().await;
    let a = srv.new_node("a").await;
    let b = srv.new_node("b").await;
    let mut watcher = srv.connect(&b).await;
    watcher.welcome().await;
    let mut first = srv.connect(&a).await;
    first.welcome().await;
    upsert_of(&mut watcher, a.node_id, true).await;
    let mut second = srv.connect(&a).await;
    second.welcome().await;
    let frame = first.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4001);
    // The node stays online: no offline delta reaches the watcher.
    watcher.send(&ClientMsg::Ping { nonce: 5 }).await;
    let m = watcher
        .expect_msg("pong", |m| {
            matches!(m, ServerMsg::Pong { .. } | ServerMsg::PeerUpsert { .. })
        })
        .await;
    assert_eq!(m, ServerMsg::Pong { nonce: 5 });
    assert_eq!(srv.metric("overlay_coord_sessions_online").await, 2);
}

#[tokio::test]
async fn removed_node_is_closed_announced_and_refused() {
    let srv = TestServer::start().await;
    let a = srv.new_node("a").await;
    let gone = srv.new_node("gone").await;
    let mut na = srv.connect(&a).await;
    let mut ng = srv.connect(&gone).await;
    na.welcome().await;
    ng.welcome().await;

    // Exactly what `overlay-coord nodes remove gone` does, from "another process".
    assert_eq!(
        srv.store().remove_node("gone", now_unix()).unwrap(),
        Some(gone.node_id)
    );
    let frame = ng.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4003);
    na.expect_msg("removal", |m| {
        *m == ServerMsg::PeerRemoved { id: gone.node_id }
    })
    .await;
    assert!(Node::connect(srv.addr, gone.node_id, &gone.credential)
        .await
        .is_err());
}

#[tokio::test]
async fn silent_sessions_are_dropped_and_go_offline() {
    let srv = TestServer::start_with(|c| {
        c.limits.ping_interval = Duration::from_millis(100);
        c.limits.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let a = srv.new_node("a").await;
    let b = srv.new_node("b").await;
    let mut na = srv.connect(&a).await;
    na.welcome().await;
    // b connects, then stops reading entirely (so it never answers pings).
    let mut nb = srv.connect(&b).await;
    nb.welcome().await;
    let silent_b = nb;
    na.expect_msg(
        "b offline",
        |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == b.node_id && !peer.online),
    )
    .await;
    drop(silent_b);
    // a itself keeps answering pings (its reads above), so it is still online.
    na.send(&ClientMsg::Ping { nonce: 3 }).await;
    na.expect_msg("pong", |m| *m == ServerMsg::Pong { nonce: 3 })
        .await;
}

#[tokio::test]
async fn healthz_and_metrics_respond() {
    let srv = TestServer::start().await;
    let (status, body) = http(srv.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!((status, body.lines().next()), (200, Some("ok")));
    assert!(body.contains("store: ok\nbus: in-process"), "{body}");
    srv.new_node("a").await;
    let text = srv.metrics().await;
    for name in [
        "overlay_coord_nodes 1",
        "overlay_coord_sessions_online 0",
        "overlay_coord_signaling_messages_total",
        "overlay_coord_relayed_bytes_total",
        "overlay_coord_relayed_frames_total",
        "overlay_coord_relay_dropped_frames_total{reason=\"queue_full\"}",
        "overlay_coord_rejected_inputs_total{reason=\"malformed\"}",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
}

#[tokio::test]
async fn shutdown_closes_sessions_and_marks_nodes_offline() {
    let mut srv = TestServer::start().await;
    let a = srv.new_node("a").await;
    let mut na = srv.connect(&a).await;
    na.welcome().await;
    wait_until("online in the store", || async {
        srv.store().list_nodes().unwrap()[0].online
    })
    .await;
    let server = srv.server.take().expect("running");
    let stop = tokio::spawn(server.shutdown());
    let frame = na.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1001);
    tokio::time::timeout(DEADLINE, stop)
        .await
        .expect("shutdown in time")
        .expect("task")
        .expect("clean shutdown");
    assert!(!srv.store().list_nodes().unwrap()[0].online);
}
