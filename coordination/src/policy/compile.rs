//! The policy compiled for nodes, by *class*.
//!
//! Whether node A may see node B, and what filter A enforces, depend only on
//! which rules have A in their source and which have A in their destination:
//! two bit sets of `rules.len()` bits. Nodes with the same two sets form a
//! class; a class is interned once, and its [`NodeFilter`] is built and
//! serialized once for all its members. A mesh of 10,000 nodes tagged
//! with ~20 tags under a 100-rule policy has tens of classes, not 10,000
//! filters, and "may A see B" is two ANDs of `rules / 64` words instead of
//! a walk of the rules per node pair (which is what makes headscale's ACL
//! recomputation cost minutes at a few hundred nodes: per pair, per rule,
//! every alias re-resolved). Classifying a node costs one pass over the
//! rules' entries.
//!
//! ```text
//!   A sees B  ⇔  (A.src ∧ B.dst) ≠ ∅  ∨  (B.src ∧ A.dst) ≠ ∅
//!   A.filter  =  inbound:  rules in A.dst, peers = their src principals
//!                outbound: rules in A.src, peers = their dst principals
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use overlay_proto::filter::{FilterRule, NodeFilter, Principal, Proto};
use overlay_proto::NodeId;

use super::{NodeRef, Policy, Selector};

/// The nodes that share rule memberships, hence visibility and filter.
#[derive(Debug)]
pub struct Class {
    /// `words` words of source membership, then `words` of destination.
    bits: Box<[u64]>,
    words: usize,
    pub filter: NodeFilter,
    /// `filter` as JSON, for Welcome and `Filter` messages.
    pub filter_json: Arc<str>,
    /// For each `filter.inbound` rule, the index of the `[[allow]]` it came from.
    inbound_rules: Vec<usize>,
}

impl Class {
    fn src(&self) -> &[u64] {
        &self.bits[..self.words]
    }

    fn dst(&self) -> &[u64] {
        &self.bits[self.words..]
    }

    /// Whether members of `self` may see members of `other` (symmetric).
    pub fn sees(&self, other: &Class) -> bool {
        let meet = |a: &[u64], b: &[u64]| a.iter().zip(b).any(|(x, y)| x & y != 0);
        meet(self.src(), other.dst()) || meet(other.src(), self.dst())
    }
}

/// A node's place under the policy in force; `None` while there is none.
pub type View = Option<Arc<Class>>;

/// Whether a node with view `a` may see one with view `b`. Both views come
/// from the same [`Compiled`] (the hub swaps every node's view at once).
pub fn may_see(a: &View, b: &View) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.sees(b),
        _ => true,
    }
}

/// A policy ready to classify nodes.
#[derive(Debug)]
pub struct Compiled {
    policy: Arc<Policy>,
    words: usize,
    /// Per rule, its source and destination as the principals nodes match.
    src: Vec<Vec<Principal>>,
    dst: Vec<Vec<Principal>>,
    classes: HashMap<Box<[u64]>, Arc<Class>>,
}

fn principals(selectors: &[Selector], ids: &HashMap<&str, NodeId>) -> Vec<Principal> {
    let mut out: Vec<Principal> = Vec::new();
    for s in selectors {
        let p = match s {
            Selector::Any => Principal::Any,
            // A name no node has names nobody yet; the hub recompiles when
            // a node of that name enrols.
            Selector::Node(name) => match ids.get(name.as_str()) {
                Some(id) => Principal::Node(*id),
                None => continue,
            },
            Selector::Tag(t) => Principal::Tag(t.clone()),
            Selector::Cidr(net) => Principal::Cidr(*net),
        };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// `FilterRule::covers` for a node that may have no address.
fn covers(rule: &FilterRule, node: &NodeRef<'_>) -> bool {
    rule.peers.iter().any(|p| match (p, node.ip) {
        (Principal::Cidr(_), None) => false,
        (p, ip) => p.matches(
            node.id,
            ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            node.tags,
        ),
    })
}

impl Compiled {
    /// Compiles `policy`; `nodes` maps node names to ids for the rules that
    /// name nodes.
    pub fn new<'a>(
        policy: Arc<Policy>,
        nodes: impl IntoIterator<Item = (&'a str, NodeId)>,
    ) -> Compiled {
        let wanted = &policy.node_names;
        let ids: HashMap<&str, NodeId> = nodes
            .into_iter()
            .filter(|(name, _)| wanted.contains_key(*name))
            .collect();
        let src = policy
            .rules
            .iter()
            .map(|r| principals(&r.src, &ids))
            .collect();
        let dst = policy
            .rules
            .iter()
            .map(|r| principals(&r.dst, &ids))
            .collect();
        Compiled {
            words: policy.rules.len().div_ceil(64).max(1),
            policy,
            src,
            dst,
            classes: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Classes made so far.
    pub fn class_count(&self) -> usize {
        self.classes.len()
    }

    /// The class of `node`, made on first use.
    pub fn classify(&mut self, node: NodeRef<'_>) -> Arc<Class> {
        let words = self.words;
        let mut bits = vec![0u64; 2 * words].into_boxed_slice();
        for (i, rule) in self.policy.rules.iter().enumerate() {
            if rule.src.iter().any(|s| s.matches(&node)) {
                bits[i / 64] |= 1 << (i % 64);
            }
            if rule.dst.iter().any(|s| s.matches(&node)) {
                bits[words + i / 64] |= 1 << (i % 64);
            }
        }
        if let Some(class) = self.classes.get(&bits) {
            return Arc::clone(class);
        }
        let class = Arc::new(self.build(bits.clone()));
        self.classes.insert(bits, Arc::clone(&class));
        class
    }

    fn build(&self, bits: Box<[u64]>) -> Class {
        let words = self.words;
        let has = |base: usize, i: usize| bits[base + i / 64] & (1 << (i % 64)) != 0;
        let mut filter = NodeFilter::default();
        let mut inbound_rules = Vec::new();
        for (i, rule) in self.policy.rules.iter().enumerate() {
            let compiled = |peers: &Vec<Principal>| FilterRule {
                peers: peers.clone(),
                proto: rule.proto,
                ports: if rule.proto.has_ports() {
                    rule.ports.clone()
                } else {
                    Vec::new()
                },
            };
            if has(words, i) && !self.src[i].is_empty() {
                filter.inbound.push(compiled(&self.src[i]));
                inbound_rules.push(i);
            }
            if has(0, i) && !self.dst[i].is_empty() {
                filter.outbound.push(compiled(&self.dst[i]));
            }
        }
        Class {
            filter_json: Arc::from(serde_json::to_string(&filter).unwrap_or_default()),
            filter,
            bits,
            words,
            inbound_rules,
        }
    }

    /// The rule that lets `src` open a connection of `proto` to `port` on
    /// `dst`, judged by the filters the two nodes get: the receiver's
    /// inbound rules and the sender's outbound ones. `None`: denied.
    pub fn evaluate(
        &mut self,
        src: NodeRef<'_>,
        dst: NodeRef<'_>,
        proto: Proto,
        port: u16,
    ) -> Option<usize> {
        let (from, to) = (self.classify(src), self.classify(dst));
        let sent = from
            .filter
            .outbound
            .iter()
            .any(|r| r.allows(proto, port) && covers(r, &dst));
        if !sent {
            return None;
        }
        to.filter
            .inbound
            .iter()
            .zip(&to.inbound_rules)
            .find(|(r, _)| r.allows(proto, port) && covers(r, &src))
            .map(|(_, i)| *i)
    }
}
