//! The store suite, run on SQLite and on a PostgreSQL the tests start
//! themselves (`overlay_tests::postgres`): every test in `on_both!` runs
//! once per backend (`sqlite::NAME`, `postgres::NAME`). Without PostgreSQL
//! the `postgres::` tests fail saying what to install, unless
//! `OVERLAY_TEST_POSTGRES=skip`.

use super::*;
use base64::Engine;
use std::sync::Arc;

use overlay_tests::postgres::{self as pg, Postgres};

/// A fresh directory for a store, removed on drop.
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ovc-store-")
        .tempdir()
        .expect("create temp dir")
}

/// Where a test's store lives, kept alive as long as the test runs: a fresh
/// state directory, or a fresh database in the shared PostgreSQL.
pub(crate) struct Backend {
    pub(crate) location: Location,
    _dir: Option<tempfile::TempDir>,
    _postgres: Option<Arc<Postgres>>,
}

impl Backend {
    pub(crate) fn sqlite() -> Backend {
        let dir = temp_dir();
        Backend {
            location: Location::Sqlite(dir.path().to_path_buf()),
            _dir: Some(dir),
            _postgres: None,
        }
    }

    /// `None` when PostgreSQL is missing and the tests may skip (said on stderr).
    pub(crate) fn postgres(test: &str) -> Option<Backend> {
        let server = pg::require(test)?;
        let url = server
            .create_database()
            .unwrap_or_else(|e| panic!("{test}: {e:#}"));
        Some(Backend {
            location: Location::Postgres(url),
            _dir: None,
            _postgres: Some(server),
        })
    }

    /// A new handle on the store (another connection, as another process or
    /// replica would have).
    pub(crate) fn open(&self) -> Store {
        Store::open_at(&self.location).unwrap_or_else(|e| panic!("opening {}: {e}", self.location))
    }
}

/// Runs each named `fn NAME(&Backend)` as `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(&super::Backend::sqlite()) })*
        }
        mod postgres {
            $(#[test] fn $name() {
                if let Some(b) = super::Backend::postgres(concat!("postgres::", stringify!($name))) {
                    super::$name(&b)
                }
            })*
        }
    };
}

on_both!(
    registration_allocates_and_reregistration_keeps_id_and_ip,
    key_problems_are_reported_precisely,
    listed_keys_carry_the_tags_they_give,
    exhausted_pool_is_reported_and_does_not_spend_the_key,
    removal_frees_the_node_and_is_recorded_for_the_server,
    removed_address_is_held_back_then_reused,
    full_pool_reuses_a_held_address,
    revoking_with_removal_removes_exactly_the_keys_nodes,
    activity_is_recorded_and_reset_at_start,
    changing_network_with_nodes_is_refused,
    network6_is_made_once_and_kept,
    changing_network6_with_nodes_is_refused,
    data_survives_reopen,
);

#[path = "store_race_tests.rs"]
mod race;

pub(super) fn pk(n: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

pub(super) fn enrol(key: &str, n: u8, host: &str) -> Enrolment {
    Enrolment {
        auth_key: key.into(),
        public_key: pk(n),
        hostname: host.into(),
        credential: None,
    }
}

fn with_credential(mut e: Enrolment, credential: &str) -> Enrolment {
    e.credential = Some(credential.into());
    e
}

pub(super) fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn registration_allocates_and_reregistration_keeps_id_and_ip(b: &Backend) {
    let store = b.open();
    let (_, key) = store.create_key(true, None, 100).unwrap();
    let n = net("100.64.0.0/10");

    let a = store.register(&enrol(&key, 1, "web"), n, 100).unwrap();
    assert!(a.created);
    assert_eq!(a.node.mesh_ip, "100.64.0.1".parse::<Ipv4Addr>().unwrap());
    let b = store.register(&enrol(&key, 2, "web"), n, 100).unwrap();
    assert_eq!(b.node.name, "web-2");
    assert_eq!(b.node.mesh_ip, "100.64.0.2".parse::<Ipv4Addr>().unwrap());

    // Without the node's credential a known key changes nothing.
    for attempt in [
        enrol(&key, 1, "evil"),
        with_credential(enrol(&key, 1, "evil"), "guess"),
    ] {
        assert!(matches!(
            store.register(&attempt, n, 101),
            Err(RegisterError::AlreadyEnrolled(id)) if id == a.node.id
        ));
    }
    assert!(store
        .verify_node(a.node.id, &a.credential)
        .unwrap()
        .is_some());

    // With it, the credential rotates; name and address stay, whatever the hostname.
    let again = store
        .register(
            &with_credential(enrol(&key, 1, "renamed"), &a.credential),
            n,
            101,
        )
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.node.id, a.node.id);
    assert_eq!(again.node.mesh_ip, a.node.mesh_ip);
    assert_eq!(again.node.name, "web");
    assert_ne!(again.credential, a.credential);
    assert!(store
        .verify_node(a.node.id, &a.credential)
        .unwrap()
        .is_none());
    assert!(store
        .verify_node(a.node.id, &again.credential)
        .unwrap()
        .is_some());
}

