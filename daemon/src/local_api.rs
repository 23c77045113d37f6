//! The daemon's local API: `overlayctl` on a Unix socket (0660, root's), one JSON
//! request line in, one or more JSON response lines out.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlay_proto::api::{
    DnsStatus, PeerStatus, PingReply, PingSummary, Request, Response, Status,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dataplane::peer::Peer;
use crate::dataplane::{DataPlane, BUF_SIZE};
use crate::dns::{self, Zone};
use crate::metrics;
use crate::shell::Query;

/// Longest request line accepted; requests are tiny.
pub const MAX_REQUEST: usize = 4096;
/// At most this many pings per request, so one command cannot run forever.
const MAX_PING_COUNT: u32 = 10_000;

/// What `status` reports about this node: `fixed` holds what does not change
/// while the daemon runs; the rest is filled in when asked.
pub struct NodeInfo {
    pub fixed: Status,
    pub started: Instant,
    pub coord_connected: Arc<AtomicBool>,
    /// The replica the control connection is (or was last) on.
    pub coord_url: Arc<std::sync::Mutex<String>>,
}

pub struct LocalApi {
    pub node: NodeInfo,
    pub dataplane: Arc<DataPlane>,
    pub host_dns: Arc<crate::host_dns::HostDns>,
    pub queries: mpsc::Sender<Query>,
    pub shutdown: watch::Sender<bool>,
}

