//! A real NATS server (`nats-server` from Debian's package): the bus that
//! coordinator replicas share (`overlay-coord serve --bus`), in the lab
//! ([`Nats::start`]) or on loopback for tests without namespaces
//! ([`LocalNats::start`]). Core NATS only: no JetStream, so nothing is
//! written but its log.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::lab::{Host, Lab};
use crate::overlay::wait_listening;
use crate::process::Proc;
use crate::wait::{fatal, wait_until, Wait};

/// The program started; Debian installs it as `/usr/bin/nats-server`.
pub const NATS_SERVER: &str = "nats-server";
/// NATS's standard client port (the lab host's namespace is the server's own).
pub const NATS_PORT: u16 = 4222;
/// How long the server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `nats-server` on one address of a lab host; stopped when dropped
/// (it is a [`Proc`] of the lab).
pub struct Nats {
    pub host: Host,
    pub ip: Ipv4Addr,
    pub proc: Proc,
}

impl Nats {
    /// Starts the server on `ip` (an address of `host`) and waits until it listens.
    pub fn start(lab: &Lab, host: &Host, ip: Ipv4Addr) -> anyhow::Result<Nats> {
        let mut cmd = Command::new(NATS_SERVER);
        cmd.args(["--addr", &ip.to_string()])
            .args(["--port", &NATS_PORT.to_string()])
            .args(["--server_name", &format!("lab-{}", host.name)]);
        let mut proc = lab.spawn(host, &format!("nats-{}", host.name), cmd)?;
        wait_listening(lab, host, &mut proc, NATS_PORT, "nats-server")?;
        Ok(Nats {
            host: host.clone(),
            ip,
            proc,
        })
    }

    /// What replicas are given as `--bus`.
    pub fn url(&self) -> String {
        format!("nats://{}:{NATS_PORT}", self.ip)
    }
}

/// A `nats-server` on a free loopback port, its log in a temporary
/// directory; stopped (and the directory removed) when dropped.
pub struct LocalNats {
    pub addr: SocketAddr,
    proc: Option<Proc>,
    dir: PathBuf,
}

impl LocalNats {
    pub fn start() -> anyhow::Result<LocalNats> {
        let dir = std::env::temp_dir().join(format!(
            "overlay-nats-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A port the kernel just handed out and took back: free unless
        // something grabs it in between, which `nats-server` would report.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?;
        let mut cmd = Command::new(NATS_SERVER);
        cmd.args(["--addr", "127.0.0.1", "--port", &addr.port().to_string()]);
        let mut nats = LocalNats {
            addr,
            proc: None,
            dir,
        };
        let mut proc = Proc::spawn("nats-server", cmd, &nats.dir.join("nats.log"))?;
        wait_until(START_TIMEOUT, "nats-server to listen", || {
            proc.ensure_running().map_err(fatal)?;
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .map(drop)
                .map_err(|e| Wait::NotYet(format!("{addr}: {e}")))
        })?;
        nats.proc = Some(proc);
        Ok(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        // The server first: its log is in the directory.
        drop(self.proc.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
