//! Every replica's STUN/TURN: two replicas in this process on one store and a
//! real `nats-server` on loopback; a node of either is told both servers,
//! its own replica's first, and no longer the other's once it stops.

mod common;

use common::{http, wait_until, TestServer};
use overlay_proto::coord::{ClientMsg, IceConfig, ServerMsg};
use overlay_tests::nats::LocalNats;

/// A replica with its own state directory's neighbour: one SQLite store.
async fn replica(url: &str, store_of: Option<&TestServer>) -> TestServer {
    let url = url.to_string();
    let dir = store_of.map(|r| r.dir.path().to_path_buf());
    TestServer::start_with(move |c| {
        c.bus = Some(url);
        if let Some(dir) = dir {
            c.state_dir = dir;
        }
    })
    .await
}

async fn ice_of(node: &mut common::Node) -> IceConfig {
    node.send(&ClientMsg::RefreshIce).await;
    match node
        .expect_msg("ice config", |m| matches!(m, ServerMsg::IceConfig { .. }))
        .await
    {
        ServerMsg::IceConfig { ice } => ice,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_node_is_told_every_live_replicas_stun_turn_its_own_first() {
    let nats = LocalNats::start().expect("nats-server starts (Debian's nats-server package)");
    let r1 = replica(&nats.url(), None).await;
    let mut r2 = replica(&nats.url(), Some(&r1)).await;
    let port = |r: &TestServer| r.server().turn_addr().unwrap().port();
    let (p1, p2) = (port(&r1), port(&r2));
    // Enrolments reach the other replica over the bus: join it first.
    for r in [&r1, &r2] {
        wait_until("each replica to hear the other", || async {
            let (_, body) = http(r.addr, "GET", "/healthz", &[], b"").await;
            body.contains("bus: connected, 1 other replicas")
        })
        .await;
    }

    let a = r1.new_node("a").await;
    let mut node = r1.connect(&a).await;
    node.welcome().await;
    // Heartbeats come every second; within the test deadline r1 knows r2's.
    let mut ice = ice_of(&mut node).await;
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while ice.stun.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "r2's servers never listed: {ice:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        ice = ice_of(&mut node).await;
    }
    assert_eq!(
        ice.stun,
        vec![
            format!("stun:127.0.0.1:{p1}"),
            format!("stun:127.0.0.1:{p2}")
        ]
    );
    assert_eq!(ice.turn.len(), 1, "one credential for both: {ice:?}");
    assert_eq!(
        ice.turn[0].urls,
        vec![
            format!("turn:127.0.0.1:{p1}?transport=udp"),
            format!("turn:127.0.0.1:{p2}?transport=udp")
        ]
    );
    assert_eq!(ice.netcheck.len(), 2, "{ice:?}");

    // And the credential is good on the other replica's TURN server.
    let other = r2.server().turn_addr().unwrap();
    let client = common::turn_client(
        "127.0.0.1:0",
        other,
        &ice.turn[0].username,
        &ice.turn[0].credential,
    )
    .await;
    let allocated = client.allocate().await;
    assert!(
        allocated.is_ok(),
        "r1's credential on r2: {:?}",
        allocated.err()
    );
    client.close().await.unwrap();

    // A replica that stops is no longer listed once the others see it gone.
    if let Some(s) = r2.server.take() {
        s.shutdown().await.unwrap();
    }
    wait_until("r1 to see r2 gone", || async {
        let (_, body) = http(r1.addr, "GET", "/healthz", &[], b"").await;
        body.contains("bus: connected, 0 other replicas")
    })
    .await;
    let ice = ice_of(&mut node).await;
    assert_eq!(ice.stun, vec![format!("stun:127.0.0.1:{p1}")]);
    assert_eq!(
        ice.turn[0].urls,
        vec![format!("turn:127.0.0.1:{p1}?transport=udp")]
    );
}