/// Binds the socket, replacing a stale file from a daemon that died, but never
/// one a running daemon still answers on.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another overlayd is running on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Removes the socket file when the daemon stops.
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl LocalApi {
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let api = self.clone();
                        tokio::spawn(async move { api.handle(stream).await });
                    }
                    Err(e) => tracing::warn!("local API accept: {e}"),
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn handle(&self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
        if reader.read_line(&mut line).await.is_err() {
            return;
        }
        let request = match parse_request(&line) {
            Ok(r) => r,
            Err(e) => {
                let _ = send(
                    &mut write,
                    &Response::Error {
                        message: format!("bad request: {e}"),
                    },
                )
                .await;
                return;
            }
        };
        match request {
            Request::Status => {
                let _ = send(&mut write, &Response::Status(Box::new(self.status()))).await;
            }
            Request::Peers => {
                let zone = self.dataplane.resolver.zone();
                let peers = self
                    .dataplane
                    .peers()
                    .iter()
                    .map(|p| peer_status(p, zone.as_deref()))
                    .collect();
                let _ = send(&mut write, &Response::Peers { peers }).await;
            }
            Request::Ping {
                target,
                count,
                interval_ms,
                timeout_ms,
            } => {
                self.ping(&mut write, &target, count, interval_ms, timeout_ms)
                    .await;
            }
            Request::Netcheck => {
                let (tx, rx) = oneshot::channel();
                let response = match self.queries.send(Query::Netcheck(tx)).await {
                    Ok(()) => match rx.await {
                        Ok(report) => Response::Netcheck(report),
                        Err(_) => stopping(),
                    },
                    Err(_) => stopping(),
                };
                let _ = send(&mut write, &response).await;
            }
            Request::Why { peer } => {
                let (tx, rx) = oneshot::channel();
                let response = match self.queries.send(Query::Why(peer, tx)).await {
                    Ok(()) => match rx.await {
                        Ok(Ok(report)) => Response::Why(Box::new(report)),
                        Ok(Err(message)) => Response::Error { message },
                        Err(_) => stopping(),
                    },
                    Err(_) => stopping(),
                };
                let _ = send(&mut write, &response).await;
            }
            Request::Policy => {
                let (tx, rx) = oneshot::channel();
                let response = match self.queries.send(Query::Policy(tx)).await {
                    Ok(()) => match rx.await {
                        Ok(report) => Response::Policy(Box::new(report)),
                        Err(_) => stopping(),
                    },
                    Err(_) => stopping(),
                };
                let _ = send(&mut write, &response).await;
            }
            Request::DnsQuery { name, kind } => {
                let response = self.dns_query(&name, kind.as_deref()).await;
                let _ = send(&mut write, &response).await;
            }
            Request::Metrics => {
                let text = self.metrics();
                let _ = send(&mut write, &Response::Metrics { text }).await;
            }
            Request::Down => {
                tracing::info!("stop requested by overlayctl");
                let _ = send(&mut write, &Response::Ok).await;
                let _ = self.shutdown.send(true);
            }
        }
    }

    fn status(&self) -> Status {
        let n = &self.node;
        let coordinator = n
            .coord_url
            .lock()
            .map_or_else(|_| n.fixed.coordinator.clone(), |url| url.clone());
        // What the TUN has: the mesh's IPv6 may come with a later Welcome,
        // or be refused by the host.
        let mesh6 = self.dataplane.mesh6();
        Status {
            coordinator,
            coordinator_connected: n.coord_connected.load(Ordering::Relaxed),
            uptime_secs: n.started.elapsed().as_secs(),
            dropped: self.dataplane.drops.snapshot(),
            dns: self.dns_status(),
            mesh_ip6: mesh6.map(|m| m.addr),
            network6: mesh6.map(|m| m.network),
            ..n.fixed.clone()
        }
    }

    fn dns_status(&self) -> Option<DnsStatus> {
        let resolver = &self.dataplane.resolver;
        let zone = resolver.zone()?;
        let c = &resolver.counters;
        Some(DnsStatus {
            domain: zone.domain.clone(),
            resolver: zone.resolver,
            resolver6: zone.resolver6,
            mode: self.host_dns.mode().as_str().to_owned(),
            host: self.host_dns.describe(),
            upstreams: resolver
                .upstreams()
                .iter()
                .map(|a| a.ip().to_string())
                .collect(),
            names: zone.len() as u64,
            answered: c.answered.load(Ordering::Relaxed),
            forwarded: c.forwarded.load(Ordering::Relaxed),
            bad: c.bad.load(Ordering::Relaxed),
        })
    }

    /// `overlayctl dns query`: asks this node's resolver directly.
    async fn dns_query(&self, name: &str, kind: Option<&str>) -> Response {
        let error = |message: String| Response::Error { message };
        if self.dataplane.resolver.zone().is_none() {
            return error("the mesh has no DNS yet (no settings from the coordinator)".into());
        }
        let query = match dns::lookup::build(name, kind) {
            Ok(q) => q,
            Err(e) => return error(e),
        };
        let Some(answer) = self.dataplane.resolver.ask(&query).await else {
            return error(format!(
                "no answer for {name:?} (refused, or no upstream answered)"
            ));
        };
        match dns::lookup::read(&answer) {
            Ok((rcode, answers)) => Response::DnsAnswer { rcode, answers },
            Err(e) => error(e),
        }
    }

    /// The Prometheus text `overlayctl metrics` and `--metrics-listen` show.
    pub fn metrics(&self) -> String {
        let status = self.status();
        let zone = self.dataplane.resolver.zone();
        let mut snapshot = metrics::Snapshot {
            version: status.version,
            uptime_secs: status.uptime_secs,
            coordinator_connected: status.coordinator_connected,
            dropped: status.dropped,
            peers: self
                .dataplane
                .peers()
                .iter()
                .map(|p| peer_status(p, zone.as_deref()))
                .collect(),
            ..Default::default()
        };
        self.dataplane.counters.fill(&mut snapshot);
        metrics::render(&snapshot)
    }

    /// The peer `target` names and the address to ping it on: the address
    /// given (IPv4 or IPv6), or for a name its mesh IPv4 address.
    fn find(&self, target: &str) -> Option<(Arc<Peer>, IpAddr)> {
        if let Ok(ip) = target.parse::<IpAddr>() {
            return self.dataplane.peer_by_ip(ip).map(|p| (p, ip));
        }
        self.dataplane
            .peers()
            .into_iter()
            .find(|p| p.name() == target)
            .map(|p| {
                let ip = p.mesh_ip.into();
                (p, ip)
            })
    }

    /// Our own mesh address in `target`'s family, to ping from.
    fn source_for(&self, target: IpAddr) -> Result<IpAddr, String> {
        match target {
            IpAddr::V4(_) => Ok(self.node.fixed.mesh_ip.into()),
            IpAddr::V6(_) => self
                .dataplane
                .mesh6()
                .map(|m| m.addr.into())
                .ok_or_else(|| {
                    "this node has no mesh IPv6 address (the mesh has no IPv6 prefix, \
                 or IPv6 is off on this host); ping the IPv4 address"
                        .to_owned()
                }),
        }
    }

    async fn ping(
        &self,
        write: &mut tokio::net::unix::OwnedWriteHalf,
        target: &str,
        count: u32,
        interval_ms: u64,
        timeout_ms: u64,
    ) {
        let Some((peer, dst)) = self.find(target) else {
            let message = format!("no peer named or addressed {target:?}; see 'overlayctl peers'");
            let _ = send(write, &Response::Error { message }).await;
            return;
        };
        let src = match self.source_for(dst) {
            Ok(src) => src,
            Err(message) => {
                let _ = send(write, &Response::Error { message }).await;
                return;
            }
        };
        let ident: u16 = rand::random();
        let count = count.clamp(1, MAX_PING_COUNT);
        let timeout = Duration::from_millis(timeout_ms.clamp(10, 60_000));
        let interval = Duration::from_millis(interval_ms.clamp(10, 60_000));
        let mut out = vec![0u8; BUF_SIZE];
        let mut received = 0;
        for i in 0..count {
            let seq = (i % u32::from(u16::MAX)) as u16 + 1;
            let started = Instant::now();
            let waiter = self.dataplane.expect_ping(dst, ident, seq);
            let request = echo_request(src, dst, ident, seq, b"overlayctl ping");
            let path = peer.path().label;
            if let Some(request) = request {
                self.dataplane.send_packet(&peer, &request, &mut out).await;
            }
            if let Ok(Ok(())) = tokio::time::timeout(timeout, waiter).await {
                received += 1;
                let reply = PingReply {
                    seq,
                    from: dst,
                    rtt_ms: started.elapsed().as_secs_f64() * 1000.0,
                    path,
                };
                if send(write, &Response::PingReply(reply)).await.is_err() {
                    self.dataplane.forget_ping(dst, ident, seq);
                    return; // the user went away
                }
            } else {
                self.dataplane.forget_ping(dst, ident, seq);
            }
            if i + 1 < count {
                tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
            }
        }
        let summary = PingSummary {
            target: dst,
            sent: count,
            received,
        };
        let _ = send(write, &Response::PingDone(summary)).await;
    }
}

