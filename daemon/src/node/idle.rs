//! Lazy peers: a peer that exchanged no data packets with us for the idle
//! timeout keeps its netmap entry and its WireGuard session, but loses its
//! ICE session (so no consent checks) and its keepalives, so that an idle
//! mesh costs nothing per peer.
//!
//! ```text
//!             no data either way for idle_timeout
//!   awake ──────────────────────────────────────────▶ idle
//!     ▲      CloseIce, Output::Idle(true), route "idle"  │ (packets: coordination relay)
//!     │                                                 │
//!     └──────── data either way (peer_activity) ────────┘
//!               or the peer's ICE offer (controlled side)
//!      Output::Idle(false); the controlling side starts a session at once,
//!      the relay carries packets until ICE is connected
//! ```
//!
//! Keepalives and handshakes are not activity: only data packets are, as the
//! data plane counts them and the shell reports them ([`Node::peer_activity`]).
//! Only the side whose timer ran out stops its checks; an idle controlling node
//! ignores the peer's restart requests (its data would have woken us), so a
//! peer with a longer timeout cannot keep it awake by asking.

use std::time::{Duration, Instant};

use overlay_proto::NodeId;

use super::{Node, Output};

/// How long a peer may go without data packets before it turns idle, unless
/// the configuration says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// When a peer last moved data, and whether it is idle.
#[derive(Debug)]
pub struct Activity {
    last: Instant,
    idle: bool,
}

impl Activity {
    /// A peer that joins is idle when laziness is on (`idle`): it wakes on its
    /// first packet like any idle peer. Otherwise it counts as active.
    pub fn new(now: Instant, idle: bool) -> Self {
        Activity { last: now, idle }
    }

    pub fn is_idle(&self) -> bool {
        self.idle
    }

    /// Data moved at `now` (or the peer offered a session). True when this
    /// ends an idle spell.
    pub fn seen(&mut self, now: Instant) -> bool {
        self.last = self.last.max(now);
        std::mem::replace(&mut self.idle, false)
    }

    /// Whether the peer turns idle at `now`: true once per idle spell.
    /// `timeout` `None`: laziness is off.
    pub fn goes_idle(&mut self, now: Instant, timeout: Option<Duration>) -> bool {
        let Some(timeout) = timeout else {
            return false;
        };
        if self.idle || now.saturating_duration_since(self.last) < timeout {
            return false;
        }
        self.idle = true;
        true
    }
}

impl Node {
    /// How long a peer may go without data before it turns idle; `None` or
    /// zero: peers never do.
    /// Peers already known keep their state; peers added later start idle
    /// when there is a timeout.
    pub fn set_idle_timeout(&mut self, timeout: Option<Duration>) {
        self.idle_timeout = timeout.filter(|t| !t.is_zero());
    }

    /// The data plane saw data packets to or from `id` since the last report.
    /// An idle peer wakes: the controlling side starts an ICE session at once,
    /// and the coordination relay carries packets meanwhile.
    pub fn peer_activity(&mut self, id: NodeId, now: Instant) {
        if !self.wake(id, now) {
            return;
        }
        if self.coordinator_connected {
            self.poll_path(id, now);
        }
    }

    /// Ends an idle spell; false when the peer was not idle (its activity is
    /// recorded either way).
    pub(super) fn wake(&mut self, id: NodeId, now: Instant) -> bool {
        let Some(entry) = self.peers.get_mut(&id) else {
            return false;
        };
        if !entry.activity.seen(now) {
            return false;
        }
        entry.path.wake(now);
        let online = entry.info.online;
        self.awake.insert(id);
        self.outputs.push_back(Output::Idle {
            peer: id,
            idle: false,
        });
        // Idle peers hear no netcheck summary (see `handle_netcheck`).
        if online {
            self.send_nat(id, now);
        }
        self.sync_path(id);
        true
    }

    /// The peer's idle timeout ran out: its ICE session closes, the data
    /// plane stops its keepalives, and its route says `idle`.
    pub(super) fn go_idle(&mut self, id: NodeId) {
        self.end_session(id);
        let Some(entry) = self.peers.get_mut(&id) else {
            return;
        };
        entry.path.sleep();
        self.awake.remove(&id);
        self.outputs.push_back(Output::Idle {
            peer: id,
            idle: true,
        });
        self.sync_path(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_turns_idle_once_after_the_timeout_and_wakes_on_data() {
        let t0 = Instant::now();
        let timeout = Some(Duration::from_secs(10));
        let mut a = Activity::new(t0, false);
        assert!(!a.goes_idle(t0 + Duration::from_secs(9), timeout));
        assert!(!a.seen(t0 + Duration::from_secs(9)), "was not idle");
        assert!(!a.goes_idle(t0 + Duration::from_secs(18), timeout));
        assert!(a.goes_idle(t0 + Duration::from_secs(19), timeout));
        assert!(!a.goes_idle(t0 + Duration::from_secs(30), timeout), "once");
        assert!(a.is_idle());
        assert!(a.seen(t0 + Duration::from_secs(31)));
        assert!(!a.is_idle());
    }

    #[test]
    fn without_a_timeout_a_peer_never_turns_idle() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0, false);
        assert!(!a.goes_idle(t0 + Duration::from_secs(1_000_000), None));
    }
}