#[test]
fn credentials_are_stored_hashed() {
    let dir = temp_dir();
    let store = Store::open(dir.path()).unwrap();
    let (_, key) = store.create_key(false, None, 1).unwrap();
    let r = store
        .register(&enrol(&key, 1, "a"), net("10.0.0.0/24"), 1)
        .unwrap();
    drop(store);
    let raw = std::fs::read(dir.path().join(DB_FILE)).unwrap();
    let wal = std::fs::read(dir.path().join(format!("{DB_FILE}-wal"))).unwrap_or_default();
    for secret in [key.as_bytes(), r.credential.as_bytes()] {
        assert!(!raw.windows(secret.len()).any(|w| w == secret));
        assert!(!wal.windows(secret.len()).any(|w| w == secret));
    }
}

fn key_problems_are_reported_precisely(b: &Backend) {
    let store = b.open();
    let n = net("10.0.0.0/24");
    let problem = |r: Result<Registered, RegisterError>| match r {
        Err(RegisterError::AuthKey(p)) => p,
        other => panic!("expected key problem, got {other:?}"),
    };
    assert_eq!(
        problem(store.register(&enrol("ovk_nope", 1, "a"), n, 10)),
        KeyProblem::Unknown
    );
    let (_, expired) = store.create_key(true, Some(10), 1).unwrap();
    assert_eq!(
        problem(store.register(&enrol(&expired, 1, "a"), n, 10)),
        KeyProblem::Expired
    );
    let (id, revoked) = store.create_key(true, None, 1).unwrap();
    assert!(store.revoke_key(id, 5).unwrap());
    assert!(!store.revoke_key(999, 5).unwrap());
    assert_eq!(
        problem(store.register(&enrol(&revoked, 1, "a"), n, 10)),
        KeyProblem::Revoked
    );
    let (_, single) = store.create_key(false, None, 1).unwrap();
    store.register(&enrol(&single, 1, "a"), n, 10).unwrap();
    assert_eq!(
        problem(store.register(&enrol(&single, 2, "b"), n, 10)),
        KeyProblem::Spent
    );
    let keys = store.list_keys().unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[2].uses, 1);
    assert!(keys.iter().all(|k| k.tags.is_empty()));
}

fn listed_keys_carry_the_tags_they_give(b: &Backend) {
    let store = b.open();
    store.create_key(true, None, 1).unwrap();
    let tags = vec!["db".to_owned(), "server".to_owned()];
    let (id, _) = store.create_key_with_tags(true, None, &tags, 1).unwrap();
    let keys = store.list_keys().unwrap();
    assert!(keys[0].tags.is_empty());
    assert_eq!((keys[1].id, &keys[1].tags), (id, &tags));
    let json = serde_json::to_string(&keys).unwrap();
    assert_eq!(json.matches("\"tags\"").count(), 1, "{json}");
}

fn exhausted_pool_is_reported_and_does_not_spend_the_key(b: &Backend) {
    let store = b.open();
    // Two hosts, and .2 is the mesh resolver's: one node.
    let n = net("10.0.0.0/30");
    let (_, reusable) = store.create_key(true, None, 1).unwrap();
    let a = store.register(&enrol(&reusable, 1, "a"), n, 1).unwrap();
    assert_eq!(a.node.mesh_ip.to_string(), "10.0.0.1");
    let (_, single) = store.create_key(false, None, 1).unwrap();
    assert!(matches!(
        store.register(&enrol(&single, 3, "c"), n, 1),
        Err(RegisterError::PoolExhausted(_))
    ));
    let keys = store.list_keys().unwrap();
    assert_eq!(keys[1].uses, 0);
}

