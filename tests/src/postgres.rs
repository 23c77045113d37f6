//! A throwaway PostgreSQL for tests, from Debian's `postgresql` package:
//! `initdb` into a fresh directory, the server listening only on a unix
//! socket inside that directory (no TCP port, so parallel tests and lab
//! namespaces never collide), stopped and removed on drop, also when the
//! test panics.
//!
//! `initdb` and `postgres` refuse to run as root; as root the cluster is
//! made and run as the `postgres` user (or `nobody`), which owns the
//! directory. Clients connect as the database user `postgres` with trust
//! authentication: only processes on this host that can reach the socket.
//!
//! Tests that need it and cannot have it should fail saying why, not pass:
//! [`require`] does that, unless `OVERLAY_TEST_POSTGRES=skip` is set, when
//! it says it skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use anyhow::{bail, Context, Result};

use crate::process::checked;

/// Environment variable: a directory holding `initdb`, `pg_ctl` and `createdb`.
pub const BIN_DIR_ENV: &str = "OVERLAY_PG_BIN";
/// Environment variable: `skip` lets tests that need PostgreSQL skip (loudly)
/// when its binaries are missing.
pub const SKIP_ENV: &str = "OVERLAY_TEST_POSTGRES";
/// The port number only names the socket file; nothing listens on TCP.
const PORT: u16 = 5432;

/// A running throwaway cluster.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    /// Who runs the server when we are root: (uid, gid).
    owner: Option<(u32, u32)>,
    next_db: AtomicU32,
    /// A TCP port on 127.0.0.1 that takes TLS connections only
    /// ([`Postgres::start_tls`]).
    tls_port: Option<u16>,
}

/// The directory of the PostgreSQL server binaries: `$OVERLAY_PG_BIN`, else
/// the newest `/usr/lib/postgresql/N/bin` (Debian's layout).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql (install Debian's postgresql package)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no /usr/lib/postgresql/N/bin/initdb (install Debian's postgresql package)")
}

/// A shared cluster for the tests that need one, or `None` (after saying
/// so on stderr) when PostgreSQL is missing and `OVERLAY_TEST_POSTGRES=skip`.
/// Missing without that is a panic that says what to install.
pub fn require(test: &str) -> Option<Arc<Postgres>> {
    if let Err(e) = bin_dir() {
        if std::env::var(SKIP_ENV).as_deref() == Ok("skip") {
            eprintln!("SKIPPED {test}: PostgreSQL is not installed ({e:#}) and {SKIP_ENV}=skip");
            return None;
        }
        panic!(
            "{test} needs PostgreSQL: {e:#}; install Debian's postgresql package \
             (or set {SKIP_ENV}=skip to skip the PostgreSQL tests)"
        );
    }
    Some(shared().unwrap_or_else(|e| panic!("{test}: starting PostgreSQL: {e:#}")))
}

/// One cluster for the tests running at the same time: started by the
/// first, stopped when the last drops its handle.
pub fn shared() -> Result<Arc<Postgres>> {
    static SHARED: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pg) = slot.upgrade() {
        return Ok(pg);
    }
    let pg = Arc::new(Postgres::start()?);
    *slot = Arc::downgrade(&pg);
    Ok(pg)
}

/// uid and gid of `user` from /etc/passwd.
fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == user)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn is_root() -> bool {
    // The owner of /proc/self is this process's effective uid.
    std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata("/proc/self")
            .unwrap_or_else(|_| std::fs::metadata("/").expect("the root directory exists")),
    ) == 0
}

impl Postgres {
    /// `initdb` into a new directory under the temporary directory and start
    /// the server on a socket there; waits until it accepts connections.
    pub fn start() -> Result<Postgres> {
        let pg = Postgres::init(None)?;
        pg.start_server()?;
        Ok(pg)
    }

