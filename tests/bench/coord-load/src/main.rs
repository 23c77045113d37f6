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
//! With several `--server` (replicas of one deployment behind one database
//! and bus) node `i` registers and connects at server `i % replicas`, the
//! newcomer at the first, and the delays are those to every session on every
//! replica. `--kill-replica I` then kills that replica (SIGKILL, its pid from
//! the I-th `--server-pid`) and measures how long its sessions take to get
//! their netmap from the others, moving as `overlayd` does
//! ([`failover`]).
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

mod enrolment;
mod failover;
mod http;
mod session;
mod stats;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use overlay_proto::coord::{RegisterResponse, MAX_FRAME_BYTES};

use crate::enrolment::{register_all, register_one};
use crate::session::{Shared, Upsert};
use crate::stats::{kb, mib, server_rss, servers_rss, Stats};

/// Connections one loopback source address carries before the next is used;
/// below the ~28 000 ephemeral ports of the default `ip_local_port_range`.
const CONNECTIONS_PER_SOURCE: usize = 20_000;
/// How many times a refused (rate-limited) or failed registration is retried.
pub(crate) const REGISTER_ATTEMPTS: u32 = 30;
/// No frame for this long means the server's fan-out has drained.
const QUIET: Duration = Duration::from_millis(300);
/// How often the server's memory is checked against `--max-server-rss-mib`.
const RSS_POLL: Duration = Duration::from_millis(100);

