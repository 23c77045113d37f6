//! The `overlay-coord` binary: admin commands, errors, serve and SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use overlay_proto::coord::ServerMsg;

const BIN: &str = env!("CARGO_BIN_EXE_overlay-coord");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .output()
        .expect("run overlay-coord")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn keys_create_prints_only_the_key_and_keys_can_be_listed_and_revoked() {
    let dir = temp_dir("cli-keys");
    let o = run(dir.path(), &["keys", "create"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(
        out.lines().count(),
        1,
        "stdout must be the key only: {out:?}"
    );
    assert!(out.trim().starts_with("ovk_"));
    assert!(!stderr(&o).is_empty(), "explanation goes to stderr");

    let o = run(
        dir.path(),
        &["keys", "create", "--reusable", "--expires", "24h"],
    );
    assert!(o.status.success());
    let o = run(dir.path(), &["keys", "revoke", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = run(dir.path(), &["keys", "list", "--json"]);
    let keys: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys[0]["revoked_at"].is_u64());
    assert_eq!(keys[1]["reusable"], true);
    assert!(keys[1]["expires_at"].is_u64());
    let o = run(dir.path(), &["keys", "list"]);
    assert!(stdout(&o).contains("revoked"));
    assert!(!stdout(&o).contains("ovk_"), "keys are never shown again");
}

#[test]
fn errors_are_one_clear_line() {
    let dir = temp_dir("cli-err");
    for args in [
        &["keys", "revoke", "42"][..],
        &["nodes", "remove", "nobody"][..],
        &["serve", "--listen", "127.0.0.1:0"][..],
    ] {
        let o = run(dir.path(), args);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("overlay-coord: error: "), "{err}");
        assert!(!err.contains("panicked"));
    }
    let o = run(dir.path(), &["serve", "--listen", "127.0.0.1:0"]);
    assert!(stderr(&o).contains("--allow-http"));

    let config = dir.path().join("coord.toml");
    std::fs::write(&config, "allow_http = true\nlisten_port = 3\n").unwrap();
    let o = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("coord.toml") && err.contains("listen_port"),
        "{err}"
    );
}

struct Serving {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Serving {
    serve_with(dir, &[])
}

fn serve_with(dir: &Path, extra: &[&str]) -> Serving {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--allow-http",
            "--listen",
            "127.0.0.1:0",
            "--stun-port",
            "0",
        ])
        .args(extra)
        .arg("--state-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(DEADLINE)
        .expect("serve logs its address")
        .parse()
        .expect("an address");
    Serving { child, addr }
}

#[tokio::test]
async fn serve_runs_admin_commands_alongside_and_stops_on_sigterm() {
    let dir = temp_dir("cli-serve");
    let key = stdout(&run(dir.path(), &["keys", "create"]))
        .trim()
        .to_string();
    let mut serving = serve(dir.path());

    let srv_addr = serving.addr;
    let reg = register_at(srv_addr, &key, &NodeKey::random(), "cli-node").await;
    let mut node = Node::connect(srv_addr, reg.node_id, &reg.credential)
        .await
        .unwrap();
    assert!(matches!(node.welcome().await, ServerMsg::Welcome { .. }));

    wait_until("nodes list to show the node online", || async {
        let o = run(dir.path(), &["nodes", "list", "--json"]);
        let nodes: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        nodes[0]["name"] == "cli-node" && nodes[0]["online"] == true
    })
    .await;
    let table = stdout(&run(dir.path(), &["nodes", "list"]));
    assert!(
        table.contains("cli-node") && table.contains("100.64.0.1"),
        "{table}"
    );

    let o = run(dir.path(), &["nodes", "remove", "cli-node"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let frame = node.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4003);

    let kill = Command::new("kill")
        .args(["-TERM", &serving.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = serving.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// Issue 8, finding 10: `keys revoke --remove-nodes` removes what the key
/// enrolled, and the running server closes those sessions; plain revoke only
/// stops new enrolments.
#[tokio::test]
async fn revoke_with_remove_nodes_removes_the_keys_nodes_and_closes_their_sessions() {
    let dir = temp_dir("cli-revoke");
    let leaked = stdout(&run(dir.path(), &["keys", "create", "--reusable"]))
        .trim()
        .to_string();
    let other = stdout(&run(dir.path(), &["keys", "create"]))
        .trim()
        .to_string();
    let serving = serve(dir.path());
    let addr = serving.addr;

    let bad1 = register_at(addr, &leaked, &NodeKey::random(), "bad-1").await;
    let _bad2 = register_at(addr, &leaked, &NodeKey::random(), "bad-2").await;
    let good = register_at(addr, &other, &NodeKey::random(), "good").await;
    let mut bad_session = Node::connect(addr, bad1.node_id, &bad1.credential)
        .await
        .unwrap();
    bad_session.welcome().await;
    let mut good_session = Node::connect(addr, good.node_id, &good.credential)
        .await
        .unwrap();
    good_session.welcome().await;

    // Plain revoke of the other key: its node stays, and says so.
    let o = run(dir.path(), &["keys", "revoke", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("--remove-nodes"), "{}", stderr(&o));

    let o = run(dir.path(), &["keys", "revoke", "1", "--remove-nodes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(said.contains("bad-1") && said.contains("bad-2"), "{said}");

    let frame = bad_session.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4003);
    good_session
        .send(&overlay_proto::coord::ClientMsg::Ping { nonce: 1 })
        .await;
    good_session
        .expect_msg("pong", |m| *m == ServerMsg::Pong { nonce: 1 })
        .await;
    let o = run(dir.path(), &["nodes", "list", "--json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["good"]);
    assert!(Node::connect(addr, bad1.node_id, &bad1.credential)
        .await
        .is_err());

    let help = stdout(&run(dir.path(), &["keys", "revoke", "--help"]));
    assert!(
        help.contains("--remove-nodes") && help.contains("stay"),
        "{help}"
    );
}

/// Issue 11: `--dns-domain` and `--no-dns` reach the nodes; a bad domain is
/// one line that names the flag.
#[tokio::test]
async fn serve_tells_nodes_the_dns_domain_or_that_dns_is_off() {
    for (extra, expected) in [
        (
            &["--dns-domain", "Corp.Internal."][..],
            Some("corp.internal"),
        ),
        (&["--no-dns"][..], None),
    ] {
        let dir = temp_dir("cli-dns");
        let key = stdout(&run(dir.path(), &["keys", "create"]))
            .trim()
            .to_string();
        let serving = serve_with(dir.path(), extra);
        let reg = register_at(serving.addr, &key, &NodeKey::random(), "n").await;
        let mut node = Node::connect(serving.addr, reg.node_id, &reg.credential)
            .await
            .unwrap();
        node.welcome().await;
        let got = match node.next().await {
            Event::Msg(ServerMsg::Dns { dns }) => dns,
            other => panic!("{extra:?}: {other:?} after the Welcome"),
        };
        match (got, expected) {
            (Some(dns), Some(domain)) => {
                assert_eq!(dns.domain, domain);
                assert_eq!(dns.resolver.to_string(), "100.100.100.100");
            }
            (None, None) => {}
            (got, _) => panic!("{extra:?}: {got:?}"),
        }
    }

    let dir = temp_dir("cli-dns-bad");
    let o = run(
        dir.path(),
        &[
            "serve",
            "--allow-http",
            "--listen",
            "127.0.0.1:0",
            "--dns-domain",
            "my_mesh.internal",
        ],
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--dns-domain") && err.contains("`_`"), "{err}");
    let o = run(
        dir.path(),
        &[
            "serve",
            "--allow-http",
            "--no-dns",
            "--dns-domain",
            "x.internal",
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--no-dns"), "{}", stderr(&o));
}

#[tokio::test]
async fn nodes_list_shows_the_mesh_ipv6_and_a_changed_network6_is_one_clear_error() {
    let dir = temp_dir("cli-ipv6");
    let key = stdout(&run(dir.path(), &["keys", "create"]))
        .trim()
        .to_string();
    let serving = serve_with(dir.path(), &["--network6", "fd12:3456:789a::/48"]);
    let reg = register_at(serving.addr, &key, &NodeKey::random(), "six").await;
    assert_eq!(
        reg.network6.map(|n| n.to_string()).as_deref(),
        Some("fd12:3456:789a::/48")
    );
    let expected = overlay_proto::coord::mesh_ip6(reg.network6.unwrap(), reg.mesh_ip).to_string();
    let o = run(dir.path(), &["nodes", "list", "--json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(nodes[0]["mesh_ip6"], expected.as_str(), "{nodes}");
    let table = stdout(&run(dir.path(), &["nodes", "list"]));
    assert!(
        table.contains("MESH IPV6") && table.contains(&expected),
        "{table}"
    );
    drop(serving);

    // The node holds an address in the prefix: another one is refused, in
    // one line that says what to keep.
    let o = run(
        dir.path(),
        &[
            "serve",
            "--allow-http",
            "--listen",
            "127.0.0.1:0",
            "--stun-port",
            "0",
            "--network6",
            "fd00:1::/48",
        ],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("overlay-coord: error: ")
            && last.contains("keep --network6 fd12:3456:789a::/48"),
        "{err}"
    );
    // And a prefix that cannot be one never gets that far.
    for bad in ["10.0.0.0/8", "fd00::/120"] {
        let o = run(dir.path(), &["serve", "--allow-http", "--network6", bad]);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains("--network6"), "{bad}: {err}");
        assert!(!err.contains("panicked"));
    }
}
