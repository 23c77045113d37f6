//! The ICE side of the node: signals from peers, and what agents report.
//!
//! ```text
//!   controlling (smaller key)                     controlled
//!   poll → StartIce ─ ice_created → Offer ──────▶ handle_signal → StartIce
//!                                                 ice_created → Answer, ConnectIce
//!   handle_signal(Answer) → ConnectIce ◀───────── Answer
//!   Candidate ◀──────────── each side's agent ──────────▶ Candidate
//! ```
//!
//! Every signal and event names its session; one from another session than the
//! current one is stale and changes nothing.

use std::time::Instant;

use overlay_proto::signal::{PeerSignal, SealedSignal};
use overlay_proto::NodeId;

use super::path::CandidateKind;
use super::signaling::Refused;
use super::{Dropped, IceInput, Node, Output, Session};

impl Node {
    /// A sealed signal that opened with `from`'s key (see `seal.rs`).
    pub fn handle_signal(&mut self, from: NodeId, sealed: SealedSignal, now: Instant) {
        let Some(entry) = self.peers.get(&from) else {
            return;
        };
        let controlling = entry.controlling;
        let current = entry.session.as_ref().map(|s| s.id);
        let signal = match self.signaling.incoming(from, sealed, now) {
            Ok(signal) => signal,
            Err(refused) => {
                tracing::debug!(peer = from, "dropping signal: {refused:?}");
                self.outputs.push_back(Output::Dropped(match refused {
                    Refused::Misdirected => Dropped::Misdirected,
                    Refused::Replayed => Dropped::Replayed,
                    Refused::Malformed => Dropped::Malformed,
                }));
                return;
            }
        };
        let new_session = match &signal {
            PeerSignal::Offer { session, .. } => !controlling && current != Some(*session),
            PeerSignal::RestartRequest { .. } => controlling,
            _ => false,
        };
        if new_session && !self.signaling.allow_session(from, now) {
            tracing::debug!(peer = from, "dropping offer: too many new ICE sessions");
            self.outputs
                .push_back(Output::Dropped(Dropped::ExcessOffer));
            return;
        }
        if matches!(signal, PeerSignal::Offer { .. }) && !controlling {
            // The controlling peer wants a path: that ends our idle spell.
            self.wake(from, now);
        }
        match signal {
            PeerSignal::Offer { session, .. } if current == Some(session) => {
                // A repeated offer: the session it opens is already under way.
            }
            PeerSignal::Offer {
                session,
                ufrag,
                pwd,
                direct_only,
            } if !controlling => {
                self.end_session(from);
                if let Some(entry) = self.peers.get_mut(&from) {
                    entry.session = Some(Session::new(session, Some((ufrag, pwd)), direct_only));
                }
                self.outputs.push_back(Output::StartIce {
                    peer: from,
                    session,
                    controlling: false,
                    direct_only,
                });
            }
            PeerSignal::Answer {
                session,
                ufrag,
                pwd,
            } if controlling => self.connect(from, session, ufrag, pwd),
            PeerSignal::Candidate { session, candidate } => {
                let Some(s) = self.current_session(from, session) else {
                    return;
                };
                if s.created {
                    self.outputs.push_back(Output::AddRemoteCandidate {
                        peer: from,
                        session,
                        candidate,
                    });
                }
            }
            PeerSignal::NetInfo { nat } => {
                if let Some(entry) = self.peers.get_mut(&from) {
                    entry.remote_nat = Some(nat);
                }
            }
            PeerSignal::RestartRequest { reason } => {
                // An idle node ignores requests: the peer's data would wake it.
                let start = self
                    .peers
                    .get_mut(&from)
                    .is_some_and(|e| !e.activity.is_idle() && e.path.on_restart_request(now));
                if start {
                    tracing::debug!(peer = from, "peer asked for a new ICE session: {reason:?}");
                    self.start_session(from, false);
                    self.sync_path(from);
                }
            }
            other => tracing::debug!(peer = from, "ignoring signal for the other role: {other:?}"),
        }
    }

    fn current_session(&mut self, peer: NodeId, session: u64) -> Option<&mut Session> {
        self.peers
            .get_mut(&peer)?
            .session
            .as_mut()
            .filter(|s| s.id == session)
    }

