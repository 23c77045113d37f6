//! Which path a peer's packets take, and when to (re)try ICE: a sans-IO state
//! machine driven by ICE events and `now`.
//!
//! ```text
//!   peer online ──▶ Idle ──start──▶ Checking ──connected──▶ Connected ◀─┐
//!                    ▲                 │ timeout/failed         │ no   │ ICE
//!                    │                 ▼                        ▼ traffic  recovers
//!                    └──backoff──── Failed ◀──failed──────── Disconnected
//! ```
//!
//! Packets use the ICE pair only while it is `Connected`; at every other moment
//! they go through the coordination relay, so a peer is reachable from the first
//! packet and never waits for ICE.

use std::time::{Duration, Instant};

use overlay_proto::api::PathKind;

use super::backoff::Backoff;

/// How long one ICE session may check before we call it failed and retry later.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
/// First retry delay after a failed session; doubles per failure.
pub const RETRY_BASE: Duration = Duration::from_secs(2);
/// A relayed peer retries ICE at least this often, so a path that opens later is found.
pub const RETRY_CAP: Duration = Duration::from_secs(120);
/// The controlled side waits this long for an offer before asking for one.
pub const OFFER_GRACE: Duration = Duration::from_secs(4);
/// A peer on TURN tries for a direct path again after this long, doubling up to
/// [`UPGRADE_CAP`]: a pair chosen while direct checks were still under way, or
/// a NAT that since changed, gets another chance.
pub const UPGRADE_BASE: Duration = Duration::from_secs(60);
pub const UPGRADE_CAP: Duration = Duration::from_secs(600);
/// Restart requests from the peer are honoured at most this often.
pub const MIN_RESTART_INTERVAL: Duration = Duration::from_secs(1);

/// ICE's view of the current session, reduced to what decides the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceStatus {
    Idle,
    Checking { since: Instant },
    Connected,
    Disconnected,
    Failed,
}

/// Candidate types of a selected pair, as far as the path label needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateKind {
    Host,
    Srflx,
    Prflx,
    Relay,
}

impl CandidateKind {
    fn label(self) -> &'static str {
        match self {
            CandidateKind::Host => "host",
            CandidateKind::Srflx => "srflx",
            CandidateKind::Prflx => "prflx",
            CandidateKind::Relay => "relay",
        }
    }
}

/// The ICE pair that carries packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedPair {
    pub local: CandidateKind,
    pub local_addr: String,
    pub remote: CandidateKind,
    pub remote_addr: String,
}

impl SelectedPair {
    pub fn kind(&self) -> PathKind {
        if self.local == CandidateKind::Relay || self.remote == CandidateKind::Relay {
            PathKind::Turn
        } else {
            PathKind::Direct
        }
    }

    /// Whether packets travel over IPv6: the peer's address is what they are
    /// sent to (webrtc-ice may pair a check with a local candidate of the
    /// other family, since all share one dual-stack socket).
    pub fn ipv6(&self) -> bool {
        self.remote_addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.is_ipv6())
    }

    /// `direct (host)`, `direct (srflx)`, `turn (relay via ADDR)`; a direct
    /// path over IPv6 says so: `direct (host, v6)`.
    pub fn label(&self) -> String {
        match (self.local, self.remote) {
            (CandidateKind::Relay, _) => format!("turn (relay via {})", self.local_addr),
            (_, CandidateKind::Relay) => format!("turn (relay via {})", self.remote_addr),
            (l, r) => {
                // The "least direct" side names the path: host only if both are.
                let rank = |k: CandidateKind| match k {
                    CandidateKind::Host => 0,
                    CandidateKind::Srflx => 2,
                    _ => 1,
                };
                let worst = if rank(l) >= rank(r) { l } else { r };
                let family = if self.ipv6() { ", v6" } else { "" };
                format!("direct ({}{family})", worst.label())
            }
        }
    }
}

/// What the owner of the ICE agent should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Controlling side: open a new ICE session (an offer).
    StartSession,
    /// Controlling side: open a session in which neither side gathers TURN
    /// relay candidates (see [`PathState::on_direct_seen`]).
    StartDirectSession,
    /// Controlled side: ask the controlling peer for a new session.
    RequestRestart,
}

#[derive(Debug)]
pub struct PathState {
    controlling: bool,
    online: bool,
    status: IceStatus,
    selected: Option<SelectedPair>,
    backoff: Backoff,
    next_attempt: Instant,
    last_start: Option<Instant>,
    upgrade: Backoff,
    next_upgrade: Option<Instant>,
    /// The current session had a direct pair pass its checks.
    direct_seen: bool,
    /// A direct-only session was tried since the path was last direct.
    direct_retry_spent: bool,
}

