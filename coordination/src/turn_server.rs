//! The embedded STUN/TURN server (webrtc-rs `turn`): coturn-compatible REST
//! credentials, and relays that refuse denied peers.
//!
//! ```text
//!  node ──UDP 3478──▶ turn::Server ──Allocate──▶ FilteredRelays::allocate_conn
//!                                                  └─▶ FilteredConn (UDP socket)
//!                                                        send_to(denied) → dropped, counted
//!                                                        recv_from(denied) → dropped, counted
//! ```
//!
//! Denied peers are stopped twice. The turn crate has no hook on
//! CreatePermission, so [`FilteredListener`] looks at requests before the
//! server does and answers 403 Forbidden to any that names a denied peer
//! ([`stun_filter`]); and every relay socket drops datagrams to or from
//! denied peers, whatever got past the first check. Plain STUN Binding
//! requests are answered by the same server without authentication.
//!
//! The listener also enforces the allocation quotas ([`turn_quota`]), and
//! the credential check refuses nodes that no longer exist; allocations of
//! a removed node are deleted within [`REMOVED_NODE_SWEEP`].
//!
//! ChannelData on a live channel binding does not go through the turn
//! crate: the listener and the relay sockets (`turn_relay.rs`) relay it
//! themselves in `recvmmsg`/`sendmmsg` batches, from a table of bindings
//! learnt from the turn crate's own answers (`turn_channels.rs`); denied
//! peers never get a binding, since their ChannelBind is refused first.
//!
//! Address families: one listener per family the server announces an
//! address for (`--public-addr` per family), on the same port, the IPv6 one
//! IPv6-only; each is its own `ConnConfig` of the turn crate, so a client's
//! allocations live with the listener it reached. A relayed address is of the
//! family the Allocate asks for (REQUESTED-ADDRESS-FAMILY), else of the
//! client's own ([`relay::relay_family`]); a family not served is refused
//! with 440. The ChannelData fast path is family-blind: sockaddrs of either
//! family, and IPv4-mapped addresses read as IPv4 wherever they show up.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::UdpSocket;
use turn::auth::{generate_auth_key, AuthHandler};
use turn::relay::RelayAddressGenerator;
use turn::server::config::{ConnConfig, ServerConfig};
use turn::server::Server;
use webrtc_util::Conn;

#[path = "turn_batch.rs"]
mod batch;
#[path = "turn_channels.rs"]
mod channels;
#[path = "turn_relay.rs"]
mod relay;

use relay::{Admitted, AdmittedSlot, FilteredConn, FilteredListener, Table};

pub use batch::bind_udp;

use overlay_proto::NodeId;

use crate::auth;
use crate::metrics::Metrics;
use crate::peer_policy::PeerPolicy;
use crate::store::now_unix;
use crate::stun_filter::Family;
use crate::turn_quota::{AllocationQuota, Quotas};

/// Realm of the embedded TURN server; part of the long-term credential key.
pub const REALM: &str = "overlay";
/// How often allocations of removed nodes are looked for and deleted.
pub const REMOVED_NODE_SWEEP: Duration = Duration::from_secs(2);

/// Whether a node still exists (is enrolled and not removed).
pub type NodeExists = Arc<dyn Fn(NodeId) -> bool + Send + Sync>;

/// The node a REST username (`"<expiry>:<node>"`) was issued to.
pub fn turn_username_node(username: &str) -> Option<NodeId> {
    username.split_once(':')?.1.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("cannot bind the STUN/TURN port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the TURN server: {0}")]
    Start(#[from] turn::Error),
    #[error("the STUN/TURN server has no address to announce")]
    NoAddress,
}

/// Accepts exactly the REST credentials of [`auth::turn_credential`], for
/// nodes that still exist.
struct RestAuth {
    secret: String,
    node_exists: NodeExists,
    metrics: Arc<Metrics>,
}

impl AuthHandler for RestAuth {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        _src_addr: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        let expiry = auth::turn_username_expiry(username)
            .ok_or_else(|| turn::Error::Other(format!("malformed TURN username {username:?}")))?;
        if expiry < now_unix() {
            return Err(turn::Error::Other(format!(
                "expired TURN username {username:?}"
            )));
        }
        let node = turn_username_node(username)
            .ok_or_else(|| turn::Error::Other(format!("malformed TURN username {username:?}")))?;
        if !(self.node_exists)(node) {
            self.metrics
                .turn_removed_node
                .fetch_add(1, Ordering::Relaxed);
            return Err(turn::Error::Other(format!(
                "TURN username {username:?} of a removed node"
            )));
        }
        let password = auth::turn_password(&self.secret, username);
        Ok(generate_auth_key(username, realm, &password))
    }
}

