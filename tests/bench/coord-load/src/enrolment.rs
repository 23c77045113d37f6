//! Enrolling the simulated nodes, with retries when the server is busy.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::RngCore;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use overlay_proto::coord::{error_code, RegisterResponse};
use overlay_proto::enrol;

use crate::http::{self, RegisterFailure};
use crate::{session, Args, REGISTER_ATTEMPTS};

pub async fn register_all(
    args: &Args,
    sources: &[Option<IpAddr>],
) -> anyhow::Result<Vec<RegisterResponse>> {
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in 0..args.nodes {
        let (limit, source) = (limit.clone(), sources[i % sources.len()]);
        let (server, key, prefix) = (
            args.servers[i % args.servers.len()],
            args.auth_key.clone(),
            args.hostname_prefix.clone(),
        );
        set.spawn(async move {
            let _permit = limit.acquire().await;
            register_with_retry(server, source, &key, &format!("{prefix}-{i}"))
                .await
                .map(|r| (i, r))
        });
    }
    let mut nodes: Vec<Option<RegisterResponse>> = vec![None; args.nodes];
    while let Some(joined) = set.join_next().await {
        let (i, response) = joined.context("register task panicked")??;
        nodes[i] = Some(response);
    }
    Ok(nodes.into_iter().flatten().collect())
}

pub async fn register_one(
    args: &Args,
    source: Option<IpAddr>,
    i: usize,
) -> anyhow::Result<RegisterResponse> {
    let name = format!("{}-{i}", args.hostname_prefix);
    register_with_retry(args.servers[0], source, &args.auth_key, &name).await
}

async fn register_with_retry(
    server: SocketAddr,
    source: Option<IpAddr>,
    auth_key: &str,
    hostname: &str,
) -> anyhow::Result<RegisterResponse> {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let mut attempt = 0;
    loop {
        attempt += 1;
        // A challenge is good for one attempt, so every attempt asks anew.
        let result = register_once(server, source, &secret, auth_key, hostname).await;
        match result {
            Ok(response) => return Ok(response),
            Err(RegisterFailure::Refused { status, error })
                if error.error != error_code::RATE_LIMITED =>
            {
                bail!(
                    "registering {hostname}: HTTP {status} {}: {}",
                    error.error,
                    error.message
                )
            }
            Err(e) if attempt >= REGISTER_ATTEMPTS => {
                bail!("registering {hostname}: {e} (after {attempt} attempts)")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await,
        }
    }
}

/// Challenge, proof and registration: two connections, as `overlayd` does it.
async fn register_once(
    server: SocketAddr,
    source: Option<IpAddr>,
    secret: &[u8; 32],
    auth_key: &str,
    hostname: &str,
) -> Result<RegisterResponse, RegisterFailure> {
    let stream = session::dial(server, source)
        .await
        .map_err(RegisterFailure::Other)?;
    let challenge = http::challenge(stream, server).await?;
    let request = enrol::register_request(&challenge, secret, auth_key, hostname, None)
        .map_err(|e| RegisterFailure::Other(e.into()))?;
    let stream = session::dial(server, source)
        .await
        .map_err(RegisterFailure::Other)?;
    http::register(stream, server, &request).await
}
