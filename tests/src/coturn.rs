//! A real coturn (`turnserver` from Debian's `coturn` package) in the lab, set up
//! the way overlay expects an external TURN deployment: the TURN REST scheme
//! (`use-auth-secret`) with a static shared secret, UDP only.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::lab::{Host, Lab};
use crate::process::Proc;
use crate::wait::{fatal, wait_until, Wait};

/// The program started; `coturn` installs it as `/usr/bin/turnserver`.
pub const TURNSERVER: &str = "turnserver";
/// coturn's standard STUN/TURN port.
pub const TURN_PORT: u16 = 3478;
/// The realm coturn puts in its nonce challenges.
pub const REALM: &str = "overlay";
/// How long coturn may take to open its listener.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `turnserver` listening and relaying on one address of a lab host.
pub struct Coturn {
    pub host: Host,
    pub ip: Ipv4Addr,
    pub proc: Proc,
}

impl Coturn {
    /// Starts coturn on `ip` (an address of `host`) with `secret` as its
    /// `static-auth-secret`, and waits until it listens on UDP [`TURN_PORT`].
    ///
    /// Its pid file and SQLite user database go to the lab directory, so nothing
    /// outside the lab is written.
    pub fn start(lab: &Lab, host: &Host, ip: Ipv4Addr, secret: &str) -> anyhow::Result<Coturn> {
        let dir = lab.subdir(&format!("{}-coturn", host.name))?;
        let file = |name: &str| -> String {
            let path: PathBuf = dir.join(name);
            path.to_string_lossy().into_owned()
        };
        let ip_text = ip.to_string();
        let mut cmd = Command::new(TURNSERVER);
        cmd.arg("-n") // no configuration file: everything is on this line
            .args(["--listening-ip", &ip_text, "--relay-ip", &ip_text])
            .args(["--listening-port", &TURN_PORT.to_string()])
            .args(["--realm", REALM])
            .arg("--use-auth-secret")
            .args(["--static-auth-secret", secret])
            .args(["--no-tls", "--no-dtls", "--no-cli", "--fingerprint"])
            .args(["--log-file", "stdout", "--simple-log", "--verbose"])
            .args(["--pidfile", &file("turnserver.pid")])
            .args(["--userdb", &file("turndb")]);
        let mut proc = lab.spawn(host, &format!("coturn-{}", host.name), cmd)?;
        let listener = format!("{ip}:{TURN_PORT}");
        // coturn's own word, not just "something listens on the port": when
        // another program holds it (overlay-coord's netcheck STUN port did),
        // coturn keeps running and retrying the bind without a UDP listener.
        wait_until(START_TIMEOUT, "coturn to listen", || {
            proc.ensure_running().map_err(fatal)?;
            let log = proc.log();
            if log
                .lines()
                .any(|l| l.contains("UDP listener opened on") && l.contains(&listener))
            {
                Ok(())
            } else if log.contains("Cannot bind") {
                Err(fatal(anyhow::anyhow!(
                    "coturn cannot bind UDP {listener}: another program holds it"
                )))
            } else {
                Err(Wait::NotYet(format!(
                    "no UDP listener on {listener} logged"
                )))
            }
        })?;
        Ok(Coturn {
            host: host.clone(),
            ip,
            proc,
        })
    }

    /// The URL overlay-coord announces for this server.
    pub fn turn_url(&self) -> String {
        turn_url(self.ip)
    }

    /// The STUN URL of this server (coturn answers Binding requests too).
    pub fn stun_url(&self) -> String {
        stun_url(self.ip)
    }
}

/// The TURN URL of a coturn on `ip`, for configuring a coordinator before the
/// server runs.
pub fn turn_url(ip: Ipv4Addr) -> String {
    format!("turn:{ip}:{TURN_PORT}?transport=udp")
}

/// The STUN URL of a coturn on `ip`.
pub fn stun_url(ip: Ipv4Addr) -> String {
    format!("stun:{ip}:{TURN_PORT}")
}
