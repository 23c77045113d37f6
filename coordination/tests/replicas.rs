//! Two replicas in this process on one store and a real `nats-server` on
//! loopback (no namespaces, no root): what crosses the bus, seen by test
//! clients. The lab test (`tests/tests/replicas.rs`) runs real daemons.

mod common;

use std::time::Duration;

use common::{http, wait_until, Event, Node, TestServer};
use overlay_proto::coord::{
    bearer, encode_relay_frame, format_digest, netmap_digest, ClientMsg, PeerInfo,
    RegisterResponse, ServerMsg, CONNECT_PATH, NETMAP_DIGEST_HEADER,
};
use overlay_tests::nats::LocalNats;
use tokio_tungstenite::tungstenite::Message;

/// Two replicas on one state directory (one SQLite store) and one bus.
async fn replicas(nats: &LocalNats) -> (TestServer, TestServer) {
    let url = nats.url();
    let r1 = TestServer::start_with(|c| c.bus = Some(url.clone())).await;
    let dir = r1.dir.path().to_path_buf();
    let r2 = TestServer::start_with(|c| {
        c.bus = Some(url.clone());
        c.state_dir = dir;
    })
    .await;
    for r in [&r1, &r2] {
        wait_until("each replica to hear the other", || async {
            let (_, body) = http(r.addr, "GET", "/healthz", &[], b"").await;
            body.contains("bus: connected, 1 other replicas")
        })
        .await;
    }
    (r1, r2)
}

#[tokio::test]
async fn a_challenge_from_one_replica_is_answered_at_another() {
    let nats = LocalNats::start().expect("nats-server starts (Debian's nats-server package)");
    let (r1, r2) = replicas(&nats).await;
    let key = r1.create_key(true);
    let node = common::NodeKey::random();
    let challenge = r1.challenge().await;
    let request =
        overlay_proto::enrol::register_request(&challenge, &node.secret, &key, "lb", None)
            .expect("valid challenge");
    let (status, body) = r2.send_register(&request).await;
    assert_eq!(status, 200, "r2 refused r1's challenge: {body}");
    // Single use still holds on the replica that took it.
    let (status, _) = r2.send_register(&request).await;
    assert_ne!(status, 200, "a challenge is used once");
}

#[tokio::test]
async fn enrolment_signals_relay_and_removal_cross_the_bus() {
    let nats = LocalNats::start().expect("nats-server starts (Debian's nats-server package)");
    let (r1, r2) = replicas(&nats).await;
    let a = r1.new_node("a").await;
    let mut na = r1.connect(&a).await;
    na.welcome().await;

    // b enrols and connects through r2: a, on r1, hears of it and sees it online.
    let b = r2.new_node("b").await;
    let mut nb = r2.connect(&b).await;
    nb.welcome().await;
    na.expect_msg(
        "b online",
        |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == b.node_id && peer.online),
    )
    .await;

    // A signal from a reaches b on the other replica, stamped with a.
    na.send(&ClientMsg::Signal {
        to: b.node_id,
        payload: "offer".into(),
        from: None,
    })
    .await;
    let got = nb
        .expect_msg("the signal", |m| matches!(m, ServerMsg::Signal { .. }))
        .await;
    assert_eq!(
        got,
        ServerMsg::Signal {
            from: a.node_id,
            payload: "offer".into()
        }
    );

    // A relay frame from a reaches b, stamped with a.
    assert!(
        na.send_raw(Message::binary(encode_relay_frame(b.node_id, b"datagram")))
            .await
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let frame = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match nb.next_within(left).await {
            Some(Event::Relay(frame)) => break frame,
            Some(Event::Msg(_)) => continue,
            other => panic!("no relay frame for b: {other:?}"),
        }
    };
    assert_eq!(frame, encode_relay_frame(a.node_id, b"datagram"));

    // The CLI removes b in the shared store: r2 closes its session.
    let store = r1.store();
    tokio::task::spawn_blocking(move || store.remove_node("b", 0))
        .await
        .unwrap()
        .unwrap();
    let close = tokio::time::timeout(Duration::from_secs(1), nb.expect_close())
        .await
        .expect("b's session closed within 1 s of the removal");
    assert_eq!(close.map(|f| u16::from(f.code)), Some(4003));
    na.expect_msg(
        "b removed",
        |m| matches!(m, ServerMsg::PeerRemoved { id } if *id == b.node_id),
    )
    .await;

    // Its own replica's metrics count what crossed the bus.
    let text = r1.metrics().await;
    assert!(text.contains("overlay_coord_bus_connected 1\n"), "{text}");
    assert!(
        text.contains("overlay_coord_bus_signals_out_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("overlay_coord_bus_relay_frames_out_total 1\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_replica_that_stops_takes_its_nodes_offline_elsewhere_at_once() {
    let nats = LocalNats::start().expect("nats-server starts (Debian's nats-server package)");
    let (r1, mut r2) = replicas(&nats).await;
    let a = r1.new_node("a").await;
    let mut na = r1.connect(&a).await;
    na.welcome().await;
    let b = r2.new_node("b").await;
    let mut nb = Node::connect(r2.addr, b.node_id, &b.credential)
        .await
        .expect("b connects to r2");
    nb.welcome().await;
    na.expect_msg(
        "b online",
        |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == b.node_id && peer.online),
    )
    .await;
    // A clean stop says goodbye for each session: no waiting for the timeout.
    let stopping = r2.server.take().expect("running");
    stopping.shutdown().await.expect("clean shutdown");
    tokio::time::timeout(
        Duration::from_secs(2),
        na.expect_msg(
            "b offline",
            |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == b.node_id && !peer.online),
        ),
    )
    .await
    .expect("b offline on r1 within 2 s of r2 stopping");
}

