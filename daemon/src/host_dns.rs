//! Telling the host about the mesh resolver, without breaking its DNS.
//!
//! ```text
//!   auto         systemd-resolved runs: `resolvectl dns IFACE RESOLVER`,
//!                `resolvectl domain IFACE ~DOMAIN`, no default route: only the
//!                mesh domain goes to the mesh; reverted on exit (and the
//!                interface's going takes it away anyway).
//!                No resolved: nothing changes; `overlayctl status` says how.
//!   resolv-conf  /etc/resolv.conf is saved in the state directory, then
//!                rewritten in place: the mesh resolver, the mesh domain first
//!                in `search`, the old options. Names outside the mesh are
//!                forwarded to the old servers. On exit the saved bytes are
//!                written back; after a crash, on the next start.
//!   off          nothing, ever.
//! ```
//!
//! The file is written in place, never renamed over: in a network namespace
//! (and in containers) /etc/resolv.conf is a bind mount, which a rename
//! cannot replace.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::config::DnsMode;

/// The host's resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// The saved original, in the state directory.
const BACKUP: &str = "resolv.conf.before-overlay";
/// Where systemd-resolved lives when it runs.
const RESOLVED_DIR: &str = "/run/systemd/resolve";

/// What was done to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Applied {
    Nothing(String),
    Resolved,
    ResolvConf,
}

pub struct HostDns {
    mode: DnsMode,
    interface: String,
    resolv_conf: PathBuf,
    backup: PathBuf,
    /// Where systemd-resolved's runtime directory would be, and its CLI.
    resolved_dir: PathBuf,
    resolvectl: PathBuf,
    applied: Mutex<Option<Applied>>,
}

impl HostDns {
    pub fn new(mode: DnsMode, interface: &str, state_dir: &Path) -> Self {
        HostDns::at(mode, interface, Path::new(RESOLV_CONF), state_dir)
    }

    /// With another resolv.conf (tests).
    pub fn at(mode: DnsMode, interface: &str, resolv_conf: &Path, state_dir: &Path) -> Self {
        HostDns {
            mode,
            interface: interface.to_owned(),
            resolv_conf: resolv_conf.to_owned(),
            backup: state_dir.join(BACKUP),
            resolved_dir: RESOLVED_DIR.into(),
            resolvectl: "resolvectl".into(),
            applied: Mutex::new(None),
        }
    }

    /// With another systemd-resolved (tests).
    pub fn with_resolved(mut self, dir: &Path, resolvectl: &Path) -> Self {
        self.resolved_dir = dir.to_owned();
        self.resolvectl = resolvectl.to_owned();
        self
    }

    pub fn mode(&self) -> DnsMode {
        self.mode
    }

    /// A resolv.conf left rewritten by a run that did not stop cleanly is
    /// put back first; true when there was one.
    pub fn recover(&self) -> std::io::Result<bool> {
        let Ok(saved) = std::fs::read(&self.backup) else {
            return Ok(false);
        };
        write_in_place(&self.resolv_conf, &saved)?;
        std::fs::remove_file(&self.backup)?;
        tracing::info!(
            "restored {} as it was before an earlier run of overlayd",
            self.resolv_conf.display()
        );
        Ok(true)
    }

    /// The mesh has DNS: configure the host. Returns the servers names
    /// outside the mesh are forwarded to (resolv-conf mode), else none.
    pub fn apply(&self, domain: &str, resolver: Ipv4Addr) -> Vec<SocketAddr> {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let (outcome, upstreams) = match self.mode {
            DnsMode::Off => (Applied::Nothing("off (dns = \"off\")".into()), Vec::new()),
            DnsMode::Auto if self.resolved_dir.is_dir() => match self.resolved(domain, resolver) {
                Ok(()) => (Applied::Resolved, Vec::new()),
                Err(e) => {
                    tracing::warn!("could not set split DNS through systemd-resolved: {e}");
                    (
                        Applied::Nothing(format!("resolvectl failed: {e}")),
                        Vec::new(),
                    )
                }
            },
            DnsMode::Auto => (
                Applied::Nothing(format!(
                    "not configured (no systemd-resolved): use dns = \"resolv-conf\", or send \
                     {domain} to {resolver} in your resolver"
                )),
                Vec::new(),
            ),
            DnsMode::ResolvConf => {
                match self.rewrite(domain, resolver, *applied == Some(Applied::ResolvConf)) {
                    Ok(upstreams) => (Applied::ResolvConf, upstreams),
                    Err(e) => {
                        tracing::warn!("could not manage {}: {e}", self.resolv_conf.display());
                        (
                            Applied::Nothing(format!("resolv.conf failed: {e}")),
                            Vec::new(),
                        )
                    }
                }
            }
        };
        match &outcome {
            Applied::Resolved => tracing::info!(
                "DNS: {domain} goes to {resolver} (split DNS on {} via systemd-resolved)",
                self.interface
            ),
            Applied::ResolvConf => tracing::info!(
                "DNS: {} points at {resolver}; other names go to {}",
                self.resolv_conf.display(),
                list(&upstreams)
            ),
            Applied::Nothing(why) => tracing::info!("DNS: host {why}"),
        }
        *applied = Some(outcome);
        upstreams
    }

