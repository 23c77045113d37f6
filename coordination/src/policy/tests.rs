use super::*;
use overlay_proto::filter::{FilterRule, Principal};

const POLICY: &str = r#"
# dev may ssh to and ping the servers; servers talk to each other freely.
[groups]
dev = ["dev1", "tag:laptop"]

[hosts]
office = "100.64.3.0/24"

[[allow]]
src = ["group:dev"]
dst = ["tag:server"]
proto = "tcp"
ports = ["22", "8000-8100"]

[[allow]]
src = ["group:dev", "office"]
dst = ["tag:server"]
proto = "icmp"

[[allow]]
src = ["tag:server"]
dst = ["tag:server"]

[[test]]
src = "dev1"
accept = ["tag:server:22/tcp", "tag:server/icmp", "srv1:8050/tcp"]
deny = ["tag:server:80/tcp", "tag:server:22/udp"]
"#;

fn node(id: NodeId, name: &str, tags: &[&str]) -> NodeDesc {
    NodeDesc {
        id,
        name: name.into(),
        ip: Ipv4Addr::new(100, 64, 0, id as u8),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

fn mesh() -> Vec<NodeDesc> {
    vec![
        node(1, "dev1", &[]),
        node(2, "srv1", &["server"]),
        node(3, "srv2", &["server", "db"]),
        node(4, "other", &[]),
    ]
}

fn err(text: &str) -> String {
    parse("p.toml", text).unwrap_err().to_string()
}

fn compiled(text: &str, nodes: &[NodeDesc]) -> Compiled {
    let policy = Arc::new(parse("p.toml", text).unwrap());
    Compiled::new(policy, nodes.iter().map(|n| (n.name.as_str(), n.id)))
}

#[test]
fn the_example_policy_checks_and_counts_rules_and_tests() {
    let checked = check("p.toml", POLICY, &mesh()).unwrap();
    assert_eq!(checked.summary(), "ok: 3 rules, 1 test passed");
    assert!(checked.warnings.is_empty(), "{:?}", checked.warnings);
    let rule = &checked.policy.rules[0];
    assert_eq!(rule.line, 9, "the line of its [[allow]] header");
    assert_eq!(rule.describe(), "group:dev -> tag:server tcp 22,8000-8100");
}

#[test]
fn a_bad_port_names_file_line_and_field() {
    let text = "[[allow]]\nsrc = [\"*\"]\ndst = [\"*\"]\nproto = \"tcp\"\nports = [\"22\",\n  \"eighty\"]\n";
    assert_eq!(
        err(text),
        "p.toml:6: allow[0].ports: bad port \"eighty\": use a number from 0 to 65535"
    );
}

#[test]
fn unknown_fields_groups_and_aliases_are_errors_with_lines() {
    assert!(
        err("[[allow]]\nsrc = [\"*\"]\ndst = [\"*\"]\nport = [\"22\"]\n").starts_with("p.toml:4: ")
    );
    assert_eq!(
        err("[[allow]]\nsrc = [\"group:ops\"]\ndst = [\"*\"]\n"),
        "p.toml:2: allow[0].src: unknown group \"ops\""
    );
    assert!(err("[[allow]]\nsrc = [\"*\"]\ndst = [\"host:x\"]\n")
        .starts_with("p.toml:3: allow[0].dst: unknown entry"));
    assert!(err("[hosts]\nlab = \"not-a-net\"\n").starts_with("p.toml:2: hosts.lab: bad address"));
    assert!(err("[groups]\nops = [\"tag:Bad\"]\n")
        .starts_with("p.toml:2: groups.ops: bad tag \"tag:Bad\""));
    assert!(err("[[allow]]\nsrc = [\"*\"]\n").starts_with("p.toml:1: missing field `dst`"));
    assert!(
        err("[[allow]]\nsrc = [\"*\"]\ndst = [\"*\"]\nproto = \"sctp\"\n")
            .starts_with("p.toml:4: allow[0].proto: unknown protocol")
    );
    assert!(err("[[test]]\nsrc = \"dev1\"\naccept = [\"srv1:22\"]\n")
        .starts_with("p.toml:3: test[0].accept: bad target"));
}

#[test]
fn icmp_takes_no_ports_and_ports_default_to_all() {
    assert!(
        err("[[allow]]\nsrc = [\"*\"]\ndst = [\"*\"]\nproto = \"icmp\"\nports = [\"22\"]\n")
            .starts_with("p.toml:5: allow[0].ports: ports do not apply to proto \"icmp\"")
    );
    let p = parse(
        "p.toml",
        "[[allow]]\nsrc = [\"*\"]\ndst = [\"*\"]\nproto = \"udp\"\n",
    )
    .unwrap();
    assert_eq!(p.rules[0].ports, vec![PortRange::ALL]);
    let p = parse(
        "p.toml",
        "[[allow]]\nsrc = [\"*\"]\ndst = [\"*\"]\nports = [\"*\"]\n",
    )
    .unwrap();
    assert_eq!((p.rules[0].proto, p.rules[0].ports.len()), (Proto::Any, 0));
}

#[test]
fn a_failing_test_refuses_the_file_and_names_the_rule() {
    let text = POLICY.replace(
        r#"deny = ["tag:server:80/tcp""#,
        r#"deny = ["tag:server:22/tcp""#,
    );
    assert_eq!(
        check("p.toml", &text, &mesh()).unwrap_err().to_string(),
        "policy test failed: dev1 -> tag:server:22/tcp should be denied but allow[0] allows it (test[0], line 24)"
    );
    let text = POLICY.replace(
        r#"accept = ["tag:server:22/tcp""#,
        r#"accept = ["tag:server:23/tcp""#,
    );
    assert!(check("p.toml", &text, &mesh())
        .unwrap_err()
        .to_string()
        .contains("dev1 -> tag:server:23/tcp should be allowed but no rule allows it"));
}

#[test]
fn unknown_node_names_warn_and_tests_still_run_on_a_hypothetical_node() {
    let checked = check("p.toml", POLICY, &mesh()[1..]).unwrap();
    assert_eq!(checked.tests_passed, 1);
    assert_eq!(
        checked.warnings,
        vec!["p.toml:4: warning: no node is named \"dev1\" (yet)".to_string()]
    );
    // With no nodes at all, srv1 is a node without tags: the test fails.
    assert!(check("p.toml", POLICY, &[]).is_err());
}

#[test]
fn filters_name_nodes_by_id_tags_and_cidrs() {
    let mut c = compiled(POLICY, &mesh());
    let nodes = mesh();
    let srv = c.classify(nodes[1].as_ref());
    assert_eq!(
        srv.filter.inbound[0],
        FilterRule {
            peers: vec![Principal::Node(1), Principal::Tag("laptop".into())],
            proto: Proto::Tcp,
            ports: vec![
                PortRange::one(22),
                PortRange {
                    first: 8000,
                    last: 8100
                }
            ],
        }
    );
    assert_eq!(
        srv.filter.inbound[1].peers[2],
        "100.64.3.0/24".parse().unwrap()
    );
    assert_eq!(srv.filter.inbound[1].ports, vec![]);
    assert_eq!(
        srv.filter.outbound.len(),
        1,
        "servers may open anything to servers"
    );
    let dev = c.classify(nodes[0].as_ref());
    assert!(dev.filter.inbound.is_empty());
    assert_eq!(dev.filter.outbound.len(), 2);
    let other = c.classify(nodes[3].as_ref());
    assert_eq!(other.filter, NodeFilter::default(), "no rule: deny all");
}

use overlay_proto::filter::NodeFilter;

#[test]
fn visibility_goes_both_ways_and_the_unnamed_see_nobody() {
    let nodes = mesh();
    let mut c = compiled(POLICY, &nodes);
    let v: Vec<View> = nodes.iter().map(|n| Some(c.classify(n.as_ref()))).collect();
    assert!(
        may_see(&v[0], &v[1]) && may_see(&v[1], &v[0]),
        "dev1 and srv1"
    );
    assert!(may_see(&v[1], &v[2]), "the servers");
    for i in 0..3 {
        assert!(
            !may_see(&v[3], &v[i]) && !may_see(&v[i], &v[3]),
            "other is hidden"
        );
    }
    assert!(may_see(&None, &None), "no policy: everyone");
}

#[test]
fn nodes_with_the_same_memberships_share_one_class() {
    let nodes: Vec<NodeDesc> = (1..=1000)
        .map(|i| {
            node(
                i,
                &format!("n{i}"),
                if i % 2 == 0 { &["server"] } else { &["db"] },
            )
        })
        .collect();
    let mut c = compiled(POLICY, &nodes);
    let classes: Vec<Arc<Class>> = nodes.iter().map(|n| c.classify(n.as_ref())).collect();
    assert_eq!(c.class_count(), 2);
    assert!(Arc::ptr_eq(&classes[1], &classes[3]));
    assert_eq!(
        classes[0].filter_json,
        Arc::from(serde_json::to_string(&classes[0].filter).unwrap())
    );
}

#[test]
fn explain_names_the_rule_and_its_line_or_says_denied() {
    let policy = Arc::new(parse("p.toml", POLICY).unwrap());
    let nodes = mesh();
    assert_eq!(
        explain(Arc::clone(&policy), &nodes, "dev1", "tag:server", "22/tcp").unwrap(),
        "allowed by allow[0] (line 9): group:dev -> tag:server tcp 22,8000-8100"
    );
    assert_eq!(
        explain(Arc::clone(&policy), &nodes, "srv1", "srv2", "icmp").unwrap(),
        "allowed by allow[2] (line 20): tag:server -> tag:server any"
    );
    assert_eq!(
        explain(Arc::clone(&policy), &nodes, "dev1", "srv1", "80/tcp").unwrap(),
        "denied: no rule allows dev1 -> srv1 80/tcp"
    );
    assert_eq!(
        explain(Arc::clone(&policy), &nodes, "srv1", "dev1", "22/tcp").unwrap(),
        "denied: no rule allows srv1 -> dev1 22/tcp",
        "rules are one-way"
    );
    assert!(explain(Arc::clone(&policy), &nodes, "nobody", "srv1", "22/tcp").is_err());
    assert!(explain(policy, &nodes, "dev1", "srv1", "22").is_err());
}

#[test]
fn a_renamed_group_member_or_tag_change_moves_a_node_between_classes() {
    let mut nodes = mesh();
    let mut c = compiled(POLICY, &nodes);
    let before = c.classify(nodes[3].as_ref());
    nodes[3].tags.push("server".into());
    let after = c.classify(nodes[3].as_ref());
    assert!(!Arc::ptr_eq(&before, &after));
    let dev = Some(c.classify(nodes[0].as_ref()));
    assert!(may_see(&dev, &Some(after)) && !may_see(&dev, &Some(before)));
}