impl PathState {
    pub fn new(controlling: bool, online: bool, now: Instant) -> Self {
        PathState {
            controlling,
            online,
            status: IceStatus::Idle,
            selected: None,
            backoff: Backoff::new(RETRY_BASE, RETRY_CAP),
            next_attempt: if controlling { now } else { now + OFFER_GRACE },
            last_start: None,
            upgrade: Backoff::new(UPGRADE_BASE, UPGRADE_CAP),
            next_upgrade: None,
            direct_seen: false,
            direct_retry_spent: false,
        }
    }

    pub fn status(&self) -> IceStatus {
        self.status
    }

    /// The pair packets go over, or `None` when they take the coordination relay.
    pub fn selected(&self) -> Option<&SelectedPair> {
        match self.status {
            IceStatus::Connected => self.selected.as_ref(),
            _ => None,
        }
    }

    /// When the next ICE attempt is due (for `overlayctl why`-style reporting).
    pub fn next_attempt(&self) -> Instant {
        self.next_attempt
    }

    /// The coordinator says the peer came online or went offline. Its word does
    /// not end a working ICE path: the coordinator may be the one that restarted,
    /// or cut off from the peer, and ICE's own consent checks tell within seconds
    /// whether the peer is really gone. Returns whether to drop the ICE session.
    pub fn set_online(&mut self, online: bool, now: Instant) -> bool {
        if online == self.online {
            return false;
        }
        self.online = online;
        if self.status == IceStatus::Connected {
            return false;
        }
        self.start_over(now);
        true
    }

    /// The peer went idle (see `node::idle`): its session is closed, and
    /// nothing is scheduled until [`Self::wake`].
    pub fn sleep(&mut self) {
        self.status = IceStatus::Idle;
        self.selected = None;
        self.next_upgrade = None;
    }

    /// The idle peer has traffic again: ICE starts as for a new peer (at once
    /// when we control it; the other side waits for an offer first).
    pub fn wake(&mut self, now: Instant) {
        self.start_over(now);
    }

    fn start_over(&mut self, now: Instant) {
        self.status = IceStatus::Idle;
        self.selected = None;
        self.backoff.reset();
        self.next_attempt = if self.controlling {
            now
        } else {
            now + OFFER_GRACE
        };
    }

    /// A new session began on our side (we sent an offer, or answered one).
    pub fn session_started(&mut self, now: Instant) {
        self.status = IceStatus::Checking { since: now };
        self.selected = None;
        self.last_start = Some(now);
        self.direct_seen = false;
    }

    /// When ICE selected its pair, a direct pair of the same session had
    /// already passed its checks. ICE keeps the pair it nominated, so if that
    /// is a TURN pair the controlling side at once opens a session without
    /// relay candidates, once until the path is next direct: the slow
    /// upgrade schedule is for NATs that may change, not for a race lost
    /// moments ago.
    pub fn on_direct_seen(&mut self) {
        self.direct_seen = true;
    }

    pub fn on_selected(&mut self, pair: SelectedPair) {
        self.selected = Some(pair);
    }

    /// The peer signalled a candidate of `kind` at `addr`. A check that arrived
    /// before the candidate made ICE record that address as peer-reflexive; the
    /// signalled type is the truth, so the path is named after it.
    pub fn learn_remote(&mut self, addr: &str, kind: CandidateKind) {
        if let Some(pair) = &mut self.selected {
            // Also: a NAT-less peer's srflx is its host address; host names it best.
            let better = pair.remote == CandidateKind::Prflx
                || (pair.remote == CandidateKind::Srflx && kind == CandidateKind::Host);
            if better && pair.remote_addr == addr {
                pair.remote = kind;
            }
        }
    }

    pub fn on_connected(&mut self) {
        self.status = IceStatus::Connected;
        self.backoff.reset();
    }

    /// ICE saw no traffic on the pair for a while; it may still recover.
    pub fn on_disconnected(&mut self) {
        if self.status == IceStatus::Connected {
            self.status = IceStatus::Disconnected;
        }
    }

    pub fn on_failed(&mut self, now: Instant, jitter: f64) {
        if matches!(self.status, IceStatus::Failed | IceStatus::Idle) {
            return;
        }
        self.status = IceStatus::Failed;
        self.selected = None;
        self.next_attempt = now + self.backoff.next_delay(jitter);
    }

