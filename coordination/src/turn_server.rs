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

use std::net::{IpAddr, SocketAddr};
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

use crate::auth;
use crate::metrics::Metrics;
use crate::peer_policy::PeerPolicy;
use crate::store::now_unix;
use crate::stun_filter::{self, Verdict};

/// Realm of the embedded TURN server; part of the long-term credential key.
pub const REALM: &str = "overlay";

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

/// Accepts exactly the REST credentials of [`auth::turn_credential`].
struct RestAuth {
    secret: String,
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
        let password = auth::turn_password(&self.secret, username);
        Ok(generate_auth_key(username, realm, &password))
    }
}

/// A relay socket that never talks to a denied peer.
struct FilteredConn {
    inner: UdpSocket,
    policy: Arc<PeerPolicy>,
    metrics: Arc<Metrics>,
}

impl FilteredConn {
    fn deny(&self, addr: SocketAddr) -> bool {
        if self.policy.allows(addr.ip()) {
            false
        } else {
            self.metrics
                .turn_denied_peer
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %addr, "TURN relay to/from a denied address dropped");
            true
        }
    }
}

#[async_trait]
impl Conn for FilteredConn {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        if self.deny(addr) {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied).into());
        }
        Ok(self.inner.connect(addr).await?)
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.inner.recv_from(buf).await?;
            if !self.deny(from) {
                return Ok((n, from));
            }
        }
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.inner.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if self.deny(target) {
            // Dropped like a firewall would; an error would only make the
            // turn crate log and count it as a server fault.
            return Ok(buf.len());
        }
        Ok(self.inner.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.inner.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// The TURN listener socket, refusing requests that name a denied peer.
struct FilteredListener {
    inner: UdpSocket,
    policy: Arc<PeerPolicy>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl Conn for FilteredListener {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.inner.connect(addr).await?)
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.inner.recv_from(buf).await?;
            match stun_filter::inspect(&buf[..n], &self.policy) {
                Verdict::Pass => return Ok((n, from)),
                Verdict::Refuse(response) => {
                    self.metrics
                        .turn_denied_peer
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(client = %from, "TURN request for a denied peer refused");
                    let _ = self.inner.send_to(&response, from).await;
                }
                Verdict::Drop => {
                    self.metrics
                        .turn_denied_peer
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.inner.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.inner.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.inner.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Creates relay sockets on `bind_ip`, announced as `relay_ip`.
struct FilteredRelays {
    relay_ip: IpAddr,
    bind_ip: IpAddr,
    policy: Arc<PeerPolicy>,
    metrics: Arc<Metrics>,
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
        if use_ipv4 != self.bind_ip.is_ipv4() {
            return Err(turn::Error::Other(
                "requested address family is not served".into(),
            ));
        }
        let socket = UdpSocket::bind(SocketAddr::new(self.bind_ip, requested_port)).await?;
        let mut relay_addr = socket.local_addr()?;
        relay_addr.set_ip(self.relay_ip);
        let conn = FilteredConn {
            inner: socket,
            policy: Arc::clone(&self.policy),
            metrics: Arc::clone(&self.metrics),
        };
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
}

pub struct EmbeddedTurn {
    server: Server,
    local_addr: SocketAddr,
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
        let mut policy = opts.policy;
        policy.own.insert(opts.relay_ip);
        if !local_addr.ip().is_unspecified() {
            policy.own.insert(local_addr.ip());
        }
        let policy = Arc::new(policy);
        let server = Server::new(ServerConfig {
            conn_configs: vec![ConnConfig {
                conn: Arc::new(FilteredListener {
                    inner: socket,
                    policy: Arc::clone(&policy),
                    metrics: Arc::clone(&opts.metrics),
                }),
                relay_addr_generator: Box::new(FilteredRelays {
                    relay_ip: opts.relay_ip,
                    bind_ip: opts.bind.ip(),
                    policy,
                    metrics: opts.metrics,
                }),
            }],
            realm: REALM.into(),
            auth_handler: Arc::new(RestAuth {
                secret: opts.secret,
            }),
            channel_bind_timeout: Duration::from_secs(0),
            alloc_close_notify: None,
        })
        .await?;
        Ok(EmbeddedTurn { server, local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub async fn close(self) {
        if let Err(e) = self.server.close().await {
            tracing::warn!("closing the TURN server: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relay_socket_drops_datagrams_to_and_from_denied_peers() {
        let metrics = Arc::new(Metrics::default());
        let conn = FilteredConn {
            inner: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            policy: Arc::new(PeerPolicy::default()),
            metrics: Arc::clone(&metrics),
        };
        let victim = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sent = conn
            .send_to(b"x", victim.local_addr().unwrap())
            .await
            .unwrap();
        assert_eq!(sent, 1, "reported as sent, like a firewall drop");
        let mut buf = [0u8; 8];
        let got =
            tokio::time::timeout(Duration::from_millis(100), victim.recv_from(&mut buf)).await;
        assert!(got.is_err(), "nothing may arrive");

        // Inbound from loopback is dropped too: recv_from keeps waiting.
        victim
            .send_to(b"y", conn.local_addr().unwrap())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_millis(100), conn.recv_from(&mut buf)).await;
        assert!(got.is_err());
        assert_eq!(metrics.turn_denied_peer.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn rest_auth_accepts_valid_and_rejects_expired_or_malformed() {
        let auth = RestAuth {
            secret: "secret".into(),
        };
        let src: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let c = auth::turn_credential("secret", 42, now_unix(), 600);
        let key = auth.auth_handle(&c.username, REALM, src).unwrap();
        assert_eq!(key, generate_auth_key(&c.username, REALM, &c.password));
        assert!(auth.auth_handle("1000:42", REALM, src).is_err());
        assert!(auth.auth_handle("soon:42", REALM, src).is_err());
    }
}
