//! The registry of nodes and their online sessions: who is online, where to
//! route a signal or a relay frame, and the broadcast of netmap deltas.
//!
//! ```text
//!   register ──upsert──▶ ┌─────────┐ ──deltas (one shared broadcast queue)──▶ every session
//!   session ──attach───▶ │   Hub   │ ──control queue (signals)──────────────▶ one session
//!   poller ───remove───▶ └─────────┘ ──relay queue (frames, drop when full)─▶ one session
//! ```
//!
//! A relay batch from a node is routed datagram by datagram: its records are
//! split by destination and each destination's share queued as one batch
//! stamped with the sender ([`Hub::relay_batch`]), within the destination's
//! byte budget (`Limits::relay_queue_bytes`).
//!
//! A delta is serialized once and shared by reference among all sessions;
//! under an access policy it carries the [`View`] of the node it is about,
//! and a session forwards it only when its own node may see that one (two
//! word ANDs, see `policy::compile`). A policy or tag change is one
//! [`Delta::Reclass`] holding each node's new view, filter and netmap
//! changes (`hub_policy.rs`), so sessions stay in order with the deltas
//! around it and no session reconnects.
//!
//! a session that falls more than `delta_backlog` deltas behind is closed
//! and gets a fresh netmap on reconnect. Each node's record is kept
//! serialized as well, so a session reads its netmap in pages of shared
//! texts ([`Hub::netmap_page`]) instead of copying the mesh when it
//! attaches. The lock is a std `RwLock` never held across an `.await`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};

use overlay_proto::coord::{
    encode_relay_frame, PeerInfo, RelayBatch, ServerMsg, MAX_FRAME_BYTES, RELAY_HELLO_ID,
};
use overlay_proto::NodeId;

use crate::config::Limits;
use crate::metrics::{Metrics, RelayDrop, Snapshot};
use crate::policy::{may_see, Compiled, NodeRef, View};
use crate::welcome::{self, peer_json, Page, PeerJson};

/// A netmap change, serialized once.
#[derive(Debug, Clone)]
pub enum Delta {
    /// A change of one node, for the sessions whose node may see it.
    Peer {
        /// The node the delta is about; its own session skips it.
        about: NodeId,
        /// Its place under the policy when the delta was made.
        view: View,
        text: Utf8Bytes,
    },
    /// A policy or tag change: what each node is told, and its new view.
    Reclass(Arc<Reclass>),
}

/// Every node's part of a policy or tag change.
#[derive(Debug, Default)]
pub struct Reclass {
    pub nodes: HashMap<NodeId, NodeUpdate>,
}

/// One node's part of a [`Reclass`]. Nodes that moved between the same two
/// classes share `msgs`.
#[derive(Debug, Clone)]
pub struct NodeUpdate {
    /// The node's view from now on.
    pub view: View,
    /// Its new `Filter` message, when its filter changed.
    pub filter: Option<Utf8Bytes>,
    /// `PeerRemoved` / `PeerUpsert` messages and the node each is about (a
    /// session skips its own).
    pub msgs: Arc<[(NodeId, Utf8Bytes)]>,
}

/// Why the hub closes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Replaced,
    Removed,
}

impl CloseReason {
    /// WebSocket close code and reason text.
    pub fn frame(self) -> (u16, &'static str) {
        match self {
            // 4000–4999 are private-use codes.
            CloseReason::Replaced => (4001, "replaced by a newer session of this node"),
            CloseReason::Removed => (4003, "node removed by an administrator"),
        }
    }
}

/// Relay bytes of one node, since start and since the last store flush.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    unflushed_in: AtomicU64,
    unflushed_out: AtomicU64,
}

impl RelayStats {
    fn add_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
        self.unflushed_in.fetch_add(n, Ordering::Relaxed);
    }
    fn add_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
        self.unflushed_out.fetch_add(n, Ordering::Relaxed);
    }
}

