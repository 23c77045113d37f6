//! PostgreSQL under the store: a small pool of connections of the
//! synchronous `postgres` client, and the transaction type [`super::db`]
//! runs the store's statements in.
//!
//! TLS follows libpq's URL parameters: `sslmode=require` (or `verify-ca`,
//! `verify-full`) connects over rustls and verifies the server's certificate
//! and name against `sslrootcert=PATH` alone if given, else the system's
//! roots; unlike libpq's `require`, an unverifiable server is refused. Without one
//! of those modes the connection is plain, as before.
//!
//! A lost database costs the calls made while it is gone an
//! [`DbError::Unavailable`] (or the I/O error of the statement that found
//! out), never a panic; broken connections are dropped and the next call
//! connects again, so the store recovers by itself when the database returns.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres::config::SslMode;
use postgres::types::{IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;

use crate::tls::RootsError;

use super::db::{postgres_placeholders, postgres_text, DbError, Mode, Row, Value};

/// Connections the pool opens at most. The server's blocking calls are
/// short; a few connections keep enrolments and the sync loop from queueing.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a call waits for a connection when all are busy.
const CHECKOUT_WAIT: Duration = Duration::from_secs(10);
/// Default bound on establishing a connection (unless the URL sets one).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection idle longer than this is checked before use: the database
/// may have restarted meanwhile, and the first statement would fail.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(5);
const IDLE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

struct PgConn {
    client: Client,
    /// Statements prepared on this connection, by the store's SQL text.
    stmts: HashMap<String, Statement>,
}

struct PoolState {
    idle: Vec<(PgConn, Instant)>,
    /// Connections open, idle or lent out.
    open: usize,
}

pub struct PgPool {
    config: postgres::Config,
    /// `None`: plain TCP or a unix socket.
    tls: Option<MakeRustlsConnect>,
    /// Where the database is, without the password: for messages.
    target: String,
    state: Mutex<PoolState>,
    freed: Condvar,
}

/// The database a connection string points at, without the password.
pub fn describe(config: &postgres::Config) -> String {
    use postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config
        .get_ports()
        .first()
        .map_or(String::new(), |p| format!(":{p}"));
    format!(
        "postgres://{}@{}{port}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// Which certificates verify the database server (libpq's `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// `sslrootcert=system`, or none given: the system's roots.
    System,
    /// `sslrootcert=PATH`: that CA only.
    File(PathBuf),
}

/// Takes libpq's TLS parameters out of a connection string (URL or
/// `key=value` form) that the `postgres` crate would refuse: `sslrootcert`
/// is returned, and `sslmode=verify-ca`/`verify-full` become `require`
/// (which here verifies anyway). The `key=value` form follows libpq's
/// grammar (spaces around `=`, single quotes, backslash escapes) and is
/// written back quoted; in the URL form values are taken as written (no
/// percent-escapes). A string that does not parse is passed on unchanged,
/// for the `postgres` crate to refuse.
pub fn libpq_tls_params(url: &str) -> (String, Option<RootCert>) {
    let mut root_cert = None;
    let mut keep = |key: &str, value: &str| -> Option<(String, String)> {
        match (key, value) {
            ("sslrootcert", "system") => root_cert = Some(RootCert::System),
            ("sslrootcert", path) => root_cert = Some(RootCert::File(PathBuf::from(path))),
            ("sslmode", "verify-ca" | "verify-full") => {
                return Some((key.to_owned(), "require".to_owned()))
            }
            _ => return Some((key.to_owned(), value.to_owned())),
        }
        None
    };
    let cleaned = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let pairs: Vec<String> = query
                    .split('&')
                    .filter_map(|pair| match pair.split_once('=') {
                        Some((k, v)) => keep(k, v).map(|(k, v)| format!("{k}={v}")),
                        None => Some(pair.to_owned()),
                    })
                    .collect();
                if pairs.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", pairs.join("&"))
                }
            }
            None => url.to_owned(),
        }
    } else {
        match key_values(url) {
            Some(pairs) => pairs
                .iter()
                .filter_map(|(k, v)| keep(k, v))
                .map(|(k, v)| format!("{k}={}", quote(&v)))
                .collect::<Vec<_>>()
                .join(" "),
            None => url.to_owned(),
        }
    };
    (cleaned, root_cert)
}

/// The `key=value` pairs of a libpq connection string, values unquoted and
/// unescaped; `None` if it is not one.
fn key_values(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if key.is_empty() || chars.next() != Some('=') {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(if c == '\\' { chars.next()? } else { c });
            }
        }
        pairs.push((key, value));
    }
}

/// A value as a libpq connection string writes it: single-quoted, with
/// `\` and `'` escaped.
fn quote(value: &str) -> String {
    let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
    format!("'{escaped}'")
}