    /// Undoes what [`Self::apply`] did.
    pub fn restore(&self) {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        match applied.take() {
            Some(Applied::Resolved) => {
                let _ = run(&self.resolvectl, &["revert", &self.interface]);
            }
            Some(Applied::ResolvConf) => match self.recover() {
                Ok(_) => tracing::info!("DNS: {} restored", self.resolv_conf.display()),
                Err(e) => tracing::warn!("could not restore {}: {e}", self.resolv_conf.display()),
            },
            // Nothing was changed: nothing to undo, and the reason still holds.
            other => *applied = other,
        }
    }

    /// One line for `overlayctl status`.
    pub fn describe(&self) -> String {
        match &*self.applied.lock().unwrap_or_else(|e| e.into_inner()) {
            None => "waiting for the coordinator's DNS settings".into(),
            Some(Applied::Resolved) => {
                format!("split DNS via systemd-resolved on {}", self.interface)
            }
            Some(Applied::ResolvConf) => format!("{} managed", self.resolv_conf.display()),
            Some(Applied::Nothing(why)) => why.clone(),
        }
    }

    fn resolved(&self, domain: &str, resolver: Ipv4Addr) -> Result<(), String> {
        let iface = self.interface.as_str();
        let ctl = &self.resolvectl;
        run(ctl, &["dns", iface, &resolver.to_string()])?;
        run(ctl, &["domain", iface, &format!("~{domain}")])?;
        // Only the mesh domain: other names keep the host's servers.
        run(ctl, &["default-route", iface, "false"])
    }

    /// Saves the original (unless ours is already in place) and writes ours.
    fn rewrite(
        &self,
        domain: &str,
        resolver: Ipv4Addr,
        ours: bool,
    ) -> std::io::Result<Vec<SocketAddr>> {
        let original = if ours || self.backup.exists() {
            std::fs::read(&self.backup)?
        } else {
            let original = std::fs::read(&self.resolv_conf).unwrap_or_default();
            save(&self.backup, &original)?;
            original
        };
        let text = String::from_utf8_lossy(&original);
        let upstreams = upstreams(&text, resolver);
        write_in_place(
            &self.resolv_conf,
            managed(&text, domain, resolver).as_bytes(),
        )?;
        Ok(upstreams)
    }
}

/// The servers a resolv.conf names (port 53), without the mesh resolver.
pub fn upstreams(text: &str, resolver: Ipv4Addr) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<IpAddr>().ok())
        .filter(|ip| *ip != IpAddr::V4(resolver))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Our resolv.conf: the mesh resolver, the mesh domain searched first, the
/// original's other search domains and options.
pub fn managed(original: &str, domain: &str, resolver: Ipv4Addr) -> String {
    let mut search = vec![domain.to_owned()];
    let mut options = Vec::new();
    for line in original.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search") | Some("domain") => {
                search.extend(words.filter(|w| *w != domain).map(str::to_owned));
            }
            Some("options") => options.push(line.to_owned()),
            _ => {}
        }
    }
    let mut out = String::from(
        "# Written by overlayd (dns = \"resolv-conf\"): mesh names are answered by the\n\
         # mesh resolver, other names forwarded to the servers this file named before.\n\
         # The original is restored when overlayd stops.\n",
    );
    out.push_str(&format!("nameserver {resolver}\n"));
    out.push_str(&format!("search {}\n", search.join(" ")));
    for o in options {
        out.push_str(&o);
        out.push('\n');
    }
    out
}

