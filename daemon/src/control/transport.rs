//! Reaching the coordination server: its URL, a TCP or TLS stream to it, the
//! enrolment POST over HTTP/1.1 and the WebSocket upgrade.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use overlay_proto::coord::{format_digest, NETMAP_DIGEST_HEADER};

/// How long connecting (TCP + TLS) may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The least time one address of several gets before the next is tried.
const MIN_ADDRESS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a whole exchange may take: connecting, TLS and the WebSocket upgrade,
/// or the enrolment request and its answer. A server that accepts and then stays
/// silent must not hold a node for longer.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest control message accepted from the coordinator: a netmap of 100,000
/// nodes fits.
const MAX_SERVER_MESSAGE: usize = 16 * 1024 * 1024;
/// Largest HTTP response body accepted from the coordinator.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    BadUrl(String),
    #[error("cannot reach coordinator at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with coordinator {host} failed: {source}{}", tls_hint(source))]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("coordinator HTTP exchange failed: {0}")]
    Http(String),
    #[error("coordinator WebSocket handshake failed: {0}")]
    WebSocket(String),
    #[error("coordinator refused the control connection with HTTP {0}")]
    Refused(u16),
    #[error("coordinator at {addr} did not answer within {}s", .after.as_secs_f64())]
    Timeout { addr: String, after: Duration },
    #[error("cannot load CA certificate {path}: {message}")]
    Ca { path: String, message: String },
}

/// `http[s]://host[:port]` of the coordination server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(TransportError::BadUrl(format!(
                "{url:?} must start with http:// or https://"
            )));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(TransportError::BadUrl(format!(
                "{url:?} must be a bare http[s]://host[:port]"
            )));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port = port
                    .parse()
                    .map_err(|_| TransportError::BadUrl(format!("{url:?} has a bad port")))?;
                (host, port)
            }
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(TransportError::BadUrl(format!("{url:?} has no host")));
        }
        Ok(Endpoint {
            tls,
            host: host.to_owned(),
            port,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `http[s]://host:port`, as a person would write it.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority())
    }

    pub fn ws_url(&self, path: &str) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}{path}", self.authority())
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One sentence on what to do about the certificate errors a person meets first:
/// `openssl req -x509` makes a CA:TRUE certificate, which webpki refuses as a
/// server's (`CaUsedAsEndEntity`), and a private CA nobody told the node about
/// gives `UnknownIssuer`.
fn tls_hint(source: &std::io::Error) -> &'static str {
    let text = format!("{source:?}");
    if text.contains("CaUsedAsEndEntity") {
        " (the coordinator's certificate is a CA certificate, CA:TRUE, which cannot \
         identify a server: serve a leaf certificate with basicConstraints CA:FALSE signed \
         by that CA, and give nodes the CA with --ca-cert)"
    } else if text.contains("UnknownIssuer") {
        " (no CA this node trusts signed the coordinator's certificate: give its CA, or \
         the self-signed certificate itself, with --ca-cert FILE)"
    } else {
        ""
    }
}

/// Connects to one of the addresses `authority` resolves to. A name with
/// several addresses (replicas behind one DNS name) is tried from the one
/// that worked last (so enrolment's challenge and answer reach the same
/// replica), else from a random one (so nodes spread over the replicas),
/// each for a share of [`CONNECT_TIMEOUT`]: a dead address costs seconds, not
/// the whole timeout.
async fn connect_any(
    authority: &str,
    last_good: &Mutex<Option<SocketAddr>>,
) -> Result<TcpStream, TransportError> {
    let failed = |source| TransportError::Connect {
        addr: authority.to_owned(),
        source,
    };
    let addrs: Vec<_> = tokio::net::lookup_host(authority)
        .await
        .map_err(failed)?
        .collect();
    if addrs.is_empty() {
        return Err(failed(std::io::ErrorKind::NotFound.into()));
    }
    let preferred = last_good.lock().ok().and_then(|a| *a);
    let start = preferred
        .and_then(|p| addrs.iter().position(|a| *a == p))
        .unwrap_or_else(|| rand::random::<usize>() % addrs.len());
    let share = (CONNECT_TIMEOUT / addrs.len() as u32).max(MIN_ADDRESS_TIMEOUT);
    let mut last = std::io::ErrorKind::TimedOut.into();
    for addr in addrs.iter().cycle().skip(start).take(addrs.len()) {
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                if let Ok(mut last) = last_good.lock() {
                    *last = Some(*addr);
                }
                return Ok(tcp);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::ErrorKind::TimedOut.into(),
        }
        tracing::debug!("coordinator address {addr} of {authority} failed: {last}");
    }
    Err(failed(last))
}

