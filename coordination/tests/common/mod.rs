//! Helpers for the integration tests: a server on loopback with a temp state
//! directory, an HTTP/1.1 client (hyper), TLS set-up, and a WebSocket node client.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use overlay_coord::config::{Config, Limits, Transport, TurnConfig};
use overlay_coord::store::Store;
use overlay_coord::Server;
use overlay_proto::coord::{
    bearer, ApiError, ChallengeResponse, ClientMsg, RegisterRequest, RegisterResponse, ServerMsg,
    CHALLENGE_PATH, CONNECT_PATH, REGISTER_PATH,
};
use overlay_proto::enrol;

/// Upper bound for anything a test waits on.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub use tempfile::TempDir;

/// A unique temp directory named after `tag`, removed on drop.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("overlay-coord-{tag}-"))
        .tempdir()
        .expect("create temp dir")
}

pub fn config(state_dir: &TempDir) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state_dir.path().to_path_buf(),
        network: "100.64.0.0/10".parse().unwrap(),
        network6: None,
        public_addrs: vec![],
        transport: Transport::PlainHttp,
        turn: TurnConfig {
            embedded: true,
            port: 0,
            secret: Some("test-secret".into()),
            allow_private: false,
            ttl: Duration::from_secs(3600),
            external: vec![],
            allocations_per_user: 16,
            max_allocations: 4096,
        },
        limits: Limits {
            store_poll: Duration::from_millis(100),
            ..Limits::default()
        },
        dns: Some(
            overlay_coord::dns::config(
                overlay_coord::dns::DEFAULT_DOMAIN.into(),
                &[],
                "100.64.0.0/10".parse().unwrap(),
            )
            .unwrap(),
        ),
        bus: None,
        database: None,
    }
}