struct Live {
    id: u64,
    control: mpsc::Sender<Utf8Bytes>,
    relay: mpsc::Sender<Bytes>,
    /// Bytes in `relay`; the session subtracts what it takes out.
    relay_queued: Arc<AtomicUsize>,
    close: oneshot::Sender<CloseReason>,
}

struct Entry {
    info: PeerInfo,
    /// `info` serialized, for the netmap pages of sessions that attach; kept
    /// in step by [`Entry::set_info`].
    json: PeerJson,
    stats: Arc<RelayStats>,
    live: Option<Live>,
    /// Its class under the policy in force (`None`: no policy).
    view: View,
}

impl Entry {
    fn new(info: PeerInfo) -> Entry {
        Entry {
            json: peer_json(&info),
            info,
            stats: Arc::default(),
            live: None,
            view: None,
        }
    }

    fn node_ref(&self) -> NodeRef<'_> {
        NodeRef {
            id: self.info.id,
            name: &self.info.name,
            ip: Some(std::net::IpAddr::V4(self.info.mesh_ip)),
            tags: &self.info.tags,
        }
    }

    fn set_info(&mut self, info: PeerInfo) {
        self.json = peer_json(&info);
        self.info = info;
    }

    fn set_online(&mut self, online: bool) {
        let info = PeerInfo {
            online,
            ..self.info.clone()
        };
        self.set_info(info);
    }
}

#[derive(Default)]
struct Inner {
    /// In id order, so a netmap can be read in pages (see [`Hub::netmap_page`]).
    nodes: BTreeMap<NodeId, Entry>,
    online: usize,
    next_session: u64,
    /// The policy in force, compiled; `None`: everything allowed.
    compiled: Option<Compiled>,
}

/// What a session gets when it attaches.
pub struct Attached {
    pub session_id: u64,
    /// The node's own record (online). The other nodes are read with
    /// [`Hub::netmap_page`], after the session subscribed to `deltas`.
    pub node: PeerInfo,
    /// The node's class, for the filter in its Welcome and for which deltas
    /// it gets (updated by [`Delta::Reclass`]).
    pub view: View,
    pub control: mpsc::Receiver<Utf8Bytes>,
    /// Single frames and batches for the node (see `overlay_proto::coord`).
    pub relay: mpsc::Receiver<Bytes>,
    /// Bytes queued in `relay`: subtract each message's length on taking it.
    pub relay_queued: Arc<AtomicUsize>,
    pub deltas: broadcast::Receiver<Delta>,
    pub close: oneshot::Receiver<CloseReason>,
    pub stats: Arc<RelayStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("unknown node")]
    UnknownNode,
    #[error("too many sessions")]
    TooManySessions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalError {
    UnknownPeer,
    PeerOffline,
    /// The target's queue is full; the signal is dropped.
    QueueFull,
}

pub struct Hub {
    inner: RwLock<Inner>,
    deltas: broadcast::Sender<Delta>,
    /// Presence changes not yet written to the store.
    presence: Mutex<Vec<(NodeId, bool)>>,
    metrics: Arc<Metrics>,
    limits: Limits,
}

fn serialize(msg: &ServerMsg) -> Utf8Bytes {
    // Serializing these plain structs cannot fail.
    Utf8Bytes::from(serde_json::to_string(msg).unwrap_or_default())
}

impl Hub {
    pub fn new(nodes: Vec<PeerInfo>, metrics: Arc<Metrics>, limits: Limits) -> Hub {
        let (deltas, _) = broadcast::channel(limits.delta_backlog.max(1));
        let mut inner = Inner::default();
        for mut info in nodes {
            info.online = false;
            inner.nodes.insert(info.id, Entry::new(info));
        }
        Hub {
            inner: RwLock::new(inner),
            deltas,
            presence: Mutex::new(Vec::new()),
            metrics,
            limits,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Called with the write lock held, so that deltas are ordered with the
    /// snapshots sessions take in [`Hub::attach`].
    fn broadcast(&self, about: NodeId, view: &View, msg: &ServerMsg) {
        self.send_delta(Delta::Peer {
            about,
            view: view.clone(),
            text: serialize(msg),
        });
    }

    fn send_delta(&self, delta: Delta) {
        self.metrics.deltas.fetch_add(1, Ordering::Relaxed);
        // An error only means nobody is listening.
        let _ = self.deltas.send(delta);
    }

    fn record_presence(&self, id: NodeId, online: bool) {
        self.presence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, online));
    }

