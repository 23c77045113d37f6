//! `coord-load`: holds N control sessions open against `overlay-coord`, then
//! enrols one more node and measures how long its `peer_upsert` takes to reach
//! each of the N.
//!
//! ```text
//!  1. register N nodes          POST /v1/register/challenge, /v1/register (concurrently)
//!  2. connect N sessions        GET  /v1/connect (WS)  (in batches; each batch
//!                                                        lets the fan-out settle)
//!  3. arm, register newcomer ──▶ peer_upsert{online:false} ──▶ N sessions   (t_register)
//!  4. connect newcomer       ──▶ peer_upsert{online:true}  ──▶ N sessions   (t_connect)
//! ```
//!
//! With `--hold SECS` it measures nothing: it registers and connects the N
//! sessions, prints `HOLDING nodes=N`, and keeps them open for SECS seconds
//! while a real node joins the mesh (`tests/bench/idle.sh`: one `overlayd`
//! whose netmap holds N online peers that never send). Every second in which
//! something arrived it prints a `hold` line with the `signal` frames the N
//! sessions have read so far, and how many sessions got any.
//!
//! Each delay is measured from just before the newcomer's request to the moment
//! a session's reader task reads the frame, so it includes the client's own
//! scheduling on a shared machine; it is an upper bound for the server.

mod http;
mod session;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use rand::RngCore;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use overlay_proto::coord::{error_code, RegisterResponse, MAX_FRAME_BYTES};
use overlay_proto::enrol;

use crate::http::RegisterFailure;
use crate::session::{Shared, Upsert};

/// Connections one loopback source address carries before the next is used;
/// below the ~28 000 ephemeral ports of the default `ip_local_port_range`.
const CONNECTIONS_PER_SOURCE: usize = 20_000;
/// How many times a refused (rate-limited) or failed registration is retried.
const REGISTER_ATTEMPTS: u32 = 30;
/// No frame for this long means the server's fan-out has drained.
const QUIET: Duration = Duration::from_millis(300);
/// How often the server's memory is checked against `--max-server-rss-mib`.
const RSS_POLL: Duration = Duration::from_millis(100);

#[derive(Parser, Debug)]
#[command(about = "Load generator for overlay-coord's control sessions")]
struct Args {
    /// The coordination server's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    server: SocketAddr,
    /// A reusable auth key (`overlay-coord keys create --reusable`).
    #[arg(long, env = "COORD_LOAD_AUTH_KEY")]
    auth_key: String,
    /// Sessions to hold open before the measurement.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// The server's PID, to report its VmRSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Loopback source addresses to spread connections over (127.0.0.1, .2, …);
    /// 0 picks enough for the ephemeral port range.
    #[arg(long, default_value_t = 0)]
    sources: usize,
    /// Requests in flight at once while registering and connecting.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Sessions connected between two waits for the fan-out to settle. The
    /// server closes a session more than `delta_backlog` deltas behind.
    #[arg(long, default_value_t = 250)]
    batch: usize,
    /// How long to wait for the newcomer's upserts to reach every session.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Prefix of the simulated nodes' hostnames.
    #[arg(long, default_value = "load")]
    hostname_prefix: String,
    /// Give up (exit 3) as soon as the server's VmRSS passes this many MiB: the
    /// machine is shared, and a server growing without bound must not bring the
    /// kernel's OOM killer down on someone else. Needs --server-pid.
    #[arg(long, default_value_t = 4096)]
    max_server_rss_mib: u64,
    /// Measure nothing: connect the N sessions, keep them open this many
    /// seconds, counting the signals real nodes send them, then exit.
    #[arg(long, value_name = "SECS")]
    hold: Option<u64>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coord-load: error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coord-load: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sources = source_addresses(&args);
    let source_of = |i: usize| sources[i % sources.len()];
    let rss_start = server_rss(args.server_pid);
    println!(
        "coord-load: {} sessions against {} from {} source address(es)",
        args.nodes,
        args.server,
        sources.len()
    );

