//! The SQLite store: nodes, auth keys, IP allocations (a node's `mesh_ip`),
//! credentials (hashed) and removals. Shared by `serve` and the admin CLI,
//! possibly at the same time: WAL mode and a busy timeout let both proceed.
//!
//! Every method is synchronous and short; the server calls them from
//! `spawn_blocking`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ipnet::Ipv4Net;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use overlay_proto::coord::PeerInfo;
use overlay_proto::NodeId;

use crate::auth;
use crate::migrations::{self, MigrationError};

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "coord.db";
/// How long a writer waits for another process's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[error("store error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store task failed: {0}")]
    Task(String),
    #[error("the store's nodes live in {stored} but the configured network is {configured}; keep --network {stored} or start with a new state directory")]
    NetworkChanged {
        stored: Ipv4Net,
        configured: Ipv4Net,
    },
}

/// Why an auth key was refused; each maps to a code in `proto::coord::error_code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    Unknown,
    Expired,
    Revoked,
    Spent,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("auth key refused: {0:?}")]
    AuthKey(KeyProblem),
    /// The public key belongs to an enrolled node and the request did not
    /// carry that node's current credential.
    #[error("public key already enrolled as node {0}")]
    AlreadyEnrolled(NodeId),
    #[error("no free address left in {0}")]
    PoolExhausted(Ipv4Net),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for RegisterError {
    fn from(e: rusqlite::Error) -> Self {
        RegisterError::Store(StoreError::Sql(e))
    }
}

/// A validated enrolment request.
#[derive(Debug, Clone)]
pub struct Enrolment {
    pub auth_key: String,
    /// Canonical base64.
    pub public_key: String,
    /// Validated DNS label, lower case.
    pub hostname: String,
    /// The node's current credential, when it re-enrols a known key.
    pub credential: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub node: NodeRow,
    /// The new credential, in clear, returned to the node once.
    pub credential: String,
    /// False when an existing node (same public key, with its credential)
    /// re-registered.
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub id: NodeId,
    pub name: String,
    pub mesh_ip: Ipv4Addr,
    pub public_key: String,
    pub online: bool,
    pub created_at: u64,
    pub last_seen: Option<u64>,
    pub relay_bytes_in: u64,
    pub relay_bytes_out: u64,
    /// Sorted; filled by the queries that hand rows out (`node_from_row` leaves it empty).
    pub tags: Vec<String>,
}

impl NodeRow {
    pub fn peer_info(&self) -> PeerInfo {
        PeerInfo {
            id: self.id,
            name: self.name.clone(),
            mesh_ip: self.mesh_ip,
            public_key: self.public_key.clone(),
            online: self.online,
            tags: self.tags.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRow {
    pub id: u64,
    pub reusable: bool,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
    pub uses: u64,
    pub last_used_at: Option<u64>,
    /// Tags every node this key enrols gets (`keys create --tag`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl KeyRow {
    /// Why this key cannot be used at `now`, if it cannot.
    pub fn problem(&self, now: u64) -> Option<KeyProblem> {
        if self.revoked_at.is_some() {
            Some(KeyProblem::Revoked)
        } else if self.expires_at.is_some_and(|e| e <= now) {
            Some(KeyProblem::Expired)
        } else if !self.reusable && self.uses > 0 {
            Some(KeyProblem::Spent)
        } else {
            None
        }
    }
}

pub struct Store {
    conn: Mutex<Connection>,
}

const NODE_COLUMNS: &str =
    "id, name, mesh_ip, public_key, online, created_at, last_seen, relay_bytes_in, relay_bytes_out";
const KEY_COLUMNS: &str = "id, reusable, created_at, expires_at, revoked_at, uses, last_used_at";

fn node_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        id: r.get::<_, i64>(0)? as NodeId,
        name: r.get(1)?,
        mesh_ip: Ipv4Addr::from(r.get::<_, u32>(2)?),
        public_key: r.get(3)?,
        online: r.get(4)?,
        created_at: r.get::<_, i64>(5)? as u64,
        last_seen: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        relay_bytes_in: r.get::<_, i64>(7)? as u64,
        relay_bytes_out: r.get::<_, i64>(8)? as u64,
        tags: Vec::new(),
    })
}