/// Connects to the coordinator, with TLS when the URL says https.
pub struct Connector {
    tls: Option<tokio_rustls::TlsConnector>,
    /// The address the last connection reached (see [`connect_any`]).
    last_good: Mutex<Option<SocketAddr>>,
    /// See [`EXCHANGE_TIMEOUT`].
    timeout: Duration,
}

impl Connector {
    pub fn new(endpoint: &Endpoint, ca_cert: Option<&Path>) -> Result<Self, TransportError> {
        if !endpoint.tls {
            return Ok(Connector {
                tls: None,
                last_good: Mutex::default(),
                timeout: EXCHANGE_TIMEOUT,
            });
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_cert {
            let ca_err = |message: String| TransportError::Ca {
                path: path.display().to_string(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| ca_err(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::Http(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Connector {
            tls: Some(tokio_rustls::TlsConnector::from(Arc::new(config))),
            last_good: Mutex::default(),
            timeout: EXCHANGE_TIMEOUT,
        })
    }

    /// Bounds each whole exchange by `timeout` instead of [`EXCHANGE_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `exchange` within the exchange timeout.
    async fn bounded<T>(
        &self,
        endpoint: &Endpoint,
        exchange: impl std::future::Future<Output = Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(TransportError::Timeout {
                    addr: endpoint.authority(),
                    after: self.timeout,
                })
            })
    }

    pub async fn connect(&self, endpoint: &Endpoint) -> Result<Box<dyn Io>, TransportError> {
        let addr = endpoint.authority();
        let connect = async {
            let tcp = connect_any(&addr, &self.last_good).await?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return Ok(Box::new(tcp) as Box<dyn Io>);
            };
            let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                .map_err(|e| TransportError::BadUrl(e.to_string()))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|source| TransportError::Tls {
                    host: endpoint.host.clone(),
                    source,
                })?;
            Ok(Box::new(stream) as Box<dyn Io>)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Connect {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            }),
        }
    }

    /// POSTs `body` as JSON and returns the status and body of the answer.
    pub async fn post_json(
        &self,
        endpoint: &Endpoint,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), TransportError> {
        self.bounded(endpoint, self.post_json_unbounded(endpoint, path, body))
            .await
    }