    // 1. Enrol everyone first: with no session online the server fans nothing out.
    let started = Instant::now();
    let nodes = register_all(&args, &sources).await?;
    let register_secs = started.elapsed().as_secs_f64();
    println!(
        "  register {} nodes: {:.2} s ({:.0}/s)",
        args.nodes,
        register_secs,
        args.nodes as f64 / register_secs.max(1e-9)
    );

    // 2. Connect in batches, letting each batch's netmap deltas drain.
    let shared = Arc::new(Shared::default());
    if let Some(pid) = args.server_pid {
        tokio::spawn(rss_watchdog(
            pid,
            args.max_server_rss_mib,
            args.nodes,
            shared.clone(),
        ));
    }
    let (upsert_tx, mut upsert_rx) = mpsc::unbounded_channel::<Upsert>();
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    for (b, batch) in nodes.chunks(args.batch.max(1)).enumerate() {
        let mut set = JoinSet::new();
        for (j, node) in batch.iter().enumerate() {
            let i = b * args.batch.max(1) + j;
            let (server, source, node) = (args.server, source_of(i), node.clone());
            let (limit, shared, tx) = (limit.clone(), shared.clone(), upsert_tx.clone());
            set.spawn(async move {
                let _permit = limit.acquire().await;
                // A reset during the handshake (the server's pending-connection
                // cap, a burst of registrations still closing) gets two more tries.
                let mut attempt = 0;
                let (ws, _) = loop {
                    attempt += 1;
                    match session::connect(server, source, node.node_id, &node.credential).await {
                        Ok(connected) => break connected,
                        Err(_) if attempt < 3 => {
                            tokio::time::sleep(Duration::from_millis(200 * attempt)).await
                        }
                        Err(e) => return Err(e),
                    }
                };
                shared.connected.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(session::read_loop(i, ws, shared, tx));
                anyhow::Ok(())
            });
        }
        while let Some(joined) = set.join_next().await {
            joined.context("connect task panicked")??;
        }
        wait_quiet(&shared, Duration::from_secs(120)).await;
    }
    wait_quiet(&shared, Duration::from_secs(120)).await;
    let connect_secs = started.elapsed().as_secs_f64();
    println!(
        "  connect {} sessions: {:.2} s, {} netmap frames fanned out meanwhile",
        args.nodes,
        connect_secs,
        shared.frames.load(Ordering::Relaxed)
    );
    let closed = shared.closed.load(Ordering::Relaxed);
    if closed > 0 {
        bail!(
            "{closed} sessions closed during setup: {:?}",
            close_reasons(&shared)
        );
    }
    let rss_loaded = server_rss(args.server_pid);
    if let Some(secs) = args.hold {
        return hold(&args, &shared, Duration::from_secs(secs), rss_loaded).await;
    }

    // 3. and 4. The newcomer.
    shared.armed.store(true, Ordering::SeqCst);
    let t_register = Instant::now();
    let newcomer = register_one(&args, source_of(args.nodes), args.nodes).await?;
    let t_connect = Instant::now();
    let (ws, netmap) = session::connect(
        args.server,
        source_of(args.nodes),
        newcomer.node_id,
        &newcomer.credential,
    )
    .await?;
    let newcomer_reader = tokio::spawn(session::read_loop(
        usize::MAX,
        ws,
        shared.clone(),
        upsert_tx.clone(),
    ));

    let mut first: HashMap<usize, Instant> = HashMap::new();
    let mut online: HashMap<usize, Instant> = HashMap::new();
    let deadline = tokio::time::sleep(Duration::from_secs(args.timeout_secs));
    tokio::pin!(deadline);
    while online.len() < args.nodes {
        tokio::select! {
            _ = &mut deadline => break,
            Some(u) = upsert_rx.recv() => {
                if u.about != newcomer.node_id || u.session == usize::MAX {
                    continue;
                }
                first.entry(u.session).or_insert(u.at);
                if u.online {
                    online.entry(u.session).or_insert(u.at);
                }
            }
        }
    }
    newcomer_reader.abort();
    let rss_end = server_rss(args.server_pid);

