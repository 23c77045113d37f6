//! The connection a relayed ICE session hands the data plane: WireGuard to
//! the peer leaves as ChannelData on the TURN shim's socket when the
//! selected pair's local candidate is one of the shim's allocations and a
//! channel is bound; otherwise (and for everything ICE sends) it takes the
//! agent's connection as before.
//!
//! ```text
//!  IceLink ──send──▶ RelayedConn ──selected pair on a shim allocation──▶ Session::send (ChannelData)
//!     │                  └── otherwise ──▶ webrtc-ice AgentConn
//!     └──send_run──▶ TurnRoute (RunSender) ──▶ Session::send_run (ChannelData, one GSO send)
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use webrtc_ice::candidate::{Candidate, CandidateType};
use webrtc_util::Conn;

use super::turn_shim::{Session, TurnShim};
use crate::dataplane::peer::{IceConn, RunConn, RunSender};
use overlay_proto::NodeId;

/// Where a session's relayed data goes: the shim session of the selected
/// local relay candidate and the remote address, while that pair is selected.
pub struct TurnRoute {
    peer: NodeId,
    shim: Arc<TurnShim>,
    current: Mutex<Option<(Arc<Session>, SocketAddr)>>,
}

fn candidate_addr(c: &(dyn Candidate + Send + Sync)) -> Option<SocketAddr> {
    Some(SocketAddr::new(c.address().parse().ok()?, c.port()))
}

impl TurnRoute {
    pub fn new(peer: NodeId, shim: Arc<TurnShim>) -> Arc<TurnRoute> {
        Arc::new(TurnRoute {
            peer,
            shim,
            current: Mutex::new(None),
        })
    }

    /// ICE selected `local` ↔ `remote`.
    pub fn select(
        &self,
        local: &(dyn Candidate + Send + Sync),
        remote: &(dyn Candidate + Send + Sync),
    ) {
        let next = (local.candidate_type() == CandidateType::Relay)
            .then(|| candidate_addr(local))
            .flatten()
            .and_then(|relayed| self.shim.session(relayed))
            .zip(candidate_addr(remote));
        if let Some((session, remote)) = &next {
            session.set_fast(*remote, Some(self.peer));
            tracing::info!(
                peer = self.peer,
                %remote,
                "relayed data to this peer goes through the daemon's TURN socket"
            );
        }
        let old = std::mem::replace(&mut *self.lock(), next);
        if let Some((session, remote)) = old {
            if self
                .lock()
                .as_ref()
                .is_none_or(|(s, r)| !Arc::ptr_eq(s, &session) || *r != remote)
            {
                session.set_fast(remote, None);
            }
        }
    }

    /// The session ends: nothing is fast any more.
    pub fn clear(&self) {
        if let Some((session, remote)) = self.lock().take() {
            session.set_fast(remote, None);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Arc<Session>, SocketAddr)>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<(Arc<Session>, SocketAddr)> {
        self.lock().clone()
    }
}

#[async_trait]
impl RunSender for TurnRoute {
    async fn send_run(&self, datagrams: &[&[u8]]) -> bool {
        match self.current() {
            Some((session, remote)) => session.send_run(remote, datagrams).await,
            None => false,
        }
    }
}

/// The agent's connection with the shim's way out in front.
pub struct RelayedConn {
    inner: IceConn,
    route: Arc<TurnRoute>,
}

impl RelayedConn {
    /// Also offers the data plane runs through `route` ([`RunConn`]).
    pub fn wrap(inner: IceConn, route: Arc<TurnRoute>) -> IceConn {
        let runs: Arc<dyn RunSender> = route.clone();
        RunConn::wrap(Arc::new(RelayedConn { inner, route }), runs)
    }
}

#[async_trait]
impl Conn for RelayedConn {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        self.inner.connect(addr).await
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        self.inner.recv(buf).await
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        self.inner.recv_from(buf).await
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        if let Some((session, remote)) = self.route.current() {
            if session.send(remote, buf).await {
                return Ok(buf.len());
            }
        }
        self.inner.send(buf).await
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.inner.send_to(buf, target).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.remote_addr()
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.route.clear();
        self.inner.close().await
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}
