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
//! Address families: on a dual-stack `[::]` listener an IPv4 client shows
//! up as `::ffff:a.b.c.d`. The listener hands the turn crate the plain IPv4
//! address (so XOR-MAPPED-ADDRESS says IPv4), and each relay socket is of
//! the family of its allocation, whatever the listener's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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

use relay::{FilteredConn, FilteredListener, Table};

use overlay_proto::NodeId;

use crate::auth;
use crate::metrics::Metrics;
use crate::peer_policy::PeerPolicy;
use crate::store::now_unix;
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

/// Creates relay sockets on `bind_ip`, announced as `relay_ip`.
struct FilteredRelays {
    relay_ip: IpAddr,
    bind_ip: IpAddr,
    policy: Arc<PeerPolicy>,
    metrics: Arc<Metrics>,
    quota: Arc<AllocationQuota>,
    /// The listener, which ChannelData to clients leaves from.
    listener: Arc<UdpSocket>,
    table: Table,
}

impl FilteredRelays {
    /// Where a relay socket of the given family binds and what it
    /// announces; `None` when this server has no such address. A `[::]`
    /// listener serves IPv4 allocations from `0.0.0.0`.
    fn addresses(&self, ipv4: bool) -> Option<(IpAddr, IpAddr)> {
        let bind = match self.bind_ip.to_canonical() {
            IpAddr::V6(v6) if ipv4 && v6.is_unspecified() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ip if ip.is_ipv4() == ipv4 => ip,
            _ => return None,
        };
        let announced = self.relay_ip.to_canonical();
        (announced.is_ipv4() == ipv4).then_some((bind, announced))
    }
}

#[async_trait]
impl RelayAddressGenerator for FilteredRelays {
    fn validate(&self) -> Result<(), turn::Error> {
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        let (bind_ip, relay_ip) = self
            .addresses(use_ipv4)
            .ok_or_else(|| turn::Error::Other("requested address family is not served".into()))?;
        let slot = self
            .quota
            .take()
            .map_err(|over| turn::Error::Other(format!("allocation quota reached: {over:?}")))?;
        let socket = UdpSocket::bind(SocketAddr::new(bind_ip, requested_port)).await?;
        batch::grow_buffers(&socket);
        let mut relay_addr = socket.local_addr()?;
        relay_addr.set_ip(relay_ip);
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
    /// UDP address of the STUN/TURN listener (port 0: ephemeral).
    pub bind: SocketAddr,
    /// Address announced as the relayed transport address.
    pub relay_ip: IpAddr,
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
    local_addr: SocketAddr,
    sweeper: tokio::task::JoinHandle<()>,
}

impl EmbeddedTurn {
    pub async fn start(opts: TurnOptions) -> Result<EmbeddedTurn, TurnError> {
        let socket = UdpSocket::bind(opts.bind)
            .await
            .map_err(|source| TurnError::Bind {
                addr: opts.bind,
                source,
            })?;
        let local_addr = socket.local_addr().map_err(|source| TurnError::Bind {
            addr: opts.bind,
            source,
        })?;
        batch::grow_buffers(&socket);
        let socket = Arc::new(socket);
        let table = Table::default();
        let mut policy = opts.policy;
        policy.own.insert(opts.relay_ip);
        if !local_addr.ip().is_unspecified() {
            policy.own.insert(local_addr.ip());
        }
        let policy = Arc::new(policy);
        let quota = AllocationQuota::new(opts.quotas, Arc::clone(&opts.metrics));
        let server = Arc::new(
            Server::new(ServerConfig {
                conn_configs: vec![ConnConfig {
                    conn: Arc::new(FilteredListener::new(
                        Arc::clone(&socket),
                        Arc::clone(&table),
                        Arc::clone(&policy),
                        Arc::clone(&opts.metrics),
                        Arc::clone(&quota),
                    )),
                    relay_addr_generator: Box::new(FilteredRelays {
                        relay_ip: opts.relay_ip,
                        bind_ip: opts.bind.ip(),
                        policy,
                        metrics: Arc::clone(&opts.metrics),
                        quota: Arc::clone(&quota),
                        listener: socket,
                        table: Arc::clone(&table),
                    }),
                }],
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
            local_addr,
            sweeper,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub async fn close(self) {
        self.sweeper.abort();
        if let Err(e) = self.server.close().await {
            tracing::warn!("closing the TURN server: {e}");
        }
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
