//! The access policy through the admin CLI while the server runs: `policy
//! set` and `nodes tag` reach connected sessions as deltas within a second,
//! without reconnecting; bad files are refused and change nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use overlay_proto::coord::{RegisterResponse, ServerMsg};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_overlay-coord");
/// What the issue promises for a policy or tag change to reach the nodes.
const PROPAGATION: Duration = Duration::from_secs(1);

const POLICY: &str = r#"# dev may ssh to the servers; servers talk freely.
[groups]
dev = ["dev1"]

[[allow]]
src = ["group:dev"]
dst = ["tag:server"]
proto = "tcp"
ports = ["22"]

[[allow]]
src = ["tag:server"]
dst = ["tag:server"]

[[test]]
src = "dev1"
accept = ["tag:server:22/tcp"]
deny = ["tag:server:80/tcp"]
"#;

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .output()
        .expect("run overlay-coord")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn refused(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(!o.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Reads messages until `done` holds for all read so far; panics after `within`.
async fn collect(
    node: &mut Node,
    within: Duration,
    what: &str,
    done: impl Fn(&[ServerMsg]) -> bool,
) -> Vec<ServerMsg> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match node.next_within(left).await {
            Some(Event::Msg(m)) => got.push(m),
            Some(Event::Relay(_)) => {}
            Some(Event::Closed(f)) => panic!("closed ({f:?}) waiting for {what}; got {got:?}"),
            None => panic!("no {what} within {within:?}; got {got:?}"),
        }
    }
    got
}

fn removed(msgs: &[ServerMsg]) -> Vec<u64> {
    let mut ids: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            ServerMsg::PeerRemoved { id } => Some(*id),
            _ => None,
        })
        .collect();
    ids.sort();
    ids
}

fn upserted(msgs: &[ServerMsg]) -> Vec<u64> {
    let mut ids: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            ServerMsg::PeerUpsert { peer } => Some(peer.id),
            _ => None,
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

fn has_filter(msgs: &[ServerMsg]) -> bool {
    msgs.iter().any(|m| matches!(m, ServerMsg::Filter { .. }))
}

async fn online(srv: &TestServer, reg: &RegisterResponse) -> Node {
    let mut node = srv.connect(reg).await;
    node.welcome().await;
    node
}

#[tokio::test]
async fn policy_and_tag_changes_reach_sessions_as_deltas_within_a_second() {
    let srv = TestServer::start().await;
    let dir = srv.dir.path().to_path_buf();
    let server_key = ok(&dir, &["keys", "create", "--reusable", "--tag", "server"]);
    let s1 = srv
        .register_ok(server_key.trim(), &NodeKey::random(), "srv1")
        .await;
    let s2 = srv
        .register_ok(server_key.trim(), &NodeKey::random(), "srv2")
        .await;
    let dev = srv.new_node("dev1").await;
    let other = srv.new_node("other").await;
    assert!(ok(&dir, &["nodes", "list"]).contains("server"));

    let mut n_s1 = srv.connect(&s1).await;
    match n_s1.welcome().await {
        ServerMsg::Welcome {
            node,
            peers,
            filter,
            ..
        } => {
            assert_eq!(node.tags, vec!["server".to_string()], "tags from the key");
            assert_eq!(peers.len(), 3);
            assert_eq!(filter, None);
        }
        other => panic!("{other:?}"),
    }
    let mut n_dev = online(&srv, &dev).await;
    let mut n_other = online(&srv, &other).await;

    // A bad file is refused with its line and field, and sets nothing.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, POLICY.replace(r#"["22"]"#, r#"["eighty"]"#)).unwrap();
    let bad = bad.to_str().unwrap();
    let err = refused(&dir, &["policy", "set", bad]);
    assert!(
        err.contains(&format!(
            "{bad}:9: allow[0].ports: bad port \"eighty\": use a number from 0 to 65535"
        )),
        "{err}"
    );
    // So is a file whose own test fails.
    let failing = dir.join("failing.toml");
    std::fs::write(
        &failing,
        POLICY.replace("tag:server:80/tcp", "tag:server:22/tcp"),
    )
    .unwrap();
    let err = refused(&dir, &["policy", "set", failing.to_str().unwrap()]);
    assert!(
        err.contains(
            "policy test failed: dev1 -> tag:server:22/tcp should be denied but allow[0] allows it"
        ),
        "{err}"
    );
    assert_eq!(ok(&dir, &["policy", "get"]), "");

    let file = dir.join("policy.toml");
    std::fs::write(&file, POLICY).unwrap();
    let file = file.to_str().unwrap();
    assert_eq!(
        ok(&dir, &["policy", "check", file]).trim(),
        "ok: 2 rules, 1 test passed"
    );
    ok(&dir, &["policy", "set", file]);
    let set_at = Instant::now();
    assert_eq!(ok(&dir, &["policy", "get"]), POLICY, "stored verbatim");

    // `other` is in no rule: it loses every peer and gets a deny-all filter.
    let got = collect(&mut n_other, PROPAGATION, "other's removals", |m| {
        removed(m).len() == 3 && has_filter(m)
    })
    .await;
    assert_eq!(removed(&got), vec![s1.node_id, s2.node_id, dev.node_id]);
    assert!(got.contains(&ServerMsg::Filter {
        filter: Some(Default::default())
    }));
    collect(&mut n_dev, PROPAGATION, "dev's removal of other", |m| {
        removed(m) == vec![other.node_id] && has_filter(m)
    })
    .await;
    collect(&mut n_s1, PROPAGATION, "srv1's filter", |m| {
        removed(m) == vec![other.node_id] && has_filter(m)
    })
    .await;
    println!(
        "policy set → deltas at every session in {:?}",
        set_at.elapsed()
    );

    assert_eq!(
        ok(&dir, &["policy", "explain", "dev1", "srv1", "22/tcp"]).trim(),
        "allowed by allow[0] (line 5): group:dev -> tag:server tcp 22"
    );
    assert_eq!(
        ok(&dir, &["policy", "explain", "srv1", "dev1", "22/tcp"]).trim(),
        "denied: no rule allows srv1 -> dev1 22/tcp"
    );

    // Tagging `other` as a server shows it to dev and the servers.
    assert_eq!(
        ok(&dir, &["nodes", "tag", "other", "+server", "-nothing"]).trim(),
        "other: server"
    );
    assert!(
        refused(&dir, &["nodes", "tag", "nobody", "+server"]).contains("no node named \"nobody\"")
    );
    assert!(refused(&dir, &["nodes", "tag", "other", "+Bad"]).contains("a tag is 1 to 63"));
    let got = collect(&mut n_dev, PROPAGATION, "dev's upsert of other", |m| {
        upserted(m) == vec![other.node_id]
    })
    .await;
    assert!(got.iter().any(|m| matches!(m,
        ServerMsg::PeerUpsert { peer } if peer.id == other.node_id && peer.tags == vec!["server".to_string()])));
    collect(&mut n_other, PROPAGATION, "other's peers back", |m| {
        upserted(m) == vec![s1.node_id, s2.node_id, dev.node_id] && has_filter(m)
    })
    .await;

    // Clearing the policy: filters lifted, everyone visible again.
    ok(&dir, &["policy", "clear"]);
    collect(&mut n_dev, PROPAGATION, "dev's filter lifted", |m| {
        m.contains(&ServerMsg::Filter { filter: None })
    })
    .await;
    let o = run(&dir, &["policy", "get"]);
    assert!(o.status.success() && o.stdout.is_empty());
}
