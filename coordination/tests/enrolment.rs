//! `POST /v1/register` and what survives a restart.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use overlay_coord::store::now_unix;
use overlay_proto::coord::{error_code, ClientMsg, RegisterResponse, ServerMsg, CHALLENGE_PATH};
use overlay_proto::enrol::CHALLENGE_LEN;

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
async fn reenrolling_with_the_credential_rotates_it_and_keeps_name_and_ip() {
    let srv = TestServer::start().await;
    let key = srv.create_key(true);
    let node = NodeKey::random();
    let first = srv.register_ok(&key, &node, "db").await;
    let _other = srv.register_ok(&key, &NodeKey::random(), "x").await;

    // The key holder itself, without its credential, is told what to do.
    let (status, body) = srv.register(&key, &node, "db").await;
    assert_eq!(status, 409, "{body}");
    let refusal = api_error(&body);
    assert_eq!(refusal.error, error_code::ALREADY_ENROLLED);
    assert!(
        refusal.message.contains("credential"),
        "{}",
        refusal.message
    );

    let request = srv
        .request(&key, &node, "renamed", Some(&first.credential))
        .await;
    let (status, body) = srv.send_register(&request).await;
    assert_eq!(status, 200, "{body}");
    let again: RegisterResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(again.node_id, first.node_id);
    assert_eq!(again.mesh_ip, first.mesh_ip);
    assert_eq!(again.name, "db", "a re-enrolment never renames");
    assert_ne!(again.credential, first.credential);
    // The old credential stops working, the new one works.
    assert!(Node::connect(srv.addr, first.node_id, &first.credential)
        .await
        .is_err());
    let mut node = srv.connect(&again).await;
    node.welcome().await;
}