    let register_delays: Vec<Duration> = first.values().map(|t| *t - t_register).collect();
    let online_delays: Vec<Duration> = online.values().map(|t| *t - t_connect).collect();
    println!(
        "  newcomer registered -> its peer_upsert read by {}/{} sessions: {}",
        register_delays.len(),
        args.nodes,
        Stats::of(&register_delays)
    );
    println!(
        "  newcomer connected  -> its peer_upsert(online) read by {}/{} sessions: {}",
        online_delays.len(),
        args.nodes,
        Stats::of(&online_delays)
    );
    println!(
        "  netmap for a mesh of {} nodes: {} peers in {} part(s), {} bytes, largest frame {} bytes \
         (overlayd accepts frames up to {MAX_FRAME_BYTES}){}",
        args.nodes + 1,
        netmap.peers,
        netmap.parts,
        netmap.bytes,
        netmap.largest,
        if netmap.largest > MAX_FRAME_BYTES { "  ** TOO BIG FOR overlayd **" } else { "" }
    );
    if netmap.peers != args.nodes {
        println!(
            "  ** the newcomer's netmap listed {} peers, not {} **",
            netmap.peers, args.nodes
        );
    }
    println!(
        "  server VmRSS: {} at start, {} with {} sessions, {} at the end; peak VmHWM {}",
        mib(rss_start.map(|r| r.0)),
        mib(rss_loaded.map(|r| r.0)),
        args.nodes,
        mib(rss_end.map(|r| r.0)),
        mib(rss_end.map(|r| r.1)),
    );
    let closed = shared.closed.load(Ordering::Relaxed);
    if closed > 0 {
        println!("  sessions closed: {closed}: {:?}", close_reasons(&shared));
    }
    // One line for scripts.
    let (r, o) = (Stats::of(&register_delays), Stats::of(&online_delays));
    println!(
        "RESULT nodes={} register_s={:.2} connect_s={:.2} reg_n={} reg_p50_ms={:.1} reg_p99_ms={:.1} reg_max_ms={:.1} \
         online_n={} online_p50_ms={:.1} online_p99_ms={:.1} online_max_ms={:.1} welcome_bytes={} netmap_parts={} netmap_bytes={} \
         rss_start_kb={} rss_loaded_kb={} rss_end_kb={} hwm_kb={} closed={}",
        args.nodes,
        register_secs,
        connect_secs,
        register_delays.len(),
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        online_delays.len(),
        o.p50_ms,
        o.p99_ms,
        o.max_ms,
        netmap.largest,
        netmap.parts,
        netmap.bytes,
        kb(rss_start.map(|r| r.0)),
        kb(rss_loaded.map(|r| r.0)),
        kb(rss_end.map(|r| r.0)),
        kb(rss_end.map(|r| r.1)),
        closed
    );
    if online_delays.len() < args.nodes {
        bail!(
            "only {}/{} sessions saw the newcomer come online within {} s",
            online_delays.len(),
            args.nodes,
            args.timeout_secs
        );
    }
    Ok(())
}

/// Keeps the sessions open for `secs` (their reader tasks run on), printing
/// the signals they have read whenever the count moved in the last second.
async fn hold(
    args: &Args,
    shared: &Shared,
    secs: Duration,
    rss_loaded: Option<(u64, u64)>,
) -> anyhow::Result<()> {
    println!(
        "HOLDING nodes={} secs={} server_rss_kb={}",
        args.nodes,
        secs.as_secs(),
        kb(rss_loaded.map(|r| r.0))
    );
    let started = Instant::now();
    let line = |shared: &Shared| {
        format!(
            "hold t={:.0}s frames={} signals={} signaled_sessions={} closed={}",
            started.elapsed().as_secs_f64(),
            shared.frames.load(Ordering::Relaxed),
            shared.signals.load(Ordering::Relaxed),
            shared.signaled.load(Ordering::Relaxed),
            shared.closed.load(Ordering::Relaxed)
        )
    };
    let mut last = (0, 0);
    while started.elapsed() < secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (
            shared.frames.load(Ordering::Relaxed),
            shared.closed.load(Ordering::Relaxed),
        );
        if now != last {
            println!("{}", line(shared));
            last = now;
        }
    }
    println!("{} (end)", line(shared));
    let closed = shared.closed.load(Ordering::Relaxed);
    if closed > 0 {
        bail!(
            "{closed} sessions closed while holding: {:?}",
            close_reasons(shared)
        );
    }
    Ok(())
}