    /// [`Postgres::start`], and also listening on 127.0.0.1 at
    /// [`Postgres::tls_port`] with `cert_pem`/`key_pem`, where connections
    /// without TLS are refused (`pg_hba.conf`: `hostssl` only).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Postgres> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .context("finding a free port")?;
        let pg = Postgres::init(Some(port))?;
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = pg.data().join(name);
            std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = pg.owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            }
        }
        let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\n";
        std::fs::write(pg.data().join("pg_hba.conf"), hba).context("writing pg_hba.conf")?;
        pg.start_server()?;
        Ok(pg)
    }

    /// The port the server listens on (it names the socket file too).
    fn port(&self) -> u16 {
        self.tls_port.unwrap_or(PORT)
    }

    /// The TLS-only TCP port of a [`Postgres::start_tls`] cluster.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    fn init(tls_port: Option<u16>) -> Result<Postgres> {
        let bin = bin_dir()?;
        let owner = if is_root() {
            Some(
                lookup_user("postgres")
                    .or_else(|| lookup_user("nobody"))
                    .context("running as root, and neither a postgres nor a nobody user to run PostgreSQL as")?,
            )
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!(
            "ovpg-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pg = Postgres {
            dir,
            bin,
            owner,
            next_db: AtomicU32::new(0),
            tls_port,
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&pg.dir, Some(uid), Some(gid))
                .with_context(|| format!("handing {} to uid {uid}", pg.dir.display()))?;
        }
        checked(
            pg.as_owner("initdb")
                .arg("-D")
                .arg(pg.data())
                .args(["--auth=trust", "-U", "postgres", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync", "--no-instructions"]),
        )
        .context("initdb")?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory holding the socket (and the data directory and log).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    fn as_owner(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        // The owner cannot enter root's working directory.
        cmd.current_dir(&self.dir);
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Starts the server (again, after [`Postgres::stop_server`]) and waits
    /// until it accepts connections.
    pub fn start_server(&self) -> Result<()> {
        let listen = match self.tls_port {
            // The socket file is named after the port, in a directory of its own.
            Some(port) => format!(
                "-p {port} -c listen_addresses=127.0.0.1 -c ssl=on \
                 -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
            ),
            None => format!("-p {PORT} -c listen_addresses=''"),
        };
        let options = format!(
            "-k {} {listen} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            self.dir.display()
        );
        checked(
            self.as_owner("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "60", "-o", &options, "start"]),
        )
        .with_context(|| format!("pg_ctl start (log: {})", self.log()))?;
        Ok(())
    }

    /// Stops the server (`pg_ctl stop -m fast`): clients see their
    /// connections drop, as when a database goes down; what was committed
    /// stays (an immediate stop would lose what `synchronous_commit=off`
    /// had not written yet).
    pub fn stop_server(&self) -> Result<()> {
        checked(
            self.as_owner("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-m", "fast", "stop"]),
        )
        .context("pg_ctl stop")?;
        Ok(())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// A connection string for database `dbname` (key=value form, which the
    /// `postgres` crate and `--database` accept).
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={dbname}",
            self.dir.display(),
            self.port()
        )
    }

    /// A new, empty database; returns its connection string.
    pub fn create_database(&self) -> Result<String> {
        let name = format!("t{}", self.next_db.fetch_add(1, Ordering::Relaxed));
        let out = checked(
            Command::new(self.bin.join("createdb"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port().to_string(), "-U", "postgres", &name]),
        );
        if let Err(e) = out {
            bail!("createdb {name}: {e:#}\nserver log:\n{}", self.log());
        }
        Ok(self.url(&name))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Errors are ignored: the server may be stopped already.
        let _ = self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_are_parsed() {
        // Every system has root; its uid and gid are 0.
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_user("no-such-user-here"), None);
    }

    #[test]
    fn a_cluster_starts_takes_databases_and_is_removed_on_drop() {
        let Some(pg) = require("a_cluster_starts_takes_databases_and_is_removed_on_drop") else {
            return;
        };
        let dir = pg.socket_dir().to_path_buf();
        let a = pg.create_database().unwrap();
        let b = pg.create_database().unwrap();
        assert_ne!(a, b);
        assert!(dir.join(format!(".s.PGSQL.{PORT}")).exists());
        let only = Arc::try_unwrap(pg);
        // Another test in this binary may share it; only the last one drops it.
        if let Ok(pg) = only {
            drop(pg);
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }
}
