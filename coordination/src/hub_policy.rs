//! A policy or tag change in the hub: every node's new class, and per node
//! the messages that take its netmap and filter from the old state to the
//! new one, sent as one [`Delta::Reclass`] without reconnecting anyone.
//!
//! The diff is by *groups*, not node pairs: nodes that moved from the same
//! old class to the same new class see the same changes, so the hub walks
//! group × group (tens × tens), and each group's message list is built once
//! and shared by its members.
//!
//! ```text
//!   old visible  new visible   what members of g are told about members of h
//!       yes          no        PeerRemoved
//!       no           yes       PeerUpsert
//!       yes          yes       PeerUpsert, only for nodes whose record changed (tags)
//!   filter_json(g.old) ≠ filter_json(g.new)  →  Filter{filter}
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use overlay_proto::NodeId;

use super::{Delta, Hub, Inner, NodeUpdate, Reclass};
use crate::policy::{may_see, Compiled, Policy, View};
use crate::welcome::PeerJson;

/// What one policy or tag change cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyStats {
    pub nodes: usize,
    pub classes: usize,
    /// Distinct (old class, new class) pairs.
    pub groups: usize,
    /// Nodes told anything (a filter or a netmap change).
    pub nodes_told: usize,
    /// Messages queued in all, counting a shared list once per node.
    pub messages: usize,
}

pub(super) fn view_key(v: &View) -> usize {
    v.as_ref().map_or(0, |c| Arc::as_ptr(c) as usize)
}

fn removed_text(id: NodeId) -> Utf8Bytes {
    Utf8Bytes::from(format!(r#"{{"type":"peer_removed","id":{id}}}"#))
}

/// `ServerMsg::PeerUpsert` as serde writes it, around the stored JSON.
fn upsert_text(json: &PeerJson) -> Utf8Bytes {
    Utf8Bytes::from(format!(r#"{{"type":"peer_upsert","peer":{json}}}"#))
}

/// `ServerMsg::Filter` as serde writes it.
pub(crate) fn filter_text(view: &View) -> Utf8Bytes {
    let json = view.as_ref().map_or("null", |c| &c.filter_json);
    Utf8Bytes::from(format!(r#"{{"type":"filter","filter":{json}}}"#))
}

struct Group {
    old: View,
    new: View,
    members: Vec<NodeId>,
}

impl Hub {
    /// Puts `policy` in force (`None`: no policy) and, when given, every
    /// node's tags (a node missing from `tags` has none); pushes what changed.
    pub fn apply_policy(
        &self,
        policy: Option<Arc<Policy>>,
        tags: Option<&HashMap<NodeId, Vec<String>>>,
    ) -> ApplyStats {
        let mut inner = self.write();
        self.reclass(&mut inner, policy, tags, HashSet::new())
    }

    /// Recompiles, reclassifies every node and sends the difference.
    /// `changed`: nodes whose record changed already (their upserts are due).
    pub(super) fn reclass(
        &self,
        inner: &mut Inner,
        policy: Option<Arc<Policy>>,
        tags: Option<&HashMap<NodeId, Vec<String>>>,
        mut changed: HashSet<NodeId>,
    ) -> ApplyStats {
        if let Some(tags) = tags {
            for (id, entry) in inner.nodes.iter_mut() {
                let want = tags.get(id).map(Vec::as_slice).unwrap_or_default();
                if entry.info.tags != want {
                    let mut info = entry.info.clone();
                    info.tags = want.to_vec();
                    entry.set_info(info);
                    changed.insert(*id);
                }
            }
        }
        let mut compiled = policy.map(|p| {
            Compiled::new(
                p,
                inner
                    .nodes
                    .values()
                    .map(|e| (e.info.name.as_str(), e.info.id)),
            )
        });

        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<(usize, usize), usize> = HashMap::new();
        for (id, entry) in inner.nodes.iter_mut() {
            let new = compiled.as_mut().map(|c| c.classify(entry.node_ref()));
            let old = std::mem::replace(&mut entry.view, new);
            let key = (view_key(&old), view_key(&entry.view));
            let g = *index.entry(key).or_insert_with(|| {
                groups.push(Group {
                    old,
                    new: entry.view.clone(),
                    members: Vec::new(),
                });
                groups.len() - 1
            });
            groups[g].members.push(*id);
        }

        // Each group's members as removals, upserts and changed upserts,
        // made when first needed.
        let nodes = &inner.nodes;
        let mut removed: Vec<Option<Vec<(NodeId, Utf8Bytes)>>> = vec![None; groups.len()];
        let mut upserts: Vec<Option<Vec<(NodeId, Utf8Bytes)>>> = vec![None; groups.len()];
        let mut stats = ApplyStats {
            nodes: nodes.len(),
            classes: compiled.as_ref().map_or(0, Compiled::class_count),
            groups: groups.len(),
            ..ApplyStats::default()
        };
        let mut reclass = Reclass {
            nodes: HashMap::with_capacity(nodes.len()),
        };
        let mut filters: HashMap<usize, Utf8Bytes> = HashMap::new();
        for g in &groups {
            let mut msgs: Vec<(NodeId, Utf8Bytes)> = Vec::new();
            for (h_index, h) in groups.iter().enumerate() {
                let before = may_see(&g.old, &h.old);
                let after = may_see(&g.new, &h.new);
                match (before, after) {
                    (true, false) => msgs.extend(
                        removed[h_index]
                            .get_or_insert_with(|| {
                                h.members
                                    .iter()
                                    .map(|id| (*id, removed_text(*id)))
                                    .collect()
                            })
                            .iter()
                            .cloned(),
                    ),
                    (false, true) => msgs.extend(
                        upserts[h_index]
                            .get_or_insert_with(|| {
                                h.members
                                    .iter()
                                    .filter_map(|id| {
                                        nodes.get(id).map(|e| (*id, upsert_text(&e.json)))
                                    })
                                    .collect()
                            })
                            .iter()
                            .cloned(),
                    ),
                    (true, true) if !changed.is_empty() => msgs.extend(
                        h.members
                            .iter()
                            .filter(|id| changed.contains(id))
                            .filter_map(|id| nodes.get(id).map(|e| (*id, upsert_text(&e.json)))),
                    ),
                    _ => {}
                }
            }
            let old_filter = g.old.as_ref().map(|c| &c.filter_json);
            let new_filter = g.new.as_ref().map(|c| &c.filter_json);
            let filter = (old_filter != new_filter).then(|| {
                filters
                    .entry(view_key(&g.new))
                    .or_insert_with(|| filter_text(&g.new))
                    .clone()
            });
            let told = !msgs.is_empty() || filter.is_some();
            if told {
                stats.nodes_told += g.members.len();
                stats.messages += g.members.len() * (msgs.len() + usize::from(filter.is_some()));
            }
            let msgs: Arc<[(NodeId, Utf8Bytes)]> = Arc::from(msgs);
            for id in &g.members {
                reclass.nodes.insert(
                    *id,
                    NodeUpdate {
                        view: g.new.clone(),
                        filter: filter.clone(),
                        msgs: Arc::clone(&msgs),
                    },
                );
            }
        }
        inner.compiled = compiled;
        self.metrics.policy_changes.fetch_add(1, Ordering::Relaxed);
        self.send_delta(Delta::Reclass(Arc::new(reclass)));
        stats
    }
}