    /// A node registered (new, or again with possibly a new name).
    pub fn upsert(&self, mut info: PeerInfo) {
        let mut inner = self.write();
        let inner = &mut *inner;
        let id = info.id;
        // A node the policy names by name changes the compiled filters (they
        // name nodes by id); a new name or new tags may change its class.
        let names_it = |c: &Option<Compiled>, name: &str| {
            c.as_ref().is_some_and(|c| c.policy().names_node(name))
        };
        match inner.nodes.get_mut(&id) {
            Some(entry) => {
                info.online = entry.live.is_some();
                if entry.info == info {
                    return;
                }
                let reclassify = inner.compiled.is_some()
                    && (entry.info.tags != info.tags || entry.info.name != info.name);
                let renamed = names_it(&inner.compiled, &info.name)
                    || names_it(&inner.compiled, &entry.info.name);
                entry.set_info(info.clone());
                if reclassify || renamed {
                    let policy = inner.compiled.as_ref().map(|c| Arc::clone(c.policy()));
                    self.reclass(inner, policy, None, HashSet::from([id]));
                } else {
                    let view = entry.view.clone();
                    self.broadcast(id, &view, &ServerMsg::PeerUpsert { peer: info });
                }
            }
            None => {
                info.online = false;
                let mut entry = Entry::new(info.clone());
                if let Some(c) = inner.compiled.as_mut() {
                    entry.view = Some(c.classify(entry.node_ref()));
                }
                let view = entry.view.clone();
                inner.nodes.insert(id, entry);
                self.broadcast(id, &view, &ServerMsg::PeerUpsert { peer: info.clone() });
                if names_it(&inner.compiled, &info.name) {
                    let policy = inner.compiled.as_ref().map(|c| Arc::clone(c.policy()));
                    self.reclass(inner, policy, None, HashSet::new());
                }
            }
        }
    }

    /// Opens a session for `id`, replacing (and closing) any previous one.
    pub fn attach(&self, id: NodeId) -> Result<Attached, AttachError> {
        let (control_tx, control) = mpsc::channel(self.limits.control_queue.max(1));
        let (relay_tx, relay) = mpsc::channel(self.limits.relay_queue.max(1));
        let relay_queued = Arc::new(AtomicUsize::new(0));
        let (close_tx, close) = oneshot::channel();

        let mut inner = self.write();
        let online = inner.online;
        let session_id = inner.next_session;
        let entry = inner.nodes.get_mut(&id).ok_or(AttachError::UnknownNode)?;
        let was_online = entry.live.is_some();
        if !was_online && online >= self.limits.max_sessions {
            return Err(AttachError::TooManySessions);
        }
        if let Some(old) = entry.live.take() {
            let _ = old.close.send(CloseReason::Replaced);
        }
        entry.live = Some(Live {
            id: session_id,
            control: control_tx,
            relay: relay_tx,
            relay_queued: Arc::clone(&relay_queued),
            close: close_tx,
        });
        if !was_online {
            entry.set_online(true);
        }
        let node = entry.info.clone();
        let view = entry.view.clone();
        let stats = Arc::clone(&entry.stats);
        inner.next_session += 1;
        if !was_online {
            inner.online += 1;
        }
        let deltas = self.deltas.subscribe();
        if !was_online {
            self.broadcast(id, &view, &ServerMsg::PeerUpsert { peer: node.clone() });
            self.record_presence(id, true);
        }
        self.metrics.sessions_opened.fetch_add(1, Ordering::Relaxed);
        Ok(Attached {
            session_id,
            node,
            view,
            control,
            relay,
            relay_queued,
            deltas,
            close,
            stats,
        })
    }