    async fn post_json_unbounded(
        &self,
        endpoint: &Endpoint,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), TransportError> {
        let http = |e: &dyn std::fmt::Display| TransportError::Http(e.to_string());
        let io = self.connect(endpoint).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| http(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, endpoint.authority())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| http(&e))?;
        let response = sender.send_request(request).await.map_err(|e| http(&e))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes()
            .to_vec();
        Ok((status, body))
    }

    /// Opens the control WebSocket at `path` with the given `Authorization` value;
    /// connecting, TLS and the upgrade together take at most the exchange timeout.
    pub async fn websocket(
        &self,
        endpoint: &Endpoint,
        path: &str,
        authorization: &str,
    ) -> Result<tokio_tungstenite::WebSocketStream<Box<dyn Io>>, TransportError> {
        self.websocket_holding(endpoint, path, authorization, None)
            .await
    }

    /// [`Connector::websocket`], saying which netmap the node holds
    /// (`NETMAP_DIGEST_HEADER`, see `control::resume`).
    pub async fn websocket_holding(
        &self,
        endpoint: &Endpoint,
        path: &str,
        authorization: &str,
        holds: Option<u64>,
    ) -> Result<tokio_tungstenite::WebSocketStream<Box<dyn Io>>, TransportError> {
        self.bounded(
            endpoint,
            self.websocket_unbounded(endpoint, path, authorization, holds),
        )
        .await
    }

    async fn websocket_unbounded(
        &self,
        endpoint: &Endpoint,
        path: &str,
        authorization: &str,
        holds: Option<u64>,
    ) -> Result<tokio_tungstenite::WebSocketStream<Box<dyn Io>>, TransportError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let io = self.connect(endpoint).await?;
        let mut request = endpoint
            .ws_url(path)
            .into_client_request()
            .map_err(|e| TransportError::WebSocket(e.to_string()))?;
        let value = authorization
            .parse()
            .map_err(|_| TransportError::WebSocket("credential is not a valid header".into()))?;
        request.headers_mut().insert("authorization", value);
        if let Some(digest) = holds {
            let value = format_digest(digest)
                .parse()
                .map_err(|_| TransportError::WebSocket("bad netmap digest header".into()))?;
            request.headers_mut().insert(NETMAP_DIGEST_HEADER, value);
        }
        // The coordinator is trusted with larger messages than it accepts from nodes:
        // the netmap of a large mesh (about 130 bytes a node) comes in one Welcome.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_SERVER_MESSAGE))
            .max_frame_size(Some(MAX_SERVER_MESSAGE));
        let (ws, _) = tokio_tungstenite::client_async_with_config(request, io, Some(config))
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    TransportError::Refused(resp.status().as_u16())
                }
                other => TransportError::WebSocket(other.to_string()),
            })?;
        Ok(ws)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coordinator that accepts TCP and then says nothing.
    async fn silent_server() -> (tokio::net::TcpListener, Endpoint) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let endpoint = Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        (listener, endpoint)
    }

    #[tokio::test]
    async fn websocket_upgrade_to_a_silent_server_times_out() {
        let (listener, endpoint) = silent_server().await;
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let connector = Connector::new(&endpoint, None)
            .unwrap()
            .with_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let result = connector
            .websocket(&endpoint, "/v1/connect", "Bearer 1:x")
            .await;
        assert!(
            matches!(result, Err(TransportError::Timeout { .. })),
            "{:?}",
            result.err()
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let result = connector
            .post_json(&endpoint, "/v1/register", b"{}".to_vec())
            .await;
        assert!(matches!(result, Err(TransportError::Timeout { .. })));
        held.abort();
    }

    #[test]
    fn parses_urls() {
        let e = Endpoint::parse("http://10.0.0.1:8080").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (false, "10.0.0.1", 8080));
        let e = Endpoint::parse("https://coord.example.com/").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port),
            (true, "coord.example.com", 443)
        );
        assert_eq!(
            e.ws_url("/v1/connect"),
            "wss://coord.example.com:443/v1/connect"
        );
        let e = Endpoint::parse("http://[::1]:9").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9));
        assert!(Endpoint::parse("coord:80").is_err());
        assert!(Endpoint::parse("http://h:99999").is_err());
        assert!(Endpoint::parse("http://h/path").is_err());
        assert!(Endpoint::parse("http://").is_err());
    }

    fn tls_error(cert: rustls::CertificateError) -> String {
        let source = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(cert),
        );
        TransportError::Tls {
            host: "coord".into(),
            source,
        }
        .to_string()
    }

    #[test]
    fn tls_errors_people_meet_first_say_what_to_do() {
        let unknown = tls_error(rustls::CertificateError::UnknownIssuer);
        assert!(
            unknown.contains("UnknownIssuer") && unknown.contains("--ca-cert"),
            "{unknown}"
        );
        #[derive(Debug)]
        struct CaUsedAsEndEntity;
        impl std::fmt::Display for CaUsedAsEndEntity {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "CaUsedAsEndEntity")
            }
        }
        impl std::error::Error for CaUsedAsEndEntity {}
        let ca = tls_error(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(CaUsedAsEndEntity),
        )));
        assert!(ca.contains("CA:TRUE") && ca.contains("CA:FALSE"), "{ca}");
        let other = tls_error(rustls::CertificateError::Expired);
        assert!(!other.contains("--ca-cert"), "{other}");
    }
}
