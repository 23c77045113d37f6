//! The SQL layer under the store: one small API over SQLite (rusqlite) and
//! PostgreSQL (the synchronous `postgres` crate, [`super::db_pg`]), so the
//! store's queries are written once. They use `?N` placeholders (turned into
//! `$N` for PostgreSQL) and SQL both dialects accept (`ON CONFLICT`,
//! `RETURNING`); where the dialects differ, the store asks [`Tx::dialect`]
//! and keeps both statements side by side.
//!
//! Every call is synchronous: the server calls the store from
//! `spawn_blocking`, the admin CLI directly. The `postgres` crate runs its
//! own small runtime per connection, which must not be entered from an
//! async task; `db_pg` takes care that even dropping the store there is safe.

use std::sync::Mutex;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::TransactionBehavior;

pub use super::db_pg::PgPool;
use super::db_pg::PgTx;

/// Which SQL the backend speaks, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A parameter or a column value. Integers cover every number and flag in
/// the schema (flags are 0/1 in both backends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    /// Stored as the same 64 bits; every u64 the store keeps (times, ids,
    /// counters) is far below `i64::MAX`.
    fn from(v: u64) -> Self {
        Value::Int(v as i64)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// `args![a, b]`: the parameters of a statement, each converted to a [`Value`].
macro_rules! args {
    ($($v:expr),* $(,)?) => { &[$($crate::store::db::Value::from($v)),*][..] };
}
pub(crate) use args;

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub(crate) Vec<Value>);

impl Row {
    fn get(&self, index: usize) -> Result<&Value, DbError> {
        self.0.get(index).ok_or(DbError::Column {
            index,
            expected: "a column",
        })
    }

    pub fn opt_i64(&self, index: usize) -> Result<Option<i64>, DbError> {
        match self.get(index)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            _ => Err(DbError::Column {
                index,
                expected: "an integer",
            }),
        }
    }

    pub fn i64(&self, index: usize) -> Result<i64, DbError> {
        self.opt_i64(index)?.ok_or(DbError::Column {
            index,
            expected: "an integer, not NULL",
        })
    }

    pub fn u64(&self, index: usize) -> Result<u64, DbError> {
        Ok(self.i64(index)? as u64)
    }

    pub fn opt_u64(&self, index: usize) -> Result<Option<u64>, DbError> {
        Ok(self.opt_i64(index)?.map(|v| v as u64))
    }

    pub fn u32(&self, index: usize) -> Result<u32, DbError> {
        u32::try_from(self.i64(index)?).map_err(|_| DbError::Column {
            index,
            expected: "a 32-bit unsigned integer",
        })
    }

    pub fn bool(&self, index: usize) -> Result<bool, DbError> {
        Ok(self.i64(index)? != 0)
    }

    pub fn text(&self, index: usize) -> Result<String, DbError> {
        match self.get(index)? {
            Value::Text(s) => Ok(s.clone()),
            _ => Err(DbError::Column {
                index,
                expected: "text",
            }),
        }
    }

    pub fn opt_text(&self, index: usize) -> Result<Option<String>, DbError> {
        match self.get(index)? {
            Value::Null => Ok(None),
            _ => self.text(index).map(Some),
        }
    }

    pub fn blob(&self, index: usize) -> Result<Vec<u8>, DbError> {
        match self.get(index)? {
            Value::Blob(b) => Ok(b.clone()),
            _ => Err(DbError::Column {
                index,
                expected: "bytes",
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {}", postgres_text(.0))]
    Postgres(#[from] postgres::Error),
    /// No connection to the database could be had: it is down, unreachable,
    /// or every connection stayed busy. Per call; the next call tries again.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("query returned no row")]
    NoRow,
    #[error("column {index}: expected {expected}")]
    Column {
        index: usize,
        expected: &'static str,
    },
}

impl DbError {
    /// An insert or update broke a UNIQUE or PRIMARY KEY constraint.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.extended_code,
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            ),
            DbError::Postgres(e) => e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }

    /// Another writer got there first: a unique violation, or (PostgreSQL)
    /// a deadlock or serialization failure it resolved by failing this
    /// statement. Worth trying again from a savepoint.
    pub fn is_conflict(&self) -> bool {
        use postgres::error::SqlState;
        self.is_unique_violation()
            || matches!(self, DbError::Postgres(e) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
                || e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE))
    }

    /// The database could not be reached (rather than refusing a statement):
    /// worth a "try again later", not a bug report.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Unavailable(_) => true,
            // Errors the server did not send (I/O, a closed connection, a
            // timeout), and those it sends when it cannot serve: connection
            // exceptions (class 08), shutting down or starting up (57P0x),
            // too many connections.
            DbError::Postgres(e) => match e.as_db_error() {
                None => true,
                Some(db) => {
                    let code = db.code().code();
                    code.starts_with("08") || code.starts_with("57P") || code == "53300"
                }
            },
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DatabaseBusy
            }
            _ => false,
        }
    }
}

/// One line: the server's message and code when it sent one, else the
/// client's error and its cause (`postgres::Error` shows only its kind).
pub(super) fn postgres_text(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text.replace('\n', " ")
}

/// Whether a transaction writes. SQLite takes the write lock at the start of
/// a writing transaction (`BEGIN IMMEDIATE`), so two writers never deadlock
/// upgrading their locks; PostgreSQL locks rows as it goes, and runs the
/// statements of a read each on its own (no snapshot across them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Read,
    Write,
}

