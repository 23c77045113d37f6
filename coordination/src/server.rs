//! `serve`: wires the store, the hub, the embedded TURN server and the HTTP
//! listener together, and takes them down again in order.
//!
//! Shutdown order: stop accepting → sessions close (they watch the same
//! signal) → wait for them → last store flush → the bus, with the sessions'
//! goodbyes → TURN server closes.
//!
//! With `--bus` this process is one replica of several sharing the database:
//! the hub is joined to the bus before the listener opens, and the store's
//! online flags are left to each replica's own sessions (no replica marks
//! everyone offline when it starts or stops).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::acme::{Acme, AcmeError};
use crate::auth::{self, SecretFileError};
use crate::cert_resolver::{self, CertResolver};
use crate::config::{Config, Transport};
use crate::dns;
use crate::http::{self, AppState};
use crate::http_server;
use crate::hub::Hub;
use crate::ice::IceSettings;
use crate::metrics::Metrics;
use crate::peer_policy::PeerPolicy;
use crate::replica_nats::{BusStartError, NatsBus};
use crate::session::SessionContext;
use crate::store::{Store, StoreError};
use crate::store_sync::StoreSync;
use crate::stun_alt::StunResponder;
use crate::tls::{self, TlsError};
use crate::turn_quota::Quotas;
use crate::turn_server::{EmbeddedTurn, TurnError, TurnOptions};

