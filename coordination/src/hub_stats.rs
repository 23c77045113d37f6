//! What the hub reports: gauges and per-node relay counters for `/metrics`
//! (with the bus's, when there is one), and activity for the store.

use super::*;

impl Hub {
    /// Gauges and per-node relay counters for `/metrics`.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.read();
        let mut per_node_relay: Vec<_> = inner
            .nodes
            .iter()
            .map(|(id, e)| {
                (
                    *id,
                    e.stats.bytes_in.load(Ordering::Relaxed),
                    e.stats.bytes_out.load(Ordering::Relaxed),
                )
            })
            .filter(|(_, i, o)| *i > 0 || *o > 0)
            .collect();
        per_node_relay.sort_unstable();
        let bus = self.bus.get().map(|b| {
            let c = &b.counters;
            let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
            crate::metrics::BusSnapshot {
                replica: b.replica,
                connected: b.is_connected(),
                replicas: load(&c.replicas),
                remote_online: inner.nodes.values().filter(|e| e.remote.is_some()).count() as u64,
                published: load(&c.published),
                received: load(&c.received),
                dropped_out: load(&c.dropped_out),
                publish_failed: load(&c.publish_failed),
                malformed_in: load(&c.malformed_in),
                relay_frames_out: load(&c.relay_frames_out),
                relay_frames_in: load(&c.relay_frames_in),
                signals_out: load(&c.signals_out),
                signals_in: load(&c.signals_in),
                reconnects: load(&c.reconnects),
            }
        });
        Snapshot {
            nodes: inner.nodes.len(),
            sessions_online: inner.online,
            per_node_relay,
            bus,
        }
    }

    /// Presence changes and relay byte deltas since the last call, for the store.
    #[allow(clippy::type_complexity)]
    pub fn drain_activity(&self) -> (Vec<(NodeId, bool)>, Vec<(NodeId, u64, u64)>) {
        let presence =
            std::mem::take(&mut *self.presence.lock().unwrap_or_else(|e| e.into_inner()));
        let inner = self.read();
        let relay = inner
            .nodes
            .iter()
            .filter_map(|(id, e)| {
                let i = e.stats.unflushed_in.swap(0, Ordering::Relaxed);
                let o = e.stats.unflushed_out.swap(0, Ordering::Relaxed);
                (i > 0 || o > 0).then_some((*id, i, o))
            })
            .collect();
        (presence, relay)
    }
}
