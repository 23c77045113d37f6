//! Just enough HTTP/1.1 to call `POST /v1/register/challenge` and
//! `POST /v1/register`: one request per
//! connection (`Connection: close`), body read to the end. A client library
//! would do, but this keeps the generator's dependencies to the workspace's.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    mut stream: TcpStream,
    server: SocketAddr,
) -> Result<ChallengeResponse, RegisterFailure> {
    let (status, body) = post(&mut stream, server, CHALLENGE_PATH, b"")
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
    mut stream: TcpStream,
    server: SocketAddr,
    request: &RegisterRequest,
) -> Result<RegisterResponse, RegisterFailure> {
    let body = serde_json::to_vec(request)
        .context("encoding the request")
        .map_err(RegisterFailure::Other)?;
    let (status, body) = post(&mut stream, server, REGISTER_PATH, &body)
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
    stream: &mut TcpStream,
    server: SocketAddr,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
        if response.len() > MAX_RESPONSE_BYTES {
            bail!("response larger than {MAX_RESPONSE_BYTES} bytes");
        }
    }
    parse_response(&response)
}

/// Status code and body of a complete HTTP/1.1 response (identity or chunked).
fn parse_response(response: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response has no end of headers")?;
    let head = std::str::from_utf8(&response[..split]).context("response head is not UTF-8")?;
    let body = &response[split + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_body_is_returned_as_is() {
        let (status, body) =
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"{}"[..]));
    }

    #[test]
    fn chunked_body_is_reassembled() {
        let raw = b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (status, body) = parse_response(raw).unwrap();
        assert_eq!((status, body.as_slice()), (401, &b"abcde"[..]));
    }

    #[test]
    fn response_without_headers_end_is_an_error() {
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
