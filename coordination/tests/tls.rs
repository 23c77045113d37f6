//! TLS on the HTTP/WebSocket listener, with a certificate made by openssl.

mod common;

use common::*;
use overlay_coord::config::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn serves_https_with_the_given_certificate() {
    let (srv, _certs, cert) = start_tls(|_| {}).await;
    let connector = tls_connector(&cert);
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let text = healthz_over_tls(tcp, &connector).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    // Plain HTTP on the TLS port gets nowhere.
    let mut plain = TcpStream::connect(srv.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[tokio::test]
async fn missing_certificate_file_is_a_clear_error() {
    let dir = temp_dir("tls-missing");
    let mut config = overlay_coord::config::Config {
        transport: Transport::Tls {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
        },
        ..common::config(&dir)
    };
    config.turn.embedded = false;
    let err = match overlay_coord::start(config).await {
        Ok(_) => panic!("must refuse to start"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("nope.pem"), "{err}");
}
