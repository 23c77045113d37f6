//! The TUN interface: created with the node's mesh IP and the network's prefix
//! (which routes the whole mesh network to it), removed when the device is dropped.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::config::netmask;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("creating TUN interface {name} needs root (CAP_NET_ADMIN); run 'sudo overlayd up'")]
    Permission { name: String },
    #[error("cannot create TUN interface {name}: {message}")]
    Other { name: String, message: String },
}

pub fn create(
    name: &str,
    ip: Ipv4Addr,
    network: Ipv4Net,
    mtu: u16,
) -> Result<Arc<tun::AsyncDevice>, TunError> {
    let mut config = tun::Configuration::default();
    config
        .tun_name(name)
        .address(ip)
        .netmask(netmask(network.prefix_len()))
        .mtu(mtu)
        .up();
    // IFF_NAPI: packets we write go through the kernel's GRO, so the receiving
    // TCP stack sees coalesced segments instead of one small packet at a time.
    // IFF_VNET_HDR: reads and writes carry a virtio_net_hdr, which lets the
    // kernel hand us TCP segments of up to 64 KiB (see `offload`).
    config.platform_config(|p| {
        p.napi(true);
        p.vnet_hdr(true);
    });
    match tun::create_as_async(&config) {
        Ok(dev) => {
            if let Err(e) = crate::offload::enable(dev.as_raw_fd()) {
                tracing::info!("TUN segmentation offload unavailable ({e}); one packet per read");
            }
            Ok(Arc::new(dev))
        }
        Err(e) => {
            let message = e.to_string();
            if message.contains("Operation not permitted") || message.contains("Permission denied")
            {
                Err(TunError::Permission {
                    name: name.to_owned(),
                })
            } else {
                Err(TunError::Other {
                    name: name.to_owned(),
                    message,
                })
            }
        }
    }
}
