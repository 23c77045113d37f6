//! Enrolment in the store: one transaction that checks and spends the auth
//! key, keeps a known key's identity, and gives a new one a name and address.
//!
//! Race-free across processes and replicas without locks of their own: the
//! schema makes names, addresses and public keys UNIQUE, and an insert that
//! loses a race to another writer (on PostgreSQL, where writers run side by
//! side) is rolled back to a savepoint and tried again with what is free
//! now. The auth key is spent last, by an UPDATE that checks again that it
//! may be: a single-use key two replicas use at once enrols one node.
//!
//! On PostgreSQL the placing itself takes turns (a transaction-scoped
//! advisory lock) as SQLite's one writer does: without it, enrolments that
//! arrive together all pick the same lowest free address, and all but one
//! wait for the winner's commit only to lose and try again. At 64 at once
//! from two replicas that convoy held every pooled connection past its 10 s
//! wait (9,410 lost inserts for 2,000 enrolments, `tests/bench/coord.sh`).
//! The constraints still decide; the lock only keeps writers from colliding.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use overlay_proto::NodeId;

use super::db::{args, DbError, Dialect, Mode, Tx};
use super::{
    key_from_row, node_from_row, Enrolment, KeyProblem, NodeRow, RegisterError, Registered, Store,
    KEY_COLUMNS, NODE_COLUMNS,
};
use crate::{auth, ipam, validate};

/// The advisory lock enrolments on PostgreSQL take turns on (an arbitrary
/// constant, "ovlyenrl").
const PG_ENROL_LOCK: i64 = 0x6f76_6c79_656e_726c;

/// Tries to place a new node before giving up; each lost try means another
/// enrolment committed, so this is far more than concurrent writers need.
const PLACE_ATTEMPTS: u32 = 256;

impl Store {
    /// Enrols a node in one transaction: checks and spends the key, picks a
    /// unique name and a free address (not one held back after a removal) for
    /// a new public key, and issues a new credential. A known public key is
    /// re-enrolled only with its node's current credential, and keeps its id,
    /// name and address; without it the request changes nothing. The caller
    /// has already checked the proof of possession.
    pub fn register(
        &self,
        req: &Enrolment,
        network: Ipv4Net,
        now: u64,
    ) -> Result<Registered, RegisterError> {
        let key_hash = auth::hash_secret(&req.auth_key);
        let credential = auth::new_credential();
        let cred_hash = auth::hash_secret(&credential);
        self.db.run(Mode::Write, |tx| {
            let key = tx
                .query_opt(
                    &format!("SELECT {KEY_COLUMNS} FROM auth_keys WHERE hash = ?1"),
                    args![&key_hash[..]],
                )?
                .map(|r| key_from_row(&r))
                .transpose()?
                .ok_or(RegisterError::AuthKey(KeyProblem::Unknown))?;
            if let Some(problem) = key.problem(now) {
                return Err(RegisterError::AuthKey(problem));
            }

            if tx.dialect() == Dialect::Postgres {
                tx.exec("SELECT pg_advisory_xact_lock(?1)", args![PG_ENROL_LOCK])?;
            }
            let (id, created) = place_retrying(tx, req, &cred_hash, key.id, network, now)?;

            // Spend the key under its row lock, checking again: another
            // replica may have spent or revoked it since it was read.
            let spent = tx.exec(
                "UPDATE auth_keys SET uses = uses + 1, last_used_at = ?2
                 WHERE id = ?1 AND revoked_at IS NULL AND (reusable != 0 OR uses = 0)",
                args![key.id, now],
            )?;
            if spent == 0 {
                let problem = if tx
                    .query_one(
                        "SELECT revoked_at FROM auth_keys WHERE id = ?1",
                        args![key.id],
                    )?
                    .opt_u64(0)?
                    .is_some()
                {
                    KeyProblem::Revoked
                } else {
                    KeyProblem::Spent
                };
                return Err(RegisterError::AuthKey(problem));
            }
            // The key's tags join the node's (a re-enrolment keeps the tags it had).
            tx.exec(
                "INSERT INTO node_tags (node_id, tag)
                 SELECT CAST(?1 AS BIGINT), tag FROM auth_key_tags WHERE key_id = ?2
                 ON CONFLICT DO NOTHING",
                args![id as i64, key.id],
            )?;
            let mut node = node_from_row(&tx.query_one(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1"),
                args![id as i64],
            )?)?;
            node.tags = super::policy_store::tags_of(tx, id)?;
            Ok(Registered {
                node,
                credential: credential.clone(),
                created,
            })
        })
    }
}

/// [`place`], again from a savepoint while it loses races to other writers.
fn place_retrying(
    tx: &mut Tx<'_>,
    req: &Enrolment,
    cred_hash: &[u8],
    key_id: u64,
    network: Ipv4Net,
    now: u64,
) -> Result<(NodeId, bool), RegisterError> {
    let mut attempt = 1;
    loop {
        tx.batch("SAVEPOINT place")?;
        match place(tx, req, cred_hash, key_id, network, now) {
            Ok(placed) => {
                tx.batch("RELEASE SAVEPOINT place")?;
                return Ok(placed);
            }
            Err(Placing::Lost(e)) if attempt < PLACE_ATTEMPTS => {
                tracing::debug!(attempt, "enrolment lost a race, trying again: {e}");
                tx.batch("ROLLBACK TO SAVEPOINT place")?;
                attempt += 1;
            }
            Err(Placing::Lost(e)) => return Err(e.into()),
            Err(Placing::Refused(e)) => return Err(e),
        }
    }
}

