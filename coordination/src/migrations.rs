//! Versioned schema of the SQLite store. `PRAGMA user_version` records how
//! many of [`MIGRATIONS`] have been applied; each runs once, in order, in a
//! transaction. Never edit a released migration: append a new one.

use rusqlite::Connection;

/// Schema steps; index + 1 is the version each one produces.
pub const MIGRATIONS: &[&str] = &[
    // 1: nodes, auth keys, removals (the CLI→server channel for `nodes remove`).
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE auth_keys (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        hash        BLOB NOT NULL UNIQUE,
        reusable    INTEGER NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER,
        revoked_at  INTEGER,
        uses        INTEGER NOT NULL DEFAULT 0,
        last_used_at INTEGER
    );
    CREATE TABLE nodes (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        name            TEXT NOT NULL UNIQUE,
        public_key      TEXT NOT NULL UNIQUE,
        mesh_ip         INTEGER NOT NULL UNIQUE,
        credential_hash BLOB NOT NULL,
        auth_key_id     INTEGER,
        created_at      INTEGER NOT NULL,
        last_seen       INTEGER,
        online          INTEGER NOT NULL DEFAULT 0,
        relay_bytes_in  INTEGER NOT NULL DEFAULT 0,
        relay_bytes_out INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE removals (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        node_id    INTEGER NOT NULL,
        removed_at INTEGER NOT NULL
    );
    "#,
    // 2: addresses of removed nodes, held back before reuse (`ipam::HOLD_BACK_SECS`);
    // nodes by the auth key that enrolled them (`keys revoke --remove-nodes`).
    r#"
    CREATE TABLE held_addresses (
        mesh_ip     INTEGER PRIMARY KEY,
        released_at INTEGER NOT NULL
    );
    CREATE INDEX nodes_by_auth_key ON nodes (auth_key_id);
    "#,
    // 3: access policy (issue #10): node tags, the tags an auth key gives the
    // nodes it enrols, the one policy file (verbatim). `meta.policy_seq`
    // counts policy and tag changes, for the running server to poll.
    r#"
    CREATE TABLE node_tags (
        node_id INTEGER NOT NULL,
        tag     TEXT NOT NULL,
        PRIMARY KEY (node_id, tag)
    );
    CREATE TABLE auth_key_tags (
        key_id INTEGER NOT NULL,
        tag    TEXT NOT NULL,
        PRIMARY KEY (key_id, tag)
    );
    CREATE TABLE policy (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        text       TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('policy_seq', '0');
    "#,
];

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("store schema version {found} is newer than this overlay-coord supports ({supported}); upgrade overlay-coord")]
    TooNew { found: u32, supported: u32 },
    #[error("migrating the store to schema version {version}: {source}")]
    Sql {
        version: u32,
        source: rusqlite::Error,
    },
}

/// Brings the database up to the newest schema; returns the resulting version.
pub fn migrate(conn: &mut Connection) -> Result<u32, MigrationError> {
    let supported = MIGRATIONS.len() as u32;
    let sql_err = |version| move |source| MigrationError::Sql { version, source };
    let current: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql_err(0))?;
    if current > supported {
        return Err(MigrationError::TooNew {
            found: current,
            supported,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index as u32 + 1;
        let tx = conn.transaction().map_err(sql_err(version))?;
        tx.execute_batch(sql).map_err(sql_err(version))?;
        tx.pragma_update(None, "user_version", version)
            .map_err(sql_err(version))?;
        tx.commit().map_err(sql_err(version))?;
    }
    Ok(supported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_database_migrates_to_latest_and_is_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), MIGRATIONS.len() as u32);
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as u32);
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name IN ('nodes','auth_keys','removals','meta','held_addresses','node_tags','auth_key_tags','policy')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 8);
        assert_eq!(migrate(&mut conn).unwrap(), MIGRATIONS.len() as u32);
    }

    #[test]
    fn newer_schema_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(MigrationError::TooNew { found: 99, .. })
        ));
    }
}
