//! A node of a lab mesh (its host, daemon and mesh IP) and the checks the
//! end-to-end tests run between two of them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, ensure, Context};
use overlay_proto::api::PeerStatus;

use crate::lab::{Host, Lab};
use crate::overlay::{ping, Daemon};

/// A node's host, its daemon and the mesh IP the daemon reports.
pub struct Node {
    pub host: Host,
    pub daemon: Daemon,
    pub mesh_ip: Ipv4Addr,
}

impl Node {
    /// What this node says about `other`; the mesh IP it lists must be the one
    /// `other` reports for itself.
    pub fn view_of(&self, other: &Node) -> anyhow::Result<PeerStatus> {
        let peers = self.daemon.peers()?;
        let peer = peers
            .into_iter()
            .find(|p| p.name == other.daemon.name)
            .with_context(|| format!("{} does not list {}", self.daemon.name, other.daemon.name))?;
        ensure!(
            peer.mesh_ip == other.mesh_ip,
            "{} lists {} with mesh IP {}, but it has {}",
            self.daemon.name,
            other.daemon.name,
            peer.mesh_ip,
            other.mesh_ip
        );
        Ok(peer)
    }
}

impl Node {
    /// The mesh IPv6 address this node's daemon reports for itself.
    pub fn mesh_ip6(&self) -> anyhow::Result<Ipv6Addr> {
        self.daemon
            .status()?
            .mesh_ip6
            .with_context(|| format!("{} reports no mesh IPv6 address", self.daemon.name))
    }

    /// As [`Node::view_of`], and the mesh IPv6 address this node lists for
    /// `other` must be the one `other` reports for itself; returns it too.
    pub fn view6_of(&self, other: &Node) -> anyhow::Result<(PeerStatus, Ipv6Addr)> {
        let own = other.mesh_ip6()?;
        let peer = self.view_of(other)?;
        ensure!(
            peer.mesh_ip6 == Some(own),
            "{} lists {} with mesh IPv6 {:?}, but it has {own}",
            self.daemon.name,
            other.daemon.name,
            peer.mesh_ip6
        );
        Ok((peer, own))
    }
}

/// One line about a peer's path, for failure messages.
pub fn describe(peer: &PeerStatus) -> String {
    format!(
        "{} online={} path_kind={:?} path={:?} endpoint={:?} local={:?}",
        peer.name, peer.online, peer.path_kind, peer.path, peer.endpoint, peer.local_endpoint
    )
}

/// 20 pings at 0.2 s from `from` to `to`'s mesh IP; none may be lost. A loss
/// is reported with what each side says about the other.
pub fn ping_lossless(lab: &Lab, from: &Node, to: &Node) -> anyhow::Result<()> {
    ping_lossless_to(lab, from, to, to.mesh_ip.into())
}

/// As [`ping_lossless`], to `to`'s mesh IPv6 address (`ping -6`), which
/// `from` must list for it.
pub fn ping6_lossless(lab: &Lab, from: &Node, to: &Node) -> anyhow::Result<()> {
    let (_, target) = from.view6_of(to)?;
    ping_lossless_to(lab, from, to, target.into())
}

fn ping_lossless_to(lab: &Lab, from: &Node, to: &Node, target: IpAddr) -> anyhow::Result<()> {
    let (sent, received) = ping(
        lab,
        &from.host,
        target,
        &["-c", "20", "-i", "0.2", "-W", "2"],
    )?;
    if sent == 20 && received == 20 {
        return Ok(());
    }
    let views = from
        .view_of(to)
        .and_then(|f| Ok((f, to.view_of(from)?)))
        .map(|(f, t)| {
            format!(
                "{} sees {}; {} sees {}",
                from.daemon.name,
                describe(&f),
                to.daemon.name,
                describe(&t)
            )
        })
        .unwrap_or_else(|e| format!("{e:#}"));
    bail!(
        "ping {} → {} ({target}): {sent} sent, {received} received; {views}",
        from.daemon.name,
        to.daemon.name,
    )
}
