//! The hub's relay: frames and batches from one node's session, routed to the
//! destination sessions' relay queues. Never blocks: a datagram over the
//! sender's rate or a destination's byte budget is dropped and counted.

use super::*;

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
        let result = match inner.nodes.get(&to) {
            None => Err(RelayDrop::UnknownPeer),
            Some(entry) if !self.may_reach(&inner, from, entry) => Err(RelayDrop::UnknownPeer),
            Some(Entry { live: None, .. }) => Err(RelayDrop::PeerOffline),
            Some(Entry {
                live: Some(live),
                stats,
                ..
            }) => match self.enqueue(live, encode_relay_frame(from, payload)) {
                Ok(()) => {
                    stats.add_out(len);
                    Ok(())
                }
                Err(e) => Err(e),
            },
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
            batch: Result<RelayBatch, RelayDrop>,
            frames: u64,
            bytes: u64,
        }
        // A batch names few destinations (usually one): a short list.
        let mut shares: Vec<Share> = Vec::new();
        let mut bytes_in = 0;
        let inner = self.read();
        let live = |to: NodeId| match inner.nodes.get(&to) {
            None => Err(RelayDrop::UnknownPeer),
            Some(entry) if !self.may_reach(&inner, from, entry) => Err(RelayDrop::UnknownPeer),
            Some(Entry { live: None, .. }) => Err(RelayDrop::PeerOffline),
            Some(Entry {
                live: Some(live),
                stats,
                ..
            }) => Ok((live, stats)),
        };
        for (to, payload) in records {
            if to == RELAY_HELLO_ID {
                continue;
            }
            bytes_in += payload.len() as u64;
            let at = match shares.iter().position(|s| s.to == to) {
                Some(at) => at,
                None => {
                    let batch = live(to).map(|_| RelayBatch::new(MAX_FRAME_BYTES, size));
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
            let Ok(batch) = &mut share.batch else {
                share.frames += 1;
                continue;
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
        for mut share in shares {
            match share.batch {
                Ok(batch) if !batch.is_empty() => {
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
    use overlay_proto::coord::RelayMessage;

    fn hub(nodes: &[NodeId], limits: Limits) -> Hub {
        let info = |id: NodeId| PeerInfo {
            id,
            name: format!("n{id}"),
            mesh_ip: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
            public_key: format!("key{id}"),
            online: false,
            tags: Vec::new(),
        };
        Hub::new(
            nodes.iter().map(|id| info(*id)).collect(),
            Arc::new(Metrics::default()),
            limits,
        )
    }

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