    /// The peer asked for a new session (it restarted, or its side failed).
    /// Returns whether to start one now.
    pub fn on_restart_request(&mut self, now: Instant) -> bool {
        if !self.controlling || !self.online {
            return false;
        }
        let recent = self
            .last_start
            .is_some_and(|t| now.duration_since(t) < MIN_RESTART_INTERVAL);
        if recent {
            return false;
        }
        self.session_started(now);
        true
    }

    /// Call periodically; returns what to do about ICE now, if anything.
    pub fn poll(&mut self, now: Instant, jitter: f64) -> Option<Action> {
        if !self.online {
            return None;
        }
        if let IceStatus::Checking { since } = self.status {
            if now.duration_since(since) >= CHECK_TIMEOUT {
                self.on_failed(now, jitter);
            }
        }
        if let Some(action) = self.poll_upgrade(now, jitter) {
            return Some(action);
        }
        let idle_or_failed = matches!(self.status, IceStatus::Idle | IceStatus::Failed);
        if !idle_or_failed || now < self.next_attempt {
            return None;
        }
        if self.controlling {
            self.session_started(now);
            Some(Action::StartSession)
        } else {
            // Until an offer comes, ask again on the backoff schedule.
            self.next_attempt = now + self.backoff.next_delay(jitter);
            Some(Action::RequestRestart)
        }
    }
}

