//! What we accept from peers' sealed signals and how much we send, decided
//! without IO (time comes in as `now`):
//!
//! ```text
//!   opened box ──▶ from/to match? ──▶ counter new? ──▶ PeerSignal ──▶ engine
//!                   └ misdirected      └ replayed
//!   Offer / RestartRequest ──▶ session budget of that peer ──▶ new ICE session
//!                                └ excess offer
//!   PeerSignal ──▶ peer's send budget ──▶ total send budget ──▶ SealedSignal ──▶ seal
//!                   └ dropped               └ dropped
//! ```
//!
//! A peer must not be able to make this node do much work, or make it exceed the
//! coordinator's per-session message limit (which would get *our* session closed):
//! every new ICE session costs an agent and about ten signals back, so a peer gets
//! at most one new session per [`SESSION_INTERVAL`], and whatever we send is capped
//! per peer and in total.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use overlay_proto::ratelimit::TokenBucket;
use overlay_proto::signal::{PeerSignal, SealedSignal};
use overlay_proto::NodeId;

/// A peer may make us start a new ICE session (by an offer, or by asking us to
/// offer) once per this interval on average...
pub const SESSION_INTERVAL: Duration = Duration::from_secs(2);
/// ...with this many in a row: a restart right after a failed attempt is normal.
pub const SESSION_BURST: f64 = 3.0;
/// Signals per second we send to one peer on average. One ICE session is an
/// offer or answer, a handful of candidates and our NAT summary: about ten.
pub const PEER_SIGNAL_RATE: f64 = 10.0;
/// Signals we may send one peer in a burst: a few sessions' worth.
pub const PEER_SIGNAL_BURST: f64 = 40.0;
/// Signals per second we send in total, and the burst. The coordinator allows a
/// session 200 messages a second with a burst of 400 by default; staying well
/// below leaves room for pings and TURN refreshes, so no mix of peers can get our
/// control session throttled.
pub const TOTAL_SIGNAL_RATE: f64 = 150.0;
pub const TOTAL_SIGNAL_BURST: f64 = 300.0;

/// Longest ICE username fragment or password accepted (RFC 8445 allows 256).
const MAX_ICE_CREDENTIAL: usize = 256;
/// Longest candidate line accepted; real ones are under 200 bytes.
const MAX_CANDIDATE: usize = 512;
/// Longest restart reason accepted; it is only logged.
const MAX_REASON: usize = 200;

/// Whether the free-text fields of `signal` are what they claim to be: ICE
/// credentials of `ice-char`s (RFC 8445: letters, digits, `+`, `/`) of a sane
/// length, candidates and reasons short and free of control characters.
/// (`NetInfo`'s address is typed and was checked when the signal parsed.)
pub fn well_formed(signal: &PeerSignal) -> bool {
    let ice_chars = |s: &str, min: usize| {
        (min..=MAX_ICE_CREDENTIAL).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    };
    let plain = |s: &str, max: usize| s.len() <= max && !s.chars().any(char::is_control);
    match signal {
        PeerSignal::Offer { ufrag, pwd, .. } | PeerSignal::Answer { ufrag, pwd, .. } => {
            ice_chars(ufrag, 4) && ice_chars(pwd, 22)
        }
        PeerSignal::Candidate { candidate, .. } => plain(candidate, MAX_CANDIDATE),
        PeerSignal::RestartRequest { reason } => plain(reason, MAX_REASON),
        PeerSignal::NetInfo { .. } => true,
    }
}

/// Why an opened signal was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The box names another sender than the server stamped, or another recipient
    /// than us: our own box reflected back, or one meant for someone else.
    Misdirected,
    /// The counter is not above the last one accepted from that sender.
    Replayed,
    /// A field is not what it claims to be (see [`well_formed`]).
    Malformed,
}

/// Per-peer state.
#[derive(Debug)]
struct PeerState {
    /// Highest counter accepted from the peer.
    last_counter: u64,
    sessions: TokenBucket,
    sends: TokenBucket,
}

impl PeerState {
    fn new(now: Instant) -> Self {
        PeerState {
            last_counter: 0,
            sessions: TokenBucket::new(1.0 / SESSION_INTERVAL.as_secs_f64(), SESSION_BURST, now),
            sends: TokenBucket::new(PEER_SIGNAL_RATE, PEER_SIGNAL_BURST, now),
        }
    }
}

/// The signaling rules of one node.
#[derive(Debug)]
pub struct Signaling {
    me: NodeId,
    /// The counter of the last signal we sealed.
    counter: u64,
    peers: HashMap<NodeId, PeerState>,
    total: TokenBucket,
}

impl Signaling {
    pub fn new(me: NodeId, now: Instant) -> Self {
        Signaling {
            me,
            counter: 0,
            peers: HashMap::new(),
            total: TokenBucket::new(TOTAL_SIGNAL_RATE, TOTAL_SIGNAL_BURST, now),
        }
    }

