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

/// Whether this host has IPv6 loopback (`ip -6 addr show lo`).
async fn has_ipv6_loopback() -> bool {
    tokio::net::UdpSocket::bind("[::1]:0").await.is_ok()
}

/// A server that announces STUN/TURN on 127.0.0.1 and [::1].
async fn dual_stack_server() -> TestServer {
    TestServer::start_with(|c| {
        c.public_addrs = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    })
    .await
}

#[tokio::test]
async fn with_an_ipv6_public_address_nodes_are_told_stun_and_turn_in_both_families() {
    if !has_ipv6_loopback().await {
        eprintln!("skipped: no IPv6 loopback on this host");
        return;
    }
    let srv = dual_stack_server().await;
    let [v4, v6] = srv.server().turn_addrs() else {
        panic!("one listener per family: {:?}", srv.server().turn_addrs());
    };
    assert!(v4.is_ipv4() && v6.is_ipv6(), "{v4} {v6}");
    let a = srv.new_node("a").await;
    let mut node = srv.connect(&a).await;
    let ServerMsg::Welcome { ice, .. } = node.welcome().await else {
        unreachable!()
    };
    let (p4, p6) = (v4.port(), v6.port());
    assert_eq!(
        ice.stun,
        vec![format!("stun:127.0.0.1:{p4}"), format!("stun:[::1]:{p6}")]
    );
    assert_eq!(ice.turn.len(), 1, "one server, one credential");
    assert_eq!(
        ice.turn[0].urls,
        vec![
            format!("turn:127.0.0.1:{p4}?transport=udp"),
            format!("turn:[::1]:{p6}?transport=udp")
        ]
    );
    assert_eq!(ice.netcheck.len(), 2, "{:?}", ice.netcheck);
    assert!(ice.netcheck[0].starts_with("stun:127.0.0.1:"));
    assert!(ice.netcheck[1].starts_with("stun:[::1]:"));
}

#[tokio::test]
async fn stun_over_ipv6_maps_to_the_clients_ipv6_address_and_turn_relays_in_its_family() {
    if !has_ipv6_loopback().await {
        eprintln!("skipped: no IPv6 loopback on this host");
        return;
    }
    let srv = dual_stack_server().await;
    let v6 = srv.server().turn_addrs()[1];
    let server6 = std::net::SocketAddr::new("::1".parse().unwrap(), v6.port());

    // A plain Binding request over [::1]: XOR-MAPPED-ADDRESS of family IPv6.
    let c = turn_client("[::1]:0", server6, "", "").await;
    let mapped = tokio::time::timeout(DEADLINE, c.send_binding_request())
        .await
        .expect("answer in time")
        .expect("binding success");
    assert!(mapped.is_ipv6(), "{mapped}");
    assert_eq!(mapped.ip().to_string(), "::1");
    c.close().await.unwrap();

    // An allocation over [::1] gets an IPv6 relayed address, announced as
    // the IPv6 public address; one over IPv4 an IPv4 one, as before.
    let node = srv.new_node("t").await.node_id;
    let cred = overlay_coord::auth::turn_credential(
        "test-secret",
        node,
        overlay_coord::store::now_unix(),
        600,
    );
    let c = turn_client("[::1]:0", server6, &cred.username, &cred.password).await;
    let relay = c.allocate().await.expect("IPv6 allocation");
    let relayed = webrtc_util::Conn::local_addr(&relay).unwrap();
    assert!(relayed.is_ipv6(), "{relayed}");
    assert_eq!(relayed.ip().to_string(), "::1");
    c.close().await.unwrap();

    let server4 = srv.server().turn_addrs()[0];
    let c = turn_client("127.0.0.1:0", server4, &cred.username, &cred.password).await;
    let relay = c.allocate().await.expect("IPv4 allocation");
    let relayed = webrtc_util::Conn::local_addr(&relay).unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    c.close().await.unwrap();
}

#[tokio::test]
async fn turn_refuses_to_relay_into_the_mesh_ipv6_prefix_or_ipv6_loopback() {
    if !has_ipv6_loopback().await {
        eprintln!("skipped: no IPv6 loopback on this host");
        return;
    }
    let prefix: Ipv6Net = "fd12:3456:789a::/48".parse().unwrap();
    let srv = TestServer::start_with(|c| {
        c.public_addrs = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        c.network6 = Some(prefix);
        // Private space allowed, as in a lab: the mesh stays denied anyway.
        c.turn.allow_private = true;
    })
    .await;
    let server6 =
        std::net::SocketAddr::new("::1".parse().unwrap(), srv.server().turn_addrs()[1].port());
    let a = srv.new_node("a").await;
    let cred = overlay_coord::auth::turn_credential(
        "test-secret",
        a.node_id,
        overlay_coord::store::now_unix(),
        600,
    );
    let c = turn_client("[::1]:0", server6, &cred.username, &cred.password).await;
    let relay = c.allocate().await.expect("IPv6 allocation");
    let denied_before = srv.metric("overlay_coord_turn_denied_peer_total").await;
    let mesh_peer = std::net::SocketAddr::new(std::net::IpAddr::V6(mesh_ip6(prefix, a.mesh_ip)), 9);
    let loopback = "[::1]:9".parse().unwrap();
    for peer in [mesh_peer, loopback] {
        // The CreatePermission the client sends first is refused (403).
        assert!(
            webrtc_util::Conn::send_to(&relay, b"x", peer)
                .await
                .is_err(),
            "relaying to {peer} must be refused"
        );
    }
    assert!(srv.metric("overlay_coord_turn_denied_peer_total").await >= denied_before + 2);
    c.close().await.unwrap();
}

