//! Access policy (issue #10): the file an administrator writes, what it
//! compiles to per node, and the checks run before it is stored.
//!
//! ```text
//!   policy.toml ──parse──▶ Policy (groups expanded, aliases resolved)
//!        nodes ──┐              │
//!                ▼              ▼
//!            Compiled::classify(node) ──▶ Arc<Class>: rule memberships,
//!                                          NodeFilter (serialized once)
//!   visibility:  may_see(class A, class B)   a few word ANDs
//! ```
//!
//! Everything here is sans-IO: the hub owns a [`Compiled`] and asks it for
//! each node's class; the CLI runs [`check`] and [`explain`] on the same code.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;
use overlay_proto::filter::{PortRange, Proto};
use overlay_proto::NodeId;

mod compile;
mod parse;

pub use compile::{may_see, Class, Compiled, View};
pub use parse::{endpoint, parse, port_proto};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A syntax or meaning error at a line of the file.
    #[error("{file}:{line}: {what}")]
    Invalid {
        file: String,
        line: usize,
        what: String,
    },
    #[error("policy test failed: {0}")]
    TestFailed(String),
    /// A bad `explain` argument.
    #[error("{0}")]
    Usage(String),
}

/// What a rule entry names, after groups and aliases are resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    Any,
    Node(String),
    Tag(String),
    Cidr(IpNet),
}

impl Selector {
    fn matches(&self, node: &NodeRef<'_>) -> bool {
        match self {
            Selector::Any => true,
            Selector::Node(n) => n == node.name,
            Selector::Tag(t) => node.tags.iter().any(|have| have == t),
            Selector::Cidr(net) => node.ip.is_some_and(|ip| net.contains(&ip)),
        }
    }
}

/// One `[[allow]]` table.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Position in the file: `allow[index]`.
    pub index: usize,
    /// Line of its `[[allow]]` header.
    pub line: usize,
    pub src: Vec<Selector>,
    pub dst: Vec<Selector>,
    /// The entries as written, for `explain`.
    pub src_text: Vec<String>,
    pub dst_text: Vec<String>,
    pub proto: Proto,
    /// Empty for icmp and any.
    pub ports: Vec<PortRange>,
}

impl Rule {
    /// `group:dev -> tag:server tcp 22,8000-8100`
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} -> {} {}",
            self.src_text.join(", "),
            self.dst_text.join(", "),
            self.proto
        );
        if self.proto.has_ports() {
            let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
            s.push(' ');
            s.push_str(&ports.join(","));
        }
        s
    }
}

/// A test's source or destination, or `explain`'s: an existing node by
/// name, or a hypothetical node with just this tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Node(String),
    Tag(String),
}

/// One line of a test's `accept` or `deny`.
#[derive(Debug, Clone)]
pub struct Expect {
    pub allow: bool,
    pub dst: Endpoint,
    pub proto: Proto,
    pub port: u16,
    pub text: String,
}

/// One `[[test]]` table.
#[derive(Debug, Clone)]
pub struct TestCase {
    pub index: usize,
    pub line: usize,
    pub src: Endpoint,
    pub src_text: String,
    pub expect: Vec<Expect>,
}

/// A parsed policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub file: String,
    pub rules: Vec<Rule>,
    pub tests: Vec<TestCase>,
    /// Every node name the file mentions, with the first line it is on.
    pub node_names: BTreeMap<String, usize>,
}

impl Policy {
    fn note_node(&mut self, name: &str, line: usize) {
        self.node_names.entry(name.to_owned()).or_insert(line);
    }

    /// Whether the file names this node (so its arrival or departure
    /// changes the compiled filters, which name nodes by id).
    pub fn names_node(&self, name: &str) -> bool {
        self.node_names.contains_key(name)
    }
}

/// A node as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct NodeRef<'a> {
    pub id: NodeId,
    pub name: &'a str,
    /// `None` for a hypothetical node (a test's `tag:x`): no CIDR covers it.
    pub ip: Option<IpAddr>,
    pub tags: &'a [String],
}

/// An owned node description, for the CLI and tests.
#[derive(Debug, Clone)]
pub struct NodeDesc {
    pub id: NodeId,
    pub name: String,
    pub ip: Ipv4Addr,
    pub tags: Vec<String>,
}

impl NodeDesc {
    pub fn as_ref(&self) -> NodeRef<'_> {
        NodeRef {
            id: self.id,
            name: &self.name,
            ip: Some(IpAddr::V4(self.ip)),
            tags: &self.tags,
        }
    }
}

/// The outcome of `policy check`.
#[derive(Debug)]
pub struct Checked {
    pub policy: Policy,
    pub tests_passed: usize,
    /// One line each, e.g. an unknown node name.
    pub warnings: Vec<String>,
}

impl Checked {
    /// `ok: 3 rules, 3 tests passed`
    pub fn summary(&self) -> String {
        format!(
            "ok: {} rule{}, {} test{} passed",
            self.policy.rules.len(),
            if self.policy.rules.len() == 1 {
                ""
            } else {
                "s"
            },
            self.tests_passed,
            if self.tests_passed == 1 { "" } else { "s" },
        )
    }
}

/// Ids of hypothetical nodes count down from here; real ids are SQLite rowids.
const HYPOTHETICAL_ID: NodeId = u64::MAX;

/// Nodes for evaluation: the real ones, plus a hypothetical one for every
/// node name the policy mentions that no node has (so a file can be checked
/// before its nodes enrol).
struct World {
    nodes: Vec<NodeDesc>,
    by_name: HashMap<String, usize>,
    no_tags: Vec<String>,
}

