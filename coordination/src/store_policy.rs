//! Access policy in the store (issue #10): node tags, auth-key tags and the
//! one policy file. Every change bumps `meta.policy_seq`, which the running
//! server polls (`store_sync`) to pick up what the CLI wrote.

use std::collections::{BTreeSet, HashMap};

use overlay_proto::NodeId;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{node_id_by_name, now_unix, Store, StoreError};

/// Tags of every node that has any, sorted per node.
pub(super) fn all_tags(conn: &Connection) -> rusqlite::Result<HashMap<NodeId, Vec<String>>> {
    let mut stmt =
        conn.prepare_cached("SELECT node_id, tag FROM node_tags ORDER BY node_id, tag")?;
    let mut tags: HashMap<NodeId, Vec<String>> = HashMap::new();
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)? as NodeId, r.get::<_, String>(1)?))
    })?;
    for row in rows {
        let (id, tag) = row?;
        tags.entry(id).or_default().push(tag);
    }
    Ok(tags)
}

/// Tags of one node, sorted.
pub(super) fn tags_of(conn: &Connection, id: NodeId) -> rusqlite::Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT tag FROM node_tags WHERE node_id = ?1 ORDER BY tag")?;
    let rows = stmt.query_map(params![id as i64], |r| r.get(0))?;
    rows.collect()
}

fn bump_seq(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'policy_seq'",
        [],
    )?;
    Ok(())
}

/// The policy as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub text: String,
    pub updated_at: u64,
}

impl Store {
    /// Creates an auth key whose nodes get `tags` (already validated).
    pub fn create_key_with_tags(
        &self,
        reusable: bool,
        expires_at: Option<u64>,
        tags: &[String],
        now: u64,
    ) -> Result<(u64, String), StoreError> {
        let (id, key) = self.create_key(reusable, expires_at, now)?;
        let conn = self.conn();
        for tag in tags {
            conn.execute(
                "INSERT OR IGNORE INTO auth_key_tags (key_id, tag) VALUES (?1, ?2)",
                params![id as i64, tag],
            )?;
        }
        Ok((id, key))
    }

    /// Tags each auth key gives, by key id.
    pub fn key_tags(&self) -> Result<HashMap<u64, Vec<String>>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT key_id, tag FROM auth_key_tags ORDER BY key_id, tag")?;
        let mut tags: HashMap<u64, Vec<String>> = HashMap::new();
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })?;
        for row in rows {
            let (id, tag) = row?;
            tags.entry(id).or_default().push(tag);
        }
        Ok(tags)
    }

    /// Adds and removes tags (already validated) of the node named `name`;
    /// returns its resulting tags, `None` when no node has that name.
    pub fn tag_node(
        &self,
        name: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<Option<Vec<String>>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(id) = node_id_by_name(&tx, name)? else {
            return Ok(None);
        };
        let before: BTreeSet<String> = tags_of(&tx, id as NodeId)?.into_iter().collect();
        for tag in remove {
            tx.execute(
                "DELETE FROM node_tags WHERE node_id = ?1 AND tag = ?2",
                params![id, tag],
            )?;
        }
        for tag in add {
            tx.execute(
                "INSERT OR IGNORE INTO node_tags (node_id, tag) VALUES (?1, ?2)",
                params![id, tag],
            )?;
        }
        let after = tags_of(&tx, id as NodeId)?;
        if after.iter().cloned().collect::<BTreeSet<_>>() != before {
            bump_seq(&tx)?;
        }
        tx.commit()?;
        Ok(Some(after))
    }

    /// Tags of every node that has any.
    pub fn node_tags(&self) -> Result<HashMap<NodeId, Vec<String>>, StoreError> {
        Ok(all_tags(&self.conn())?)
    }

    /// Stores the policy text verbatim (the caller checked it).
    pub fn set_policy(&self, text: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO policy (id, text, updated_at) VALUES (1, ?1, ?2)
             ON CONFLICT(id) DO UPDATE SET text = excluded.text, updated_at = excluded.updated_at",
            params![text, now_unix() as i64],
        )?;
        bump_seq(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Removes the policy (everything allowed again); false when none was set.
    pub fn clear_policy(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let removed = tx.execute("DELETE FROM policy", [])?;
        if removed > 0 {
            bump_seq(&tx)?;
        }
        tx.commit()?;
        Ok(removed > 0)
    }

    pub fn policy(&self) -> Result<Option<StoredPolicy>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT text, updated_at FROM policy WHERE id = 1",
                [],
                |r| {
                    Ok(StoredPolicy {
                        text: r.get(0)?,
                        updated_at: r.get::<_, i64>(1)? as u64,
                    })
                },
            )
            .optional()?)
    }

    /// Counts policy and tag changes; one indexed read, cheap to poll.
    pub fn policy_seq(&self) -> Result<u64, StoreError> {
        let seq: Option<String> = self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = 'policy_seq'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(seq.and_then(|s| s.parse().ok()).unwrap_or(0))
    }
}
