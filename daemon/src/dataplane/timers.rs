//! WireGuard's timers, and parking idle peers so that they cost none.
//!
//! ```text
//!   ticking ──every 250 ms──▶ update_timers, persistent keepalive
//!     │  ▲
//!     │  └─ DataPlane::tunn: a parked peer's first packet (or the node core
//!     │     waking it) catches its clock up under the session lock
//!     └──▶ parked: idle (the node core's word), timers quiet, and every data
//!          packet reported to the shell
//! ```
//!
//! Only ticking peers are visited by a tick or sampled by the shell for
//! activity; a parked peer costs nothing until it is touched.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use boringtun::noise::{Tunn, TunnResult};
use overlay_proto::NodeId;

use super::peer::{lock, Peer};
use super::{DataPlane, BUF_SIZE, FLOW_SWEEP, TIMER_TICK};

impl DataPlane {
    /// `peer`'s WireGuard session, the only way to it. A parked peer (idle,
    /// its timers stopped) first catches up: boringtun's clock moves only in
    /// `update_timers`, and a packet stamped with a clock minutes old would
    /// make the next tick expire the session it sets up. The peer then ticks
    /// again. Both happen under the session's lock, so no packet ever meets
    /// a stale clock.
    pub(crate) fn tunn<'p>(&self, peer: &'p Peer) -> MutexGuard<'p, Tunn> {
        let mut tunn = lock(&peer.tunn);
        if peer.parked.load(Ordering::Relaxed) {
            peer.parked.store(false, Ordering::Relaxed);
            // A handshake initiation (148 bytes) is the most it writes.
            let mut scratch = [0u8; 256];
            if let TunnResult::WriteToNetwork(d) = tunn.update_timers(&mut scratch) {
                *lock(&peer.caught_up) = Some(d.to_vec());
            }
            if let Some(p) = self.peer(peer.id) {
                lock(&self.ticking).insert(p.id, p);
            }
        }
        tunn
    }

    /// The node core says whether `peer` is idle. An idle peer gets no
    /// keepalives and is parked at the next quiet tick; one that wakes ticks
    /// again at once.
    pub fn set_idle(&self, peer: &Peer, idle: bool) {
        peer.set_idle(idle);
        if !idle {
            drop(self.tunn(peer));
        }
    }

    /// Appends the peers that moved data since the last call. Only peers
    /// whose timers run are asked: a parked peer ticks again on its first
    /// packet, and is not parked while it has data the shell has not taken.
    pub fn take_activity(&self, active: &mut Vec<NodeId>) {
        let ticking = lock(&self.ticking);
        active.extend(
            ticking
                .values()
                .filter(|peer| peer.take_activity())
                .map(|peer| peer.id),
        );
    }

    /// Runs WireGuard's timers (handshakes, keepalives) until the task is ended.
    ///
    /// Only peers that tick are visited. An idle peer (the node core's word)
    /// is parked once its timers have nothing to send and the shell has seen
    /// all its data; it ticks again when a packet to or from it arrives or
    /// the node core wakes it (see [`Self::tunn`]).
    pub async fn run_timers(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = vec![0u8; BUF_SIZE];
        let mut batch = Vec::new();
        loop {
            tick.tick().await;
            self.tick_timers(&mut out, &mut batch).await;
        }
    }

    /// One timer pass; `batch` is scratch, kept to reuse its allocation.
    async fn tick_timers(&self, out: &mut [u8], batch: &mut Vec<Arc<Peer>>) {
        let secs = self.started.elapsed().as_secs();
        let now = u32::try_from(secs).unwrap_or(u32::MAX);
        let before = self.clock.swap(now, Ordering::Relaxed);
        let sweep = now / FLOW_SWEEP.as_secs() as u32 != before / FLOW_SWEEP.as_secs() as u32;
        if sweep {
            self.sweep_resolver(now);
            self.sweep_flows(now);
        }
        batch.clear();
        batch.extend(lock(&self.ticking).values().cloned());
        for peer in batch.drain(..) {
            if peer.removed.load(Ordering::Relaxed) {
                lock(&self.ticking).remove(&peer.id);
                continue;
            }
            let caught_up = lock(&peer.caught_up).take();
            if let Some(datagram) = caught_up {
                self.transmit(&peer, &datagram).await;
            }
            let len = {
                let mut tunn = lock(&peer.tunn);
                let timers = match tunn.update_timers(out) {
                    TunnResult::WriteToNetwork(d) => Some(d.len()),
                    _ => None,
                };
                let len = match timers {
                    None if peer.keepalive_due(now) => match tunn.encapsulate(&[], out) {
                        TunnResult::WriteToNetwork(d) => Some(d.len()),
                        _ => None,
                    },
                    other => other,
                };
                if len.is_none() && peer.may_park() {
                    peer.parked.store(true, Ordering::Relaxed);
                    lock(&self.ticking).remove(&peer.id);
                }
                len
            };
            let Some(len) = len else {
                continue;
            };
            self.transmit(&peer, &out[..len]).await;
        }
    }

    /// Drops expired flows from every filtered peer's table, idle ones too
    /// (a few loads per peer, every [`FLOW_SWEEP`]).
    fn sweep_flows(&self, now: u32) {
        let table = self.peers.read().unwrap_or_else(|e| e.into_inner());
        for peer in table.by_id.values() {
            if peer.filtered.load(Ordering::Relaxed) {
                lock(&peer.filter).sweep(now);
            }
        }
    }
}