/// The database behind a store.
pub enum Db {
    /// One connection: SQLite serialises writers anyway.
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(Box<PgPool>),
}

impl Db {
    pub fn dialect(&self) -> Dialect {
        match self {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs `f` in a transaction, committed when it returns `Ok`, rolled back
    /// otherwise.
    pub fn run<T, E: From<DbError>>(
        &self,
        mode: Mode,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        match self {
            Db::Sqlite(conn) => {
                // A panic while holding the lock cannot leave SQLite
                // inconsistent (transactions roll back on drop), so a
                // poisoned lock is still usable.
                let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                let behavior = match mode {
                    Mode::Read => TransactionBehavior::Deferred,
                    Mode::Write => TransactionBehavior::Immediate,
                };
                let tx = conn
                    .transaction_with_behavior(behavior)
                    .map_err(DbError::from)?;
                let mut tx = Tx::Sqlite(tx);
                let out = f(&mut tx)?;
                tx.commit()?;
                Ok(out)
            }
            Db::Postgres(pool) => pool.run(mode, |tx| {
                let mut tx = Tx::Postgres(tx);
                let out = f(&mut tx)?;
                tx.commit()?;
                Ok(out)
            }),
        }
    }
}

/// A transaction on either backend.
pub enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(PgTx<'a>),
}

impl Tx<'_> {
    pub fn dialect(&self) -> Dialect {
        match self {
            Tx::Sqlite(_) => Dialect::Sqlite,
            Tx::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs one statement; returns the number of rows it changed.
    pub fn exec(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        match self {
            Tx::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(args.iter()))? as u64)
            }
            Tx::Postgres(tx) => tx.exec(sql, args),
        }
    }

    /// Runs a query; returns every row.
    pub fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        match self {
            Tx::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(sql)?;
                let columns = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let mut values = Vec::with_capacity(columns);
                    for i in 0..columns {
                        values.push(sqlite_value(row.get_ref(i)?, i)?);
                    }
                    out.push(Row(values));
                }
                Ok(out)
            }
            Tx::Postgres(tx) => tx.query(sql, args),
        }
    }

    /// The first row, if any.
    pub fn query_opt(&mut self, sql: &str, args: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row; [`DbError::NoRow`] when there is none.
    pub fn query_one(&mut self, sql: &str, args: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, args)?.ok_or(DbError::NoRow)
    }

    /// Statements without parameters, separated by semicolons (schema changes,
    /// savepoints, locks).
    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Tx::Sqlite(tx) => Ok(tx.execute_batch(sql)?),
            Tx::Postgres(tx) => tx.batch(sql),
        }
    }

    fn commit(self) -> Result<(), DbError> {
        match self {
            Tx::Sqlite(tx) => Ok(tx.commit()?),
            Tx::Postgres(tx) => tx.commit(),
        }
    }
}

fn sqlite_value(v: ValueRef<'_>, index: usize) -> Result<Value, DbError> {
    Ok(match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        ValueRef::Real(_) => {
            return Err(DbError::Column {
                index,
                expected: "no floating-point value",
            })
        }
    })
}

/// `?N` placeholders as PostgreSQL's `$N`. The store's SQL has no `?` in
/// string literals.
pub fn postgres_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|n| n.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            postgres_placeholders("SELECT a FROM t WHERE b = ?1 AND c IN (?2, ?10)"),
            "SELECT a FROM t WHERE b = $1 AND c IN ($2, $10)"
        );
        assert_eq!(postgres_placeholders("SELECT '?'"), "SELECT '?'");
    }

    #[test]
    fn rows_convert_and_refuse_wrong_types() {
        let row = Row(vec![
            Value::Int(7),
            Value::Null,
            Value::Text("x".into()),
            Value::Blob(vec![1]),
            Value::Int(-1),
        ]);
        assert_eq!(row.u64(0).unwrap(), 7);
        assert!(row.bool(0).unwrap());
        assert_eq!(row.opt_i64(1).unwrap(), None);
        assert!(row.i64(1).is_err());
        assert_eq!(row.text(2).unwrap(), "x");
        assert!(row.text(0).is_err());
        assert_eq!(row.blob(3).unwrap(), vec![1]);
        assert!(row.u32(4).is_err());
        assert!(row.i64(5).is_err());
        assert_eq!(row.opt_text(1).unwrap(), None);
    }

    #[test]
    fn a_unique_violation_is_recognised_on_sqlite() {
        let db = Db::Sqlite(Mutex::new(rusqlite::Connection::open_in_memory().unwrap()));
        let err = db
            .run(Mode::Write, |tx| {
                tx.batch("CREATE TABLE t (v INTEGER UNIQUE)")?;
                tx.exec("INSERT INTO t (v) VALUES (?1)", args![1i64])?;
                tx.exec("INSERT INTO t (v) VALUES (?1)", args![1i64])
            })
            .unwrap_err();
        assert!(err.is_unique_violation(), "{err}");
        assert!(!err.is_unavailable());
        // The failed transaction rolled back, table and all.
        let tables = db
            .run(Mode::Read, |tx| {
                tx.query_one("SELECT count(*) FROM sqlite_master", &[])?
                    .i64(0)
            })
            .unwrap();
        assert_eq!(tables, 0);
    }
}
