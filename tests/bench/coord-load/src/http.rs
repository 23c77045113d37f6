//! The two enrolment calls, `POST /v1/register/challenge` and
//! `POST /v1/register`, over hyper's HTTP/1.1 client: one request per
//! connection (the caller dials it, from the source address it chooses).

use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use overlay_proto::coord::{
    ApiError, ChallengeResponse, RegisterRequest, RegisterResponse, CHALLENGE_PATH, REGISTER_PATH,
};

/// Bounds what a misbehaving server can make us buffer per request.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why a registration failed: the server's typed refusal, or anything else.
#[derive(Debug)]
pub enum RegisterFailure {
    Refused { status: u16, error: ApiError },
    Other(anyhow::Error),
}

impl std::fmt::Display for RegisterFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegisterFailure::Refused { status, error } => {
                write!(f, "HTTP {status} {}: {}", error.error, error.message)
            }
            RegisterFailure::Other(e) => write!(f, "{e:#}"),
        }
    }
}

/// Asks for a registration challenge through `stream` (connected to `server`).
pub async fn challenge(
    stream: TcpStream,
    server: SocketAddr,
) -> Result<ChallengeResponse, RegisterFailure> {
    let (status, body) = post(stream, server, CHALLENGE_PATH, b"")
        .await
        .map_err(RegisterFailure::Other)?;
    if status == 200 {
        return serde_json::from_slice(&body)
            .context("challenge response is not a ChallengeResponse")
            .map_err(RegisterFailure::Other);
    }
    Err(refusal(status, &body))
}

/// Registers one node through `stream` (already connected to `server`).
pub async fn register(
    stream: TcpStream,
    server: SocketAddr,
    request: &RegisterRequest,
) -> Result<RegisterResponse, RegisterFailure> {
    let body = serde_json::to_vec(request)
        .context("encoding the request")
        .map_err(RegisterFailure::Other)?;
    let (status, body) = post(stream, server, REGISTER_PATH, &body)
        .await
        .map_err(RegisterFailure::Other)?;
    if status == 200 {
        return serde_json::from_slice(&body)
            .context("register response is not a RegisterResponse")
            .map_err(RegisterFailure::Other);
    }
    Err(refusal(status, &body))
}

fn refusal(status: u16, body: &[u8]) -> RegisterFailure {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(error) => RegisterFailure::Refused { status, error },
        Err(_) => RegisterFailure::Other(anyhow::anyhow!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(body)
        )),
    }
}

async fn post(
    stream: TcpStream,
    server: SocketAddr,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let conn = tokio::spawn(conn);
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, server.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        // The server then closes at once, so the connection stops counting
        // against its per-source bound before the next one opens.
        .header(hyper::header::CONNECTION, "close")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the response to POST {path}: {e}"))?
        .to_bytes()
        .to_vec();
    drop(sender);
    // With `Connection: close` the connection ends after the response.
    let _ = conn.await;
    Ok((status, body))
}