/// Where the server's sockets of one family bind, and the address its
/// relayed transport addresses of that family announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FamilyAddrs {
    pub bind: IpAddr,
    pub announced: IpAddr,
}

/// The families the server serves: those it announces an address for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Families {
    v4: Option<FamilyAddrs>,
    v6: Option<FamilyAddrs>,
}

impl Families {
    /// `announced` holds at most one address per family; sockets bind
    /// `listen` where it is of their family, else that family's
    /// unspecified address.
    pub(crate) fn new(listen: IpAddr, announced: &[IpAddr]) -> Families {
        let mut families = Families::default();
        for ip in announced.iter().map(|ip| ip.to_canonical()) {
            let family = Family::of(ip);
            let addrs = Some(FamilyAddrs {
                bind: bind_ip(listen, family),
                announced: ip,
            });
            match family {
                Family::V4 if families.v4.is_none() => families.v4 = addrs,
                Family::V6 if families.v6.is_none() => families.v6 = addrs,
                _ => {}
            }
        }
        families
    }

    pub(crate) fn get(&self, family: Family) -> Option<FamilyAddrs> {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    /// The families served, IPv4 first.
    pub(crate) fn served(&self) -> Vec<Family> {
        [Family::V4, Family::V6]
            .into_iter()
            .filter(|f| self.get(*f).is_some())
            .collect()
    }
}

/// Where a socket of `family` binds when the server listens on `listen`:
/// `listen` itself when it is of that family (one address, or `0.0.0.0` /
/// `[::]`), else the family's unspecified address.
pub fn bind_ip(listen: IpAddr, family: Family) -> IpAddr {
    let listen = listen.to_canonical();
    match family {
        _ if Family::of(listen) == family => listen,
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Creates the relay sockets of one listener's allocations.
struct FilteredRelays {
    families: Families,
    policy: Arc<PeerPolicy>,
    metrics: Arc<Metrics>,
    quota: Arc<AllocationQuota>,
    /// The listener, which ChannelData to clients leaves from.
    listener: Arc<UdpSocket>,
    table: Table,
    /// The Allocate the listener handed the turn crate last.
    admitted: AdmittedSlot,
}

#[async_trait]
impl RelayAddressGenerator for FilteredRelays {
    fn validate(&self) -> Result<(), turn::Error> {
        Ok(())
    }

    /// `use_ipv4` is the turn crate's reading of REQUESTED-ADDRESS-FAMILY
    /// (IPv4 when absent); the listener read the same attribute and knows
    /// the client's family besides, so its choice is the one taken.
    async fn allocate_conn(
        &self,
        _use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        let Admitted { username, family } = self
            .admitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| turn::Error::Other("an allocation nobody asked for".into()))?;
        let addrs = self
            .families
            .get(family)
            .ok_or_else(|| turn::Error::Other("requested address family is not served".into()))?;
        let slot = self
            .quota
            .take(username)
            .map_err(|over| turn::Error::Other(format!("allocation quota reached: {over:?}")))?;
        let socket = bind_udp(SocketAddr::new(addrs.bind, requested_port))?;
        batch::grow_buffers(&socket);
        let mut relay_addr = socket.local_addr()?;
        relay_addr.set_ip(addrs.announced);
        let conn = FilteredConn::new(
            Arc::new(socket),
            relay_addr,
            Arc::clone(&self.listener),
            Arc::clone(&self.table),
            Arc::clone(&self.policy),
            Arc::clone(&self.metrics),
            Some(slot),
        );
        Ok((Arc::new(conn), relay_addr))
    }
}

pub struct TurnOptions {
    /// The IP `serve` listens on: one address, or `0.0.0.0` / `[::]`.
    pub listen_ip: IpAddr,
    /// UDP port of the listeners (0: ephemeral, the same for both
    /// families when it is free in both).
    pub port: u16,
    /// Addresses announced as relayed transport addresses, at most one per
    /// family: the server listens and relays in exactly these families.
    pub relay_ips: Vec<IpAddr>,
    pub secret: String,
    pub policy: PeerPolicy,
    pub metrics: Arc<Metrics>,
    pub quotas: Quotas,
    /// Credentials of nodes for which this is false are refused.
    pub node_exists: NodeExists,
}

pub struct EmbeddedTurn {
    server: Arc<Server>,
    /// The channel bindings relayed without the turn crate (tests look in).
    #[cfg_attr(not(test), allow(dead_code))]
    table: Table,
    /// Where each listener is bound, IPv4 first.
    local_addrs: Vec<SocketAddr>,
    /// What nodes are told for each: its family's announced address and
    /// its port.
    announced: Vec<SocketAddr>,
    sweeper: tokio::task::JoinHandle<()>,
}

impl EmbeddedTurn {
    pub async fn start(opts: TurnOptions) -> Result<EmbeddedTurn, TurnError> {
        let families = Families::new(opts.listen_ip, &opts.relay_ips);
        let served = families.served();
        if served.is_empty() {
            return Err(TurnError::NoAddress);
        }
        let mut listeners = Vec::new();
        let mut announced = Vec::new();
        for family in &served {
            let addrs = families.get(*family).ok_or(TurnError::NoAddress)?;
            let socket = bind_listener(addrs.bind, opts.port, listeners.first())?;
            batch::grow_buffers(&socket);
            let local = socket.local_addr().map_err(|source| TurnError::Bind {
                addr: SocketAddr::new(addrs.bind, opts.port),
                source,
            })?;
            announced.push(SocketAddr::new(addrs.announced, local.port()));
            listeners.push((Arc::new(socket), local));
        }
        let table = Table::default();
        let mut policy = opts.policy;
        for addr in listeners.iter().map(|(_, a)| a).chain(&announced) {
            if !addr.ip().is_unspecified() {
                policy.own.insert(addr.ip());
            }
        }
        let policy = Arc::new(policy);
        let quota = AllocationQuota::new(opts.quotas, Arc::clone(&opts.metrics));
        let conn_configs = listeners
            .iter()
            .map(|(socket, _)| {
                let admitted = AdmittedSlot::default();
                ConnConfig {
                    conn: Arc::new(FilteredListener::new(
                        Arc::clone(socket),
                        Arc::clone(&table),
                        Arc::clone(&policy),
                        Arc::clone(&opts.metrics),
                        Arc::clone(&quota),
                        Arc::clone(&admitted),
                        served.clone(),
                    )),
                    relay_addr_generator: Box::new(FilteredRelays {
                        families,
                        policy: Arc::clone(&policy),
                        metrics: Arc::clone(&opts.metrics),
                        quota: Arc::clone(&quota),
                        listener: Arc::clone(socket),
                        table: Arc::clone(&table),
                        admitted,
                    }),
                }
            })
            .collect();
        let server = Arc::new(
            Server::new(ServerConfig {
                conn_configs,
                realm: REALM.into(),
                auth_handler: Arc::new(RestAuth {
                    secret: opts.secret,
                    node_exists: Arc::clone(&opts.node_exists),
                    metrics: opts.metrics,
                }),
                channel_bind_timeout: channels::CHANNEL_LIFETIME,
                alloc_close_notify: None,
            })
            .await?,
        );
        let sweeper = tokio::spawn(sweep_removed_nodes(
            Arc::clone(&server),
            quota,
            opts.node_exists,
        ));
        Ok(EmbeddedTurn {
            server,
            table,
            local_addrs: listeners.iter().map(|(_, a)| *a).collect(),
            announced,
            sweeper,
        })
    }

    /// The first listener's address (the IPv4 one when IPv4 is served).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// Every listener's address, IPv4 first.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The STUN/TURN addresses to announce, one per family, IPv4 first.
    pub fn announced(&self) -> &[SocketAddr] {
        &self.announced
    }

    pub async fn close(self) {
        self.sweeper.abort();
        if let Err(e) = self.server.close().await {
            tracing::warn!("closing the TURN server: {e}");
        }
    }
}

/// A listener socket on `ip` and `port`; with port 0 the second family's
/// takes the first one's port when it is free, so both are announced alike.
fn bind_listener(
    ip: IpAddr,
    port: u16,
    first: Option<&(Arc<UdpSocket>, SocketAddr)>,
) -> Result<UdpSocket, TurnError> {
    let bind = |port| {
        let addr = SocketAddr::new(ip, port);
        bind_udp(addr).map_err(|source| TurnError::Bind { addr, source })
    };
    match first {
        Some((_, first)) if port == 0 => bind(first.port()).or_else(|_| bind(0)),
        _ => bind(port),
    }
}

/// Deletes the allocations of nodes that were removed. The credential check
/// already refuses their requests; this ends what they hold.
async fn sweep_removed_nodes(
    server: Arc<Server>,
    quota: Arc<AllocationQuota>,
    node_exists: NodeExists,
) {
    let mut tick = tokio::time::interval(REMOVED_NODE_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for username in quota.usernames() {
            let gone = turn_username_node(&username).is_none_or(|node| !node_exists(node));
            if gone {
                tracing::info!(username, "deleting TURN allocations of a removed node");
                if server
                    .delete_allocations_by_username(username)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "turn_server_tests.rs"]
mod tests;
