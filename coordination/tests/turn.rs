//! The embedded STUN/TURN server, driven by the turn crate's own client.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use overlay_coord::auth::turn_credential;
use overlay_coord::store::now_unix;
use tokio::net::UdpSocket;
use turn::client::Client;
use webrtc_util::Conn;

async fn client(server: SocketAddr, username: &str, password: &str) -> Client {
    turn_client("127.0.0.1:0", server, username, password).await
}

/// A non-loopback IPv4 address of this host, if it has a default route.
fn outbound_ipv4() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Sends through the relay to `target` until it arrives or `tries` run out.
async fn relay_reaches(relay: &impl Conn, target: &UdpSocket, tries: u32) -> bool {
    let dest = target.local_addr().unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..tries {
        let _ = relay.send_to(b"through-turn", dest).await;
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(200), target.recv_from(&mut buf)).await
        {
            return &buf[..n] == b"through-turn";
        }
    }
    false
}

#[tokio::test]
async fn stun_binding_is_answered_without_credentials() {
    let srv = TestServer::start().await;
    let turn_addr = srv.server().turn_addr().unwrap();
    let c = client(turn_addr, "", "").await;
    let mapped = tokio::time::timeout(DEADLINE, c.send_binding_request())
        .await
        .expect("answer in time")
        .expect("binding success");
    assert_eq!(mapped.ip().to_string(), "127.0.0.1");
    c.close().await.unwrap();
}

#[tokio::test]
async fn turn_accepts_rest_credentials_and_refuses_bad_or_expired_ones() {
    let srv = TestServer::start().await;
    let turn_addr = srv.server().turn_addr().unwrap();

    let node = srv.new_node("t").await.node_id;
    let good = turn_credential("test-secret", node, now_unix(), 600);
    let c = client(turn_addr, &good.username, &good.password).await;
    assert!(c.allocate().await.is_ok());
    c.close().await.unwrap();

    let c = client(turn_addr, &good.username, "wrong-password").await;
    assert!(c.allocate().await.is_err());
    c.close().await.unwrap();

    let expired = turn_credential("test-secret", node, now_unix() - 7200, 600);
    let c = client(turn_addr, &expired.username, &expired.password).await;
    assert!(c.allocate().await.is_err());
    c.close().await.unwrap();
}

#[tokio::test]
async fn turn_refuses_to_relay_to_loopback_or_the_hosts_own_addresses() {
    let srv = TestServer::start_with(|c| c.turn.allow_private = true).await;
    let turn_addr = srv.server().turn_addr().unwrap();
    let node = srv.new_node("t").await.node_id;
    let cred = turn_credential("test-secret", node, now_unix(), 600);
    let c = client(turn_addr, &cred.username, &cred.password).await;
    let relay = c.allocate().await.expect("allocation");

    let victim = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dest = victim.local_addr().unwrap();
    // The permission itself is refused (403), as coturn's denied-peer-ip does…
    let refused = relay.send_to(b"attack", dest).await;
    assert!(
        refused.is_err(),
        "CreatePermission to loopback must fail: {refused:?}"
    );
    assert!(srv.metric("overlay_coord_turn_denied_peer_total").await >= 1);
    // …and nothing arrives at the loopback socket.
    assert!(!relay_reaches(&relay, &victim, 3).await);

    // Nor to this host's other addresses, private ones allowed or not: they
    // are the coordinator's own (its HTTP, metrics, a NATS on [::]). Relays
    // to other hosts are shown working by the lab's TURN tests
    // (tests/tests/nat_traversal.rs, ipv6.rs).
    if let Some(ip) = outbound_ipv4() {
        if let Ok(peer) = UdpSocket::bind(SocketAddr::new(ip, 0)).await {
            let dest = peer.local_addr().unwrap();
            assert!(
                relay.send_to(b"attack", dest).await.is_err(),
                "CreatePermission to the host's own {ip} must fail"
            );
            assert!(!relay_reaches(&relay, &peer, 3).await, "relay to {ip}");
        }
    }
    c.close().await.unwrap();
}

type Relay = Box<dyn Conn + Send + Sync>;