fn removal_frees_the_node_and_is_recorded_for_the_server(b: &Backend) {
    let store = b.open();
    let (_, key) = store.create_key(true, None, 1).unwrap();
    let r = store
        .register(&enrol(&key, 1, "gone"), net("10.0.0.0/24"), 1)
        .unwrap();
    assert_eq!(store.last_removal_seq().unwrap(), 0);
    assert_eq!(store.remove_node("GONE", 2).unwrap(), Some(r.node.id));
    assert_eq!(store.remove_node("gone", 2).unwrap(), None);
    assert!(store
        .verify_node(r.node.id, &r.credential)
        .unwrap()
        .is_none());
    assert_eq!(store.removals_after(0).unwrap(), vec![(1, r.node.id)]);
    assert!(store.removals_after(1).unwrap().is_empty());
    // Ids are never reused, even after removal; the key enrols as new.
    let again = store
        .register(&enrol(&key, 1, "gone"), net("10.0.0.0/24"), 3)
        .unwrap();
    assert!(again.created);
    assert!(again.node.id > r.node.id);
}

fn removed_address_is_held_back_then_reused(b: &Backend) {
    let store = b.open();
    let (_, key) = store.create_key(true, None, 1).unwrap();
    let n = net("10.0.0.0/24");
    let a = store.register(&enrol(&key, 1, "a"), n, 1).unwrap();
    store.remove_node("a", 100).unwrap();
    let b = store.register(&enrol(&key, 2, "b"), n, 101).unwrap();
    assert_ne!(b.node.mesh_ip, a.node.mesh_ip, "held address handed out");
    let day = crate::ipam::HOLD_BACK_SECS;
    let c = store.register(&enrol(&key, 3, "c"), n, 100 + day).unwrap();
    assert_eq!(c.node.mesh_ip, a.node.mesh_ip);
}

fn full_pool_reuses_a_held_address(b: &Backend) {
    let store = b.open();
    let (_, key) = store.create_key(true, None, 1).unwrap();
    // Two hosts, and .2 is the mesh resolver's: one node.
    let n = net("10.0.0.0/30");
    let a = store.register(&enrol(&key, 1, "a"), n, 1).unwrap();
    store.remove_node("a", 10).unwrap();
    let c = store.register(&enrol(&key, 3, "c"), n, 11).unwrap();
    assert_eq!(c.node.mesh_ip, a.node.mesh_ip);
}

fn revoking_with_removal_removes_exactly_the_keys_nodes(b: &Backend) {
    let store = b.open();
    let n = net("10.0.0.0/24");
    let (bad_id, bad) = store.create_key(true, None, 1).unwrap();
    let (_, good) = store.create_key(true, None, 1).unwrap();
    let x = store.register(&enrol(&bad, 1, "x"), n, 1).unwrap();
    let y = store.register(&enrol(&bad, 2, "y"), n, 1).unwrap();
    let z = store.register(&enrol(&good, 3, "z"), n, 1).unwrap();
    let removed = store.revoke_key_removing_nodes(bad_id, 5).unwrap().unwrap();
    assert_eq!(
        removed,
        vec![(x.node.id, "x".to_string()), (y.node.id, "y".to_string())]
    );
    let left: Vec<_> = store
        .list_nodes()
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(left, vec![z.node.id]);
    assert_eq!(
        store.removals_after(0).unwrap(),
        vec![(1, x.node.id), (2, y.node.id)]
    );
    assert!(store.list_keys().unwrap()[0].revoked_at.is_some());
    assert_eq!(store.revoke_key_removing_nodes(999, 5).unwrap(), None);
}

#[cfg(unix)]
#[test]
fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir();
    let store = Store::open(dir.path()).unwrap();
    let (_, key) = store.create_key(true, None, 1).unwrap();
    store
        .register(&enrol(&key, 1, "a"), net("10.0.0.0/24"), 1)
        .unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    // The WAL and shared-memory files exist while the store is open.
    for name in [
        DB_FILE.to_string(),
        format!("{DB_FILE}-wal"),
        format!("{DB_FILE}-shm"),
    ] {
        assert_eq!(mode(&name), 0o600, "{name}");
    }
    drop(store);
    // A store an older version left world-readable is tightened on open.
    std::fs::set_permissions(
        dir.path().join(DB_FILE),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let _store = Store::open(dir.path()).unwrap();
    assert_eq!(mode(DB_FILE), 0o600);
}

