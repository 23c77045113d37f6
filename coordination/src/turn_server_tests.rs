use super::*;

#[tokio::test]
async fn relay_socket_drops_datagrams_to_and_from_denied_peers() {
    let metrics = Arc::new(Metrics::default());
    let conn = FilteredConn::new(
        Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()),
        "203.0.113.1:50000".parse().unwrap(),
        Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()),
        Table::default(),
        Arc::new(PeerPolicy::default()),
        Arc::clone(&metrics),
        None,
    );
    let victim = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sent = conn
        .send_to(b"x", victim.local_addr().unwrap())
        .await
        .unwrap();
    assert_eq!(sent, 1, "reported as sent, like a firewall drop");
    let mut buf = [0u8; 8];
    let got = tokio::time::timeout(Duration::from_millis(100), victim.recv_from(&mut buf)).await;
    assert!(got.is_err(), "nothing may arrive");

    // Inbound from loopback is dropped too: recv_from keeps waiting.
    victim
        .send_to(b"y", conn.local_addr().unwrap())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_millis(100), conn.recv_from(&mut buf)).await;
    assert!(got.is_err());
    assert_eq!(metrics.turn_denied_peer.load(Ordering::Relaxed), 2);
}

#[test]
fn rest_auth_accepts_valid_and_rejects_expired_or_malformed() {
    let metrics = Arc::new(Metrics::default());
    let auth = RestAuth {
        secret: "secret".into(),
        node_exists: Arc::new(|node| node == 42),
        metrics: Arc::clone(&metrics),
    };
    let src: SocketAddr = "192.0.2.1:1".parse().unwrap();
    let c = auth::turn_credential("secret", 42, now_unix(), 600);
    let key = auth.auth_handle(&c.username, REALM, src).unwrap();
    assert_eq!(key, generate_auth_key(&c.username, REALM, &c.password));
    assert!(auth.auth_handle("1000:42", REALM, src).is_err());
    assert!(auth.auth_handle("soon:42", REALM, src).is_err());
    let no_node = format!("{}", now_unix() + 600);
    assert!(auth.auth_handle(&no_node, REALM, src).is_err());
    assert_eq!(metrics.turn_removed_node.load(Ordering::Relaxed), 0);
}

#[test]
fn rest_auth_refuses_credentials_of_removed_nodes() {
    let metrics = Arc::new(Metrics::default());
    let auth = RestAuth {
        secret: "secret".into(),
        node_exists: Arc::new(|node| node != 7),
        metrics: Arc::clone(&metrics),
    };
    let src: SocketAddr = "192.0.2.1:1".parse().unwrap();
    let removed = auth::turn_credential("secret", 7, now_unix(), 600);
    assert!(auth.auth_handle(&removed.username, REALM, src).is_err());
    assert_eq!(metrics.turn_removed_node.load(Ordering::Relaxed), 1);
    let other = auth::turn_credential("secret", 8, now_unix(), 600);
    assert!(auth.auth_handle(&other.username, REALM, src).is_ok());
}

fn relays(listen: &str, announced: &[&str]) -> FilteredRelays {
    let metrics = Arc::new(Metrics::default());
    let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let announced: Vec<IpAddr> = announced.iter().map(|s| s.parse().unwrap()).collect();
    FilteredRelays {
        listener: Arc::new(UdpSocket::from_std(listener).unwrap()),
        table: Table::default(),
        families: Families::new(listen.parse().unwrap(), &announced),
        policy: Arc::new(PeerPolicy::default()),
        quota: AllocationQuota::new(
            Quotas {
                per_user: 4,
                total: 4,
            },
            Arc::clone(&metrics),
        ),
        metrics,
        admitted: AdmittedSlot::default(),
    }
}

fn admit(r: &FilteredRelays, username: &str, family: Family) {
    *r.admitted.lock().unwrap() = Some(Admitted {
        username: username.into(),
        family,
    });
}

