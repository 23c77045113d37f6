//! The store: nodes, auth keys, IP allocations (a node's `mesh_ip`),
//! credentials (hashed), removals, the access policy and the TURN secret.
//! Shared by `serve` and the admin CLI, possibly at the same time, and by
//! several replicas of `serve` when they share a PostgreSQL database.
//!
//! Two backends behind the one [`Store`] ([`db`]): SQLite in the state
//! directory (the default; WAL mode and a busy timeout let the server and the
//! CLI proceed together), or PostgreSQL (`--database postgres://…`). The
//! queries are written once; where the dialects differ, both are here side by
//! side. Uniqueness of names and addresses is the schema's constraints' job,
//! so replicas need no lock of their own (`store_register.rs`).
//!
//! Every method is synchronous and short; the server calls them from
//! `spawn_blocking`.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use rusqlite::Connection;

use overlay_proto::coord::mesh_ip6;
use overlay_proto::NodeId;

use self::db::{args, Db, DbError, Dialect, Mode, PgPool, Row, Tx};
use crate::auth;
use crate::migrations::{self, MigrationError};

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "coord.db";
/// How long a writer waits for another process's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the store keeps its tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// SQLite, `coord.db` in this state directory.
    Sqlite(PathBuf),
    /// PostgreSQL: a `postgres://` URL or `key=value` connection string.
    Postgres(String),
}

impl Location {
    /// The database if one is given, else SQLite in `state_dir`.
    pub fn new(state_dir: &Path, database: Option<&str>) -> Location {
        match database {
            Some(url) => Location::Postgres(url.to_owned()),
            None => Location::Sqlite(state_dir.to_path_buf()),
        }
    }
}

impl fmt::Display for Location {
    /// Never shows a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(dir) => write!(f, "{}", dir.join(DB_FILE).display()),
            Location::Postgres(url) => match url.parse::<postgres::Config>() {
                Ok(config) => f.write_str(&db_pg::describe(&config)),
                Err(_) => f.write_str("the PostgreSQL database (unparsable URL)"),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create store file {path}: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("store task failed: {0}")]
    Task(String),
    #[error("the store's nodes live in {stored} but the configured network is {configured}; keep --network {stored} or start with a new state directory")]
    NetworkChanged {
        stored: Ipv4Net,
        configured: Ipv4Net,
    },
    #[error("the store's nodes have IPv6 addresses in {stored} but the configured prefix is {configured}; keep --network6 {stored} or start with a new state directory")]
    Network6Changed {
        stored: Ipv6Net,
        configured: Ipv6Net,
    },
    #[error("the store's mesh IPv6 prefix {0:?} is not valid: {1}")]
    Network6Invalid(String, String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(DbError::Sqlite(e))
    }
}

impl StoreError {
    /// The database could not be reached: the call may succeed later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Db(e) | StoreError::Migration(MigrationError::Sql { source: e, .. }) => {
                e.is_unavailable()
            }
            _ => false,
        }
    }
}

#[path = "store_types.rs"]
mod types;
pub use types::{Enrolment, KeyProblem, KeyRow, NodeRow, RegisterError, Registered};

pub struct Store {
    db: Db,
}

const NODE_COLUMNS: &str =
    "id, name, mesh_ip, public_key, online, created_at, last_seen, relay_bytes_in, relay_bytes_out";
const KEY_COLUMNS: &str = "id, reusable, created_at, expires_at, revoked_at, uses, last_used_at";

fn node_from_row(r: &Row) -> Result<NodeRow, DbError> {
    Ok(NodeRow {
        id: r.u64(0)? as NodeId,
        name: r.text(1)?,
        mesh_ip: Ipv4Addr::from(r.u32(2)?),
        public_key: r.text(3)?,
        online: r.bool(4)?,
        created_at: r.u64(5)?,
        last_seen: r.opt_u64(6)?,
        relay_bytes_in: r.u64(7)?,
        relay_bytes_out: r.u64(8)?,
        mesh_ip6: None,
        tags: Vec::new(),
    })
}

