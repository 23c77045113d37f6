//! `POST /v1/register` and what survives a restart.

mod common;

use common::*;
use overlay_coord::store::now_unix;
use overlay_proto::coord::{error_code, ServerMsg};

#[tokio::test]
async fn register_returns_id_ip_network_and_credential() {
    let srv = TestServer::start().await;
    let r = srv.new_node("web").await;
    assert_eq!(r.name, "web");
    assert_eq!(r.mesh_ip.to_string(), "100.64.0.1");
    assert_eq!(r.network.to_string(), "100.64.0.0/10");
    assert!(r.credential.len() >= 32);
    let second = srv.new_node("web").await;
    assert_eq!(second.name, "web-2");
    assert_ne!(second.mesh_ip, r.mesh_ip);
}

#[tokio::test]
async fn reregistering_the_same_public_key_keeps_id_and_ip() {
    let srv = TestServer::start().await;
    let key = srv.create_key(true);
    let pk = random_public_key();
    let first = srv.register_ok(&key, &pk, "db").await;
    let _other = srv.register_ok(&key, &random_public_key(), "x").await;
    let again = srv.register_ok(&key, &pk, "db").await;
    assert_eq!(again.node_id, first.node_id);
    assert_eq!(again.mesh_ip, first.mesh_ip);
    assert_eq!(again.name, "db");
    assert_ne!(again.credential, first.credential);
    // The old credential stops working, the new one works.
    assert!(Node::connect(srv.addr, first.node_id, &first.credential)
        .await
        .is_err());
    let mut node = srv.connect(&again).await;
    node.welcome().await;
}

#[tokio::test]
async fn refused_auth_keys_get_401_with_the_precise_code() {
    let srv = TestServer::start().await;
    let store = srv.store();
    let now = now_unix();
    let (_, expired) = store.create_key(true, Some(now - 1), now - 100).unwrap();
    let (revoked_id, revoked) = store.create_key(true, None, now).unwrap();
    store.revoke_key(revoked_id, now).unwrap();
    let spent = srv.create_key(false);
    srv.register_ok(&spent, &random_public_key(), "first").await;

    for (key, code) in [
        ("ovk_doesnotexist", error_code::AUTH_KEY_UNKNOWN),
        (expired.as_str(), error_code::AUTH_KEY_EXPIRED),
        (revoked.as_str(), error_code::AUTH_KEY_REVOKED),
        (spent.as_str(), error_code::AUTH_KEY_SPENT),
    ] {
        let (status, body) = srv.register(key, &random_public_key(), "n").await;
        assert_eq!(status, 401, "{code}: {body}");
        assert_eq!(api_error(&body).error, code);
    }
    // A well-behaved node still enrols.
    srv.new_node("fine").await;
}

#[tokio::test]
async fn invalid_public_key_hostname_or_body_is_400() {
    let srv = TestServer::start().await;
    let key = srv.create_key(true);
    for (pk, host) in [
        ("not-base64!".to_string(), "ok"),
        (random_public_key()[..20].to_string(), "ok"),
        (random_public_key(), "bad_name"),
        (random_public_key(), "-dash"),
        (random_public_key(), &"a".repeat(64)),
    ] {
        let (status, body) = srv.register(&key, &pk, host).await;
        assert_eq!(status, 400, "{pk} {host}: {body}");
        assert_eq!(api_error(&body).error, error_code::BAD_REQUEST);
    }
    let (status, body) = http(srv.addr, "POST", "/v1/register", &[], b"{not json").await;
    assert_eq!(status, 400);
    assert_eq!(api_error(&body).error, error_code::BAD_REQUEST);
    let huge = vec![b' '; 64 * 1024];
    let (status, _) = http(srv.addr, "POST", "/v1/register", &[], &huge).await;
    assert_eq!(status, 413);
    // Nothing was spent or allocated by the bad requests.
    assert!(srv.store().list_nodes().unwrap().is_empty());
}

#[tokio::test]
async fn full_pool_is_409_pool_exhausted() {
    let srv = TestServer::start_with(|c| c.network = "10.5.0.0/30".parse().unwrap()).await;
    let a = srv.new_node("a").await;
    let b = srv.new_node("b").await;
    assert_eq!(a.mesh_ip.to_string(), "10.5.0.1");
    assert_eq!(b.mesh_ip.to_string(), "10.5.0.2");
    let key = srv.create_key(true);
    let (status, body) = srv.register(&key, &random_public_key(), "c").await;
    assert_eq!(status, 409);
    assert_eq!(api_error(&body).error, error_code::POOL_EXHAUSTED);
}

#[tokio::test]
async fn restart_keeps_nodes_ips_and_credentials() {
    let mut srv = TestServer::start().await;
    let a = srv.new_node("alpha").await;
    let b = srv.new_node("beta").await;
    srv.restart().await;
    let mut node = srv.connect(&a).await;
    match node.welcome().await {
        ServerMsg::Welcome {
            node: me, peers, ..
        } => {
            assert_eq!(me.id, a.node_id);
            assert_eq!(me.mesh_ip, a.mesh_ip);
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].id, b.node_id);
            assert_eq!(peers[0].mesh_ip, b.mesh_ip);
            assert!(!peers[0].online);
        }
        other => panic!("{other:?}"),
    }
    // A new node after the restart does not reuse an address.
    let c = srv.new_node("gamma").await;
    assert!(c.mesh_ip != a.mesh_ip && c.mesh_ip != b.mesh_ip);
    assert!(c.node_id > b.node_id);
}
