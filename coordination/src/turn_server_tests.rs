use super::*;

#[tokio::test]
async fn relay_socket_drops_datagrams_to_and_from_denied_peers() {
    let metrics = Arc::new(Metrics::default());
    let conn = FilteredConn {
        inner: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        policy: Arc::new(PeerPolicy::default()),
        metrics: Arc::clone(&metrics),
        _slot: None,
    };
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

fn relays(bind: &str, relay: &str) -> FilteredRelays {
    let metrics = Arc::new(Metrics::default());
    FilteredRelays {
        relay_ip: relay.parse().unwrap(),
        bind_ip: bind.parse().unwrap(),
        policy: Arc::new(PeerPolicy::default()),
        quota: AllocationQuota::new(
            Quotas {
                per_user: 4,
                total: 4,
            },
            Arc::clone(&metrics),
        ),
        metrics,
    }
}

#[test]
fn relay_family_follows_the_allocation_not_the_listener() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // A dual-stack [::] listener serves IPv4 allocations from 0.0.0.0.
    let r = relays("::", "203.0.113.1");
    assert_eq!(r.addresses(true), Some((ip("0.0.0.0"), ip("203.0.113.1"))));
    // No IPv6 address to announce: IPv6 allocations are refused.
    assert_eq!(r.addresses(false), None);
    let r = relays("::", "2001:db8::1");
    assert_eq!(r.addresses(false), Some((ip("::"), ip("2001:db8::1"))));
    assert_eq!(r.addresses(true), None);
    // A mapped listener or announced address counts as IPv4.
    let r = relays("::ffff:127.0.0.1", "::ffff:203.0.113.1");
    assert_eq!(
        r.addresses(true),
        Some((ip("127.0.0.1"), ip("203.0.113.1")))
    );
    let r = relays("0.0.0.0", "203.0.113.1");
    assert_eq!(r.addresses(false), None);
}

#[tokio::test]
async fn ipv4_allocation_on_a_dual_stack_listener_gets_an_ipv4_relay_socket() {
    let r = relays("::", "203.0.113.1");
    r.quota.expect("1:1").unwrap();
    let (conn, relay_addr) = r.allocate_conn(true, 0).await.expect("IPv4 allocation");
    assert!(conn.local_addr().unwrap().is_ipv4());
    assert_eq!(relay_addr.ip(), "203.0.113.1".parse::<IpAddr>().unwrap());
    assert_eq!(r.quota.count("1:1"), 1);
    drop(conn);
    assert_eq!(r.quota.count("1:1"), 0, "the slot goes with the socket");
    // Without an admitted Allocate request there is nothing to count it on.
    assert!(r.allocate_conn(true, 0).await.is_err());
}

#[tokio::test]
async fn dual_stack_listener_reports_ipv4_clients_as_ipv4() {
    let Ok(socket) = UdpSocket::bind("[::]:0").await else {
        panic!("this host must allow a dual-stack [::] socket");
    };
    let port = socket.local_addr().unwrap().port();
    let metrics = Arc::new(Metrics::default());
    let listener = FilteredListener {
        inner: socket,
        policy: Arc::new(PeerPolicy::default()),
        quota: AllocationQuota::new(
            Quotas {
                per_user: 1,
                total: 1,
            },
            Arc::clone(&metrics),
        ),
        metrics,
    };
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