fn source_addresses(args: &Args) -> Vec<Option<IpAddr>> {
    let needed = (args.nodes + 1).div_ceil(CONNECTIONS_PER_SOURCE);
    let count = if args.sources == 0 {
        needed
    } else {
        args.sources
    };
    if count <= 1 {
        // Let connect() choose the source: ports are then shared across destinations.
        return vec![None];
    }
    (1..=count.min(254))
        .map(|n| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n as u8))))
        .collect()
}

async fn register_all(
    args: &Args,
    sources: &[Option<IpAddr>],
) -> anyhow::Result<Vec<RegisterResponse>> {
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in 0..args.nodes {
        let (limit, source) = (limit.clone(), sources[i % sources.len()]);
        let (server, key, prefix) = (
            args.server,
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

async fn register_one(
    args: &Args,
    source: Option<IpAddr>,
    i: usize,
) -> anyhow::Result<RegisterResponse> {
    let name = format!("{}-{i}", args.hostname_prefix);
    register_with_retry(args.server, source, &args.auth_key, &name).await
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

/// Ends the process when the server's VmRSS passes `max_mib`, after printing
/// how far the setup got.
async fn rss_watchdog(pid: u32, max_mib: u64, nodes: usize, shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(RSS_POLL).await;
        let Some((rss, _)) = server_rss(Some(pid)) else {
            return; // the server is gone; the sessions will say so
        };
        if rss / 1024 > max_mib {
            let connected = shared.connected.load(Ordering::Relaxed);
            println!(
                "  ABORTED: server VmRSS {} passed --max-server-rss-mib {max_mib} with {connected} of {nodes} sessions connected",
                mib(Some(rss))
            );
            println!(
                "RESULT nodes={nodes} failed=server_rss_over_{max_mib}MiB connected={connected} rss_kb={rss}"
            );
            std::process::exit(3);
        }
    }
}

/// Returns once no session has read a frame for [`QUIET`], or after `max`.
async fn wait_quiet(shared: &Shared, max: Duration) {
    let deadline = Instant::now() + max;
    let mut last = shared.frames.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        tokio::time::sleep(QUIET).await;
        let now = shared.frames.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}

fn close_reasons(shared: &Shared) -> Vec<String> {
    shared
        .close_reasons
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default()
}

/// p50, p99 (nearest rank) and max of a set of delays.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Stats {
    fn of(delays: &[Duration]) -> Stats {
        if delays.is_empty() {
            return Stats::default();
        }
        let mut ms: Vec<f64> = delays.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |q: usize| ms[(ms.len() * q).div_ceil(100).max(1) - 1];
        Stats {
            p50_ms: rank(50),
            p99_ms: rank(99),
            max_ms: ms[ms.len() - 1],
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

/// (VmRSS, VmHWM) of `pid` in kB.
fn server_rss(pid: Option<u32>) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(kb: Option<u64>) -> String {
    kb.map_or("-".to_string(), |kb| {
        format!("{:.1} MiB", kb as f64 / 1024.0)
    })
}

fn kb(kb: Option<u64>) -> String {
    kb.map_or("-".to_string(), |kb| kb.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_use_nearest_rank() {
        let delays: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Stats::of(&delays);
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (50.0, 99.0, 100.0));
    }

    #[test]
    fn no_delays_give_zero_stats() {
        assert_eq!(Stats::of(&[]).max_ms, 0.0);
    }
}