    /// Starts checks in `session` against the remote credentials, once.
    fn connect(&mut self, peer: NodeId, session: u64, ufrag: String, pwd: String) {
        let Some(entry) = self.peers.get_mut(&peer) else {
            return;
        };
        let controlling = entry.controlling;
        let Some(s) = entry.session.as_mut().filter(|s| s.id == session) else {
            return;
        };
        if !s.created || s.connecting {
            return;
        }
        s.connecting = true;
        self.outputs.push_back(Output::ConnectIce {
            peer,
            session,
            controlling,
            ufrag,
            pwd,
        });
    }

    /// The agent for `session` exists: its credentials go out (an offer, or the
    /// answer and the start of checks).
    pub fn ice_created(
        &mut self,
        peer: NodeId,
        session: u64,
        ufrag: String,
        pwd: String,
        now: Instant,
    ) {
        let Some(entry) = self.peers.get_mut(&peer) else {
            return;
        };
        let controlling = entry.controlling;
        let Some(s) = entry.session.as_mut().filter(|s| s.id == session) else {
            return;
        };
        s.created = true;
        let offer = s.offer.take();
        let direct_only = s.direct_only;
        if controlling {
            self.send_signal(
                peer,
                PeerSignal::Offer {
                    session,
                    ufrag,
                    pwd,
                    direct_only,
                },
                now,
            );
            tracing::debug!(peer, session, "ICE offer sent");
            self.send_reflexive(peer, session, now);
            return;
        }
        self.send_signal(
            peer,
            PeerSignal::Answer {
                session,
                ufrag,
                pwd,
            },
            now,
        );
        self.send_reflexive(peer, session, now);
        if let Some((ufrag, pwd)) = offer {
            self.connect(peer, session, ufrag, pwd);
        }
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.path.session_started(now);
        }
        self.sync_path(peer);
    }

    /// No agent could be created for `session`.
    pub fn ice_create_failed(&mut self, peer: NodeId, session: u64, now: Instant) {
        let jitter = self.rng.unit();
        let Some(entry) = self.peers.get_mut(&peer) else {
            return;
        };
        if entry.session.as_ref().is_none_or(|s| s.id != session) {
            return;
        }
        entry.session = None;
        if entry.controlling {
            entry.path.on_failed(now, jitter);
        }
    }

    /// The agent took a signalled candidate at `addr` of `kind`.
    pub fn remote_candidate_added(
        &mut self,
        peer: NodeId,
        session: u64,
        addr: String,
        kind: CandidateKind,
    ) {
        let Some(s) = self.current_session(peer, session) else {
            return;
        };
        s.signalled.push((addr.clone(), kind));
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.path.learn_remote(&addr, kind);
        }
        self.sync_path(peer);
    }

    /// What the agent of `session` with `peer` reported.
    pub fn handle_ice(&mut self, peer: NodeId, session: u64, input: IceInput, now: Instant) {
        if self.current_session(peer, session).is_none() {
            return; // a stale session's late news
        }
        let jitter = self.rng.unit();
        let failed = match input {
            IceInput::Candidate(candidate) => {
                self.send_signal(peer, PeerSignal::Candidate { session, candidate }, now);
                false
            }
            IceInput::Selected(pair) => {
                let Some(entry) = self.peers.get_mut(&peer) else {
                    return;
                };
                entry.path.on_selected(pair);
                if let Some(s) = &entry.session {
                    for (addr, kind) in &s.signalled {
                        entry.path.learn_remote(addr, *kind);
                    }
                }
                false
            }
            IceInput::DirectSeen => {
                if let Some(entry) = self.peers.get_mut(&peer) {
                    entry.path.on_direct_seen();
                }
                false
            }
            IceInput::Ready => {
                let Some(entry) = self.peers.get_mut(&peer) else {
                    return;
                };
                if let Some(s) = entry.session.as_mut() {
                    s.ready = true;
                }
                entry.path.on_connected();
                false
            }
            IceInput::Connected => {
                let Some(entry) = self.peers.get_mut(&peer) else {
                    return;
                };
                if entry.session.as_ref().is_some_and(|s| s.ready) {
                    entry.path.on_connected();
                }
                false
            }
            IceInput::Disconnected => {
                if let Some(entry) = self.peers.get_mut(&peer) {
                    entry.path.on_disconnected();
                }
                false
            }
            IceInput::Failed => true,
            IceInput::Error(error) => {
                tracing::debug!(peer, "ICE session ended: {error}");
                true
            }
        };
        if failed {
            if let Some(entry) = self.peers.get_mut(&peer) {
                entry.path.on_failed(now, jitter);
            }
            self.outputs
                .push_back(Output::RecordAttempt { peer, session });
            self.end_session(peer);
        }
        self.sync_path(peer);
    }
}