fn key_from_row(r: &Row) -> Result<KeyRow, DbError> {
    Ok(KeyRow {
        id: r.u64(0)?,
        reusable: r.bool(1)?,
        created_at: r.u64(2)?,
        expires_at: r.opt_u64(3)?,
        revoked_at: r.opt_u64(4)?,
        uses: r.u64(5)?,
        last_used_at: r.opt_u64(6)?,
        tags: Vec::new(),
    })
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the SQLite store in `state_dir` and migrates it.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        create_private_dir(state_dir).map_err(|source| StoreError::CreateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        create_private_files(&path).map_err(|source| StoreError::CreateFile {
            path: path.clone(),
            source,
        })?;
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        Store::migrated(Db::Sqlite(Mutex::new(conn)))
    }

    /// Connects to the PostgreSQL database at `url` (a `postgres://` URL or
    /// `key=value` pairs) and migrates it; replicas starting together
    /// migrate once.
    pub fn open_postgres(url: &str) -> Result<Store, StoreError> {
        Store::migrated(Db::Postgres(Box::new(PgPool::connect(url)?)))
    }

    /// Opens the store where `location` says.
    pub fn open_at(location: &Location) -> Result<Store, StoreError> {
        match location {
            Location::Sqlite(dir) => Store::open(dir),
            Location::Postgres(url) => Store::open_postgres(url),
        }
    }

    fn migrated(db: Db) -> Result<Store, StoreError> {
        db.run(Mode::Write, |tx| {
            migrations::migrate(tx)?;
            Ok::<_, StoreError>(())
        })?;
        Ok(Store { db })
    }

    /// Which backend holds the tables.
    pub fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    /// One round trip to the database (for health checks).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run(Mode::Read, |tx| tx.query_one("SELECT 1", &[]).map(drop))?;
        Ok(())
    }

    /// Records the mesh network on first start; refuses a different one
    /// later while nodes hold addresses in the old one.
    pub fn check_network(&self, configured: Ipv4Net) -> Result<(), StoreError> {
        self.db.run(Mode::Write, |tx| {
            let stored = tx.query_opt("SELECT value FROM meta WHERE key = 'network'", &[])?;
            let stored = stored.map(|r| r.text(0)).transpose()?;
            if let Some(stored) = stored.and_then(|s| s.parse::<Ipv4Net>().ok()) {
                if stored == configured {
                    return Ok(());
                }
                let nodes = tx.query_one("SELECT count(*) FROM nodes", &[])?.i64(0)?;
                if nodes > 0 {
                    return Err(StoreError::NetworkChanged { stored, configured });
                }
            }
            tx.exec(
                "INSERT INTO meta (key, value) VALUES ('network', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                args![configured.to_string()],
            )?;
            Ok(())
        })
    }

    /// The mesh's IPv6 prefix: the one stored; else `configured`, or
    /// `generate()`'s, stored now (when replicas race, the first to commit
    /// wins). A `configured` prefix other than the stored one replaces it
    /// only while no node holds an address; after that it is refused, as a
    /// changed `network` is.
    pub fn network6(
        &self,
        configured: Option<Ipv6Net>,
        generate: impl FnOnce() -> Ipv6Net,
    ) -> Result<Ipv6Net, StoreError> {
        self.db.run(Mode::Write, |tx| {
            let stored = match stored_network6(tx)? {
                Some(stored) => stored,
                None => {
                    let fresh = configured.unwrap_or_else(generate);
                    tx.exec(
                        "INSERT INTO meta (key, value) VALUES ('network6', ?1) ON CONFLICT (key) DO NOTHING",
                        args![fresh.to_string()],
                    )?;
                    stored_network6(tx)?.unwrap_or(fresh)
                }
            };
            let Some(configured) = configured.filter(|c| *c != stored) else {
                return Ok(stored);
            };
            let nodes = tx.query_one("SELECT count(*) FROM nodes", &[])?.i64(0)?;
            if nodes > 0 {
                return Err(StoreError::Network6Changed { stored, configured });
            }
            tx.exec(
                "UPDATE meta SET value = ?1 WHERE key = 'network6'",
                args![configured.to_string()],
            )?;
            Ok(configured)
        })
    }

    /// The deployment's TURN secret, kept in the store so that every replica
    /// of a shared database hands out credentials the others' TURN servers
    /// accept: the one stored, or `generate()`'s, stored now (when replicas
    /// race, the first to commit wins and all return it).
    pub fn turn_secret(&self, generate: impl FnOnce() -> String) -> Result<String, StoreError> {
        self.shared_secret("turn_secret", generate)
    }

    /// The deployment's enrolment-challenge secret: replicas that share it
    /// accept each other's challenges, so a node may ask one and answer
    /// another (behind a load balancer, say). Made once by `generate`.
    pub fn challenge_secret(
        &self,
        generate: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        self.shared_secret("challenge_secret", generate)
    }

    /// The value of `key` in `meta`, made by `generate` by whoever asks first.
    fn shared_secret(
        &self,
        key: &str,
        generate: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        let fresh = generate();
        self.db.run(Mode::Write, |tx| {
            tx.exec(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                args![key, fresh],
            )?;
            Ok(tx
                .query_one("SELECT value FROM meta WHERE key = ?1", args![key])?
                .text(0)?)
        })
    }

    /// The node if `credential` is its current one. Unknown node and wrong
    /// credential are indistinguishable to the caller and take the same work.
    pub fn verify_node(&self, id: NodeId, credential: &str) -> Result<Option<NodeRow>, StoreError> {
        let found = self.db.run(Mode::Read, |tx| {
            let row = tx.query_opt(
                &format!("SELECT {NODE_COLUMNS}, credential_hash FROM nodes WHERE id = ?1"),
                args![id as i64],
            )?;
            row.map(|r| Ok::<_, DbError>((r.blob(9)?, node_from_row(&r)?)))
                .transpose()
        })?;
        let ok = auth::verify_secret(credential, found.as_ref().map(|(h, _)| h.as_slice()));
        Ok(found.filter(|_| ok).map(|(_, node)| node))
    }

    pub fn list_nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        self.db.run(Mode::Read, |tx| {
            let rows = tx.query(
                &format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"),
                &[],
            )?;
            let mut nodes = rows
                .iter()
                .map(node_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let mut tags = policy_store::all_tags(tx)?;
            let network6 = stored_network6(tx)?;
            for n in &mut nodes {
                n.tags = tags.remove(&n.id).unwrap_or_default();
                n.mesh_ip6 = network6.map(|net| mesh_ip6(net, n.mesh_ip));
            }
            Ok(nodes)
        })
    }

    /// Removes a node by name and records the removal for the running
    /// server; its address is held back (`ipam::HOLD_BACK_SECS`), then free.
    /// `None` when no node has that name.
    pub fn remove_node(&self, name: &str, now: u64) -> Result<Option<NodeId>, StoreError> {
        self.db.run(Mode::Write, |tx| {
            lock_removals(tx)?;
            let Some(id) = node_id_by_name(tx, name)? else {
                return Ok(None);
            };
            remove_in(tx, id as NodeId, now)?;
            Ok(Some(id as NodeId))
        })
    }

    /// Highest removal sequence number so far (0 when none).
    pub fn last_removal_seq(&self) -> Result<u64, StoreError> {
        self.db.run(Mode::Read, |tx| {
            let seq = tx.query_one("SELECT max(seq) FROM removals", &[])?;
            Ok(seq.opt_u64(0)?.unwrap_or(0))
        })
    }

    /// Removals after `seq`, oldest first, as `(seq, node id)`.
    pub fn removals_after(&self, seq: u64) -> Result<Vec<(u64, NodeId)>, StoreError> {
        self.db.run(Mode::Read, |tx| {
            let rows = tx.query(
                "SELECT seq, node_id FROM removals WHERE seq > ?1 ORDER BY seq",
                args![seq],
            )?;
            Ok(rows
                .iter()
                .map(|r| Ok((r.u64(0)?, r.u64(1)? as NodeId)))
                .collect::<Result<_, DbError>>()?)
        })
    }

    /// Records presence changes and relay byte deltas in one transaction.
    pub fn record_activity(
        &self,
        presence: &[(NodeId, bool)],
        relay: &[(NodeId, u64, u64)],
        now: u64,
    ) -> Result<(), StoreError> {
        if presence.is_empty() && relay.is_empty() {
            return Ok(());
        }
        self.db.run(Mode::Write, |tx| {
            for (id, online) in presence {
                tx.exec(
                    "UPDATE nodes SET online = ?2, last_seen = ?3 WHERE id = ?1",
                    args![*id as i64, *online, now],
                )?;
            }
            for (id, bytes_in, bytes_out) in relay {
                tx.exec(
                    "UPDATE nodes SET relay_bytes_in = relay_bytes_in + ?2, relay_bytes_out = relay_bytes_out + ?3 WHERE id = ?1",
                    args![*id as i64, *bytes_in, *bytes_out],
                )?;
            }
            Ok(())
        })
    }

    /// At startup nobody is connected, whatever the last run left behind.
    pub fn mark_all_offline(&self) -> Result<(), StoreError> {
        self.db.run(Mode::Write, |tx| {
            tx.exec("UPDATE nodes SET online = 0 WHERE online != 0", &[])?;
            Ok(())
        })
    }
}

