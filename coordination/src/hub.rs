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
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use ipnet::Ipv6Net;
use tokio::sync::{broadcast, mpsc, oneshot};

use overlay_proto::coord::{
    combine_digests, encode_relay_frame, mesh_ip6, peer_json_digest, PeerInfo, RelayBatch,
    ServerMsg, MAX_FRAME_BYTES, RELAY_HELLO_ID,
};
use overlay_proto::NodeId;

use crate::bus::{Claim, Event};
use crate::config::Limits;
use crate::metrics::{Metrics, RelayDrop, Snapshot};
use crate::policy::{may_see, Compiled, NodeRef, View};
use crate::replica::BusLink;
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
    /// The session's epoch on the bus (0 without one).
    epoch: u64,
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
    /// `json`'s share of a netmap digest (`overlay_proto::coord::peer_json_digest`),
    /// kept with it.
    digest: u64,
    stats: Arc<RelayStats>,
    live: Option<Live>,
    /// Its session on another replica, when it is there (replicas only).
    remote: Option<Claim>,
    /// The highest session epoch seen for the node, here or elsewhere.
    epoch: u64,
    /// Its class under the policy in force (`None`: no policy).
    view: View,
}

impl Entry {
    fn new(info: PeerInfo) -> Entry {
        let json = peer_json(&info);
        Entry {
            digest: peer_json_digest(&json),
            json,
            info,
            stats: Arc::default(),
            live: None,
            remote: None,
            epoch: 0,
            view: None,
        }
    }

    /// Whether the node has a session here or on another replica.
    fn is_online(&self) -> bool {
        self.live.is_some() || self.remote.is_some()
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
        self.digest = peer_json_digest(&self.json);
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
    /// Sessions other replicas announced for nodes not known here yet (the
    /// enrolment reaches this replica after the session, from another
    /// replica or from the store): applied when the node arrives. Bounded
    /// by `hub_remote::MAX_PENDING_CLAIMS`.
    pending: HashMap<NodeId, Claim>,
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
    /// The replicas' bus; empty for a single coordinator.
    bus: OnceLock<Arc<BusLink>>,
    /// Deltas sent so far, counted with the write lock held: every change a
    /// session can see is one, so a sum over the records taken at one count
    /// holds until the next.
    changes: AtomicU64,
    /// `changes`, and the sum of the records' digests per policy class
    /// (one entry, for every record, without a policy): what a reconnecting
    /// node's netmap digest is checked against. A node's netmap is every
    /// class it may see minus itself, so the check is a sum over the
    /// classes (a handful) instead of a walk over the mesh per node
    /// (10,000 nodes moving at once to a replica of 20,000).
    digest_classes: Mutex<Option<(u64, ClassDigests)>>,
    /// The mesh's IPv6 prefix: every record the hub holds, so every
    /// `PeerInfo` it sends, carries the node's address in it.
    network6: Option<Ipv6Net>,
}

fn serialize(msg: &ServerMsg) -> Utf8Bytes {
    // Serializing these plain structs cannot fail.
    Utf8Bytes::from(serde_json::to_string(msg).unwrap_or_default())
}

impl Hub {
    /// A hub for an IPv4-only mesh.
    pub fn new(nodes: Vec<PeerInfo>, metrics: Arc<Metrics>, limits: Limits) -> Hub {
        Hub::with_network6(nodes, None, metrics, limits)
    }

