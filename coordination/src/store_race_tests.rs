//! The store suite, continued: what several handles on one database do at
//! once (two replicas, or the server and the CLI), the TURN secret, the
//! policy counter, and a PostgreSQL that goes away and comes back.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::{enrol, net, pk, Backend};
use crate::migrations::MigrationError;
use crate::store::db::{Dialect, Mode};
use crate::store::*;

on_both!(
    tags_and_policy_are_kept_and_counted,
    the_turn_secret_is_made_once_and_shared,
    replicas_starting_together_agree_on_one_mesh_ipv6_prefix,
    two_handles_enrolling_concurrently_hand_out_distinct_names_and_addresses,
    a_single_use_key_raced_by_two_handles_enrols_one_node,
    names_repeat_with_suffixes_and_stay_labels,
    handles_opening_a_new_store_together_migrate_it_once,
    a_store_from_a_newer_version_is_refused,
);

fn tags_and_policy_are_kept_and_counted(b: &Backend) {
    let store = b.open();
    let tags = vec!["db".to_owned()];
    let (_, key) = store.create_key_with_tags(true, None, &tags, 1).unwrap();
    let r = store
        .register(&enrol(&key, 1, "a"), net("10.0.0.0/24"), 1)
        .unwrap();
    assert_eq!(r.node.tags, tags);
    let seq0 = store.policy_seq().unwrap();
    let after = store
        .tag_node("A", &["web".to_owned()], &["db".to_owned()])
        .unwrap();
    assert_eq!(after, Some(vec!["web".to_owned()]));
    assert_eq!(store.policy_seq().unwrap(), seq0 + 1);
    // No change, no count.
    store.tag_node("a", &["web".to_owned()], &[]).unwrap();
    assert_eq!(store.policy_seq().unwrap(), seq0 + 1);
    assert_eq!(store.tag_node("nobody", &[], &[]).unwrap(), None);
    assert_eq!(store.node_tags().unwrap()[&r.node.id], vec!["web"]);

    assert_eq!(store.policy().unwrap(), None);
    store.set_policy("text one").unwrap();
    store.set_policy("text two").unwrap();
    assert_eq!(store.policy().unwrap().unwrap().text, "text two");
    assert_eq!(store.policy_seq().unwrap(), seq0 + 3);
    assert!(store.clear_policy().unwrap());
    assert!(!store.clear_policy().unwrap());
    assert_eq!(store.policy_seq().unwrap(), seq0 + 4);
    // Another handle sees it all.
    let other = b.open();
    assert_eq!(other.policy_seq().unwrap(), seq0 + 4);
    assert_eq!(other.list_nodes().unwrap()[0].tags, vec!["web"]);
}

fn the_turn_secret_is_made_once_and_shared(b: &Backend) {
    let a = b.open();
    let other = b.open();
    let first = a.turn_secret(|| "first".into()).unwrap();
    assert_eq!(first, "first");
    assert_eq!(a.turn_secret(|| "second".into()).unwrap(), "first");
    assert_eq!(other.turn_secret(|| "third".into()).unwrap(), "first");
}

/// Replicas on one database, each generating its own random prefix on
/// start: the first to commit wins and every one of them uses that one.
fn replicas_starting_together_agree_on_one_mesh_ipv6_prefix(b: &Backend) {
    const REPLICAS: usize = 6;
    let start = Arc::new(Barrier::new(REPLICAS));
    let workers: Vec<_> = (0..REPLICAS)
        .map(|_| {
            let (store, start) = (b.open(), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                store.network6(None, crate::mesh6::generate).unwrap()
            })
        })
        .collect();
    let chosen: HashSet<ipnet::Ipv6Net> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(chosen.len(), 1, "{chosen:?}");
    let prefix = *chosen.iter().next().unwrap();
    assert_eq!(prefix.prefix_len(), 48);
    assert_eq!(b.open().network6(None, || unreachable!()).unwrap(), prefix);
}

