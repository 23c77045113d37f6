//! The HTTP/WebSocket listener against hostile raw-TCP clients: idle
//! sockets, partial request heads, stalled bodies, more connections than a
//! source may hold. Sources other than 127.0.0.1 are other loopback
//! addresses (127.0.0.0/8 is all local on Linux).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use overlay_coord::config::Limits;
use overlay_proto::coord::{ClientMsg, ServerMsg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// A TCP connection to `server` from the loopback address `127.0.0.<host>`.
async fn try_connect_from(host: u8, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0)))?;
    socket.connect(server).await
}

async fn connect_from(host: u8, server: SocketAddr) -> TcpStream {
    try_connect_from(host, server).await.unwrap()
}

/// `count` connections from `127.0.0.<host>`, opened at once; those the
/// kernel did not complete within a second are left out (a listener that
/// stops accepting fills its backlog).
async fn open_idle(host: u8, server: SocketAddr, count: usize) -> Vec<TcpStream> {
    let attempts = (0..count)
        .map(|_| tokio::time::timeout(Duration::from_secs(1), try_connect_from(host, server)));
    join_all(attempts)
        .await
        .into_iter()
        .filter_map(|r| r.ok()?.ok())
        .collect()
}

/// Whether the server closes `stream` within `within` (EOF or reset).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Whatever the server says before closing (a 408, say) is fine.
            Ok(Ok(_)) => continue,
        }
    }
}

/// `GET /healthz` over TLS from 127.0.0.1; returns the status line.
async fn healthz_status_over_tls(server: SocketAddr, connector: &TlsConnector) -> String {
    let answer = healthz_over_tls(connect_from(1, server).await, connector).await;
    answer.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn idle_sockets_from_many_sources_do_not_delay_a_tls_request() {
    let (srv, _certs, cert) = start_tls(|c| c.turn.embedded = false).await;
    let connector = tls_connector(&cert);

    // Baseline on a quiet server.
    let started = Instant::now();
    assert!(healthz_status_over_tls(srv.addr, &connector)
        .await
        .starts_with("HTTP/1.1 200"));
    let quiet = started.elapsed();

    // 300 silent sockets from ten sources, each under the per-source bound
    // (more than the 256 handshakes the old listener allowed in all), plus
    // one source far over it.
    let per_source = 30;
    assert!(per_source < Limits::default().pending_conns_per_ip);
    let mut idle = Vec::new();
    for host in 2..12u8 {
        idle.extend(open_idle(host, srv.addr, per_source).await);
    }
    let over = Limits::default().pending_conns_per_ip + 50;
    idle.extend(open_idle(12, srv.addr, over).await);

    let started = Instant::now();
    let status = tokio::time::timeout(DEADLINE, healthz_status_over_tls(srv.addr, &connector))
        .await
        .expect("the request must not wait for the idle sockets");
    let busy = started.elapsed();
    eprintln!(
        "GET /healthz over TLS: {quiet:?} quiet, {busy:?} beside {} idle sockets",
        idle.len()
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        busy < Duration::from_secs(1),
        "a legitimate request took {busy:?} beside idle sockets"
    );
    drop(idle);
}

#[tokio::test]
async fn connections_over_the_per_source_bound_are_refused_at_once() {
    let srv = TestServer::start_with(|c| c.turn.embedded = false).await;
    let cap = Limits::default().pending_conns_per_ip;
    let extra = 10;
    let mut conns = Vec::new();
    for _ in 0..cap + extra {
        conns.push(connect_from(3, srv.addr).await);
    }
    let started = Instant::now();
    let closed = join_all(
        conns
            .iter_mut()
            .map(|s| closed_within(s, Duration::from_secs(1))),
    )
    .await;
    let refused = closed.iter().filter(|c| **c).count();
    eprintln!(
        "{refused} of {} connections from one source refused within {:?}",
        cap + extra,
        started.elapsed()
    );
    assert_eq!(refused, extra, "exactly the connections over the bound");
    assert!(srv.metric("overlay_coord_conn_refused_per_ip_total").await >= extra as u64);

    // Another source is not affected.
    let (status, _) = http(srv.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn partial_request_heads_are_closed_within_the_header_timeout() {
    let srv = TestServer::start_with(|c| c.turn.embedded = false).await;
    let timeout = Limits::default().header_read_timeout;
    let mut conns = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        conns.push(s);
    }
    let started = Instant::now();
    let margin = Duration::from_secs(3);
    let closed = join_all(conns.iter_mut().map(|s| closed_within(s, timeout + margin))).await;
    eprintln!(
        "40 partial request heads closed after {:?}",
        started.elapsed()
    );
    assert!(
        closed.iter().all(|c| *c),
        "every partial head must be closed within {timeout:?} + {margin:?}"
    );
}

#[tokio::test]
async fn a_stalled_request_body_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_secs(2);
    let srv = TestServer::start_with(move |c| {
        c.turn.embedded = false;
        c.limits.http_idle_timeout = idle;
    })
    .await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /v1/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"auth")
        .await
        .unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut s, idle + Duration::from_secs(3)).await);
    assert!(started.elapsed() >= idle - Duration::from_millis(500));
    assert!(srv.metric("overlay_coord_conn_timeouts_total").await >= 1);
}

#[tokio::test]
async fn websocket_sessions_outlive_the_http_timeouts_and_leave_the_pending_bound() {
    let srv = TestServer::start_with(|c| {
        c.turn.embedded = false;
        c.limits.http_idle_timeout = Duration::from_millis(500);
        c.limits.header_read_timeout = Duration::from_millis(500);
        c.limits.pending_conns_per_ip = 2;
    })
    .await;
    // Four sessions from one source with room for two pending connections:
    // a session does not count as pending.
    let mut nodes = Vec::new();
    for i in 0..4 {
        let reg = srv.new_node(&format!("n{i}")).await;
        let mut node = srv.connect(&reg).await;
        node.welcome().await;
        nodes.push(node);
    }
    // Silent for longer than both HTTP timeouts (the session's own ping
    // comes every 10 s), the sessions still answer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in &mut nodes {
        node.send(&ClientMsg::RefreshIce).await;
        node.expect_msg("fresh ICE settings", |m| {
            matches!(m, ServerMsg::IceConfig { .. })
        })
        .await;
    }
}