    /// A hub whose nodes have mesh IPv6 addresses in `network6`.
    pub fn with_network6(
        nodes: Vec<PeerInfo>,
        network6: Option<Ipv6Net>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Hub {
        let (deltas, _) = broadcast::channel(limits.delta_backlog.max(1));
        let mut inner = Inner::default();
        for mut info in nodes {
            info.online = false;
            info.mesh_ip6 = network6.map(|net| mesh_ip6(net, info.mesh_ip));
            inner.nodes.insert(info.id, Entry::new(info));
        }
        Hub {
            inner: RwLock::new(inner),
            deltas,
            presence: Mutex::new(Vec::new()),
            metrics,
            limits,
            bus: OnceLock::new(),
            changes: AtomicU64::new(0),
            digest_classes: Mutex::new(None),
            network6,
        }
    }

    /// `info` with its mesh IPv6 address derived here, whatever it came
    /// with: records from the store, from registrations and from other
    /// replicas (of an older version, say) all end up alike.
    fn with_mesh_ip6(&self, mut info: PeerInfo) -> PeerInfo {
        info.mesh_ip6 = self.network6.map(|net| mesh_ip6(net, info.mesh_ip));
        info
    }

    /// Connects the hub to the replicas' bus (once, before sessions attach).
    pub fn set_bus(&self, link: Arc<BusLink>) {
        let _ = self.bus.set(link);
    }

    pub fn bus(&self) -> Option<&Arc<BusLink>> {
        self.bus.get()
    }

    fn publish(&self, event: Event) {
        if let Some(bus) = self.bus.get() {
            bus.event(event);
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
        self.changes.fetch_add(1, Ordering::Relaxed);
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

    /// A node registered here (new, or again with possibly a new name); the
    /// other replicas are told.
    pub fn upsert(&self, info: PeerInfo) {
        let info = self.with_mesh_ip6(info);
        if self.bus.get().is_some() {
            self.publish(Event::Upsert { peer: info.clone() });
        }
        self.apply_upsert(info);
    }

    /// A node's record, new or changed, as the store has it.
    pub(crate) fn apply_upsert(&self, info: PeerInfo) {
        let mut info = self.with_mesh_ip6(info);
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
                info.online = entry.is_online();
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
                let mut entry = Entry::new(info.clone());
                if let Some(claim) = inner.pending.remove(&id) {
                    entry.remote = Some(claim);
                    entry.epoch = claim.epoch;
                }
                info.online = entry.is_online();
                entry.set_online(info.online);
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
        let was_local = entry.live.is_some();
        let was_online = entry.is_online();
        if !was_local && online >= self.limits.max_sessions {
            return Err(AttachError::TooManySessions);
        }
        if let Some(old) = entry.live.take() {
            let _ = old.close.send(CloseReason::Replaced);
        }
        // Outbids every session of the node heard of so far, here or
        // elsewhere; and, as a hybrid clock, is at least the time in ms, so a
        // replica that just started and heard nothing yet still outbids the
        // sessions opened before (a node reconnects to it because it left
        // one of those).
        let epoch = if self.bus.get().is_some() {
            (entry.epoch + 1).max(crate::bus::epoch_now())
        } else {
            0
        };
        entry.epoch = epoch;
        entry.remote = None;
        entry.live = Some(Live {
            id: session_id,
            epoch,
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
        if !was_local {
            inner.online += 1;
            self.record_presence(id, true);
        }
        let deltas = self.deltas.subscribe();
        if !was_online {
            self.broadcast(id, &view, &ServerMsg::PeerUpsert { peer: node.clone() });
        }
        self.publish(Event::Online { node: id, epoch });
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

    /// The digest (`overlay_proto::coord::netmap_digest`) of the netmap
    /// [`Hub::netmap_page`] would give `me`: a node that says it holds this
    /// one need not be sent it again.
    pub fn netmap_digest(&self, me: NodeId) -> Option<u64> {
        let inner = self.read();
        let mine = inner.nodes.get(&me)?;
        // Writers count a change with the write lock held: it cannot move
        // while the read lock is.
        let changes = self.changes.load(Ordering::Relaxed);
        let mut cached = self
            .digest_classes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let classes = match &*cached {
            Some((at, classes)) if *at == changes => classes,
            _ => {
                let classes = class_digests(inner.nodes.values().map(|e| (&e.view, e.digest)));
                &cached.insert((changes, classes)).1
            }
        };
        let seen = classes
            .iter()
            .filter(|(view, _)| may_see(&mine.view, view))
            .map(|(_, sum)| *sum);
        let all = combine_digests(seen);
        // Our own record is in our class's sum when the class sees itself.
        Some(if may_see(&mine.view, &mine.view) {
            all.wrapping_sub(mine.digest)
        } else {
            all
        })
    }

    /// A session ended. A no-op when a newer session already replaced it.
    /// Returns whether the node went offline.
    pub fn detach(&self, id: NodeId, session_id: u64) -> bool {
        let mut inner = self.write();
        let Some(entry) = inner.nodes.get_mut(&id) else {
            return false;
        };
        let Some(live) = entry.live.take_if(|l| l.id == session_id) else {
            return false;
        };
        let offline = !entry.is_online();
        if offline {
            entry.set_online(false);
        }
        let peer = entry.info.clone();
        let view = entry.view.clone();
        inner.online -= 1;
        if offline {
            self.broadcast(id, &view, &ServerMsg::PeerUpsert { peer });
        }
        self.record_presence(id, false);
        self.publish(Event::Offline {
            node: id,
            epoch: live.epoch,
        });
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
        let text = serialize(&ServerMsg::Signal { from, payload });
        match (&entry.live, entry.remote, self.bus.get()) {
            (Some(live), _, _) => live
                .control
                .try_send(text)
                .map_err(|_| SignalError::QueueFull)?,
            (None, Some(claim), Some(bus)) => {
                if !bus.inbox(claim.replica, crate::bus::signal_message(to, &text)) {
                    return Err(SignalError::QueueFull);
                }
                bus.counters.signals_out.fetch_add(1, Ordering::Relaxed);
            }
            _ => return Err(SignalError::PeerOffline),
        }
        self.metrics
            .signaling_messages
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
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

    /// Whether `id` has a session on this replica.
    pub fn is_online(&self, id: NodeId) -> bool {
        self.read().nodes.get(&id).is_some_and(|e| e.live.is_some())
    }

    pub fn online_count(&self) -> usize {
        self.read().online
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.read().nodes.contains_key(&id)
    }
}

#[path = "hub_policy.rs"]
mod hub_policy;
#[path = "hub_relay.rs"]
mod hub_relay;
#[path = "hub_remote.rs"]
mod hub_remote;
#[path = "hub_stats.rs"]
mod hub_stats;
pub use hub_policy::ApplyStats;

/// Per view (policy class), the sum of its records' digests.
type ClassDigests = Vec<(View, u64)>;

/// The records' digests summed per view (policy class; records of one
/// class share its `Arc`, so the pointer tells the class). As many entries
/// as classes: one without a policy, at most one per record.
fn class_digests<'a>(records: impl Iterator<Item = (&'a View, u64)>) -> ClassDigests {
    let mut classes: HashMap<usize, (View, u64)> = HashMap::new();
    for (view, digest) in records {
        let (_, sum) = classes
            .entry(hub_policy::view_key(view))
            .or_insert_with(|| (view.clone(), 0));
        *sum = combine_digests([*sum, digest]);
    }
    classes.into_values().collect()
}

#[cfg(test)]
#[path = "hub_policy_tests.rs"]
mod policy_tests;
#[cfg(test)]
#[path = "hub_tests.rs"]
pub(crate) mod tests;
