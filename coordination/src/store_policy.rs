//! Access policy in the store (issue #10): node tags, auth-key tags and the
//! one policy file. Every change bumps `meta.policy_seq`, which the running
//! server polls (`store_sync`) to pick up what the CLI wrote.

use std::collections::{BTreeSet, HashMap};

use overlay_proto::NodeId;

use super::db::{args, DbError, Mode, Tx};
use super::{node_id_by_name, now_unix, Store, StoreError};

/// Tags of every node that has any, sorted per node.
pub(super) fn all_tags(tx: &mut Tx<'_>) -> Result<HashMap<NodeId, Vec<String>>, DbError> {
    let mut tags: HashMap<NodeId, Vec<String>> = HashMap::new();
    for row in tx.query(
        "SELECT node_id, tag FROM node_tags ORDER BY node_id, tag",
        &[],
    )? {
        tags.entry(row.u64(0)? as NodeId)
            .or_default()
            .push(row.text(1)?);
    }
    Ok(tags)
}

/// Tags each auth key gives, by key id.
pub(super) fn key_tags(tx: &mut Tx<'_>) -> Result<HashMap<u64, Vec<String>>, DbError> {
    let mut tags: HashMap<u64, Vec<String>> = HashMap::new();
    for row in tx.query(
        "SELECT key_id, tag FROM auth_key_tags ORDER BY key_id, tag",
        &[],
    )? {
        tags.entry(row.u64(0)?).or_default().push(row.text(1)?);
    }
    Ok(tags)
}

/// Tags of one node, sorted.
pub(super) fn tags_of(tx: &mut Tx<'_>, id: NodeId) -> Result<Vec<String>, DbError> {
    tx.query(
        "SELECT tag FROM node_tags WHERE node_id = ?1 ORDER BY tag",
        args![id as i64],
    )?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

fn bump_seq(tx: &mut Tx<'_>) -> Result<(), DbError> {
    tx.exec(
        "UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) WHERE key = 'policy_seq'",
        &[],
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
        let (key, hash) = super::keys::new_key();
        let id = self.db.run(Mode::Write, |tx| {
            let id = super::keys::insert_key(tx, &hash, reusable, expires_at, now)?;
            for tag in tags {
                tx.exec(
                    "INSERT INTO auth_key_tags (key_id, tag) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    args![id, tag],
                )?;
            }
            Ok::<_, StoreError>(id)
        })?;
        Ok((id, key))
    }

    /// Tags each auth key gives, by key id.
    pub fn key_tags(&self) -> Result<HashMap<u64, Vec<String>>, StoreError> {
        Ok(self.db.run(Mode::Read, key_tags)?)
    }

    /// Adds and removes tags (already validated) of the node named `name`;
    /// returns its resulting tags, `None` when no node has that name.
    pub fn tag_node(
        &self,
        name: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<Option<Vec<String>>, StoreError> {
        self.db.run(Mode::Write, |tx| {
            let Some(id) = node_id_by_name(tx, name)? else {
                return Ok(None);
            };
            let before: BTreeSet<String> = tags_of(tx, id as NodeId)?.into_iter().collect();
            for tag in remove {
                tx.exec(
                    "DELETE FROM node_tags WHERE node_id = ?1 AND tag = ?2",
                    args![id, tag],
                )?;
            }
            for tag in add {
                tx.exec(
                    "INSERT INTO node_tags (node_id, tag) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    args![id, tag],
                )?;
            }
            let after = tags_of(tx, id as NodeId)?;
            if after.iter().cloned().collect::<BTreeSet<_>>() != before {
                bump_seq(tx)?;
            }
            Ok(Some(after))
        })
    }

    /// Tags of every node that has any.
    pub fn node_tags(&self) -> Result<HashMap<NodeId, Vec<String>>, StoreError> {
        Ok(self.db.run(Mode::Read, all_tags)?)
    }

    /// Stores the policy text verbatim (the caller checked it).
    pub fn set_policy(&self, text: &str) -> Result<(), StoreError> {
        self.db.run(Mode::Write, |tx| {
            tx.exec(
                "INSERT INTO policy (id, text, updated_at) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET text = excluded.text, updated_at = excluded.updated_at",
                args![text, now_unix()],
            )?;
            bump_seq(tx)?;
            Ok(())
        })
    }

    /// Removes the policy (everything allowed again); false when none was set.
    pub fn clear_policy(&self) -> Result<bool, StoreError> {
        self.db.run(Mode::Write, |tx| {
            let removed = tx.exec("DELETE FROM policy", &[])?;
            if removed > 0 {
                bump_seq(tx)?;
            }
            Ok(removed > 0)
        })
    }

    pub fn policy(&self) -> Result<Option<StoredPolicy>, StoreError> {
        self.db.run(Mode::Read, |tx| {
            tx.query_opt("SELECT text, updated_at FROM policy WHERE id = 1", &[])?
                .map(|r| {
                    Ok(StoredPolicy {
                        text: r.text(0)?,
                        updated_at: r.u64(1)?,
                    })
                })
                .transpose()
        })
    }

    /// Counts policy and tag changes; one indexed read, cheap to poll.
    pub fn policy_seq(&self) -> Result<u64, StoreError> {
        let seq = self.db.run(Mode::Read, |tx| {
            tx.query_opt("SELECT value FROM meta WHERE key = 'policy_seq'", &[])?
                .map(|r| r.text(0))
                .transpose()
        })?;
        Ok(seq.and_then(|s| s.parse().ok()).unwrap_or(0))
    }
}