/// Allocates with a fresh client (its own 5-tuple); keep the client and the
/// relay so that the allocation lives on.
async fn allocate(
    server: SocketAddr,
    cred: &overlay_coord::auth::TurnCredential,
) -> (Client, Result<Relay, String>) {
    let c = client(server, &cred.username, &cred.password).await;
    let result = match c.allocate().await {
        Ok(relay) => Ok(Box::new(relay) as Relay),
        Err(e) => Err(e.to_string()),
    };
    (c, result)
}

#[tokio::test]
async fn one_user_is_held_to_its_allocation_quota_while_another_still_allocates() {
    let srv = TestServer::start().await;
    let turn_addr = srv.server().turn_addr().unwrap();
    let quota = srv.config.turn.allocations_per_user;
    assert_eq!(quota, 16);
    let a = srv.new_node("a").await.node_id;
    let b = srv.new_node("b").await.node_id;
    let cred_a = turn_credential("test-secret", a, now_unix(), 600);
    let cred_b = turn_credential("test-secret", b, now_unix(), 600);

    let mut held = Vec::new();
    for i in 0..quota {
        let (c, result) = allocate(turn_addr, &cred_a).await;
        result.unwrap_or_else(|e| panic!("allocation {} of {quota}: {e}", i + 1));
        held.push(c);
    }
    let (c, over) = allocate(turn_addr, &cred_a).await;
    let Err(err) = over else {
        panic!("one allocation over the quota must be refused")
    };
    assert!(
        err.contains("486"),
        "486 Allocation Quota Reached expected: {err}"
    );
    held.push(c);
    assert!(srv.metric("overlay_coord_turn_quota_refused_total").await >= 1);
    assert_eq!(
        srv.metric("overlay_coord_turn_allocations").await,
        quota as u64
    );

    let (c, other) = allocate(turn_addr, &cred_b).await;
    other.expect("another user still allocates");
    held.push(c);
    for c in held {
        c.close().await.unwrap();
    }
}

#[tokio::test]
async fn the_total_allocation_quota_holds_across_users() {
    let srv = TestServer::start_with(|c| c.turn.max_allocations = 3).await;
    let turn_addr = srv.server().turn_addr().unwrap();
    let mut held = Vec::new();
    let mut relays = Vec::new();
    for i in 0..3 {
        let node = srv.new_node(&format!("n{i}")).await.node_id;
        let cred = turn_credential("test-secret", node, now_unix(), 600);
        let (c, result) = allocate(turn_addr, &cred).await;
        relays.push(result.expect("under the total quota"));
        held.push(c);
    }
    let node = srv.new_node("late").await.node_id;
    let cred = turn_credential("test-secret", node, now_unix(), 600);
    let (c, over) = allocate(turn_addr, &cred).await;
    let Err(err) = over else {
        panic!("an allocation over the total quota must be refused")
    };
    assert!(
        err.contains("508"),
        "508 Insufficient Capacity expected: {err}"
    );
    held.push(c);

    // Closing one allocation (a Refresh with lifetime 0) makes room again.
    relays.remove(0).close().await.unwrap();
    wait_until("a freed allocation", || async {
        srv.metric("overlay_coord_turn_allocations").await < 3
    })
    .await;
    let (c, again) = allocate(turn_addr, &cred).await;
    again.expect("room after a close");
    held.push(c);
    for c in held {
        c.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_removed_nodes_credential_is_refused_and_its_allocations_deleted() {
    let srv = TestServer::start().await;
    let turn_addr = srv.server().turn_addr().unwrap();
    let reg = srv.new_node("doomed").await;
    let cred = turn_credential("test-secret", reg.node_id, now_unix(), 600);
    let (held, result) = allocate(turn_addr, &cred).await;
    result.expect("allocation while enrolled");
    assert_eq!(srv.metric("overlay_coord_turn_allocations").await, 1);

    srv.store()
        .remove_node(&reg.name, now_unix())
        .unwrap()
        .expect("node existed");
    wait_until("the server to see the removal", || async {
        srv.metric("overlay_coord_nodes").await == 0
    })
    .await;

    let (c, refused) = allocate(turn_addr, &cred).await;
    assert!(
        refused.is_err(),
        "a removed node's credential must be refused"
    );
    assert!(srv.metric("overlay_coord_turn_removed_node_total").await >= 1);
    wait_until("the removed node's allocation to be deleted", || async {
        srv.metric("overlay_coord_turn_allocations").await == 0
    })
    .await;
    c.close().await.unwrap();
    held.close().await.unwrap();
}