    fn peer(&mut self, id: NodeId, now: Instant) -> &mut PeerState {
        self.peers.entry(id).or_insert_with(|| PeerState::new(now))
    }

    /// The plaintext to seal for `to`, or `None` when the budget for that peer
    /// or in total is spent. `unix_micros` is the wall clock: the counter is the
    /// larger of it and one more than the previous counter, so it grows across
    /// restarts of this node without any stored state.
    pub fn outgoing(
        &mut self,
        to: NodeId,
        signal: PeerSignal,
        now: Instant,
        unix_micros: u64,
    ) -> Option<SealedSignal> {
        if !self.peer(to, now).sends.take(now) || !self.total.take(now) {
            return None;
        }
        self.counter = unix_micros.max(self.counter.saturating_add(1));
        Some(SealedSignal {
            from: self.me,
            to,
            counter: self.counter,
            signal,
        })
    }

    /// Checks a box that opened with `from`'s key: `from` is the sender the
    /// server stamped. On success the counter is remembered, so the same box
    /// (or any older one) is refused from now on.
    pub fn incoming(
        &mut self,
        from: NodeId,
        sealed: SealedSignal,
        now: Instant,
    ) -> Result<PeerSignal, Refused> {
        if sealed.from != from || sealed.to != self.me {
            return Err(Refused::Misdirected);
        }
        if !well_formed(&sealed.signal) {
            return Err(Refused::Malformed);
        }
        let peer = self.peer(from, now);
        if sealed.counter <= peer.last_counter {
            return Err(Refused::Replayed);
        }
        peer.last_counter = sealed.counter;
        Ok(sealed.signal)
    }

    /// Whether `peer` may make us start a new ICE session now (an offer we
    /// answer, or a restart request we honour). Takes a token when it may.
    pub fn allow_session(&mut self, peer: NodeId, now: Instant) -> bool {
        self.peer(peer, now).sessions.take(now)
    }