/// The mesh's IPv6 prefix in `meta`, if one was chosen yet.
fn stored_network6(tx: &mut Tx<'_>) -> Result<Option<Ipv6Net>, StoreError> {
    let row = tx.query_opt("SELECT value FROM meta WHERE key = 'network6'", &[])?;
    let Some(text) = row.map(|r| r.text(0)).transpose()? else {
        return Ok(None);
    };
    // Stored only after `mesh6::check`; anything else was written by hand.
    crate::mesh6::parse(&text)
        .map(Some)
        .map_err(|e| StoreError::Network6Invalid(text, e))
}

/// Removals are read in `seq` order by every running server (`store_sync`),
/// so they must commit in that order: on PostgreSQL, where sequence numbers
/// are drawn before commit, removing transactions take turns. (SQLite's
/// writers take turns anyway.) Taken first, before any row lock.
fn lock_removals(tx: &mut Tx<'_>) -> Result<(), DbError> {
    match tx.dialect() {
        Dialect::Sqlite => Ok(()),
        Dialect::Postgres => tx.batch("LOCK TABLE removals IN SHARE ROW EXCLUSIVE MODE"),
    }
}

/// Deletes node `id`, records the removal for the running server (which
/// closes its session) and holds its address back. The caller holds
/// [`lock_removals`].
fn remove_in(tx: &mut Tx<'_>, id: NodeId, now: u64) -> Result<(), DbError> {
    let Some(row) = tx.query_opt("SELECT mesh_ip FROM nodes WHERE id = ?1", args![id as i64])?
    else {
        return Ok(());
    };
    let ip = row.u32(0)?;
    tx.exec("DELETE FROM nodes WHERE id = ?1", args![id as i64])?;
    tx.exec("DELETE FROM node_tags WHERE node_id = ?1", args![id as i64])?;
    tx.exec(
        "INSERT INTO removals (node_id, removed_at) VALUES (?1, ?2)",
        args![id as i64, now],
    )?;
    tx.exec(
        "INSERT INTO held_addresses (mesh_ip, released_at) VALUES (?1, ?2)
         ON CONFLICT (mesh_ip) DO UPDATE SET released_at = excluded.released_at",
        args![ip, now],
    )?;
    Ok(())
}

/// Creates the database file (and tightens it and its WAL and shared-memory
/// files if an older version left them wider) with mode 0600: it holds
/// credential and auth-key hashes and the whole membership. SQLite gives the
/// `-wal` and `-shm` files it creates later the database file's mode.
fn create_private_files(db: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(db)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut name = db.as_os_str().to_owned();
            name.push(suffix);
            let path = PathBuf::from(name);
            match std::fs::metadata(&path) {
                Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = db;
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[path = "db.rs"]
pub mod db;
#[path = "db_pg.rs"]
pub mod db_pg;
#[path = "store_keys.rs"]
mod keys;
#[path = "store_policy.rs"]
mod policy_store;
pub use policy_store::StoredPolicy;
#[path = "store_register.rs"]
mod register;

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

/// The id of the node named `name` (names are kept lowercase).
pub(crate) fn node_id_by_name(tx: &mut Tx<'_>, name: &str) -> Result<Option<i64>, DbError> {
    tx.query_opt(
        "SELECT id FROM nodes WHERE name = ?1",
        args![name.to_ascii_lowercase()],
    )?
    .map(|r| r.i64(0))
    .transpose()
}