/// rustls on ring, trusting `root_cert` (the system's roots by default).
fn tls_connector(root_cert: &RootCert) -> Result<MakeRustlsConnect, DbError> {
    let roots = match root_cert {
        RootCert::System => crate::tls::client_roots(None),
        RootCert::File(path) => crate::tls::file_roots(path),
    };
    let roots = roots.map_err(|e| {
        DbError::Unavailable(match e {
            RootsError::Read { path, source } => {
                format!("cannot read sslrootcert {}: {source}", path.display())
            }
            RootsError::NoCert { path } => {
                format!("sslrootcert {} holds no PEM certificate", path.display())
            }
            RootsError::Empty => {
                "no system root certificates to verify the database with: give sslrootcert=PATH"
                    .into()
            }
        })
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DbError::Unavailable(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

impl PgPool {
    /// A pool for `url` (a `postgres://` URL or `key=value` pairs); connects
    /// once to find out that it can.
    pub fn connect(url: &str) -> Result<PgPool, DbError> {
        let (url, root_cert) = libpq_tls_params(url);
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| DbError::Unavailable(format!("bad database URL: {e}")))?;
        let tls = match (config.get_ssl_mode(), root_cert) {
            (SslMode::Require, root_cert) => {
                Some(tls_connector(&root_cert.unwrap_or(RootCert::System))?)
            }
            (_, Some(_)) => {
                return Err(DbError::Unavailable(
                    "bad database URL: sslrootcert needs sslmode=require (or verify-full)".into(),
                ))
            }
            (_, None) => None,
        };
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives(true);
        let pool = PgPool {
            target: describe(&config),
            config,
            tls,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        };
        pool.run(Mode::Read, |_| Ok::<_, DbError>(()))?;
        Ok(pool)
    }

    /// Where the database is (no password).
    pub fn target(&self) -> &str {
        &self.target
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open_connection(&self) -> Result<PgConn, DbError> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        };
        match connected {
            Ok(client) => Ok(PgConn {
                client,
                stmts: HashMap::new(),
            }),
            Err(e) => {
                let text = postgres_text(&e);
                let hint = if self.tls.is_some() && text.contains("certificate") {
                    " (give the server's CA with sslrootcert=PATH in the database URL)"
                } else {
                    ""
                };
                Err(DbError::Unavailable(format!(
                    "cannot connect to {}: {text}{hint}",
                    self.target
                )))
            }
        }
    }

    /// A healthy connection: an idle one, else a new one while fewer than
    /// [`MAX_CONNECTIONS`] are open, else the next one freed.
    fn checkout(&self) -> Result<PgConn, DbError> {
        let deadline = Instant::now() + CHECKOUT_WAIT;
        let mut state = self.lock();
        loop {
            if let Some((mut conn, since)) = state.idle.pop() {
                drop(state);
                let healthy = !conn.client.is_closed()
                    && (since.elapsed() < IDLE_CHECK_AFTER
                        || conn.client.is_valid(IDLE_CHECK_TIMEOUT).is_ok());
                if healthy {
                    return Ok(conn);
                }
                drop(conn);
                state = self.lock();
                state.open -= 1;
                continue;
            }
            if state.open < MAX_CONNECTIONS {
                state.open += 1;
                drop(state);
                return self.open_connection().inspect_err(|_| {
                    self.lock().open -= 1;
                    self.freed.notify_one();
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DbError::Unavailable(format!(
                    "all {MAX_CONNECTIONS} connections to {} stayed busy for {}s",
                    self.target,
                    CHECKOUT_WAIT.as_secs()
                )));
            }
            state = self
                .freed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn checkin(&self, conn: PgConn) {
        if conn.client.is_closed() {
            drop(conn);
            self.lock().open -= 1;
        } else {
            self.lock().idle.push((conn, Instant::now()));
        }
        self.freed.notify_one();
    }

    /// Runs `f` on a pooled connection: for [`Mode::Write`] in a transaction
    /// (READ COMMITTED) that `f` commits; for [`Mode::Read`] each statement
    /// on its own, sparing the BEGIN and COMMIT round trips of the frequent
    /// reads (a session's credential check, the policy counter). Uniqueness
    /// is the schema's constraints' job, not an isolation level's: callers
    /// retry an insert that loses a race.
    pub fn run<T, E: From<DbError>>(
        &self,
        mode: Mode,
        f: impl FnOnce(PgTx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.checkout()?;
        let PgConn { client, stmts } = &mut conn;
        let result = match mode {
            Mode::Read => f(PgTx {
                on: On::Client(client),
                stmts,
            }),
            Mode::Write => match client.transaction() {
                Ok(tx) => f(PgTx {
                    on: On::Transaction(tx),
                    stmts,
                }),
                Err(e) => Err(DbError::from(e).into()),
            },
        };
        self.checkin(conn);
        result
    }
}

impl Drop for PgPool {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.lock().idle);
        // Closing a connection runs the client's own runtime, which panics
        // inside an async task: close them on a thread of their own.
        if tokio::runtime::Handle::try_current().is_ok() {
            let closer = std::thread::spawn(move || drop(idle));
            let _ = closer.join();
        }
    }
}

/// Where a [`PgTx`]'s statements run.
enum On<'a> {
    Transaction(postgres::Transaction<'a>),
    /// Each statement on its own (reads).
    Client(&'a mut Client),
}

/// Calls the same method on a transaction or a client, which the `postgres`
/// crate gives the same signatures.
macro_rules! on {
    ($on:expr, $method:ident($($arg:expr),*)) => {
        match $on {
            On::Transaction(tx) => tx.$method($($arg),*),
            On::Client(client) => client.$method($($arg),*),
        }
    };
}

/// A PostgreSQL transaction (or, for reads, a connection) with its
/// connection's statement cache.
pub struct PgTx<'a> {
    on: On<'a>,
    stmts: &'a mut HashMap<String, Statement>,
}

impl PgTx<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(stmt) = self.stmts.get(sql) {
            return Ok(stmt.clone());
        }
        let stmt = on!(&mut self.on, prepare(&postgres_placeholders(sql)))?;
        self.stmts.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }

    pub fn exec(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|v| v as _).collect();
        Ok(on!(&mut self.on, execute(&stmt, &params))?)
    }

    pub fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|v| v as _).collect();
        on!(&mut self.on, query(&stmt, &params))?
            .iter()
            .map(row)
            .collect()
    }

    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        Ok(on!(&mut self.on, batch_execute(sql))?)
    }

    pub fn commit(self) -> Result<(), DbError> {
        match self.on {
            On::Transaction(tx) => Ok(tx.commit()?),
            On::Client(_) => Ok(()),
        }
    }
}