    /// A peer left the netmap: its rate state goes. Its last counter stays, so
    /// boxes it sent before are still refused should it come back.
    pub fn forget(&mut self, peer: NodeId, now: Instant) {
        if let Some(state) = self.peers.get_mut(&peer) {
            let last_counter = state.last_counter;
            *state = PeerState::new(now);
            state.last_counter = last_counter;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: NodeId = 1;
    const PEER: NodeId = 2;
    /// 2024-12-12, in microseconds since the epoch.
    const T0: u64 = 1_733_990_400_000_000;

    fn restart() -> PeerSignal {
        PeerSignal::RestartRequest { reason: "x".into() }
    }

    fn sealed(from: NodeId, to: NodeId, counter: u64) -> SealedSignal {
        SealedSignal {
            from,
            to,
            counter,
            signal: restart(),
        }
    }

    #[test]
    fn fresh_signal_is_accepted_and_its_replay_dropped() {
        let now = Instant::now();
        let mut s = Signaling::new(ME, now);
        assert_eq!(s.incoming(PEER, sealed(PEER, ME, T0), now), Ok(restart()));
        assert_eq!(
            s.incoming(PEER, sealed(PEER, ME, T0), now),
            Err(Refused::Replayed)
        );
        assert_eq!(
            s.incoming(PEER, sealed(PEER, ME, T0 - 1), now),
            Err(Refused::Replayed)
        );
        assert_eq!(
            s.incoming(PEER, sealed(PEER, ME, T0 + 1), now),
            Ok(restart())
        );
    }

    #[test]
    fn our_own_box_reflected_back_is_dropped() {
        let now = Instant::now();
        let mut s = Signaling::new(ME, now);
        let ours = s.outgoing(PEER, restart(), now, T0).expect("budget");
        // The coordinator delivers it to us as if PEER had sent it: the box opens
        // (one key both ways), but it names us as the sender.
        assert_eq!(s.incoming(PEER, ours, now), Err(Refused::Misdirected));
    }

    #[test]
    fn signal_for_another_node_or_from_another_sender_is_dropped() {
        let now = Instant::now();
        let mut s = Signaling::new(ME, now);
        assert_eq!(
            s.incoming(PEER, sealed(PEER, 3, T0), now),
            Err(Refused::Misdirected)
        );
        assert_eq!(
            s.incoming(PEER, sealed(3, ME, T0), now),
            Err(Refused::Misdirected)
        );
        // A refused box does not advance the counter.
        assert_eq!(s.incoming(PEER, sealed(PEER, ME, T0), now), Ok(restart()));
    }

    #[test]
    fn restarted_sender_is_accepted() {
        let now = Instant::now();
        let mut receiver = Signaling::new(ME, now);
        // The peer sends many signals within one microsecond of clock: its counter
        // runs ahead of its clock...
        let mut sender = Signaling::new(PEER, now);
        let mut last = 0;
        for _ in 0..30 {
            let signal = sender.outgoing(ME, restart(), now, T0).expect("budget");
            assert!(signal.counter > last, "counter must strictly increase");
            last = signal.counter;
            assert!(receiver.incoming(PEER, signal, now).is_ok());
        }
        // ...then restarts a second later with a fresh counter seeded from its clock.
        let mut restarted = Signaling::new(PEER, now);
        let signal = restarted
            .outgoing(ME, restart(), now, T0 + 1_000_000)
            .expect("budget");
        assert_eq!(receiver.incoming(PEER, signal, now), Ok(restart()));
    }

    #[test]
    fn counter_never_goes_back_when_the_clock_does() {
        let now = Instant::now();
        let mut s = Signaling::new(ME, now);
        let a = s
            .outgoing(PEER, restart(), now, T0)
            .expect("budget")
            .counter;
        let b = s
            .outgoing(PEER, restart(), now, T0 - 5)
            .expect("budget")
            .counter;
        assert_eq!((a, b), (T0, T0 + 1));
    }

    #[test]
    fn offer_flood_gets_one_session_per_interval_after_a_small_burst() {
        let t0 = Instant::now();
        let mut s = Signaling::new(ME, t0);
        // 100 offers a second for 10 seconds.
        let mut allowed = 0;
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(10 * i);
            if s.allow_session(PEER, now) {
                allowed += 1;
            }
        }
        // The burst of 3, then one per 2 s over the ~10 s.
        assert!((7..=8).contains(&allowed), "{allowed} sessions allowed");
        // Another peer is not affected by the first one's flood.
        assert!(s.allow_session(3, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn legitimate_restarts_pass() {
        let t0 = Instant::now();
        let mut s = Signaling::new(ME, t0);
        // A session every 2 s (the path's first retry delay) always passes.
        for i in 0..20 {
            assert!(
                s.allow_session(PEER, t0 + SESSION_INTERVAL * i),
                "restart {i}"
            );
        }
    }

    #[test]
    fn sends_to_one_peer_are_capped_and_refill() {
        let t0 = Instant::now();
        let mut s = Signaling::new(ME, t0);
        let sent = (0..100)
            .filter(|_| s.outgoing(PEER, restart(), t0, T0).is_some())
            .count();
        assert_eq!(sent, PEER_SIGNAL_BURST as usize);
        // Another peer still has its own budget.
        assert!(s.outgoing(3, restart(), t0, T0).is_some());
        // A second later, ten more.
        let later = t0 + Duration::from_secs(1);
        let sent = (0..100)
            .filter(|_| s.outgoing(PEER, restart(), later, T0).is_some())
            .count();
        assert_eq!(sent, PEER_SIGNAL_RATE as usize);
    }

    #[test]
    fn total_sends_stay_below_the_coordinators_limit() {
        let t0 = Instant::now();
        let mut s = Signaling::new(ME, t0);
        // Many peers, each within its own budget, over ten seconds.
        let mut sent = 0;
        for ms in 0..10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            let peer = 100 + ms % 500;
            if s.outgoing(peer, restart(), now, T0).is_some() {
                sent += 1;
            }
        }
        let max = TOTAL_SIGNAL_BURST + TOTAL_SIGNAL_RATE * 10.0;
        assert!(sent as f64 <= max, "{sent} sent in 10 s");
        assert!(max < 200.0 * 10.0 + 400.0);
    }

    #[test]
    fn malformed_fields_are_refused() {
        let now = Instant::now();
        let mut s = Signaling::new(ME, now);
        let offer = |ufrag: &str, pwd: &str| PeerSignal::Offer {
            session: 1,
            ufrag: ufrag.into(),
            pwd: pwd.into(),
            direct_only: false,
        };
        let good_pwd = "abcdefghijklmnopqrstuv";
        assert!(well_formed(&offer("abcd", good_pwd)));
        assert!(well_formed(&offer("a+/9", &format!("{good_pwd}+/"))));
        assert!(!well_formed(&offer("abc", good_pwd)));
        assert!(!well_formed(&offer("ab\u{1b}[2J", good_pwd)));
        assert!(!well_formed(&offer("abcd", "short")));
        assert!(!well_formed(&offer(&"a".repeat(257), good_pwd)));
        assert!(!well_formed(&PeerSignal::Candidate {
            session: 1,
            candidate: "candidate:1 1 udp 1 \u{1b}]0;x 5000 typ host".into(),
        }));
        assert!(!well_formed(&PeerSignal::RestartRequest {
            reason: "a\nb".into()
        }));
        let mut bad = sealed(PEER, ME, T0);
        bad.signal = offer("abc", good_pwd);
        assert_eq!(s.incoming(PEER, bad, now), Err(Refused::Malformed));
    }

    #[test]
    fn forgetting_a_peer_keeps_its_counter() {
        let now = Instant::now();
        let mut s = Signaling::new(ME, now);
        assert!(s.incoming(PEER, sealed(PEER, ME, T0), now).is_ok());
        s.forget(PEER, now);
        assert_eq!(
            s.incoming(PEER, sealed(PEER, ME, T0), now),
            Err(Refused::Replayed)
        );
    }
}