/// An echo request from `src` to `dst`: ICMP for IPv4, ICMPv6 for IPv6;
/// `None` when the families differ.
fn echo_request(src: IpAddr, dst: IpAddr, ident: u16, seq: u16, payload: &[u8]) -> Option<Vec<u8>> {
    use crate::dataplane::{icmp, icmp6};
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some(icmp::echo_request(s, d, ident, seq, payload)),
        (IpAddr::V6(s), IpAddr::V6(d)) => Some(icmp6::echo_request(s, d, ident, seq, payload)),
        _ => None,
    }
}

/// Parses one request line from `overlayctl`.
pub fn parse_request(line: &str) -> Result<Request, serde_json::Error> {
    serde_json::from_str(line)
}

fn stopping() -> Response {
    Response::Error {
        message: "overlayd is stopping".into(),
    }
}

fn peer_status(peer: &Peer, zone: Option<&Zone>) -> PeerStatus {
    let info = peer.info();
    let view = peer.path();
    let last_handshake_secs = peer.since_last_handshake().map(|d| d.as_secs());
    let (access, flows) = peer.access();
    let dns_name = zone.map(|z| format!("{}.", z.fqdn(&info.name)));
    PeerStatus {
        id: info.id,
        name: info.name,
        mesh_ip: info.mesh_ip,
        mesh_ip6: info.mesh_ip6,
        public_key: info.public_key,
        online: info.online,
        path_kind: view.kind,
        path: view.label,
        endpoint: view.remote,
        local_endpoint: view.local,
        last_handshake_secs,
        rx_bytes: peer.rx_bytes.load(Ordering::Relaxed),
        tx_bytes: peer.tx_bytes.load(Ordering::Relaxed),
        rx_packets: peer.rx_packets.load(Ordering::Relaxed),
        tx_packets: peer.tx_packets.load(Ordering::Relaxed),
        access: access.as_ref().map(crate::shell::access_view),
        dropped_policy: peer.dropped_policy.load(Ordering::Relaxed),
        dropped_policy_out: peer.dropped_policy_out.load(Ordering::Relaxed),
        flows: flows as u64,
        dns_name,
    }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).unwrap_or_default();
    line.push(b'\n');
    write.write_all(&line).await
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_ping_to_an_ipv6_address_is_icmpv6_echo() {
        let (a6, b6): (IpAddr, IpAddr) = (
            "fd7a:115c:a1e0::6440:1".parse().unwrap(),
            "fd7a:115c:a1e0::6440:2".parse().unwrap(),
        );
        let p = echo_request(a6, b6, 3, 4, b"x").unwrap();
        assert_eq!((p[0] >> 4, p[6], p[40]), (6, 58, 128));
        let (a4, b4): (IpAddr, IpAddr) =
            ("100.64.0.1".parse().unwrap(), "100.64.0.2".parse().unwrap());
        let p = echo_request(a4, b4, 3, 4, b"x").unwrap();
        assert_eq!((p[0] >> 4, p[9], p[20]), (4, 1, 8));
        assert_eq!(echo_request(a4, b6, 3, 4, b"x"), None);
    }

    #[tokio::test]
    async fn socket_is_closed_to_other_users() {
        let dir = std::env::temp_dir().join(format!("ovl-api-{}", std::process::id()));
        let path = dir.join("overlayd.sock");
        let _listener = bind(&path).await.expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        let _ = std::fs::remove_dir_all(&dir);
        // Owner and group may connect; others (no write bit) may not.
        assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
    }
}