fn activity_is_recorded_and_reset_at_start(b: &Backend) {
    let store = b.open();
    let (_, key) = store.create_key(true, None, 1).unwrap();
    let r = store
        .register(&enrol(&key, 1, "a"), net("10.0.0.0/24"), 1)
        .unwrap();
    store
        .record_activity(&[(r.node.id, true)], &[(r.node.id, 10, 20)], 50)
        .unwrap();
    store
        .record_activity(&[], &[(r.node.id, 1, 2)], 51)
        .unwrap();
    let n = &store.list_nodes().unwrap()[0];
    assert!(n.online);
    assert_eq!(n.last_seen, Some(50));
    assert_eq!((n.relay_bytes_in, n.relay_bytes_out), (11, 22));
    store.mark_all_offline().unwrap();
    assert!(!store.list_nodes().unwrap()[0].online);
}

fn changing_network_with_nodes_is_refused(b: &Backend) {
    let store = b.open();
    store.check_network(net("10.0.0.0/24")).unwrap();
    store.check_network(net("10.1.0.0/24")).unwrap();
    let (_, key) = store.create_key(true, None, 1).unwrap();
    store
        .register(&enrol(&key, 1, "a"), net("10.1.0.0/24"), 1)
        .unwrap();
    assert!(matches!(
        store.check_network(net("10.2.0.0/24")),
        Err(StoreError::NetworkChanged { .. })
    ));
    store.check_network(net("10.1.0.0/24")).unwrap();
}

pub(super) fn net6(s: &str) -> ipnet::Ipv6Net {
    s.parse().unwrap()
}

fn network6_is_made_once_and_kept(b: &Backend) {
    let first = net6("fd11:2233:4455::/48");
    // Made by the first to ask; another handle (a restart, or another
    // replica on the same database) finds it and never calls its generator.
    assert_eq!(b.open().network6(None, || first).unwrap(), first);
    let other = b.open();
    let got = other
        .network6(None, || panic!("the stored prefix must be used"))
        .unwrap();
    assert_eq!(got, first);

    // Nodes are listed with their address in it.
    let (_, key) = other.create_key(true, None, 1).unwrap();
    other
        .register(&enrol(&key, 1, "a"), net("100.64.0.0/10"), 1)
        .unwrap();
    let nodes = other.list_nodes().unwrap();
    assert_eq!(
        nodes[0].mesh_ip6,
        Some(overlay_proto::coord::mesh_ip6(first, nodes[0].mesh_ip))
    );
    assert!(first.contains(&nodes[0].mesh_ip6.unwrap()));
    // The configured one, when it is the stored one, is fine with nodes.
    assert_eq!(other.network6(Some(first), mesh6_never).unwrap(), first);
}

fn mesh6_never() -> ipnet::Ipv6Net {
    panic!("nothing to generate")
}

fn changing_network6_with_nodes_is_refused(b: &Backend) {
    let store = b.open();
    // Before the first node it may still change.
    let a = net6("fd00:a::/48");
    let c = net6("fd00:c::/64");
    assert_eq!(store.network6(Some(a), mesh6_never).unwrap(), a);
    assert_eq!(store.network6(Some(c), mesh6_never).unwrap(), c);
    assert!(store.list_nodes().unwrap().is_empty());
    let (_, key) = store.create_key(true, None, 1).unwrap();
    store
        .register(&enrol(&key, 1, "a"), net("10.1.0.0/24"), 1)
        .unwrap();
    let err = store.network6(Some(a), mesh6_never).unwrap_err();
    assert!(
        matches!(err, StoreError::Network6Changed { stored, configured } if stored == c && configured == a),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("keep --network6 fd00:c::/64") && !text.contains('\n'),
        "one line that says what to do: {text}"
    );
    assert_eq!(store.network6(None, mesh6_never).unwrap(), c);
    assert_eq!(store.network6(Some(c), mesh6_never).unwrap(), c);
    let node = &store.list_nodes().unwrap()[0];
    let [a, b, x, y] = node.mesh_ip.octets();
    let expected = std::net::Ipv6Addr::new(
        0xfd00,
        0xc,
        0,
        0,
        0,
        0,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([x, y]),
    );
    assert_eq!(node.mesh_ip6, Some(expected));
}

fn data_survives_reopen(b: &Backend) {
    let (id, cred) = {
        let store = b.open();
        let (_, key) = store.create_key(true, None, 1).unwrap();
        let r = store
            .register(&enrol(&key, 1, "a"), net("10.0.0.0/24"), 1)
            .unwrap();
        (r.node.id, r.credential)
    };
    let store = b.open();
    assert!(store.verify_node(id, &cred).unwrap().is_some());
}