/// Writes `bytes` into `path` without replacing the file (a bind mount
/// stays a bind mount).
fn write_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Writes the backup atomically (a crash leaves the old one or the new one).
fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    write_in_place(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn run(program: &Path, args: &[&str]) -> Result<(), String> {
    let name = program.display();
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{name}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{name} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn list(addrs: &[SocketAddr]) -> String {
    if addrs.is_empty() {
        return "nowhere (the old file named no server)".into();
    }
    addrs
        .iter()
        .map(|a| a.ip().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = "# from DHCP\nnameserver 10.0.0.53\nnameserver 2001:db8::53\nsearch corp.example\noptions edns0 timeout:2\n";
    const RESOLVER: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

    #[test]
    fn the_managed_file_keeps_search_and_options_and_forwards_to_the_old_servers() {
        let text = managed(ORIGINAL, "overlay.internal", RESOLVER);
        assert!(text.contains("nameserver 100.100.100.100\n"));
        assert!(text.contains("search overlay.internal corp.example\n"));
        assert!(text.contains("options edns0 timeout:2\n"));
        assert!(!text.contains("10.0.0.53"));
        let ups = upstreams(ORIGINAL, RESOLVER);
        assert_eq!(ups.len(), 2);
        assert_eq!(ups[0], "10.0.0.53:53".parse().unwrap());
        assert!(upstreams(&text, RESOLVER).is_empty());
    }

    #[test]
    fn resolv_conf_is_restored_byte_for_byte_on_exit_and_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, ORIGINAL).unwrap();
        let host = HostDns::at(DnsMode::ResolvConf, "ovl0", &conf, dir.path());
        let ups = host.apply("overlay.internal", RESOLVER);
        assert_eq!(ups.len(), 2);
        // Applied twice (a reconnect): the backup stays the original.
        host.apply("overlay.internal", RESOLVER);
        assert!(std::fs::read_to_string(&conf)
            .unwrap()
            .contains("100.100.100.100"));
        host.restore();
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), ORIGINAL);

        // A crash: the next start finds the backup and puts it back.
        let crashed = HostDns::at(DnsMode::ResolvConf, "ovl0", &conf, dir.path());
        crashed.apply("overlay.internal", RESOLVER);
        drop(crashed);
        let next = HostDns::at(DnsMode::ResolvConf, "ovl0", &conf, dir.path());
        assert!(next.recover().unwrap());
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), ORIGINAL);
        assert!(!next.recover().unwrap());
    }

    #[test]
    fn with_resolved_only_the_mesh_domain_is_routed_to_the_resolver_and_reverted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, ORIGINAL).unwrap();
        let calls = dir.path().join("calls");
        let fake = dir.path().join("resolvectl");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho \"$@\" >> {}\n", calls.display()),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let host =
            HostDns::at(DnsMode::Auto, "ovl0", &conf, dir.path()).with_resolved(dir.path(), &fake);
        assert!(host.apply("overlay.internal", RESOLVER).is_empty());
        assert!(host.describe().contains("systemd-resolved"));
        host.restore();
        assert_eq!(
            std::fs::read_to_string(&calls).unwrap(),
            "dns ovl0 100.100.100.100\ndomain ovl0 ~overlay.internal\n\
             default-route ovl0 false\nrevert ovl0\n"
        );
        assert_eq!(
            std::fs::read_to_string(&conf).unwrap(),
            ORIGINAL,
            "resolv.conf untouched"
        );
        // Without resolved, auto changes nothing and says how to get names.
        let none = HostDns::at(DnsMode::Auto, "ovl0", &conf, dir.path())
            .with_resolved(&dir.path().join("absent"), &fake);
        assert!(none.apply("overlay.internal", RESOLVER).is_empty());
        assert!(none.describe().contains("resolv-conf"));
    }

    #[test]
    fn off_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, ORIGINAL).unwrap();
        let host = HostDns::at(DnsMode::Off, "ovl0", &conf, dir.path());
        assert!(host.apply("overlay.internal", RESOLVER).is_empty());
        host.restore();
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), ORIGINAL);
        assert!(host.describe().contains("off"));
    }
}
