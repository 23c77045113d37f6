//! Bad input closes one session (or gets a 401) and never hurts anyone else.

mod common;

use common::*;
use overlay_proto::coord::{
    bearer, error_code, ClientMsg, ServerMsg, CONNECT_PATH, MAX_FRAME_BYTES,
};
use tokio_tungstenite::tungstenite::Message;

/// A connected, welcomed bystander, and a check that it is still served.
async fn bystander(srv: &TestServer) -> Node {
    let r = srv.new_node("bystander").await;
    let mut n = srv.connect(&r).await;
    n.welcome().await;
    n
}

async fn still_served(n: &mut Node, nonce: u64) {
    n.send(&ClientMsg::Ping { nonce }).await;
    n.expect_msg("pong", |m| *m == ServerMsg::Pong { nonce })
        .await;
}

async fn connect_status(srv: &TestServer, auth: Option<&str>) -> (u16, String) {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error};
    let mut req = format!("ws://{}{CONNECT_PATH}", srv.addr)
        .into_client_request()
        .unwrap();
    if let Some(a) = auth {
        req.headers_mut()
            .insert("authorization", a.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Err(Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string(),
        ),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => (101, String::new()),
    }
}

#[tokio::test]
async fn wrong_credential_is_401_and_indistinguishable_from_unknown_node() {
    let srv = TestServer::start().await;
    let r = srv.new_node("a").await;
    let wrong = bearer(r.node_id, "not-the-credential");
    let unknown = bearer(987_654, "not-the-credential");
    let (s1, b1) = connect_status(&srv, Some(&wrong)).await;
    let (s2, b2) = connect_status(&srv, Some(&unknown)).await;
    let (s3, b3) = connect_status(&srv, None).await;
    let (s4, b4) = connect_status(&srv, Some("Bearer garbage")).await;
    assert_eq!((s1, s2, s3, s4), (401, 401, 401, 401));
    assert_eq!(b1, b2);
    assert_eq!(b1, b3);
    assert_eq!(b1, b4);
    assert_eq!(api_error(&b1).error, error_code::UNAUTHORIZED);
    assert_eq!(
        srv.metric("overlay_coord_rejected_inputs_total{reason=\"unauthorized\"}")
            .await,
        4
    );
    // The right credential still works.
    srv.connect(&r).await.welcome().await;
}

#[tokio::test]
async fn malformed_text_frame_closes_only_that_session() {
    let srv = TestServer::start().await;
    let mut ok = bystander(&srv).await;
    let bad = srv.new_node("bad").await;
    let mut nb = srv.connect(&bad).await;
    nb.welcome().await;
    nb.send_raw(Message::text("{\"type\":\"launch_missiles\"}"))
        .await;
    let frame = nb.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1007);
    assert!(frame.reason.as_str().contains("malformed"), "{frame:?}");
    assert_eq!(
        srv.metric("overlay_coord_rejected_inputs_total{reason=\"malformed\"}")
            .await,
        1
    );
    still_served(&mut ok, 1).await;
    // The node may reconnect and behave.
    let mut again = srv.connect(&bad).await;
    again.welcome().await;
    still_served(&mut again, 2).await;
}

#[tokio::test]
async fn oversized_frames_close_the_session_with_a_reason() {
    let srv = TestServer::start().await;
    let mut ok = bystander(&srv).await;
    let bad = srv.new_node("big").await;

    let mut nb = srv.connect(&bad).await;
    nb.welcome().await;
    let text = format!(
        "{{\"type\":\"ping\",\"nonce\":1,\"pad\":\"{}\"}}",
        "x".repeat(MAX_FRAME_BYTES)
    );
    nb.send_raw(Message::text(text)).await;
    let frame = nb.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1009);

    let mut nb = srv.connect(&bad).await;
    nb.welcome().await;
    nb.send_raw(Message::binary(vec![0u8; MAX_FRAME_BYTES + 1]))
        .await;
    let frame = nb.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1009);

    // Far beyond even tungstenite's limit: closed and counted the same way.
    let mut nb = srv.connect(&bad).await;
    nb.welcome().await;
    nb.send_raw(Message::binary(vec![0u8; 4 * MAX_FRAME_BYTES]))
        .await;
    nb.expect_close().await;

    wait_until("rejections counted", || async {
        srv.metric("overlay_coord_rejected_inputs_total{reason=\"oversized\"}")
            .await
            == 3
    })
    .await;
    still_served(&mut ok, 3).await;
}

