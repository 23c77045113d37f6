//! The hub's side of the replicas' bus: [`BusLink`], the queue the hub puts
//! what other replicas must hear on (never blocking, dropping and counting
//! when the bus is slow or down), and [`Replicas`], the sans-IO record of
//! which other replicas are alive.
//!
//! ```text
//!   Hub ──try_send──▶ BusLink queue ──▶ publisher task ──▶ NATS
//!   NATS ──▶ receiver task ──▶ Replicas (alive?) ──▶ Hub::remote_* (apply)
//! ```
//!
//! A single coordinator has no link: the hub's `bus` stays empty and every
//! path is what it was before replicas existed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::bus::{Event, ReplicaId};
use crate::ice::ReplicaIceDirectory;

/// How often a replica says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A replica unheard for this long is gone. Three heartbeats, so one lost or
/// late is harmless.
pub const REPLICA_TIMEOUT: Duration = Duration::from_millis(3500);
/// How long the nodes of a gone replica still count as online here, after
/// [`REPLICA_TIMEOUT`], while they move: a node that reconnects within it
/// (anywhere) never goes offline for the other sessions. Without it a dead
/// replica's N nodes go offline and come back online, 2 x N deltas to each
/// of the survivors' sessions (2 x 10,000 x 10,000 frames in the benchmark's
/// failover) in the seconds the survivors need most. A node that loses its
/// replica retries within `overlayd`'s `LOST_SPREAD` (2 s) of noticing, at
/// once for a killed process (its connection is reset), so 10 s covers the
/// spread and a few failed attempts; nodes that are not back by then go
/// offline as before. Signals to a node that has not moved yet are lost
/// meanwhile, as they are during `REPLICA_TIMEOUT`.
pub const MOVE_GRACE: Duration = Duration::from_secs(10);
/// How often a replica repeats the list of all its sessions, repairing
/// whatever an event lost on the way.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(10);
/// Messages queued towards the bus, events and inbox messages each; more
/// are dropped and counted. Events have their own queue and go first, so a
/// relay flood cannot starve heartbeats (and get this replica taken for dead).
pub const OUT_QUEUE: usize = 4096;
/// Bytes queued towards the bus (relay records mostly); more are dropped.
/// 4 MiB is 32 ms at 1 Gbit/s: a stalled bus costs a bounded amount and
/// a TCP stream over the relay sees a drop, not a growing delay.
pub const OUT_BUDGET: usize = 4 * 1024 * 1024;

/// Something for the bus.
#[derive(Debug)]
pub enum Outbound {
    Event(Event),
    /// A message for one replica's inbox (`bus::Inbox`).
    Inbox {
        to: ReplicaId,
        msg: Vec<u8>,
    },
}

/// Counters of the bus, shown in `/metrics` when there is one.
#[derive(Debug, Default)]
pub struct BusCounters {
    pub connected: AtomicBool,
    pub replicas: AtomicU64,
    pub published: AtomicU64,
    pub received: AtomicU64,
    /// Dropped before publishing: the queue was full (bus slow or down).
    pub dropped_out: AtomicU64,
    /// Failed to publish (disconnected, payload too large).
    pub publish_failed: AtomicU64,
    /// Messages from the bus that did not parse.
    pub malformed_in: AtomicU64,
    pub relay_frames_out: AtomicU64,
    pub relay_frames_in: AtomicU64,
    pub signals_out: AtomicU64,
    pub signals_in: AtomicU64,
    pub reconnects: AtomicU64,
}

/// The hub's handle on the bus.
#[derive(Debug)]
pub struct BusLink {
    pub replica: ReplicaId,
    events: mpsc::Sender<Outbound>,
    out: mpsc::Sender<Outbound>,
    /// Bytes of inbox messages in `out`.
    queued: AtomicUsize,
    pub counters: BusCounters,
    /// This replica's STUN/TURN URLs, told in its heartbeats, and the live
    /// other replicas' (`IceSettings` lists them after its own).
    pub ice: Arc<ReplicaIceDirectory>,
}

impl BusLink {
    pub fn new(replica: ReplicaId) -> (BusLink, Outbox) {
        let (events, events_rx) = mpsc::channel(OUT_QUEUE);
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let link = BusLink {
            replica,
            events,
            out,
            queued: AtomicUsize::new(0),
            counters: BusCounters::default(),
            ice: Arc::default(),
        };
        (
            link,
            Outbox {
                events: events_rx,
                inbox: rx,
            },
        )
    }

