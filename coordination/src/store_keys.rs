//! Auth keys in the store: create, list, revoke (optionally removing the nodes
//! a key enrolled).

use overlay_proto::NodeId;
use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{key_from_row, remove_in, KeyRow, Store, StoreError, KEY_COLUMNS};
use crate::auth;

impl Store {
    /// Creates an auth key; returns its id and the key in clear (shown once).
    pub fn create_key(
        &self,
        reusable: bool,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<(u64, String), StoreError> {
        let key = auth::new_auth_key();
        let hash = auth::hash_secret(&key);
        let conn = self.conn();
        conn.execute(
            "INSERT INTO auth_keys (hash, reusable, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![&hash[..], reusable, now as i64, expires_at.map(|e| e as i64)],
        )?;
        Ok((conn.last_insert_rowid() as u64, key))
    }

    pub fn list_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {KEY_COLUMNS} FROM auth_keys ORDER BY id"))?;
        let rows = stmt.query_map([], key_from_row)?;
        let mut keys: Vec<KeyRow> = rows.collect::<Result<_, _>>()?;
        drop(stmt);
        drop(conn);
        let mut tags = self.key_tags()?;
        for key in &mut keys {
            key.tags = tags.remove(&key.id).unwrap_or_default();
        }
        Ok(keys)
    }

    /// Revokes a key; false when no key has that id.
    pub fn revoke_key(&self, id: u64, now: u64) -> Result<bool, StoreError> {
        let conn = self.conn();
        let exists: Option<i64> = conn
            .query_row(
                "SELECT id FROM auth_keys WHERE id = ?1",
                params![id as i64],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Ok(false);
        }
        conn.execute(
            "UPDATE auth_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
            params![id as i64, now as i64],
        )?;
        Ok(true)
    }

    /// Revokes a key and removes every node it enrolled (as `remove_node`
    /// does), in one transaction. `None` when no key has that id; otherwise
    /// the removed nodes as `(id, name)`.
    pub fn revoke_key_removing_nodes(
        &self,
        id: u64,
        now: u64,
    ) -> Result<Option<Vec<(NodeId, String)>>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let revoked = tx.execute(
            "UPDATE auth_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
            params![id as i64, now as i64],
        )?;
        if revoked == 0 {
            return Ok(None);
        }
        let nodes: Vec<(NodeId, String)> = {
            let mut stmt =
                tx.prepare("SELECT id, name FROM nodes WHERE auth_key_id = ?1 ORDER BY id")?;
            let rows = stmt.query_map(params![id as i64], |r| {
                Ok((r.get::<_, i64>(0)? as NodeId, r.get(1)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        for (node, _) in &nodes {
            remove_in(&tx, *node, now)?;
        }
        tx.commit()?;
        Ok(Some(nodes))
    }
}
