//! The shell's part in the mesh's names: the zone rebuilt from the netmap
//! when it changes, and the host told about the resolver.

use std::sync::Arc;

use overlay_proto::coord::DnsConfig;

use super::Shell;
use crate::dns::Zone;
use crate::host_dns::HostDns;

/// What the shell keeps about DNS.
pub struct Names {
    pub host: Arc<HostDns>,
    config: Option<DnsConfig>,
    /// The netmap or the settings changed since the zone was built.
    dirty: bool,
    /// Whether names outside the mesh are forwarded (resolv.conf mode).
    forwarding: bool,
}

impl Names {
    pub fn new(host: Arc<HostDns>) -> Self {
        Names {
            host,
            config: None,
            dirty: false,
            forwarding: false,
        }
    }

    pub fn netmap_changed(&mut self) {
        self.dirty |= self.config.is_some();
    }
}

impl Shell {
    /// New DNS settings from the coordinator: the host is told (or its DNS
    /// restored when the mesh has none any more).
    pub(super) fn set_dns(&mut self, config: Option<DnsConfig>) {
        if config == self.names.config {
            return;
        }
        let host = self.names.host.clone();
        let upstreams = match &config {
            Some(c) => tokio::task::block_in_place(|| host.apply(&c.domain, c.resolver)),
            None => {
                tokio::task::block_in_place(|| host.restore());
                Vec::new()
            }
        };
        self.names.forwarding = !upstreams.is_empty();
        self.dataplane.set_upstreams(upstreams);
        self.names.config = config;
        self.names.dirty = true;
    }

    /// Rebuilds the zone if the netmap or the settings changed.
    pub(super) fn sync_zone(&mut self) {
        if !self.names.dirty {
            return;
        }
        self.names.dirty = false;
        let Some(config) = &self.names.config else {
            self.dataplane.set_zone(None);
            return;
        };
        let peers: Vec<_> = self.dataplane.peers().iter().map(|p| p.info()).collect();
        let extra: Vec<_> = config
            .records
            .iter()
            .map(|r| (r.name.clone(), r.ip))
            .collect();
        let mut zone = Zone::new(&config.domain, config.resolver, self.ice.mesh).build(
            (&self.me_name, self.dataplane.my_ip()),
            &peers,
            &extra,
        );
        zone.forwarding = self.names.forwarding;
        tracing::debug!("DNS zone {}: {} names", zone.domain, zone.len());
        self.dataplane.set_zone(Some(zone));
    }
}