fn names_repeat_with_suffixes_and_stay_labels(b: &Backend) {
    let store = b.open();
    let (_, key) = store.create_key(true, None, 1).unwrap();
    let n = net("10.0.0.0/24");
    let long = "x".repeat(63);
    let mut names = Vec::new();
    for i in 0..12u8 {
        names.push(
            store
                .register(&enrol(&key, i, &long), n, 1)
                .unwrap()
                .node
                .name,
        );
    }
    for i in 12..15u8 {
        names.push(
            store
                .register(&enrol(&key, i, "web"), n, 1)
                .unwrap()
                .node
                .name,
        );
    }
    assert_eq!(names[0], long);
    assert_eq!(names[1], format!("{}-2", "x".repeat(61)));
    assert_eq!(names[11], format!("{}-12", "x".repeat(60)));
    assert_eq!(names[12..], ["web", "web-2", "web-3"]);
    assert!(names.iter().all(|n| n.len() <= 63));
    // A name that only looks like a suffixed one does not confuse the count.
    store.remove_node("web-2", 2).unwrap();
    let again = store.register(&enrol(&key, 20, "web"), n, 3).unwrap();
    assert_eq!(again.node.name, "web-2");
}

/// Replicas that start together on an empty database all come up, on one
/// schema.
fn handles_opening_a_new_store_together_migrate_it_once(b: &Backend) {
    let start = Arc::new(Barrier::new(4));
    let location = b.location.clone();
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let (start, location) = (Arc::clone(&start), location.clone());
            std::thread::spawn(move || {
                start.wait();
                Store::open_at(&location).map(|s| s.list_nodes().map(|n| n.len()))
            })
        })
        .collect();
    for opener in openers {
        let opened = opener.join().unwrap();
        assert!(matches!(opened, Ok(Ok(0))), "{opened:?}");
    }
    assert_eq!(b.open().policy_seq().unwrap(), 0);
}

/// A schema newer than this build knows is refused, not guessed at.
fn a_store_from_a_newer_version_is_refused(b: &Backend) {
    let store = b.open();
    store
        .db
        .run(Mode::Write, |tx| match tx.dialect() {
            Dialect::Sqlite => tx.batch("PRAGMA user_version = 99"),
            Dialect::Postgres => tx
                .exec("UPDATE schema_version SET version = 99", &[])
                .map(drop),
        })
        .unwrap();
    match Store::open_at(&b.location) {
        Err(StoreError::Migration(MigrationError::TooNew { found: 99, .. })) => {}
        Err(e) => panic!("expected a too-new schema, got {e}"),
        Ok(_) => panic!("opened a schema from the future"),
    }
}

/// Registrations per handle, and threads per handle, in the race below.
const PER_HANDLE: usize = 500;
const THREADS_PER_HANDLE: usize = 2;