fn row(r: &postgres::Row) -> Result<Row, DbError> {
    let mut values = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let v = match *column.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => r
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
            Type::VOID => None,
            _ => r.try_get::<_, Option<String>>(i)?.map(Value::Text),
        };
        values.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                _ => Err(format!("an integer given for a {ty} parameter").into()),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8
                | Type::INT4
                | Type::INT2
                | Type::BOOL
                | Type::TEXT
                | Type::VARCHAR
                | Type::BPCHAR
                | Type::NAME
                | Type::UNKNOWN
                | Type::BYTEA
        )
    }

    postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_parameters_are_taken_out_of_both_url_forms() {
        let file = |p: &str| Some(RootCert::File(PathBuf::from(p)));
        let (url, ca) = libpq_tls_params(
            "postgres://overlay:pw@db.example:5432/overlay?sslmode=verify-full&sslrootcert=/etc/overlay/db-ca.pem&application_name=coord",
        );
        assert_eq!(
            url,
            "postgres://overlay:pw@db.example:5432/overlay?sslmode=require&application_name=coord"
        );
        assert_eq!(ca, file("/etc/overlay/db-ca.pem"));

        // libpq's grammar: spaces around `=`, quotes, escapes in and out of them.
        let (url, ca) = libpq_tls_params(
            "host=db.example user = overlay sslmode='verify-ca' sslrootcert='/etc/db ca.pem'",
        );
        assert_eq!(url, "host='db.example' user='overlay' sslmode='require'");
        assert_eq!(ca, file("/etc/db ca.pem"));
        let (url, ca) = libpq_tls_params(r"password='it\'s  two' sslrootcert=/a\ b.pem");
        assert_eq!(url, r"password='it\'s  two'");
        assert_eq!(ca, file("/a b.pem"));
        let (url, ca) = libpq_tls_params(r"password=it's sslrootcert=system");
        assert_eq!(url, r"password='it\'s'");
        assert_eq!(ca, Some(RootCert::System));

        let (url, ca) = libpq_tls_params("postgres://db.example/overlay?sslrootcert=/ca.pem");
        assert_eq!(
            (url.as_str(), ca),
            ("postgres://db.example/overlay", file("/ca.pem"))
        );
        // Not a connection string: left for the `postgres` crate to refuse.
        assert_eq!(libpq_tls_params("host=").0, "host=''");
        assert_eq!(libpq_tls_params("nonsense").0, "nonsense");
        assert_eq!(libpq_tls_params("a='open").0, "a='open");
        let (plain, ca) = libpq_tls_params("host=/tmp/pg port=5432 user=postgres dbname=t1");
        assert_eq!(
            plain,
            "host='/tmp/pg' port='5432' user='postgres' dbname='t1'"
        );
        assert_eq!(ca, None);
        let parsed: postgres::Config = plain.parse().unwrap();
        assert_eq!(parsed.get_dbname(), Some("t1"));
    }

    #[test]
    fn a_root_cert_without_a_tls_mode_is_refused_in_one_line() {
        let err = PgPool::connect("postgres://db.invalid/overlay?sslrootcert=/ca.pem")
            .err()
            .expect("refused");
        assert!(
            err.to_string()
                .contains("sslrootcert needs sslmode=require"),
            "{err}"
        );
        let err = PgPool::connect(
            "postgres://db.invalid/overlay?sslmode=require&sslrootcert=/no/such.pem",
        )
        .err()
        .expect("refused");
        assert!(
            err.to_string()
                .contains("cannot read sslrootcert /no/such.pem"),
            "{err}"
        );
    }
}
