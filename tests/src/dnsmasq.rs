//! A lab DNS server: Debian's dnsmasq answering fixed names, for tests that
//! need a resolver of their own (the mesh resolver's upstream, ACME names).

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use crate::overlay::udp_listening;
use crate::{wait_until, Host, Lab, Proc, Wait};

/// Starts dnsmasq on `host` listening on `ip`, answering each `(domain, ip)`
/// (and every name under it) with that address and nothing else; returns once
/// it listens on UDP 53.
pub fn start(
    lab: &Lab,
    host: &Host,
    ip: Ipv4Addr,
    names: &[(&str, Ipv4Addr)],
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--pid-file=",
    ])
    .arg(format!("--listen-address={ip}"));
    for (domain, answer) in names {
        cmd.arg(format!("--address=/{domain}/{answer}"));
    }
    let proc = lab.spawn(host, "dnsmasq", cmd)?;
    wait_until(Duration::from_secs(10), "dnsmasq to listen", || {
        if udp_listening(lab, host, "53")? {
            Ok(())
        } else {
            Err(Wait::NotYet("nothing on UDP 53".into()))
        }
    })?;
    Ok(proc)
}