impl World {
    fn new(policy: &Policy, nodes: &[NodeDesc]) -> World {
        let mut nodes = nodes.to_vec();
        let mut by_name: HashMap<String, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        for name in policy.node_names.keys() {
            if !by_name.contains_key(name) {
                by_name.insert(name.clone(), nodes.len());
                nodes.push(NodeDesc {
                    id: HYPOTHETICAL_ID - nodes.len() as u64,
                    name: name.clone(),
                    ip: Ipv4Addr::UNSPECIFIED,
                    tags: Vec::new(),
                });
            }
        }
        World {
            nodes,
            by_name,
            no_tags: Vec::new(),
        }
    }

    fn compile(&self, policy: Arc<Policy>) -> Compiled {
        Compiled::new(policy, self.nodes.iter().map(|n| (n.name.as_str(), n.id)))
    }

    fn node<'a>(&'a self, end: &'a Endpoint, tag_holder: &'a [String]) -> NodeRef<'a> {
        match end {
            Endpoint::Node(name) => match self.by_name.get(name) {
                Some(i) => {
                    let n = &self.nodes[*i];
                    // Hypothetical named nodes have no address either.
                    let ip = (!n.ip.is_unspecified()).then_some(IpAddr::V4(n.ip));
                    NodeRef { ip, ..n.as_ref() }
                }
                None => NodeRef {
                    id: HYPOTHETICAL_ID,
                    name,
                    ip: None,
                    tags: &self.no_tags,
                },
            },
            Endpoint::Tag(_) => NodeRef {
                id: HYPOTHETICAL_ID,
                name: "",
                ip: None,
                tags: tag_holder,
            },
        }
    }
}

fn tag_list(end: &Endpoint) -> Vec<String> {
    match end {
        Endpoint::Tag(t) => vec![t.clone()],
        Endpoint::Node(_) => Vec::new(),
    }
}

/// Parses `text`, compiles it against `nodes` and runs its tests.
pub fn check(file: &str, text: &str, nodes: &[NodeDesc]) -> Result<Checked, PolicyError> {
    let policy = Arc::new(parse(file, text)?);
    let world = World::new(&policy, nodes);
    let mut compiled = world.compile(Arc::clone(&policy));
    let mut passed = 0;
    for test in &policy.tests {
        let src_tags = tag_list(&test.src);
        let src = world.node(&test.src, &src_tags);
        for e in &test.expect {
            let dst_tags = tag_list(&e.dst);
            let dst = world.node(&e.dst, &dst_tags);
            let verdict = compiled.evaluate(src, dst, e.proto, e.port);
            let what = format!("{} -> {}", test.src_text, e.text);
            match (e.allow, verdict) {
                (true, Some(_)) | (false, None) => {}
                (true, None) => {
                    return Err(PolicyError::TestFailed(format!(
                        "{what} should be allowed but no rule allows it (test[{}], line {})",
                        test.index, test.line
                    )))
                }
                (false, Some(rule)) => {
                    return Err(PolicyError::TestFailed(format!(
                        "{what} should be denied but allow[{rule}] allows it (test[{}], line {})",
                        test.index, test.line
                    )))
                }
            }
        }
        passed += 1;
    }
    let known: std::collections::HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let warnings = policy
        .node_names
        .iter()
        .filter(|(name, _)| !known.contains(name.as_str()))
        .map(|(name, line)| format!("{file}:{line}: warning: no node is named {name:?} (yet)"))
        .collect();
    let policy = Arc::try_unwrap(policy).unwrap_or_else(|p| (*p).clone());
    Ok(Checked {
        policy,
        tests_passed: passed,
        warnings,
    })
}

/// Which rule lets `src` open `port_proto` (`22/tcp`, `icmp`) to `dst`, as
/// one line: `allowed by allow[0] (line 7): group:dev -> tag:server tcp 22`
/// or `denied: no rule allows dev1 -> srv1 80/tcp`.
pub fn explain(
    policy: Arc<Policy>,
    nodes: &[NodeDesc],
    src: &str,
    dst: &str,
    port_proto_text: &str,
) -> Result<String, PolicyError> {
    let src_end = endpoint(src).map_err(PolicyError::Usage)?;
    let dst_end = endpoint(dst).map_err(PolicyError::Usage)?;
    let (proto, port) = port_proto(port_proto_text).map_err(PolicyError::Usage)?;
    for (end, text) in [(&src_end, src), (&dst_end, dst)] {
        if let Endpoint::Node(name) = end {
            if !nodes.iter().any(|n| &n.name == name) && !policy.names_node(name) {
                return Err(PolicyError::Usage(format!("no node is named {text:?}")));
            }
        }
    }
    let world = World::new(&policy, nodes);
    let mut compiled = world.compile(Arc::clone(&policy));
    let (src_tags, dst_tags) = (tag_list(&src_end), tag_list(&dst_end));
    let verdict = compiled.evaluate(
        world.node(&src_end, &src_tags),
        world.node(&dst_end, &dst_tags),
        proto,
        port,
    );
    let what = if proto == Proto::Icmp {
        "icmp".to_owned()
    } else {
        format!("{port}/{proto}")
    };
    Ok(match verdict {
        Some(i) => {
            let rule = &policy.rules[i];
            format!(
                "allowed by allow[{i}] (line {}): {}",
                rule.line,
                rule.describe()
            )
        }
        None => format!(
            "denied: no rule allows {} -> {} {what}",
            src.trim(),
            dst.trim()
        ),
    })
}

#[cfg(test)]
mod tests;
