//! The mesh's DNS settings on the control stream: what a node is told after
//! its netmap, from the config file's `[dns]` and from `--no-dns`. The flags
//! of the binary itself are in `cli.rs`.

mod common;

use std::path::Path;

use common::*;
use overlay_coord::config::{parse_file, Config, Overrides};
use overlay_proto::coord::{DnsConfig, DnsRecord, ServerMsg};

fn flags() -> Overrides {
    Overrides {
        allow_http: true,
        no_embedded_turn: true,
        ..Overrides::default()
    }
}

/// The first messages of a session up to and including `Dns`.
async fn until_dns(node: &mut Node) -> (Vec<ServerMsg>, Option<DnsConfig>) {
    let mut before = Vec::new();
    loop {
        match node.next().await {
            Event::Msg(ServerMsg::Dns { dns }) => return (before, dns),
            Event::Msg(m) => before.push(m),
            other => panic!("{other:?} before the DNS settings"),
        }
    }
}

#[tokio::test]
async fn dns_settings_follow_the_welcome_on_every_connect() {
    let srv = TestServer::start_with(|c| {
        let file = parse_file(
            Path::new("c.toml"),
            "[dns]\ndomain = \"Mesh.Internal\"\n[[dns.records]]\nname = \"grafana\"\nip = \"100.64.0.9\"\n",
        )
        .unwrap();
        c.dns = Config::resolve(Some((Path::new("c.toml"), file)), flags())
            .unwrap()
            .dns;
    })
    .await;
    let a = srv.new_node("a").await;
    let expected = DnsConfig {
        domain: "mesh.internal".into(),
        resolver: "100.100.100.100".parse().unwrap(),
        records: vec![DnsRecord {
            name: "grafana.mesh.internal".into(),
            ip: "100.64.0.9".parse().unwrap(),
        }],
    };
    for _ in 0..2 {
        let mut node = srv.connect(&a).await;
        let (before, dns) = until_dns(&mut node).await;
        assert!(
            matches!(&before[..], [ServerMsg::Welcome { more: false, .. }]),
            "{before:?}"
        );
        assert_eq!(dns.as_ref(), Some(&expected));
        node.ws.close(None).await.ok();
    }
}

#[tokio::test]
async fn with_no_dns_nodes_are_told_the_resolver_is_off() {
    let srv = TestServer::start_with(|c| {
        let flags = Overrides {
            no_dns: true,
            ..flags()
        };
        c.dns = Config::resolve(None, flags).unwrap().dns;
    })
    .await;
    let a = srv.new_node("a").await;
    let mut node = srv.connect(&a).await;
    let (before, dns) = until_dns(&mut node).await;
    assert!(
        matches!(&before[..], [ServerMsg::Welcome { .. }]),
        "{before:?}"
    );
    assert_eq!(dns, None);
}