    /// Every node but `me` that `me` may see, with an id from `from` on, as far as fits in
    /// `max_bytes` of JSON; the page says where the next one starts. Costs
    /// the page, not the mesh: nothing is copied but references to the
    /// nodes' stored JSON.
    pub fn netmap_page(&self, me: NodeId, from: NodeId, max_bytes: usize) -> Page {
        let inner = self.read();
        let Some(mine) = inner.nodes.get(&me) else {
            return Page::default();
        };
        welcome::fill(
            inner
                .nodes
                .range(from..)
                .filter(|(id, e)| **id != me && may_see(&mine.view, &e.view))
                .map(|(id, e)| (*id, &e.json)),
            max_bytes,
        )
    }

    /// A session ended. A no-op when a newer session already replaced it.
    /// Returns whether the node went offline.
    pub fn detach(&self, id: NodeId, session_id: u64) -> bool {
        let mut inner = self.write();
        let Some(entry) = inner.nodes.get_mut(&id) else {
            return false;
        };
        if entry.live.as_ref().map(|l| l.id) != Some(session_id) {
            return false;
        }
        entry.live = None;
        entry.set_online(false);
        let peer = entry.info.clone();
        let view = entry.view.clone();
        inner.online -= 1;
        self.broadcast(id, &view, &ServerMsg::PeerUpsert { peer });
        self.record_presence(id, false);
        true
    }

    /// A node was removed: close its session and tell everyone. Returns
    /// its last record, `None` when it was not known.
    pub fn remove(&self, id: NodeId) -> Option<PeerInfo> {
        let mut inner = self.write();
        let inner = &mut *inner;
        let entry = inner.nodes.remove(&id)?;
        if let Some(live) = entry.live {
            let _ = live.close.send(CloseReason::Removed);
            inner.online -= 1;
            self.record_presence(id, false);
        }
        self.broadcast(id, &entry.view, &ServerMsg::PeerRemoved { id });
        // Filters that named it by id drop it.
        if let Some(c) = &inner.compiled {
            if c.policy().names_node(&entry.info.name) {
                let policy = Some(Arc::clone(c.policy()));
                self.reclass(inner, policy, None, HashSet::new());
            }
        }
        Some(entry.info)
    }

    /// Forwards a signal, `from` being the authenticated sender.
    pub fn signal(&self, from: NodeId, to: NodeId, payload: String) -> Result<(), SignalError> {
        let inner = self.read();
        let entry = inner.nodes.get(&to).ok_or(SignalError::UnknownPeer)?;
        // A peer the policy hides is one the sender does not know.
        if !self.may_reach(&inner, from, entry) {
            return Err(SignalError::UnknownPeer);
        }
        let live = entry.live.as_ref().ok_or(SignalError::PeerOffline)?;
        let text = serialize(&ServerMsg::Signal { from, payload });
        live.control
            .try_send(text)
            .map_err(|_| SignalError::QueueFull)?;
        self.metrics
            .signaling_messages
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

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

    /// Whether `from` may see (so signal or relay to) the node of `to`.
    fn may_reach(&self, inner: &Inner, from: NodeId, to: &Entry) -> bool {
        if inner.compiled.is_none() {
            return true;
        }
        let allowed = inner
            .nodes
            .get(&from)
            .is_some_and(|f| may_see(&f.view, &to.view));
        if !allowed {
            self.metrics.policy_refused.fetch_add(1, Ordering::Relaxed);
        }
        allowed
    }

    pub fn is_online(&self, id: NodeId) -> bool {
        self.read().nodes.get(&id).is_some_and(|e| e.live.is_some())
    }

    pub fn online_count(&self) -> usize {
        self.read().online
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.read().nodes.contains_key(&id)
    }

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
        Snapshot {
            nodes: inner.nodes.len(),
            sessions_online: inner.online,
            per_node_relay,
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

#[path = "hub_policy.rs"]
mod hub_policy;
pub use hub_policy::ApplyStats;

#[cfg(test)]
#[path = "hub_policy_tests.rs"]
mod policy_tests;
#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;

#[cfg(test)]
mod relay_batch_tests {
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
