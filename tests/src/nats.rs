//! A real NATS server (`nats-server` from Debian's package) in the lab: the
//! bus that coordinator replicas share (`overlay-coord serve --bus`). Core
//! NATS only: no JetStream, so nothing is written but its log.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use crate::lab::{Host, Lab};
use crate::overlay::tcp_listening;
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
        let port = NATS_PORT.to_string();
        wait_until(START_TIMEOUT, "nats-server to listen", || {
            proc.ensure_running().map_err(fatal)?;
            if tcp_listening(lab, host, &port)? {
                Ok(())
            } else {
                Err(Wait::NotYet(format!("nothing listens on TCP port {port}")))
            }
        })?;
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
