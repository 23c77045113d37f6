//! The mesh's IPv6 side, end to end: the prefix a deployment gets and keeps,
//! the addresses nodes and their peers carry, and STUN/TURN over IPv6.

mod common;

use common::*;
use ipnet::Ipv6Net;
use overlay_proto::coord::{mesh_ip6, PeerInfo, RegisterResponse, ServerMsg};

/// The node's own record, its peers and the prefix its Welcome carries.
async fn welcome(node: &mut Node) -> (PeerInfo, Vec<PeerInfo>, Option<Ipv6Net>) {
    match node.welcome().await {
        ServerMsg::Welcome {
            node,
            peers,
            network6,
            ..
        } => (node, peers, network6),
        other => panic!("{other:?}"),
    }
}

fn expected6(r: &RegisterResponse) -> std::net::Ipv6Addr {
    mesh_ip6(
        r.network6.expect("registration carries the prefix"),
        r.mesh_ip,
    )
}

#[tokio::test]
async fn nodes_and_their_peers_carry_mesh_ipv6_addresses_in_the_deployments_prefix() {
    let mut srv = TestServer::start().await;
    let a = srv.new_node("a").await;
    let b = srv.new_node("b").await;
    let prefix = a.network6.expect("a prefix without --network6");
    assert_eq!(prefix.prefix_len(), 48, "the generated prefix is a /48");
    assert_eq!(prefix.network().octets()[0], 0xfd, "in fd00::/8");
    assert_eq!(b.network6, Some(prefix));

    let mut node_a = srv.connect(&a).await;
    let (me, peers, network6) = welcome(&mut node_a).await;
    assert_eq!(network6, Some(prefix));
    assert_eq!(me.mesh_ip6, Some(expected6(&a)));
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].mesh_ip6, Some(expected6(&b)));
    assert!(prefix.contains(&expected6(&b)));

    // A node enrolled later reaches the others as a delta with its address.
    let c = srv.new_node("c").await;
    let upsert = node_a
        .expect_msg(
            "c's upsert",
            |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == c.node_id),
        )
        .await;
    let ServerMsg::PeerUpsert { peer } = upsert else {
        unreachable!()
    };
    assert_eq!(peer.mesh_ip6, Some(expected6(&c)));
    // And when it comes online.
    let _node_c = srv.connect(&c).await;
    let online = node_a
        .expect_msg(
            "c online",
            |m| matches!(m, ServerMsg::PeerUpsert { peer } if peer.id == c.node_id && peer.online),
        )
        .await;
    let ServerMsg::PeerUpsert { peer } = online else {
        unreachable!()
    };
    assert_eq!(peer.mesh_ip6, Some(expected6(&c)));

    // The prefix was chosen once: a restart keeps it, so every address stays.
    drop(node_a);
    srv.restart().await;
    let mut node_b = srv.connect(&b).await;
    let (me, peers, network6) = welcome(&mut node_b).await;
    assert_eq!(network6, Some(prefix));
    assert_eq!(me.mesh_ip6, Some(expected6(&b)));
    for p in peers {
        assert_eq!(
            p.mesh_ip6,
            Some(mesh_ip6(prefix, p.mesh_ip)),
            "{} after the restart",
            p.name
        );
    }
}

#[tokio::test]
async fn a_configured_prefix_is_used_and_a_different_one_later_is_refused() {
    let prefix: Ipv6Net = "fd12:3456:789a::/48".parse().unwrap();
    let mut srv = TestServer::start_with(|c| c.network6 = Some(prefix)).await;
    let a = srv.new_node("a").await;
    assert_eq!(a.network6, Some(prefix));
    let mut node = srv.connect(&a).await;
    let (me, _, network6) = welcome(&mut node).await;
    assert_eq!(network6, Some(prefix));
    assert_eq!(
        me.mesh_ip6.unwrap().segments()[..3],
        [0xfd12, 0x3456, 0x789a]
    );
    drop(node);

    // Nodes hold addresses in it now: another prefix would move them all.
    if let Some(s) = srv.server.take() {
        s.shutdown().await.unwrap();
    }
    let mut config = srv.config.clone();
    config.network6 = Some("fd00:1::/48".parse().unwrap());
    let err = match overlay_coord::start(config).await {
        Ok(_) => panic!("a changed prefix must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("keep --network6 fd12:3456:789a::/48"),
        "says what to do: {err}"
    );
    srv.restart().await;
}