#[test]
fn each_family_binds_the_listen_address_when_it_is_of_that_family() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let pair = |bind: &str, announced: &str| {
        Some(FamilyAddrs {
            bind: ip(bind),
            announced: ip(announced),
        })
    };
    // [::] and 0.0.0.0 both mean "every address of the family".
    let f = Families::new(ip("::"), &[ip("203.0.113.1"), ip("2001:db8::1")]);
    assert_eq!(f.get(Family::V4), pair("0.0.0.0", "203.0.113.1"));
    assert_eq!(f.get(Family::V6), pair("::", "2001:db8::1"));
    assert_eq!(f.served(), vec![Family::V4, Family::V6]);
    let f = Families::new(ip("0.0.0.0"), &[ip("2001:db8::1"), ip("203.0.113.1")]);
    assert_eq!(f.get(Family::V6), pair("::", "2001:db8::1"));
    assert_eq!(f.served(), vec![Family::V4, Family::V6], "IPv4 first");
    // One address: its family binds it, the other every address.
    let f = Families::new(ip("192.0.2.5"), &[ip("192.0.2.5"), ip("2001:db8::1")]);
    assert_eq!(f.get(Family::V4), pair("192.0.2.5", "192.0.2.5"));
    assert_eq!(f.get(Family::V6), pair("::", "2001:db8::1"));
    // No address to announce: the family is not served.
    let f = Families::new(ip("::"), &[ip("203.0.113.1")]);
    assert_eq!(f.get(Family::V6), None);
    assert_eq!(f.served(), vec![Family::V4]);
    // A mapped listen or announced address counts as IPv4.
    let f = Families::new(ip("::ffff:127.0.0.1"), &[ip("::ffff:203.0.113.1")]);
    assert_eq!(f.get(Family::V4), pair("127.0.0.1", "203.0.113.1"));
}

#[test]
fn the_relay_family_is_the_requested_one_else_the_clients() {
    use relay::relay_family;
    let both = [Family::V4, Family::V6];
    let (v4, v6) = (Family::V4, Family::V6);
    // Asked for (RFC 6156): given when served, else refused (440).
    assert_eq!(relay_family(Some(v4), v6, &both), Some(v4));
    assert_eq!(relay_family(Some(v6), v4, &both), Some(v6));
    assert_eq!(relay_family(Some(v6), v4, &[v4]), None);
    assert_eq!(relay_family(Some(v4), v6, &[v6]), None);
    // Not asked for: the client's own, else what there is.
    assert_eq!(relay_family(None, v6, &both), Some(v6));
    assert_eq!(relay_family(None, v4, &both), Some(v4));
    assert_eq!(relay_family(None, v6, &[v4]), Some(v4));
}

#[tokio::test]
async fn an_allocation_gets_a_relay_socket_of_its_admitted_family() {
    let r = relays("::", &["203.0.113.1", "2001:db8::1"]);
    admit(&r, "1:1", Family::V4);
    // The turn crate's use_ipv4 is not what decides: the listener's note is.
    let (conn, relay_addr) = r.allocate_conn(false, 0).await.expect("IPv4 allocation");
    assert!(conn.local_addr().unwrap().is_ipv4());
    assert_eq!(relay_addr.ip(), "203.0.113.1".parse::<IpAddr>().unwrap());
    assert_eq!(r.quota.count("1:1"), 1);
    drop(conn);
    assert_eq!(r.quota.count("1:1"), 0, "the slot goes with the socket");
    // Without an admitted Allocate request there is nothing to count it on.
    assert!(r.allocate_conn(true, 0).await.is_err());

    if UdpSocket::bind("[::1]:0").await.is_err() {
        return; // no IPv6 on this host
    }
    admit(&r, "1:1", Family::V6);
    let (conn, relay_addr) = r.allocate_conn(true, 0).await.expect("IPv6 allocation");
    let local = conn.local_addr().unwrap();
    assert!(local.is_ipv6());
    assert_eq!(
        relay_addr,
        SocketAddr::new("2001:db8::1".parse().unwrap(), local.port())
    );
    assert_eq!(r.quota.count("1:1"), 1);
    drop(conn);
    // A family without an address is not allocated, and costs no slot.
    let r = relays("::", &["203.0.113.1"]);
    admit(&r, "1:1", Family::V6);
    assert!(r.allocate_conn(false, 0).await.is_err());
    assert_eq!(r.quota.count("1:1"), 0);
}

