//! The engine's answers to "how is my network" and "why is this peer relayed":
//! netcheck runs, NAT information shared with peers, and `overlayctl why`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlay_proto::api::{NetcheckReport, PathKind, WhyReport};
use overlay_proto::coord::IceConfig;
use overlay_proto::signal::PeerSignal;
use overlay_proto::NodeId;

use super::{Engine, Query};
use crate::mux::Mux;
use crate::path::IceStatus;
use crate::peer::{lock, Peer};
use crate::why::{self, Attempt, Evidence};

/// A finished netcheck, and what STUN saw of the shared socket.
pub(super) struct Netchecked {
    report: NetcheckReport,
    reflexive: Option<SocketAddr>,
}

/// Runs netcheck and the shared socket's srflx probe side by side.
pub(super) async fn netcheck(ice: IceConfig, rtt: Option<Duration>, mux: Arc<Mux>) -> Netchecked {
    let server = match ice
        .stun
        .first()
        .and_then(|u| crate::netcheck::server_addr(u))
    {
        Some(server) => tokio::net::lookup_host(server)
            .await
            .ok()
            .and_then(|mut a| a.next()),
        None => None,
    };
    let probe = async {
        match server {
            Some(server) => mux.reflexive_addr(server).await,
            None => None,
        }
    };
    let (report, reflexive) = tokio::join!(crate::netcheck::run(&ice, rtt), probe);
    Netchecked { report, reflexive }
}

impl Engine {
    pub(super) fn spawn_netcheck(&mut self) {
        self.last_netcheck = Some(Instant::now());
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

    pub(super) fn on_netcheck(&mut self, done: Netchecked) {
        let Netchecked { report, reflexive } = done;
        if reflexive.is_some() && reflexive != self.reflexive {
            self.reflexive = reflexive;
            // Sessions already under way learn the candidate too.
            let sessions: Vec<_> = self
                .sessions
                .iter()
                .map(|(id, s)| (*id, s.session))
                .collect();
            for (id, session) in sessions {
                if let Some(peer) = self.dataplane.peer(id) {
                    self.send_reflexive(&peer, session);
                }
            }
        }
        let nat = report.summary();
        tracing::info!(
            "netcheck: udp {}, public address {}, mapping {:?}",
            if nat.udp { "works" } else { "blocked" },
            nat.public_addr
                .map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            nat.mapping
        );
        self.nat = Some(nat);
        for peer in self.dataplane.peers() {
            if lock(&peer.info).online {
                self.send_nat(&peer);
            }
        }
    }

    /// Signals our srflx candidate for `session` (webrtc-ice gathers none on a mux).
    pub(super) fn send_reflexive(&mut self, peer: &Peer, session: u64) {
        if let Some(mapped) = self.reflexive.filter(|m| !crate::mux::is_local_ip(m.ip())) {
            let candidate = crate::mux::srflx_candidate(mapped, self.mux.port());
            self.send_signal(peer, PeerSignal::Candidate { session, candidate });
        }
    }

    pub(super) fn send_nat(&mut self, peer: &Peer) {
        if let Some(nat) = self.nat.clone() {
            self.send_signal(peer, PeerSignal::NetInfo { nat });
        }
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
        }
    }

    pub(super) async fn why(&mut self, target: &str) -> Result<WhyReport, String> {
        let peer = match target.parse::<std::net::Ipv4Addr>() {
            Ok(ip) => self.dataplane.peer_by_ip(ip),
            Err(_) => self
                .dataplane
                .peers()
                .into_iter()
                .find(|p| p.name() == target),
        }
        .ok_or_else(|| format!("no peer named or addressed {target:?}; see 'overlayctl peers'"))?;
        self.snapshot(peer.id).await;
        let now = Instant::now();
        let info = lock(&peer.info).clone();
        let (path_kind, path, checking, next_attempt) = {
            let path = lock(&peer.path);
            let (kind, label) = match (path.selected(), peer.active_conn().is_some()) {
                (Some(pair), true) => (pair.kind(), pair.label()),
                _ if info.online => (PathKind::CoordRelay, "coord relay".to_owned()),
                _ => (PathKind::Connecting, "connecting".to_owned()),
            };
            let checking = matches!(path.status(), IceStatus::Checking { .. });
            // A retry is scheduled only once a session failed (or none ran yet);
            // a disconnected pair may still recover by itself.
            let scheduled = matches!(path.status(), IceStatus::Failed | IceStatus::Idle);
            let next = (kind != PathKind::Direct && info.online && scheduled)
                .then(|| path.next_attempt().saturating_duration_since(now).as_secs());
            (kind, label, checking, next)
        };
        let (age, attempt) = match self.attempts.get(&peer.id) {
            Some((started, a)) => (Some(now.duration_since(*started).as_secs()), a.clone()),
            None => (None, Attempt::default()),
        };
        let local_nat = self.nat.clone();
        let remote_nat = self.remote_nat.get(&peer.id).cloned();
        let conclusion = why::conclude(&Evidence {
            peer: &info.name,
            online: info.online,
            coordinator_connected: self.coord_connected.load(Ordering::Relaxed),
            path_kind,
            path: &path,
            checking,
            local_nat: local_nat.as_ref(),
            remote_nat: remote_nat.as_ref(),
            next_attempt_in_secs: next_attempt,
        });
        Ok(WhyReport {
            peer: info.name,
            mesh_ip: info.mesh_ip,
            online: info.online,
            path_kind,
            path,
            controlling: peer.controlling,
            local_candidates: attempt.local,
            remote_candidates: attempt.remote,
            pairs: attempt.pairs,
            attempt_age_secs: age,
            local_nat,
            remote_nat,
            next_attempt_in_secs: next_attempt,
            conclusion,
        })
    }
}