/// Issue 8, finding 1: another node's public key (public in every netmap) and a
/// valid auth key must not re-enrol that node.
#[tokio::test]
async fn attacker_with_an_auth_key_cannot_take_over_another_nodes_key() {
    let srv = TestServer::start().await;
    let victim_key = NodeKey::random();
    let victim = srv
        .register_ok(&srv.create_key(false), &victim_key, "victim")
        .await;
    let mut session = srv.connect(&victim).await;
    session.welcome().await;
    let attacker_auth = srv.create_key(true);

    // As the old protocol allowed: no challenge, no proof.
    let legacy = format!(
        r#"{{"auth_key":"{attacker_auth}","public_key":"{}","hostname":"victim"}}"#,
        victim_key.public
    );
    let (status, body) = http(srv.addr, "POST", "/v1/register", &[], legacy.as_bytes()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(api_error(&body).error, error_code::BAD_PROOF);

    // With a real challenge, proved with the attacker's own key.
    let mut forged = srv
        .request(&attacker_auth, &NodeKey::random(), "victim", None)
        .await;
    forged.public_key = victim_key.public.clone();
    let (status, body) = srv.send_register(&forged).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(api_error(&body).error, error_code::BAD_PROOF);
    assert_eq!(
        srv.metric("overlay_coord_rejected_inputs_total{reason=\"bad_proof\"}")
            .await,
        2
    );

    // The victim keeps its session, its credential, its name and address.
    session.send(&ClientMsg::Ping { nonce: 8 }).await;
    session
        .expect_msg("pong", |m| *m == ServerMsg::Pong { nonce: 8 })
        .await;
    let node = srv
        .store()
        .verify_node(victim.node_id, &victim.credential)
        .unwrap()
        .expect("victim's credential still valid");
    assert_eq!(
        (node.name.as_str(), node.mesh_ip),
        ("victim", victim.mesh_ip)
    );
    // And nobody else gets its name.
    let other = srv.new_node("victim").await;
    assert_eq!(other.name, "victim-2");
}

#[tokio::test]
async fn reused_unknown_or_foreign_challenges_are_refused() {
    let srv = TestServer::start().await;
    let key = srv.create_key(true);
    let node = NodeKey::random();

    // A challenge is good once, even for the rightful node.
    let request = srv.request(&key, &node, "once", None).await;
    let (status, _) = srv.send_register(&request).await;
    assert_eq!(status, 200);
    let (status, body) = srv.send_register(&request).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(api_error(&body).error, error_code::BAD_PROOF);

    // A challenge the server never issued, of the right length or not.
    for forged in [random_challenge(), random_public_key()] {
        let mut unknown = srv.request(&key, &NodeKey::random(), "a", None).await;
        unknown.challenge = forged;
        let (status, body) = srv.send_register(&unknown).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(api_error(&body).error, error_code::BAD_PROOF);
    }

    // A proof made for one challenge's key, presented with another challenge.
    let first = srv.request(&key, &NodeKey::random(), "b", None).await;
    let mut second = srv.request(&key, &NodeKey::random(), "b", None).await;
    second.proof = first.proof.clone();
    second.public_key = first.public_key.clone();
    let (status, _) = srv.send_register(&second).await;
    assert_eq!(status, 401);

    // A proof bound to other fields (hostname) does not carry over.
    let mut moved = srv.request(&key, &NodeKey::random(), "c", None).await;
    moved.hostname = "d".into();
    let (status, _) = srv.send_register(&moved).await;
    assert_eq!(status, 401);

    assert_eq!(srv.store().list_nodes().unwrap().len(), 1);
    // Refusals spend nothing: the first request's challenge of `first` still works.
    let (status, body) = srv.send_register(&first).await;
    assert_eq!(status, 200, "{body}");
}

/// Until challenges became stateless, any attempt used its challenge up. Now
/// only a registration that passed every check does: a refused one changed
/// nothing, and its node may answer the same challenge again.
#[tokio::test]
async fn refused_attempt_leaves_the_challenge_usable_once() {
    let srv = TestServer::start().await;
    let key = srv.create_key(true);
    let challenge = srv.challenge().await;
    let node = NodeKey::random();
    let answer = |auth: &str, host: &str| {
        overlay_proto::enrol::register_request(&challenge, &node.secret, auth, host, None).unwrap()
    };
    let (status, _) = srv.send_register(&answer(&key, "bad_name")).await;
    assert_eq!(status, 400);
    let (status, body) = srv.send_register(&answer("ovk_wrong", "good")).await;
    assert_eq!(api_error(&body).error, error_code::AUTH_KEY_UNKNOWN);
    assert_eq!(status, 401);
    let (status, body) = srv.send_register(&answer(&key, "good")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = srv.send_register(&answer(&key, "good")).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(api_error(&body).error, error_code::BAD_PROOF);
    assert_eq!(srv.store().list_nodes().unwrap().len(), 1);
}

/// Issue 8, finding 1 (follow-up): the challenge endpoint needs no
/// authentication, so it must cost the server nothing. With a table of
/// outstanding challenges (4,096 at most), this flood got 503s and blocked
/// every enrolment for a minute.
#[tokio::test]
async fn challenge_flood_takes_no_server_memory_and_enrolment_still_works() {
    const FLOOD: usize = 100_000;
    let srv = TestServer::start().await;
    let used = "overlay_coord_challenges_used";
    assert_eq!(srv.metric(used).await, 0);

    let statuses = post_many(srv.addr, CHALLENGE_PATH, FLOOD).await;
    assert_eq!(statuses.len(), FLOOD);
    let refused = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(
        refused,
        0,
        "challenges refused: first {:?}",
        statuses.iter().position(|s| *s != 200)
    );
    assert_eq!(
        srv.metric(used).await,
        0,
        "issuing challenges stored nothing"
    );

    // A legitimate node enrols at once; only its registration is remembered.
    srv.new_node("after-flood").await;
    assert_eq!(srv.metric(used).await, 1);
}

/// An anonymous client can also answer its challenges with valid proofs (of
/// its own keys): without a valid auth key, that leaves nothing behind either.
#[tokio::test]
async fn registrations_without_a_valid_auth_key_leave_nothing_behind() {
    let srv = TestServer::start().await;
    for i in 0..50 {
        let (status, body) = srv
            .register("ovk_guess", &NodeKey::random(), &format!("n{i}"))
            .await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(api_error(&body).error, error_code::AUTH_KEY_UNKNOWN);
    }
    assert_eq!(srv.metric("overlay_coord_challenges_used").await, 0);
    srv.new_node("fine").await;
}

#[tokio::test]
async fn tampered_challenge_is_refused() {
    let srv = TestServer::start().await;
    let key = srv.create_key(true);
    type Tamper = fn(&mut [u8]);
    let tampering: [(&str, Tamper); 4] = [
        ("first MAC bit", |c| c[24] ^= 1),
        ("last MAC bit", |c| c[CHALLENGE_LEN - 1] ^= 0x80),
        ("later issue time (a longer life)", |c| {
            let later = u64::from_be_bytes(c[..8].try_into().unwrap()) + 3600;
            c[..8].copy_from_slice(&later.to_be_bytes());
        }),
        ("random part", |c| c[10] ^= 8),
    ];
    for (what, tamper) in tampering {
        let mut challenge = srv.challenge().await;
        let mut bytes = B64.decode(&challenge.challenge).unwrap();
        assert_eq!(bytes.len(), CHALLENGE_LEN);
        tamper(&mut bytes);
        challenge.challenge = B64.encode(&bytes);
        let node = NodeKey::random();
        let request =
            overlay_proto::enrol::register_request(&challenge, &node.secret, &key, "t", None)
                .unwrap();
        let (status, body) = srv.send_register(&request).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(api_error(&body).error, error_code::BAD_PROOF, "{what}");
    }
    assert!(srv.store().list_nodes().unwrap().is_empty());
}

/// A restart draws a new master secret: challenges handed out before it are
/// refused (overlayd then asks for a fresh one).
#[tokio::test]
async fn challenge_from_before_a_restart_is_refused() {
    let mut srv = TestServer::start().await;
    let key = srv.create_key(true);
    let request = srv.request(&key, &NodeKey::random(), "early", None).await;
    srv.restart().await;
    let (status, body) = srv.send_register(&request).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(api_error(&body).error, error_code::BAD_PROOF);
    srv.register_ok(&key, &NodeKey::random(), "late").await;
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
    srv.register_ok(&spent, &NodeKey::random(), "first").await;

    for (key, code) in [
        ("ovk_doesnotexist", error_code::AUTH_KEY_UNKNOWN),
        (expired.as_str(), error_code::AUTH_KEY_EXPIRED),
        (revoked.as_str(), error_code::AUTH_KEY_REVOKED),
        (spent.as_str(), error_code::AUTH_KEY_SPENT),
    ] {
        let (status, body) = srv.register(key, &NodeKey::random(), "n").await;
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
    let b64 = |bytes: [u8; 32]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let mut high_bit_zero = [0u8; 32];
    high_bit_zero[31] = 0x80;
    for (pk, host) in [
        ("not-base64!".to_string(), "ok"),
        (random_public_key()[..20].to_string(), "ok"),
        (b64([0; 32]), "ok"),
        (b64(high_bit_zero), "ok"),
        (random_public_key(), "bad_name"),
        (random_public_key(), "-dash"),
        (random_public_key(), &"a".repeat(64)),
    ] {
        let mut request = srv.request(&key, &NodeKey::random(), host, None).await;
        request.public_key = pk.clone();
        let (status, body) = srv.send_register(&request).await;
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
    // A /29: six hosts, .6 the mesh resolver's, five for nodes.
    let srv = TestServer::start_with(|c| c.network = "10.5.0.0/29".parse().unwrap()).await;
    for i in 1..=5 {
        let node = srv.new_node(&format!("n{i}")).await;
        assert_eq!(node.mesh_ip.to_string(), format!("10.5.0.{i}"));
    }
    let key = srv.create_key(true);
    let (status, body) = srv.register(&key, &NodeKey::random(), "c").await;
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