fn key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        id: r.get::<_, i64>(0)? as u64,
        reusable: r.get(1)?,
        created_at: r.get::<_, i64>(2)? as u64,
        expires_at: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
        revoked_at: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
        uses: r.get::<_, i64>(5)? as u64,
        last_used_at: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
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
    /// Opens (creating if needed) the store in `state_dir` and migrates it.
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
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        migrations::migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back on drop), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the mesh network on first start; refuses a different one
    /// later while nodes hold addresses in the old one.
    pub fn check_network(&self, configured: Ipv4Net) -> Result<(), StoreError> {
        let conn = self.conn();
        let stored: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'network'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(stored) = stored.and_then(|s| s.parse::<Ipv4Net>().ok()) {
            if stored == configured {
                return Ok(());
            }
            let nodes: i64 = conn.query_row("SELECT count(*) FROM nodes", [], |r| r.get(0))?;
            if nodes > 0 {
                return Err(StoreError::NetworkChanged { stored, configured });
            }
        }
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('network', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![configured.to_string()],
        )?;
        Ok(())
    }

    /// The node if `credential` is its current one. Unknown node and wrong
    /// credential are indistinguishable to the caller and take the same work.
    pub fn verify_node(&self, id: NodeId, credential: &str) -> Result<Option<NodeRow>, StoreError> {
        let conn = self.conn();
        let found: Option<(Vec<u8>, NodeRow)> = conn
            .query_row(
                &format!("SELECT {NODE_COLUMNS}, credential_hash FROM nodes WHERE id = ?1"),
                params![id as i64],
                |r| Ok((r.get(9)?, node_from_row(r)?)),
            )
            .optional()?;
        let ok = auth::verify_secret(credential, found.as_ref().map(|(h, _)| h.as_slice()));
        Ok(found.filter(|_| ok).map(|(_, node)| node))
    }

    pub fn list_nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"))?;
        let rows = stmt.query_map([], node_from_row)?;
        let mut nodes: Vec<NodeRow> = rows.collect::<Result<_, _>>()?;
        drop(stmt);
        let mut tags = policy_store::all_tags(&conn)?;
        for n in &mut nodes {
            n.tags = tags.remove(&n.id).unwrap_or_default();
        }
        Ok(nodes)
    }

    /// Removes a node by name and records the removal for the running
    /// server; its address is held back (`ipam::HOLD_BACK_SECS`), then free.
    /// `None` when no node has that name.
    pub fn remove_node(&self, name: &str, now: u64) -> Result<Option<NodeId>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(id) = node_id_by_name(&tx, name)? else {
            return Ok(None);
        };
        remove_in(&tx, id as NodeId, now)?;
        tx.commit()?;
        Ok(Some(id as NodeId))
    }

    /// Highest removal sequence number so far (0 when none).
    pub fn last_removal_seq(&self) -> Result<u64, StoreError> {
        let conn = self.conn();
        let seq: Option<i64> = conn.query_row("SELECT max(seq) FROM removals", [], |r| r.get(0))?;
        Ok(seq.unwrap_or(0) as u64)
    }

    /// Removals after `seq`, oldest first, as `(seq, node id)`.
    pub fn removals_after(&self, seq: u64) -> Result<Vec<(u64, NodeId)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT seq, node_id FROM removals WHERE seq > ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![seq as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as NodeId))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut set_online =
                tx.prepare_cached("UPDATE nodes SET online = ?2, last_seen = ?3 WHERE id = ?1")?;
            for (id, online) in presence {
                set_online.execute(params![*id as i64, online, now as i64])?;
            }
            let mut add = tx.prepare_cached(
                "UPDATE nodes SET relay_bytes_in = relay_bytes_in + ?2, relay_bytes_out = relay_bytes_out + ?3 WHERE id = ?1",
            )?;
            for (id, bytes_in, bytes_out) in relay {
                add.execute(params![*id as i64, *bytes_in as i64, *bytes_out as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// At startup nobody is connected, whatever the last run left behind.
    pub fn mark_all_offline(&self) -> Result<(), StoreError> {
        self.conn()
            .execute("UPDATE nodes SET online = 0 WHERE online != 0", [])?;
        Ok(())
    }
}

/// Deletes node `id`, records the removal for the running server (which
/// closes its session) and holds its address back.
fn remove_in(tx: &rusqlite::Transaction<'_>, id: NodeId, now: u64) -> Result<(), rusqlite::Error> {
    let ip: Option<u32> = tx
        .query_row(
            "SELECT mesh_ip FROM nodes WHERE id = ?1",
            params![id as i64],
            |r| r.get(0),
        )
        .optional()?;
    let Some(ip) = ip else {
        return Ok(());
    };
    tx.execute("DELETE FROM nodes WHERE id = ?1", params![id as i64])?;
    tx.execute(
        "DELETE FROM node_tags WHERE node_id = ?1",
        params![id as i64],
    )?;
    tx.execute(
        "INSERT INTO removals (node_id, removed_at) VALUES (?1, ?2)",
        params![id as i64, now as i64],
    )?;
    tx.execute(
        "INSERT INTO held_addresses (mesh_ip, released_at) VALUES (?1, ?2)
         ON CONFLICT(mesh_ip) DO UPDATE SET released_at = excluded.released_at",
        params![ip, now as i64],
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
pub(crate) fn node_id_by_name(conn: &Connection, name: &str) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT id FROM nodes WHERE name = ?1",
            params![name.to_ascii_lowercase()],
            |r| r.get(0),
        )
        .optional()?)
}