/// A server on loopback plus the state directory it lives in.
pub struct TestServer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
    pub config: Config,
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = temp_dir("srv");
        let mut config = config(&dir);
        tweak(&mut config);
        let server = overlay_coord::start(config.clone())
            .await
            .expect("server starts");
        TestServer {
            addr: server.http_addr(),
            server: Some(server),
            config,
            dir,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    /// Stops the server and starts a new one on the same state directory
    /// (and, when possible, the same port).
    pub async fn restart(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("clean shutdown");
        }
        let mut config = self.config.clone();
        config.listen = self.addr;
        let server = match overlay_coord::start(config.clone()).await {
            Ok(s) => s,
            Err(_) => {
                config.listen = "127.0.0.1:0".parse().unwrap();
                overlay_coord::start(config).await.expect("server restarts")
            }
        };
        self.addr = server.http_addr();
        self.server = Some(server);
    }

    /// Opens the same store the admin CLI would (SQLite in the state
    /// directory, or the configured database: then call it from a blocking
    /// thread, never from an async task).
    pub fn store(&self) -> Store {
        Store::open_at(&self.config.store_location()).expect("open store")
    }

    pub fn create_key(&self, reusable: bool) -> String {
        let now = overlay_coord::store::now_unix();
        self.store().create_key(reusable, None, now).unwrap().1
    }

    /// `POST /v1/register/challenge`.
    pub async fn challenge(&self) -> ChallengeResponse {
        challenge_at(self.addr).await
    }

    /// A request answering a fresh challenge with `node`'s key, as overlayd builds it.
    pub async fn request(
        &self,
        key: &str,
        node: &NodeKey,
        hostname: &str,
        credential: Option<&str>,
    ) -> RegisterRequest {
        let challenge = self.challenge().await;
        enrol::register_request(
            &challenge,
            &node.secret,
            key,
            hostname,
            credential.map(str::to_owned),
        )
        .unwrap()
    }

    /// `POST /v1/register` with any body, however wrong.
    pub async fn send_register(&self, request: &RegisterRequest) -> (u16, String) {
        let body = serde_json::to_string(request).unwrap();
        http(self.addr, "POST", REGISTER_PATH, &[], body.as_bytes()).await
    }

    /// Challenge, proof and registration, as a well-behaved node does them.
    pub async fn register(&self, key: &str, node: &NodeKey, hostname: &str) -> (u16, String) {
        let request = self.request(key, node, hostname, None).await;
        self.send_register(&request).await
    }

    pub async fn register_ok(&self, key: &str, node: &NodeKey, hostname: &str) -> RegisterResponse {
        let (status, body) = self.register(key, node, hostname).await;
        assert_eq!(status, 200, "register failed: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Registers a fresh node with a fresh reusable key.
    pub async fn new_node(&self, hostname: &str) -> RegisterResponse {
        let key = self.create_key(true);
        self.register_ok(&key, &NodeKey::random(), hostname).await
    }

    pub async fn connect(&self, node: &RegisterResponse) -> Node {
        Node::connect(self.addr, node.node_id, &node.credential)
            .await
            .expect("connect")
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = http(self.addr, "GET", "/metrics", &[], b"").await;
        assert_eq!(status, 200);
        body
    }

    /// Value of a metric line (`name{labels}` exactly as rendered).
    pub async fn metric(&self, series: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A node's X25519 key pair, as a test client holds it.
#[derive(Clone)]
pub struct NodeKey {
    pub secret: [u8; 32],
    /// Standard base64, as registered.
    pub public: String,
}

impl NodeKey {
    pub fn random() -> NodeKey {
        let secret: [u8; 32] = rand::random();
        NodeKey {
            secret,
            public: base64::engine::general_purpose::STANDARD.encode(enrol::public_key(&secret)),
        }
    }
}

/// `POST /v1/register/challenge` on the server at `addr`.
pub async fn challenge_at(addr: SocketAddr) -> ChallengeResponse {
    let (status, body) = http(addr, "POST", CHALLENGE_PATH, &[], b"").await;
    assert_eq!(status, 200, "challenge failed: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Enrols `node` with the server at `addr` (challenge, proof, registration).
pub async fn register_at(
    addr: SocketAddr,
    auth_key: &str,
    node: &NodeKey,
    hostname: &str,
) -> RegisterResponse {
    let challenge = challenge_at(addr).await;
    let request = enrol::register_request(&challenge, &node.secret, auth_key, hostname, None)
        .expect("valid challenge");
    let body = serde_json::to_string(&request).unwrap();
    let (status, body) = http(addr, "POST", REGISTER_PATH, &[], body.as_bytes()).await;
    assert_eq!(status, 200, "register failed: {body}");
    serde_json::from_str(&body).unwrap()
}

/// A public key nobody holds the private half of.
pub fn random_public_key() -> String {
    NodeKey::random().public
}

/// A challenge of the right length that no server issued.
pub fn random_challenge() -> String {
    let mut bytes = [0u8; enrol::CHALLENGE_LEN];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `count` empty-bodied `POST path` requests, pipelined on one keep-alive
/// connection (as fast as a flooding client goes); the statuses in order.
pub async fn post_many(addr: SocketAddr, path: &str, count: usize) -> Vec<u16> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    /// Requests written before waiting for their answers.
    const WINDOW: usize = 256;
    let stream = TcpStream::connect(addr).await.expect("tcp connect");
    let (read, mut write) = stream.into_split();
    let request = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    let mut reader = BufReader::new(read);
    let mut statuses = Vec::with_capacity(count);
    let mut line = String::new();
    let mut body = Vec::new();
    while statuses.len() < count {
        let batch = WINDOW.min(count - statuses.len());
        write
            .write_all(request.repeat(batch).as_bytes())
            .await
            .expect("write requests");
        for _ in 0..batch {
            let response = async {
                line.clear();
                reader.read_line(&mut line).await.ok()?;
                let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
                let mut length = 0;
                loop {
                    line.clear();
                    reader.read_line(&mut line).await.ok()?;
                    let header = line.trim_end();
                    if header.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = header.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            length = v.trim().parse().ok()?;
                        }
                    }
                }
                body.resize(length, 0);
                reader.read_exact(&mut body).await.ok()?;
                Some(status)
            };
            let status = tokio::time::timeout(DEADLINE, response)
                .await
                .expect("response in time")
                .expect("a response with a status and a content-length");
            statuses.push(status);
        }
    }
    statuses
}

/// One HTTP/1.1 request over its own connection (hyper's client); the status
/// and the body as text.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(conn);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("read response")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .expect("response in time")
}

pub fn api_error(body: &str) -> ApiError {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an ApiError ({e}): {body}"))
}

/// A node's control stream.
pub struct Node {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the server sent, as a test sees it.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a test helper: moved, never stored in bulk
pub enum Event {
    Msg(ServerMsg),
    Relay(Vec<u8>),
    Closed(Option<CloseFrame>),
}

impl Node {
    pub async fn connect(
        addr: SocketAddr,
        id: u64,
        credential: &str,
    ) -> Result<Node, tokio_tungstenite::tungstenite::Error> {
        let mut req = format!("ws://{addr}{CONNECT_PATH}")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", bearer(id, credential).parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Node { ws })
    }

    pub async fn send(&mut self, msg: &ClientMsg) {
        let text = serde_json::to_string(msg).unwrap();
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_raw(&mut self, msg: Message) -> bool {
        self.ws.send(msg).await.is_ok()
    }

    /// The next event, skipping pings; panics after the deadline.
    pub async fn next(&mut self) -> Event {
        self.next_within(DEADLINE)
            .await
            .expect("an event before the deadline")
    }

    pub async fn next_within(&mut self, d: Duration) -> Option<Event> {
        let deadline = Instant::now() + d;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            return Some(match msg {
                Some(Ok(Message::Text(t))) => {
                    Event::Msg(serde_json::from_str(t.as_str()).expect("valid ServerMsg"))
                }
                Some(Ok(Message::Binary(b))) => Event::Relay(b.to_vec()),
                Some(Ok(Message::Close(frame))) => Event::Closed(frame),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => Event::Closed(None),
            });
        }
    }

    /// Waits for a message matching `pred`, skipping others.
    pub async fn expect_msg(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&ServerMsg) -> bool,
    ) -> ServerMsg {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(Event::Msg(m)) if pred(&m) => return m,
                Some(Event::Msg(_)) | Some(Event::Relay(_)) => continue,
                Some(Event::Closed(f)) => panic!("closed ({f:?}) while waiting for {what}"),
                None => panic!("timed out waiting for {what}"),
            }
        }
    }

    pub async fn welcome(&mut self) -> ServerMsg {
        self.expect_msg("welcome", |m| matches!(m, ServerMsg::Welcome { .. }))
            .await
    }

    /// Waits for the server to close the session; returns the close frame.
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(Event::Closed(f)) => return f,
                Some(_) => continue,
                None => panic!("timed out waiting for the server to close"),
            }
        }
    }
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server on loopback serving TLS with a fresh self-signed certificate
/// (openssl is required: a skipped test would pass without testing anything),
/// tweaked by `tweak`; the certificate's directory lives as long as the server.
pub async fn start_tls(tweak: impl FnOnce(&mut Config)) -> (TestServer, TempDir, PathBuf) {
    let certs = temp_dir("tls");
    let (cert, key) = overlay_tests::cert::self_signed(certs.path(), "127.0.0.1")
        .expect("openssl must be installed to make a test certificate");
    let server_cert = cert.clone();
    let srv = TestServer::start_with(move |c| {
        c.transport = Transport::Tls {
            cert: server_cert,
            key,
        };
        tweak(c);
    })
    .await;
    (srv, certs, cert)
}

/// A TLS client that trusts only `cert`.
pub fn tls_connector(cert: &Path) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(cert).expect("read the certificate"))
        .expect("add the certificate");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// `GET /healthz` over TLS on `tcp` (the server's certificate names
/// 127.0.0.1); everything the server answered, as text.
pub async fn healthz_over_tls(tcp: TcpStream, connector: &TlsConnector) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::ServerName;
    let mut tls = connector
        .connect(
            ServerName::try_from("127.0.0.1").expect("an IP is a name"),
            tcp,
        )
        .await
        .expect("TLS handshake");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write request");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// A TURN client (the turn crate's) on a socket bound to `bind`, listening.
pub async fn turn_client(
    bind: &str,
    server: std::net::SocketAddr,
    username: &str,
    password: &str,
) -> turn::client::Client {
    let conn = std::sync::Arc::new(tokio::net::UdpSocket::bind(bind).await.unwrap());
    let c = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: username.into(),
        password: password.into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .unwrap();
    c.listen().await.unwrap();
    c
}