#[tokio::test]
async fn dual_stack_listener_reports_ipv4_clients_as_ipv4() {
    let Ok(socket) = UdpSocket::bind("[::]:0").await else {
        panic!("this host must allow a dual-stack [::] socket");
    };
    let port = socket.local_addr().unwrap().port();
    let metrics = Arc::new(Metrics::default());
    let listener = FilteredListener::new(
        Arc::new(socket),
        Table::default(),
        Arc::new(PeerPolicy::default()),
        Arc::clone(&metrics),
        AllocationQuota::new(
            Quotas {
                per_user: 1,
                total: 1,
            },
            Arc::clone(&metrics),
        ),
        AdmittedSlot::default(),
        vec![Family::V4],
    );
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(b"hello", ("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), listener.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(
        from,
        client.local_addr().unwrap(),
        "plain IPv4, not ::ffff:"
    );
    // And the answer to that IPv4 address reaches it.
    listener.send_to(b"back", from).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"back");
}

#[test]
fn username_names_the_node() {
    assert_eq!(turn_username_node("1700000000:42"), Some(42));
    assert_eq!(turn_username_node("1700000000"), None);
    assert_eq!(turn_username_node("1700000000:x"), None);
}

/// A non-loopback IPv4 address of this host, if it has a default route.
fn outbound_ipv4() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A non-loopback IPv6 address of this host (global or unique local), if
/// it has a route out.
fn outbound_ipv6() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("[::]:0").ok()?;
    s.connect("[2001:db8::1]:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A dual-stack embedded server on every address, announcing loopback.
async fn dual_stack_turn(metrics: &Arc<Metrics>) -> EmbeddedTurn {
    EmbeddedTurn::start(TurnOptions {
        listen_ip: "::".parse().unwrap(),
        port: 0,
        relay_ips: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        secret: "s".into(),
        policy: PeerPolicy {
            allow_private: true,
            ..PeerPolicy::default()
        },
        metrics: Arc::clone(metrics),
        quotas: Quotas {
            per_user: 4,
            total: 4,
        },
        node_exists: Arc::new(|_| true),
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn channel_data_on_a_live_binding_is_relayed_both_ways_without_the_turn_crate() {
    let Some(peer_ip) = outbound_ipv4() else {
        return; // no address a relay may send to on this host
    };
    let metrics = Arc::new(Metrics::default());
    let turn = EmbeddedTurn::start(TurnOptions {
        listen_ip: "127.0.0.1".parse().unwrap(),
        port: 0,
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        secret: "s".into(),
        policy: PeerPolicy {
            allow_private: true,
            ..PeerPolicy::default()
        },
        metrics: Arc::clone(&metrics),
        quotas: Quotas {
            per_user: 4,
            total: 4,
        },
        node_exists: Arc::new(|_| true),
    })
    .await
    .unwrap();
    let server = turn.local_addr();
    relayed_both_ways_on_the_fast_path(&turn, server, "127.0.0.1:0", peer_ip).await;
    turn.close().await;
}

#[tokio::test]
async fn an_ipv6_client_gets_an_ipv6_relay_and_its_channel_data_takes_the_fast_path() {
    if UdpSocket::bind("[::1]:0").await.is_err() {
        return; // no IPv6 loopback on this host
    }
    let Some(peer_ip) = outbound_ipv6() else {
        return; // no IPv6 address a relay may send to on this host
    };
    let metrics = Arc::new(Metrics::default());
    let turn = dual_stack_turn(&metrics).await;
    let [v4, v6] = turn.local_addrs() else {
        panic!("one listener per family: {:?}", turn.local_addrs());
    };
    assert!(v4.is_ipv4() && v6.is_ipv6());
    assert_eq!(v4.port(), v6.port(), "one port for both families");
    assert_eq!(
        turn.announced(),
        [
            SocketAddr::new("127.0.0.1".parse().unwrap(), v4.port()),
            SocketAddr::new("::1".parse().unwrap(), v6.port()),
        ]
    );
    let server = SocketAddr::new("::1".parse().unwrap(), v6.port());
    relayed_both_ways_on_the_fast_path(&turn, server, "[::1]:0", peer_ip).await;
    turn.close().await;
}

/// Allocates on `server` from a client bound to `client_bind`, binds a
/// channel to a peer on `peer_ip` and checks that 100 datagrams each way
/// cross the relay through the batched ChannelData path.
async fn relayed_both_ways_on_the_fast_path(
    turn: &EmbeddedTurn,
    server: SocketAddr,
    client_bind: &str,
    peer_ip: IpAddr,
) {
    use turn::client::{Client, ClientConfig};
    let (peers_before, clients_before) = {
        let table = turn.table.lock().unwrap();
        (table.relayed_to_peers, table.relayed_to_clients)
    };
    let cred = auth::turn_credential("s", 1, now_unix(), 600);
    let socket = Arc::new(UdpSocket::bind(client_bind).await.unwrap());
    let client_addr = socket.local_addr().unwrap();
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: cred.username,
        password: cred.password,
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: socket,
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    let relay = client.allocate().await.unwrap();
    let relayed = relay.local_addr().unwrap();
    assert_eq!(
        relayed.is_ipv4(),
        client_addr.is_ipv4(),
        "a relay of the client's family: {relayed}"
    );
    let peer = UdpSocket::bind((peer_ip, 0)).await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    // The turn client binds a channel after its first Send indication; keep
    // sending until the server's table has the binding.
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        relay.send_to(b"warm-up", peer_addr).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(50), peer.recv_from(&mut buf)).await;
        let bound = turn
            .table
            .lock()
            .unwrap()
            .to_peer(client_addr, 0x4000, std::time::Instant::now())
            .is_some();
        if bound {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no channel binding");
    }
    // Drain the warm-up datagrams.
    while tokio::time::timeout(Duration::from_millis(100), peer.recv_from(&mut buf))
        .await
        .is_ok()
    {}

    // Client to peer: ChannelData, relayed by the listener's batches.
    for i in 0..100u8 {
        relay.send_to(&[i; 100], peer_addr).await.unwrap();
    }
    let mut got = 0;
    while let Ok(Ok((n, from))) =
        tokio::time::timeout(Duration::from_secs(1), peer.recv_from(&mut buf)).await
    {
        assert_eq!(n, 100);
        assert_eq!(from.port(), relay.local_addr().unwrap().port());
        got += 1;
        if got == 100 {
            break;
        }
    }
    assert_eq!(
        got, 100,
        "every datagram reaches the peer, in a quiet loopback"
    );

    // Peer to client: ChannelData from the relay socket's batches.
    for i in 0..100u8 {
        peer.send_to(&[i; 200], relayed).await.unwrap();
    }
    let mut got = 0;
    while let Ok(Ok((n, from))) =
        tokio::time::timeout(Duration::from_secs(1), relay.recv_from(&mut buf)).await
    {
        assert_eq!((n, from), (200, peer_addr));
        assert_eq!(buf[0], got as u8, "in order");
        got += 1;
        if got == 100 {
            break;
        }
    }
    assert_eq!(got, 100);
    let (to_peers, to_clients) = {
        let table = turn.table.lock().unwrap();
        (table.relayed_to_peers, table.relayed_to_clients)
    };
    assert!(
        to_peers - peers_before >= 100,
        "{to_peers} relayed to the peer"
    );
    assert!(
        to_clients - clients_before >= 100,
        "{to_clients} relayed to the client"
    );
    client.close().await.unwrap();
}