/// An Allocate request with long-term credentials and, when given,
/// REQUESTED-ADDRESS-FAMILY (which the turn crate's client cannot send), from
/// `socket` to `server`: the relayed address, or the error code.
async fn allocate_with_family(
    socket: &tokio::net::UdpSocket,
    server: std::net::SocketAddr,
    username: &str,
    password: &str,
    family: Option<turn::proto::reqfamily::RequestedAddressFamily>,
) -> Result<std::net::SocketAddr, u16> {
    use stun::agent::TransactionId;
    use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
    use stun::error_code::ErrorCodeAttribute;
    use stun::integrity::MessageIntegrity;
    use stun::message::{
        Getter, Message, MessageType, Setter, CLASS_ERROR_RESPONSE, CLASS_REQUEST, METHOD_ALLOCATE,
    };
    use stun::textattrs::TextAttribute;
    use turn::proto::relayaddr::RelayedAddress;
    use turn::proto::reqfamily::RequestedAddressFamily;
    use turn::proto::reqtrans::RequestedTransport;

    async fn exchange(
        socket: &tokio::net::UdpSocket,
        server: std::net::SocketAddr,
        attrs: Vec<Box<dyn Setter>>,
    ) -> Message {
        let mut all: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
            Box::new(RequestedTransport {
                protocol: turn::proto::PROTO_UDP,
            }),
        ];
        all.extend(attrs);
        let mut m = Message::new();
        m.build(&all).unwrap();
        socket.send_to(&m.raw, server).await.unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = tokio::time::timeout(DEADLINE, socket.recv_from(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        let mut res = Message::new();
        res.unmarshal_binary(&buf[..n]).unwrap();
        res
    }

    let family_attr = |attrs: &mut Vec<Box<dyn Setter>>| {
        if let Some(f) = &family {
            attrs.push(Box::new(RequestedAddressFamily(f.0)));
        }
    };
    let mut first: Vec<Box<dyn Setter>> = Vec::new();
    family_attr(&mut first);
    let challenge = exchange(socket, server, first).await;
    let nonce = TextAttribute::get_from_as(&challenge, ATTR_NONCE).expect("a 401 with a nonce");
    let realm = TextAttribute::get_from_as(&challenge, ATTR_REALM).unwrap();
    let mut second: Vec<Box<dyn Setter>> = Vec::new();
    family_attr(&mut second);
    second.push(Box::new(TextAttribute::new(ATTR_USERNAME, username.into())));
    second.push(Box::new(realm.clone()));
    second.push(Box::new(nonce));
    second.push(Box::new(MessageIntegrity::new_long_term_integrity(
        username.into(),
        realm.text,
        password.into(),
    )));
    let res = exchange(socket, server, second).await;
    if res.typ.class == CLASS_ERROR_RESPONSE {
        let mut code = ErrorCodeAttribute::default();
        code.get_from(&res).unwrap();
        return Err(code.code.0);
    }
    let mut relayed = RelayedAddress::default();
    relayed.get_from(&res).unwrap();
    Ok(std::net::SocketAddr::new(relayed.ip, relayed.port))
}

#[tokio::test]
async fn an_ipv6_client_gets_an_ipv4_relay_when_it_asks_for_one_and_440_for_a_family_not_served() {
    use turn::proto::reqfamily::{REQUESTED_FAMILY_IPV4, REQUESTED_FAMILY_IPV6};
    if !has_ipv6_loopback().await {
        eprintln!("skipped: no IPv6 loopback on this host");
        return;
    }
    let srv = dual_stack_server().await;
    let server6 =
        std::net::SocketAddr::new("::1".parse().unwrap(), srv.server().turn_addrs()[1].port());
    let node = srv.new_node("t").await.node_id;
    let cred = overlay_coord::auth::turn_credential(
        "test-secret",
        node,
        overlay_coord::store::now_unix(),
        600,
    );
    // Over IPv6, asking for IPv4 (an IPv6-only node reaching IPv4 peers).
    let socket = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
    let relayed = allocate_with_family(
        &socket,
        server6,
        &cred.username,
        &cred.password,
        Some(REQUESTED_FAMILY_IPV4),
    )
    .await
    .expect("an IPv4 relay");
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    // Asking for IPv6 explicitly, from another client address.
    let socket = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
    let relayed = allocate_with_family(
        &socket,
        server6,
        &cred.username,
        &cred.password,
        Some(REQUESTED_FAMILY_IPV6),
    )
    .await
    .expect("an IPv6 relay");
    assert_eq!(relayed.ip().to_string(), "::1");

    // A server without an IPv6 address refuses IPv6 relays with 440.
    let v4_only = TestServer::start().await;
    let node = v4_only.new_node("t").await.node_id;
    let cred = overlay_coord::auth::turn_credential(
        "test-secret",
        node,
        overlay_coord::store::now_unix(),
        600,
    );
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let refused = allocate_with_family(
        &socket,
        v4_only.server().turn_addr().unwrap(),
        &cred.username,
        &cred.password,
        Some(REQUESTED_FAMILY_IPV6),
    )
    .await;
    assert_eq!(refused, Err(440));
}
