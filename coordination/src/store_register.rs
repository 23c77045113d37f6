//! Enrolment in the store: one transaction that checks and spends the auth
//! key, keeps a known key's identity, and gives a new one a name and address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use overlay_proto::NodeId;
use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{
    key_from_row, node_from_row, Enrolment, KeyProblem, KeyRow, NodeRow, RegisterError, Registered,
    Store, KEY_COLUMNS, NODE_COLUMNS,
};
use crate::{auth, ipam, validate};

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
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;

        let key_hash = auth::hash_secret(&req.auth_key);
        let key: Option<KeyRow> = tx
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM auth_keys WHERE hash = ?1"),
                params![&key_hash[..]],
                key_from_row,
            )
            .optional()?;
        let key = key.ok_or(RegisterError::AuthKey(KeyProblem::Unknown))?;
        if let Some(problem) = key.problem(now) {
            return Err(RegisterError::AuthKey(problem));
        }

        let credential = auth::new_credential();
        let cred_hash = auth::hash_secret(&credential);
        let existing: Option<NodeRow> = tx
            .query_row(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE public_key = ?1"),
                params![req.public_key],
                node_from_row,
            )
            .optional()?;

        let (id, created) = match existing {
            Some(node) => {
                let stored: Vec<u8> = tx.query_row(
                    "SELECT credential_hash FROM nodes WHERE id = ?1",
                    params![node.id as i64],
                    |r| r.get(0),
                )?;
                let presented = req.credential.as_deref().unwrap_or_default();
                if req.credential.is_none() || !auth::verify_secret(presented, Some(&stored)) {
                    return Err(RegisterError::AlreadyEnrolled(node.id));
                }
                tx.execute(
                    "UPDATE nodes SET credential_hash = ?2, auth_key_id = ?3 WHERE id = ?1",
                    params![node.id as i64, &cred_hash[..], key.id as i64],
                )?;
                (node.id, false)
            }
            None => {
                let name = unique_name(&tx, &req.hostname, None)?;
                let taken: BTreeSet<Ipv4Addr> = {
                    let mut stmt = tx.prepare("SELECT mesh_ip FROM nodes")?;
                    let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?;
                    rows.map(|r| r.map(Ipv4Addr::from))
                        .collect::<Result<_, _>>()?
                };
                // Holds that ended no longer matter; forget them.
                tx.execute(
                    "DELETE FROM held_addresses WHERE released_at <= ?1",
                    params![now.saturating_sub(ipam::HOLD_BACK_SECS) as i64],
                )?;
                let held: BTreeMap<Ipv4Addr, u64> = {
                    let mut stmt = tx.prepare("SELECT mesh_ip, released_at FROM held_addresses")?;
                    let rows = stmt.query_map([], |r| {
                        Ok((
                            Ipv4Addr::from(r.get::<_, u32>(0)?),
                            r.get::<_, i64>(1)? as u64,
                        ))
                    })?;
                    rows.collect::<Result<_, _>>()?
                };
                let ip = ipam::allocate(network, &taken, &held, now)
                    .ok_or(RegisterError::PoolExhausted(network))?;
                tx.execute(
                    "DELETE FROM held_addresses WHERE mesh_ip = ?1",
                    params![u32::from(ip)],
                )?;
                tx.execute(
                    "INSERT INTO nodes (name, public_key, mesh_ip, credential_hash, auth_key_id, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![name, req.public_key, u32::from(ip), &cred_hash[..], key.id as i64, now as i64],
                )?;
                (tx.last_insert_rowid() as NodeId, true)
            }
        };
        tx.execute(
            "UPDATE auth_keys SET uses = uses + 1, last_used_at = ?2 WHERE id = ?1",
            params![key.id as i64, now as i64],
        )?;
        // The key's tags join the node's (a re-enrolment keeps the tags it had).
        tx.execute(
            "INSERT OR IGNORE INTO node_tags (node_id, tag) SELECT ?1, tag FROM auth_key_tags WHERE key_id = ?2",
            params![id as i64, key.id as i64],
        )?;
        let mut node = tx.query_row(
            &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1"),
            params![id as i64],
            node_from_row,
        )?;
        node.tags = super::policy_store::tags_of(&tx, id)?;
        tx.commit()?;
        Ok(Registered {
            node,
            credential,
            created,
        })
    }
}

/// `wanted`, or `wanted-2`, `wanted-3`, … whichever is free (ignoring `own`).
fn unique_name(
    tx: &rusqlite::Transaction<'_>,
    wanted: &str,
    own: Option<NodeId>,
) -> Result<String, rusqlite::Error> {
    let own = own.map(|id| id as i64).unwrap_or(-1);
    let mut stmt = tx.prepare_cached("SELECT 1 FROM nodes WHERE name = ?1 AND id != ?2")?;
    let mut candidate = wanted.to_string();
    let mut n = 1u32;
    while stmt.exists(params![candidate, own])? {
        n += 1;
        candidate = validate::suffixed(wanted, n);
    }
    Ok(candidate)
}