/// A session of `node` at `addr` that says it holds the netmap `holds`.
async fn connect_holding(addr: std::net::SocketAddr, node: &RegisterResponse, holds: u64) -> Node {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}{CONNECT_PATH}")
        .into_client_request()
        .unwrap();
    let headers = req.headers_mut();
    headers.insert(
        "authorization",
        bearer(node.node_id, &node.credential).parse().unwrap(),
    );
    headers.insert(NETMAP_DIGEST_HEADER, format_digest(holds).parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connects");
    Node { ws }
}

/// The peers and `resumed` of a Welcome.
fn welcome_peers(msg: ServerMsg) -> (Vec<PeerInfo>, bool) {
    match msg {
        ServerMsg::Welcome {
            peers,
            resumed,
            more: false,
            ..
        } => (peers, resumed),
        other => panic!("not a whole Welcome: {other:?}"),
    }
}

#[tokio::test]
async fn a_node_that_moves_with_a_current_netmap_is_not_sent_it_again() {
    let nats = LocalNats::start().expect("nats-server starts (Debian's nats-server package)");
    let (r1, r2) = replicas(&nats).await;
    let a = r1.new_node("a").await;
    let mut na = r1.connect(&a).await;
    na.welcome().await;
    let b = r2.new_node("b").await;
    let mut nb = Node::connect(r2.addr, b.node_id, &b.credential)
        .await
        .expect("b connects to r2");
    // b's netmap: its Welcome, then what changed, until it shows a online.
    let (mut held, _) = welcome_peers(nb.welcome().await);
    while !held.iter().any(|p| p.id == a.node_id && p.online) {
        if let ServerMsg::PeerUpsert { peer } = nb
            .expect_msg("an upsert", |m| matches!(m, ServerMsg::PeerUpsert { .. }))
            .await
        {
            held.retain(|p| p.id != peer.id);
            held.push(peer);
        }
    }
    let digest = netmap_digest(&held);

    // b moves to r1 holding a current netmap: no peers sent, told to keep it.
    drop(nb);
    let mut moved = connect_holding(r1.addr, &b, digest).await;
    let (peers, resumed) = welcome_peers(moved.welcome().await);
    assert!(resumed && peers.is_empty(), "{peers:?}");
    // A digest that is not the server's: the whole netmap.
    drop(moved);
    let mut wrong = connect_holding(r1.addr, &b, digest.wrapping_add(1)).await;
    let (peers, resumed) = welcome_peers(wrong.welcome().await);
    assert!(!resumed);
    assert_eq!(peers.iter().map(|p| p.id).collect::<Vec<_>>(), [a.node_id]);
    drop(wrong);

    // c enrols while b is away: b's old netmap is not current any more.
    let c = r2.new_node("c").await;
    na.expect_msg(
        "c enrolled",
        |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == c.node_id),
    )
    .await;
    let mut back = connect_holding(r1.addr, &b, digest).await;
    let (peers, resumed) = welcome_peers(back.welcome().await);
    assert!(!resumed);
    let mut ids: Vec<_> = peers.iter().map(|p| p.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [a.node_id, c.node_id]);
}
