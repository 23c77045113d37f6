//! `serve --database`: the coordinator on a PostgreSQL the test starts
//! itself (`overlay_tests::postgres`). Enrolment and reconnection while the
//! database is down are refused with one clear line (HTTP 503), and work
//! again once it is back;
//! the TURN secret is the database's, the same for every replica.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use overlay_coord::store::{now_unix, Location, Store};
use overlay_tests::postgres::{self, Postgres};

/// Runs a store call where the synchronous PostgreSQL client may block.
async fn on_store<T: Send + 'static>(
    location: &Location,
    f: impl FnOnce(&Store) -> T + Send + 'static,
) -> T {
    let location = location.clone();
    tokio::task::spawn_blocking(move || f(&Store::open_at(&location).expect("open store")))
        .await
        .expect("store task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_on_postgres_is_refused_while_it_is_down_and_works_once_it_is_back() {
    const TEST: &str =
        "enrolment_on_postgres_is_refused_while_it_is_down_and_works_once_it_is_back";
    if postgres::require(TEST).is_none() {
        return;
    }
    // A cluster of its own: this test stops it.
    let pg = Arc::new(
        tokio::task::spawn_blocking(Postgres::start)
            .await
            .unwrap()
            .expect("start PostgreSQL"),
    );
    let url = {
        let pg = Arc::clone(&pg);
        tokio::task::spawn_blocking(move || pg.create_database())
            .await
            .unwrap()
            .expect("create database")
    };
    let srv = TestServer::start_with(|c| {
        c.database = Some(url.clone());
        c.turn.secret = None;
    })
    .await;
    let location = srv.config.store_location();
    assert!(matches!(location, Location::Postgres(_)));
    let key = on_store(&location, |s| {
        s.create_key(true, None, now_unix()).unwrap().1
    })
    .await;

    let first = srv.register_ok(&key, &NodeKey::random(), "web").await;
    assert_eq!(first.name, "web");
    // The TURN secret the server generated is the database's.
    let secret = on_store(&location, |s| s.turn_secret(|| "another".into()).unwrap()).await;
    assert_ne!(secret, "another");
    assert!(!srv.config.state_dir.join("turn-secret").exists());

    {
        let pg = Arc::clone(&pg);
        tokio::task::spawn_blocking(move || pg.stop_server())
            .await
            .unwrap()
            .expect("stop PostgreSQL");
    }
    let node = NodeKey::random();
    let (status, body) = srv.register(&key, &node, "db").await;
    assert_eq!(status, 503, "{body}");
    let refusal = api_error(&body);
    assert!(
        refusal.message.contains("database is unavailable"),
        "{body}"
    );
    assert!(!refusal.message.contains('\n'), "{body}");
    // A node reconnecting meanwhile is told the same, not "internal error".
    match Node::connect(srv.addr, first.node_id, &first.credential).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        Err(e) => panic!("expected HTTP 503, got {e}"),
        Ok(_) => panic!("a session opened while the database was down"),
    }

    {
        let pg = Arc::clone(&pg);
        tokio::task::spawn_blocking(move || pg.start_server())
            .await
            .unwrap()
            .expect("start PostgreSQL again");
    }
    // The first call after the restart may still meet a connection the
    // restart broke; within a few tries the store has reconnected.
    let mut last = (0, String::new());
    for _ in 0..5 {
        last = srv.register(&key, &node, "db").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last.0, 200, "{}", last.1);
    let nodes = on_store(&location, |s| s.list_nodes().unwrap()).await;
    assert_eq!(nodes.len(), 2);
}

/// TLS to PostgreSQL from the database URL, as libpq takes it:
/// `sslmode=verify-full&sslrootcert=CA` reaches a server that refuses
/// anything but TLS (`hostssl` only); a plain URL is refused by the server,
/// and TLS without the CA by us, each in one line that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reaches_a_tls_only_postgres_with_the_ca_named_in_the_url() {
    const TEST: &str = "the_store_reaches_a_tls_only_postgres_with_the_ca_named_in_the_url";
    if postgres::require(TEST).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pems = overlay_coord::selfsigned::generate(&["127.0.0.1".parse().unwrap()], &[], 1)
        .expect("certificates");
    let ca = dir.path().join("db-ca.pem");
    std::fs::write(&ca, &pems.ca).unwrap();
    let pg = tokio::task::spawn_blocking(move || Postgres::start_tls(&pems.cert, &pems.key))
        .await
        .unwrap()
        .expect("start PostgreSQL with TLS");
    let port = pg.tls_port().expect("a TLS port");
    let base = format!("postgres://postgres@127.0.0.1:{port}/postgres");

    let tls = Location::Postgres(format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    ));
    let key = on_store(&tls, |s| s.create_key(true, None, now_unix()).unwrap().1).await;
    assert!(key.starts_with("ovk_"), "{key}");

    let open_err = |url: String| async move {
        tokio::task::spawn_blocking(move || Store::open_at(&Location::Postgres(url)).err())
            .await
            .unwrap()
            .map(|e| e.to_string())
            .expect("refused")
    };
    let plain = open_err(base.clone()).await;
    assert!(plain.contains("no encryption"), "{plain}");
    let untrusted = open_err(format!("{base}?sslmode=require")).await;
    eprintln!("plain: {plain}\nwithout the CA: {untrusted}");
    assert!(
        untrusted.contains("certificate") && untrusted.contains("sslrootcert=PATH"),
        "{untrusted}"
    );
    drop(pg);
}
