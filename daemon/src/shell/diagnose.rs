//! The shell's answers to "how is my network" and "why is this peer relayed":
//! netcheck runs, NAT information shared with peers, and `overlayctl why`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlay_proto::api::{NetcheckReport, PeerAccessView, PolicyReport, WhyReport};
use overlay_proto::coord::IceConfig;
use overlay_proto::NodeId;

use super::{Query, Shell};
use crate::ice::mux::Mux;
use crate::ice::why::{self, Attempt, Evidence};
use crate::node::access::PeerAccess;

/// A finished netcheck, and what STUN saw of the shared socket: over IPv4,
/// and over IPv6 when the coordinator names an IPv6 STUN server.
pub(super) struct Netchecked {
    report: NetcheckReport,
    reflexive: [Option<SocketAddr>; 2],
}

/// Runs netcheck and the shared socket's srflx probes side by side.
pub(super) async fn netcheck(ice: IceConfig, rtt: Option<Duration>, mux: Arc<Mux>) -> Netchecked {
    use crate::ice::netcheck::{is_ipv6_server, server_addr};
    let first = |v6: bool| {
        ice.stun
            .iter()
            .filter_map(|u| server_addr(u))
            .find(|s| is_ipv6_server(s) == v6)
    };
    let probe = |server: Option<String>| {
        let mux = Arc::clone(&mux);
        async move {
            let server = tokio::net::lookup_host(server?).await.ok()?.next()?;
            mux.reflexive_addr(server).await
        }
    };
    let probe6 = first(true).filter(|_| mux.ipv6());
    let (report, v4, v6) = tokio::join!(
        crate::ice::netcheck::run(&ice, rtt),
        probe(first(false)),
        probe(probe6)
    );
    Netchecked {
        report,
        reflexive: [v4, v6],
    }
}

impl Shell {
    pub(super) fn spawn_netcheck(&mut self) {
        let ice = self.ice_config.clone();
        let rtt = self.coord_rtt();
        let tx = self.netcheck_tx.clone();
        let mux = self.mux.clone();
        tokio::spawn(async move {
            let _ = tx.send(netcheck(ice, rtt, mux).await);
        });
    }

    pub(super) fn coord_rtt(&self) -> Option<Duration> {
        match self.coord_rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Hands the node what netcheck found, and our srflx candidates unless STUN
    /// saw one of our own addresses (no NAT: it would repeat a host candidate;
    /// so an IPv6 one only where a NAT66 or prefix translation sits between).
    pub(super) fn on_netcheck(&mut self, done: Netchecked) {
        let Netchecked { report, reflexive } = done;
        let port = self.mux.port();
        let srflx = reflexive
            .into_iter()
            .flatten()
            .filter(|m| !crate::ice::mux::is_local_ip(m.ip()))
            .map(|m| crate::ice::mux::srflx_candidate(m, port));
        self.node
            .handle_netcheck(report.summary(), srflx, Instant::now());
    }

    /// Keeps what the current ICE attempt with `id` saw, for `overlayctl why`.
    pub(super) async fn snapshot(&mut self, id: NodeId) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let local = s.agent.get_local_candidates_stats().await;
        let remote = s.agent.get_remote_candidates_stats().await;
        let pairs = s.agent.get_candidate_pairs_stats().await;
        self.attempts.insert(
            id,
            (s.started, Attempt::from_stats(&local, &remote, &pairs)),
        );
    }

    pub(super) async fn on_query(&mut self, query: Query) {
        match query {
            Query::Netcheck(reply) => {
                let ice = self.ice_config.clone();
                let rtt = self.coord_rtt();
                let tx = self.netcheck_tx.clone();
                let mux = self.mux.clone();
                tokio::spawn(async move {
                    let done = netcheck(ice, rtt, mux).await;
                    let _ = reply.send(done.report.clone());
                    let _ = tx.send(done);
                });
            }
            Query::Why(target, reply) => {
                let _ = reply.send(self.why(&target).await);
            }
            Query::Policy(reply) => {
                let _ = reply.send(self.policy());
            }
        }
    }

    /// The rules this node enforces, and what they give each peer.
    fn policy(&self) -> PolicyReport {
        let peers = self
            .dataplane
            .peers()
            .iter()
            .filter_map(|p| {
                let (access, _) = p.access();
                Some((p.name(), p.mesh_ip, access_view(&access?)))
            })
            .collect();
        let (flows, flow_cap) = self.dataplane.flow_count();
        PolicyReport {
            filter: self.node.filter().cloned(),
            peers,
            flows: flows as u64,
            flow_cap: flow_cap as u64,
        }
    }

    pub(super) async fn why(&mut self, target: &str) -> Result<WhyReport, String> {
        let policy = self.node.filter().is_some();
        let not_found = || {
            if policy {
                format!(
                    "no peer named or addressed {target:?} in this node's netmap; an access \
                     policy is in force and a node sees only the peers it may reach or be \
                     reached by: an administrator can run 'overlay-coord policy explain' to see \
                     which rule would allow it"
                )
            } else {
                format!("no peer named or addressed {target:?}; see 'overlayctl peers'")
            }
        };
        let id = self.node.find_peer(target).ok_or_else(not_found)?;
        self.snapshot(id).await;
        let report = self.node.peer_report(id).ok_or_else(not_found)?;
        let now = Instant::now();
        let next_attempt = report
            .next_attempt
            .map(|t| t.saturating_duration_since(now).as_secs());
        let (age, attempt) = match self.attempts.get(&id) {
            Some((started, a)) => (Some(now.duration_since(*started).as_secs()), a.clone()),
            None => (None, Attempt::default()),
        };
        let local_nat = self.node.nat().cloned();
        let info = report.info;
        let access = self.node.access(id).map(|a| access_view(&a));
        let conclusion = why::conclude(&Evidence {
            peer: &info.name,
            online: info.online,
            coordinator_connected: self.coord_connected.load(Ordering::Relaxed),
            path_kind: report.view.kind,
            path: &report.view.label,
            checking: report.checking,
            local_nat: local_nat.as_ref(),
            remote_nat: report.remote_nat.as_ref(),
            next_attempt_in_secs: next_attempt,
        });
        Ok(WhyReport {
            peer: info.name,
            mesh_ip: info.mesh_ip,
            mesh_ip6: info.mesh_ip6,
            online: info.online,
            path_kind: report.view.kind,
            path: report.view.label,
            controlling: report.controlling,
            local_candidates: attempt.local,
            remote_candidates: attempt.remote,
            pairs: attempt.pairs,
            attempt_age_secs: age,
            local_nat,
            remote_nat: report.remote_nat,
            next_attempt_in_secs: next_attempt,
            conclusion,
            access,
        })
    }
}

/// What the policy lets through with a peer, in words.
pub(crate) fn access_view(access: &PeerAccess) -> PeerAccessView {
    PeerAccessView {
        inbound: access.inbound.to_string(),
        outbound: access.outbound.to_string(),
    }
}