#[tokio::test]
async fn short_relay_frame_closes_the_session() {
    let srv = TestServer::start().await;
    let mut ok = bystander(&srv).await;
    let bad = srv.new_node("short").await;
    let mut nb = srv.connect(&bad).await;
    nb.welcome().await;
    nb.send_raw(Message::binary(vec![1, 2, 3])).await;
    let frame = nb.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1007);
    still_served(&mut ok, 4).await;
}

/// Issue 8, finding 2: a node provoked into a burst of signaling must not be
/// knocked offline. Twice the rate for seconds: the excess is dropped and
/// counted, the session stays.
#[tokio::test]
async fn twice_the_rate_for_seconds_drops_the_excess_and_keeps_the_session() {
    const RATE: f64 = 20.0;
    let srv = TestServer::start_with(|c| {
        c.limits.msg_rate = RATE;
        c.limits.msg_burst = RATE;
    })
    .await;
    let r = srv.new_node("chatty").await;
    let mut nb = srv.connect(&r).await;
    nb.welcome().await;

    // 40 messages a second for 3 seconds.
    let sent = 120u64;
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(25));
    for nonce in 0..sent {
        pace.tick().await;
        nb.send(&ClientMsg::Ping { nonce }).await;
    }
    // Once the bucket refills, a marker gets through; everything before it was
    // answered or dropped by then.
    let marker = 1_000_000;
    let mut answered = 0u64;
    let mut errors = 0;
    let mut resend = tokio::time::interval(std::time::Duration::from_millis(200));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    'outer: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "marker never answered"
        );
        resend.tick().await;
        nb.send(&ClientMsg::Ping { nonce: marker }).await;
        while let Some(event) = nb.next_within(std::time::Duration::from_millis(150)).await {
            match event {
                Event::Msg(ServerMsg::Pong { nonce }) if nonce == marker => break 'outer,
                Event::Msg(ServerMsg::Pong { .. }) => answered += 1,
                Event::Msg(ServerMsg::Error { error, .. }) if error == error_code::RATE_LIMITED => {
                    errors += 1
                }
                Event::Msg(_) | Event::Relay(_) => {}
                Event::Closed(f) => panic!("session closed at twice the rate: {f:?}"),
            }
        }
    }
    let dropped = srv
        .metric("overlay_coord_rejected_inputs_total{reason=\"rate_limited\"}")
        .await;
    // About burst + 3 s × rate get through: 80 of 120.
    assert!((60..=100).contains(&answered), "answered {answered}");
    assert!(
        dropped >= sent - answered,
        "dropped {dropped}, answered {answered}"
    );
    assert_eq!(errors, 1, "the node is told once, not per dropped message");
    assert_eq!(
        srv.metric("overlay_coord_rejected_inputs_total{reason=\"flood\"}")
            .await,
        0
    );
}

#[tokio::test]
async fn a_gross_flood_still_closes_the_session() {
    let srv = TestServer::start_with(|c| {
        c.limits.msg_rate = 10.0;
        c.limits.msg_burst = 20.0;
    })
    .await;
    let mut ok = bystander(&srv).await;
    let bad = srv.new_node("flood").await;
    let mut nb = srv.connect(&bad).await;
    nb.welcome().await;
    // Far beyond FLOOD_FACTOR × the burst (200), as fast as the socket takes it.
    for nonce in 0..2_000 {
        if !nb
            .send_raw(Message::text(
                serde_json::to_string(&ClientMsg::Ping { nonce }).unwrap(),
            ))
            .await
        {
            break;
        }
    }
    let frame = nb.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1008);
    assert_eq!(
        srv.metric("overlay_coord_rejected_inputs_total{reason=\"flood\"}")
            .await,
        1
    );
    assert!(
        srv.metric("overlay_coord_rejected_inputs_total{reason=\"rate_limited\"}")
            .await
            > 0
    );
    still_served(&mut ok, 5).await;
}

#[tokio::test]
async fn session_limit_refuses_new_nodes_with_503() {
    let srv = TestServer::start_with(|c| c.limits.max_sessions = 1).await;
    let mut ok = bystander(&srv).await;
    let other = srv.new_node("other").await;
    let (status, body) =
        connect_status(&srv, Some(&bearer(other.node_id, &other.credential))).await;
    assert_eq!(status, 503);
    assert_eq!(api_error(&body).error, error_code::TOO_MANY_SESSIONS);
    still_served(&mut ok, 6).await;
}