/// Issue #14: two replicas enrolling 500 nodes each at the same time hand
/// out 1,000 distinct names and addresses. Every node asks for the same
/// hostname, so every enrolment competes for the same next name and address.
fn two_handles_enrolling_concurrently_hand_out_distinct_names_and_addresses(b: &Backend) {
    let setup = b.open();
    let (key_id, key) = setup.create_key(true, None, 1).unwrap();
    let n = net("10.1.0.0/16");
    let handles = [Arc::new(b.open()), Arc::new(b.open())];
    let threads = handles.len() * THREADS_PER_HANDLE;
    let start = Arc::new(Barrier::new(threads));
    let began = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let store = Arc::clone(&handles[t % handles.len()]);
            let (key, start) = (key.clone(), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                (0..PER_HANDLE / THREADS_PER_HANDLE)
                    .map(|i| {
                        let mut public = [0u8; 32];
                        public[..8].copy_from_slice(&((t * 10_000 + i) as u64).to_le_bytes());
                        let req = Enrolment {
                            auth_key: key.clone(),
                            public_key: base64::Engine::encode(
                                &base64::engine::general_purpose::STANDARD,
                                public,
                            ),
                            hostname: "node".into(),
                            credential: None,
                        };
                        let r = store
                            .register(&req, n, 10)
                            .unwrap_or_else(|e| panic!("thread {t}, enrolment {i}: {e}"));
                        assert!(r.created);
                        (r.node.name, r.node.mesh_ip)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let got: Vec<_> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("enrolling thread"))
        .collect();
    eprintln!(
        "{:?}: {} enrolments on two handles in {:.2}s",
        b.location,
        got.len(),
        began.elapsed().as_secs_f64()
    );
    let total = handles.len() * PER_HANDLE;
    assert_eq!(got.len(), total);
    let names: HashSet<_> = got.iter().map(|(name, _)| name.clone()).collect();
    let addrs: HashSet<_> = got.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(names.len(), total, "a name was handed out twice");
    assert_eq!(addrs.len(), total, "an address was handed out twice");
    // What the store holds agrees, and no enrolment was counted twice or lost.
    let nodes = setup.list_nodes().unwrap();
    assert_eq!(nodes.len(), total);
    let stored: HashSet<_> = nodes.iter().map(|n| (n.name.clone(), n.mesh_ip)).collect();
    assert_eq!(stored, got.into_iter().collect::<HashSet<_>>());
    let key_row = setup
        .list_keys()
        .unwrap()
        .into_iter()
        .find(|k| k.id == key_id)
        .unwrap();
    assert_eq!(key_row.uses, total as u64);
    // Names are node, node-2, …, node-1000: none skipped, none twice.
    let expected: HashSet<String> = std::iter::once("node".to_owned())
        .chain((2..=total).map(|i| format!("node-{i}")))
        .collect();
    assert_eq!(names, expected);
}

/// A single-use key presented to two handles at once enrols exactly one node.
fn a_single_use_key_raced_by_two_handles_enrols_one_node(b: &Backend) {
    let setup = b.open();
    let n = net("10.0.0.0/24");
    for round in 0..20u8 {
        let (_, key) = setup.create_key(false, None, 1).unwrap();
        let start = Arc::new(Barrier::new(2));
        let racers: Vec<_> = (0..2u8)
            .map(|side| {
                let store = b.open();
                let (key, start) = (key.clone(), Arc::clone(&start));
                std::thread::spawn(move || {
                    let req = enrol(&key, round * 2 + side, &format!("r{round}"));
                    start.wait();
                    store.register(&req, n, 5)
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}");
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(RegisterError::AuthKey(KeyProblem::Spent)))));
    }
    assert_eq!(setup.list_nodes().unwrap().len(), 20);
    assert!(setup.list_keys().unwrap().iter().all(|k| k.uses == 1));
}

/// A database that goes away costs each call a clear error, never a panic
/// or a hang, and the same store works again once it is back.
#[test]
fn postgres_lost_and_back_fails_calls_clearly_then_recovers() {
    const TEST: &str = "postgres_lost_and_back_fails_calls_clearly_then_recovers";
    // A cluster of its own: this test stops it.
    if overlay_tests::postgres::require(TEST).is_none() {
        return;
    }
    let server = overlay_tests::postgres::Postgres::start().unwrap();
    let store = Store::open_postgres(&server.create_database().unwrap()).unwrap();
    let (_, key) = store.create_key(true, None, 1).unwrap();
    let n = net("10.0.0.0/24");
    store.register(&enrol(&key, 1, "a"), n, 1).unwrap();

    server.stop_server().unwrap();
    let began = Instant::now();
    let err = store.register(&enrol(&key, 2, "b"), n, 2).unwrap_err();
    let RegisterError::Store(e) = &err else {
        panic!("expected a store error, got {err:?}");
    };
    assert!(e.is_unavailable(), "{e}");
    let text = e.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(store.list_nodes().unwrap_err().is_unavailable());
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "failing took {:?}",
        began.elapsed()
    );

    server.start_server().unwrap();
    let back = store.register(&enrol(&key, 2, "b"), n, 3).unwrap();
    assert_eq!(back.node.name, "b");
    assert_eq!(store.list_nodes().unwrap().len(), 2);
    assert_eq!(pk(2), back.node.public_key);
}

/// Opening needs the database: a URL nobody answers is one clear error.
#[test]
fn postgres_unreachable_at_open_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "host={} port=5432 user=postgres dbname=none",
        dir.path().display()
    );
    let err = match Store::open_postgres(&url) {
        Ok(_) => panic!("opened a database that does not exist"),
        Err(e) => e,
    };
    assert!(err.is_unavailable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("cannot connect to postgres://postgres@"),
        "{text}"
    );
    assert!(Location::Postgres(url)
        .to_string()
        .starts_with("postgres://postgres@/"));
    let secret = Location::Postgres("postgres://u:hunter2@db.example/coord".into()).to_string();
    assert_eq!(secret, "postgres://u@db.example:5432/coord");
}

/// The server's last handle on the store may go in an async task: closing
/// PostgreSQL connections there must not enter the client's own runtime.
#[test]
fn a_postgres_store_dropped_in_an_async_task_closes_quietly() {
    let Some(b) = Backend::postgres("a_postgres_store_dropped_in_an_async_task_closes_quietly")
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    runtime.block_on(async {
        let location = b.location.clone();
        let store = tokio::task::spawn_blocking(move || {
            let store = Store::open_at(&location).unwrap();
            store.list_nodes().unwrap();
            store
        })
        .await
        .unwrap();
        drop(store);
    });
}
