//! Auth keys in the store: create, list, revoke (optionally removing the nodes
//! a key enrolled).

use overlay_proto::NodeId;

use super::db::{args, DbError, Mode, Tx};
use super::{key_from_row, lock_removals, remove_in, KeyRow, Store, StoreError, KEY_COLUMNS};
use crate::auth;

/// Inserts an auth key; returns its id.
pub(super) fn insert_key(
    tx: &mut Tx<'_>,
    hash: &[u8],
    reusable: bool,
    expires_at: Option<u64>,
    now: u64,
) -> Result<u64, DbError> {
    tx.query_one(
        "INSERT INTO auth_keys (hash, reusable, created_at, expires_at) VALUES (?1, ?2, ?3, ?4) RETURNING id",
        args![hash, reusable, now, expires_at],
    )?
    .u64(0)
}

impl Store {
    /// Creates an auth key; returns its id and the key in clear (shown once).
    pub fn create_key(
        &self,
        reusable: bool,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<(u64, String), StoreError> {
        self.create_key_with_tags(reusable, expires_at, &[], now)
    }

    pub fn list_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        self.db.run(Mode::Read, |tx| {
            let rows = tx.query(
                &format!("SELECT {KEY_COLUMNS} FROM auth_keys ORDER BY id"),
                &[],
            )?;
            let mut keys = rows
                .iter()
                .map(key_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let mut tags = super::policy_store::key_tags(tx)?;
            for key in &mut keys {
                key.tags = tags.remove(&key.id).unwrap_or_default();
            }
            Ok(keys)
        })
    }

    /// Revokes a key; false when no key has that id.
    pub fn revoke_key(&self, id: u64, now: u64) -> Result<bool, StoreError> {
        self.db.run(Mode::Write, |tx| {
            let revoked = tx.exec(
                "UPDATE auth_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                args![id, now],
            )?;
            Ok(revoked > 0)
        })
    }

    /// Revokes a key and removes every node it enrolled (as `remove_node`
    /// does), in one transaction. `None` when no key has that id; otherwise
    /// the removed nodes as `(id, name)`.
    pub fn revoke_key_removing_nodes(
        &self,
        id: u64,
        now: u64,
    ) -> Result<Option<Vec<(NodeId, String)>>, StoreError> {
        self.db.run(Mode::Write, |tx| {
            lock_removals(tx)?;
            let revoked = tx.exec(
                "UPDATE auth_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                args![id, now],
            )?;
            if revoked == 0 {
                return Ok(None);
            }
            let nodes = tx
                .query(
                    "SELECT id, name FROM nodes WHERE auth_key_id = ?1 ORDER BY id",
                    args![id],
                )?
                .iter()
                .map(|r| Ok((r.u64(0)? as NodeId, r.text(1)?)))
                .collect::<Result<Vec<_>, DbError>>()?;
            for (node, _) in &nodes {
                remove_in(tx, *node, now)?;
            }
            Ok(Some(nodes))
        })
    }
}

/// A new key's hash, for [`insert_key`].
pub(super) fn new_key() -> (String, Vec<u8>) {
    let key = auth::new_auth_key();
    let hash = auth::hash_secret(&key).to_vec();
    (key, hash)
}