/// How long shutdown waits for sessions to say goodbye.
const SESSION_DRAIN: Duration = Duration::from_secs(5);
/// File descriptors the server needs besides one per session and one per
/// TURN allocation: the store, the UDP sockets, connections not yet sessions.
const SPARE_FILES: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TURN secret: {0}")]
    Secret(#[from] SecretFileError),
    #[error(transparent)]
    Turn(#[from] TurnError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Acme(#[from] AcmeError),
    #[error(transparent)]
    Bus(#[from] BusStartError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server task failed: {0}")]
    Task(String),
}

/// A running server.
pub struct Server {
    http_addr: SocketAddr,
    /// Where the embedded STUN/TURN listeners are bound, IPv4 first.
    turn_addrs: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Server {
    /// Where the HTTP/WebSocket listener is bound.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the embedded STUN/TURN server is bound, if it runs (its IPv4
    /// listener when it serves IPv4).
    pub fn turn_addr(&self) -> Option<SocketAddr> {
        self.turn_addrs.first().copied()
    }

    /// Every listener of the embedded STUN/TURN server, one per family.
    pub fn turn_addrs(&self) -> &[SocketAddr] {
        &self.turn_addrs
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops the server and waits until it has stopped.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.shutdown.send(true);
        self.task
            .await
            .map_err(|e| ServeError::Task(e.to_string()))?
    }
}

/// Runs `serve` until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let server = start(config).await?;
    shutdown.await;
    info!("shutting down");
    server.shutdown().await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

/// The soft limit on open files, from `/proc/self/limits` (Linux).
fn open_file_limit() -> Option<u64> {
    parse_open_file_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

fn parse_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // "Max open files   <soft>   <hard>   files"; "unlimited" means no limit.
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The STUN-only responders netcheck compares with, one per family of
/// `stun_turn` (what nodes are told of the STUN/TURN server): always that
/// server's port plus one, beside the embedded server, or, with it off,
/// beside the external one (a coturn on this host listens on the TURN port
/// itself, 3478, which a responder must leave to it). Each with the address
/// it is announced at.
async fn start_netcheck(
    listen: std::net::IpAddr,
    port: u16,
    stun_turn: &[SocketAddr],
) -> Vec<(StunResponder, SocketAddr)> {
    let mut responders = Vec::new();
    for announced in stun_turn {
        let family = crate::stun_filter::Family::of(announced.ip());
        let port = match port {
            0 => 0,
            _ => announced.port().wrapping_add(1),
        };
        let bind = SocketAddr::new(crate::turn_server::bind_ip(listen, family), port);
        match StunResponder::start(bind).await {
            Ok(r) => responders.push((r, *announced)),
            Err(e) => warn!("no second STUN port for netcheck on {bind}: {e}"),
        }
    }
    responders
}

/// Opens everything, binds the ports and starts serving in the background.
pub async fn start(config: Config) -> Result<Server, ServeError> {
    let location = config.store_location();
    let network = config.network;
    let configured6 = config.network6;
    let store = Arc::new(blocking(move || Store::open_at(&location)).await?);
    let replicated = config.bus.is_some();
    let (network6, nodes) = {
        let store = Arc::clone(&store);
        blocking(move || {
            store.check_network(network)?;
            let network6 = store.network6(configured6, crate::mesh6::generate)?;
            // A replica leaves the other replicas' nodes as they are.
            if !replicated {
                store.mark_all_offline()?;
            }
            Ok((network6, store.list_nodes()?))
        })
        .await?
    };
    info!("mesh IPv6 prefix {network6}");
    if !crate::mesh6::is_unique_local(network6) {
        warn!(
            "the mesh IPv6 prefix {network6} is not a unique local (fd00::/8) one: \
             make sure nothing else on the nodes' networks uses it"
        );
    }
    let removal_seq = {
        let store = Arc::clone(&store);
        blocking(move || store.last_removal_seq()).await?
    };
    // The counter is read before the policy, so a change racing the start
    // is applied again by the poller rather than missed.
    let (policy_seq, policy) = {
        let store = Arc::clone(&store);
        blocking(move || Ok((store.policy_seq()?, crate::store_sync::load_policy(&store)))).await?
    };
    let secret = match &config.turn.secret {
        Some(s) => s.clone(),
        // In a database, where every replica finds the same one.
        None if config.database.is_some() => {
            let store = Arc::clone(&store);
            blocking(move || store.turn_secret(auth::new_credential)).await?
        }
        None => auth::load_or_create_turn_secret(&config.state_dir)?,
    };
    // Replicas make and check enrolment challenges with one secret, so a node
    // may ask one replica and answer another.
    let challenge_secret = if config.bus.is_some() {
        let store = Arc::clone(&store);
        let stored = blocking(move || store.challenge_secret(auth::new_credential)).await?;
        Some(<sha2::Sha256 as sha2::Digest>::digest(stored.as_bytes()).into())
    } else {
        None
    };
    let metrics = Arc::new(Metrics::default());

    // Everything that can fail on bad input happens before any task starts.
    let (tls_config, acme) = match &config.transport {
        Transport::Tls { cert, key } => (Some(tls::server_config(cert, key)?), None),
        Transport::Acme(acme) => {
            let resolver = Arc::new(CertResolver::default());
            let acme = Acme::prepare(acme, &config.state_dir, Arc::clone(&resolver))?;
            let tls = cert_resolver::server_config(resolver).map_err(TlsError::from)?;
            (Some(tls), Some(acme))
        }
        Transport::PlainHttp => (None, None),
    };
    let tcp = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let http_addr = tcp.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;

    let node_count = nodes.len();
    // IPAM never hands the resolver's address out, but a store from before
    // the reservation may have: every peer would take that node's address for
    // the resolver. Moving the resolver instead would surprise every node and
    // its users, so keep it and say what to do.
    if let Some(resolver) = config.dns.as_ref().map(|d| d.resolver) {
        if let Some(n) = nodes.iter().find(|n| n.mesh_ip == resolver) {
            warn!(
                node = n.id,
                "node {} holds {resolver}, the mesh resolver's address, so its peers cannot reach it there: \
                 `overlay-coord nodes remove {}` and enrol it again for another address",
                n.name,
                n.name
            );
        }
    }
    let hub = Arc::new(Hub::with_network6(
        nodes.iter().map(|n| n.peer_info()).collect(),
        Some(network6),
        Arc::clone(&metrics),
        config.limits.clone(),
    ));
    match policy {
        Ok(Some(policy)) => {
            let stats = hub.apply_policy(Some(Arc::new(policy)), None);
            info!(classes = stats.classes, "access policy in force");
        }
        Ok(None) => {}
        Err(e) => {
            // Fail closed: a policy that was in force but cannot be read
            // (say, after a downgrade) must not open the mesh.
            hub.apply_policy(Some(Arc::new(crate::policy::Policy::default())), None);
            tracing::error!(
                "the stored access policy cannot be read, so every node is denied everything \
                 until a valid one is set (overlay-coord policy set FILE): {e}"
            );
        }
    }

    // Joined before the listener opens, so every session is announced.
    let bus = match &config.bus {
        Some(url) => Some(NatsBus::start(url, Arc::clone(&hub), Arc::clone(&store)).await?),
        None => None,
    };

    // At most one address per family; the embedded STUN/TURN server and the
    // netcheck responder serve exactly these families.
    let announced = config.announced();
    let turn = if config.turn.embedded {
        let mut own = host_addresses();
        if !config.listen.ip().is_unspecified() {
            own.insert(config.listen.ip());
        }
        let mesh = vec![ipnet::IpNet::V4(network), ipnet::IpNet::V6(network6)];
        Some(
            EmbeddedTurn::start(TurnOptions {
                listen_ip: config.listen.ip(),
                port: config.turn.port,
                relay_ips: announced.clone(),
                secret: secret.clone(),
                policy: PeerPolicy {
                    allow_private: config.turn.allow_private,
                    own,
                    mesh,
                },
                metrics: Arc::clone(&metrics),
                quotas: Quotas {
                    per_user: config.turn.allocations_per_user,
                    total: config.turn.max_allocations,
                },
                // The hub learns of removals from the store (`StoreSync`),
                // so a credential check costs a map lookup, no SQL.
                node_exists: {
                    let hub = Arc::clone(&hub);
                    Arc::new(move |node| hub.contains(node))
                },
            })
            .await?,
        )
    } else {
        None
    };
    let turn_addrs = turn
        .as_ref()
        .map(|t| t.local_addrs().to_vec())
        .unwrap_or_default();
    // What nodes are told: the embedded server's, or with it off, the
    // configured port (an external server on this host) for the netcheck
    // responder's sake.
    let stun_turn: Vec<SocketAddr> = match &turn {
        Some(t) => t.announced().to_vec(),
        None => announced
            .iter()
            .map(|ip| SocketAddr::new(*ip, config.turn.port))
            .collect(),
    };
    let stun_alt = start_netcheck(config.listen.ip(), config.turn.port, &stun_turn).await;
    let mut ice = IceSettings::new(
        turn.as_ref().map(|t| t.announced()).unwrap_or_default(),
        &secret,
        &config.turn.external,
        config.turn.ttl.as_secs(),
    );
    let netcheck: Vec<SocketAddr> = stun_alt
        .iter()
        .map(|(r, announced)| SocketAddr::new(announced.ip(), r.local_addr().port()))
        .collect();
    for addr in &netcheck {
        ice = ice.with_netcheck(*addr);
    }
    // Replicas tell each other their embedded servers; a node hears of the
    // live others' after its own replica's.
    if let Some(link) = hub.bus() {
        if let Some(t) = &turn {
            link.ice
                .set_own(crate::ice::replica_ice(t.announced(), &netcheck));
        }
        ice = ice.with_replicas(Arc::clone(&link.ice));
    }
    let ice = Arc::new(ice);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let sync = StoreSync::new(
        Arc::clone(&store),
        Arc::clone(&hub),
        removal_seq,
        policy_seq,
    );
    let state = AppState {
        store: Arc::clone(&store),
        hub: Arc::clone(&hub),
        metrics: Arc::clone(&metrics),
        store_health: sync.health(),
        session: SessionContext {
            hub: Arc::clone(&hub),
            metrics: Arc::clone(&metrics),
            ice,
            network,
            network6: Some(network6),
            dns: Utf8Bytes::from(dns::message(config.dns.as_ref())),
            limits: config.limits.clone(),
            shutdown: shutdown_rx.clone(),
            done: done_tx,
        },
        challenge_secret,
    };
    let router = http::router(state);

    if tls_config.is_some() {
        info!("listening on https://{http_addr}");
    } else {
        warn!("serving plain HTTP: node credentials and auth keys cross the network unencrypted");
        info!("listening on http://{http_addr}");
    }
    let serving = http_server::serve(
        tcp,
        router,
        tls_config,
        config.limits.clone(),
        Arc::clone(&metrics),
        shutdown_rx.clone(),
    );
    if let Some(limit) = open_file_limit() {
        let allocations = if config.turn.embedded {
            config.turn.max_allocations as u64
        } else {
            0
        };
        let wanted = config.limits.max_sessions as u64 + allocations + SPARE_FILES;
        if limit < wanted {
            warn!(
                "the open-file limit ({limit}) is below max_sessions + turn.max_allocations + {SPARE_FILES} ({wanted}): \
                 connections beyond it are refused; raise it (ulimit -n, or LimitNOFILE= in the unit)"
            );
        }
    }
    info!(
        network = %network,
        network6 = %network6,
        state_dir = %config.state_dir.display(),
        nodes = node_count,
        dns = %config.dns.as_ref().map(|d| format!("{} on {}, {} records", d.domain, d.resolver, d.records.len())).unwrap_or_else(|| "off".into()),
        stun_turn = %match &turn {
            Some(t) => t.announced().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" "),
            None => "external only".into(),
        },
        max_sessions = config.limits.max_sessions,
        bus = config.bus.as_deref().unwrap_or("in-process"),
        "overlay-coord ready"
    );

    let sync_task = tokio::spawn(sync.run(config.limits.store_poll, shutdown_rx.clone()));
    // Runs once the listener does: the TLS-ALPN-01 validator connects to it.
    let acme_task = acme.map(|acme| tokio::spawn(acme.run(shutdown_rx.clone())));
    let task = tokio::spawn(async move {
        serving.await;
        if let Some(acme) = acme_task {
            let _ = acme.await;
        }
        // Sessions saw the same signal; each holds a `done` sender.
        if tokio::time::timeout(SESSION_DRAIN, done_rx.recv())
            .await
            .is_err()
        {
            warn!("some sessions did not close within {SESSION_DRAIN:?}");
        }
        match sync_task.await {
            Ok(mut sync) => {
                if let Err(e) = sync.sync_once().await {
                    warn!("final store flush: {e}");
                }
            }
            Err(e) => warn!("store sync task failed: {e}"),
        }
        if let Some(bus) = bus {
            bus.stop().await;
        } else if let Err(e) = blocking(move || store.mark_all_offline()).await {
            warn!("marking nodes offline: {e}");
        }
        drop(stun_alt);
        if let Some(turn) = turn {
            turn.close().await;
        }
        Ok(())
    });

    Ok(Server {
        http_addr,
        turn_addrs,
        metrics,
        shutdown: shutdown_tx,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_file_limit_is_the_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95541                95541                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_file_limit(limits), Some(1024));
        assert_eq!(
            parse_open_file_limit("Max open files  unlimited  unlimited  files"),
            None
        );
        assert_eq!(parse_open_file_limit(""), None);
    }
}

/// Every address configured on this host's interfaces: a TURN relay must not
/// reach the coordinator's own services (HTTP, metrics, NATS listening on
/// `[::]`) through any of them, IPv6 hosts typically having several global
/// ones (SLAAC, privacy, a second prefix) besides the one announced. Read
/// once at start; empty (with a warning) if the kernel will not say.
fn host_addresses() -> std::collections::HashSet<std::net::IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|a| {
                let addr = a.address?;
                if let Some(v4) = addr.as_sockaddr_in() {
                    Some(std::net::IpAddr::V4(v4.ip()))
                } else {
                    addr.as_sockaddr_in6()
                        .map(|v6| std::net::IpAddr::V6(v6.ip()))
                }
            })
            .collect(),
        Err(e) => {
            warn!("cannot list this host's addresses ({e}); TURN refuses only the listen and public ones");
            Default::default()
        }
    }
}

#[cfg(test)]
mod host_address_tests {
    #[test]
    fn the_hosts_own_addresses_include_loopback() {
        let own = super::host_addresses();
        assert!(
            own.contains(&std::net::IpAddr::from([127, 0, 0, 1])),
            "{own:?}"
        );
    }
}
