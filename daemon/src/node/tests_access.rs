//! The access filter as the node core resolves it (see `access`).

use std::time::Instant;

use overlay_proto::coord::{IceConfig, ServerMsg};
use overlay_proto::NodeId;

use super::testkit::*;
use super::Output;

/// A filter that lets `tag:dev` open TCP 22 on us, and lets us ping `tag:dev`.
fn dev_filter() -> overlay_proto::filter::NodeFilter {
    use overlay_proto::filter::{FilterRule, NodeFilter, Proto};
    NodeFilter {
        inbound: vec![FilterRule {
            peers: vec!["tag:dev".parse().unwrap()],
            proto: Proto::Tcp,
            ports: vec!["22".parse().unwrap()],
        }],
        outbound: vec![FilterRule {
            peers: vec!["tag:dev".parse().unwrap()],
            proto: Proto::Icmp,
            ports: vec![],
        }],
    }
}

fn accesses(out: &[Output]) -> Vec<(NodeId, Option<String>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Access { peer, access } => Some((*peer, access.as_ref().map(describe))),
            Output::PeerAdded { info, access, .. } => {
                Some((info.id, access.as_ref().map(describe)))
            }
            _ => None,
        })
        .collect()
}

fn describe(a: &super::access::PeerAccess) -> String {
    format!("in {}; out {}", a.inbound, a.outbound)
}

#[test]
fn the_filter_follows_the_policy_and_the_peers_tags() {
    let t0 = Instant::now();
    let mut a = new_node(A, t0, 1);
    let mut welcome = welcome(vec![info(B, true)], IceConfig::default(), false);
    if let ServerMsg::Welcome { filter, .. } = &mut welcome {
        *filter = Some(dev_filter());
    }
    a.handle_server_msg(welcome, t0, 0);
    // B has no tags: the policy gives it nothing, from its first packet on.
    assert_eq!(
        accesses(&drain(&mut a)),
        vec![(B, Some("in nothing; out nothing".into()))]
    );
    // Tagged dev: the rules that name dev now apply to B.
    let mut dev = info(B, true);
    dev.tags = vec!["dev".into()];
    a.handle_server_msg(ServerMsg::PeerUpsert { peer: dev.clone() }, t0, 0);
    assert_eq!(
        accesses(&drain(&mut a)),
        vec![(B, Some("in tcp 22; out icmp".into()))]
    );
    // The same filter again changes nothing; clearing the policy frees B.
    a.handle_server_msg(
        ServerMsg::Filter {
            filter: Some(dev_filter()),
        },
        t0,
        0,
    );
    assert!(accesses(&drain(&mut a)).is_empty());
    a.handle_server_msg(ServerMsg::Filter { filter: None }, t0, 0);
    assert_eq!(accesses(&drain(&mut a)), vec![(B, None)]);
    assert!(a.filter().is_none() && a.access(B).is_none());
}
