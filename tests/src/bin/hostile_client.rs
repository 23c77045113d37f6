//! A hostile client of the coordinator, for the trust tests: no node identity,
//! at most an auth key (what a departing team member may still hold). Each
//! subcommand runs one attack and prints what it achieved as `key=value` lines on
//! stdout, for the test to check. (`hostile_node` is the other kind: a malicious
//! *member* of the mesh, with an enrolled node's identity.)
//!
//! ```text
//! hostile_client healthz    --addr A --stop-file F        probe /healthz every 20 ms until F exists
//! hostile_client idle       --addr A --count N --hold S  hold N TCP sockets open (--partial: half a request each)
//! hostile_client reregister --url URL --auth-key K --victim-key B64
//! ```
//!
//! Only ever run inside lab namespaces, against the lab's coordinator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use overlay_proto::coord::{ApiError, ChallengeResponse, CHALLENGE_PATH, REGISTER_PATH};
use overlay_proto::enrol::register_request;
use overlayd::control::transport::{Connector, Endpoint};
use overlayd::identity::Keypair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    attack: Attack,
}

#[derive(Subcommand)]
enum Attack {
    /// Not an attack: measures how long `/healthz` takes while attacks run.
    Healthz {
        /// The coordinator's `IP:PORT` (plain HTTP).
        #[arg(long)]
        addr: String,
        #[arg(long)]
        stop_file: PathBuf,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
    /// Opens `count` TCP connections and keeps them for `hold` seconds; with
    /// `--partial` each sends the start of an HTTP request and never finishes it.
    Idle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        hold: u64,
        #[arg(long)]
        partial: bool,
    },
    /// Enrols the victim's public key without its private key.
    Reregister {
        #[arg(long)]
        url: String,
        #[arg(long)]
        auth_key: String,
        #[arg(long)]
        victim_key: String,
    },
}
#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.attack {
        Attack::Healthz {
            addr,
            stop_file,
            interval_ms,
        } => healthz(&addr, &stop_file, Duration::from_millis(interval_ms)).await,
        Attack::Idle {
            addr,
            count,
            hold,
            partial,
        } => idle(addr, count, Duration::from_secs(hold), partial).await,
        Attack::Reregister {
            url,
            auth_key,
            victim_key,
        } => reregister(&url, &auth_key, &victim_key).await,
    };
    if let Err(e) = result {
        eprintln!("hostile: {e:#}");
        std::process::exit(1);
    }
}

/// One `/healthz` request on a fresh connection: how long the connection
/// took, and the whole exchange.
async fn probe_healthz(addr: &str) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await?;
    let connected = started.elapsed();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!("answer was {:?}", String::from_utf8_lossy(&answer));
    }
    Ok((connected, started.elapsed()))
}

async fn healthz(addr: &str, stop_file: &std::path::Path, every: Duration) -> anyhow::Result<()> {
    let (mut count, mut failures, mut worst) = (0u64, 0u64, Duration::ZERO);
    let mut worst_connect = Duration::ZERO;
    while !stop_file.exists() {
        match tokio::time::timeout(Duration::from_secs(5), probe_healthz(addr)).await {
            Ok(Ok((connect, took))) => {
                if took > Duration::from_millis(50) {
                    // When, and in which part: to line it up with the logs.
                    eprintln!(
                        "slow healthz at {}: connect {:.1} ms, total {:.1} ms",
                        overlay_tests::wait::unix_millis(),
                        connect.as_secs_f64() * 1000.0,
                        took.as_secs_f64() * 1000.0
                    );
                }
                worst = worst.max(took);
                worst_connect = worst_connect.max(connect);
            }
            Ok(Err(e)) => {
                failures += 1;
                eprintln!("healthz failed: {e}");
            }
            Err(_) => {
                failures += 1;
                worst = worst.max(Duration::from_secs(5));
            }
        }
        count += 1;
        tokio::time::sleep(every).await;
    }
    println!("probes={count}");
    println!("failures={failures}");
    println!("worst_ms={:.1}", worst.as_secs_f64() * 1000.0);
    println!(
        "worst_connect_ms={:.1}",
        worst_connect.as_secs_f64() * 1000.0
    );
    Ok(())
}

async fn idle(addr: SocketAddr, count: usize, hold: Duration, partial: bool) -> anyhow::Result<()> {
    let mut sockets = Vec::new();
    let mut refused = 0usize;
    for _ in 0..count {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(mut tcp)) => {
                if partial {
                    let _ = tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
                }
                sockets.push(tcp);
            }
            _ => refused += 1,
        }
    }
    let opened = sockets.len();
    // Which of them did the server close before we let go?
    let deadline = tokio::time::Instant::now() + hold;
    let watchers = sockets.into_iter().map(|mut tcp| async move {
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    });
    let closed = futures_util::future::join_all(watchers)
        .await
        .into_iter()
        .filter(|c| *c)
        .count();
    println!("opened={opened}");
    println!("refused={refused}");
    println!("closed_by_server={closed}");
    Ok(())
}

/// Asks for a challenge and answers it with a proof made by a fresh key of our
/// own, but naming the victim's public key: the proof of possession must fail.
async fn reregister(url: &str, auth_key: &str, victim_key: &str) -> anyhow::Result<()> {
    let endpoint = Endpoint::parse(url)?;
    let connector = Connector::new(&endpoint, None)?;
    let (status, body) = connector
        .post_json(&endpoint, CHALLENGE_PATH, Vec::new())
        .await?;
    if status != 200 {
        bail!("challenge refused: HTTP {status}");
    }
    let challenge: ChallengeResponse = serde_json::from_slice(&body)?;
    let ours: [u8; 32] = Keypair::generate().secret.to_bytes();
    let mut request = register_request(&challenge, &ours, auth_key, "thief", None)?;
    request.public_key = victim_key.to_string();
    let (status, body) = connector
        .post_json(&endpoint, REGISTER_PATH, serde_json::to_vec(&request)?)
        .await?;
    let code = serde_json::from_slice::<ApiError>(&body)
        .map(|e| e.error)
        .unwrap_or_default();
    println!("accepted={}", status == 200 || status == 201);
    println!("status={status}");
    println!("error={code}");
    Ok(())
}