    /// Queues an event; `false` when it was dropped.
    pub fn event(&self, event: Event) -> bool {
        let ok = self.events.try_send(Outbound::Event(event)).is_ok();
        if !ok {
            self.counters.dropped_out.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Queues an inbox message within the byte budget; `false` when dropped.
    pub fn inbox(&self, to: ReplicaId, msg: Vec<u8>) -> bool {
        let len = msg.len();
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        if before + len > OUT_BUDGET || self.out.try_send(Outbound::Inbox { to, msg }).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.counters.dropped_out.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The publisher took an inbox message of `len` bytes off the queue.
    pub fn taken(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::Relaxed);
    }

    pub fn is_connected(&self) -> bool {
        self.counters.connected.load(Ordering::Relaxed)
    }
}

/// The two queues a [`BusLink`] fills, events first.
#[derive(Debug)]
pub struct Outbox {
    events: mpsc::Receiver<Outbound>,
    inbox: mpsc::Receiver<Outbound>,
}

impl Outbox {
    /// The next message, an event if one is waiting; `None` once both
    /// queues are closed and empty.
    pub async fn recv(&mut self) -> Option<Outbound> {
        tokio::select! {
            biased;
            Some(m) = self.events.recv() => Some(m),
            Some(m) = self.inbox.recv() => Some(m),
            else => None,
        }
    }

    pub fn try_recv(&mut self) -> Result<Outbound, mpsc::error::TryRecvError> {
        self.events.try_recv().or_else(|_| self.inbox.try_recv())
    }

    /// No more messages are taken; those queued can still be received.
    pub fn close(&mut self) {
        self.events.close();
        self.inbox.close();
    }
}

/// Which other replicas are alive, from what was last heard of each, and
/// which are gone but their nodes still within [`MOVE_GRACE`].
#[derive(Debug, Default)]
pub struct Replicas {
    last_heard: HashMap<ReplicaId, Instant>,
    /// Gone replicas whose nodes count as online until the instant given.
    moving: HashMap<ReplicaId, Instant>,
}

impl Replicas {
    /// Something arrived from `replica`; `true` when it is new to us (first
    /// heard, or heard again after it was taken for gone), so it must be
    /// told where our nodes are.
    pub fn heard(&mut self, replica: ReplicaId, now: Instant) -> bool {
        self.moving.remove(&replica);
        self.last_heard.insert(replica, now).is_none()
    }

    /// Replicas unheard for [`REPLICA_TIMEOUT`]: forgotten, and returned;
    /// their nodes are offline once [`Replicas::moved`] returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<ReplicaId> {
        let gone: Vec<ReplicaId> = self
            .last_heard
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= REPLICA_TIMEOUT)
            .map(|(r, _)| *r)
            .collect();
        for r in &gone {
            self.last_heard.remove(r);
            self.moving.insert(*r, now + MOVE_GRACE);
        }
        gone
    }

    /// Gone replicas whose [`MOVE_GRACE`] is over: their nodes that have
    /// not reconnected anywhere are offline now.
    pub fn moved(&mut self, now: Instant) -> Vec<ReplicaId> {
        let over: Vec<ReplicaId> = self
            .moving
            .iter()
            .filter(|(_, until)| now >= **until)
            .map(|(r, _)| *r)
            .collect();
        for r in &over {
            self.moving.remove(r);
        }
        over
    }

    /// Every replica is taken for gone at once, those within their grace
    /// too (this one lost the bus): returns them.
    pub fn forget_all(&mut self) -> Vec<ReplicaId> {
        let moving = self.moving.drain().map(|(r, _)| r);
        self.last_heard
            .drain()
            .map(|(r, _)| r)
            .chain(moving)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.last_heard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_heard.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_new_when_first_heard_and_again_after_it_expired() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        assert!(r.heard(7, t0));
        assert!(!r.heard(7, t0 + HEARTBEAT));
        assert!(r.expire(t0 + HEARTBEAT + REPLICA_TIMEOUT / 2).is_empty());
        assert_eq!(r.expire(t0 + HEARTBEAT + REPLICA_TIMEOUT), vec![7]);
        assert!(r.is_empty());
        assert!(r.heard(7, t0 + 10 * HEARTBEAT));
        assert_eq!(r.forget_all(), vec![7]);
    }

    #[test]
    fn a_gone_replicas_nodes_go_offline_only_after_the_grace() {
        let t0 = Instant::now();
        let mut r = Replicas::default();
        r.heard(7, t0);
        r.heard(8, t0);
        let gone_at = t0 + REPLICA_TIMEOUT;
        r.heard(8, gone_at);
        assert_eq!(r.expire(gone_at), vec![7]);
        assert!(r.moved(gone_at + MOVE_GRACE / 2).is_empty());
        assert_eq!(r.moved(gone_at + MOVE_GRACE), vec![7]);
        assert!(r.moved(gone_at + 2 * MOVE_GRACE).is_empty(), "once");

        // Heard again within the grace: it was not gone after all.
        assert_eq!(r.expire(gone_at + REPLICA_TIMEOUT), vec![8]);
        assert!(r.heard(8, gone_at + REPLICA_TIMEOUT + HEARTBEAT));
        assert!(r.moved(gone_at + 3 * MOVE_GRACE).is_empty());

        // Losing the bus takes everyone, those within the grace included.
        r.expire(gone_at + 4 * MOVE_GRACE);
        r.heard(9, gone_at + 4 * MOVE_GRACE);
        let mut all = r.forget_all();
        all.sort_unstable();
        assert_eq!(all, vec![8, 9]);
        assert!(r.moved(gone_at + 10 * MOVE_GRACE).is_empty());
    }

    #[test]
    fn the_link_drops_and_counts_beyond_its_byte_budget() {
        let (link, mut rx) = BusLink::new(1);
        assert!(link.inbox(2, vec![0; OUT_BUDGET / 2]));
        assert!(link.inbox(2, vec![0; OUT_BUDGET / 2]));
        assert!(!link.inbox(2, vec![0; 1]));
        assert_eq!(link.counters.dropped_out.load(Ordering::Relaxed), 1);
        let Some(Outbound::Inbox { msg, .. }) = rx.try_recv().ok() else {
            panic!("nothing queued");
        };
        link.taken(msg.len());
        assert!(link.inbox(2, vec![0; 1]));
        assert!(link.event(Event::Heartbeat { ice: None }));
    }

    #[tokio::test]
    async fn events_leave_before_queued_relay() {
        let (link, mut out) = BusLink::new(1);
        assert!(link.inbox(2, vec![1]));
        assert!(link.event(Event::Heartbeat { ice: None }));
        assert!(matches!(
            out.recv().await,
            Some(Outbound::Event(Event::Heartbeat { ice: None }))
        ));
        assert!(matches!(
            out.recv().await,
            Some(Outbound::Inbox { to: 2, .. })
        ));
        out.close();
        assert!(out.recv().await.is_none());
    }
}
