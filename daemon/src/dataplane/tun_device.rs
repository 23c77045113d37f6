//! The TUN interface: created with the node's mesh IP and the network's prefix
//! (which routes the whole mesh network to it), removed when the device is dropped.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("creating TUN interface {name} needs root (CAP_NET_ADMIN); run 'sudo overlayd up'")]
    Permission { name: String },
    #[error("cannot create TUN interface {name}: {message}")]
    Other { name: String, message: String },
}

/// Set to `0` to run the TUN without offloads (for kernels or sandboxes that
/// refuse them, and to compare).
pub const OFFLOAD_ENV: &str = "OVERLAY_TUN_OFFLOAD";

/// The interface, and whether its reads and writes carry a `virtio_net_hdr`.
pub struct Tun {
    pub device: Arc<tun::AsyncDevice>,
    pub offload: bool,
}

/// Creates the TUN with offloads (IFF_VNET_HDR, TSO, NAPI), or without them when
/// the kernel refuses them or `OVERLAY_TUN_OFFLOAD=0` says so.
pub fn create(name: &str, ip: Ipv4Addr, network: Ipv4Net, mtu: u16) -> Result<Tun, TunError> {
    let wanted = std::env::var(OFFLOAD_ENV).map_or(true, |v| v != "0");
    if wanted {
        match create_with(name, ip, network, mtu, true) {
            Ok(device) => {
                match crate::dataplane::offload::enable(device.as_raw_fd()) {
                    Ok(crate::dataplane::offload::Offloads::Tso4And6) => {}
                    Ok(crate::dataplane::offload::Offloads::Tso4) => tracing::info!(
                        "TUN segmentation offload for IPv4 only (the kernel refuses TSO6)"
                    ),
                    Err(e) => tracing::info!(
                        "TUN segmentation offload unavailable ({e}); one packet per read"
                    ),
                }
                return Ok(Tun {
                    device,
                    offload: true,
                });
            }
            Err(e @ TunError::Permission { .. }) => return Err(e),
            Err(e) => tracing::warn!("{e}; trying again without offloads"),
        }
    }
    let device = create_with(name, ip, network, mtu, false)?;
    Ok(Tun {
        device,
        offload: false,
    })
}

fn create_with(
    name: &str,
    ip: Ipv4Addr,
    network: Ipv4Net,
    mtu: u16,
    offload: bool,
) -> Result<Arc<tun::AsyncDevice>, TunError> {
    let mut config = tun::Configuration::default();
    config
        .tun_name(name)
        .address(ip)
        .netmask(network.netmask())
        .mtu(mtu)
        .up();
    // IFF_NAPI: packets we write go through the kernel's GRO, so the receiving
    // TCP stack sees coalesced segments instead of one small packet at a time.
    // IFF_VNET_HDR: reads and writes carry a virtio_net_hdr, which lets the
    // kernel hand us TCP segments of up to 64 KiB (see `offload`).
    config.platform_config(|p| {
        p.napi(offload);
        p.vnet_hdr(offload);
    });
    match tun::create_as_async(&config) {
        Ok(dev) => Ok(Arc::new(dev)),
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
