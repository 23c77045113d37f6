//! The TUN interface: created with the node's mesh IP and the network's prefix
//! (which routes the whole mesh network to it), removed when the device is dropped.
//! The mesh IPv6 address and prefix are added (and replaced) by [`set_ipv6`]:
//! the `tun` crate sets IPv4 only.

use std::net::{Ipv4Addr, Ipv6Addr};
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
    pub name: String,
    pub mtu: u16,
}

/// Why the TUN cannot have its mesh IPv6 address.
#[derive(Debug, thiserror::Error)]
pub enum Ipv6Error {
    #[error("the kernel has no IPv6")]
    NoIpv6,
    #[error("IPv6 is disabled on {name} and cannot be enabled ({source})")]
    Disabled {
        name: String,
        source: std::io::Error,
    },
    #[error("interface {name} has mtu {mtu}, below IPv6's minimum of 1280")]
    Mtu { name: String, mtu: u16 },
    #[error("cannot {what} IPv6 address {addr} on {name}: {source}")]
    Address {
        what: &'static str,
        addr: Ipv6Addr,
        name: String,
        source: std::io::Error,
    },
}

/// IPv6's minimum link MTU (RFC 8200): the kernel turns IPv6 off below it.
const IPV6_MIN_MTU: u16 = 1280;

/// Replaces the interface's mesh IPv6 address `old` with `new` (either may
/// be `None`), each with its prefix length, so the kernel routes the whole
/// mesh prefix to the interface. IPv6 is enabled on the interface first if
/// the host's default left it off. A TUN is point-to-point without ARP
/// (IFF_NOARP), so the kernel skips duplicate address detection: the
/// address leaves "tentative" as soon as the kernel's address work runs,
/// without a probe's one-second wait.
pub fn set_ipv6(
    name: &str,
    mtu: u16,
    old: Option<(Ipv6Addr, u8)>,
    new: Option<(Ipv6Addr, u8)>,
) -> Result<(), Ipv6Error> {
    if old.is_none() && new.is_none() {
        return Ok(());
    }
    if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
        return Err(Ipv6Error::NoIpv6);
    }
    if new.is_some() {
        if mtu < IPV6_MIN_MTU {
            return Err(Ipv6Error::Mtu {
                name: name.to_owned(),
                mtu,
            });
        }
        enable_ipv6(name)?;
    }
    let socket = Ipv6Socket::open().map_err(|e| match e.raw_os_error() {
        Some(libc::EAFNOSUPPORT) => Ipv6Error::NoIpv6,
        _ => Ipv6Error::Disabled {
            name: name.to_owned(),
            source: e,
        },
    })?;
    let index = interface_index(name).map_err(|source| Ipv6Error::Address {
        what: "find the interface for",
        addr: new.or(old).map_or(Ipv6Addr::UNSPECIFIED, |(a, _)| a),
        name: name.to_owned(),
        source,
    })?;
    if let Some((addr, prefix)) = old {
        if new != old {
            match socket.ioctl(libc::SIOCDIFADDR, index, addr, prefix) {
                Ok(()) => {}
                // Already gone (the interface was reset): nothing to remove.
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
                Err(source) => {
                    return Err(Ipv6Error::Address {
                        what: "remove",
                        addr,
                        name: name.to_owned(),
                        source,
                    })
                }
            }
        }
    }
    if let Some((addr, prefix)) = new {
        match socket.ioctl(libc::SIOCSIFADDR, index, addr, prefix) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(Ipv6Error::Address {
                    what: "add",
                    addr,
                    name: name.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Turns IPv6 on for interface `name` when the host's default
/// (`net.ipv6.conf.default.disable_ipv6`) created it with IPv6 off.
fn enable_ipv6(name: &str) -> Result<(), Ipv6Error> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    let disabled = std::fs::read_to_string(&path)
        .map_err(|source| Ipv6Error::Disabled {
            name: name.to_owned(),
            source,
        })?
        .trim()
        == "1";
    if disabled {
        std::fs::write(&path, "0").map_err(|source| Ipv6Error::Disabled {
            name: name.to_owned(),
            source,
        })?;
        tracing::debug!("enabled IPv6 on {name} (the host's default had it off)");
    }
    Ok(())
}

fn interface_index(name: &str) -> std::io::Result<u32> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(index)
}

/// An AF_INET6 datagram socket, the handle the address ioctls go through.
struct Ipv6Socket(std::os::fd::OwnedFd);

impl Ipv6Socket {
    fn open() -> std::io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right after.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Ipv6Socket(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    /// SIOCSIFADDR / SIOCDIFADDR with a `struct in6_ifreq`.
    fn ioctl(
        &self,
        request: libc::c_ulong,
        index: u32,
        addr: Ipv6Addr,
        prefix: u8,
    ) -> std::io::Result<()> {
        let req = libc::in6_ifreq {
            ifr6_addr: libc::in6_addr {
                s6_addr: addr.octets(),
            },
            ifr6_prefixlen: u32::from(prefix),
            ifr6_ifindex: index as libc::c_int,
        };
        // SAFETY: the kernel reads a `struct in6_ifreq` for these requests;
        // `req` lives across the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, &req) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
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
                    name: name.to_owned(),
                    mtu,
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
        name: name.to_owned(),
        mtu,
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