enum Placing {
    /// Another writer took the name, address or key first.
    Lost(DbError),
    Refused(RegisterError),
}

impl From<DbError> for Placing {
    fn from(e: DbError) -> Self {
        if e.is_conflict() {
            Placing::Lost(e)
        } else {
            Placing::Refused(e.into())
        }
    }
}

/// The existing node of `req.public_key` (with its credential), or a new
/// node with a free name and address; returns its id and whether it is new.
fn place(
    tx: &mut Tx<'_>,
    req: &Enrolment,
    cred_hash: &[u8],
    key_id: u64,
    network: Ipv4Net,
    now: u64,
) -> Result<(NodeId, bool), Placing> {
    let existing = tx.query_opt(
        &format!("SELECT {NODE_COLUMNS}, credential_hash FROM nodes WHERE public_key = ?1"),
        args![&req.public_key],
    )?;
    if let Some(row) = existing {
        let node: NodeRow = node_from_row(&row)?;
        let stored = row.blob(9)?;
        let presented = req.credential.as_deref().unwrap_or_default();
        if req.credential.is_none() || !auth::verify_secret(presented, Some(&stored)) {
            return Err(Placing::Refused(RegisterError::AlreadyEnrolled(node.id)));
        }
        tx.exec(
            "UPDATE nodes SET credential_hash = ?2, auth_key_id = ?3 WHERE id = ?1",
            args![node.id as i64, cred_hash, key_id],
        )?;
        return Ok((node.id, false));
    }

    let name = unique_name(tx, &req.hostname)?;
    let taken = taken_addresses(tx)?;
    // Holds that ended no longer matter; forget them.
    tx.exec(
        "DELETE FROM held_addresses WHERE released_at <= ?1",
        args![now.saturating_sub(ipam::HOLD_BACK_SECS)],
    )?;
    let held: BTreeMap<Ipv4Addr, u64> = tx
        .query("SELECT mesh_ip, released_at FROM held_addresses", &[])?
        .iter()
        .map(|r| Ok((Ipv4Addr::from(r.u32(0)?), r.u64(1)?)))
        .collect::<Result<_, DbError>>()?;
    let ip = ipam::allocate(network, &taken, &held, now)
        .ok_or(Placing::Refused(RegisterError::PoolExhausted(network)))?;
    tx.exec(
        "DELETE FROM held_addresses WHERE mesh_ip = ?1",
        args![u32::from(ip)],
    )?;
    let id = tx
        .query_one(
            "INSERT INTO nodes (name, public_key, mesh_ip, credential_hash, auth_key_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
            args![name, &req.public_key, u32::from(ip), cred_hash, key_id, now],
        )?
        .u64(0)?;
    Ok((id as NodeId, true))
}

/// Every node's address, in one row: on PostgreSQL, tens of thousands of
/// rows cost far more than the one string that lists them.
fn taken_addresses(tx: &mut Tx<'_>) -> Result<BTreeSet<Ipv4Addr>, DbError> {
    let sql = match tx.dialect() {
        Dialect::Sqlite => "SELECT group_concat(mesh_ip) FROM nodes",
        Dialect::Postgres => "SELECT string_agg(mesh_ip::text, ',') FROM nodes",
    };
    let listed = tx.query_one(sql, &[])?.opt_text(0)?.unwrap_or_default();
    listed
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map(Ipv4Addr::from)
                .map_err(|_| DbError::Column {
                    index: 0,
                    expected: "addresses as 32-bit numbers",
                })
        })
        .collect()
}

/// `wanted`, or `wanted-2`, `wanted-3`, … whichever is free now. Most
/// hostnames are free, which one indexed lookup says. Else one read: every
/// candidate starts with the shortest stem [`validate::suffixed`] can cut
/// `wanted` to, so the names with that prefix are all that can collide.
fn unique_name(tx: &mut Tx<'_>, wanted: &str) -> Result<String, DbError> {
    if tx
        .query_opt("SELECT 1 FROM nodes WHERE name = ?1", args![wanted])?
        .is_none()
    {
        return Ok(wanted.to_owned());
    }
    let shortest = validate::suffixed(wanted, u32::MAX);
    let prefix = &shortest[..shortest.rfind('-').unwrap_or(0)];
    let prefix = if wanted.starts_with(prefix) {
        prefix
    } else {
        ""
    };
    let taken: HashSet<String> = tx
        .query(
            "SELECT name FROM nodes WHERE substr(name, 1, ?2) = ?1",
            args![prefix, prefix.chars().count() as i64],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_, _>>()?;
    let mut candidate = wanted.to_string();
    let mut n = 1u32;
    while taken.contains(&candidate) {
        n += 1;
        candidate = validate::suffixed(wanted, n);
    }
    Ok(candidate)
}
