//! The policy file (TOML) into resolved rules and tests: groups expanded,
//! `hosts` aliases replaced by their CIDRs, every entry checked. Each error
//! names the file, the 1-based line and the field: `policy.toml:9:
//! allow[0].ports: bad port "eighty": use a number from 0 to 65535`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;
use overlay_proto::filter::{is_valid_tag, PortRange, Proto, TAG_RULE};
use serde::Deserialize;
use toml::Spanned;

use super::{Endpoint, Expect, Policy, PolicyError, Rule, Selector, TestCase};
use crate::validate;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    groups: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    hosts: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<RawRule>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    src: Spanned<Vec<Spanned<String>>>,
    dst: Spanned<Vec<Spanned<String>>>,
    proto: Option<Spanned<String>>,
    ports: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    src: Spanned<String>,
    #[serde(default)]
    accept: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

/// Turns byte offsets into 1-based line numbers.
struct Lines<'a> {
    file: &'a str,
    text: &'a str,
}

impl Lines<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        // A table's span may begin with the blank lines and comments before it.
        let bytes = self.text.as_bytes();
        let mut end = span.start.min(bytes.len());
        while end < bytes.len() {
            match bytes[end] {
                b' ' | b'\t' | b'\r' | b'\n' => end += 1,
                b'#' => {
                    while end < bytes.len() && bytes[end] != b'\n' {
                        end += 1;
                    }
                }
                _ => break,
            }
        }
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn err(&self, span: Range<usize>, field: &str, what: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            file: self.file.to_owned(),
            line: self.line(span),
            what: format!("{field}: {}", what.into()),
        }
    }
}

/// What a group member may be.
enum Member {
    Node(String),
    Tag(String),
}

fn tag(text: &str) -> Result<String, String> {
    let name = text.strip_prefix("tag:").unwrap_or(text);
    if is_valid_tag(name) {
        Ok(name.to_owned())
    } else {
        Err(format!("bad tag {text:?}: {TAG_RULE}"))
    }
}

fn node_name(text: &str) -> Result<String, String> {
    if text.contains(':') {
        return Err(format!(
            "unknown entry {text:?}: use *, a node name, tag:NAME, group:NAME, a hosts alias or a CIDR"
        ));
    }
    validate::hostname(text).map_err(|e| format!("bad node name {text:?}: {e}"))
}

fn cidr(text: &str) -> Option<IpNet> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Some(net.trunc());
    }
    text.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Parses and resolves a policy file; `file` is only used in messages.
pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
    let lines = Lines { file, text };
    let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Invalid {
        file: file.to_owned(),
        line: e.span().map(|s| lines.line(s)).unwrap_or(1),
        what: e.message().trim().to_owned(),
    })?;
    let mut policy = Policy {
        file: file.to_owned(),
        ..Policy::default()
    };

    let mut hosts: HashMap<String, IpNet> = HashMap::new();
    for (name, value) in &raw.hosts {
        let field = format!("hosts.{name}");
        let net = cidr(value.get_ref()).ok_or_else(|| {
            lines.err(
                value.span(),
                &field,
                format!(
                    "bad address {:?}: use a CIDR or an IP address",
                    value.get_ref()
                ),
            )
        })?;
        hosts.insert(name.clone(), net);
    }

    let mut groups: HashMap<String, Vec<Member>> = HashMap::new();
    for (name, members) in &raw.groups {
        let field = format!("groups.{name}");
        let mut resolved = Vec::new();
        for member in members.get_ref() {
            let text = member.get_ref().as_str();
            let m = if text.starts_with("tag:") {
                Member::Tag(tag(text).map_err(|e| lines.err(member.span(), &field, e))?)
            } else if text.contains(':') {
                return Err(lines.err(
                    member.span(),
                    &field,
                    format!("bad member {text:?}: a group holds node names and tag:NAME entries"),
                ));
            } else {
                let name = node_name(text).map_err(|e| lines.err(member.span(), &field, e))?;
                policy.note_node(&name, lines.line(member.span()));
                Member::Node(name)
            };
            resolved.push(m);
        }
        groups.insert(name.clone(), resolved);
    }

    for (index, rule) in raw.allow.iter().enumerate() {
        let line = lines.line(rule.span());
        let raw_rule = rule.get_ref();
        let field = |name: &str| format!("allow[{index}].{name}");
        let mut side = |entries: &Spanned<Vec<Spanned<String>>>, name: &str| {
            if entries.get_ref().is_empty() {
                return Err(lines.err(
                    entries.span(),
                    &field(name),
                    "empty: name at least one entry (or \"*\")",
                ));
            }
            let mut selectors = Vec::new();
            let mut texts = Vec::new();
            for entry in entries.get_ref() {
                let text = entry.get_ref().trim();
                let at = |e: String| lines.err(entry.span(), &field(name), e);
                if text == "*" {
                    selectors.push(Selector::Any);
                } else if text.starts_with("tag:") {
                    selectors.push(Selector::Tag(tag(text).map_err(at)?));
                } else if let Some(g) = text.strip_prefix("group:") {
                    let members = groups
                        .get(g)
                        .ok_or_else(|| at(format!("unknown group {g:?}")))?;
                    selectors.extend(members.iter().map(|m| match m {
                        Member::Node(n) => Selector::Node(n.clone()),
                        Member::Tag(t) => Selector::Tag(t.clone()),
                    }));
                } else if let Some(net) = hosts.get(text) {
                    selectors.push(Selector::Cidr(*net));
                } else if let Some(net) = cidr(text) {
                    selectors.push(Selector::Cidr(net));
                } else if text.contains(':') || text.contains('/') {
                    return Err(at(format!(
                        "unknown entry {text:?}: use *, a node name, tag:NAME, group:NAME, a hosts alias or a CIDR"
                    )));
                } else {
                    let n = node_name(text).map_err(at)?;
                    policy.note_node(&n, lines.line(entry.span()));
                    selectors.push(Selector::Node(n));
                }
                texts.push(text.to_owned());
            }
            Ok((selectors, texts))
        };
        let (src, src_text) = side(&raw_rule.src, "src")?;
        let (dst, dst_text) = side(&raw_rule.dst, "dst")?;
        let proto = match &raw_rule.proto {
            None => Proto::Any,
            Some(p) => p
                .get_ref()
                .parse::<Proto>()
                .map_err(|e| lines.err(p.span(), &field("proto"), e))?,
        };
        let ports = match (&raw_rule.ports, proto.has_ports()) {
            (None, true) => vec![PortRange::ALL],
            (None, false) => Vec::new(),
            (Some(ports), true) => {
                if ports.get_ref().is_empty() {
                    return Err(lines.err(ports.span(), &field("ports"), "empty: leave it out for every port"));
                }
                let mut parsed = Vec::new();
                for p in ports.get_ref() {
                    parsed.push(
                        p.get_ref()
                            .parse::<PortRange>()
                            .map_err(|e| lines.err(p.span(), &field("ports"), e))?,
                    );
                }
                parsed
            }
            // `any` with every port is what leaving ports out means.
            (Some(ports), false)
                if proto == Proto::Any
                    && ports.get_ref().iter().all(|p| p.get_ref().trim() == "*") =>
            {
                Vec::new()
            }
            (Some(ports), false) => {
                return Err(lines.err(
                    ports.span(),
                    &field("ports"),
                    format!("ports do not apply to proto \"{proto}\": use proto \"tcp\" or \"udp\", or leave ports out"),
                ))
            }
        };
        policy.rules.push(Rule {
            index,
            line,
            src,
            dst,
            src_text,
            dst_text,
            proto,
            ports,
        });
    }

    for (index, test) in raw.test.iter().enumerate() {
        let field = |name: &str| format!("test[{index}].{name}");
        let src = endpoint(test.get_ref().src.get_ref())
            .map_err(|e| lines.err(test.get_ref().src.span(), &field("src"), e))?;
        if let Endpoint::Node(n) = &src {
            policy.note_node(n, lines.line(test.get_ref().src.span()));
        }
        let mut expect = Vec::new();
        for (allow, list, name) in [
            (true, &test.get_ref().accept, "accept"),
            (false, &test.get_ref().deny, "deny"),
        ] {
            for entry in list {
                let (dst, proto, port) = target(entry.get_ref())
                    .map_err(|e| lines.err(entry.span(), &field(name), e))?;
                if let Endpoint::Node(n) = &dst {
                    policy.note_node(n, lines.line(entry.span()));
                }
                expect.push(Expect {
                    allow,
                    dst,
                    proto,
                    port,
                    text: entry.get_ref().trim().to_owned(),
                });
            }
        }
        policy.tests.push(TestCase {
            index,
            line: lines.line(test.span()),
            src,
            src_text: test.get_ref().src.get_ref().trim().to_owned(),
            expect,
        });
    }
    Ok(policy)
}

/// A test's or `explain`'s endpoint: a node name or `tag:NAME`.
pub fn endpoint(text: &str) -> Result<Endpoint, String> {
    let text = text.trim();
    if text.starts_with("tag:") {
        Ok(Endpoint::Tag(tag(text)?))
    } else {
        node_name(text)
            .map(Endpoint::Node)
            .map_err(|_| format!("bad endpoint {text:?}: use a node name or tag:NAME"))
    }
}

/// `PORT/PROTO` (tcp, udp) or `icmp`, as `explain` takes it.
pub fn port_proto(text: &str) -> Result<(Proto, u16), String> {
    let text = text.trim();
    if text == "icmp" {
        return Ok((Proto::Icmp, 0));
    }
    let Some((port, proto)) = text.split_once('/') else {
        return Err(format!("bad port {text:?}: use PORT/tcp, PORT/udp or icmp"));
    };
    let proto: Proto = proto.parse()?;
    match proto {
        Proto::Tcp | Proto::Udp => {}
        Proto::Icmp => return Ok((Proto::Icmp, 0)),
        Proto::Any => return Err(format!("bad protocol in {text:?}: use tcp, udp or icmp")),
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("bad port {port:?}: use a number from 0 to 65535"))?;
    Ok((proto, port))
}

/// A test target: `DST:PORT/PROTO` or `DST/icmp`.
fn target(text: &str) -> Result<(Endpoint, Proto, u16), String> {
    let text = text.trim();
    let shape = || format!("bad target {text:?}: use DST:PORT/tcp, DST:PORT/udp or DST/icmp");
    let (left, proto) = text.rsplit_once('/').ok_or_else(shape)?;
    if proto == "icmp" {
        return Ok((endpoint(left)?, Proto::Icmp, 0));
    }
    let (dst, port) = left.rsplit_once(':').ok_or_else(shape)?;
    let (proto, port) = port_proto(&format!("{port}/{proto}"))?;
    Ok((endpoint(dst)?, proto, port))
}