impl PathState {
    /// On TURN, the controlling side schedules and starts attempts at a direct
    /// path; packets take the coordination relay while the new session checks.
    fn poll_upgrade(&mut self, now: Instant, jitter: f64) -> Option<Action> {
        let on_turn = self.status == IceStatus::Connected
            && self
                .selected
                .as_ref()
                .is_some_and(|p| p.kind() == PathKind::Turn);
        if !on_turn {
            if self.selected().is_some() {
                // Direct: nothing to upgrade.
                self.upgrade.reset();
                self.direct_retry_spent = false;
            }
            self.next_upgrade = None;
            return None;
        }
        if self.controlling && self.direct_seen && !self.direct_retry_spent {
            self.direct_retry_spent = true;
            self.next_upgrade = None;
            self.session_started(now);
            return Some(Action::StartDirectSession);
        }
        let due = *self
            .next_upgrade
            .get_or_insert_with(|| now + self.upgrade.next_delay(jitter));
        if !self.controlling || now < due {
            return None;
        }
        self.next_upgrade = None;
        self.session_started(now);
        Some(Action::StartSession)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(local: CandidateKind, remote: CandidateKind) -> SelectedPair {
        SelectedPair {
            local,
            local_addr: "10.0.0.1:5000".into(),
            remote,
            remote_addr: "10.0.0.2:6000".into(),
        }
    }

    #[test]
    fn controlling_peer_starts_at_once_and_uses_ice_only_when_connected() {
        let now = Instant::now();
        let mut p = PathState::new(true, true, now);
        assert_eq!(p.poll(now, 0.5), Some(Action::StartSession));
        assert_eq!(p.poll(now, 0.5), None, "one session at a time");
        p.on_selected(pair(CandidateKind::Host, CandidateKind::Host));
        assert!(p.selected().is_none(), "checking: still relayed");
        p.on_connected();
        assert_eq!(p.selected().unwrap().label(), "direct (host)");
        p.on_disconnected();
        assert!(p.selected().is_none(), "falls back to the relay at once");
        p.on_connected();
        assert!(p.selected().is_some(), "ICE recovered");
    }

    #[test]
    fn relayed_peer_retries_ice_with_capped_backoff() {
        let t0 = Instant::now();
        let mut p = PathState::new(true, true, t0);
        assert_eq!(p.poll(t0, 1.0), Some(Action::StartSession));
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..10 {
            p.on_failed(now, 1.0);
            let due = p.next_attempt();
            gaps.push(due - now);
            assert_eq!(p.poll(due - Duration::from_millis(1), 1.0), None);
            assert_eq!(p.poll(due, 1.0), Some(Action::StartSession));
            now = due;
        }
        assert_eq!(gaps[0], RETRY_BASE);
        assert_eq!(gaps[1], RETRY_BASE * 2);
        assert_eq!(*gaps.last().unwrap(), RETRY_CAP);
    }

    #[test]
    fn checking_too_long_counts_as_failure() {
        let t0 = Instant::now();
        let mut p = PathState::new(true, true, t0);
        p.poll(t0, 0.0);
        assert_eq!(p.poll(t0 + CHECK_TIMEOUT, 1.0), None);
        assert_eq!(p.status(), IceStatus::Failed);
        assert_eq!(
            p.poll(t0 + CHECK_TIMEOUT + RETRY_BASE, 1.0),
            Some(Action::StartSession)
        );
    }

    #[test]
    fn controlled_peer_waits_for_an_offer_then_asks_for_one() {
        let t0 = Instant::now();
        let mut p = PathState::new(false, true, t0);
        assert_eq!(p.poll(t0, 0.0), None);
        assert_eq!(p.poll(t0 + OFFER_GRACE, 1.0), Some(Action::RequestRestart));
        assert_eq!(p.poll(t0 + OFFER_GRACE, 1.0), None, "asks on a schedule");
        p.session_started(t0 + OFFER_GRACE);
        p.on_connected();
        assert_eq!(p.poll(t0 + Duration::from_secs(600), 1.0), None);
    }

    #[test]
    fn offline_peer_keeps_a_working_path_but_gets_no_new_sessions() {
        let t0 = Instant::now();
        let mut p = PathState::new(true, false, t0);
        assert_eq!(p.poll(t0, 0.0), None);
        p.set_online(true, t0);
        assert_eq!(p.poll(t0, 0.0), Some(Action::StartSession));
        p.on_selected(pair(CandidateKind::Host, CandidateKind::Host));
        p.on_connected();
        assert!(
            !p.set_online(false, t0),
            "a working path outlives the coordinator's word"
        );
        assert!(p.selected().is_some());
        assert_eq!(p.poll(t0, 0.0), None, "no new session for an offline peer");
        p.on_disconnected();
        p.on_failed(t0, 0.0);
        assert!(p.selected().is_none());
        assert_eq!(p.poll(t0 + RETRY_CAP, 0.0), None, "offline: no retries");
    }

    #[test]
    fn restart_requests_are_rate_limited_and_only_for_the_controlling_side() {
        let t0 = Instant::now();
        let mut p = PathState::new(true, true, t0);
        assert!(p.on_restart_request(t0));
        assert!(!p.on_restart_request(t0 + Duration::from_millis(10)));
        assert!(p.on_restart_request(t0 + MIN_RESTART_INTERVAL));
        let mut q = PathState::new(false, true, t0);
        assert!(!q.on_restart_request(t0));
    }

    #[test]
    fn turn_peer_retries_direct_with_growing_intervals_and_stops_once_direct() {
        let t0 = Instant::now();
        let mut p = PathState::new(true, true, t0);
        p.poll(t0, 1.0);
        p.on_selected(pair(CandidateKind::Relay, CandidateKind::Host));
        p.on_connected();
        assert_eq!(p.poll(t0, 1.0), None, "first poll schedules the upgrade");
        assert_eq!(
            p.poll(t0 + UPGRADE_BASE - Duration::from_millis(1), 1.0),
            None
        );
        let t1 = t0 + UPGRADE_BASE;
        assert_eq!(p.poll(t1, 1.0), Some(Action::StartSession));
        assert!(
            p.selected().is_none(),
            "checking: the relay carries packets"
        );
        p.on_selected(pair(CandidateKind::Relay, CandidateKind::Host));
        p.on_connected();
        p.poll(t1, 1.0);
        assert_eq!(p.poll(t1 + UPGRADE_BASE, 1.0), None, "the interval doubled");
        assert_eq!(
            p.poll(t1 + UPGRADE_BASE * 2, 1.0),
            Some(Action::StartSession)
        );
        p.on_selected(pair(CandidateKind::Host, CandidateKind::Srflx));
        p.on_connected();
        assert_eq!(p.poll(t1 + UPGRADE_CAP * 10, 1.0), None, "direct stays put");
    }

    #[test]
    fn turn_chosen_after_a_direct_pair_passed_retries_direct_only_at_once_and_once() {
        let t0 = Instant::now();
        let mut p = PathState::new(true, true, t0);
        p.poll(t0, 1.0);
        p.on_selected(pair(CandidateKind::Host, CandidateKind::Relay));
        p.on_direct_seen();
        p.on_connected();
        assert_eq!(p.poll(t0, 1.0), Some(Action::StartDirectSession));
        assert!(
            p.selected().is_none(),
            "checking: the relay carries packets"
        );

        // The direct-only session times out (the direct pair was a fluke):
        // the next attempt is a full one, and TURN is not retried direct-only
        // again however often a direct pair is seen.
        let t1 = t0 + CHECK_TIMEOUT;
        assert_eq!(p.poll(t1, 1.0), None, "failed; retry after the backoff");
        let t2 = t1 + RETRY_BASE;
        assert_eq!(p.poll(t2, 1.0), Some(Action::StartSession));
        p.on_selected(pair(CandidateKind::Host, CandidateKind::Relay));
        p.on_direct_seen();
        p.on_connected();
        assert_eq!(p.poll(t2, 1.0), None, "the slow upgrade schedule again");
        assert_eq!(p.poll(t2 + UPGRADE_BASE, 1.0), Some(Action::StartSession));

        // Once direct, a later race may be retried direct-only again.
        p.on_selected(pair(CandidateKind::Host, CandidateKind::Srflx));
        p.on_connected();
        assert_eq!(p.poll(t2 + UPGRADE_BASE, 1.0), None);
        let t3 = t2 + UPGRADE_CAP;
        p.session_started(t3);
        p.on_selected(pair(CandidateKind::Relay, CandidateKind::Host));
        p.on_direct_seen();
        p.on_connected();
        assert_eq!(p.poll(t3, 1.0), Some(Action::StartDirectSession));
    }

    #[test]
    fn only_the_controlling_side_and_only_a_turn_pair_retry_direct_only() {
        let t0 = Instant::now();
        let mut controlled = PathState::new(false, true, t0);
        controlled.session_started(t0);
        controlled.on_selected(pair(CandidateKind::Relay, CandidateKind::Host));
        controlled.on_direct_seen();
        controlled.on_connected();
        assert_eq!(controlled.poll(t0, 1.0), None);

        let mut direct = PathState::new(true, true, t0);
        direct.poll(t0, 1.0);
        direct.on_selected(pair(CandidateKind::Host, CandidateKind::Srflx));
        direct.on_direct_seen();
        direct.on_connected();
        assert_eq!(direct.poll(t0, 1.0), None);
    }

    #[test]
    fn a_prflx_remote_takes_the_signalled_type_of_its_address() {
        let t0 = Instant::now();
        let mut p = PathState::new(true, true, t0);
        p.on_selected(pair(CandidateKind::Host, CandidateKind::Prflx));
        p.on_connected();
        p.learn_remote("10.0.0.9:6000", CandidateKind::Host);
        assert_eq!(
            p.selected().unwrap().label(),
            "direct (prflx)",
            "other address"
        );
        p.learn_remote("10.0.0.2:6000", CandidateKind::Host);
        assert_eq!(p.selected().unwrap().label(), "direct (host)");
    }

    #[test]
    fn path_labels_name_the_least_direct_side() {
        use CandidateKind::*;
        assert_eq!(pair(Host, Srflx).label(), "direct (srflx)");
        assert_eq!(pair(Prflx, Host).label(), "direct (prflx)");
        assert_eq!(pair(Relay, Host).label(), "turn (relay via 10.0.0.1:5000)");
        assert_eq!(pair(Host, Relay).kind(), PathKind::Turn);
        assert_eq!(pair(Srflx, Prflx).kind(), PathKind::Direct);
    }

    #[test]
    fn a_direct_path_over_ipv6_says_so_and_ipv4_labels_stay_as_they_were() {
        use CandidateKind::*;
        let v6 = |local, remote| SelectedPair {
            local,
            local_addr: "[2001:db8:1::2]:5000".into(),
            remote,
            remote_addr: "[2001:db8:2::2]:6000".into(),
        };
        assert_eq!(v6(Host, Host).label(), "direct (host, v6)");
        assert_eq!(v6(Host, Srflx).label(), "direct (srflx, v6)");
        assert_eq!(v6(Prflx, Host).label(), "direct (prflx, v6)");
        assert_eq!(v6(Host, Host).kind(), PathKind::Direct);
        assert_eq!(pair(Host, Host).label(), "direct (host)");
        // The family is the peer's: where packets go.
        let mut mixed = v6(Host, Host);
        mixed.local_addr = "10.0.0.1:5000".into();
        assert_eq!(mixed.label(), "direct (host, v6)");
        mixed.remote_addr = "10.0.0.2:6000".into();
        assert_eq!(mixed.label(), "direct (host)");
        // TURN is named by the relay's address, of either family.
        let mut relayed = v6(Relay, Host);
        relayed.local_addr = "[2001:db8::3]:50000".into();
        assert_eq!(relayed.label(), "turn (relay via [2001:db8::3]:50000)");
    }
}
