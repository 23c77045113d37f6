//! HTTPS for the ACME client: one HTTP/1.1 connection per request over our
//! own rustls (ring) and hyper, so `instant-acme` needs neither its
//! hyper-rustls client nor aws-lc-rs. ACME makes a dozen requests per
//! certificate, so connection reuse is not worth a pool.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::tls::RootsError;
use tokio_rustls::TlsConnector;

/// Longest one ACME request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest ACME response accepted (a certificate chain is a few kB).
const MAX_RESPONSE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot read the ACME CA {path}: {source}")]
    ReadCa {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the ACME CA {0} holds no usable PEM certificate")]
    BadCa(std::path::PathBuf),
    #[error("no system root certificates to trust the ACME directory with: give --acme-ca")]
    NoRoots,
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The ACME client's HTTPS, trusting the system's roots and `ca` if given.
#[derive(Clone)]
pub struct AcmeHttp {
    tls: TlsConnector,
}

impl AcmeHttp {
    pub fn new(ca: Option<&Path>) -> Result<AcmeHttp, HttpError> {
        let roots = crate::tls::client_roots(ca).map_err(|e| match e {
            RootsError::Read { path, source } => HttpError::ReadCa { path, source },
            RootsError::NoCert { path } => HttpError::BadCa(path),
            RootsError::Empty => HttpError::NoRoots,
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(AcmeHttp {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, send(tls, req)).await {
                Ok(result) => result.map_err(instant_acme::Error::Other),
                Err(_) => Err(instant_acme::Error::Other(
                    format!("no answer within {REQUEST_TIMEOUT:?}").into(),
                )),
            }
        })
    }
}

async fn send(
    tls: TlsConnector,
    mut req: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, BoxError> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err(format!("{uri}: ACME URLs must be https").into());
    }
    let host = uri.host().ok_or_else(|| format!("{uri}: no host"))?;
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host, port)).await?;
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())?;
    let stream = tls.connect(name, tcp).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // HTTP/1.1 wants the origin form and a Host header.
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    req.headers_mut()
        .insert(HOST, HeaderValue::from_str(authority)?);
    *req.uri_mut() = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()?;
    let response = sender.send_request(req).await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE).collect().await?.to_bytes();
    Ok(BytesResponse::from(hyper::Response::from_parts(
        parts,
        http_body_util::Full::new(body),
    )))
}
