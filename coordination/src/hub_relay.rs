//! The hub's relay: frames and batches from one node's session, routed to the
//! destination sessions' relay queues, or, for a node on another replica, to
//! that replica's inbox on the bus (one bus message per batch and replica).
//! Never blocks: a datagram over the sender's rate, a destination's byte
//! budget or the bus's is dropped and counted.

use super::*;
use crate::bus::{RelayOut, ReplicaId, RELAY_RECORD_LEN};

/// Where a datagram goes.
enum Target<'a> {
    Local(&'a Live, &'a RelayStats),
    Remote(ReplicaId),
}

/// One destination's share of a batch: its batch under way, or the replica
/// whose bus message takes it.
enum ShareDest {
    Local(RelayBatch),
    Remote(ReplicaId),
}

/// Relay records under way to one replica.
struct RemoteShare {
    replica: ReplicaId,
    out: RelayOut,
    frames: u64,
}

impl Hub {
    /// Queues a relay frame for `to`, stamped with `from`. Never blocks:
    /// a full queue drops the frame.
    pub fn relay(
        &self,
        from: NodeId,
        from_stats: &RelayStats,
        to: NodeId,
        payload: &[u8],
    ) -> Result<(), RelayDrop> {
        let len = payload.len() as u64;
        from_stats.add_in(len);
        let inner = self.read();
        let result = match self.target(&inner, from, to) {
            Err(e) => Err(e),
            Ok(Target::Local(live, stats)) => {
                match self.enqueue(live, encode_relay_frame(from, payload)) {
                    Ok(()) => {
                        stats.add_out(len);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Ok(Target::Remote(replica)) => {
                let mut out = RelayOut::new(RELAY_RECORD_LEN + payload.len());
                if out.push(to, from, payload) {
                    self.send_remote(replica, out.into_message(), 1)
                } else {
                    Err(RelayDrop::UnknownPeer)
                }
            }
        };
        drop(inner);
        match result {
            Ok(()) => {
                self.metrics.relay_frames.fetch_add(1, Ordering::Relaxed);
                self.metrics.relay_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(reason) => self.metrics.relay_drop(reason),
        }
        result
    }

    /// Where a datagram from `from` to `to` goes, or why nowhere.
    fn target<'a>(
        &self,
        inner: &'a Inner,
        from: NodeId,
        to: NodeId,
    ) -> Result<Target<'a>, RelayDrop> {
        match inner.nodes.get(&to) {
            None => Err(RelayDrop::UnknownPeer),
            Some(entry) if !self.may_reach(inner, from, entry) => Err(RelayDrop::UnknownPeer),
            Some(Entry {
                live: Some(live),
                stats,
                ..
            }) => Ok(Target::Local(live, stats)),
            Some(Entry {
                remote: Some(claim),
                ..
            }) if self.bus.get().is_some() => Ok(Target::Remote(claim.replica)),
            Some(_) => Err(RelayDrop::PeerOffline),
        }
    }

    /// Hands a bus message of `frames` relay records to the bus.
    fn send_remote(&self, replica: ReplicaId, msg: Vec<u8>, frames: u64) -> Result<(), RelayDrop> {
        let Some(bus) = self.bus.get() else {
            return Err(RelayDrop::PeerOffline);
        };
        if bus.inbox(replica, msg) {
            bus.counters
                .relay_frames_out
                .fetch_add(frames, Ordering::Relaxed);
            Ok(())
        } else {
            Err(RelayDrop::Bus)
        }
    }

    /// Queues one message for a live session within its byte budget.
    fn enqueue(&self, live: &Live, msg: Vec<u8>) -> Result<(), RelayDrop> {
        let len = msg.len();
        let before = live.relay_queued.fetch_add(len, Ordering::Relaxed);
        if before + len > self.limits.relay_queue_bytes.max(MAX_FRAME_BYTES)
            || live.relay.try_send(Bytes::from(msg)).is_err()
        {
            live.relay_queued.fetch_sub(len, Ordering::Relaxed);
            return Err(RelayDrop::QueueFull);
        }
        Ok(())
    }

    /// Routes the datagrams of one relay batch from `from`: each
    /// destination's share is queued as one batch (more when it outgrows a
    /// message), stamped with `from`. Records to [`RELAY_HELLO_ID`] are not
    /// datagrams and are skipped. Drops are counted per datagram, as for
    /// single frames; the sender is never told. `size` is the batch's size
    /// in bytes: no share outgrows it, so each is built in one allocation.
    pub fn relay_batch<'a>(
        &self,
        from: NodeId,
        from_stats: &RelayStats,
        records: impl IntoIterator<Item = (NodeId, &'a [u8])>,
        size: usize,
    ) {
        /// One destination's share: its batch under way, or why it gets nothing.
        struct Share {
            to: NodeId,
            batch: Result<ShareDest, RelayDrop>,
            frames: u64,
            bytes: u64,
        }
        // A batch names few destinations (usually one): a short list.
        let mut shares: Vec<Share> = Vec::new();
        let mut remotes: Vec<RemoteShare> = Vec::new();
        let mut bytes_in = 0;
        let inner = self.read();
        let live = |to: NodeId| match self.target(&inner, from, to) {
            Ok(Target::Local(live, stats)) => Ok((live, stats)),
            Ok(Target::Remote(_)) => Err(RelayDrop::PeerOffline),
            Err(e) => Err(e),
        };
        for (to, payload) in records {
            if to == RELAY_HELLO_ID {
                continue;
            }
            bytes_in += payload.len() as u64;
            let at = match shares.iter().position(|s| s.to == to) {
                Some(at) => at,
                None => {
                    let batch = self.target(&inner, from, to).map(|t| match t {
                        Target::Local(..) => {
                            ShareDest::Local(RelayBatch::new(MAX_FRAME_BYTES, size))
                        }
                        Target::Remote(replica) => ShareDest::Remote(replica),
                    });
                    shares.push(Share {
                        to,
                        batch,
                        frames: 0,
                        bytes: 0,
                    });
                    shares.len() - 1
                }
            };
            let share = &mut shares[at];
            let batch = match &mut share.batch {
                Err(_) => {
                    share.frames += 1;
                    continue;
                }
                Ok(ShareDest::Remote(replica)) => {
                    self.push_remote(&mut remotes, *replica, to, from, payload, size);
                    continue;
                }
                Ok(ShareDest::Local(batch)) => batch,
            };
            if !batch.push(from, payload) {
                let full = batch.take();
                // Fits an empty batch: it came in a message of the same bound.
                let _ = batch.push(from, payload);
                if let Ok((live, stats)) = live(to) {
                    self.queue_share(live, stats, full, &mut share.frames, &mut share.bytes);
                }
            }
            share.frames += 1;
            share.bytes += payload.len() as u64;
        }
        from_stats.add_in(bytes_in);
        for remote in remotes {
            if !remote.out.is_empty() {
                let sent =
                    self.send_remote(remote.replica, remote.out.into_message(), remote.frames);
                if let Err(reason) = sent {
                    self.metrics.relay_drops(reason, remote.frames);
                }
            }
        }
        for mut share in shares {
            match share.batch {
                Ok(ShareDest::Local(batch)) if !batch.is_empty() => {
                    if let Ok((live, stats)) = live(share.to) {
                        self.queue_share(
                            live,
                            stats,
                            batch.into_message(),
                            &mut share.frames,
                            &mut share.bytes,
                        );
                    }
                }
                Ok(_) => {}
                Err(reason) => self.metrics.relay_drops(reason, share.frames),
            }
        }
    }

    /// Adds a record to the bus message for `replica`, sending the message
    /// first when it is full.
    fn push_remote(
        &self,
        remotes: &mut Vec<RemoteShare>,
        replica: ReplicaId,
        to: NodeId,
        from: NodeId,
        payload: &[u8],
        size: usize,
    ) {
        let at = match remotes.iter().position(|r| r.replica == replica) {
            Some(at) => at,
            None => {
                // A batch of n datagrams makes at most n × 8 more bytes here.
                remotes.push(RemoteShare {
                    replica,
                    out: RelayOut::new(size + size / 4),
                    frames: 0,
                });
                remotes.len() - 1
            }
        };
        let remote = &mut remotes[at];
        if !remote.out.push(to, from, payload) {
            let full = remote.out.take();
            if let Err(reason) = self.send_remote(replica, full, remote.frames) {
                self.metrics.relay_drops(reason, remote.frames);
            }
            remote.frames = 0;
            if !remote.out.push(to, from, payload) {
                self.metrics.relay_drop(RelayDrop::UnknownPeer);
                return;
            }
        }
        remote.frames += 1;
    }

    /// Delivers relay records that another replica sent over the bus to the
    /// sessions here, one batch per destination (the records keep their
    /// senders). The sending replica already applied rate and policy.
    pub fn relay_from_bus(&self, records: &[u8]) {
        let mut shares: Vec<(NodeId, RelayBatch, u64, u64)> = Vec::new();
        let inner = self.read();
        let local = |to: NodeId| match inner.nodes.get(&to) {
            Some(Entry {
                live: Some(live),
                stats,
                ..
            }) => Some((live, stats)),
            _ => None,
        };
        let mut frames_in = 0;
        for (to, from, payload) in crate::bus::relay_records(records) {
            frames_in += 1;
            if local(to).is_none() {
                self.metrics.relay_drop(RelayDrop::PeerOffline);
                continue;
            }
            let at = match shares.iter().position(|s| s.0 == to) {
                Some(at) => at,
                None => {
                    shares.push((to, RelayBatch::new(MAX_FRAME_BYTES, records.len()), 0, 0));
                    shares.len() - 1
                }
            };
            let (_, batch, frames, bytes) = &mut shares[at];
            if !batch.push(from, payload) {
                let full = batch.take();
                if !batch.push(from, payload) {
                    self.metrics.relay_drop(RelayDrop::UnknownPeer);
                    continue;
                }
                if let Some((live, stats)) = local(to) {
                    self.queue_share(live, stats, full, frames, bytes);
                }
            }
            *frames += 1;
            *bytes += payload.len() as u64;
        }
        for (to, batch, mut frames, mut bytes) in shares {
            if let (false, Some((live, stats))) = (batch.is_empty(), local(to)) {
                self.queue_share(live, stats, batch.into_message(), &mut frames, &mut bytes);
            }
        }
        if let Some(bus) = self.bus.get() {
            bus.counters
                .relay_frames_in
                .fetch_add(frames_in, Ordering::Relaxed);
        }
    }

    /// Queues `msg`, which holds the last `frames` datagrams (`bytes` bytes)
    /// of a share, and counts them as forwarded or dropped; both go to zero.
    fn queue_share(
        &self,
        live: &Live,
        stats: &RelayStats,
        msg: Vec<u8>,
        frames: &mut u64,
        bytes: &mut u64,
    ) {
        match self.enqueue(live, msg) {
            Ok(()) => {
                stats.add_out(*bytes);
                self.metrics.relay_batches.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .relay_frames
                    .fetch_add(*frames, Ordering::Relaxed);
                self.metrics
                    .relay_bytes
                    .fetch_add(*bytes, Ordering::Relaxed);
            }
            Err(reason) => self.metrics.relay_drops(reason, *frames),
        }
        *frames = 0;
        *bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::tests::hub;
    use overlay_proto::coord::RelayMessage;

    fn records(msg: &[u8]) -> Vec<(NodeId, Vec<u8>)> {
        let parsed = RelayMessage::parse(msg).unwrap();
        assert!(parsed.is_batch());
        parsed.records().map(|(id, p)| (id, p.to_vec())).collect()
    }

    #[test]
    fn a_batch_is_split_per_destination_and_stamped_with_the_sender() {
        let h = hub(&[1, 2, 3, 4], Limits::default());
        let a = h.attach(1).unwrap();
        let mut b = h.attach(2).unwrap();
        let mut c = h.attach(3).unwrap();
        let batch: [(NodeId, &[u8]); 6] = [
            (2, b"b1"),
            (RELAY_HELLO_ID, b""),
            (3, b"c1"),
            (2, b"b2"),
            (4, b"offline"),
            (9, b"unknown"),
        ];
        h.relay_batch(1, &a.stats, batch, 100);
        let to_b = b.relay.try_recv().unwrap();
        assert_eq!(
            records(&to_b),
            vec![(1, b"b1".to_vec()), (1, b"b2".to_vec())]
        );
        assert!(b.relay.try_recv().is_err(), "one message per destination");
        assert_eq!(b.relay_queued.load(Ordering::Relaxed), to_b.len());
        assert_eq!(
            records(&c.relay.try_recv().unwrap()),
            vec![(1, b"c1".to_vec())]
        );
        assert_eq!(h.metrics.relay_frames.load(Ordering::Relaxed), 3);
        assert_eq!(h.metrics.relay_batches.load(Ordering::Relaxed), 2);
        assert_eq!(h.metrics.relay_dropped(RelayDrop::PeerOffline), 1);
        assert_eq!(h.metrics.relay_dropped(RelayDrop::UnknownPeer), 1);
        assert_eq!(a.stats.bytes_in.load(Ordering::Relaxed), 2 + 2 + 2 + 7 + 7);
    }

    #[test]
    fn a_full_byte_budget_drops_and_counts_datagrams() {
        let limits = Limits {
            relay_queue_bytes: 0, // raised to one message's worth
            ..Limits::default()
        };
        let h = hub(&[1, 2], limits);
        let a = h.attach(1).unwrap();
        let mut b = h.attach(2).unwrap();
        let big = vec![0u8; 1400];
        // 60 datagrams of 1,400 bytes: more than one 64 KiB message.
        h.relay_batch(1, &a.stats, (0..60).map(|_| (2, &big[..])), 60 * 1411);
        let first = b.relay.try_recv().unwrap();
        assert!(first.len() <= MAX_FRAME_BYTES);
        let queued = records(&first).len() as u64;
        assert!(
            b.relay.try_recv().is_err(),
            "the second message was over budget"
        );
        assert_eq!(h.metrics.relay_dropped(RelayDrop::QueueFull), 60 - queued);
        assert_eq!(h.metrics.relay_frames.load(Ordering::Relaxed), queued);
    }
}
