//! The data plane's side of the access policy: each peer's filter set from
//! the node core's decision, and the one check every packet passes through
//! (see `filter` for the rules and the flow table).

use std::sync::atomic::Ordering;

use super::filter::{self, Direction, PeerFilter, Verdict};
use super::peer::{lock, Peer};
use super::DataPlane;
use crate::node::access::PeerAccess;

impl DataPlane {
    /// A filter for a new peer, with what the policy lets through with it.
    pub fn new_filter(&self, access: Option<PeerAccess>) -> PeerFilter {
        PeerFilter::new(access, self.flows.clone())
    }

    /// The policy towards `peer` changed: enforced from the next packet on.
    pub fn set_access(&self, peer: &Peer, access: Option<PeerAccess>) {
        let mut filter = lock(&peer.filter);
        peer.filtered.store(access.is_some(), Ordering::Relaxed);
        filter.set_access(access, self.sender_filter);
    }

    /// Flows all filters track, and the cap.
    pub fn flow_count(&self) -> (usize, usize) {
        (self.flows.load(Ordering::Relaxed), filter::TOTAL_FLOWS)
    }

    /// Whether the policy lets `packet` pass between us and `peer`, counting
    /// what it refuses. Costs one atomic load when no policy is in force.
    #[inline]
    pub(super) fn admits(&self, peer: &Peer, packet: &[u8], dir: Direction) -> bool {
        if !peer.filtered.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.clock.load(Ordering::Relaxed);
        let verdict = lock(&peer.filter).check(packet, dir, now, self.sender_filter);
        match verdict {
            Verdict::Pass => true,
            Verdict::PassUnrecorded => {
                self.drops.flow_table_full.fetch_add(1, Ordering::Relaxed);
                true
            }
            Verdict::Drop => {
                let (total, mine) = match dir {
                    Direction::In => (&self.drops.policy, &peer.dropped_policy),
                    Direction::Out => (&self.drops.policy_out, &peer.dropped_policy_out),
                };
                total.fetch_add(1, Ordering::Relaxed);
                mine.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}