#[derive(Parser, Debug)]
#[command(about = "Load generator for overlay-coord's control sessions")]
pub(crate) struct Args {
    /// The coordination server's HTTP address; repeat (or separate with
    /// commas) for replicas of one deployment.
    #[arg(
        long = "server",
        default_value = "127.0.0.1:8080",
        value_delimiter = ','
    )]
    servers: Vec<SocketAddr>,
    /// A reusable auth key (`overlay-coord keys create --reusable`).
    #[arg(long, env = "COORD_LOAD_AUTH_KEY")]
    auth_key: String,
    /// Sessions to hold open before the measurement.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// The server's PID, to report its VmRSS; one per `--server`, in order.
    #[arg(long = "server-pid", value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// After the measurement, SIGKILL the replica at this index of `--server`
    /// and measure how long its sessions take to move to the others.
    #[arg(long, value_name = "INDEX")]
    kill_replica: Option<usize>,
    /// How long the killed replica's sessions get to move.
    #[arg(long, default_value_t = 60)]
    failover_timeout_secs: u64,
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
    let server_of = |i: usize| args.servers[i % args.servers.len()];
    let rss_start = servers_rss(&args.server_pids);
    println!(
        "coord-load: {} sessions against {:?} from {} source address(es)",
        args.nodes,
        args.servers,
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
    // With replicas, the enrolments raced across them: every name and
    // address must still be handed out once.
    let names: std::collections::HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let addrs: std::collections::HashSet<_> = nodes.iter().map(|n| n.mesh_ip).collect();
    println!(
        "  distinct names {}/{}, distinct addresses {}/{}",
        names.len(),
        nodes.len(),
        addrs.len(),
        nodes.len()
    );
    if names.len() != nodes.len() || addrs.len() != nodes.len() {
        bail!("a name or an address was handed out twice");
    }

    // 2. Connect in batches, letting each batch's netmap deltas drain.
    let shared = Arc::new(Shared::default());
    for &pid in &args.server_pids {
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
            let (server, source, node) = (server_of(i), source_of(i), node.clone());
            let (limit, shared, tx) = (limit.clone(), shared.clone(), upsert_tx.clone());
            set.spawn(async move {
                let _permit = limit.acquire().await;
                // A reset during the handshake (the server's pending-connection
                // cap, a burst of registrations still closing) gets two more tries.
                let mut attempt = 0;
                let (ws, _) = loop {
                    attempt += 1;
                    match session::connect(server, source, node.node_id, &node.credential, None)
                        .await
                    {
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
    let rss_loaded = servers_rss(&args.server_pids);
    if let Some(secs) = args.hold {
        return hold(&args, &shared, Duration::from_secs(secs), rss_loaded).await;
    }

    // 3. and 4. The newcomer.
    shared.armed.store(true, Ordering::SeqCst);
    let t_register = Instant::now();
    let newcomer = register_one(&args, source_of(args.nodes), args.nodes).await?;
    let t_connect = Instant::now();
    let (ws, netmap) = session::connect(
        args.servers[0],
        source_of(args.nodes),
        newcomer.node_id,
        &newcomer.credential,
        None,
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
    let rss_end = servers_rss(&args.server_pids);

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
    // Only the join was timed: the move's frames are counted, not parsed.
    shared.armed.store(false, Ordering::SeqCst);
    let moved = match args.kill_replica {
        Some(index) => Some(
            kill_replica(
                &args, index, &nodes, &newcomer, &sources, &shared, &upsert_tx,
            )
            .await?,
        ),
        None => None,
    };
    // One line for scripts.
    let (r, o) = (Stats::of(&register_delays), Stats::of(&online_delays));
    println!(
        "RESULT nodes={} register_s={:.2} connect_s={:.2} reg_n={} reg_p50_ms={:.1} reg_p99_ms={:.1} reg_max_ms={:.1} \
         online_n={} online_p50_ms={:.1} online_p99_ms={:.1} online_max_ms={:.1} welcome_bytes={} netmap_parts={} netmap_bytes={} \
         rss_start_kb={} rss_loaded_kb={} rss_end_kb={} hwm_kb={} closed={} replicas={}{}",
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
        closed,
        args.servers.len(),
        moved.as_ref().map_or(String::new(), |m| {
            let f = Stats::of(&m.delays);
            format!(
                " moved_expected={} moved_n={} moved_resumed={} moved_p50_ms={:.1} moved_p99_ms={:.1} moved_max_ms={:.1} \
                 moved_rss_kb={} moved_hwm_kb={}",
                m.expected,
                m.delays.len(),
                m.resumed,
                f.p50_ms,
                f.p99_ms,
                f.max_ms,
                kb(m.survivor_rss.map(|r| r.0)),
                kb(m.survivor_rss.map(|r| r.1)),
            )
        })
    );
    if let Some(m) = &moved {
        if m.delays.len() < m.expected {
            bail!(
                "only {}/{} sessions of the killed replica moved within {} s: {:?}",
                m.delays.len(),
                m.expected,
                args.failover_timeout_secs,
                &m.failures[..m.failures.len().min(3)]
            );
        }
    }
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

/// Kills replica `index` and moves its sessions (see [`failover`]). First
/// the newcomer connects again, to the replica the sessions move to, and
/// reads the whole mesh: the netmap each moving session holds is that mesh
/// less itself (the newcomer included, online).
async fn kill_replica(
    args: &Args,
    index: usize,
    nodes: &[RegisterResponse],
    newcomer: &RegisterResponse,
    sources: &[Option<IpAddr>],
    shared: &Arc<Shared>,
    upserts: &mpsc::UnboundedSender<Upsert>,
) -> anyhow::Result<failover::Moved> {
    let pid = *args
        .server_pids
        .get(index)
        .with_context(|| format!("--kill-replica {index} needs the replica's --server-pid"))?;
    let source_of = |i: usize| sources[i % sources.len()];
    wait_quiet(shared, Duration::from_secs(60)).await;
    let survivor = args.servers[(index + 1) % args.servers.len()];
    let (ws, own, mesh) = session::connect_digests(
        survivor,
        source_of(args.nodes),
        newcomer.node_id,
        &newcomer.credential,
    )
    .await
    .context("reading the mesh before the kill")?;
    tokio::spawn(session::read_loop(
        usize::MAX,
        ws,
        shared.clone(),
        upserts.clone(),
    ));
    wait_quiet(shared, Duration::from_secs(60)).await;
    let closed = shared.closed.load(Ordering::Relaxed);
    if closed > 0 {
        bail!(
            "{closed} sessions closed before the kill: {:?}",
            close_reasons(shared)
        );
    }
    let total = own.wrapping_add(overlay_proto::coord::combine_digests(
        mesh.values().copied(),
    ));
    let holds = |i: usize| {
        let id = nodes.get(i)?.node_id;
        Some(total.wrapping_sub(*mesh.get(&id)?))
    };
    let replicas = failover::Replicas {
        servers: &args.servers,
        nodes,
        source_of: &source_of,
        holds: &holds,
        concurrency: args.concurrency,
    };
    let mut moved = replicas
        .kill_and_move(
            index,
            pid,
            Duration::from_secs(args.failover_timeout_secs),
            shared,
            upserts,
        )
        .await?;
    let survivor_pid = args
        .server_pids
        .get((index + 1) % args.servers.len())
        .copied();
    moved.survivor_rss = server_rss(survivor_pid);
    println!(
        "  replica {index} ({}) killed -> {}/{} of its sessions got a netmap from another ({} resumed, {} in full): {}",
        args.servers[index],
        moved.delays.len(),
        moved.expected,
        moved.resumed,
        moved.delays.len() - moved.resumed,
        Stats::of(&moved.delays)
    );
    println!(
        "  the replica they moved to: VmRSS {}, peak VmHWM {}",
        mib(moved.survivor_rss.map(|r| r.0)),
        mib(moved.survivor_rss.map(|r| r.1)),
    );
    Ok(moved)
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
